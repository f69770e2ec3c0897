"""kernels/dequant.py: the plain-torch twin against gguf-py's independent dequantizer, and the Triton decoder
(under TRITON_INTERPRET=1 on CPU) against the twin, for every weight type, in both tile orientations."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is decorated: before dgrun.kernels is imported

import gguf.quants  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from dgrun.kernels import dequant as dq  # noqa: E402
from kernel_weights import ALL, PACKED, weight  # noqa: E402


@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_twin_matches_gguf_py(qtype):
    w = weight((3, 4, 512), qtype, seed=1)  # 3-D, like an expert stack
    ref = gguf.quants.dequantize(w.data.numpy(), qtype).astype(np.float32)
    got = dq.dequantize(w)
    assert got.dtype == torch.float32 and tuple(got.shape) == (3, 4, 512)
    np.testing.assert_array_equal(got.numpy(), ref)  # same arithmetic: bit-exact


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_kernel_matches_twin(qtype):
    w = weight((24, 768), qtype, seed=2)  # 24 rows: a ragged last tile of 16; 768 = 3 super-blocks
    got = dq.dequantize_triton(w, block_n=16, block_k=128)
    torch.testing.assert_close(got, dq.dequantize(w), rtol=0, atol=0)


@triton.jit
def _transposed_kernel(w_ptr, out_ptr, K, row_stride, row0, col0,
                       QTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # rows run down the second axis, columns down the first: the (K, N) tile a GEMM over rows would read.
    offs_c = col0 + tl.arange(0, BLOCK_C)
    offs_r = row0 + tl.arange(0, BLOCK_R)
    w = dq.dequant(w_ptr, offs_r[None, :], offs_c[:, None], row_stride, QTYPE)
    tl.store(out_ptr + tl.arange(0, BLOCK_C)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :], w)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_transposed_tile_at_an_offset(qtype):
    w = weight((40, 512), qtype, seed=3)
    out = torch.empty(64, 16)
    # columns 224..287 straddle the first 256-element super-block boundary; rows 20..35
    _transposed_kernel[(1,)](dq._ptr(w), out, 512, dq.row_stride(w), 20, 224,
                             QTYPE=dq.qtype_id(w), BLOCK_R=16, BLOCK_C=64)
    torch.testing.assert_close(out, dq.dequantize(w)[20:36, 224:288].T, rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_rows_decodes_only_the_ids(qtype):
    w = weight((10, 256), qtype, seed=4)
    ids = torch.tensor([7, 0, 7, 3])
    torch.testing.assert_close(dq.rows(w, ids), dq.dequantize(w)[ids], rtol=0, atol=0)


def test_qtype_ids_and_strides():
    assert [dq.qtype_id(weight((2, 256), q)) for q in ALL] == [8, 2, 3, 6, 7, 12, 13, 14, 0, 1, 30]
    assert dq.row_stride(weight((2, 3, 256), gguf.GGMLQuantizationType.Q4_K)) == 144
    assert dq.row_stride(weight((2, 256), gguf.GGMLQuantizationType.BF16)) == 256
