"""Infilling: pinned canvas positions (the suffix) never change, on every backend; only the gap is output."""

import pytest

import dgrun
from dgrun.errors import DgrunError
from dgrun.generate import Draft, SamplerConfig, Stats, stream

PROMPT = list(range(3, 23))
SUFFIX = [7, 8, 9, 10, 11]


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_pinned_positions_hold_through_every_step(ckpt_a, backend):
    m = dgrun.load(ckpt_a, backend=backend)
    fixed = [-1] * 6 + SUFFIX + [-1] * 5  # canvas 16: a gap of 6, the suffix, 5 free positions after it
    cfg = SamplerConfig(steps=6, max_new_tokens=6, seed=3)
    events = list(stream(m.backend, PROMPT, cfg, fixed=fixed))
    drafts = [e for e in events if isinstance(e, Draft)]
    assert len(drafts) >= 2
    for d in drafts:
        assert d.ids[6:11] == SUFFIX
    free = [d.ids[:6] + d.ids[11:] for d in drafts]
    assert any(f != free[0] for f in free[1:]) or len(set(free[0])) > 1  # the free positions are sampled
    stats = events[-1]
    assert isinstance(stats, Stats) and stats.ids == drafts[-1].ids[:6]


def test_infill_returns_the_gap(ckpt_a):
    m = dgrun.load(ckpt_a)
    m.args.eos_token_id = []
    r = m.infill(PROMPT, SUFFIX, gap=6, steps=4, seed=1)
    assert len(r.ids) == 6 and r.stats.blocks == 1
    assert r.stats.tokens_per_forward == pytest.approx(6 / r.stats.steps_per_block[0])  # pinned ones not counted
    with pytest.raises(DgrunError, match="gap"):
        m.infill(PROMPT, SUFFIX, gap=16)
    with pytest.raises(DgrunError, match="suffix"):
        m.infill(PROMPT, [], gap=4)
