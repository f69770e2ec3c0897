"""The entropy-bound sampler in MLX, batched: backends/torch/sampler.py's semantics, op for op.

Random draws use the keyed hash of backends/torch/rng.py written in uint32 (the same bits), so a row's draws
depend only on its own (seed, block, step). Pure array functions: `sample` runs inside `mx.compile`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import numpy as np

from dgrun.backends.torch.rng import CANVAS, DRAW, GOLDEN, NOISE, split_seed

U32 = mx.uint32


@dataclass
class MlxState:
    """B rows at any denoising step (see backends/torch/sampler.State)."""

    slot: list  # host ints: the cache's lengths are host bookkeeping
    offset: mx.array  # (B,) int32
    seed: mx.array  # (B, 2) uint32
    block: mx.array  # (B,) uint32
    step: mx.array  # (B,) int32 steps taken in this block
    steps: mx.array  # (B,) int32
    t_min: mx.array  # (B,) float32
    t_span: mx.array  # (B,) float32
    bound: mx.array  # (B,) float32
    confidence: mx.array  # (B,) float32
    stability: mx.array  # (B,) int32
    canvas: mx.array  # (B, C) int32
    argmax: mx.array  # (B, C) int32
    fixed: mx.array  # (B, C) int32, -1 where free
    history: mx.array  # (S, B, C) int32
    soft: mx.array  # (B, C, hidden)
    done: mx.array  # (B,) bool


def fmix32(h: mx.array) -> mx.array:
    h = h ^ (h >> 16)
    h = h * mx.array(0x85EBCA6B, dtype=U32)
    h = h ^ (h >> 13)
    h = h * mx.array(0xC2B2AE35, dtype=U32)
    return h ^ (h >> 16)


def bits(seed, block, step, stream: int, width: int) -> mx.array:
    h = mx.full(block.shape, GOLDEN, dtype=U32)
    for word in (seed[:, 0], seed[:, 1], block, step.astype(U32), mx.full(block.shape, stream, dtype=U32)):
        h = fmix32(h ^ word)
    return fmix32(h[:, None] ^ mx.arange(width, dtype=U32)[None, :])


def uniform(seed, block, step, stream: int, width: int) -> mx.array:
    return (bits(seed, block, step, stream, width) >> 8).astype(mx.float32) * (1.0 / (1 << 24))


def tokens(seed, block, step, stream: int, width: int, vocab: int) -> mx.array:
    return (bits(seed, block, step, stream, width) % vocab).astype(mx.int32)


def start(rows, offsets, vocab: int, canvas_length: int, hidden: int, dtype) -> MlxState:
    f32, cfgs, b = np.float32, [r.cfg for r in rows], len(rows)
    seed = mx.array(np.array([split_seed(int(c.seed)) for c in cfgs], dtype=np.uint32).reshape(b, 2))
    block, step = mx.array([r.block for r in rows], dtype=U32), mx.zeros((b,), dtype=mx.int32)
    canvas = tokens(seed, block, step, CANVAS, canvas_length, vocab)
    fixed = mx.array([r.fixed if r.fixed is not None else [-1] * canvas_length for r in rows], dtype=mx.int32)
    canvas = mx.where(fixed >= 0, fixed, canvas)
    depth = max(c.stability_threshold for c in cfgs)
    return MlxState(
        slot=[r.slot for r in rows], offset=mx.array(offsets, dtype=mx.int32), seed=seed, block=block, step=step,
        steps=mx.array([c.steps for c in cfgs], dtype=mx.int32),
        t_min=mx.array(np.array([f32(c.t_min) for c in cfgs])),
        t_span=mx.array(np.array([f32(c.t_max - c.t_min) for c in cfgs])),
        bound=mx.array([c.entropy_bound for c in cfgs], dtype=mx.float32),
        confidence=mx.array([c.confidence_threshold for c in cfgs], dtype=mx.float32),
        stability=mx.array([c.stability_threshold for c in cfgs], dtype=mx.int32),
        canvas=canvas, argmax=canvas, fixed=fixed, history=mx.full((depth, b, canvas_length), -1, dtype=mx.int32),
        soft=mx.zeros((b, canvas_length, hidden), dtype=dtype), done=mx.zeros((b,), dtype=mx.bool_))


def take(state: MlxState, index: list[int]) -> MlxState:
    idx = mx.array(index, dtype=mx.int32)
    out = {}
    for f in fields(MlxState):
        v = getattr(state, f.name)
        out[f.name] = [v[i] for i in index] if f.name == "slot" else (v[:, idx] if f.name == "history" else v[idx])
    return MlxState(**out)


def cat(states: list[MlxState]) -> MlxState:
    depth = max(s.history.shape[0] for s in states)
    out = {}
    for f in fields(MlxState):
        parts = [getattr(s, f.name) for s in states]
        if f.name == "slot":
            out[f.name] = [x for p in parts for x in p]
        elif f.name == "history":
            parts = [mx.concatenate([mx.full((depth - p.shape[0],) + p.shape[1:], -1, dtype=p.dtype), p])
                     for p in parts]
            out[f.name] = mx.concatenate(parts, axis=1)
        else:
            out[f.name] = mx.concatenate(parts)
    return MlxState(**out)


def token_entropy(processed: mx.array, probs: mx.array) -> mx.array:
    log_probs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
    return -(log_probs * probs).sum(-1)


def accept_mask(entropy: mx.array, entropy_bound: mx.array) -> mx.array:
    """Accept the k lowest-entropy positions while sum(entropy) - the largest of them <= entropy_bound."""
    order = mx.argsort(entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(entropy, order, axis=-1)
    selected = mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy <= entropy_bound
    return mx.take_along_axis(selected, mx.argsort(order, axis=-1), axis=-1)  # back to canvas order


def draw(probs: mx.array, u: mx.array) -> mx.array:
    """Inverse-CDF categorical draws: probs (..., V), u (...) -> ids (...)."""
    cdf = mx.cumsum(probs, axis=-1)
    below = (cdf <= (u[..., None] * cdf[..., -1:])).astype(mx.int32).sum(-1)
    return mx.minimum(below, probs.shape[-1] - 1)


def sample(logits, seed, block, step, steps, t_min, t_span, bound, confidence, stability, fixed, history):
    """logits (B, C, V) float32 -> (canvas, argmax, processed, probs, history, done, step)."""
    b, c, vocab = logits.shape
    remaining = (steps - step).astype(mx.float32)
    temperature = t_min + t_span * (remaining / steps.astype(mx.float32))
    step = step + 1
    processed = logits / temperature[:, None, None]
    probs = mx.softmax(processed, axis=-1, precise=True)
    sampled = draw(probs, uniform(seed, block, step, DRAW, c))
    argmax = mx.argmax(processed, axis=-1).astype(mx.int32)
    pinned = fixed >= 0
    sampled, argmax = mx.where(pinned, fixed, sampled), mx.where(pinned, fixed, argmax)
    entropy = mx.where(pinned, 0.0, token_entropy(processed, probs))
    accepted = accept_mask(entropy, bound[:, None])
    canvas = mx.where(accepted, sampled, tokens(seed, block, step, NOISE, c, vocab))

    depth = history.shape[0]
    if depth == 0:
        stable = mx.ones((b,), dtype=mx.bool_)
    else:
        same = mx.all(history == argmax[None], axis=-1)
        counted = mx.arange(depth)[:, None] >= (depth - stability)[None, :]
        stable = mx.all(same | ~counted, axis=0)
        history = mx.concatenate([history[1:], argmax[None]], axis=0)
    confident = entropy.sum(-1) / mx.maximum((~pinned).sum(-1), 1) < confidence
    return canvas, argmax, processed, probs, history, stable & confident, step
