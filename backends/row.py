"""What a new block needs from the loop, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Row:
    """A new block for one request: its cache slot, its knobs (a SamplerConfig: seed, schedule, bounds, step
    limit) and its pins (infilling: a token id or -1 per canvas position)."""

    slot: int
    cfg: Any
    block: int = 0
    fixed: list[int] | None = None
