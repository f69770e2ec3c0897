"""Logits parity with transformers 5.23.0 (the reference) on tiny random checkpoints."""

import pytest
import torch
from tiny import make_checkpoint, reference, SHAPE_A

import dgrun

FP32_TOL = 1e-4
BF16_REL = 1.5


def three_steps(model_ref, m, prompt, canvas, temp=0.7):
    """Logits of: step 1, step 2 with self-conditioning, and step 1 of a second block after a commit."""
    from transformers import DynamicCache

    out = {}
    with torch.no_grad():
        rc = DynamicCache(config=model_ref.config.get_text_config(decoder=True))
        model_ref.model.encoder(input_ids=prompt, past_key_values=rc)
        r1 = model_ref(decoder_input_ids=canvas, past_key_values=rc).logits[0]
        sc = (r1 / temp).to(model_ref.dtype)
        r2 = model_ref(decoder_input_ids=canvas, past_key_values=rc, self_conditioning_logits=sc[None]).logits[0]
        block = r2.argmax(-1)[None]
        model_ref.model.encoder(input_ids=block, past_key_values=rc)
        r3 = model_ref(decoder_input_ids=canvas, past_key_values=rc).logits[0]
    c = m.new_cache()
    m.encode(prompt[0].tolist(), c)
    out["step1"] = (r1, m.denoise(canvas[0], c))
    out["step2_self_cond"] = (r2, m.denoise(canvas[0], c, sc))
    m.encode(block[0].tolist(), c)
    out["block2"] = (r3, m.denoise(canvas[0], c))
    return out


def inputs(vocab, prompt_len, canvas_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, prompt_len), generator=g), torch.randint(0, vocab, (1, canvas_len), generator=g)


@pytest.mark.parametrize("which", ["a", "b"])
def test_fp32_logits_match_reference(which, ckpt_a, ckpt_b):
    path = ckpt_a if which == "a" else ckpt_b
    m = dgrun.load(path, backend="cpu")
    ref = reference(path)
    # Prompts longer than the sliding window, so the window and the W-1 cache crop both matter.
    prompt, canvas = inputs(m.args.vocab_size, 3 * m.args.sliding_window, m.args.canvas_length)
    for name, (r, d) in three_steps(ref, m, prompt, canvas).items():
        assert d.shape == r.shape and d.dtype == torch.float32
        err = (r - d).abs().max().item()
        assert err <= FP32_TOL, f"{name}: max-abs {err}"


def test_bf16_logits_match_reference(tmp_path):
    """In bf16, dgrun may differ from the bf16 reference by rounding order (SDPA, expert sums), so the bound is
    relative: dgrun-bf16's RMS error against the fp32 reference is within 1.5x the bf16 reference's own."""
    path = make_checkpoint(tmp_path, SHAPE_A, canvas_length=16, seed=3, dtype=torch.bfloat16)
    prompt, canvas = inputs(SHAPE_A["vocab_size"], 20, 16)
    ours = three_steps(reference(path, torch.bfloat16), dgrun.load(path, dtype="bfloat16"), prompt, canvas)
    exact = three_steps(reference(path, torch.float32), dgrun.load(path), prompt, canvas)
    rms = lambda a, b: (a.float() - b.float()).pow(2).mean().sqrt().item()  # noqa: E731
    for name in ours:
        ref16, d16 = ours[name]
        ref32 = exact[name][0]
        assert d16.dtype == torch.float32
        assert rms(d16, ref32) <= BF16_REL * rms(ref16, ref32), name


def test_long_prompt_in_chunks_equals_one_prefill(ckpt_a):
    """Committing a prompt in several calls gives the cache one long call gives (window crop included)."""
    m = dgrun.load(ckpt_a)
    prompt, canvas = inputs(m.args.vocab_size, 30, 16, seed=5)
    one, parts = m.new_cache(), m.new_cache()
    m.encode(prompt[0].tolist(), one)
    for chunk in (prompt[0, :7], prompt[0, 7:8], prompt[0, 8:30]):
        m.encode(chunk.tolist(), parts)
    assert one.lengths == parts.lengths == [30]
    torch.testing.assert_close(m.denoise(canvas[0], one), m.denoise(canvas[0], parts), atol=1e-4, rtol=0)


def test_encoder_and_decoder_share_weights(ckpt_a):
    m = dgrun.load(ckpt_a)
    w = m.backend.w
    assert not any(k.startswith(("model.", "lm_head")) for k in w)
    assert sum(1 for k in w if "token_embd" in k) == 1
    # Each layer has two scalars (encoder and decoder) and a single copy of everything else.
    assert {k.split(".", 2)[2] for k in w if k.startswith("blk.0.")} >= {"layer_output_scale.weight",
                                                                          "enc_layer_output_scale.weight"}
