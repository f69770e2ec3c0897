"""GGUF: dgrun's files read back by gguf-py, llama.cpp-layout files written by gguf-py load in dgrun, and
logits from GGUF match the safetensors checkpoint (exactly for bf16, within stated bounds when quantized)."""

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
from safetensors.torch import load_file
from llama_layout import write_llama_gguf
from tiny import CHAT_TEMPLATE, SHAPE_A, reference
from test_parity import inputs, three_steps

import dgrun
from dgrun.checkpoint import load
from dgrun.convert.convert import convert
from dgrun.packed import QTensor

# Quantized logits against the float32 checkpoint (ckpt_k, seeds 0-1, plain and self-conditioned steps).
# Measured 2026-11-23: Q8_0 max-abs 0.86, argmax agreement 0.94; Q4_K_M max-abs 2.08, agreement 0.81 (logit
# std ~1.3). Over seeds 0-5: Q8_0 1.54 / 0.94, Q4_K_M 2.54 / 0.63, and bf16 itself 1.11 / 0.88 where a top-k
# routing decision flips. Bounds: max-abs 1.7-2.3x the measured value, agreement one to three tokens lower.
BOUNDS = {"gguf-q8": (2.0, 0.875), "gguf-q4": (3.5, 0.625)}


def fields(path):
    r = gguf.GGUFReader(path)
    return r, {k: f for k, f in r.fields.items()}


def value(f):
    return f.contents()


# --- dgrun's writer, read back by gguf-py --------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_gguf(ckpt_bf16, tmp_path_factory):
    return convert(ckpt_bf16, "gguf-bf16", tmp_path_factory.mktemp("out") / "m.gguf").path


