"""The batched engine: B rows in one step against transformers' own batched generate (left padding,
attention_mask), and a request's independence from its batch-mates."""

import pytest
import torch
from tiny import reference

import dgrun
from dgrun.engine import Engine
from dgrun.generate import Block, Request, Stats

FP32_TOL = 1e-4
PROMPTS = [list(range(3, 23)), [7, 9, 11, 40, 41, 42, 43, 5, 6, 8, 90], list(range(60, 76))]  # 20, 11, 16 tokens


def left_padded(prompts, pad=0):
    n = max(map(len, prompts))
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (n - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def m_path(m):
    return m.path


@pytest.fixture(scope="module")
def models(ckpt_a):
    m = dgrun.load(ckpt_a, backend="cpu")
    m.args.eos_token_id = []
    m.path = ckpt_a
    return m, reference(ckpt_a)


def test_batched_logits_match_reference(models):
    """Step 1, a self-conditioned step, and step 1 after a commit, for 3 prompts of different lengths at once."""
    from transformers import DynamicCache

    m, ref = models
    ids, mask = left_padded(PROMPTS)
    c = m.args.canvas_length
    canvas = torch.randint(0, m.args.vocab_size, (3, c), generator=torch.Generator().manual_seed(1))
    pad = lambda mk: torch.nn.functional.pad(mk, (0, c), value=True)  # noqa: E731
    with torch.no_grad():
        rc = DynamicCache(config=ref.config.get_text_config(decoder=True))
        ref.model.encoder(input_ids=ids, attention_mask=mask, past_key_values=rc)
        r1 = ref(decoder_input_ids=canvas, past_key_values=rc, decoder_attention_mask=pad(mask)).logits
        sc = r1 / 0.7
        r2 = ref(decoder_input_ids=canvas, past_key_values=rc, decoder_attention_mask=pad(mask),
                 self_conditioning_logits=sc).logits
        block = r2.argmax(-1)
        mask2 = pad(mask)
        pos = torch.arange(ids.shape[1], ids.shape[1] + c)[None]
        ref.model.encoder(input_ids=block, attention_mask=mask2, past_key_values=rc, position_ids=pos)
        r3 = ref(decoder_input_ids=canvas, past_key_values=rc, decoder_attention_mask=pad(mask2)).logits
    cache = m.new_cache(3)
    for slot, p in enumerate(PROMPTS):
        m.encode(p, cache, slot)
    ours = [m.denoise(canvas, cache), m.denoise(canvas, cache, sc)]
    for slot in range(3):
        m.encode(block[slot].tolist(), cache, slot)
    ours.append(m.denoise(canvas, cache))
    for name, r, d in zip(("step1", "step2_self_cond", "block2"), (r1, r2, r3), ours):
        assert d.shape == r.shape == (3, c, m.args.vocab_size)
        err = (r - d).abs().max().item()
        assert err <= FP32_TOL, f"{name}: max-abs {err}"


@pytest.mark.parametrize("knobs", [dict(steps=3, stability_threshold=0, confidence_threshold=1e-9),
                                   dict(steps=4, stability_threshold=0, confidence_threshold=4.4)])
def test_batched_tokens_match_reference_generate(models, knobs, reference_draws):
    """Over 3 blocks, with the reference given the same draws per row: the same tokens for every row. With a
    confidence threshold near the rows' entropies they stop at different steps (the reference freezes a row that
    stopped; dgrun commits it and moves on)."""
    m, _ = models
    # transformers 5.23's batched generate fails with padding under eager attention (its decoder mask is built
    # from an integer dummy tensor): sdpa builds the same boolean mask.
    ref = reference(m_path(m), attn="sdpa")
    seeds = [11, 12, 13]
    ids, mask = left_padded(PROMPTS)
    reference_draws.seed(*seeds)
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, pad_token_id=0, max_new_tokens=48,
                           max_denoising_steps=knobs["steps"], stability_threshold=knobs["stability_threshold"],
                           confidence_threshold=knobs["confidence_threshold"])
    results = m.generate(PROMPTS, seed=seeds, max_new_tokens=48, **knobs)
    for row, res in enumerate(results):
        assert res.stats.blocks == 3 and len(res.ids) == 48
        assert res.ids == out.sequences[row, ids.shape[1]:].tolist(), f"row {row}"
        assert res.stats.tokens_per_forward == pytest.approx(float(out.tokens_per_forward[row]))
    if knobs["confidence_threshold"] > 1:
        assert len({s for r in results for s in r.stats.steps_per_block}) > 1


KNOBS = dict(max_new_tokens=40, steps=6, t_max=0.9, confidence_threshold=0.05)


def alone(m, backend_knobs=KNOBS, seed=7):
    return m.generate(PROMPTS[1], seed=seed, **backend_knobs)


