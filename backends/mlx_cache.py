"""The mlx backend's KV cache: backends/torch/cache.py's static slots, in MLX arrays.

A sliding layer is a ring of `sliding_window - 1` entries per slot (token p at p mod (W-1), `pos` holding its
absolute position, -1 when empty); a full layer holds `max_len` entries per slot, token p at index p. The
decoder sees a full layer's entries up to the batch's longest slot rounded up to `chunk`, with a validity mask,
so the compiled step retraces only every `chunk` tokens of context.
"""

from __future__ import annotations

import math

import mlx.core as mx



class MlxSlotCache:
    def __init__(self, specs, slots: int, max_len: int, sliding_window: int, dtype, chunk: int):
        self.slots, self.max_len, self.ring, self.chunk = slots, max_len, sliding_window - 1, chunk
        self.sliding = [s.sliding for s in specs]
        self.keys, self.values, self.pos = [], [], []
        for spec in specs:
            size = max(self.ring, 1) if spec.sliding else max_len
            shape = (slots, spec.n_kv_heads, size, spec.head_dim)
            self.keys.append(mx.zeros(shape, dtype=dtype))
            self.values.append(mx.zeros(shape, dtype=dtype))
            self.pos.append(mx.full((slots, size), -1, dtype=mx.int32) if spec.sliding else None)
        self.lengths = [0] * slots

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0
        for pos in self.pos:
            if pos is not None:
                pos[slot] = -1

    def write(self, i: int, slot: int, k: mx.array, v: mx.array, positions: mx.array, start: int) -> None:
        """New tokens' K/V (1, kv_heads, n, head_dim) at absolute positions start..start+n-1."""
        n = k.shape[2]
        if self.sliding[i]:
            if self.ring == 0:
                return
            keep = min(n, self.ring)
            idx = positions[n - keep:] % self.ring
            self.keys[i][slot, :, idx] = k[0, :, n - keep:]
            self.values[i][slot, :, idx] = v[0, :, n - keep:]
            self.pos[i][slot, idx] = positions[n - keep:]
        else:
            self.keys[i][slot, :, start:start + n] = k[0]
            self.values[i][slot, :, start:start + n] = v[0]

    def view(self, i: int, slots: list[int]):
        """(keys, values, valid) for the rows `slots`: keys (B, kv, L, d), valid (B, L) bool."""
        idx = mx.array(slots, dtype=mx.int32)
        if self.sliding[i]:
            return self.keys[i][idx], self.values[i][idx], self.pos[i][idx] >= 0
        longest = max(self.lengths[s] for s in slots)
        size = min(self.max_len, max(1, math.ceil(longest / self.chunk)) * self.chunk)
        lengths = mx.array([self.lengths[s] for s in slots], dtype=mx.int32)
        valid = mx.arange(size, dtype=mx.int32)[None, :] < lengths[:, None]
        return self.keys[i][idx, :, :size], self.values[i][idx, :, :size], valid
