"""
Decoding GGUF block-packed weights in registers
===============================================

Every kernel of the cuda backend reads weights as the GGUF file stores them (`dgrun.packed.DevicePacked`): rows of
fixed-size *blocks*, each holding a few float16 scales and the packed integer codes of 32 or 256 weights. This
module is the one decoding primitive all of them share, and its plain-torch twin.

The layouts (ggml's `ggml-common.h`; gguf-py's `gguf/quants.py` decodes the same bytes and is our reference):

======  =====  =====  ==============================================================================
type    block  bytes  layout (byte offsets in the block) and value of element i
======  =====  =====  ==============================================================================
Q8_0    32     34     d:f16 @0, q:int8[32] @2                         d * q[i]
Q4_0    32     18     d @0, nibbles[16] @2 (i<16 low, i>=16 high)      d * (q - 8)
Q4_1    32     20     d @0, m @2, nibbles @4                          d * q + m
Q5_0    32     22     d @0, qh:u32 @2 (bit i = 5th bit), nibbles @6    d * (q - 16)
Q5_1    32     24     d @0, m @2, qh @4, nibbles @8                   d * q + m
Q4_K    256    144    d @0, dmin @2, 6-bit (sc, m) x 8 packed in 12 bytes @4, nibbles[128] @16;
                      sub-block j = i // 32 (32 weights); byte 16 + (i//64)*32 + i%32, high nibble for odd j;
                      d * sc[j] * q - dmin * m[j]
Q5_K    256    176    as Q4_K, plus qh[32] @16 (bit j of byte i%32), nibbles @48
Q6_K    256    210    ql[128] @0, qh[64] @128, sc:int8[16] @192, d @208; with h = i//128, r = i%128,
                      g = r//32, l = r%32: low 4 bits in ql[h*64 + l + 32*(g&1)] >> 4*(g>>1),
                      high 2 bits in qh[h*32 + l] >> 2g; d * sc[i//16] * (q - 32)
======  =====  =====  ==============================================================================

`dequant` decodes *element-wise*: each element of the requested tile computes the byte address of its own code
and of its block's scales, loads them as bytes and combines them with shifts; a float16 scale is rebuilt from its
two bytes and bitcast. No element depends on its neighbours, so a kernel may ask for any (row, column) pairs: a
(BLOCK_N, BLOCK_K) tile for `x @ W.T`, its transpose (BLOCK_K, BLOCK_N) for a GEMM whose contraction runs over
rows, or a gathered set of rows for an embedding lookup. Neighbouring elements share bytes; those repeated loads
hit L1, so DRAM still sees each byte of the packed weight once per tile.

Indices must be in range (the function takes no mask, to stay one formula): a caller with a ragged edge clamps
its indices (`tl.minimum(cols, K - 1)`) and zeroes what it does not want with `tl.where`. Packed data must start at
an even address (`check_aligned`): the float16 scales are then read as float16, one load each.

Host side: `dequantize(w)` (the whole matrix, float32), `rows(w, ids)` (selected rows, e.g. the embedding),
`qtype_id(w)` (the QTYPE constexpr) and `row_stride(w)`, all plain torch on the weight's own device.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from dgrun.packed import DevicePacked

# QTYPE constexpr values (the GGMLQuantizationType ints), for use inside @triton.jit code.
F32: tl.constexpr = tl.constexpr(0)
F16: tl.constexpr = tl.constexpr(1)
Q4_0: tl.constexpr = tl.constexpr(2)
Q4_1: tl.constexpr = tl.constexpr(3)
Q5_0: tl.constexpr = tl.constexpr(6)
Q5_1: tl.constexpr = tl.constexpr(7)
Q8_0: tl.constexpr = tl.constexpr(8)
Q4_K: tl.constexpr = tl.constexpr(12)
Q5_K: tl.constexpr = tl.constexpr(13)
Q6_K: tl.constexpr = tl.constexpr(14)
BF16: tl.constexpr = tl.constexpr(30)

# Under TRITON_INTERPRET=1 (the CPU test mode) kernels run as Python: the same knob Triton reads when it decorates
# them. The interpreter's tl.dot multiplies bfloat16's raw storage bits, so `mma` takes another path there.
INTERPRETING: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))

# Every type a kernel reads: the block-packed ones, then the plain float ones (torch tensors of their dtype).
PACKED_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K)
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
TYPES = PACKED_TYPES + FLOAT_TYPES
_DTYPE_QT = {torch.float32: QT.F32, torch.float16: QT.F16, torch.bfloat16: QT.BF16}


# ----------------------------------------------------------------------------------------------------------------
# The device side
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _byte(ptr):
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _f16(ptr):
    """The float16 at byte pointer `ptr` as float32. Every GGUF scale sits at an even offset of an even-sized
    block, so with an even base address (launchers check it) it is one 2-byte load."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _i8_pair(ptr):
    """The two int8 at an even byte pointer, as float32 (one 2-byte load): (ptr[0], ptr[1])."""
    v = tl.load(ptr.to(tl.pointer_type(tl.int16))).to(tl.int32)
    return _i8_to_f32(v & 255), _i8_to_f32((v >> 8) & 255)


