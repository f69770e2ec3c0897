"""One request of the block-diffusion loop, written once for every backend.

prefill -> for each block: uniform-random canvas -> denoising steps -> commit the argmax canvas.
A `Request` is the per-request state machine (EOS, max_new_tokens, trim_repeats, stats, events); the engine
(dgrun/engine.py) steps many of them in one batch. `stream` drives one request alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator

import numpy as np

from dgrun.errors import DgrunError


@dataclass(slots=True)
class SamplerConfig:
    """Every knob, with the reference's defaults (generation_diffusion_gemma.py); checkpoints override them."""

    steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        from dgrun import checks

        for name, value in checks.sampler({f.name: getattr(self, f.name) for f in fields(self)}).items():
            setattr(self, name, value)

    def update(self, **knobs) -> "SamplerConfig":
        names = {f.name for f in fields(self)}
        unknown = set(knobs) - names
        if unknown:
            raise DgrunError(f"unknown sampler option(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in knobs.items() if v is not None})


def temperature(remaining: int, cfg: SamplerConfig) -> float:
    """t_min + (t_max - t_min) * remaining / steps, in float32 as the reference computes it with tensors."""
    f32 = np.float32
    frac = f32(remaining) / f32(cfg.steps)
    return float(f32(cfg.t_min) + f32(cfg.t_max - cfg.t_min) * frac)


@dataclass
class Draft:
    """The argmax canvas after one denoising step. `ids` reads it back to the host only when asked."""

    block: int
    step: int
    canvas: Any
    backend: Any
    prompt_index: int = 0  # which prompt of a batch

    @property
    def ids(self) -> list[int]:
        return self.backend.tolist(self.canvas)


@dataclass
class Prefill:
    """Progress of a prompt through the encoder, one event per chunk of a long prompt."""

    done: int
    total: int
    prompt_index: int = 0


@dataclass
class Block:
    """A finished block: its tokens (cut at EOS / max_new_tokens) and how many steps it took."""

    index: int
    ids: list[int]
    steps: int
    converged: bool  # stopped by the stable-and-confident rule rather than by running out of steps
    eos: bool
    repeated: bool = False  # the block equalled the previous one and was dropped (trim_repeats)
    prompt_index: int = 0
    text: str = ""  # the block's text, decoded incrementally by Model.stream (api.py)


@dataclass
class Stats:
    ids: list[int] = field(default_factory=list)
    blocks: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    tokens_per_forward: float = 0.0  # generated non-pad tokens / decoder passes, as the reference defines it
    stop_reason: str = ""  # "eos", "length", "repeat", "context" (the cache is full) or "interrupted"
    unconverged: list[int] = field(default_factory=list)  # blocks that ran out of steps
    prompt_index: int = 0
    seed: int = 0  # the seed used (a random one when -1 was asked)

    @property
    def avg_steps(self) -> float:
        return sum(self.steps_per_block) / max(1, len(self.steps_per_block))

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds else 0.0


def first_eos(ids: list[int], eos: set[int]) -> int | None:
    return next((j for j, t in enumerate(ids) if t in eos), None)


def cache_need(prompt_tokens: int, cfg: SamplerConfig, canvas_length: int) -> int:
    """Cache entries a request can fill: its prompt and every block but the last (never committed)."""
    return prompt_tokens + (math.ceil(cfg.max_new_tokens / canvas_length) - 1) * canvas_length


class Request:
    """One generation's state machine: prefill progress, blocks, EOS / length / repeat / context stops, stats.
    It holds no tensors: the engine steps its row and hands it each finished canvas."""

    def __init__(self, prompt_ids, cfg: SamplerConfig, eos_ids=(), pad_id: int | None = None,
                 trim_repeats: bool = False, fixed=None, index: int = 0, slot: int | None = None):
        self.prompt = [int(t) for t in prompt_ids]
        self.cfg, self.eos, self.pad, self.trim_repeats = cfg, set(eos_ids), pad_id, trim_repeats
        self.fixed, self.index = fixed, index
        self.slot = slot  # a caller's slot keeps its cached context (multi-turn chat)
        self.keep_slot = slot is not None
        self.prefilled = 0
        self.block, self.steps, self.passes, self.valid = 0, 0, 0, 0
        self.previous: list[int] | None = None
        self.finished = False
        self.stats = Stats(prompt_tokens=len(self.prompt), prompt_index=index)
        self.t0 = time.perf_counter()

    def row(self):
        from dgrun.backends.row import Row

        return Row(self.slot, self.cfg, self.block, self.fixed if self.block == 0 else None)

    def prefill_event(self) -> Prefill:
        return Prefill(self.prefilled, len(self.prompt), self.index)

    def draft(self, canvas, backend) -> Draft:
        self.steps += 1
        return Draft(self.block, self.steps, canvas, backend, self.index)

    @property
    def out_of_steps(self) -> bool:
        return self.steps >= self.cfg.steps

    def end_block(self, canvas: list[int], converged: bool, cache_room: bool) -> Block:
        """Account a finished block; sets `finished` unless the canvas is to be committed and continued.
        cache_room: whether the slot can take this block (else generation stops here, reason "context")."""
        st, steps = self.stats, self.steps
        self.passes += steps
        st.steps_per_block.append(steps)
        if not converged:
            st.unconverged.append(self.block)
        if self.trim_repeats and canvas == self.previous:
            return self._finish(Block(self.block, [], steps, converged, False, repeated=True,
                                      prompt_index=self.index), "repeat")
        self.previous = canvas
        cut = first_eos(canvas, self.eos)
        kept = canvas if cut is None else canvas[: cut + 1]
        self.valid += sum(t != self.pad for t in kept)
        out = (canvas if cut is None else canvas[:cut])[: self.cfg.max_new_tokens - len(st.ids)]
        st.ids += out
        block = Block(self.block, out, steps, converged, cut is not None, prompt_index=self.index)
        if cut is not None:
            return self._finish(block, "eos")
        if len(st.ids) >= self.cfg.max_new_tokens:
            return self._finish(block, "length")
        if not cache_room:
            return self._finish(block, "context")
        self.block, self.steps = self.block + 1, 0
        return block

    def _finish(self, block: Block, reason: str) -> Block:
        self.finished = True
        self.stats.stop_reason = reason
        return block

    def close(self, reason: str | None = None) -> Stats:
        """The final stats (reason: why it ended early, e.g. "interrupted")."""
        st = self.stats
        st.stop_reason = reason or st.stop_reason
        st.blocks = len(st.steps_per_block)
        st.tokens_per_forward = self.valid / max(1, self.passes)
        st.seconds = time.perf_counter() - self.t0
        return st


def stream(backend, prompt_ids: list[int], cfg: SamplerConfig, eos_ids=(), pad_id: int | None = None,
           cache=None, trim_repeats: bool = False, fixed=None) -> Iterator[Draft | Prefill | Block | Stats]:
    """One request alone: a Prefill per chunk of a long prompt, a Draft per step, a Block per finished block,
    then the Stats. `cache` (a one-slot cache) keeps earlier context and is extended; without one, a cache of
    exactly what the request needs is made. trim_repeats: a block equal to the previous one is a loop (users
    report them): drop it and stop. fixed: a token id or -1 per canvas position, pinned in the first block."""
    from dgrun.engine import Engine

    if len(prompt_ids) == 0 and (cache is None or cache.lengths[0] == 0):
        raise DgrunError("empty prompt")
    if cache is None:
        cache = backend.new_cache(1, max(1, cache_need(len(prompt_ids), cfg, backend.args.canvas_length)))
    req = Request(prompt_ids, cfg, eos_ids, pad_id, trim_repeats, fixed, slot=0)
    engine = Engine(backend, cache)
    engine.add(req)
    try:
        while not req.finished:
            for _, event in engine.step():
                yield event
    finally:
        engine.cancel(req)
    yield req.close()
