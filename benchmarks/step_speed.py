"""Seconds per denoising step: dgrun's cpu backend against transformers 5.23, same process, same weights.

A step is everything between two decoder inputs: the decoder forward over the canvas (attending to the
prompt's KV cache), the temperature, the multinomial draw, entropy-bound acceptance, renoise and the
stop rule. The reference runs its own `_denoising_step` with its own sampler classes.

    python benchmarks/step_speed.py            # mid-size random config, fp32
    python benchmarks/step_speed.py --vocab 262144 --steps 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dgrun  # noqa: E402
from dgrun.backends import Row  # noqa: E402
from dgrun.generate import SamplerConfig  # noqa: E402
from tiny import make_checkpoint  # noqa: E402


def mid_config(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, global_head_dim=128, num_global_key_value_heads=2,
                sliding_window=128, num_experts=32, top_k_experts=4, moe_intermediate_size=256)


def time_steps(step, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def reference_step_fn(ref, prompt, canvas_length, cfg):
    from transformers import DynamicCache
    from transformers.generation import LogitsProcessorList
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler, EntropyBoundSamplerConfig, LinearTemperatureScheduleLogitsProcessor,
        StableAndConfidentStoppingCriteria)

    vocab = ref.config.text_config.vocab_size
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    with torch.no_grad():
        ref.model.encoder(input_ids=prompt, past_key_values=cache)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(cfg.entropy_bound), canvas_length, vocab, cfg.steps)
    stop = StableAndConfidentStoppingCriteria(cfg.stability_threshold, cfg.confidence_threshold)
    procs = LogitsProcessorList([LinearTemperatureScheduleLogitsProcessor(cfg.t_min, cfg.t_max, cfg.steps)])
    pos = torch.arange(prompt.shape[1], prompt.shape[1] + canvas_length)[None]
    s = SimpleNamespace(canvas=sampler.initialize_canvas(1, torch.device("cpu")), sc=None,
                        done=torch.zeros(1, dtype=torch.bool))
    s.argmax = s.canvas

    @torch.no_grad()
    def step():
        s.canvas, s.argmax, s.sc, _ = ref._denoising_step(
            ref.forward, s.canvas, s.argmax, prompt, pos, s.sc, None, cache, s.done, cfg.steps - 1, sampler,
            procs, stop)
    return step


def dgrun_step_fn(m, prompts, cfg):
    """A step of len(prompts) rows, one per cache slot. The step limit is out of reach, so the temperature
    stays in range however many steps are timed."""
    be = m.backend
    cache = be.new_cache(len(prompts), max(map(len, prompts)))
    for slot, p in enumerate(prompts):
        be.encode(slot, p, cache)
    box = [be.start([Row(slot, cfg.update(steps=10**6, seed=slot)) for slot in range(len(prompts))], cache)]

    def step():
        box[0] = be.step(box[0], cache)
        be.done(box[0])  # the loop's one host read per step
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per engine")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = SamplerConfig(confidence_threshold=1e-9)  # never stop: every timed step is a full step
    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(Path(d), mid_config(a.vocab), canvas_length=a.canvas)
        from transformers import DiffusionGemmaForBlockDiffusion

        ref = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()  # its default attention (sdpa)
        m = dgrun.load(path, backend="cpu")
        prompt = torch.randint(0, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))
        r_step, d_step = reference_step_fn(ref, prompt, a.canvas, cfg), dgrun_step_fn(m, [prompt[0].tolist()], cfg)
        # Interleave the two engines so machine noise hits both alike.
        r = min(time_steps(r_step, a.steps) for _ in range(2))
        g = min(time_steps(d_step, a.steps) for _ in range(2))
    print(f"config: hidden 512, 8 layers, 32 experts top-4, vocab {a.vocab}, canvas {a.canvas}, prompt {a.prompt}, "
          f"fp32, {a.threads} threads")
    print(f"transformers 5.23.0: {r * 1000:8.1f} ms/step")
    print(f"dgrun cpu:           {g * 1000:8.1f} ms/step")
    print(f"speedup:             {r / g:8.2f}x")


if __name__ == "__main__":
    main()
