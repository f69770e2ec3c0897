"""The entropy-bound sampler, batched: B rows, each with its own knobs, step counter, pins and draws.

Follows transformers' `_denoising_step`, `EntropyBoundSampler` and `StableAndConfidentStoppingCriteria` row by
row. The categorical draw is by inverse CDF (one uniform per position, from backends/torch/rng.py) where
torch.multinomial draws one exponential per vocabulary entry: the same distribution for a fraction of the work.
Every tensor has a fixed shape and nothing reads back to the host: a CUDA graph can hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from dgrun.backends.row import Row
from dgrun.backends.torch import rng


@dataclass(slots=True)
class State:
    """B rows at any denoising step. Knobs are per-row tensors, so rows of different requests share a step."""

    slot: torch.Tensor  # (B,) int64 cache slot, on the host: the cache's lengths are host bookkeeping
    offset: torch.Tensor  # (B,) int64 position of the canvas's first token
    seed: torch.Tensor  # (B, 2) int64: the seed's two 32-bit words
    block: torch.Tensor  # (B,) int64
    step: torch.Tensor  # (B,) int64 steps taken in this block
    steps: torch.Tensor  # (B,) int64 step limit
    t_min: torch.Tensor  # (B,) float32
    t_span: torch.Tensor  # (B,) float32: t_max - t_min, rounded once as the reference does
    bound: torch.Tensor  # (B,) float32 entropy bound
    confidence: torch.Tensor  # (B,) float32 confidence threshold
    stability: torch.Tensor  # (B,) int64 stability threshold
    canvas: torch.Tensor  # (B, C) int64: the next decoder input
    argmax: torch.Tensor  # (B, C) int64: the draft, committed when the block ends
    fixed: torch.Tensor | None  # (B, C) int64 pinned ids, -1 where free; None when no row pins
    history: torch.Tensor  # (S, B, C) int64 last argmax canvases, S = the largest stability threshold
    soft: torch.Tensor  # (B, C, hidden): the next step's self-conditioning input, zero on a block's first step
    done: torch.Tensor  # (B,) bool: stable and confident


def start(rows: list[Row], offsets: list[int], vocab: int, canvas_length: int, hidden: int, dtype,
          device) -> State:
    """New blocks: a uniform-random canvas per row, drawn from the row's own (seed, block)."""
    def t(values, dt=torch.int64):
        return torch.tensor(values, dtype=dt, device=device)

    f32 = np.float32
    cfgs = [r.cfg for r in rows]
    seed = t([rng.split_seed(int(c.seed)) for c in cfgs])
    block, step = t([r.block for r in rows]), t([0] * len(rows))
    canvas = rng.tokens(seed, block, step, rng.CANVAS, canvas_length, vocab)
    fixed = None
    if any(r.fixed is not None for r in rows):
        fixed = t([r.fixed if r.fixed is not None else [-1] * canvas_length for r in rows])
        canvas = torch.where(fixed >= 0, fixed, canvas)
    depth = max(c.stability_threshold for c in cfgs)
    b = len(rows)
    return State(
        slot=torch.tensor([r.slot for r in rows]), offset=t(offsets), seed=seed, block=block, step=step,
        steps=t([c.steps for c in cfgs]),
        t_min=t([f32(c.t_min) for c in cfgs], torch.float32),
        t_span=t([f32(c.t_max - c.t_min) for c in cfgs], torch.float32),
        bound=t([c.entropy_bound for c in cfgs], torch.float32),
        confidence=t([c.confidence_threshold for c in cfgs], torch.float32),
        stability=t([c.stability_threshold for c in cfgs]),
        canvas=canvas, argmax=canvas, fixed=fixed,
        history=torch.full((depth, b, canvas_length), -1, dtype=torch.int64, device=device),
        soft=torch.zeros((b, canvas_length, hidden), dtype=dtype, device=device),
        done=torch.zeros(b, dtype=torch.bool, device=device))


def take(state: State, index: list[int]) -> State:
    """The rows `index`, in that order."""
    idx = torch.tensor(index, dtype=torch.int64)
    out = {}
    for f in fields(State):
        v = getattr(state, f.name)
        out[f.name] = None if v is None else v.index_select(1 if f.name == "history" else 0, idx.to(v.device))
    return State(**out)


