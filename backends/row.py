"""What every backend shares with the loop: a new block's Row, and the room check of a slot cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dgrun.errors import DgrunError


@dataclass(slots=True)
class Row:
    """A new block for one request: its cache slot, its knobs (a SamplerConfig: seed, schedule, bounds, step
    limit) and its pins (infilling: a token id or -1 per canvas position)."""

    slot: int
    cfg: Any
    block: int = 0
    fixed: list[int] | None = None


def reserve(cache, slot: int, n: int) -> None:
    """One clear error before n more tokens overflow a slot (caches keep host `lengths` and `max_len`)."""
    if cache.lengths[slot] + n > cache.max_len:
        raise DgrunError(f"context full: {cache.lengths[slot]} + {n} tokens exceed the context limit of "
                         f"{cache.max_len} (-c/--ctx-size)")
