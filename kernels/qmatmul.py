"""
Packed matmul: y = x @ W.T straight from GGUF blocks
====================================================

One denoising step multiplies (B * 256, K) activations by every weight matrix once, and the weights stay packed on
the GPU as the file stores them (`dgrun.packed.DevicePacked`). This kernel decodes W in registers, tile by tile,
and accumulates in float32 on the tensor cores: the tiled GEMM of Triton's tutorial 03 with a decoder in front of
the right-hand operand.

Decoding K-major, a piece at a time
-----------------------------------
`kernels.dequant.dequant` decodes any element on its own, which costs each element its block address, its scale
and, for the K-quants, its 6-bit sub-scale (dozens of instructions per weight). A GEMM walks K in order, so here
the loop steps over whole *chunks* of the type's layout instead:

=========  =====  ====================================================================================
type       chunk  pieces (each a (BLOCK_N, P) tile sharing one scale per row, and one tl.dot)
=========  =====  ====================================================================================
Q8_0       32     one piece of 32 int8 codes
Q4_0/Q4_1  32     the 16 low nibbles, then the 16 high nibbles (two pieces of 16)
Q5_0/Q5_1  32     as Q4_x, the 5th bit taken from the block's 32-bit qh word
Q4_K/Q5_K  64     32 bytes: low nibbles = sub-block 2c, high nibbles = sub-block 2c + 1 (two pieces of 32)
Q6_K       128    4 quarters of 32 (ql low/high nibbles of two 32-byte runs, 2 bits each from qh);
                  the scale changes every 16, picked per element with one select (a 64-element step
                  needs fewer registers but costs ~1.7x the ALU work per weight by a static count)
F32/F16    32     the stored values
BF16
=========  =====  ====================================================================================

Each row's scales are loaded once per piece, so a weight costs a share of a vector byte load, a shift/mask, an
exact int-to-float through the exponent bits (`dequant._small_int_to_f32`: NVIDIA's I2F runs at a quarter of the
FMA rate), a multiply-add and half a bf16 pack before it reaches `tl.dot`. The pieces of one chunk multiply the
matching column slices of x, so no decoded tile is ever reshuffled. `dot_packed` is that loop on its own, over row
offsets of x and of W, so the MoE and head kernels can call it with gathered tokens and expert or vocabulary rows.

Precision and blocks
--------------------
x may be float32, bfloat16 or float16; the decoded weights are cast to x's dtype for `tl.dot` and accumulated in
float32, and y comes out in x's dtype. For float32 x the product's input precision is a constexpr: "ieee" (exact),
"tf32x3" (the default: float32-grade accuracy from three tf32 products) or "tf32" (fastest, ~1e-3 relative).
The twin is `ops_cpu.linear(x, dequantize(W).to(x.dtype))`.

Block sizes follow M (rows of x): the step's M is B * 256, commit's 256, prefill's up to 2,048. BLOCK_N = 64;
BLOCK_M = 16 for M <= 16 (tl.dot's minimum), 32 up to 32, 64 up to 256 (4 warps: at M = 256 and N = 2,816, 176
programs for 132 SMs), then 128 (8 warps), which halves how often each weight is decoded again. Every M-tile
decodes its W tiles anew, so decode work scales with M / BLOCK_M: the trade against filling the SMs is for a GPU
benchmark to settle (`qmatmul(..., config=...)`). Programs are ordered in GROUP_M bands (tutorial 03) so neighbours
share W in L2. K must be a multiple of the chunk (every GGUF row is a whole number of blocks; float rows a multiple
of 32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgrun.kernels.dequant import (_byte, _f16, _i8_pair, _i8_to_f32, _k_scale_min, _ptr, _small_int_to_f32,
                                   check_aligned, mma, qtype_id, row_stride)
from dgrun.packed import DevicePacked


# ----------------------------------------------------------------------------------------------------------------
# The decoder loop
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _dot_piece(acc, x_ptr, x_rows, x_mask, k, w, P: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += x[:, k:k+P] @ w.T, with w a decoded (BLOCK_N, P) float32 piece of W."""
    x = tl.load(x_ptr + k + (x_rows + tl.arange(0, P)[None, :]), mask=x_mask, other=0.0)
    return mma(x, tl.trans(w.to(x.dtype)), acc, DOT_PRECISION)


