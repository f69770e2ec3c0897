"""Counter-based random draws: a hash of (seed, block, step, stream, position), on the device.

A row's draws depend only on its own request, never on its batch-mates or on how many steps ran before in
the process, and the hash is plain integer maths a CUDA graph can hold. The same 32-bit hash is written in
MLX (backends/mlx_sampler.py) and gives the same bits. Tensors hold uint32 values in int64; products are
split in 16-bit halves so no int64 ever overflows.
"""

from __future__ import annotations

import torch

CANVAS, DRAW, NOISE = 0, 1, 2  # streams: the block's first canvas, the categorical draw, the renoise tokens
M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2**32 for a < 2**32 held in int64."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer: a bijection on 32-bit values with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """Any Python int -> its low 64 bits as two 32-bit words."""
    seed &= (1 << 64) - 1
    return seed & M32, seed >> 32


def bits(seed: torch.Tensor, block: torch.Tensor, step: torch.Tensor, stream: int, width: int) -> torch.Tensor:
    """(B, width) 32-bit hashes. seed (B, 2) int64 words; block, step (B,) int64."""
    h = torch.full_like(block, GOLDEN)
    for word in (seed[:, 0], seed[:, 1], block, step, torch.full_like(block, stream)):
        h = fmix32(h ^ (word & M32))
    positions = torch.arange(width, device=block.device, dtype=torch.int64)
    return fmix32(h[:, None] ^ positions[None, :])


def uniform(seed, block, step, stream: int, width: int) -> torch.Tensor:
    """(B, width) float32 in [0, 1) with 24 random bits each."""
    return (bits(seed, block, step, stream, width) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def tokens(seed, block, step, stream: int, width: int, vocab: int) -> torch.Tensor:
    """(B, width) uniform token ids in [0, vocab)."""
    return bits(seed, block, step, stream, width) % vocab
