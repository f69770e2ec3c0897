"""kernels/moe.py under TRITON_INTERPRET=1 on CPU: `align` against a plain-Python reference, and `moe` on expert
stacks of every weight type against ops_cpu.moe (the exact reference) on the dequantized stacks."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is decorated: before dgrun.kernels is imported

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

pytest.importorskip("triton")

from dgrun.backends.torch import ops_cpu  # noqa: E402
from dgrun.kernels import moe as km  # noqa: E402
from dgrun.kernels.dequant import dequantize  # noqa: E402
from dgrun.packed import DevicePacked  # noqa: E402
from kernel_weights import ALL, weight  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# Triton 3.9's interpreter casts float32 to bf16 by truncation, where the GPU's cvt.rn rounds to nearest even
# (as torch does): the bf16 tests patch the cast to the GPU's rounding. (Its tl.dot on bf16 multiplies the raw
# uint16 bits; dequant.mma already routes 16-bit operands through float32 under the interpreter.)
# ----------------------------------------------------------------------------------------------------------

def _f32_as_bf16(f32: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


@pytest.fixture
def bf16_interpreter(monkeypatch):
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_as_bf16(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


B = "blk.0."
H = 256
K_QUANTS = (QT.Q4_K, QT.Q5_K, QT.Q6_K)


# ----------------------------------------------------------------------------------------------------------
# align
# ----------------------------------------------------------------------------------------------------------

def align_reference(topk_ids: list[list[int]], num_experts: int, block: int):
    """Plain Python: each expert's slots in slot order, padded with the sentinel to a multiple of `block`.
    Returns the ids, the expert of each block, their count and each expert's (start, end) run."""
    flat = [e for row in topk_ids for e in row]
    sentinel = len(flat)
    ids, experts, runs = [], [], []
    for e in range(num_experts):
        run = [s for s, x in enumerate(flat) if x == e]
        run += [sentinel] * (-len(run) % block)
        runs.append((len(ids), len(ids) + len(run)))
        ids += run
        experts += [e] * (len(run) // block)
    return ids, experts, len(ids), runs


def routing(case: str, E: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if case.startswith("random"):
        return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(37)])
    if case == "skewed":  # expert 3 in every token (> block slots when block = 16), experts 5..7 never
        return torch.stack([torch.tensor([3, int(torch.randint(0, 3, (1,), generator=g))]) for _ in range(70)])
    if case == "many":  # more slots than one chunk of the align kernel
        return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(700)])
    return torch.tensor([[6, 1]])