@triton.jit
def _small_int_to_f32(q, ZERO: tl.constexpr = 0):
    """float(q - ZERO) for int32 0 <= q < 2**23, exactly, without I2F (a quarter-rate instruction on NVIDIA GPUs,
    and the bottleneck of a decode loop): the bits 0x4B000000 | q are the float 2**23 + q."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO)


@triton.jit
def _i8_to_f32(b):
    """float of a byte (int32 0..255) read as int8."""
    return _small_int_to_f32(b ^ 128, 128)


@triton.jit
def _k_scale_min(sc_ptr, j):
    """Q4_K / Q5_K: the 6-bit (scale, min) of sub-block j (0..7) from the 12 packed bytes at sc_ptr."""
    lo = j < 4
    b_j = _byte(sc_ptr + j)
    b_j4 = _byte(sc_ptr + j + 4)
    b_low = _byte(sc_ptr + (j & 3))  # for j >= 4: byte j - 4, which holds the scale's top two bits
    sc = tl.where(lo, b_j & 63, (b_j4 & 15) | ((b_low >> 6) << 4))
    m = tl.where(lo, b_j4 & 63, (b_j4 >> 4) | ((b_j >> 6) << 4))
    return _small_int_to_f32(sc), _small_int_to_f32(m)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr = "ieee"):
    """acc + a @ b with float32 accumulation: tl.dot, except under the interpreter, whose tl.dot gets bfloat16
    wrong (it multiplies the raw bits), where 16-bit operands go through float32 (exact: they are exact there)."""
    if INTERPRETING and a.dtype != tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def dequant(w_ptr, rows, cols, row_stride, QTYPE: tl.constexpr):
    """float32 tile of the broadcast shape of `rows` and `cols`: element (r, c) of the packed matrix at w_ptr,
    whose rows are `row_stride` bytes apart (elements, for the float types, with w_ptr typed)."""
    if QTYPE == 0 or QTYPE == 1 or QTYPE == 30:  # F32, F16, BF16
        return tl.load(w_ptr + rows.to(tl.int64) * row_stride + cols).to(tl.float32)
    else:
        if QTYPE == 12 or QTYPE == 13 or QTYPE == 14:
            BLOCK: tl.constexpr = 256
        else:
            BLOCK: tl.constexpr = 32
        if QTYPE == 8:
            SIZE: tl.constexpr = 34
        elif QTYPE == 2:
            SIZE: tl.constexpr = 18
        elif QTYPE == 3:
            SIZE: tl.constexpr = 20
        elif QTYPE == 6:
            SIZE: tl.constexpr = 22
        elif QTYPE == 7:
            SIZE: tl.constexpr = 24
        elif QTYPE == 12:
            SIZE: tl.constexpr = 144
        elif QTYPE == 13:
            SIZE: tl.constexpr = 176
        else:
            SIZE: tl.constexpr = 210
        i = cols % BLOCK  # element within its block
        blk = w_ptr + rows.to(tl.int64) * row_stride + (cols // BLOCK) * SIZE
        if QTYPE == 8:  # Q8_0
            q = _i8_to_f32(_byte(blk + 2 + i))
            return _f16(blk) * q
        elif QTYPE == 2 or QTYPE == 3:  # Q4_0, Q4_1
            QS: tl.constexpr = 2 if QTYPE == 2 else 4
            q = (_byte(blk + QS + (i & 15)) >> ((i >> 4) << 2)) & 15
            if QTYPE == 2:
                return _f16(blk) * _small_int_to_f32(q, 8)
            else:
                return _f16(blk) * _small_int_to_f32(q) + _f16(blk + 2)
        elif QTYPE == 6 or QTYPE == 7:  # Q5_0, Q5_1
            QH: tl.constexpr = 2 if QTYPE == 6 else 4
            lo = (_byte(blk + QH + 4 + (i & 15)) >> ((i >> 4) << 2)) & 15
            hi = (_byte(blk + QH + (i >> 3)) >> (i & 7)) & 1
            q = lo | (hi << 4)
            if QTYPE == 6:
                return _f16(blk) * _small_int_to_f32(q, 16)
            else:
                return _f16(blk) * _small_int_to_f32(q) + _f16(blk + 2)
        elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K
            QS: tl.constexpr = 16 if QTYPE == 12 else 48
            j = i >> 5  # sub-block of 32
            sc, m = _k_scale_min(blk + 4, j)
            q = (_byte(blk + QS + (i >> 6) * 32 + (i & 31)) >> ((j & 1) << 2)) & 15
            if QTYPE == 13:
                q = q | (((_byte(blk + 16 + (i & 31)) >> j) & 1) << 4)
            return _f16(blk) * sc * _small_int_to_f32(q) - _f16(blk + 2) * m
        else:  # Q6_K
            h = i >> 7
            g = (i >> 5) & 3
            l = i & 31
            lo = (_byte(blk + h * 64 + l + ((g & 1) << 5)) >> ((g >> 1) << 2)) & 15
            hi = (_byte(blk + 128 + h * 32 + l) >> (g << 1)) & 3
            sc = _i8_to_f32(_byte(blk + 192 + (i >> 4)))
            return _f16(blk + 208) * sc * _small_int_to_f32(lo | (hi << 4), 32)


@triton.jit
def dequant_kernel(w_ptr, out_ptr, N, K, row_stride,
                   QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole (N, K) matrix to float32 `out`, one (BLOCK_N, BLOCK_K) tile per program (tests, and any op
    that wants a float copy)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = dequant(w_ptr, tl.minimum(offs_n, N - 1)[:, None], tl.minimum(offs_k, K - 1)[None, :], row_stride, QTYPE)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=mask)


def dequantize_triton(w: DevicePacked | torch.Tensor, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """`dequantize` through the Triton kernel: float32 of w's shape."""
    shape = tuple(w.shape)
    n, k = math.prod(shape[:-1]), shape[-1]
    check_aligned(w, "dequantize_triton")
    out = torch.empty(shape, dtype=torch.float32, device=_device(w))
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    dequant_kernel[grid](_ptr(w), out, n, k, row_stride(w), QTYPE=qtype_id(w), BLOCK_N=block_n, BLOCK_K=block_k)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The host side: the type of a weight, and the plain-torch twin
# ----------------------------------------------------------------------------------------------------------------

