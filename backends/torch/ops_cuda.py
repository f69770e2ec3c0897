"""The cuda backend's ops: the Triton kernels of kernels/ over GGUF-packed weights, torch where torch is fast.

Each op has the signature of its exact reference in ops_cpu.py and is tested against it on the dequantized
weights. A weight is a `DevicePacked` (a GGUF block type, decoded in registers) or a float tensor (F32, F16, BF16,
and HF checkpoints). Nothing here reads the device back or allocates by data, so a denoising step can be captured
in a CUDA graph (graphs.py).

| op | packed weight | float weight |
|---|---|---|
| embed | kernels.dequant.rows (the ids' rows only) | torch embedding |
| linear | kernels.qmatmul | torch matmul (cuBLAS) |
| moe | kernels.moe (device-side align, fused gate_up, down) | the same kernels |
| attention | torch SDPA (flash / memory-efficient) | |
| head_and_sample | kernels.head_sampler (lm_head, split-vocabulary sampler) + kernels.self_cond | the same kernels |
"""

from __future__ import annotations

import torch

from dgrun.backends.torch import ops_cpu
from dgrun.kernels import dequant, head_sampler, moe as moe_kernels, qmatmul
from dgrun.packed import DevicePacked

SOFT_CHUNK = 16384  # vocabulary rows decoded at a time by soft_embedding (denoise's path, not the step's)


def embed(ids: torch.Tensor, w, dtype) -> torch.Tensor:
    if isinstance(w, DevicePacked):
        return dequant.rows(w, ids.reshape(-1)).view(*ids.shape, -1).to(dtype)
    return ops_cpu.embed(ids, w, dtype)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    return qmatmul.qmatmul(x, w) if isinstance(w, DevicePacked) else x @ w.T


def soft_embedding(probs: torch.Tensor, w, scale: torch.Tensor) -> torch.Tensor:
    """probs (B, C, V) @ embedding: for `Backend.denoise` (tests, scripts); the step fuses it (kernels.self_cond).
    A packed embedding is decoded SOFT_CHUNK rows at a time, never whole."""
    if not isinstance(w, DevicePacked):
        return ops_cpu.soft_embedding(probs, w, scale)
    out = torch.zeros(probs.shape[:-1] + (w.shape[-1],), dtype=torch.float32, device=probs.device)
    for start in range(0, w.shape[0], SOFT_CHUNK):
        ids = torch.arange(start, min(start + SOFT_CHUNK, w.shape[0]), device=probs.device)
        out += probs[..., start:start + ids.numel()].float() @ dequant.rows(w, ids)
    return out.to(probs.dtype) * scale


OPS = {"embed": embed, "linear": linear, "attention": ops_cpu.attention, "moe": moe_kernels.moe,
       "soft_embedding": soft_embedding, "head_and_sample": head_sampler.head_and_sample}
