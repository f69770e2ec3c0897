"""`dgrun bench`: how fast a backend prefills, denoises and commits, llama-bench style.

For each (prompt size P, batch size B), on any backend through the Backend protocol (backends/__init__.py):

- **prefill tok/s**: a random P-token prompt encoded into each of the B cache slots (B·P tokens / time);
- **ms/step**: `backend.step` run exactly `steps` times on B fresh blocks whatever `done` says (early stop off),
  reading the done vector after each step as the loop does;
- **ms/commit**: one finished canvas encoded into its slot (the engine commits rows one by one);
- **tok/s**: B·C / (steps · ms/step + B · ms/commit), C the canvas length: one block of every row;
- **eff. tok/s** (`adaptive`): the engine's own loop (dgrun/engine.py) with the normal stop rule over the
  prefilled slots, two blocks per row (the first committed), B·2C tokens / the time of its steps and commits;
  with it the mean steps a block took;
- **peak memory**: torch.cuda.max_memory_allocated on cuda (weights included), else the growth of the process's
  peak RSS since the bench started (weights included);
- **roofline**: (bytes of weights a step reads ÷ the copy bandwidth this bench measured on the same device in
  the same run) ÷ ms/step, 1.0 being a step that only streams its weights at copy speed. A full canvas routes
  C·top_k tokens over the experts, so a step reads every expert (SPEC.md §5): the bytes are every weight the
  backend holds for the decoder, plus the embedding a second time (the tied lm_head, then the
  self-conditioning product over the same matrix). Copy bandwidth counts bytes read plus bytes written.

Timing: CUDA events and a synchronize on cuda, `time.perf_counter` elsewhere (the done read each step syncs).
A warm-up repetition with WARMUP_STEPS steps runs first and is not counted; each figure is the mean and the
sample standard deviation over the `reps` repetitions (each one: reset the slots, prefill, steps, commit).

The device probes (clocks, copy bandwidth, peak memory) are dgrun/bench_device.py; the weights and the backend
over them dgrun/bench_weights.py; the reference comparison dgrun/bench_reference.py; the table, dgrun/cli/bench.py. `python -m dgrun.bench --gpu-check` runs dgrun/gpu_check.py.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time

import numpy as np
import torch

from dgrun.backends.row import Row
from dgrun.bench_device import copy_bandwidth, device_name, kind, peak_memory, reset_peak, rss, timed
from dgrun.bench_weights import load_weights, make_backend
from dgrun.errors import DgrunError
from dgrun.generate import Request, SamplerConfig

WARMUP_STEPS = 2
ENCODER_ONLY = ("enc_layer_output_scale.weight",)  # tensors a denoising step does not read
READ_TWICE = ("token_embd.weight",)  # the tied lm_head, then the self-conditioning product


# --- bytes a step reads --------------------------------------------------------------------------------------

def nbytes(value) -> int:
    """Bytes of one weight as a backend holds it: torch/numpy/mlx arrays, DevicePacked, QTensor, packed leaves."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not hasattr(value, "nbytes"):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if not isinstance(getattr(value, f.name), (int, float, str, tuple)))
    return int(getattr(value, "nbytes", 0))


def step_bytes(weights: dict) -> int:
    """Bytes of weights one full-canvas denoising step reads (see the module docstring)."""
    total = sum(nbytes(v) for k, v in weights.items() if not k.endswith(ENCODER_ONLY))
    return total + sum(nbytes(weights[k]) for k in READ_TWICE if k in weights)


# --- one configuration ---------------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def prompts_for(backend, prompt: int, batch: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, backend.args.vocab_size, prompt).tolist() for _ in range(batch)]


def one_block(backend, cache, prompts: list[list[int]], steps: int, clock: str) -> tuple[float, float, float]:
    """Seconds of (the prefill of every slot, one step, one commit): reset the slots, prefill, `steps` steps, and
    commit each row's canvas."""
    rows = range(len(prompts))
    for s in rows:
        cache.reset(s)
    prefill = timed(lambda: [backend.encode(s, prompts[s], cache) for s in rows], clock)
    cfg = SamplerConfig(steps=steps)
    box = [backend.start([Row(s, dataclasses.replace(cfg, seed=s)) for s in rows], cache)]

    def run():
        for _ in range(steps):
            box[0] = backend.step(box[0], cache)
            backend.done(box[0])  # the loop's one host read per step; early stop off: its value is ignored
    step = timed(run, clock) / steps
    canvases = backend.tolist(backend.canvas(box[0]))
    commit = timed(lambda: [backend.encode(s, canvases[s], cache) for s in rows], clock) / len(prompts)
    return prefill, step, commit


def adaptive_block(backend, prompts: list[list[int]], steps: int, clock: str) -> tuple[float, float]:
    """(effective tok/s, mean steps per block): the engine's loop with the normal stop rule over rows whose prompts
    are already in their slots (so only steps and commits are timed), two blocks per row, no EOS."""
    from dgrun.engine import Engine

    c = backend.args.canvas_length
    cache = backend.new_cache(len(prompts), max(map(len, prompts)) + c)
    for slot, p in enumerate(prompts):
        backend.encode(slot, p, cache)
    engine = Engine(backend, cache)
    cfg = SamplerConfig(steps=steps, max_new_tokens=2 * c)
    reqs = [Request([], dataclasses.replace(cfg, seed=i), eos_ids=(), index=i, slot=i) for i in range(len(prompts))]
    for req in reqs:
        engine.add(req)  # continues its slot's context: nothing left to prefill

    def run():
        while engine.busy:
            engine.step()
    seconds = timed(run, clock)
    tokens = sum(len(r.stats.ids) for r in reqs)
    return tokens / seconds, statistics.fmean(s for r in reqs for s in r.stats.steps_per_block)


