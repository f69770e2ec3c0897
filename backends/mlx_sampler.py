"""The entropy-bound sampler step in MLX: backends/torch_sampler.py's semantics, op for op.

Temperature, a categorical draw, entropy-bound acceptance, uniform renoise and the stable-and-confident stop.
Random draws come from explicit `mx.random` keys carried in the state, so a seed reproduces a run on mlx
(not the torch backends' draws: the generators differ). Pure array functions: they run inside `mx.compile`.
"""

from __future__ import annotations

import mlx.core as mx


def start_block(key: mx.array, vocab: int, canvas_length: int, stability_threshold: int, fixed=None):
    """A uniform-random canvas with the `fixed` ids (-1: free) pinned, an empty argmax history and the
    pinned-token array; returns (canvas, history, fixed, next key)."""
    key, sub = mx.random.split(key)
    canvas = mx.random.randint(0, vocab, (1, canvas_length), dtype=mx.int32, key=sub)
    history = mx.full((stability_threshold, 1, canvas_length), -1, dtype=mx.int32)
    fixed = mx.full((1, canvas_length), -1, dtype=mx.int32) if fixed is None else mx.array([fixed], dtype=mx.int32)
    return mx.where(fixed >= 0, fixed, canvas), history, fixed, key


def token_entropy(processed: mx.array, probs: mx.array) -> mx.array:
    log_probs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
    return -(log_probs * probs).sum(-1)


def accept_mask(entropy: mx.array, entropy_bound: mx.array) -> mx.array:
    """Accept the k lowest-entropy positions while sum(entropy) - the largest of them <= entropy_bound."""
    order = mx.argsort(entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(entropy, order, axis=-1)
    selected = mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy <= entropy_bound
    return mx.take_along_axis(selected, mx.argsort(order, axis=-1), axis=-1)  # back to canvas order


def sampler_step(logits: mx.array, temperature: mx.array, key: mx.array, history: mx.array, fixed: mx.array,
                 entropy_bound: mx.array, confidence_threshold: mx.array):
    """logits (C, V) float32 -> (canvas (1, C), argmax (1, C), probs (C, V), history, done (), next key).
    Pinned positions (fixed >= 0) keep their token, cost no entropy and are left out of the confidence mean."""
    vocab = logits.shape[-1]
    key, k_sample, k_noise = mx.random.split(key, 3)
    processed = logits / temperature
    probs = mx.softmax(processed, axis=-1, precise=True)
    sampled = mx.random.categorical(processed, axis=-1, key=k_sample).astype(mx.int32)[None]  # ~ softmax(processed)
    argmax = mx.argmax(processed, axis=-1).astype(mx.int32)[None]
    pinned = fixed >= 0
    sampled, argmax = mx.where(pinned, fixed, sampled), mx.where(pinned, fixed, argmax)
    entropy = mx.where(pinned, 0.0, token_entropy(processed, probs)[None])
    accepted = accept_mask(entropy, entropy_bound)
    noise = mx.random.randint(0, vocab, argmax.shape, dtype=mx.int32, key=k_noise)
    canvas = mx.where(accepted, sampled, noise)  # accepted tokens keep the draw, the rest are renoised

    if history.shape[0] == 0:
        stable = mx.array(True)
    else:
        stable = mx.all(history == argmax[None])
        history = mx.concatenate([history[1:], argmax[None]], axis=0)
    confident = entropy.sum() / mx.maximum((~pinned).sum(), 1) < confidence_threshold
    return canvas, argmax, probs, history, stable & confident, key
