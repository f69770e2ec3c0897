"""A static KV cache of `slots` rows, preallocated once: nothing grows, so a step keeps its shapes.

A sliding layer is a ring of `sliding_window - 1` positions per slot (the reference keeps exactly the last W-1
tokens): token p lives at p mod (W-1), and `pos` records which absolute position each entry holds (-1: empty).
A full layer holds `max_len` positions per slot, token p at index p. Keys are stored after RoPE, so entry order
does not matter to the bidirectional canvas; the causal encoder masks by `pos`. Lengths live on the host: the
engine knows them without reading the device.

Full layers are allocated empty, so memory is paged in only as context is used; an entry a batched view shows
past its row's length is zeroed first (masked attention weighs it 0, and 0 * NaN would still be NaN).
"""

from __future__ import annotations

import torch



class SlotCache:
    def __init__(self, specs, slots: int, max_len: int, sliding_window: int, dtype, device):
        self.slots, self.max_len, self.ring = slots, max_len, sliding_window - 1
        self.sliding = [s.sliding for s in specs]
        self.keys, self.values, self.pos = [], [], []
        for spec in specs:
            size = max(self.ring, 1) if spec.sliding else max_len  # W = 1 keeps nothing: one entry, never valid
            shape = (slots, spec.n_kv_heads, size, spec.head_dim)
            new = torch.zeros if spec.sliding else torch.empty
            self.keys.append(new(shape, dtype=dtype, device=device))
            self.values.append(new(shape, dtype=dtype, device=device))
            self.pos.append(torch.full((slots, size), -1, dtype=torch.int64, device=device) if spec.sliding else None)
        self.lengths = [0] * slots  # committed tokens per slot
        self.clean = [0] * slots  # full-layer entries written or zeroed per slot: finite values

    def reset(self, slot: int) -> None:
        """Forget a slot's tokens (full layers need nothing: entries past the length are never read)."""
        self.lengths[slot] = 0
        for pos in self.pos:
            if pos is not None:
                pos[slot] = -1

    def write(self, i: int, slot: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, start: int):
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
            if i == self.sliding.index(False):
                self.clean[slot] = max(self.clean[slot], start + n)

    def zero_past(self, slots: list[int], size: int) -> None:
        """Zero full-layer entries [clean, size) of rows that show them for the first time."""
        for s in slots:
            if self.clean[s] < size:
                for i, sliding in enumerate(self.sliding):
                    if not sliding:
                        self.keys[i][s, :, self.clean[s]:size] = 0
                        self.values[i][s, :, self.clean[s]:size] = 0
                self.clean[s] = size

    def view(self, i: int, slots: list[int]):
        """(keys, values, valid) for the rows `slots`: keys (B, kv, L, d); valid (B, L) bool, or None when every
        entry is valid. A full layer shows its first max-length entries, a sliding layer its whole ring."""
        lengths = [self.lengths[s] for s in slots]
        if self.sliding[i]:
            size = self.keys[i].shape[2]
            all_valid = min(lengths) >= size and self.ring > 0
        else:
            size = max(lengths)
            all_valid = min(lengths) == size
            self.zero_past(slots, size)
        first = slots[0]
        if slots == list(range(first, first + len(slots))):  # contiguous slots: a view, no copy
            keys = self.keys[i][first:first + len(slots), :, :size]
            values = self.values[i][first:first + len(slots), :, :size]
            pos = None if self.pos[i] is None else self.pos[i][first:first + len(slots)]
        else:
            idx = torch.tensor(slots, device=self.keys[i].device)
            keys, values = self.keys[i][idx, :, :size], self.values[i][idx, :, :size]
            pos = None if self.pos[i] is None else self.pos[i][idx]
        if all_valid:
            return keys, values, None
        if pos is not None:
            return keys, values, pos >= 0
        lens = torch.tensor(lengths, device=keys.device)
        return keys, values, torch.arange(size, device=keys.device)[None, :] < lens[:, None]

    def static_view(self, i: int, rows, size: int, lengths: torch.Tensor):
        """(keys, values, valid) of fixed shape for a CUDA graph: full layers show `size` entries (a bucket of
        view_size, zeroed past the written ones by zero_past beforehand) and mask by the device tensor
        `lengths` (B,); rows is a slice of consecutive slots or a device index tensor."""
        keys, values = self.keys[i], self.values[i]
        if not self.sliding[i]:
            keys, values = keys[:, :, :size], values[:, :, :size]
        pick = (lambda t: t[rows]) if isinstance(rows, slice) else (lambda t: t.index_select(0, rows))
        keys, values = pick(keys), pick(values)
        if self.sliding[i]:
            return keys, values, pick(self.pos[i]) >= 0
        return keys, values, torch.arange(size, device=keys.device)[None, :] < lengths[:, None]


VIEW_BUCKET = 1024  # full-layer entries a static view shows: a multiple of this, so a graph serves many lengths


def view_size(length: int, max_len: int) -> int:
    """The static view length for rows whose longest committed context is `length`."""
    return min(max(VIEW_BUCKET, -(-length // VIEW_BUCKET) * VIEW_BUCKET), max_len)
