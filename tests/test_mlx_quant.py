"""Quantized weights on the mlx backend: the affine format against MLX's own dequantize, GGUF blocks against
gguf-py's dequantize, and logits against the cpu backend on the same file (which dequantizes to float32).

Bounds (fp32 compute): exactly-mapped GGUF types and MLX directories match the cpu backend to 1e-4 max-abs
(measured ~1e-5); Q6_K, requantized to 8 bits, adds under 10% of Q4_K_M's own RMS logit error (measured 4-5%);
quantize-at-load q4 (mixed) and q8 stay within the RMS error and argmax agreement stated in each test.
"""

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

mx = pytest.importorskip("mlx.core")

import dgrun  # noqa: E402
from dgrun.backends.mlx import MlxBackend  # noqa: E402
from dgrun.backends.mlx_weights import QLinear  # noqa: E402
from dgrun.packed import BITS, AffineTensor, pack, unpack  # noqa: E402
from dgrun.backends.mlx_ggml import EXACT_BITS, ggml_to_affine  # noqa: E402

FP32_TOL = 1e-4


def logits(m, seed=1, prompt_len=20):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, m.args.vocab_size, (prompt_len,), generator=g).tolist()
    canvas = torch.randint(0, m.args.vocab_size, (m.args.canvas_length,), generator=g)
    c = m.new_cache()
    m.encode(prompt, c)
    first = m.denoise(canvas, c)
    return first, m.denoise(canvas, c, first / 0.7)


def rms(a, b):
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, size=(3, 128), dtype=np.uint8)
    words = pack(q, bits)
    assert words.dtype == np.uint32 and words.shape == (3, 128 * bits // 32)
    assert np.array_equal(unpack(words, bits), q)
    scales = rng.standard_normal((3, 4)).astype(np.float32)
    biases = rng.standard_normal((3, 4)).astype(np.float32)
    theirs = mx.dequantize(mx.array(words), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    ours = AffineTensor(words, torch.from_numpy(scales), torch.from_numpy(biases), 32, bits).dequantize()
    np.testing.assert_allclose(ours.numpy(), np.array(theirs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("qtype", sorted(EXACT_BITS, key=int) + [QT.Q6_K], ids=lambda t: t.name)
def test_ggml_blocks_map_exactly(qtype):
    from dgrun.convert.quants import quantize

    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32) * 0.05
    data = quantize(x, qtype)
    mapped = ggml_to_affine(data, qtype, x.shape)
    if qtype == QT.Q6_K:  # 16-value sub-blocks: no exact MLX group, requantized by the backend
        assert mapped is None
        return
    q, scales, biases, bits = mapped
    ours = mx.dequantize(mx.array(pack(q, bits)), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    assert np.array_equal(np.array(ours), gguf.quants.dequantize(data, qtype))  # bit for bit


@pytest.fixture(scope="module")
def gguf_mix(ckpt_k, tmp_path_factory):
    """Every exactly-mapped type in one GGUF: K-quants where rows are 256 wide, legacy types elsewhere."""
    from dgrun.convert.convert import convert

    out = tmp_path_factory.mktemp("mix") / "mix.gguf"
    types = ["blk.0.*=q4_0", "blk.1.*=q4_1", "blk.2.*=q5_0", "blk.3.*=q5_1", "token_embd.weight=q5_k",
             "self_cond_*=q8_0"]
    r = convert(ckpt_k, to="gguf-q4", out=out, tensor_types=types)
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q5_K", "Q8_0"} <= set(r.types.values())
    return out


def test_exact_gguf_types_match_cpu(gguf_mix):
    cpu, m = dgrun.load(gguf_mix, backend="cpu"), dgrun.load(gguf_mix, backend="mlx", dtype="float32")
    assert isinstance(m.backend.w["blk.0.ffn_gate_up_exps.weight"], QLinear)  # packed, not dequantized
    for a, b in zip(logits(cpu), logits(m)):
        assert (a - b).abs().max().item() <= FP32_TOL


@pytest.fixture(scope="module")
def q4_k_m(ckpt_k, tmp_path_factory):
    from dgrun.convert.convert import convert

    out = tmp_path_factory.mktemp("q4km") / "q4km.gguf"
    r = convert(ckpt_k, to="gguf-q4", out=out)
    assert {"Q4_K", "Q6_K"} <= set(r.types.values())
    return out


def test_q4_k_m_on_mlx(ckpt_k, q4_k_m):
    """Q4_K maps exactly; Q6_K is requantized to 8 bits: a small addition to the file's own error."""
    exact = logits(dgrun.load(ckpt_k, backend="cpu"))
    cpu, m = logits(dgrun.load(q4_k_m, backend="cpu")), logits(dgrun.load(q4_k_m, backend="mlx", dtype="float32"))
    for ref, theirs, ours in zip(exact, cpu, m):
        assert rms(ours, theirs) <= 0.1 * rms(theirs, ref)


@pytest.mark.parametrize("quant, max_rms, min_agree", [("q8", 0.06, 0.875), ("q4", 0.35, 0.875)])
def test_quantize_at_load(ckpt_k, quant, max_rms, min_agree):
    """HF float weights quantized at load by the `mlx-q4` mix (experts 4-bit, the rest 8-bit) or `mlx-q8`.
    Measured on logits of RMS 1.35: RMS error 0.027-0.033 (q8), 0.17-0.22 (q4); argmax agreement >= 15/16."""
    ckpt = dgrun.checkpoint.load(ckpt_k)
    b = MlxBackend(ckpt.args, ckpt.weights, dtype="float32", quantize=quant)
    bits = {name: w.bits for name, w in b.w.items() if isinstance(w, QLinear)}
    assert bits["blk.0.ffn_gate_up_exps.weight"] == (4 if quant == "q4" else 8)
    assert bits["blk.0.attn_q.weight"] == bits["token_embd.weight"] == bits["blk.0.ffn_gate_inp.weight"] == 8
    m = dgrun.load(ckpt_k, backend="mlx", dtype="float32")
    m.backend = b
    exact = logits(dgrun.load(ckpt_k, backend="cpu"))
    for ref, ours in zip(exact, logits(m)):
        assert rms(ours, ref) <= max_rms
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= min_agree


def test_mlx_directory_matches_cpu(ckpt_k, tmp_path):
    """`convert --to mlx-q4` read back: MLX's quantized kernels (quantized_matmul, gather_qmm, the packed
    embedding both ways) against the cpu backend on the same file, which dequantizes with numpy."""
    from dgrun.convert.mlx_writer import convert_mlx

    out = convert_mlx(ckpt_k, to="mlx-q4", out=tmp_path / "q4").path
    cpu, m = dgrun.load(out, backend="cpu"), dgrun.load(out, backend="mlx", dtype="float32")
    assert isinstance(m.backend.w["token_embd.weight"], QLinear)
    for a, b in zip(logits(cpu), logits(m)):
        assert (a - b).abs().max().item() <= FP32_TOL
