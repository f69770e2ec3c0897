"""Sampler parity: the reference's own `_denoising_step` and dgrun's step, fed the same logits and draws."""

from types import SimpleNamespace

import pytest
import torch
from transformers.generation import LogitsProcessorList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgrun.backends import Row
from dgrun.backends.torch import sampler as torch_sampler
from dgrun.generate import SamplerConfig

C, V = 24, 40


def logits_sequence(n_steps: int, seed: int):
    """Logits that sharpen around a fixed answer, so entropies spread out and the stop rule eventually fires."""
    g = torch.Generator().manual_seed(seed)
    answer = torch.randint(0, V, (C,), generator=g)
    out = []
    for k in range(n_steps):
        noise = torch.randn(C, V, generator=g) * 2
        peak = torch.nn.functional.one_hot(answer, V).float() * (2.0 + 6.0 * k) * (0.5 + torch.rand(C, 1, generator=g))
        out.append(torch.tanh((noise + peak) / 30) * 30)  # softcapped, like the model's
    return out


def reference_steps(logits_seq, cfg: SamplerConfig, seed: int, draws):
    fake_self = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(vocab_size=V)),
                                model=SimpleNamespace(decoder=SimpleNamespace(
                                    embed_tokens=SimpleNamespace(weight=torch.zeros(1)))))
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=cfg.entropy_bound), C, V, cfg.steps)
    stopping = StableAndConfidentStoppingCriteria(cfg.stability_threshold, cfg.confidence_threshold)
    processors = LogitsProcessorList([LinearTemperatureScheduleLogitsProcessor(cfg.t_min, cfg.t_max, cfg.steps)])
    draws.seed(seed)
    canvas = sampler.initialize_canvas(1, torch.device("cpu"))
    argmax, sc, done = canvas, None, torch.zeros(1, dtype=torch.bool)
    trace = []
    for remaining, logits in zip(range(cfg.steps, 0, -1), logits_seq):
        forward = lambda **kw: SimpleNamespace(logits=logits[None])  # noqa: E731
        canvas, argmax, sc, done = DiffusionGemmaGenerationMixin._denoising_step(
            fake_self, forward, canvas, argmax, None, None, sc, None, None, done, remaining, sampler,
            processors, stopping)
        trace.append((canvas[0].clone(), argmax[0].clone(), sc[0].clone(), bool(done)))
        if done.all():
            break
    return trace


def start(cfg: SamplerConfig, fixed=None, c=C):
    return torch_sampler.start([Row(0, cfg, 0, fixed)], [0], V, c, 1, torch.float32, "cpu")


def dgrun_steps(logits_seq, cfg: SamplerConfig):
    state = start(cfg)
    trace = []
    for logits in logits_seq:
        state, processed, _ = torch_sampler.sample(state, logits[None])
        trace.append((state.canvas[0], state.argmax[0], processed[0], bool(state.done[0])))
        if state.done[0]:
            break
    return trace


@pytest.mark.parametrize("bound,stability,confidence", [(0.1, 1, 0.005), (1.0, 2, 0.05), (5.0, 0, 0.5),
                                                         (0.01, 1, 1.0), (0.1, 1, 1e-9)])
def test_sampler_decisions_match_reference(bound, stability, confidence, reference_draws):
    cfg = SamplerConfig(steps=12, entropy_bound=bound, stability_threshold=stability, confidence_threshold=confidence,
                        seed=3)
    seq = logits_sequence(cfg.steps, seed=int(bound * 100) + stability)
    ref, ours = reference_steps(seq, cfg, 3, reference_draws), dgrun_steps(seq, cfg)
    assert len(ref) == len(ours)
    for k, ((rc, ra, rs, rd), (dc, da, ds, dd)) in enumerate(zip(ref, ours)):
        assert torch.equal(rc, dc), f"step {k}: renoised canvas differs"
        assert torch.equal(ra, da), f"step {k}: argmax differs"
        assert torch.equal(rs, ds), f"step {k}: processed logits (temperature) differ"
        assert rd == dd, f"step {k}: stop decision differs"