@triton.jit
def dot_packed(acc, x_ptr, x_rows, x_mask, w_ptr, w_rows, K, QTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) float32 += x @ W[rows].T over all K.

    x_rows: (BLOCK_M, 1) int32 offsets (elements) of x's rows from x_ptr, each K contiguous elements; x_mask
    (BLOCK_M, 1). w_rows: (BLOCK_N, 1) int32 offsets of W's rows from w_ptr (bytes; elements for float W), all
    in range (clamp the row indices) and whole numbers of blocks (row * row_stride, with expert e of a stack at
    row e * N + n). K is a multiple of the type's chunk. Offsets are int32 because 64-bit
    pointer tiles, live across the loop, cost registers: every DiffusionGemma tensor is under 2**31 bytes."""
    a16 = tl.arange(0, 16)[None, :]
    a32 = tl.arange(0, 32)[None, :]
    if QTYPE == 12 or QTYPE == 13:  # elements per loop step (see the table above)
        CHUNK: tl.constexpr = 64
    elif QTYPE == 14:
        CHUNK: tl.constexpr = 128
    else:
        CHUNK: tl.constexpr = 32
    # Each step: `base`, a scalar pointer to the chunk's block in row 0; `blk` (BLOCK_N, 1) the block in each row
    # (per-row scales); code tiles are loaded at base + (w_rows + offset + arange), int32 up to the last add.
    # Row offsets are whole numbers of blocks, so they share the block size's power-of-two factor; saying so lets
    # Triton load several bytes per instruction even where row_stride is not a multiple of 16.
    if QTYPE == 12 or QTYPE == 13:
        w_rows = tl.multiple_of(w_rows, [16, 1])
    elif QTYPE == 7:
        w_rows = tl.multiple_of(w_rows, [8, 1])
    elif QTYPE == 3:
        w_rows = tl.multiple_of(w_rows, [4, 1])
    elif QTYPE == 2 or QTYPE == 6 or QTYPE == 8 or QTYPE == 14:
        w_rows = tl.multiple_of(w_rows, [2, 1])
    for k in range(0, K, CHUNK):
        if QTYPE == 0 or QTYPE == 1 or QTYPE == 30:  # F32, F16, BF16
            w = tl.load(w_ptr + k + (w_rows + a32)).to(tl.float32)
            acc = _dot_piece(acc, x_ptr, x_rows, x_mask, k, w, 32, DOT_PRECISION)
        elif QTYPE == 8:  # Q8_0
            base = w_ptr + (k // 32) * 34
            q = _i8_to_f32(_byte(base + (w_rows + 2 + a32)))
            acc = _dot_piece(acc, x_ptr, x_rows, x_mask, k, _f16(base + w_rows) * q, 32, DOT_PRECISION)
        elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:  # Q4_0, Q4_1, Q5_0, Q5_1
            if QTYPE == 2:
                SIZE: tl.constexpr = 18
                QS: tl.constexpr = 2
            elif QTYPE == 3:
                SIZE: tl.constexpr = 20
                QS: tl.constexpr = 4
            elif QTYPE == 6:
                SIZE: tl.constexpr = 22
                QS: tl.constexpr = 6
            else:
                SIZE: tl.constexpr = 24
                QS: tl.constexpr = 8
            base = w_ptr + (k // 32) * SIZE
            blk = base + w_rows
            b = _byte(base + (w_rows + QS + a16))  # (BLOCK_N, 16): element j low nibble, j + 16 high
            lo = b & 15
            hi = b >> 4
            if QTYPE == 6 or QTYPE == 7:  # qh, the 4 bytes before the nibbles: bit i = 5th bit of element i
                qh = (_byte(blk + QS - 4) | (_byte(blk + QS - 3) << 8) | (_byte(blk + QS - 2) << 16)
                      | (_byte(blk + QS - 1) << 24))
                lo = lo | (((qh >> a16) & 1) << 4)
                hi = hi | (((qh >> (a16 + 16)) & 1) << 4)
            d = _f16(blk)
            if QTYPE == 2 or QTYPE == 6:
                ZERO: tl.constexpr = 8 if QTYPE == 2 else 16
                w_lo = d * _small_int_to_f32(lo, ZERO)
                w_hi = d * _small_int_to_f32(hi, ZERO)
            else:
                m = _f16(blk + 2)
                w_lo = d * _small_int_to_f32(lo) + m
                w_hi = d * _small_int_to_f32(hi) + m
            acc = _dot_piece(acc, x_ptr, x_rows, x_mask, k, w_lo, 16, DOT_PRECISION)
            acc = _dot_piece(acc, x_ptr, x_rows, x_mask, k + 16, w_hi, 16, DOT_PRECISION)
        elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K: a 64-element chunk = sub-blocks 2c and 2c + 1
            SIZE: tl.constexpr = 144 if QTYPE == 12 else 176
            QS: tl.constexpr = 16 if QTYPE == 12 else 48
            base = w_ptr + (k // 256) * SIZE
            blk = base + w_rows
            c = (k % 256) // 64
            d = _f16(blk)
            dmin = _f16(blk + 2)
            sc0, m0 = _k_scale_min(blk + 4, 2 * c)
            sc1, m1 = _k_scale_min(blk + 4, 2 * c + 1)
            b = _byte(base + (w_rows + QS + a32) + c * 32)  # (BLOCK_N, 32)
            lo = b & 15
            hi = b >> 4
            if QTYPE == 13:
                qh = _byte(base + (w_rows + 16 + a32))
                lo = lo | (((qh >> (2 * c)) & 1) << 4)
                hi = hi | (((qh >> (2 * c + 1)) & 1) << 4)
            w_lo = (d * sc0) * _small_int_to_f32(lo) - dmin * m0
            w_hi = (d * sc1) * _small_int_to_f32(hi) - dmin * m1
            acc = _dot_piece(acc, x_ptr, x_rows, x_mask, k, w_lo, 32, DOT_PRECISION)
            acc = _dot_piece(acc, x_ptr, x_rows, x_mask, k + 32, w_hi, 32, DOT_PRECISION)
        else:  # Q6_K: a 128-element half h of a super-block, in 4 quarters g of 32
            base = w_ptr + (k // 256) * 210
            blk = base + w_rows
            h = (k % 256) // 128
            d = _f16(blk + 208)
            ql0 = _byte(base + (w_rows + a32) + h * 64)
            ql1 = _byte(base + (w_rows + 32 + a32) + h * 64)
            qh = _byte(base + (w_rows + 128 + a32) + h * 32)
            first = a32 < 16  # the scale changes every 16 elements
            s = blk + 192 + h * 8
            for g in tl.static_range(4):
                if g % 2 == 0:
                    ql = ql0
                else:
                    ql = ql1
                q = ((ql >> (4 * (g // 2))) & 15) | (((qh >> (2 * g)) & 3) << 4)
                s0, s1 = _i8_pair(s + 2 * g)
                w = (d * tl.where(first, s0, s1)) * _small_int_to_f32(q, 32)
                acc = _dot_piece(acc, x_ptr, x_rows, x_mask, k + 32 * g, w, 32, DOT_PRECISION)
    return acc


# ----------------------------------------------------------------------------------------------------------------
# The kernel and its launcher
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def qmatmul_kernel(x_ptr, w_ptr, y_ptr,  # pointers
                   M, N, K,  # shapes
                   stride_xm, stride_ym, row_stride,  # strides (row_stride: bytes, or elements for float W)
                   QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """y (M, N) = x (M, K) @ W (N, K).T, one (BLOCK_M, BLOCK_N) tile per program."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: a library @jit, which the interpreter cannot call if
    num_n = (N + BLOCK_N - 1) // BLOCK_N  # triton was imported before TRITON_INTERPRET was set
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_m
    pid_n = (pid % (GROUP_M * num_n)) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros, like tl.cdiv, is a library @jit (see above)
    acc = dot_packed(acc, x_ptr, offs_m[:, None] * stride_xm, offs_m[:, None] < M,
                     w_ptr, tl.minimum(offs_n, N - 1)[:, None] * row_stride, K, QTYPE, DOT_PRECISION)

    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def blocks(m: int) -> dict:
    """Launch configuration for M rows of x (see the module docstring)."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4)
    if m <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
    if m <= 256:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)


CHUNK = {0: 32, 1: 32, 30: 32, 2: 32, 3: 32, 6: 32, 7: 32, 8: 32, 12: 64, 13: 64, 14: 128}


def qmatmul(x: torch.Tensor, w: DevicePacked | torch.Tensor, *, out: torch.Tensor | None = None,
            precision: str = "tf32x3", config: dict | None = None) -> torch.Tensor:
    """x (..., K) @ w.T -> (..., N) in x's dtype, W packed (N, K) or a float tensor (N, K). No host read and
    no data-dependent allocation: capturable in a CUDA graph. `precision` applies to float32 x only; `config`
    (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides `blocks(M)`, for a benchmark to sweep tiles on a GPU."""
    n, k = w.shape[-2], w.shape[-1]
    if len(w.shape) != 2 or x.shape[-1] != k:
        raise ValueError(f"qmatmul: x {tuple(x.shape)} by W {tuple(w.shape)}")
    qtype = qtype_id(w)
    check_aligned(w, "qmatmul")
    if _ptr(w).numel() >= 2**31 or x.numel() >= 2**31:
        raise ValueError("qmatmul: offsets are int32; split tensors of 2**31 elements or more")
    if k % CHUNK[qtype]:
        raise ValueError(f"qmatmul: K = {k} is not a multiple of {CHUNK[qtype]}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = out if out is not None else torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    y2 = y.view(m, n)
    cfg = {**blocks(m), **(config or {})}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    qmatmul_kernel[grid](x2, _ptr(w), y2, m, n, k, x2.stride(0), y2.stride(0), row_stride(w),
                         QTYPE=qtype, GROUP_M=8, DOT_PRECISION=precision if x.dtype == torch.float32 else "ieee",
                         **cfg)
    return y


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations (tests/test_kernels_aot.py compiles them for sm_80 ... sm_120)
# ----------------------------------------------------------------------------------------------------------------

_W_PTR = {0: "*fp32", 1: "*fp16", 30: "*bf16"}


def _entry(qtype: int, x: str, m: int, precision: str = "ieee", aligned_rows: bool = True):
    """One AOT configuration. `aligned_rows`: W's row stride is a multiple of 16 (bytes, or elements for float
    W): true at K = 2816 for every type but Q6_K, false for Q5_0 / Q8_0 at K = 704 or 2112 (the down
    projections that published Q4_K_M files store in those types). Pointers, N, K and x's strides always are."""
    cfg = blocks(m)
    sig = {"x_ptr": x, "w_ptr": _W_PTR.get(qtype, "*u8"), "y_ptr": x, "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_ym": "i32", "row_stride": "i32", "QTYPE": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "GROUP_M": "constexpr", "DOT_PRECISION": "constexpr"}
    const = dict(QTYPE=qtype, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_M=8, DOT_PRECISION=precision)
    div = ("x_ptr", "w_ptr", "y_ptr", "N", "K", "stride_xm", "stride_ym") + (("row_stride",) if aligned_rows else ())
    return qmatmul_kernel, sig, const, {"num_warps": cfg["num_warps"], "divisible_by_16": div}


def AOT():
    """bf16 activations (the cuda backend's dtype) at the step's M (256) for every type, with W's row alignment
    as DiffusionGemma's shapes give it; the large-M tile (prefill), the small ones (short prompts) and float32 x
    for the types published files use most."""
    out = [_entry(q, "*bf16", 256) for q in (8, 2, 3, 6, 7, 12, 13, 30, 1, 0)]
    out += [_entry(q, "*bf16", 256, aligned_rows=False) for q in (8, 6, 14)]
    out += [_entry(12, "*bf16", 2048), _entry(14, "*bf16", 2048, aligned_rows=False)]
    out += [_entry(12, "*bf16", 16), _entry(8, "*bf16", 32, aligned_rows=False)]  # short prompts
    out += [_entry(q, "*fp32", 256, "tf32x3") for q in (12, 8)]
    return out