def cat(states: list[State]) -> State:
    """Rows of several states, one after the other (histories padded to the deepest at the old end)."""
    depth = max(s.history.shape[0] for s in states)
    out = {}
    for f in fields(State):
        parts = [getattr(s, f.name) for s in states]
        if f.name == "history":
            parts = [torch.cat([torch.full((depth - p.shape[0],) + p.shape[1:], -1, dtype=p.dtype, device=p.device),
                                p]) for p in parts]
            out[f.name] = torch.cat(parts, dim=1)
        elif f.name == "fixed":
            if all(p is None for p in parts):
                out[f.name] = None
            else:
                out[f.name] = torch.cat([p if p is not None else torch.full_like(s.canvas, -1)
                                         for p, s in zip(parts, states)])
        else:
            out[f.name] = torch.cat(parts)
    return State(**out)


def temperature(state: State) -> torch.Tensor:
    """(B,) t_min + (t_max - t_min) * remaining / steps in float32, remaining counting down from steps to 1."""
    remaining = (state.steps - state.step).to(torch.float32)
    return state.t_min + state.t_span * (remaining / state.steps.to(torch.float32))


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One categorical sample per row of probs (rows, V) by inverse CDF, from uniforms u (rows,)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True).clamp_(
        max=probs.shape[-1] - 1)[:, 0]


def token_entropy(processed: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Entropy per position of softmax(processed), reusing probs: one pass instead of Categorical's two."""
    log_probs = processed - processed.logsumexp(-1, keepdim=True)
    return -(log_probs.mul_(probs)).sum(-1)


def accept_mask(entropy: torch.Tensor, entropy_bound) -> torch.Tensor:
    """Accept the k lowest-entropy positions while sum(entropy) - the largest of them <= entropy_bound."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = sorted_entropy.cumsum(-1) - sorted_entropy <= entropy_bound
    return torch.zeros_like(selected).scatter(-1, order, selected)


def sample(state: State, logits: torch.Tensor) -> tuple[State, torch.Tensor, torch.Tensor]:
    """logits (B, C, V) float32 -> (next state without its soft embedding, processed logits, probs).
    Temperature, draw, entropy-bound acceptance, uniform renoise, stable-and-confident stop, per row.
    Pinned (infill) positions keep their token, cost no entropy and are left out of the confidence mean."""
    b, c, vocab = logits.shape
    step = state.step + 1  # draws are keyed by the step being taken, 1-based
    processed = logits / temperature(state)[:, None, None]
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    u = rng.uniform(state.seed, state.block, step, rng.DRAW, c)
    sampled = draw(probs.view(-1, vocab), u.view(-1)).view(b, c)
    argmax = processed.argmax(-1)
    entropy = token_entropy(processed, probs)
    return settle(state, sampled, argmax, entropy, vocab), processed, probs


def settle(state: State, sampled: torch.Tensor, argmax: torch.Tensor, entropy: torch.Tensor, vocab: int) -> State:
    """The per-position rest of a step, from the draws, argmaxes and entropies (B, C): pins, entropy-bound
    acceptance, renoise, history, stable-and-confident stop (the next state without its soft embedding).
    Shared by `sample` and the CUDA head (kernels/head_sampler.py), which reduces the vocabulary in kernels."""
    b, c = sampled.shape
    step = state.step + 1
    fixed = state.fixed
    if fixed is not None:
        pinned = fixed >= 0
        entropy = entropy.masked_fill(pinned, 0.0)
        sampled, argmax = torch.where(pinned, fixed, sampled), torch.where(pinned, fixed, argmax)
    accepted = accept_mask(entropy, state.bound[:, None])
    noise = rng.tokens(state.seed, state.block, step, rng.NOISE, c, vocab)
    canvas = torch.where(accepted, sampled, noise)  # accepted tokens keep the draw, the rest are renoised

    history, depth = state.history, state.history.shape[0]
    if depth == 0:
        stable = torch.ones(b, dtype=torch.bool, device=argmax.device)
    else:
        same = (history == argmax[None]).all(-1)  # (S, B)
        counted = torch.arange(depth, device=argmax.device)[:, None] >= (depth - state.stability)[None, :]
        stable = (same | ~counted).all(0)
        history = torch.cat([history[1:], argmax[None]], dim=0)
    if fixed is None:
        confident = entropy.mean(-1) < state.confidence
    else:
        confident = entropy.sum(-1) / (~pinned).sum(-1).clamp(min=1) < state.confidence
    return State(state.slot, state.offset, state.seed, state.block, step, state.steps, state.t_min, state.t_span,
                 state.bound, state.confidence, state.stability, canvas, argmax, fixed, history, state.soft,
                 stable & confident)
