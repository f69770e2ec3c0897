"""The entropy-bound sampler step in torch, shared by the torch backends (cpu now, cuda next).

Follows transformers' `_denoising_step`, `EntropyBoundSampler` and `StableAndConfidentStoppingCriteria`.
The categorical draw is by inverse CDF (one uniform per position) where torch.multinomial draws one
exponential per vocabulary entry: the same distribution for a fraction of the work (16.8M exponentials a
step at the real vocab). Every tensor has a fixed shape and nothing reads back to the host: a CUDA graph
can hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class StepState:
    canvas: torch.Tensor  # (1, C) int64: the next decoder input
    argmax: torch.Tensor  # (1, C) int64: the draft, committed when the block ends
    sc_logits: torch.Tensor | None  # (C, V) processed logits of the last step, None on the first
    probs: torch.Tensor | None  # (C, V) float32 softmax of sc_logits: reused by float32 self-conditioning
    history: torch.Tensor  # (stability_threshold, 1, C) int64: the last argmax canvases
    done: torch.Tensor  # () bool
    fixed: torch.Tensor | None = None  # (1, C) int64: tokens held in place (infilling), -1 where free


def start_block(vocab: int, canvas_length: int, stability_threshold: int, rng: torch.Generator,
                fixed: list[int] | None = None) -> StepState:
    """A uniform-random canvas; `fixed` (one id or -1 per position) pins tokens for infilling."""
    canvas = torch.randint(0, vocab, (1, canvas_length), generator=rng, device=rng.device)
    history = torch.full((stability_threshold, 1, canvas_length), -1, dtype=torch.int64, device=rng.device)
    if fixed is not None:
        fixed = torch.tensor([fixed], dtype=torch.int64, device=rng.device)
        canvas = torch.where(fixed >= 0, fixed, canvas)
    done = torch.zeros((), dtype=torch.bool, device=rng.device)
    return StepState(canvas, canvas, None, None, history, done, fixed)


def draw(probs: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """One categorical sample per row of probs (rows, V), by inverse CDF."""
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=rng, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


def token_entropy(processed: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Entropy per position of softmax(processed), reusing probs: one pass instead of Categorical's two."""
    log_probs = processed - processed.logsumexp(-1, keepdim=True)
    return -(log_probs * probs).sum(-1)


def accept_mask(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """Accept the k lowest-entropy positions while sum(entropy) - the largest of them <= entropy_bound."""
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    selected = sorted_entropy.cumsum(-1) - sorted_entropy <= entropy_bound
    return torch.zeros_like(selected).scatter(-1, order, selected)


def sampler_step(state: StepState, logits: torch.Tensor, temperature: torch.Tensor, entropy_bound: float,
                 confidence_threshold: float, rng: torch.Generator) -> StepState:
    """Temperature, multinomial draw, entropy-bound acceptance, uniform renoise, stable-and-confident stop.
    Fixed (infill) positions keep their token, cost no entropy and are left out of the confidence mean."""
    vocab = logits.shape[-1]
    processed = logits / temperature  # (C, V) float32
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = draw(probs, rng).view(1, -1)
    argmax = processed.argmax(-1).view(1, -1)
    entropy = token_entropy(processed, probs).view(1, -1)
    if state.fixed is not None:
        pinned = state.fixed >= 0
        entropy = entropy.masked_fill(pinned, 0.0)
        sampled, argmax = torch.where(pinned, state.fixed, sampled), torch.where(pinned, state.fixed, argmax)
    accepted = accept_mask(entropy, entropy_bound)
    noise = torch.randint(0, vocab, tuple(state.canvas.shape), generator=rng, device=rng.device)
    canvas = torch.where(accepted, sampled, noise)  # accepted tokens keep the draw, the rest are renoised

    history = state.history
    if history.shape[0] == 0:
        stable = torch.ones((), dtype=torch.bool, device=logits.device)
    else:
        stable = (history == argmax[None]).all()
        history = torch.cat([history[1:], argmax[None]], dim=0)
    if state.fixed is None:
        confident = entropy.mean() < confidence_threshold
    else:
        confident = entropy.sum() / (~pinned).sum().clamp(min=1) < confidence_threshold
    return StepState(canvas, argmax, processed, probs, history, stable & confident, state.fixed)
