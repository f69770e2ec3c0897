"""kernels/qmatmul.py under TRITON_INTERPRET=1 on CPU: the packed matmul against its twin, the exact reference op
(ops_cpu.linear) on the dequantized weight (itself checked against gguf-py in test_kernels_dequant.py), for every
weight type and each block configuration M selects."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is decorated: before dgrun.kernels is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from dgrun.backends.torch import ops_cpu  # noqa: E402
from dgrun.kernels import dequant as dq  # noqa: E402
from dgrun.kernels.qmatmul import blocks, qmatmul  # noqa: E402
from kernel_weights import ALL, weight  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

N, K = 80, 512  # N: a ragged last tile of 16; K: 2 super-blocks (8 K-quant steps), 16 Q8_0 blocks


def _close(y, ref, rtol):
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize("m", [3, 40], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_float32_matches_the_reference(qtype, m):
    w = weight((N, K), qtype, seed=int(qtype) + m)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    _close(qmatmul(x, w), ops_cpu.linear(x, dq.dequantize(w)), 1e-5)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.Q5_0, QT.BF16], ids=lambda q: q.name)
def test_bfloat16_activations(qtype):
    """bf16 x: W decoded in float32, rounded to bf16 for the product, float32 accumulation, bf16 out."""
    w = weight((N, K), qtype, seed=5)
    x = torch.randn(2, 20, K, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = qmatmul(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 20, N)
    _close(y, ops_cpu.linear(x.float(), dq.dequantize(w).bfloat16().float()), 1e-2)


def test_the_large_tile_and_a_strided_x():
    """M > 256 takes the 128-row tile; x a column slice of a wider tensor (row stride != K); out= is filled."""
    assert blocks(300)["BLOCK_M"] == 128
    w = weight((N, K), QT.Q4_K, seed=6)
    wide = torch.randn(300, K + 64, generator=torch.Generator().manual_seed(2))
    x = wide[:, 32:32 + K]
    out = torch.full((300, N), float("nan"))
    assert qmatmul(x, w, out=out) is out
    _close(out, ops_cpu.linear(x, dq.dequantize(w)), 1e-5)


def test_bad_shapes_are_refused():
    w = weight((N, K), QT.Q8_0)
    with pytest.raises(ValueError):
        qmatmul(torch.randn(2, K + 32), w)
    with pytest.raises(ValueError):
        qmatmul(torch.randn(2, 48), weight((N, 48), QT.F32))  # float rows step by 32


def test_a_config_override_gives_the_same_product():
    w = weight((N, K), QT.Q5_K, seed=7)
    x = torch.randn(24, K, generator=torch.Generator().manual_seed(3))
    _close(qmatmul(x, w, config=dict(BLOCK_M=16, BLOCK_N=32)), ops_cpu.linear(x, dq.dequantize(w)), 1e-5)


def test_packed_bytes_at_an_odd_address_are_refused():
    """The decoders read float16 scales as float16: the bytes must start at an even address."""
    w = weight((N, K), QT.Q4_K)
    buf = torch.zeros(w.data.numel() + 1, dtype=torch.uint8)
    buf[1:] = w.data.reshape(-1)
    odd = dq.DevicePacked(buf[1:].view(w.data.shape), w.qtype, w.shape)
    with pytest.raises(ValueError, match="odd address"):
        qmatmul(torch.randn(2, K), odd)
