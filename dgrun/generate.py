"""The block-diffusion loop, written once for every backend.

prefill -> for each block: uniform-random canvas -> denoising steps -> commit the argmax canvas.
The loop holds no tensor maths: the backend runs each whole step (sampler included) on its device;
the loop reads one "done" flag per step and the finished canvas once per block.
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
        checks = [
            (isinstance(self.steps, int) and self.steps > 0, "steps must be a positive integer"),
            (self.t_min >= 0, "t_min must be >= 0"),
            (self.t_max >= self.t_min, "t_max must be >= 0" if self.t_max < 0 else "t_max must be >= t_min"),
            (self.entropy_bound > 0, "entropy_bound must be > 0"),
            (isinstance(self.stability_threshold, int) and self.stability_threshold >= 0,
             "stability_threshold must be an integer >= 0"),
            (self.confidence_threshold > 0, "confidence_threshold must be > 0"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
             "max_new_tokens must be a positive integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise DgrunError(message)

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

    @property
    def ids(self) -> list[int]:
        return self.backend.tolist(self.canvas)


@dataclass
class Block:
    """A finished block: its tokens (cut at EOS / max_new_tokens) and how many steps it took."""

    index: int
    ids: list[int]
    steps: int
    converged: bool  # stopped by the stable-and-confident rule rather than by running out of steps
    eos: bool
    repeated: bool = False  # the block equalled the previous one and was dropped (trim_repeats)
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
    stop_reason: str = ""  # "eos", "length", "repeat" or "interrupted"
    unconverged: list[int] = field(default_factory=list)  # blocks that hit the step limit
    seed: int = 0  # the seed used (a random one when -1 was asked)

    @property
    def avg_steps(self) -> float:
        return sum(self.steps_per_block) / max(1, len(self.steps_per_block))

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds else 0.0


def first_eos(ids: list[int], eos: set[int]) -> int | None:
    return next((j for j, t in enumerate(ids) if t in eos), None)


def stream(backend, prompt_ids: list[int], cfg: SamplerConfig, eos_ids=(), pad_id: int | None = None,
           cache=None, trim_repeats: bool = False, fixed=None) -> Iterator[Draft | Block | Stats]:
    """Yield a Draft per step, a Block per finished block, then the Stats. Reuses `cache` when given.
    trim_repeats: a block equal to the previous one is a loop (users report them): drop it and stop.
    fixed: a token id or -1 per canvas position, pinned in the first block (infilling)."""
    if len(prompt_ids) == 0 and cache is None:
        raise DgrunError("empty prompt")
    args = backend.args
    eos = set(eos_ids)
    t0 = time.perf_counter()
    cache = backend.new_cache() if cache is None else cache
    backend.encode(prompt_ids, cache)
    stats = Stats(prompt_tokens=len(prompt_ids), prefill_seconds=time.perf_counter() - t0)
    rng = backend.rng(cfg.seed)
    valid, passes, previous = 0, 0, None
    for b in range(math.ceil(cfg.max_new_tokens / args.canvas_length)):
        state = backend.start_block(rng, cfg, fixed if b == 0 else None)
        steps, converged = 0, False
        for remaining in range(cfg.steps, 0, -1):
            state = backend.step(state, cache, temperature(remaining, cfg), cfg, rng)
            steps += 1
            yield Draft(b, steps, state.argmax, backend)
            if backend.done(state):
                converged = True
                break
        passes += steps
        canvas = backend.tolist(state.argmax)
        if trim_repeats and canvas == previous:
            stats.steps_per_block.append(steps)
            yield Block(b, [], steps, converged, False, repeated=True)
            break
        previous = canvas
        cut = first_eos(canvas, eos)
        kept = canvas if cut is None else canvas[: cut + 1]
        valid += sum(t != pad_id for t in kept)
        room = cfg.max_new_tokens - len(stats.ids)
        out = (canvas if cut is None else canvas[:cut])[:room]
        stats.ids += out
        stats.steps_per_block.append(steps)
        finished = cut is not None or len(stats.ids) >= cfg.max_new_tokens
        yield Block(b, out, steps, converged, cut is not None)
        if finished:
            break
        backend.encode(canvas, cache)  # commit the argmax canvas through the causal encoder
    stats.blocks = len(stats.steps_per_block)
    stats.tokens_per_forward = valid / max(1, passes)
    stats.seconds = time.perf_counter() - t0
    yield stats