def qtype_of(w: DevicePacked | torch.Tensor) -> QT:
    if isinstance(w, DevicePacked):
        return QT(w.qtype)
    if w.dtype not in _DTYPE_QT:
        raise TypeError(f"no kernel reads {w.dtype} weights")
    return _DTYPE_QT[w.dtype]


def qtype_id(w: DevicePacked | torch.Tensor) -> int:
    """The QTYPE constexpr of a weight (its GGMLQuantizationType as an int)."""
    return int(qtype_of(w))


def row_stride(w: DevicePacked | torch.Tensor) -> int:
    """Distance between consecutive rows: bytes for packed weights, elements for float tensors. Rows of a 3-D
    expert stack (E, N, K) follow on: row n of expert e is row e * N + n."""
    if isinstance(w, DevicePacked):
        return int(w.data.stride(-2)) if w.data.dim() > 1 else int(w.data.shape[-1])
    return int(w.stride(-2)) if w.dim() > 1 else int(w.shape[-1])


def check_aligned(w: DevicePacked | torch.Tensor, what: str) -> None:
    """Refuse packed bytes at an odd address (a launcher's host-side check; no device read). Uploads, file maps
    (GGUF aligns tensor data to 32) and whole rows or experts of either are even."""
    if isinstance(w, DevicePacked) and w.data.data_ptr() % 2:
        raise ValueError(f"{what}: packed weight bytes start at an odd address")


def _ptr(w: DevicePacked | torch.Tensor) -> torch.Tensor:
    """What a kernel's w_ptr receives: the uint8 bytes, or the typed float tensor."""
    return w.data if isinstance(w, DevicePacked) else w


def _device(w: DevicePacked | torch.Tensor) -> torch.device:
    return w.data.device if isinstance(w, DevicePacked) else w.device