def test_written_tensors_have_llama_cpp_names_types_and_shapes(bf16_gguf, ckpt_bf16):
    r, _ = fields(bf16_gguf)
    tensors = {t.name: t for t in r.tensors}
    # 7 global + 23 per sliding layer + 22 per full layer (no attn_v where V = K), as llama.cpp writes them.
    assert len(tensors) == 7 + 5 * 23 + 22
    assert "blk.5.attn_v.weight" not in tensors and "blk.4.attn_v.weight" in tensors
    h, e, f = SHAPE_A["hidden_size"], SHAPE_A["num_experts"], SHAPE_A["moe_intermediate_size"]
    want = {  # GGUF ne order (torch reversed) and type
        "token_embd.weight": ([h, SHAPE_A["vocab_size"]], QT.BF16),
        "rope_freqs.weight": ([SHAPE_A["global_head_dim"] // 2], QT.F32),
        "blk.0.ffn_gate_up_exps.weight": ([h, 2 * f, e], QT.BF16),
        "blk.0.ffn_down_exps.weight": ([f, h, e], QT.BF16),
        "blk.0.ffn_gate_inp.weight": ([h, e], QT.F32),
        "blk.0.ffn_gate_inp.scale": ([h], QT.F32),
        "blk.0.ffn_down_exps.scale": ([e], QT.F32),
        "blk.5.attn_q.weight": ([h, 4 * 32], QT.BF16),
        "blk.5.attn_k.weight": ([h, 1 * 32], QT.BF16),
        "blk.5.attn_k_norm.weight": ([32], QT.F32),
        "blk.0.attn_v.weight": ([h, 2 * 16], QT.BF16),
        "blk.3.layer_output_scale.weight": ([1], QT.F32),
        "blk.3.enc_layer_output_scale.weight": ([1], QT.F32),
        "self_cond_down.weight": ([SHAPE_A["intermediate_size"], h], QT.BF16),
        "self_cond_pre_norm.weight": ([h], QT.F32),
    }
    for name, (ne, qtype) in want.items():
        assert tensors[name].shape.tolist() == ne, name
        assert tensors[name].tensor_type == qtype, name
    # bf16 in, bf16 out: the bytes are the checkpoint's own; F32 tensors are the exact upcast.
    src = load_file(ckpt_bf16 / "model.safetensors")
    gate_up = src["model.decoder.layers.2.experts.gate_up_proj"]
    stored = np.asarray(tensors["blk.2.ffn_gate_up_exps.weight"].data).tobytes()
    assert stored == gate_up.view(torch.int16).numpy().tobytes()
    scalar = src["model.encoder.language_model.layers.2.layer_scalar"].float().numpy()
    assert np.array_equal(np.asarray(tensors["blk.2.enc_layer_output_scale.weight"].data), scalar)
    # Proportional RoPE: global_head_dim 32 * 0.25 / 2 = 4 rotated pairs, the other 12 unrotated (1e30).
    assert np.asarray(tensors["rope_freqs.weight"].data).tolist() == [1.0] * 4 + [np.float32(1e30)] * 12


def test_written_metadata_matches_llama_cpp_keys_and_types(bf16_gguf, ckpt_bf16):
    _, f = fields(bf16_gguf)
    a = "diffusion-gemma."
    typed = {  # key -> (GGUF type(s), value)
        "general.architecture": ([VT.STRING], "diffusion-gemma"),
        "general.file_type": ([VT.UINT32], 32),
        "general.quantization_version": ([VT.UINT32], 2),
        a + "block_count": ([VT.UINT32], 6),
        a + "embedding_length": ([VT.UINT32], 64),
        a + "feed_forward_length": ([VT.UINT32], 96),
        a + "attention.head_count": ([VT.UINT32], 4),
        a + "attention.head_count_kv": ([VT.ARRAY, VT.INT32], [2, 2, 2, 2, 2, 1]),
        a + "attention.sliding_window_pattern": ([VT.ARRAY, VT.BOOL], [True] * 5 + [False]),
        a + "attention.key_length": ([VT.UINT32], 32),
        a + "attention.value_length": ([VT.UINT32], 32),
        a + "attention.key_length_swa": ([VT.UINT32], 16),
        a + "rope.dimension_count": ([VT.UINT32], 32),
        a + "rope.dimension_count_swa": ([VT.UINT32], 16),
        a + "rope.freq_base": ([VT.FLOAT32], 1e6),
        a + "rope.freq_base_swa": ([VT.FLOAT32], 1e4),
        a + "attention.sliding_window": ([VT.UINT32], 8),
        a + "expert_count": ([VT.UINT32], 8),
        a + "expert_used_count": ([VT.UINT32], 2),
        a + "expert_feed_forward_length": ([VT.UINT32], 32),
        a + "attention.causal": ([VT.BOOL], False),
        "diffusion.canvas_length": ([VT.UINT32], 16),
        "diffusion.eb_max_steps": ([VT.UINT32], 24),
        "diffusion.eb_stability_threshold": ([VT.UINT32], 2),
        "tokenizer.ggml.model": ([VT.STRING], "gemma4"),
        "tokenizer.ggml.bos_token_id": ([VT.UINT32], 2),
        "tokenizer.ggml.eos_token_id": ([VT.UINT32], 1),
        "tokenizer.ggml.padding_token_id": ([VT.UINT32], 0),
        "tokenizer.ggml.add_bos_token": ([VT.BOOL], True),
        "tokenizer.ggml.add_eos_token": ([VT.BOOL], False),
        "tokenizer.ggml.add_space_prefix": ([VT.BOOL], False),
        "tokenizer.chat_template": ([VT.STRING], CHAT_TEMPLATE),
    }
    for key, (types, want) in typed.items():
        assert f[key].types == types, key
        assert value(f[key]) == (pytest.approx(want) if isinstance(want, float) else want), key
    for key, want in (("eb_t_min", 0.3), ("eb_t_max", 0.9), ("eb_entropy_bound", 0.2),
                      ("eb_confidence_threshold", 0.01)):
        assert f["diffusion." + key].types == [VT.FLOAT32] and value(f["diffusion." + key]) == pytest.approx(want)
    tok = json.loads((ckpt_bf16 / "tokenizer.json").read_text())
    tokens, types = value(f["tokenizer.ggml.tokens"]), value(f["tokenizer.ggml.token_type"])
    assert len(tokens) == SHAPE_A["vocab_size"] == len(value(f["tokenizer.ggml.scores"]))
    assert set(value(f["tokenizer.ggml.scores"])) == {-1000.0}
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    kind = {t: types[tokens.index(t)] for t in ("<bos>", "<|turn>", "<|channel>", "<0x0A>", "he")}
    # specials CONTROL; Gemma4's visible tokens and other added tokens USER_DEFINED; the rest NORMAL
    assert kind == {"<bos>": 3, "<|turn>": 3, "<|channel>": 4, "<0x0A>": 4, "he": 1}
    assert tokens[-1] == "[PAD159]" and types[-1] == 5  # padded to vocab_size with UNUSED entries
    assert value(f["tokenizer.ggml.merges"]) == [" ".join(m) for m in tok["model"]["merges"]]


# --- logits --------------------------------------------------------------------------------------------

def test_bf16_gguf_logits_equal_safetensors_and_reference(bf16_gguf, ckpt_bf16):
    from_gguf, from_dir = dgrun.load(bf16_gguf), dgrun.load(ckpt_bf16)
    assert from_gguf.defaults.steps == 24 and from_gguf.defaults.entropy_bound == pytest.approx(0.2)
    prompt, canvas = inputs(SHAPE_A["vocab_size"], 20, 16, seed=3)
    model_ref = reference(ckpt_bf16, torch.float32)
    ref = three_steps(model_ref, from_gguf, prompt, canvas)
    ours = three_steps(model_ref, from_dir, prompt, canvas)
    for name in ref:
        assert torch.equal(ref[name][1], ours[name][1]), name  # same weights, same maths: bit for bit
        assert (ref[name][0] - ref[name][1]).abs().max().item() <= 1e-4, name


def _logits(m, prompt, canvas, sc):
    c = m.new_cache()
    m.encode(prompt, c)
    return m.denoise(canvas, c), m.denoise(canvas, c, sc)


@pytest.mark.parametrize("to", ["gguf-q8", "gguf-q4"])
def test_quantized_logits_within_bounds(to, ckpt_k, tmp_path):
    path = convert(ckpt_k, to, tmp_path / "q.gguf").path
    ckpt = load(path)
    packed = ckpt.weights["blk.0.ffn_gate_up_exps.weight"]
    assert isinstance(packed, QTensor) and packed.qtype == (QT.Q8_0 if to == "gguf-q8" else QT.Q4_K)
    exact, quant = dgrun.load(ckpt_k), dgrun.load(path)
    max_abs, agree = BOUNDS[to]
    for seed in (0, 1):
        prompt, canvas = inputs(256, 24, 16, seed=seed)
        want = _logits(exact, prompt[0].tolist(), canvas[0], None)
        want = _logits(exact, prompt[0].tolist(), canvas[0], want[0] / 0.7)
        got = _logits(quant, prompt[0].tolist(), canvas[0], want[0] / 0.7)
        for w, g in zip(want, got):
            assert (w - g).abs().max().item() <= max_abs
            assert (w.argmax(-1) == g.argmax(-1)).float().mean().item() >= agree


def test_q4_mix_is_llama_quantize_q4_k_m(ckpt_k, tmp_path):
    """Types as llama-quantize Q4_K_M chose them for this very checkpoint (its log, 2026-11-23)."""
    r = gguf.GGUFReader(convert(ckpt_k, "gguf-q4", tmp_path / "q4.gguf").path)
    got = {t.name: t.tensor_type.name for t in r.tensors}
    want = {"token_embd.weight": "Q6_K", "self_cond_down.weight": "Q4_K", "blk.0.ffn_gate_inp.weight": "F32",
            "blk.0.attn_norm.weight": "F32", "blk.3.ffn_gate_inp.scale": "F32", "rope_freqs.weight": "F32"}
    for i in range(4):
        b = f"blk.{i}."
        want.update({b + "attn_q.weight": "Q4_K", b + "attn_k.weight": "Q4_K", b + "ffn_gate.weight": "Q4_K",
                     b + "ffn_up.weight": "Q4_K", b + "ffn_gate_up_exps.weight": "Q4_K",
                     b + "ffn_down.weight": "Q6_K" if i >= 2 else "Q4_K",
                     b + "ffn_down_exps.weight": "Q8_0" if i >= 2 else "Q5_0",  # 96-wide rows: K falls back
                     b + "attn_output.weight": "Q4_K" if i == 3 else "Q5_0"})  # 128-wide on sliding layers
        if i < 3:
            want[b + "attn_v.weight"] = "Q6_K" if i == 2 else "Q4_K"
    assert {k: got[k] for k in want} == want
    assert r.fields["general.file_type"].contents() == 15


def test_requantizing_a_gguf_matches_converting_the_checkpoint(bf16_gguf, ckpt_bf16, tmp_path):
    """From bf16 weights both routes quantize the same numbers; Q8_0 bytes are also gguf-py's own."""
    direct = gguf.GGUFReader(convert(ckpt_bf16, "gguf-q8", tmp_path / "a.gguf").path)
    requant = gguf.GGUFReader(convert(bf16_gguf, "gguf-q8", tmp_path / "b.gguf").path)
    a = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in direct.tensors}
    b = {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in requant.tensors}
    assert a == b
    src = load_file(ckpt_bf16 / "model.safetensors")["model.decoder.layers.1.self_attn.q_proj.weight"]
    assert a["blk.1.attn_q.weight"][1] == gguf.quants.quantize(src.float().numpy(), QT.Q8_0).tobytes()
    assert requant.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE


def test_tensor_type_override(ckpt_k, tmp_path):
    r = gguf.GGUFReader(convert(ckpt_k, "gguf-q4", tmp_path / "o.gguf",
                                tensor_types=["blk.*.ffn_gate_up_exps.weight=q8_0", "*attn_output*=q5_k",
                                              "*_norm.weight=q4_0"]).path)
    got = {t.name: t.tensor_type for t in r.tensors}
    assert got["blk.1.ffn_gate_up_exps.weight"] == QT.Q8_0 and got["blk.3.attn_output.weight"] == QT.Q5_K
    assert got["blk.0.attn_output.weight"] == QT.Q5_1  # 128-wide rows: Q5_K falls back as llama-quantize does
    assert got["blk.0.ffn_up.weight"] == QT.Q4_K
    assert got["blk.0.attn_norm.weight"] == QT.F32  # norms are never quantized


# --- a llama.cpp-layout GGUF written by gguf-py itself -------------------------------------------------

@pytest.mark.parametrize("split", [False, True], ids=["fused", "split-experts"])
def test_gguf_written_by_gguf_py_loads_with_identical_logits(split, ckpt_a, tmp_path):
    path = write_llama_gguf(tmp_path / "l.gguf", ckpt_a, SHAPE_A, canvas=16, split_experts=split)
    m, ref = dgrun.load(path), dgrun.load(ckpt_a)
    assert m.args.canvas_length == 16 and m.args.layers[-1].head_dim == 32 and m.args.layers[0].n_kv_heads == 2
    assert m.defaults.steps == 12 and m.defaults.t_max == 0.75  # float32 0.75 read back as 0.75
    prompt, canvas = inputs(SHAPE_A["vocab_size"], 20, 16, seed=2)
    want = _logits(ref, prompt[0].tolist(), canvas[0], None)
    got = _logits(m, prompt[0].tolist(), canvas[0], want[0] / 0.7)
    want = _logits(ref, prompt[0].tolist(), canvas[0], want[0] / 0.7)
    for w, g in zip(want, got):
        # The same float32 weights; only matmul blocking over the file's 32-byte-aligned pages may differ.
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_split_q8_experts_are_fused_packed(ckpt_a, tmp_path):
    path = write_llama_gguf(tmp_path / "q.gguf", ckpt_a, SHAPE_A, canvas=16, matrix_type=QT.Q8_0, split_experts=True)
    fused = load(path).weights["blk.1.ffn_gate_up_exps.weight"]
    assert isinstance(fused, QTensor) and fused.qtype == QT.Q8_0 and fused.shape == (8, 64, 64)
    src = load_file(ckpt_a / "model.safetensors")["model.decoder.layers.1.experts.gate_up_proj"]
    # Q8_0 steps are amax/127 per 32 weights: about 0.002 here; gate rows must stay first.
    assert (fused.dequantize() - src).abs().max().item() < 0.005


def test_q4_mix_on_the_released_shapes():
    """The 26B-A4B tensors get llama-quantize's Q4_K_M choices (worked out from llama-quant.cpp by hand)."""
    from dgrun.convert import policy
    from dgrun.convert.convert import plan
    from dgrun.convert.sources import SourceTensor
    from dgrun.models.diffusion_gemma import ModelArgs, expected_shapes

    args = ModelArgs(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                     num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                     moe_intermediate_size=704)
    tensors = [SourceTensor(n, s, QT.BF16, 0, None) for n, s in expected_shapes(args).items()]
    got = {p.src.name: p.qtype.name for p in plan(tensors, args, policy.TARGETS["gguf-q4"], [], False)}
    v_more = {0, 1, 2, 6, 9, 13, 16, 20, 24, 25, 26, 27, 28}  # use_more_bits over the 25 attn_v tensors
    down_more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}  # use_more_bits over 30 layers
    for i in range(30):
        b = f"blk.{i}."
        assert got.get(b + "attn_v.weight") == (None if i % 6 == 5 else "Q6_K" if i in v_more else "Q4_K"), i
        # 2112 and 704 are not multiples of 256: Q6_K -> Q8_0 and Q4_K -> Q5_0
        assert got[b + "ffn_down.weight"] == got[b + "ffn_down_exps.weight"] == ("Q8_0" if i in down_more else "Q5_0")
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_gate_up_exps"):
            assert got[b + name + ".weight"] == "Q4_K", (i, name)
        assert got[b + "ffn_gate_inp.weight"] == got[b + "attn_q_norm.weight"] == "F32"
    assert got["token_embd.weight"] == "Q6_K"  # tied: the output tensor's treatment
    assert (got["self_cond_down.weight"], got["self_cond_up.weight"]) == ("Q5_0", "Q4_K")