CASES = ["random", "random_6_experts", "skewed", "many", "one_token"]


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("case", CASES)
def test_align_matches_python(case, block):
    E = 6 if "6_experts" in case else 8  # 6: not a power of two
    topk = routing(case, E, 2)
    sorted_ids, expert_of_block, num_padded = km.align(topk, E, block)
    ids, experts, n, runs = align_reference(topk.tolist(), E, block)

    assert num_padded.shape == (1,) and int(num_padded) == n
    assert sorted_ids.dtype == expert_of_block.dtype == num_padded.dtype == torch.int32
    assert sorted_ids.numel() == km.padded_length(topk.numel(), E, block) >= n  # static: from T, k, E only
    assert expert_of_block.numel() == sorted_ids.numel() // block
    assert expert_of_block[:n // block].tolist() == experts
    assert ((expert_of_block >= 0) & (expert_of_block < E)).all()
    assert (sorted_ids[n:] == topk.numel()).all()
    got = sorted_ids.tolist()
    for a, b in runs:  # within a run the order is the atomic cursor's: compare sorted (sentinels sort last)
        assert sorted(got[a:b]) == ids[a:b]


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("case", CASES)
def test_align_torch_matches_python_exactly(case, block):
    E = 6 if "6_experts" in case else 8
    topk = routing(case, E, 2)
    sorted_ids, expert_of_block, num_padded = km.align_torch(topk, E, block)
    ids, experts, n, _ = align_reference(topk.tolist(), E, block)
    assert int(num_padded) == n and sorted_ids[:n].tolist() == ids
    assert expert_of_block[:n // block].tolist() == experts
    assert sorted_ids.shape == km.align(topk, E, block)[0].shape


def test_align_shapes_do_not_depend_on_routing():
    for align in (km.align, km.align_torch):
        a = align(torch.tensor([[0, 1], [2, 3], [4, 5]]), 8, 16)
        b = align(torch.tensor([[0, 1], [0, 1], [0, 1]]), 8, 16)
        assert [t.shape for t in a] == [t.shape for t in b]


# ----------------------------------------------------------------------------------------------------------
# moe against ops_cpu.moe
# ----------------------------------------------------------------------------------------------------------

def layer(qtype, E, I, seed=0, skew=False, H=H):
    """One MoE layer's weights: float router, stacks of `qtype`. `skew`: every token's top expert is 0 and
    experts E-3.. are never picked."""
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(E, H, generator=g) * 0.5
    if skew:
        router[0] = 0.5
        router[E - 3:] = -0.5
    return {B + "ffn_gate_inp.weight": router,
            B + "ffn_gate_inp.scale": 1 + 0.1 * torch.randn(H, generator=g),
            B + "ffn_down_exps.scale": 1 + 0.1 * torch.randn(E, generator=g),
            B + "ffn_gate_up_exps.weight": weight((E, 2 * I, H), qtype, seed=seed + 1, scale=0.1),
            B + "ffn_down_exps.weight": weight((E, H, I), qtype, seed=seed + 2, scale=0.1)}


def inputs(T, dtype, seed=0, skew=False, H=H):
    g = torch.Generator().manual_seed(seed + 100)
    x_route = torch.randn(T, H, generator=g)
    if skew:  # close to the all-ones direction the skewed router favours
        x_route = 1 + 0.1 * x_route
    return x_route.to(dtype), torch.randn(T, H, generator=g).to(dtype)


def in_dtype(w: dict, dtype) -> dict:
    """Float tensors in the activations' dtype, as a checkpoint of that dtype holds them; packed stacks as is."""
    return {n: v if isinstance(v, DevicePacked) else v.to(dtype) for n, v in w.items()}


def check(qtype, dtype, T, E, k, I, seed=0, skew=False, H=H):
    args = SimpleNamespace(hidden_size=H, rms_norm_eps=1e-6, num_experts=E, top_k_experts=k)
    w = in_dtype(layer(qtype, E, I, seed, skew, H), dtype)
    x_route, x = inputs(T, dtype, seed, skew, H)
    ref_w = dict(w)
    for name in ("ffn_gate_up_exps.weight", "ffn_down_exps.weight"):
        ref_w[B + name] = dequantize(w[B + name]).to(dtype)
    ref = ops_cpu.moe(x_route, x, ref_w, B, args)
    got = km.moe(x_route, x, w, B, args)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    scale = ref.abs().max().item()
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: room for a one-ulp rounding flip (none seen here)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale)
    return km.route(x_route, w, B, args)[1]


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_moe_fp32_every_type(qtype):
    check(qtype, torch.float32, T=6, E=4, k=2, I=256 if qtype in K_QUANTS else 64)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_0, QT.Q8_0, QT.BF16], ids=lambda q: q.name)
def test_moe_bf16(qtype, bf16_interpreter):
    check(qtype, torch.bfloat16, T=6, E=4, k=2, I=256 if qtype in K_QUANTS else 64, seed=1)


def test_moe_empty_experts_and_an_expert_over_block_m():
    T, E, k = 20, 8, 2  # 40 slots <= 8 * E: BLOCK_M = 16, and expert 0 takes all 20 tokens
    assert km.block_m(T * k, E) == 16
    top_i = check(QT.Q4_0, torch.float32, T=T, E=E, k=k, I=64, seed=2, skew=True)
    counts = torch.bincount(top_i.reshape(-1), minlength=E)
    assert counts[0] == T > 16 and (counts[E - 3:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_large_block_m(dtype, bf16_interpreter):
    T, E, k = 40, 4, 2  # 80 slots > 8 * E: BLOCK_M = 64
    assert km.block_m(T * k, E) == 64
    check(QT.Q6_K, dtype, T=T, E=E, k=k, I=256, seed=3)


def test_moe_ragged_tiles(monkeypatch):
    # I = H = 96 against 64-column tiles: the last N tile of both kernels is partial (K is whole chunks)
    monkeypatch.setitem(km.CONFIGS, km.SMALL_M, dict(gate_up_n=64, down_n=64, num_warps=4))
    check(QT.Q8_0, torch.float32, T=5, E=4, k=2, I=96, seed=5, H=96)


def test_twin_is_the_reference_on_dequantized_stacks():
    args = SimpleNamespace(hidden_size=H, rms_norm_eps=1e-6, num_experts=4, top_k_experts=2)
    w = layer(QT.Q5_1, 4, 64, seed=4)
    x_route, x = inputs(6, torch.float32, seed=4)
    ref = km.twin(x_route, x, w, B, args)
    torch.testing.assert_close(km.moe(x_route, x, w, B, args), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
