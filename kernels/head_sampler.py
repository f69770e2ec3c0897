"""
The tied lm_head and the sampler over split-vocabulary partials
===============================================================

One denoising step ends with the head: logits = x @ embed.T over the whole vocabulary, softcapped and divided by
each row's temperature, then the entropy-bound sampler (`backends/torch/sampler.py`). At the real shape that is
256 positions x 262,144 tokens: 268 MB of float32 per batch row. The torch reference makes several passes over
it (softmax, cumsum, log-softmax, argmax) and keeps the (B*C, V) probabilities. Here the logits are written
once by the matmul, rewritten once as processed logits, then read by the self-conditioning GEMM; the
probabilities are never written:

1. **Logits.** `kernels.qmatmul.qmatmul(x, embed)`: the packed embedding (Q6_K in Q4_K_M files, Q8_0 in Q8_0
   files) decoded in registers, fp32 accumulation, (B*C, V) in x's dtype (ieee products for a float32 model:
   the parity mode).
2. **Partials** (`partials_kernel`, one program per (position, vocabulary split of SPLIT tokens)): softcap
   `tanh(l / cap) * cap` and temperature `l / t[row]` applied on the fly; the *processed* logits are written
   back once as float32 (in place when the logits are float32); and per split:

       m = max l,   a = argmax l,   s = sum exp(l - m),   q = sum exp(l - m) * (l - m)

   (and, for a bf16 model, s' = sum exp(bf16(l) - bf16(m)): the softmax the reference takes for the
   self-conditioning input, see `kernels/self_cond.py`).
3. **Reduce** (`reduce_partials`, torch on (B*C, V / SPLIT): small). With M = max_j m_j and
   w_j = s_j exp(m_j - M), the mass of split j in units of exp(l - M):

       logsumexp = M + log S,  S = sum_j w_j
       entropy   = -sum p (l - logsumexp) = log S - (1 / S) sum_j exp(m_j - M) (q_j + (m_j - M) s_j)

   The entropy is accumulated around each split's max (every l - m <= 0), never as a difference of two large
   sums of raw logits, so a low-entropy row keeps its digits.
4. **Draw** (`draw_kernel`): the reference's inverse CDF, `cumsum(probs)` then `searchsorted(right=True)` at
   u * total. The target u * S falls in the first split whose cumulative mass exceeds it (a searchsorted over
   the (V / SPLIT) masses, torch); one program per position then scans only that split: tl.cumsum of
   exp(l - M) on top of the mass before the split, and takes the first token whose running sum exceeds the
   target. The token is the reference's except where the target sits within float rounding of a CDF boundary
   (the sums are taken in another order); the tests keep their targets away from boundaries by construction.
5. **The rest of the sampler** is per-position work on (B, C) vectors: `sampler.settle`, the reference's own
   torch code (pins, entropy-bound acceptance, renoise, history, stable-and-confident stop).
6. **Self-conditioning** (`kernels/self_cond.py`): softmax(processed) @ embed * scale as a GEMM whose prologue
   turns each processed logit into exp(l - M) / S from step 3.

Every shape is static and nothing is read back to the host: the whole head runs inside a CUDA graph.

Why SPLIT = 1024: 262,144 / 1024 = 256 splits per position, so (B*C, 256) programs (65,536 at batch 1), each
loading 4 KB with 4 warps (8 values a thread: 32-40 registers and no spills from sm_80 to sm_120, where 2048
spilled); the reduce and the split search run over 256 values a position (1 MB of partials at batch 1); the
draw reads 4 KB a position.

Float rounding: the softcap's tanh (libdevice's on the GPU) and the temperature division (`div_rn`: Triton's
float32 `/` is the approximate div.full, the reference divides exactly) match torch to an ulp or two; sums are
taken in another order than torch's. Under `TRITON_INTERPRET=1` libdevice does not exist: tanh comes from exp
(and its Taylor series near 0), the division is numpy's, and bf16 roundings (`self_cond.to_bf16`) go through
integer maths, because the interpreter's float32 -> bf16 cast truncates where the GPU's rounds to nearest
even.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dgrun.backends.torch import rng, sampler
from dgrun.kernels import self_cond
from dgrun.kernels.dequant import INTERPRETING
from dgrun.kernels.qmatmul import qmatmul
from dgrun.kernels.self_cond import to_bf16

SPLIT = 1024  # vocabulary split width (see the module docstring)


# ----------------------------------------------------------------------------------------------------------------
# The device side
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _div(a, b):
    """IEEE a / b (Triton's `/` on float32 is the approximate div.full; the reference divides exactly)."""
    if INTERPRETING:
        return a / b
    else:
        return libdevice.div_rn(a, b)


@triton.jit
def _tanh(x):
    if INTERPRETING:  # libdevice is GPU-only: tanh from exp (no overflow), its Taylor series near 0 (no cancellation)
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        x2 = x * x
        series = a * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
        t = tl.where(a < 0.2, series, (1.0 - e) / (1.0 + e))
        return tl.where(x < 0, -t, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def partials_kernel(logits_ptr, processed_ptr, temp_ptr, stats_ptr, index_ptr,
                    V, C, n_splits, stride_l, stride_p, cap,
                    SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, BF16: tl.constexpr):
    """Program (row, split): softcap and temperature over SPLIT logits of one position, the processed float32
    logits stored, and the split's (max, sum exp, sum exp * (l - max), bf16 sum exp) and argmax."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    offs = split * SPLIT + tl.arange(0, SPLIT)
    mask = offs < V
    l = tl.load(logits_ptr + row.to(tl.int64) * stride_l + offs, mask=mask, other=0.0).to(tl.float32)
    if SOFTCAP:
        l = _tanh(_div(l, cap)) * cap
    l = _div(l, tl.load(temp_ptr + row // C))  # each batch row has its own temperature
    tl.store(processed_ptr + row.to(tl.int64) * stride_p + offs, l, mask=mask)

    l = tl.where(mask, l, -float("inf"))
    m, a = tl.max(l, 0, return_indices=True)  # the first index of the max, as torch.argmax
    e = tl.exp(l - m)  # 0 past the vocabulary's end
    d = tl.where(mask, l - m, 0.0)
    out = stats_ptr + (row * n_splits + split) * 4
    tl.store(out, m)
    tl.store(out + 1, tl.sum(e, 0))
    tl.store(out + 2, tl.sum(e * d, 0))
    if BF16:
        rounded = to_bf16(l).to(tl.float32) - to_bf16(m).to(tl.float32)
        tl.store(out + 3, tl.sum(tl.exp(rounded), 0))
    tl.store(index_ptr + row * n_splits + split, split * SPLIT + a)


@triton.jit
def draw_kernel(processed_ptr, split_ptr, start_ptr, target_ptr, max_ptr, out_ptr, V, stride_p,
                SPLIT: tl.constexpr):
    """Program row: the first token of split `split[row]` where start + cumsum(exp(l - max)) exceeds target;
    the split's last token if rounding leaves the sum short of it."""
    row = tl.program_id(0)
    first = tl.load(split_ptr + row) * SPLIT
    offs = first + tl.arange(0, SPLIT)
    mask = offs < V
    l = tl.load(processed_ptr + row.to(tl.int64) * stride_p + offs, mask=mask, other=-float("inf"))
    cdf = tl.load(start_ptr + row) + tl.cumsum(tl.exp(l - tl.load(max_ptr + row)), 0)
    hit = (cdf > tl.load(target_ptr + row)) & mask
    token = tl.min(tl.where(hit, offs, V), 0)
    last = tl.minimum(first + SPLIT, V) - 1
    tl.store(out_ptr + row, tl.where(token < V, token, last).to(tl.int64))


# ----------------------------------------------------------------------------------------------------------------
# The host side
# ----------------------------------------------------------------------------------------------------------------

class Reduced(NamedTuple):
    """Per position (R = B*C rows) after the reduce."""

    max: torch.Tensor  # (R,) float32 max processed logit M
    argmax: torch.Tensor  # (R,) int64
    total: torch.Tensor  # (R,) float32 S = sum exp(l - M)
    entropy: torch.Tensor  # (R,) float32
    mass: torch.Tensor  # (R, splits) float32 w_j = sum over split j of exp(l - M)
    soft_max: torch.Tensor  # (R,) float32: the softmax the soft embedding takes (bf16-rounded for bf16 models)
    soft_total: torch.Tensor  # (R,) float32


def partials(logits: torch.Tensor, temp: torch.Tensor, positions: int, cap: float | None, bf16: bool = False,
             split: int = SPLIT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (R, V) -> processed (R, V) float32 (the logits' own buffer when they are float32), stats
    (R, splits, 4) float32 [max, sum exp, sum exp * (l - max), bf16 sum exp] and index (R, splits) int32.
    temp (B,) float32 with R = B * positions."""
    r, v = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("partials: the logits' rows must be contiguous")
    n_splits = triton.cdiv(v, split)
    processed = logits if logits.dtype == torch.float32 else torch.empty(r, v, dtype=torch.float32,
                                                                         device=logits.device)
    stats = torch.zeros(r, n_splits, 4, dtype=torch.float32, device=logits.device)
    index = torch.empty(r, n_splits, dtype=torch.int32, device=logits.device)
    partials_kernel[(r, n_splits)](logits, processed, temp, stats, index, v, positions, n_splits,
                                   logits.stride(0), processed.stride(0), float(cap or 1.0),
                                   SPLIT=split, SOFTCAP=bool(cap), BF16=bf16)
    return processed, stats, index


def reduce_partials(stats: torch.Tensor, index: torch.Tensor, bf16: bool = False) -> Reduced:
    """The per-split partials (R, splits) to per-position max, argmax, total, entropy and split masses."""
    m, s, q, sb = stats.unbind(-1)
    j = m.argmax(-1, keepdim=True)  # the first split holding the max: the first index of the max
    mx = m.gather(-1, j)
    scale = torch.exp(m - mx)
    mass = s * scale
    total = mass.sum(-1)
    entropy = torch.log(total) - (scale * (q + (m - mx) * s)).sum(-1) / total
    mx = mx[:, 0]
    soft_max, soft_total = mx, total
    if bf16:  # the bf16 softmax: every logit rounded to bf16 first, so the max too (rounding is monotone)
        soft_max = mx.to(torch.bfloat16).float()
        soft_total = (sb * torch.exp(m.to(torch.bfloat16).float() - soft_max[:, None])).sum(-1)
    return Reduced(mx, index.gather(-1, j)[:, 0].long(), total, entropy, mass, soft_max, soft_total)


def draw(processed: torch.Tensor, red: Reduced, u: torch.Tensor, split: int = SPLIT) -> torch.Tensor:
    """(R,) int64 tokens by inverse CDF from uniforms u (R,): `sampler.draw` without the probabilities."""
    r, v = processed.shape
    cum = red.mass.cumsum(-1)
    target = (u * cum[:, -1]).contiguous()  # as the reference's u * cdf[-1]
    j = torch.searchsorted(cum, target[:, None], right=True).clamp_(max=cum.shape[-1] - 1)
    start = torch.nn.functional.pad(cum[:, :-1], (1, 0)).gather(-1, j)[:, 0].contiguous()  # mass before split j
    tokens = torch.empty(r, dtype=torch.int64, device=processed.device)
    draw_kernel[(r,)](processed, j[:, 0].contiguous(), start, target, red.max.contiguous(), tokens, v,
                      processed.stride(0), SPLIT=split)
    return tokens


def logits_of(x: torch.Tensor, embed) -> torch.Tensor:
    """(R, H) @ embed.T -> (R, V) in x's dtype, the embedding decoded in registers."""
    return qmatmul(x, embed, precision="ieee")  # float32 models are the parity mode: exact products


def head_and_sample(x: torch.Tensor, embed, cap: float | None, state: sampler.State, scale: torch.Tensor,
                    split: int = SPLIT) -> sampler.State:
    """ops_cpu.head_and_sample on the cuda backend: x (B, C, H) final hidden states, embed the tied embedding
    (DevicePacked or a float tensor of x's dtype); returns the next state with its soft embedding."""
    b, c, h = x.shape
    logits = logits_of(x.reshape(b * c, h), embed)
    return sample_logits(logits, embed, cap, state, scale, x.dtype, split)


def sample_logits(logits: torch.Tensor, embed, cap: float | None, state: sampler.State, scale: torch.Tensor,
                  dtype: torch.dtype, split: int = SPLIT) -> sampler.State:
    """The head after its matmul: logits (B*C, V) in the model's `dtype` (float32 ones are overwritten by the
    processed logits) -> the next state, its soft embedding included."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the head runs float32 or bfloat16 models, not {dtype}")
    b, c = state.canvas.shape
    bf16 = dtype == torch.bfloat16
    processed, stats, index = partials(logits, sampler.temperature(state).contiguous(), c, cap, bf16, split)
    red = reduce_partials(stats, index, bf16)
    u = rng.uniform(state.seed, state.block, state.step + 1, rng.DRAW, c)  # keyed by the step being taken
    sampled = draw(processed, red, u.reshape(-1), split)
    nxt = sampler.settle(state, sampled.view(b, c), red.argmax.view(b, c), red.entropy.view(b, c),
                         processed.shape[-1])
    nxt.soft = self_cond.soft_embedding(processed, red.soft_max, red.soft_total, embed, scale,
                                        dtype).view(b, c, -1)
    return nxt


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations: what the launchers above compile on a GPU
# ----------------------------------------------------------------------------------------------------------------

def _aot():
    """The launches at the real shape: V = 262,144 and C = 256, so V, C, the splits and the row strides are
    multiples of 16 (as the JIT specializes them), like every torch allocation's address."""
    out = []
    ptrs = ("logits_ptr", "processed_ptr", "temp_ptr", "stats_ptr", "index_ptr")
    for dtype, bf16 in (("fp32", False), ("bf16", True)):
        sig = {"logits_ptr": f"*{dtype}", "processed_ptr": "*fp32", "temp_ptr": "*fp32", "stats_ptr": "*fp32",
               "index_ptr": "*i32", "V": "i32", "C": "i32", "n_splits": "i32", "stride_l": "i32",
               "stride_p": "i32", "cap": "fp32", "SPLIT": "constexpr", "SOFTCAP": "constexpr", "BF16": "constexpr"}
        div = ptrs + ("V", "C", "n_splits", "stride_l", "stride_p")
        out.append((partials_kernel, sig, {"SPLIT": SPLIT, "SOFTCAP": True, "BF16": bf16},
                    {"divisible_by_16": div}))
    sig = {"processed_ptr": "*fp32", "split_ptr": "*i64", "start_ptr": "*fp32", "target_ptr": "*fp32",
           "max_ptr": "*fp32", "out_ptr": "*i64", "V": "i32", "stride_p": "i32", "SPLIT": "constexpr"}
    div = ("processed_ptr", "split_ptr", "start_ptr", "target_ptr", "max_ptr", "out_ptr", "V", "stride_p")
    out.append((draw_kernel, sig, {"SPLIT": SPLIT}, {"divisible_by_16": div}))
    return out


AOT = _aot()
