"""The mlx backend's KV cache: fixed-size slots, so the compiled denoising step keeps its input shapes.

A sliding layer is a ring of `sliding_window - 1` slots: the reference keeps exactly the last W-1 tokens,
and token p lives in slot p mod (W-1). A full layer has slots for every token, grown a chunk at a time (the
compiled step retraces only then). Each slot records its absolute position, -1 when empty, which is all the
attention masks need; keys are stored after RoPE, so slot order does not matter to attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class MlxCache:
    keys: list = field(default_factory=list)  # per layer (1, kv_heads, slots, head_dim)
    values: list = field(default_factory=list)
    pos: list = field(default_factory=list)  # per layer (slots,) int32 absolute positions, -1 = empty
    sliding: list = field(default_factory=list)  # per layer: a ring of `ring` slots
    ring: int = 1  # sliding_window - 1
    chunk: int = 1
    length: int = 0  # committed tokens

    @classmethod
    def empty(cls, specs, sliding_window: int, chunk: int, dtype) -> "MlxCache":
        cache = cls(sliding=[s.sliding for s in specs], ring=sliding_window - 1, chunk=chunk)
        for spec in specs:
            slots = max(cache.ring, 1) if spec.sliding else chunk  # W = 1 keeps nothing: one slot, never written
            shape = (1, spec.n_kv_heads, slots, spec.head_dim)
            cache.keys.append(mx.zeros(shape, dtype=dtype))
            cache.values.append(mx.zeros(shape, dtype=dtype))
            cache.pos.append(mx.full((slots,), -1, dtype=mx.int32))
        return cache

    def reserve(self, length: int) -> None:
        """Grow the full layers' slots to hold `length` tokens, a chunk at a time."""
        for i, sliding in enumerate(self.sliding):
            have = self.pos[i].shape[0]
            if sliding or have >= length:
                continue
            extra = math.ceil((length - have) / self.chunk) * self.chunk
            k = self.keys[i]
            pad = mx.zeros((1, k.shape[1], extra, k.shape[3]), dtype=k.dtype)
            self.keys[i] = mx.concatenate([k, pad], axis=2)
            self.values[i] = mx.concatenate([self.values[i], pad], axis=2)
            self.pos[i] = mx.concatenate([self.pos[i], mx.full((extra,), -1, dtype=mx.int32)])

    def write(self, i: int, k: mx.array, v: mx.array, positions: mx.array) -> None:
        """Store new tokens' K/V (1, kv_heads, n, head_dim) at absolute `positions` (n,), from `length` on."""
        n = positions.shape[0]
        if self.sliding[i]:  # the last W-1 tokens, each in slot position mod (W-1)
            if self.ring == 0:
                return
            keep = min(n, self.ring)
            k, v, positions = k[:, :, n - keep:], v[:, :, n - keep:], positions[n - keep:]
            slots = positions % self.ring
        else:
            slots = mx.arange(self.length, self.length + n, dtype=mx.int32)
        self.keys[i][:, :, slots] = k
        self.values[i][:, :, slots] = v
        self.pos[i][slots] = positions
