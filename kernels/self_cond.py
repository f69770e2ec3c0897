"""
Self-conditioning: softmax(processed logits) @ embedding, without the probabilities
===================================================================================

The next denoising step reads, besides its canvas, the expected embedding under this step's distribution:

    soft = softmax(processed) @ embed * scale          (R, H),  R = B * C positions, contraction over V

`ops_cpu.head_and_sample` builds the (R, V) probabilities and multiplies. At the real shape they are 268 MB of
float32 per batch row, read and written once more than needed. Here the probabilities exist only in registers:
this is a GEMM whose A operand is computed in its prologue from the processed logits (written once by
`kernels/head_sampler.py`) and the per-position max M and total S = sum exp(l - M) of its reduce:

    A[r, v] = exp(l[r, v] - M[r]) * (1 / S[r])

and whose B operand is the embedding itself, (V, H) row-major as GGUF stores it: the contraction runs over its
*rows* (vocabulary ids) and the tile is decoded in registers by `kernels.dequant.dequant(rows=k, cols=n)`, any
packed type or a float tensor.

Precision, matched to the reference (`ops_cpu.head_and_sample`):
- float32 model: A and the decoded weights stay float32 and `tl.dot` runs with input_precision="ieee", so
  fp32 parity holds to ~1e-6 (the sum order differs). Slow on tensor cores, but a float32 model is a test mode.
- bf16 model: the reference takes the softmax of the processed logits *cast to bf16*, in float32, then casts
  the probabilities to bf16 and runs a bf16 matmul. The prologue does the same: l rounded to bf16, M and S of
  those rounded logits (`Reduced.soft_max`, `soft_total`: the partials keep a bf16 sum for this), p rounded to
  bf16; the decoded weights are rounded to bf16 (as `dequantize(embed).to(bfloat16)` would); fp32 accumulation;
  the sum rounded to bf16, then times scale in bf16, as the reference's two bf16 ops. The bf16 roundings use
  `to_bf16` (the GPU's round-to-nearest-even cast; integer maths under the interpreter, whose
  cast truncates). p differs from torch's softmax
  by an ulp or so of float32 before its bf16 rounding (torch's exp and reciprocal differ), so a rare p lands on
  the other side of a bf16 rounding boundary; the result agrees to bf16 resolution, not bit for bit.

Blocks: the contraction is long (V = 262,144) and the output small (R x H = 256 x 2816 at batch 1), so the grid
is (M tiles, N tiles, SPLIT_K): each program sums its slice of the vocabulary into float32 partials
(SPLIT_K, R, H), summed in torch (deterministic, no atomics). The element-wise decode costs tens of integer
instructions per weight, more than streaming the weight's bytes, and each M tile decodes the whole embedding
once, so for a bf16 model BLOCK_M covers every position of a batch row: 256 rows x BLOCK_N = 64 at 8 warps
(171-183 registers and no spills on sm_90 for every type; Q8_0 spills 32 bytes on sm_120 only; 96 KB
of shared memory for the pipelined tiles, within sm_86/89/120's 99 KB), 128 rows for 128 <= R < 256. A float32
model (a test mode: its ieee dot runs on CUDA cores) takes 64 x 64 at 4 warps; fewer than 128 positions (tiny
models, tests) 32 x 128 at 8 warps. BLOCK_K = 32 throughout. SPLIT_K fills about two waves of the device's SMs:
6 slices at batch 1 on an H100 (44 N tiles). All programs stream the vocabulary in the same order, so the
processed-logit tiles a neighbouring N tile just read are still in L2.

The price of never writing the probabilities: every N tile recomputes its rows' exp(l - M) (44 times per
(position, token) at H = 2816), as every M tile re-decodes the embedding, so the ALU work goes as
R * V * H * (c_exp / BLOCK_N + c_decode / BLOCK_M), with c_exp and c_decode a few tens of instructions each.
No GPU measured it; if it shows, the knob is a wider BLOCK_N (more registers), or writing bf16 probabilities
once from the partials pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgrun.kernels.dequant import INTERPRETING, PACKED_TYPES, _ptr, dequant, mma, qtype_id, row_stride


@triton.jit
def round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as float32. Integer maths, so the interpreter
    (whose float32 -> bf16 cast truncates) and the GPU (whose cast rounds) agree with torch's `.to(bfloat16)`."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_bf16(x):
    """float32 -> bfloat16 rounded to nearest even: the GPU's own cast (one cvt.rn); under the interpreter, whose
    cast truncates, through round_bf16."""
    if INTERPRETING:
        return round_bf16(x).to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def soft_kernel(p_ptr, max_ptr, total_ptr, w_ptr, out_ptr,
                R, V, H, stride_p, w_stride, k_per_split,
                QTYPE: tl.constexpr, BF16: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (m, n, k): out[k, m tile, n tile] = sum over vocabulary slice k of softmax(l) * embed."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < R
    row_max = tl.load(max_ptr + offs_m, mask=m_mask, other=0.0)
    inv_total = 1.0 / tl.load(total_ptr + offs_m, mask=m_mask, other=1.0)
    cols = tl.minimum(offs_n, H - 1)[None, :]  # dequant takes no mask: clamp, the store drops the extra columns
    p_rows = p_ptr + offs_m.to(tl.int64)[:, None] * stride_p

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, V)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        l = tl.load(p_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=-float("inf"))
        w = dequant(w_ptr, tl.minimum(offs_k, V - 1)[:, None], cols, w_stride, QTYPE)
        if BF16:
            p = tl.exp(to_bf16(l).to(tl.float32) - row_max[:, None]) * inv_total[:, None]
            acc = mma(to_bf16(p), to_bf16(w), acc)
        else:
            p = tl.exp(l - row_max[:, None]) * inv_total[:, None]  # 0 outside the slice: exp(-inf)
            acc = mma(p, w, acc, "ieee")
    out = out_ptr + (pid_k * R + offs_m.to(tl.int64))[:, None] * H + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & (offs_n[None, :] < H))


def config(rows: int, bf16: bool) -> dict:
    """Block sizes and warps for R = rows positions (module docstring): the largest tiles that compile without
    spills on sm_90 for every weight type (ptxas -v; see the AOT table)."""
    if rows < 128:
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, num_warps=8)
    if not bf16:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4)
    return dict(BLOCK_M=256 if rows >= 256 else 128, BLOCK_N=64, BLOCK_K=32, num_warps=8)


def _split_k(tiles: int, device: torch.device) -> int:
    """Vocabulary slices so that about two waves of programs fill the device (1 off the GPU)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(32, 2 * sms // tiles))


def soft_embedding(processed: torch.Tensor, row_max: torch.Tensor, total: torch.Tensor, embed,
                   scale: torch.Tensor, dtype: torch.dtype, split_k: int | None = None) -> torch.Tensor:
    """(R, H) in `dtype` = softmax(processed) @ embed * scale, from processed (R, V) float32 logits and their
    per-position max and sum exp(l - max) (`head_sampler.Reduced.soft_max`, `soft_total`).
    embed (V, H): DevicePacked or a float tensor. dtype bfloat16 rounds as the reference does (docstring)."""
    r, v = processed.shape
    h = embed.shape[-1]
    cfg = config(r, dtype == torch.bfloat16)
    tiles = triton.cdiv(r, cfg["BLOCK_M"]) * triton.cdiv(h, cfg["BLOCK_N"])
    split_k = split_k or _split_k(tiles, processed.device)
    k_per_split = triton.cdiv(triton.cdiv(v, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split_k = triton.cdiv(v, k_per_split)
    parts = torch.empty(split_k, r, h, dtype=torch.float32, device=processed.device)
    grid = (triton.cdiv(r, cfg["BLOCK_M"]), triton.cdiv(h, cfg["BLOCK_N"]), split_k)
    soft_kernel[grid](processed, row_max.contiguous(), total.contiguous(), _ptr(embed), parts,
                      r, v, h, processed.stride(0), row_stride(embed), k_per_split,
                      QTYPE=qtype_id(embed), BF16=dtype == torch.bfloat16, **cfg)
    soft = parts.sum(0) if split_k > 1 else parts[0]
    return soft.to(dtype) * scale.to(dtype)  # the reference's (probs @ embed) * scale, in the model's dtype


def soft_embedding_of(processed: torch.Tensor, embed, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same from (R, V) processed logits alone, their max and total taken in torch: for a caller without
    the head's reduce (the backend's `denoise(self_cond_logits=...)`); a denoising step passes the reduce's."""
    p = processed.float().contiguous()
    rounded = p.to(dtype).float() if dtype == torch.bfloat16 else p  # the bf16 model's softmax input
    row_max = rounded.max(-1).values
    total = (rounded - row_max[:, None]).exp().sum(-1)
    return soft_embedding(p, row_max, total, embed, scale, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ----------------------------------------------------------------------------------------------------------------

def aot(full: bool = False) -> list:
    """(kernel, signature, constexprs) per launch configuration. The default list: the batch config (R >= 128)
    for bf16 models over the embedding types published files hold (Q6_K in Q4_K_M, Q8_0, BF16) and the other
    K-quants, for fp32 models over Q6_K and F32, and the small-R config once. full=True: every config (R = 32,
    128, 256) x every weight type x fp32 / bf16 (45 distinct entries)."""
    from gguf import GGMLQuantizationType as QT

    def entry(qtype: QT, bf16: bool, rows: int):
        w_ty = {QT.F32: "*fp32", QT.F16: "*fp16", QT.BF16: "*bf16"}.get(qtype, "*u8")
        cfg = config(rows, bf16)
        sig = {"p_ptr": "*fp32", "max_ptr": "*fp32", "total_ptr": "*fp32", "w_ptr": w_ty, "out_ptr": "*fp32",
               "R": "i32", "V": "i32", "H": "i32", "stride_p": "i32", "w_stride": "i32", "k_per_split": "i32",
               "QTYPE": "constexpr", "BF16": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_K": "constexpr"}
        const = {"QTYPE": int(qtype), "BF16": bf16, **{k: v for k, v in cfg.items() if k != "num_warps"}}
        # at the real shape (V = 262,144, H = 2816, R = 256 B) all but Q6_K's 2310-byte rows are multiples of 16
        div = ("p_ptr", "max_ptr", "total_ptr", "w_ptr", "out_ptr", "R", "V", "H", "stride_p", "k_per_split")
        div += () if qtype == QT.Q6_K else ("w_stride",)
        return soft_kernel, sig, const, {"num_warps": cfg["num_warps"], "divisible_by_16": div}

    if full:
        types = [(t, bf16) for t in PACKED_TYPES for bf16 in (False, True)] + [(QT.F32, False), (QT.BF16, True)]
        configs = {(t, bf16, tuple(config(rows, bf16).items())): rows for rows in (32, 128, 256) for t, bf16 in types}
        return [entry(t, bf16, rows) for (t, bf16, _), rows in configs.items()]
    return ([entry(t, True, 256) for t in (QT.Q6_K, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.BF16)]
            + [entry(t, False, 256) for t in (QT.Q6_K, QT.F32)] + [entry(QT.Q6_K, True, 32)])


AOT = aot()
