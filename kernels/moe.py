"""Fused mixture-of-experts over packed expert stacks
=====================================================

DiffusionGemma's MoE block sends every token to ``top_k`` of ``E`` experts. Each expert is a GELU-tanh gated
MLP whose weights are two stacks: ``ffn_gate_up_exps.weight`` (E, 2I, H), the gate rows then the up rows, and
``ffn_down_exps.weight`` (E, H, I). On a GPU they stay packed as the GGUF file stores them (``DevicePacked``,
any of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) or are plain F16/BF16/F32 tensors, and each kernel
decodes its weight tiles in registers with ``kernels.qmatmul.dot_packed``: the packed matmul's K loop, which
decodes a type's layout a chunk at a time (one scale load per row and piece, not per element) and feeds
``tl.dot``, here called with gathered token rows and one expert's weight rows. The exact reference is
``backends/torch/ops_cpu.py: moe``; ``twin`` runs it on the dequantized stacks.

A step of 256 canvas tokens with top-8 routing touches all 128 experts, so the MoE reads every expert's
weights once per layer: the kernels are weight-streaming bound, and their job is to read (and decode) each
expert's weights as few times as possible while never reading a count back to the host (a CUDA graph
replays the step with whatever routing the router picks).

The plan follows vLLM's ``fused_moe``:

1. **Route** (plain torch, the router is a small float matrix): rms_norm, scale, logits over E experts,
   float32 softmax, top-k, renormalize, times the per-expert scale. Exactly the reference's ops.
2. **Align** (``align``): the T*k (token, route) *slots* ``s = t*k + j`` are sorted by expert into a buffer
   of static length, each expert's run padded up to a multiple of ``BLOCK_M`` with the sentinel ``T*k``.
   Then every ``BLOCK_M`` block of the buffer belongs to one expert (``expert_of_block``), and a GEMM tile
   over a block is a GEMM against one expert's weights. How many blocks are real (``num_padded``) lives in a
   one-element device tensor: the grid is sized for the worst case and programs past the end return at once.
   The worst case: each non-empty expert pads at most ``BLOCK_M - 1`` slots, and at most ``min(E, T*k)``
   experts are non-empty, so ``T*k + min(E, T*k) * (BLOCK_M - 1)`` entries always suffice.
   ``align_kernel`` does it in one program, so one launch per layer (the same in torch ops, ``align_torch``,
   is some 25 small kernels, ~30 layers deep in a CUDA graph): a ``tl.histogram`` of the expert ids, the
   padded run lengths' ``tl.cumsum``, sentinels everywhere, then each slot placed at its expert's cursor with
   an atomic add.
3. **gate_up** (``moe_gate_up_kernel``): grid (blocks, I / BLOCK_N). A program gathers the x rows of its
   block's tokens (sentinel rows masked to zero) and runs one K loop over its expert's gate rows ``n`` and up
   rows ``I + n`` together: accumulator column 2c is gate row n, column 2c + 1 the up row, so each x piece is
   loaded once for both and one ``tl.dot`` of width 2 * BLOCK_N covers them. The epilogue splits the pairs
   (``tl.reshape`` + ``tl.split``) and writes ``gelu_tanh(gate) * up`` to a (T*k, I) intermediate at each
   slot's row.
4. **down** (``moe_down_kernel``): the same grid over (blocks, H / BLOCK_N); intermediate rows @ down[e].T,
   times the slot's routing weight in the epilogue, written to a (T*k, H) buffer at the slot's row.
5. **Scatter-add** as a plain ``out.view(T, k, H).sum(1)``. Every slot has its own row, so no two programs
   write the same address: no atomics, no zero-fill, and each token's k routes are summed in the fixed route
   order j = 0..k-1 whatever the batch holds. The result is deterministic run to run (vLLM's atomic add makes
   the order of a token's k additions a race), and a token's output does not depend on which tokens share its
   blocks: each output row of a tile is its own dot product over K in a fixed order (for a given BLOCK_M; a
   batch size that switches BLOCK_M may change the MMA shape and so the rounding). The cost is one (T*k, H)
   write and read, small next to the weights (11.5 MB against about 460 MB of Q4_K_M experts per layer for a
   256-token step of the 26B-A4B shape).

Grid order. ``program_id(0)`` runs over the blocks and is the fastest-varying in launch order, so the
programs that read the same expert's weight tile (its consecutive blocks, same N tile) run side by side and
share it through L2; the x rows are re-read once per N tile, from L2 (only the real rows: padded rows are
masked loads that move no bytes).

Block sizes (chosen from the compiler's register report, not from timings: this project has not run these
kernels on a GPU; ``CONFIGS``). With ``num_warps = 4``:

* gate_up: ``BLOCK_N = 32`` columns of each half (a 64-wide accumulator). 64 of each spills for Q6_K on sm_90
  at 4 warps and needs 8 warps at ~250 registers, one program per SM.
* down: ``BLOCK_N = 64``. 128 reaches 250+ registers for the K-quants.
* ``BLOCK_M`` (``block_m``) from the mean slots per expert T*k / E: 16 when it is at most 8 (the tokens spread
  thin: a 16-row tile pads least, and few experts exceed 16 slots), else 64 (a 256-token step at top-8 over
  128 experts gives 16 per expert: one 64-row block per expert decodes its weights once, where 16-row blocks
  would decode most experts twice; the padded MMA rows cost far less than the decode, and padded rows are
  masked loads that move no bytes).

For bf16 x that is 56 to 90 registers on sm_90 but Q6_K's gate_up (232; about 250 on the other targets), and
no spills on any target in AOT. K (H for gate_up, I for down) must be a whole number of ``dot_packed`` chunks
(32, 64 for Q4_K/Q5_K, 128 for Q6_K): DiffusionGemma 26B-A4B's H = 2816 and I = 704 are; ragged N tiles are
clamped and masked.

Rounding follows the reference in the activations' dtype: gate and up are rounded to x's dtype before the
epilogue, ``gelu(gate)`` and the product too, the down output before the float32 routing weight, and the
weighted rows before the sum. For float32 x every rounding is a no-op and the kernels agree with the
reference to float32 summation order. Float32 x runs ``tl.dot`` at ``FP32_PRECISION`` ("tf32x3" as qmatmul:
float32-grade products from three tf32 ones; "ieee" is exact and slow; the interpreter is exact either way);
bf16 / f16 x run it on bf16 / f16 operands with the decoded weights rounded to that dtype, as a bf16 reference
rounds them.

Every launcher is CUDA-graph capturable: static shapes in and out, no host read, allocations sized by T, k, E
and H only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dgrun.backends.torch.ops_cpu import linear, rms_norm
from dgrun.kernels.dequant import check_aligned, dequantize, qtype_id
from dgrun.kernels.qmatmul import CHUNK, dot_packed
from dgrun.packed import DevicePacked

SMALL_M, LARGE_M = 16, 64
# Per BLOCK_M: BLOCK_N of gate_up (columns of each half; its accumulator is twice as wide), BLOCK_N of down, and
# num_warps (module docstring).
CONFIGS = {SMALL_M: dict(gate_up_n=32, down_n=64, num_warps=4),
           LARGE_M: dict(gate_up_n=32, down_n=64, num_warps=4)}
FP32_PRECISION = "tf32x3"  # tl.dot's input precision for float32 x (qmatmul's default); "ieee" is exact


def block_m(slots: int, num_experts: int) -> int:
    """BLOCK_M for T*k slots over E experts (module docstring): 16 while slots / E <= 8, else 64."""
    return SMALL_M if slots <= 8 * num_experts else LARGE_M


# ----------------------------------------------------------------------------------------------------------
# Align: slots sorted by expert, each expert's run padded to a multiple of BLOCK_M
# ----------------------------------------------------------------------------------------------------------

def padded_length(slots: int, num_experts: int, block: int) -> int:
    """Static length of the sorted buffer: the worst-case padding, rounded up to whole blocks."""
    worst = slots + min(num_experts, slots) * (block - 1)
    return triton.cdiv(worst, block) * block


@triton.jit
def align_kernel(
        # pointers: topk_ids (T*k,) int64 in; sorted_ids (length,), expert_of_block (n_blocks,) and num_padded
        # (1,) int32 out; cursor (E,) int32 scratch
        topk_ids_ptr, sorted_ids_ptr, expert_ptr, num_padded_ptr, cursor_ptr,
        n_slots, length, num_experts,
        E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, BLOCKS: tl.constexpr):
    """The whole alignment in one program (one launch per MoE layer): count, pad, place. Launch with grid (1,)."""
    experts = tl.arange(0, E_POW2)
    real = experts < num_experts
    # 1. slots per expert
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for s0 in range(0, n_slots, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < n_slots, other=0).to(tl.int32)
        counts += tl.histogram(ids, E_POW2, mask=offs < n_slots)
    # 2. each expert's run padded to whole blocks, and where it starts
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    tl.store(cursor_ptr + experts, ends - padded, mask=real)
    # 3. the expert of each block: how many runs end at or before the block's first entry
    for b0 in range(0, length // BLOCK_M, BLOCKS):
        blocks = b0 + tl.arange(0, BLOCKS)
        before = (ends[None, :] <= blocks[:, None] * BLOCK_M) & real[None, :]
        expert = tl.minimum(tl.sum(before.to(tl.int32), 1), num_experts - 1)
        tl.store(expert_ptr + blocks, expert, mask=blocks < length // BLOCK_M)
    # 4. sentinels everywhere, then (after the barrier) each slot at its expert's cursor
    for p0 in range(0, length, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + offs, tl.full((CHUNK,), 0, tl.int32) + n_slots, mask=offs < length)
    tl.debug_barrier()
    for s0 in range(0, n_slots, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        mask = offs < n_slots
        ids = tl.load(topk_ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        pos = tl.atomic_add(cursor_ptr + ids, 1, mask=mask, sem="relaxed")
        tl.store(sorted_ids_ptr + pos, offs, mask=mask)


ALIGN_CHUNK = 1024  # slots per step of the align kernel's loops


def _align_blocks(e_pow2: int) -> int:
    """Blocks per step of the align kernel's expert-of-block loop: a (blocks, E) comparison of 8192 elements."""
    return max(1, 8192 // e_pow2)


def align(topk_ids: torch.Tensor, num_experts: int, block: int):
    """topk_ids (T, k) int -> (sorted_ids int32 (L,), expert_of_block int32 (L / block,), num_padded int32 (1,)).

    sorted_ids lists the slots s = t*k + j expert by expert, each expert's run padded to a multiple of `block`
    with the sentinel T*k; L = padded_length(T*k, E, block). expert_of_block[i] is the expert of entries
    [i*block, (i+1)*block); blocks from num_padded on are unused (their expert is clamped to E - 1, a valid
    index). One Triton program, one launch. Within an expert's run the slots come in the order the atomic
    cursor hands out places, which may vary run to run: harmless, since every slot has its own output row
    and a row's result does not depend on its place in the tile. `align_torch` is the plain-torch twin (slot
    order within a run)."""
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    n, dev = ids.numel(), ids.device
    length = padded_length(n, num_experts, block)
    sorted_ids = torch.empty(length, dtype=torch.int32, device=dev)
    expert_of_block = torch.empty(length // block, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    e_pow2 = triton.next_power_of_2(num_experts)
    align_kernel[(1,)](ids, sorted_ids, expert_of_block, num_padded, cursor, n, length, num_experts,
                       E_POW2=e_pow2, BLOCK_M=block, CHUNK=ALIGN_CHUNK, BLOCKS=_align_blocks(e_pow2))
    return sorted_ids, expert_of_block, num_padded


def align_torch(topk_ids: torch.Tensor, num_experts: int, block: int):
    """`align` in plain torch device ops (a stable sort, searchsorted, cumsum, one scatter; no host read), with
    each expert's slots in slot order. About 25 small kernels where `align` is one."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n, dev = flat.numel(), flat.device
    sorted_e, order = torch.sort(flat, stable=True)
    first = torch.searchsorted(sorted_e, torch.arange(num_experts + 1, device=dev))  # first sorted slot per expert
    counts = first[1:] - first[:-1]
    padded = (counts + block - 1) // block * block
    ends = padded.cumsum(0)
    starts = ends - padded
    dest = starts[sorted_e] + torch.arange(n, device=dev) - first[:-1][sorted_e]
    length = padded_length(n, num_experts, block)
    sorted_ids = torch.full((length,), n, dtype=torch.int32, device=dev).scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, length, block, device=dev)
    expert_of_block = torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_of_block.to(torch.int32), ends[-1:].to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# The two kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _gelu_tanh(x):
    """0.5 x (1 + tanh(y)) written as x * sigmoid(2y): no cancellation for large negative x."""
    y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * y))


@triton.jit
def _block(sorted_ids_ptr, expert_ptr, w_ptr, w_expert_stride, n_slots, pid_m, BLOCK_M: tl.constexpr):
    """A block's slots (int32), the mask of its real (non-sentinel) slots, and its expert's weights."""
    slot = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)  # 64-bit: a whole stack may pass 2**31 bytes
    return slot, slot < n_slots, w_ptr + expert * w_expert_stride


@triton.jit
def moe_gate_up_kernel(
        # pointers
        x_ptr, w_ptr, act_ptr, sorted_ids_ptr, expert_ptr, num_padded_ptr,
        # sizes
        n_slots, K, I,
        # strides: x rows (elements), weight rows (bytes, or elements for float stacks), one expert (same unit)
        stride_x, w_row_stride, w_expert_stride,
        TOP_K: tl.constexpr, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """act[s, n] = gelu_tanh(x[t] . gate[e, n]) * (x[t] . up[e, n]) for the block's slots s = t*k + j of expert e,
    n in this program's BLOCK_N columns."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot, m_mask, w_e = _block(sorted_ids_ptr, expert_ptr, w_ptr, w_expert_stride, n_slots, pid_m, BLOCK_M)
    x_rows = (slot // TOP_K) * stride_x  # token t = s // k; sentinel rows are masked

    # One pass over K for both halves: accumulator column 2c is gate row n, column 2c + 1 is up row I + n.
    c = tl.arange(0, 2 * BLOCK_N)
    n = tl.minimum(pid_n * BLOCK_N + c // 2, I - 1)  # clamped: columns past I decode a real row, never stored
    w_rows = (n + (c % 2) * I) * w_row_stride
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc = dot_packed(acc, x_ptr, x_rows[:, None], m_mask[:, None], w_e, w_rows[:, None], K, QTYPE, DOT_PRECISION)
    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))

    dt = act_ptr.dtype.element_ty  # the reference's roundings in x's dtype (no-ops for float32)
    gate = gate.to(dt).to(tl.float32)
    up = up.to(dt).to(tl.float32)
    h = _gelu_tanh(gate).to(dt).to(tl.float32) * up
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = m_mask[:, None] & (offs_n[None, :] < I)
    tl.store(act_ptr + slot.to(tl.int64)[:, None] * I + offs_n[None, :], h.to(dt), mask=out_mask)


@triton.jit
def moe_down_kernel(
        # pointers
        act_ptr, w_ptr, out_ptr, route_w_ptr, sorted_ids_ptr, expert_ptr, num_padded_ptr,
        # sizes: K = I (the intermediate width), N = H
        n_slots, K, N,
        # strides: weight rows (bytes, or elements for float stacks), one expert (same unit)
        w_row_stride, w_expert_stride,
        QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[s, n] = (act[s] . down[e, n]) * route_w[s] for the block's slots s of expert e."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot, m_mask, w_e = _block(sorted_ids_ptr, expert_ptr, w_ptr, w_expert_stride, n_slots, pid_m, BLOCK_M)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = tl.minimum(offs_n, N - 1) * w_row_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = dot_packed(acc, act_ptr, (slot * K)[:, None], m_mask[:, None], w_e, w_rows[:, None], K, QTYPE,
                     DOT_PRECISION)

    dt = out_ptr.dtype.element_ty
    route_w = tl.load(route_w_ptr + slot, mask=m_mask, other=0.0)  # float32, as the reference's weights
    y = acc.to(dt).to(tl.float32) * route_w[:, None]
    out_mask = m_mask[:, None] & (offs_n[None, :] < N)
    tl.store(out_ptr + slot.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(dt), mask=out_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _stack(w) -> tuple[torch.Tensor, int, int, int]:
    """An expert stack (E, N, K) -> (tensor the kernel reads, QTYPE, row stride, expert stride); strides in
    bytes for packed stacks, elements for float ones."""
    qtype = qtype_id(w)
    data = w.data if isinstance(w, DevicePacked) else w
    if len(w.shape) != 3 or w.shape[-1] % CHUNK[qtype] or data.stride(-1) != 1:
        raise ValueError(f"moe: expert stacks are (E, N, K), rows contiguous, K a multiple of {CHUNK[qtype]}; "
                         f"got {tuple(w.shape)}")
    check_aligned(w, "moe")  # dot_packed reads float16 scales as 2-byte loads; every block size is even
    return data, qtype, data.stride(1), data.stride(0)


def route(x_route: torch.Tensor, w: dict, b: str, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The router, op for op as ops_cpu.moe: (T, H) -> float32 weights (T, k) and expert ids (T, k)."""
    h = rms_norm(x_route, None, args.rms_norm_eps) * w[b + "ffn_gate_inp.scale"] * (args.hidden_size**-0.5)
    probs = torch.softmax(linear(h, w[b + "ffn_gate_inp.weight"]), dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, k=args.top_k_experts, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    return top_w * w[b + "ffn_down_exps.scale"][top_i], top_i


def experts(x: torch.Tensor, gate_up, down, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """x (T, H) through its top-k experts: sum_j top_w[t, j] * down[e](gelu(gate[e] x) * up[e] x), e = top_i[t, j].
    gate_up (E, 2I, H) and down (E, H, I): DevicePacked or float tensors. Returns (T, H) in x's dtype."""
    x = x.contiguous()
    (T, H), k = x.shape, top_i.shape[1]
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    slots = T * k
    if slots * max(H, I) >= 2**31:  # row offsets of x and the intermediate are int32 in the kernels
        raise ValueError(f"moe: {T} tokens x top-{k} is too many for one call; split the batch")
    bm = block_m(slots, E)
    cfg = CONFIGS[bm]
    precision = FP32_PRECISION if x.dtype == torch.float32 else "ieee"  # ignored for 16-bit x
    sorted_ids, expert_of_block, num_padded = align(top_i, E, bm)
    grid_m = expert_of_block.numel()

    gu, gu_type, gu_rs, gu_es = _stack(gate_up)
    act = torch.empty(slots, I, dtype=x.dtype, device=x.device)
    moe_gate_up_kernel[(grid_m, triton.cdiv(I, cfg["gate_up_n"]))](
        x, gu, act, sorted_ids, expert_of_block, num_padded, slots, H, I, x.stride(0), gu_rs, gu_es,
        TOP_K=k, QTYPE=gu_type, BLOCK_M=bm, BLOCK_N=cfg["gate_up_n"], DOT_PRECISION=precision,
        num_warps=cfg["num_warps"])

    dn, dn_type, dn_rs, dn_es = _stack(down)
    out = torch.empty(slots, H, dtype=x.dtype, device=x.device)
    moe_down_kernel[(grid_m, triton.cdiv(H, cfg["down_n"]))](
        act, dn, out, top_w.float().contiguous(), sorted_ids, expert_of_block, num_padded, slots, I, H,
        dn_rs, dn_es, QTYPE=dn_type, BLOCK_M=bm, BLOCK_N=cfg["down_n"], DOT_PRECISION=precision,
        num_warps=cfg["num_warps"])
    return out.view(T, k, H).sum(1)  # the deterministic scatter-add (module docstring, step 5)


def moe(x_route: torch.Tensor, x: torch.Tensor, w: dict, b: str, args) -> torch.Tensor:
    """ops_cpu.moe's signature and semantics on packed (or float) expert stacks: route, align, two kernels."""
    top_w, top_i = route(x_route, w, b, args)
    return experts(x, w[b + "ffn_gate_up_exps.weight"], w[b + "ffn_down_exps.weight"], top_w, top_i)


def twin(x_route: torch.Tensor, x: torch.Tensor, w: dict, b: str, args) -> torch.Tensor:
    """The plain-torch twin: ops_cpu.moe on the dequantized stacks (float32, or the stack's float dtype)."""
    from dgrun.backends.torch.ops_cpu import moe as reference

    w = dict(w)
    for name in ("ffn_gate_up_exps.weight", "ffn_down_exps.weight"):
        v = w[b + name]
        w[b + name] = (dequantize(v) if isinstance(v, DevicePacked) else v).to(x.dtype)
    return reference(x_route, x, w, b, args)


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time configurations
# ----------------------------------------------------------------------------------------------------------

_QTYPE = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
# Bytes per row of each expert stack at DiffusionGemma 26B-A4B's widths (gate_up rows H = 2816, down rows
# I = 704), to tell the compiler which row strides are multiples of 16 as the launch will; down has no K-quant
# there (704 is not a multiple of 256), so those entries compile for an unaligned stride.
_ROW_BYTES = {"gate_up": {"Q8_0": 2992, "Q4_0": 1584, "Q4_1": 1760, "Q5_0": 1936, "Q5_1": 2112, "Q4_K": 1584,
                          "Q5_K": 1936, "Q6_K": 2310, "BF16": 2816},
              "down": {"Q8_0": 748, "Q4_0": 396, "Q4_1": 440, "Q5_0": 484, "Q5_1": 528, "Q4_K": 1, "Q5_K": 1,
                       "Q6_K": 1, "BF16": 704}}


def _options(kernel: str, qtype: str, bm: int, ints: tuple[str, ...]) -> dict:
    aligned = ("w_row_stride",) if _ROW_BYTES[kernel][qtype] % 16 == 0 else ()
    return {"num_warps": CONFIGS[bm]["num_warps"], "divisible_by_16": _PTRS[kernel] + ints + aligned}


_PTRS = {"gate_up": ("x_ptr", "w_ptr", "act_ptr", "sorted_ids_ptr", "expert_ptr", "num_padded_ptr"),
         "down": ("act_ptr", "w_ptr", "out_ptr", "route_w_ptr", "sorted_ids_ptr", "expert_ptr", "num_padded_ptr")}


def _gate_up_entry(qtype: str, x: str, bm: int, top_k: int = 8):
    sig = {"x_ptr": x, "w_ptr": "*bf16" if qtype == "BF16" else "*u8", "act_ptr": x, "sorted_ids_ptr": "*i32",
           "expert_ptr": "*i32", "num_padded_ptr": "*i32", "n_slots": "i32", "K": "i32", "I": "i32",
           "stride_x": "i32", "w_row_stride": "i32", "w_expert_stride": "i32", "TOP_K": "constexpr",
           "QTYPE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "DOT_PRECISION": "constexpr"}
    const = dict(TOP_K=top_k, QTYPE=_QTYPE[qtype], BLOCK_M=bm, BLOCK_N=CONFIGS[bm]["gate_up_n"],
                 DOT_PRECISION=FP32_PRECISION if x == "*fp32" else "ieee")
    ints = ("n_slots", "K", "I", "stride_x", "w_expert_stride")
    return moe_gate_up_kernel, sig, const, _options("gate_up", qtype, bm, ints)


def _down_entry(qtype: str, x: str, bm: int):
    sig = {"act_ptr": x, "w_ptr": "*bf16" if qtype == "BF16" else "*u8", "out_ptr": x, "route_w_ptr": "*fp32",
           "sorted_ids_ptr": "*i32", "expert_ptr": "*i32", "num_padded_ptr": "*i32", "n_slots": "i32", "K": "i32",
           "N": "i32", "w_row_stride": "i32", "w_expert_stride": "i32", "QTYPE": "constexpr",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "DOT_PRECISION": "constexpr"}
    const = dict(QTYPE=_QTYPE[qtype], BLOCK_M=bm, BLOCK_N=CONFIGS[bm]["down_n"],
                 DOT_PRECISION=FP32_PRECISION if x == "*fp32" else "ieee")
    return moe_down_kernel, sig, const, _options("down", qtype, bm, ("n_slots", "K", "N", "w_expert_stride"))


def _align_entry(bm: int, num_experts: int = 128):
    sig = {"topk_ids_ptr": "*i64", "sorted_ids_ptr": "*i32", "expert_ptr": "*i32", "num_padded_ptr": "*i32",
           "cursor_ptr": "*i32", "n_slots": "i32", "length": "i32", "num_experts": "i32", "E_POW2": "constexpr",
           "BLOCK_M": "constexpr", "CHUNK": "constexpr", "BLOCKS": "constexpr"}
    e_pow2 = triton.next_power_of_2(num_experts)
    const = dict(E_POW2=e_pow2, BLOCK_M=bm, CHUNK=ALIGN_CHUNK, BLOCKS=_align_blocks(e_pow2))
    return align_kernel, sig, const, {"num_warps": 4, "divisible_by_16": tuple(a for a in sig if a[-4:] == "_ptr")}


def aot_entries(qtypes=tuple(_QTYPE), xs=("*bf16", "*fp32"), bms=(LARGE_M, SMALL_M)) -> list:
    """(jit_fn, signature, constexprs, options) for both kernels over weight types, x dtypes and BLOCK_M."""
    return [entry(q, x, bm) for entry in (_gate_up_entry, _down_entry) for q in qtypes for x in xs for bm in bms]


def AOT() -> list:
    """What the backend launches (top_k = 8, E = 128: DiffusionGemma's), trimmed to keep the compile test short
    (the kernels' structure is what could fail here; each type's decoding is dot_packed's, compiled by qmatmul
    too): the align kernel at both BLOCK_M; at the main configuration (bf16 x, BLOCK_M = 64: a 256-token step)
    gate_up on the types files hold there (Q4_K, Q5_K, Q6_K, Q8_0, BF16: dgrun's Q4_K_M, Q5_K_M, Q6_K, Q8_0 and
    BF16 targets) and down on its fallbacks for 704-wide rows (Q5_0, Q5_1, Q8_0, BF16), Q4_0 and Q4_1 once each;
    BLOCK_M = 16 and float32 x for the Q4_K_M pair. `aot_entries()` is the full product (72 entries)."""
    gate_up = [_gate_up_entry(q, "*bf16", LARGE_M) for q in ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16", "Q4_0")]
    down = [_down_entry(q, "*bf16", LARGE_M) for q in ("Q5_0", "Q5_1", "Q8_0", "BF16", "Q4_1")]
    others = [entry for x, bm in (("*bf16", SMALL_M), ("*fp32", LARGE_M))
              for entry in (_gate_up_entry("Q4_K", x, bm), _down_entry("Q5_0", x, bm))]
    return [_align_entry(bm) for bm in (SMALL_M, LARGE_M)] + gate_up + down + others
