"""End to end: the block loop against transformers' generate, determinism, EOS and multi-block output."""

import pytest
import torch
from tiny import reference
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

import dgrun
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft, Stats

PROMPT = list(range(3, 23))  # 20 tokens: longer than the sliding window (8)


def ref_generate(ref, draws, seed, eos=None, **kw):
    draws.seed(seed)
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), eos_token_id=eos, pad_token_id=0, **kw)
    return out.sequences[0, len(PROMPT):].tolist(), float(out.tokens_per_forward[0])


@pytest.fixture(scope="module")
def models(ckpt_a):
    return dgrun.load(ckpt_a), reference(ckpt_a)


# Few steps: over many steps, float noise (1e-6) compounds through self-conditioning on random weights
# until one categorical draw flips (see README, "How parity is tested").
@pytest.mark.parametrize("knobs", [dict(steps=4, stability_threshold=0, confidence_threshold=1e-9),
                                   dict(steps=3, stability_threshold=1, confidence_threshold=100.0),
                                   dict(steps=2, entropy_bound=5.0)])
def test_tokens_match_reference_generate(models, knobs, reference_draws):
    m, ref = models
    m.args.eos_token_id = []
    ref_kw = dict(knobs, max_denoising_steps=knobs["steps"])
    del ref_kw["steps"]
    if "entropy_bound" in ref_kw:  # the reference takes it inside sampler_config
        ref_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=ref_kw.pop("entropy_bound"))
    ref_ids, ref_tpf = ref_generate(ref, reference_draws, 11, max_new_tokens=40, **ref_kw)
    res = m.generate(PROMPT, seed=11, max_new_tokens=40, **knobs)
    assert res.stats.blocks == 3  # 40 tokens over canvases of 16
    assert res.ids == ref_ids[:40]  # the reference returns whole blocks; dgrun cuts at max_new_tokens
    assert res.stats.tokens_per_forward == pytest.approx(ref_tpf)


def test_eos_trims_like_reference(models, reference_draws):
    m, ref = models
    knobs = dict(steps=3, stability_threshold=0, confidence_threshold=1e-9)
    m.args.eos_token_id = []
    free = m.generate(PROMPT, seed=5, max_new_tokens=48, **knobs).ids
    eos = free[21]  # a token the model emits in the second block
    first = free.index(eos)
    m.args.eos_token_id = [eos]
    res = m.generate(PROMPT, seed=5, max_new_tokens=48, **knobs)
    assert res.ids == free[:first]  # EOS and everything after it dropped
    assert res.stats.blocks == first // 16 + 1
    ref_ids, ref_tpf = ref_generate(ref, reference_draws, 5, eos=eos, max_new_tokens=48, max_denoising_steps=3,
                                    stability_threshold=0, confidence_threshold=1e-9)
    assert ref_ids[:first + 1] == free[:first + 1] and all(t == 0 for t in ref_ids[first + 1:])
    assert res.stats.tokens_per_forward == pytest.approx(ref_tpf)


def test_seed_determinism(models):
    m, _ = models
    m.args.eos_token_id = []
    a = m.generate(PROMPT, seed=3, max_new_tokens=20, steps=6)
    b = m.generate(PROMPT, seed=3, max_new_tokens=20, steps=6)
    c = m.generate(PROMPT, seed=4, max_new_tokens=20, steps=6)
    assert a.ids == b.ids and len(a.ids) == 20
    assert a.ids != c.ids


def test_stream_events(models):
    m, _ = models
    m.args.eos_token_id = []
    events = list(m.stream(PROMPT, seed=1, max_new_tokens=20, steps=3))
    drafts = [e for e in events if isinstance(e, Draft)]
    blocks = [e for e in events if isinstance(e, Block)]
    assert isinstance(events[-1], Stats) and len(blocks) == 2 and len(drafts) == 6
    assert all(len(d.ids) == 16 for d in drafts)
    assert drafts[2].ids == blocks[0].ids  # the block commits the last step's argmax canvas
    assert events[-1].ids == blocks[0].ids + blocks[1].ids and events[-1].steps_per_block == [3, 3]


def test_text_prompt_and_cache_reuse(models):
    m, _ = models
    m.args.eos_token_id = []
    res = m.generate("def add(a, b):", seed=0, max_new_tokens=8, steps=2)
    assert res.stats.prompt_tokens == len(m.tokenizer.encode("def add(a, b):")) and isinstance(res.text, str)
    cache = m.new_cache()
    m.encode(PROMPT[:10], cache)
    a = m.generate(PROMPT[10:], cache=cache, seed=2, max_new_tokens=16, steps=2).ids
    assert a == m.generate(PROMPT, seed=2, max_new_tokens=16, steps=2).ids


def test_bad_knobs(models):
    m, _ = models
    for bad in (dict(steps=0), dict(t_min=0.9), dict(entropy_bound=0.0), dict(max_new_tokens=-1), dict(bogus=1)):
        with pytest.raises(DgrunError):
            m.generate(PROMPT, **bad)


def test_generation_config_defaults(tmp_path):
    from tiny import SHAPE_B, make_checkpoint

    path = make_checkpoint(tmp_path, SHAPE_B, canvas_length=8, generation=dict(
        max_denoising_steps=7, t_min=0.2, t_max=0.9, sampler_config=dict(entropy_bound=0.3),
        stability_threshold=2, confidence_threshold=0.01, eos_token_id=[1, 5]))
    m = dgrun.load(path)
    d = m.defaults
    assert (d.steps, d.t_min, d.t_max, d.entropy_bound, d.stability_threshold, d.confidence_threshold) == (
        7, 0.2, 0.9, 0.3, 2, 0.01)
    assert m.args.eos_token_id == [1, 5]
    assert max(m.generate([3, 4, 6], max_new_tokens=8).stats.steps_per_block) <= 7