def measure(backend, prompt: int, batch: int, steps: int = 16, reps: int = 3, adaptive: bool = False,
            seed: int = 0, rss0: int = 0) -> dict:
    """One row of the table: (prompt, batch) on `backend`; figures are {"mean", "sd"} over `reps`, and
    "step_ms_runs" the ms/step of each repetition (`add_roofline` reads them)."""
    clock = kind(backend)
    c = backend.args.canvas_length
    reset_peak(clock)
    prompts = prompts_for(backend, prompt, batch, seed)
    cache = backend.new_cache(batch, prompt + c)
    one_block(backend, cache, prompts, WARMUP_STEPS, clock)
    runs = [one_block(backend, cache, prompts, steps, clock) for _ in range(reps)]
    row = {
        "prompt": prompt, "batch": batch, "steps": steps,
        "prefill_tok_s": mean_sd([batch * prompt / p for p, _, _ in runs]),
        "ms_per_step": mean_sd([s * 1e3 for _, s, _ in runs]),
        "step_ms_runs": [s * 1e3 for _, s, _ in runs],
        "ms_per_commit": mean_sd([m * 1e3 for _, _, m in runs]),
        "tok_s": mean_sd([batch * c / (steps * s + batch * m) for _, s, m in runs]),
    }
    if adaptive:
        eff = [adaptive_block(backend, prompts, steps, clock) for _ in range(reps)]
        row["eff_tok_s"] = mean_sd([e for e, _ in eff])
        row["adaptive_steps"] = mean_sd([n for _, n in eff])
    row["peak_mem_mb"] = peak_memory(clock, rss0) / 2**20
    del cache
    gc.collect()
    return row


def add_roofline(row: dict, read_bytes: int, bandwidth: float) -> dict:
    """roofline = (read_bytes / bandwidth) / step time, per repetition."""
    row["roofline"] = mean_sd([read_bytes / bandwidth / (ms / 1e3) for ms in row["step_ms_runs"]])
    return row


# --- the whole run -------------------------------------------------------------------------------------------

def run(model=None, random_spec: str | None = None, backend: str = "auto", prompts=(512,), batches=(1,),
        steps: int = 16, reps: int = 3, adaptive: bool = False, against_transformers: bool = False,
        dtype: str | None = None, seed: int = 0, threads: int | None = None, device: str | None = None) -> dict:
    """Every (prompt, batch) configuration; returns the report (header fields and rows), as --json prints it.
    device: the cuda backend's torch device (default "cuda"; "cpu" is its test mode under TRITON_INTERPRET=1)."""
    from dgrun.backends import pick
    from dgrun.models.diffusion_gemma import n_params
    from dgrun.threads import set_threads

    check_sizes(prompts, batches, steps, reps)
    if against_transformers:
        from dgrun.bench_reference import require_transformers

        require_transformers()
    gc.collect()
    rss0 = rss()
    args, weights, described, path = load_weights(model, random_spec, backend, device)
    if pick(backend) == "cpu":
        set_threads(threads, n_params(args))
    be = make_backend(backend, args, weights, dtype, device)
    clock = kind(be)
    read_bytes = step_bytes(getattr(be, "w", None) or weights)
    rows = [measure(be, p, b, steps, reps, adaptive, seed, rss0) for p in prompts for b in batches]
    bandwidth, probe = copy_bandwidth(clock)  # after the rows: its buffers must not count in their peak memory
    rows = [add_roofline(r, read_bytes, bandwidth) for r in rows]
    report = {
        "device": device_name(clock), "backend": be.name, "weights": described,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "canvas_length": args.canvas_length, "step_bytes": read_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9, "copy_probe_mb": probe / 2**20, "rows": rows,
    }
    if against_transformers:
        from dgrun.bench_reference import compare

        del be, weights
        gc.collect()
        if clock == "cuda":
            torch.cuda.empty_cache()
        described, ref_ms = compare(args, path, rows, clock, reps, seed)
        report["reference"] = {"described": described, "rows": []}
        for r, ms in zip(rows, ref_ms):
            r["ref_ms_per_step"], r["speedup"] = mean_sd(ms), statistics.fmean(ms) / r["ms_per_step"]["mean"]
            report["reference"]["rows"].append({"prompt": r["prompt"], "batch": r["batch"],
                                                "ms_per_step": r["ref_ms_per_step"]})
    return report


def check_sizes(prompts, batches, steps: int, reps: int) -> None:
    for flag, values in (("-p/--n-prompt", prompts), ("-b/--batch", batches)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise DgrunError(f"{flag} takes positive integers, got {list(values)}")
    if steps < 1 or reps < 1:
        raise DgrunError(f"--steps and -r/--repetitions must be >= 1, got {steps} and {reps}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--gpu-check"]:
        from dgrun.gpu_check import main

        sys.exit(main())
    print("usage: python -m dgrun.bench --gpu-check   (the benchmark itself: dgrun bench --help)", file=sys.stderr)
    sys.exit(2)
