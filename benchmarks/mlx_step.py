"""Seconds per denoising step: the mlx backend against the cpu backend, and against mlx-vlm when importable.

A step is what the block loop pays between two decoder inputs: decoder forward over the canvas (attending to
the prompt's cache), temperature, categorical draw, entropy-bound acceptance, renoise, the stop rule, and the
host read of the stop flag. Same random mid-size weights for every engine (bf16/q4 via `convert --to mlx-*`).

Host syncs per step: dgrun reads one flag (`done`); the step itself traces under mx.compile, which forbids
host reads (tests/test_mlx.py). mlx-vlm's step is composed from its own functions as its
stream_diffusion_generate composes them with `diffusion_sampler="entropy-bound"`
(mlx_vlm/generate/diffusion.py); its syncs are the `.item()` calls of `_diffusion_stable_and_confident`, one
per history entry once the history is full, one more when the canvas is stable.

On Linux, mlx[cpu] links the reference (netlib) BLAS, and MLX's CPU quantized matmul in bf16 is scalar code:
these timings say nothing about Metal. They compare engines that share MLX's kernels (dgrun vs mlx-vlm).

    python benchmarks/mlx_step.py                      # mlx[cpu] on Linux, or Metal on a Mac
    /path/to/venv-with-mlx-vlm/bin/python benchmarks/mlx_step.py [--bf16-q4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dgrun  # noqa: E402
from dgrun.backends.mlx import MlxBackend  # noqa: E402
from dgrun.convert.mlx_writer import convert_mlx  # noqa: E402
from dgrun.backends import Row  # noqa: E402
from dgrun.generate import SamplerConfig, temperature  # noqa: E402
from step_speed import mid_config, time_steps  # noqa: E402
from tiny import make_checkpoint  # noqa: E402


def dgrun_step_fn(backend, prompt, cfg):
    cache = backend.new_cache(1, len(prompt))
    backend.encode(0, prompt, cache)
    box = [backend.start([Row(0, cfg.update(steps=10**6))], cache)]  # the step limit out of reach

    def step():
        box[0] = backend.step(box[0], cache)
        backend.done(box[0])  # the loop's one host read per step
    return step


def vlm_step_fn(path, prompt, cfg, float32: bool):
    from mlx.utils import tree_map
    from mlx_vlm.generate import diffusion as D
    from mlx_vlm.utils import load_model

    model = load_model(Path(path))
    if float32:  # every float parameter, quantization scales included
        model.update(tree_map(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x,
                              model.parameters()))
    cache = model.diffusion_prefill_cache(mx.array([prompt]), attention_mask=None, cache=model.make_cache(),
                                          pixel_values=None, mm_token_type_ids=None, prefill_step_size=None,
                                          chunk_prefill=False)
    c, v = model.config.canvas_length, model.config.text_config.vocab_size
    s = {"canvas": mx.random.randint(0, v, (1, c)), "sc": None, "history": []}
    masks = model.diffusion_decoder_masks(s["canvas"], cache, None)
    without_sc, with_sc = D._make_diffusion_decoder_logits_fns(model, cache, masks, compile_graph=False)
    context = model.diffusion_prepare_self_conditioning()
    t = temperature(cfg.steps - 1, cfg)
    stop = {"stability_threshold": cfg.stability_threshold, "confidence_threshold": cfg.confidence_threshold}
    syncs = [0]  # counts the steps whose stop check reads the host (one .item() per history entry)

    def step():
        logits = without_sc(s["canvas"]) if s["sc"] is None else with_sc(s["canvas"], s["sc"])
        processed = logits / t
        argmax = mx.argmax(processed, axis=-1)
        sampled = D._diffusion_sample_canvas(processed, mx.int32, 1.0)
        entropy = D._diffusion_token_entropy(processed)
        accepted = D._diffusion_entropy_transfer_mask(entropy, cfg.entropy_bound)
        s["canvas"] = mx.where(accepted, sampled, D._diffusion_initialize_canvas(1, c, v, mx.int32))
        s["sc"] = model.diffusion_self_conditioning(processed, context)
        syncs[0] += len(s["history"]) == cfg.stability_threshold  # the .item() calls of its stop check
        D._diffusion_stable_and_confident(argmax, processed, s["history"], stop)
        mx.eval(s["canvas"], s["sc"])  # its next step's .item() would wait for these
    return step, syncs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per engine")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--bf16-q4", action="store_true", help="also q4 with bf16 compute (minutes on MLX's CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = SamplerConfig(confidence_threshold=1e-9)  # never stop: every timed step is a full step
    prompt = torch.randint(0, a.vocab, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(Path(d) / "hf", mid_config(a.vocab), canvas_length=a.canvas)
        bf16 = convert_mlx(path, to="mlx-bf16", out=Path(d) / "bf16").path
        q4 = convert_mlx(path, to="mlx-q4", out=Path(d) / "q4").path
        ckpt = dgrun.checkpoint.load(path)
        engines = {"dgrun cpu fp32": dgrun.load(path, backend="cpu").backend,
                   "dgrun mlx fp32": MlxBackend(ckpt.args, dict(ckpt.weights), dtype="float32")}
        os.environ["DGRUN_MLX_COMPILE"] = "1"  # what Metal runs; on the CPU device it first builds C++ kernels
        engines["dgrun mlx fp32, mx.compile"] = MlxBackend(ckpt.args, dict(ckpt.weights), dtype="float32")
        del os.environ["DGRUN_MLX_COMPILE"]
        engines["dgrun mlx fp32 (mlx-bf16 dir)"] = dgrun.load(bf16, backend="mlx", dtype="float32").backend
        engines["dgrun mlx bf16 (mlx-bf16 dir)"] = dgrun.load(bf16, backend="mlx").backend
        engines["dgrun mlx q4 (mlx-q4 dir), fp32"] = dgrun.load(q4, backend="mlx", dtype="float32").backend
        if a.bf16_q4:
            engines["dgrun mlx q4 (mlx-q4 dir), bf16"] = dgrun.load(q4, backend="mlx").backend
        print(f"config: hidden 512, 8 layers, 32 experts top-4, vocab {a.vocab}, canvas {a.canvas}, "
              f"prompt {a.prompt}; device {mx.default_device()}, torch threads {a.threads}")
        print(f"{'engine':40s} {'ms/step':>9s} {'vs cpu':>7s} {'syncs/step':>10s}", flush=True)
        for name, backend in engines.items():
            step = dgrun_step_fn(backend, prompt, cfg)
            t0 = time.perf_counter()
            step()  # warm-up: traces (and, compiled on CPU, builds the fused kernels)
            first = time.perf_counter() - t0
            ms = min(time_steps(step, a.steps, warmup=1) for _ in range(2)) * 1e3
            report(rows, (name, ms, "1", f"first step {first:.1f} s" if "compile" in name else ""))
        try:
            import mlx_vlm  # noqa: F401
        except ImportError as e:
            report(rows, ("mlx-vlm", None, None, f"not importable: {e}"))
            return
        # Its bf16 experts need gather_mm, which MLX's CPU device runs in float32 only: on CPU, cast to float32.
        runs = [("fp32 (mlx-bf16 dir)", bf16, True), ("q4 (mlx-q4 dir), fp32", q4, True)]
        for label, src, f32 in runs + ([("q4 (mlx-q4 dir), bf16", q4, False)] if a.bf16_q4 else []):
            step, syncs = vlm_step_fn(src, prompt, cfg, float32=f32)
            step()
            ms = min(time_steps(step, a.steps, warmup=1) for _ in range(2)) * 1e3
            report(rows, (f"mlx-vlm {label}", ms, f">={syncs[0] / (2 * a.steps + 3):.0f}",
                          "its entropy-bound step, eager (its default)"))


def report(rows: list, row: tuple) -> None:
    rows.append(row)
    name, ms, syncs, note = row
    if ms is None:
        print(f"{name:40s} {'-':>9s} {'-':>7s} {'-':>10s}  {note}", flush=True)
    else:
        print(f"{name:40s} {ms:9.1f} {rows[0][1] / ms:6.2f}x {syncs:>10s}  {note}", flush=True)


if __name__ == "__main__":
    main()
