"""Batched denoising steps on the cpu backend: ms per step and canvas tokens per second for B rows at once.

Mid-size random config of benchmarks/step_speed.py, one process. Every row has its own prompt (of its own
length), seed and cache slot; a step denoises all B canvases in one forward.

    python benchmarks/batch_speed.py                 # B = 1, 2, 4, 8
    python benchmarks/batch_speed.py --threads 1 --batch 1,4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dgrun  # noqa: E402
from dgrun.generate import SamplerConfig  # noqa: E402
from step_speed import dgrun_step_fn, make_checkpoint, mid_config, time_steps  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    ap.add_argument("--batch", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sizes = [int(b) for b in a.batch.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, a.vocab, (a.prompt - 16 * i,), generator=g).tolist() for i in range(max(sizes))]
    with tempfile.TemporaryDirectory() as d:
        m = dgrun.load(make_checkpoint(Path(d), mid_config(a.vocab), canvas_length=a.canvas), backend="cpu")
        cfg = SamplerConfig(confidence_threshold=1e-9)
        times = {b: min(time_steps(dgrun_step_fn(m, prompts[:b], cfg), a.steps) for _ in range(2)) for b in sizes}
    print(f"config: hidden 512, 8 layers, 32 experts top-4, vocab {a.vocab}, canvas {a.canvas}, prompts "
          f"{a.prompt}-{a.prompt - 16 * (max(sizes) - 1)} tokens, fp32, {a.threads} threads")
    print("| B | ms/step | canvas tok/s | aggregate vs B=1 |")
    print("|---|---|---|---|")
    for b, t in times.items():
        print(f"| {b} | {t * 1000:.1f} | {b * a.canvas / t:.0f} | {b * times[sizes[0]] / t / sizes[0]:.2f}x |")


if __name__ == "__main__":
    main()