def test_some_case_stops_early_and_accepts_many():
    """Guards the parity test above against vacuity: the stop rule fires, and acceptance takes > 1 token."""
    cfg = SamplerConfig(steps=12, entropy_bound=1.0, stability_threshold=2, confidence_threshold=0.05, seed=3)
    trace = dgrun_steps(logits_sequence(cfg.steps, seed=102), cfg)
    assert trace[-1][3] and len(trace) < cfg.steps
    entropy = torch_sampler.token_entropy(trace[0][2], torch.softmax(trace[0][2], -1))
    assert torch_sampler.accept_mask(entropy, 1.0).sum() > 1


def test_accept_mask_rule():
    e = torch.tensor([0.5, 0.01, 0.2, 0.02, 3.0])
    # sorted: .01 .02 .2 .5 3.0 -> cumsum - self: 0 .01 .03 .23 .73
    assert accept_list(e, 0.1) == [False, True, True, True, False]
    assert accept_list(e, 0.0) == [False, True, False, False, False]
    assert accept_list(e, 1.0) == [True] * 5


def accept_list(e, bound):
    return torch_sampler.accept_mask(e, bound).tolist()


def test_draw_samples_the_distribution():
    """Inverse-CDF draws follow probs: chi-square over 20k draws, zero-probability tokens never drawn."""
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.125, 0.125, 0.0]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch_sampler.draw(probs, u), minlength=6)
    assert counts[1] == 0 and counts[5] == 0
    expected = probs[0] * 20000
    nz = expected > 0
    chi2 = ((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum().item()
    assert chi2 < 16.3  # p = 0.001 at 3 degrees of freedom


def test_temperature_schedule_counts_down():
    """On the device, per row: t_min + (t_max - t_min) * remaining / steps, bit for bit the float32 the reference
    computes (its cur_step / max_steps is a float32 tensor)."""
    rows = [SamplerConfig(steps=4, t_min=0.4, t_max=0.8), SamplerConfig(steps=3, t_min=0.1, t_max=0.7)]
    state = torch_sampler.start([Row(i, c) for i, c in enumerate(rows)], [0, 0], V, C, 1, torch.float32, "cpu")
    seen = []
    for k in range(3):
        state.step = torch.tensor([k, k])
        seen.append(torch_sampler.temperature(state))
    ref = [[LinearTemperatureScheduleLogitsProcessor(c.t_min, c.t_max, c.steps)(
        None, torch.ones(1), cur_step=torch.tensor(c.steps - k, dtype=torch.int32)).reciprocal() for c in rows]
        for k in range(3)]
    assert [[round(float(t), 6) for t in row] for row in seen] == [[0.8, 0.7], [0.7, 0.5], [0.6, 0.3]]
    assert all(torch.equal(seen[k][i], ref[k][i][0]) for k in range(3) for i in range(2))


def test_pinned_positions_act_as_certain_tokens():
    """Infilling: pinning a token at a position gives the same canvases and drafts as the plain sampler fed
    a one-hot (zero-entropy) logit row for that token there; the stop rule then averages the free positions."""
    cfg = SamplerConfig(steps=12, entropy_bound=1.0, stability_threshold=1, confidence_threshold=0.05, seed=3)
    seq = logits_sequence(cfg.steps, seed=7)
    fixed = [-1] * C
    fixed[C // 2:] = list(range(3, 3 + C - C // 2))
    pin = torch.tensor(fixed) >= 0
    one_hot = torch.where(torch.nn.functional.one_hot(torch.tensor(fixed).clamp(min=0), V).bool(), 1e4, -1e4)
    plain_seq = [torch.where(pin[:, None], one_hot, logits) for logits in seq]
    pinned, plain = start(cfg, fixed), start(cfg.update(confidence_threshold=1e6))
    assert torch.equal(pinned.canvas[0, C // 2:], torch.tensor(fixed[C // 2:]))
    assert torch.equal(pinned.canvas[0, :C // 2], plain.canvas[0, :C // 2])
    stopped = False
    for logits, plain_logits in zip(seq, plain_seq):
        pinned, _, _ = torch_sampler.sample(pinned, logits[None])
        plain, processed, probs = torch_sampler.sample(plain, plain_logits[None])
        assert torch.equal(pinned.canvas, plain.canvas) and torch.equal(pinned.argmax, plain.argmax)
        free_entropy = torch_sampler.token_entropy(processed, probs)[0][~pin].mean()
        assert bool(pinned.done[0]) == bool(plain.done[0] and free_entropy < cfg.confidence_threshold)
        stopped |= bool(pinned.done[0])
    assert stopped