def check_independent(m):
    solo = alone(m)
    assert solo.stats.blocks >= 2
    # In a batch of 4 with other prompts, other lengths and other seeds.
    batch = m.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], [5, 6]], seed=[1, 7, 2, 3], **KNOBS)
    assert batch[1].ids == solo.ids and batch[1].stats.steps_per_block == solo.stats.steps_per_block
    assert len({tuple(r.ids) for r in batch}) == 4

    # Joining a batch whose rows are mid-block, at other steps and with other knobs.
    cfg = m.defaults.update(**KNOBS)
    engine = Engine(m.backend, m.new_cache(4))
    others = [Request(p, cfg.update(seed=s, steps=st), index=i)
              for i, (p, s, st) in enumerate(zip([PROMPTS[0], PROMPTS[2], [5, 6]], [1, 2, 3], [9, 5, 7]))]
    for req in others:
        engine.add(req)
    for _ in range(3):
        engine.step()
    engine.step()
    assert {r.steps for r in others} != {0}  # mid-block
    late = Request(PROMPTS[1], cfg.update(seed=7), index=3)
    engine.add(late)
    while not late.finished:
        engine.step()
    stats = late.close()
    assert stats.ids == solo.ids and stats.steps_per_block == solo.stats.steps_per_block


def test_request_is_independent_of_its_batch_mates_cpu(models):
    check_independent(models[0])


def test_request_is_independent_of_its_batch_mates_mlx(ckpt_a):
    pytest.importorskip("mlx.core")
    m = dgrun.load(ckpt_a, backend="mlx")
    m.args.eos_token_id = []
    check_independent(m)


def test_batch_stream_tags_events_and_ends_each_prompt(models):
    m, _ = models
    events = list(m.stream(PROMPTS, seed=[1, 2, 3], max_new_tokens=20, steps=3))
    stats = [e for e in events if isinstance(e, Stats)]
    assert sorted(s.prompt_index for s in stats) == [0, 1, 2]
    for s in stats:
        blocks = [e for e in events if isinstance(e, Block) and e.prompt_index == s.prompt_index]
        assert s.ids == [t for b in blocks for t in b.ids] and len(s.ids) == 20
    with pytest.raises(dgrun.DgrunError, match="seeds"):
        m.generate(PROMPTS, seed=[1, 2])


def test_context_limit(ckpt_a):
    m = dgrun.load(ckpt_a, backend="cpu", ctx_size=24)
    m.args.eos_token_id = []
    with pytest.raises(dgrun.DgrunError, match="context limit of 24"):
        m.generate(list(range(3, 30)))
    res = m.generate(PROMPTS[1], max_new_tokens=64, steps=2)  # 11 + 16 > 24: the first block is not committed
    assert res.stats.stop_reason == "context" and res.stats.blocks == 1
    with pytest.raises(dgrun.DgrunError, match="ctx_size"):
        dgrun.load(ckpt_a, backend="cpu", ctx_size=0)


def test_default_context_is_the_models_capped_by_memory(ckpt_a):
    from dgrun.info import info
    from dgrun.models.diffusion_gemma import context_limit, kv_bytes_per_token

    m = dgrun.load(ckpt_a, backend="cpu")
    assert m.args.max_position_embeddings == 131072  # transformers' default, from config.json
    per_token = kv_bytes_per_token(m.args)
    assert per_token == 2 * 1 * 32 * 4  # shape A: one full layer, one kv head of 32, K and V, float32
    assert context_limit(m.args, budget=1000 * per_token) == 1000
    assert context_limit(m.args, budget=10**15) == 131072
    shown = info(ckpt_a)["hyperparameters"]
    assert shown["context_length"] == 131072 and shown["context_limit"].startswith(f"{m.ctx} tokens")


def test_unwritten_cache_entries_never_reach_a_step(models):
    """Full layers are allocated empty: a row shorter than its batch-mate must not see the garbage (NaN here)
    past its length; the batched logits equal each row's logits alone."""
    m, _ = models
    cache = m.new_cache(2)
    for k, v in zip(cache.keys, cache.values):
        if k.shape[2] > cache.ring:
            k.fill_(float("nan"))
            v.fill_(float("nan"))
    m.encode(PROMPTS[0], cache, 0)
    m.encode(PROMPTS[1], cache, 1)
    canvas = torch.arange(3, 3 + 2 * m.args.canvas_length).view(2, -1)
    batched = m.denoise(canvas, cache)
    assert torch.isfinite(batched).all()
    for row in range(2):
        alone = m.new_cache()
        m.encode(PROMPTS[row], alone)
        torch.testing.assert_close(batched[row], m.denoise(canvas[row], alone), atol=1e-5, rtol=0)