def _f16_at(b: torch.Tensor, off: int) -> torch.Tensor:
    """(..., 1) float32 from the float16 at byte `off` of each block."""
    return b[..., off:off + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n): all low nibbles, then all high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, step: int, width: int) -> torch.Tensor:
    """(..., n) bytes -> (..., 8 // step, n): field s holds (b >> s*step) & (2**width - 1)."""
    shifts = torch.arange(0, 8, step, dtype=torch.uint8, device=b.device)[:, None]
    return (b[..., None, :] >> shifts) & ((1 << width) - 1)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 12 packed bytes (..., 12) -> 6-bit scales and mins, each (..., 8) float32."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def _decode_blocks(b: torch.Tensor, qtype: QT) -> torch.Tensor:
    """(..., bytes per block) uint8 -> (..., block) float32, block by block as ggml lays them out."""
    if qtype == QT.Q8_0:
        return _f16_at(b, 0) * b[..., 2:].contiguous().view(torch.int8).float()
    if qtype in (QT.Q4_0, QT.Q4_1):
        q = _nibbles(b[..., 2 if qtype == QT.Q4_0 else 4:]).float()
        return _f16_at(b, 0) * (q - 8) if qtype == QT.Q4_0 else _f16_at(b, 0) * q + _f16_at(b, 2)
    if qtype in (QT.Q5_0, QT.Q5_1):
        qh = 2 if qtype == QT.Q5_0 else 4
        hi = _bits(b[..., qh:qh + 4], 1, 1).transpose(-1, -2).reshape(*b.shape[:-1], 32)  # bit i of the u32
        q = (_nibbles(b[..., qh + 4:]) | (hi << 4)).float()
        return _f16_at(b, 0) * (q - 16) if qtype == QT.Q5_0 else _f16_at(b, 0) * q + _f16_at(b, 2)
    if qtype in (QT.Q4_K, QT.Q5_K):
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., 16:144] if qtype == QT.Q4_K else b[..., 48:176]
        # arange, not torch.tensor([0, 4]): a host-to-device copy is not allowed while a CUDA graph is captured
        q = qs.reshape(*b.shape[:-1], 4, 1, 32) >> torch.arange(0, 8, 4, dtype=torch.uint8, device=b.device)[:, None]
        q = (q & 15).reshape(*b.shape[:-1], 8, 32)
        if qtype == QT.Q5_K:
            q = q | (_bits(b[..., 16:48], 1, 1) << 4)
        out = _f16_at(b, 0)[..., None] * sc[..., None] * q.float() - _f16_at(b, 2)[..., None] * mn[..., None]
        return out.reshape(*b.shape[:-1], 256)
    if qtype == QT.Q6_K:
        lo = _nibbles(b[..., 0:128].reshape(*b.shape[:-1], 2, 64))  # (..., 2, 128)
        hi = _bits(b[..., 128:192].reshape(*b.shape[:-1], 2, 32), 2, 2).reshape(*b.shape[:-1], 2, 128)
        q = ((lo | (hi << 4)).float() - 32).reshape(*b.shape[:-1], 16, 16)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        return (_f16_at(b, 208)[..., None] * sc[..., None] * q).reshape(*b.shape[:-1], 256)
    raise TypeError(f"no decoder for {qtype.name}")


def dequantize(w: DevicePacked | torch.Tensor) -> torch.Tensor:
    """The plain-torch twin of `dequant`: the whole weight as float32 of its element shape, on its device.
    Shape-static torch ops only (no host read, no host-to-device copy), so `rows` can sit in a CUDA graph."""
    if not isinstance(w, DevicePacked):
        return w.float()
    qtype = QT(w.qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = w.data.reshape(*w.data.shape[:-1], w.data.shape[-1] // size, size)
    return _decode_blocks(blocks, qtype).reshape(w.shape)


def rows(w: DevicePacked | torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 (len(ids), K): only the rows `ids` of a 2-D weight decoded (the embedding lookup). A device-side
    gather of whole rows of bytes: static shape, no host read."""
    if not isinstance(w, DevicePacked):
        return w.index_select(0, ids.reshape(-1)).float()
    picked = DevicePacked(w.data.index_select(0, ids.reshape(-1)), w.qtype, (ids.numel(), w.shape[-1]))
    return dequantize(picked)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/test_kernels_aot.py compiles them for sm_80 ... sm_120)
# ----------------------------------------------------------------------------------------------------------------

def AOT():
    """The element-wise decoder on every type (the tile other kernels call it on: 32 x 64)."""
    sig = {"w_ptr": None, "out_ptr": "*fp32", "N": "i32", "K": "i32", "row_stride": "i32",
           "QTYPE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    ptr = {QT.F32: "*fp32", QT.F16: "*fp16", QT.BF16: "*bf16"}
    div = dict(divisible_by_16=("w_ptr", "out_ptr", "K"))
    return [(dequant_kernel, {**sig, "w_ptr": ptr.get(q, "*u8")}, dict(QTYPE=int(q), BLOCK_N=32, BLOCK_K=64), div)
            for q in TYPES]
