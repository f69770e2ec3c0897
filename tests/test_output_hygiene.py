"""Output hygiene in the shared block loop: end-of-turn stops, repeated blocks trimmed, unconverged blocks flagged.

A scripted backend hands the loop fixed canvases, so each rule is checked on known tokens.
"""

from types import SimpleNamespace

import pytest

from dgrun.generate import Block, SamplerConfig, stream

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 7  # an end-of-turn id passed as a stop id


class Scripted:
    """Each block's canvas is the next of `canvases`; `converges` says whether a block ever stops early.
    One row at a time (the loop runs one request here); the state is a list of [canvas, steps] rows."""

    def __init__(self, canvases, converges=True):
        self.args = SimpleNamespace(canvas_length=len(canvases[0]))
        self.canvases, self.converges = iter(canvases), converges
        self.encoded = []

    def new_cache(self, slots, max_len):
        return SimpleNamespace(slots=slots, max_len=max_len, lengths=[0] * slots, reset=lambda slot: None)

    def encode(self, slot, ids, cache):
        self.encoded.append(list(ids))
        cache.lengths[slot] += len(ids)

    def start(self, rows, cache):
        return [[next(self.canvases), 0] for _ in rows]

    def step(self, state, cache):
        return [[canvas, steps + 1] for canvas, steps in state]

    def done(self, state):
        return [self.converges and steps >= 2 for _, steps in state]

    def canvas(self, state):
        return [canvas for canvas, _ in state]

    def take(self, state, index):
        return [state[i] for i in index]

    def cat(self, states):
        return [row for s in states for row in s]

    def tolist(self, ids):
        return list(ids)


def run(canvases, converges=True, trim=False, eos=(1,), max_new=64, steps=5):
    backend = Scripted(canvases, converges)
    events = list(stream(backend, [2, 3], SamplerConfig(steps=steps, max_new_tokens=max_new), eos, 0, None, trim))
    return [e for e in events if isinstance(e, Block)], events[-1], backend


def test_end_of_turn_stops_like_eos():
    blocks, stats, backend = run([[10, 11, 12, 13], [14, EOT, 15, 16], [17, 18, 19, 20]], eos=(1, EOT))
    assert [b.ids for b in blocks] == [[10, 11, 12, 13], [14]] and blocks[-1].eos
    assert stats.ids == [10, 11, 12, 13, 14]
    assert backend.encoded == [[2, 3], [10, 11, 12, 13]]  # the finished block is never committed
    blocks, stats, _ = run([[10, 11, 12, 13], [14, EOT, 15, 16], [17, 18, 19, 20]], eos=(1,), max_new=12)
    assert stats.ids[4:6] == [14, EOT]  # without the stop id it is an ordinary token


def test_repeated_block_is_trimmed_and_ends_generation():
    canvases = [[10, 11, 12, 13], [20, 21, 22, 23], [20, 21, 22, 23], [30, 31, 32, 1]]
    blocks, stats, backend = run(canvases, trim=True)
    assert [b.repeated for b in blocks] == [False, False, True]
    assert blocks[-1].ids == [] and stats.ids == [10, 11, 12, 13, 20, 21, 22, 23]
    assert backend.encoded == [[2, 3], [10, 11, 12, 13], [20, 21, 22, 23]]
    blocks, stats, _ = run(canvases, trim=False)  # the flag off keeps the loop's old behaviour
    assert not any(b.repeated for b in blocks) and stats.ids[8:12] == [20, 21, 22, 23] and len(blocks) == 4


def test_only_an_exact_repeat_is_trimmed():
    blocks, stats, _ = run([[20, 21, 22, 23], [20, 21, 22, 24], [20, 21, 22, 1]], trim=True)
    assert not any(b.repeated for b in blocks) and len(stats.ids) == 11


def test_unconverged_blocks_are_flagged():
    blocks, stats, _ = run([[10, 11, 12, 13], [14, 1, 0, 0]], converges=False, steps=3)
    assert [(b.converged, b.steps) for b in blocks] == [(False, 3), (False, 3)]
    blocks, _, _ = run([[10, 11, 12, 13], [14, 1, 0, 0]], converges=True, steps=3)
    assert [(b.converged, b.steps) for b in blocks] == [(True, 2), (True, 2)]


def test_model_stop_ids_reach_the_loop(ckpt_chat):
    import dgrun

    m = dgrun.load(ckpt_chat)
    eot = m.tokenizer.token_id("<turn|>")
    seen = []
    m.backend.tolist = lambda ids, real=m.backend.tolist: seen.append(real(ids)) or [[5, eot, 6] + [9] * 13]
    r = m.generate([2, 5], stop_ids=[eot], steps=1, max_new_tokens=32)
    assert r.ids == [5] and r.stats.blocks == 1 and len(seen) == 1
