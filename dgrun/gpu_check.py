"""`python -m dgrun.bench --gpu-check`: everything issue 11 asks of a GPU, in one command, with one report.

Four parts, each in its own subprocess (`python -m dgrun.gpu_check PART`) with its own time budget, so a crash,
an out-of-memory or a hang in one part cannot hide the others; the whole check fits in 8 minutes on one
H100 / H200 (the budgets below sum to 450 s, plus process start-ups):

| part | what it runs | budget |
|---|---|---|
| kernels | pytest tests/test_kernels_*.py natively (TRITON_INTERPRET=0, DGRUN_KERNEL_DEVICE=cuda) | 90 s |
| parity | the cuda backend against the cpu backend (float32 logits of `Backend.denoise`, max abs error <= 1e-4 of the logits' scale): random tiny weights Q8_0, Q4_K_M and BF16 (packed on the GPU vs dequantized by gguf-py on the CPU), and the embedded GGUF model loaded by both | 45 s |
| graphs | the cuda backend stepping with CUDA graphs on and off (DGRUN_CUDA_GRAPHS=1/0), same rows and seeds: three steps over one cache, then two over a second cache in the same slots; identical drafts and done flags, self-conditioning inputs within 1e-5 | 45 s |
| bench-q4 | `dgrun bench --random-weights 26b-a4b:Q4_K_M --backend cuda -p 4096 -b 1,4 --steps 16 -r 3 --against-transformers` | 180 s |
| bench-bf16 | the same with 26b-a4b:BF16, -r 2, without transformers | 90 s |

It prints one markdown report (each part's status, seconds, and output) and exits 1 if any part failed, 2 on a
machine without CUDA (one line, nothing run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the source tree (tests/ lives here in a checkout)
BENCH = ["-m", "dgrun.cli", "bench", "--backend", "cuda", "-p", "4096", "-b", "1,4", "--steps", "16"]
PARTS = {  # name -> (budget in seconds, what it checks)
    "kernels": (90, "kernel tests, native"),
    "parity": (45, "cuda backend vs cpu backend, fp32 logits"),
    "graphs": (45, "CUDA graphs on vs off"),
    "bench-q4": (180, "26B-A4B random Q4_K_M, prompt 4096, batch 1 and 4, 16 fixed steps, vs transformers"),
    "bench-bf16": (90, "26B-A4B random BF16, prompt 4096, batch 1 and 4, 16 fixed steps"),
}
TOLERANCE = 1e-4


# --- the parts (each runs in its own process) -----------------------------------------------------------------

def part_kernels() -> str:
    tests = sorted(str(p) for p in (ROOT / "tests").glob("test_kernels_*.py"))
    if not tests:
        raise RuntimeError(f"no tests/test_kernels_*.py under {ROOT} (run from a source checkout)")
    env = dict(os.environ, TRITON_INTERPRET="0", DGRUN_KERNEL_DEVICE="cuda")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
    if out.returncode:
        raise RuntimeError(f"pytest exited {out.returncode}\n{tail}")
    return tail


def tiny_pair(mix: str):
    """(cpu backend, cuda backend) over the same random tiny weights: float32 both, dequantized on the CPU."""
    from dgrun.bench_weights import make_backend
    from dgrun.random_weights import ARCHES, random_weights
    from dgrun.models.diffusion_gemma import ModelArgs

    args = ModelArgs(**ARCHES["tiny"])
    weights = random_weights(args, mix, "cuda", seed=1)
    return make_backend("cpu", args, weights, "float32"), make_backend("cuda", args, weights, "float32")


def logits_gap(cpu, gpu, seed: int = 0) -> float:
    """Max abs difference of denoise logits (no self-conditioning, then with the first pass's logits), divided by
    the reference logits' largest magnitude (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    vocab, c = cpu.args.vocab_size, cpu.args.canvas_length
    prompt, canvas = torch.randint(0, vocab, (24,), generator=g).tolist(), torch.randint(0, vocab, (2, c), generator=g)
    gaps = []
    caches = {}
    for be in (cpu, gpu):
        caches[be] = be.new_cache(2, 64)
        for slot in (0, 1):
            be.encode(slot, prompt[: 20 + 4 * slot], caches[be])
    ref1 = cpu.denoise(canvas, caches[cpu]).float()
    got1 = gpu.denoise(canvas, caches[gpu]).float().cpu()
    ref2 = cpu.denoise(canvas, caches[cpu], ref1).float()
    got2 = gpu.denoise(canvas, caches[gpu], ref1).float().cpu()
    for ref, got in ((ref1, got1), (ref2, got2)):
        gaps.append(float((ref - got).abs().max()) / max(1.0, float(ref.abs().max())))
    return max(gaps)


def part_parity() -> str:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lines, bad = [], []
    for mix in ("Q8_0", "Q4_K_M", "BF16"):
        gap = logits_gap(*tiny_pair(mix))
        lines.append(f"tiny {mix}: max |cuda - cpu| / scale = {gap:.2e}")
        bad += [mix] if not gap <= TOLERANCE else []
    import dgrun

    cpu_model, gpu_model = dgrun.load(backend="cpu", dtype="float32"), dgrun.load(backend="cuda", dtype="float32")
    gap = logits_gap(cpu_model.backend, gpu_model.backend)
    lines.append(f"embedded GGUF (models/tiny-stdlib-Q8_0.gguf): {gap:.2e}")
    bad += ["embedded GGUF"] if not gap <= TOLERANCE else []
    if bad:
        raise RuntimeError(f"over {TOLERANCE:g}: {', '.join(bad)}\n" + "\n".join(lines))
    return "\n".join(lines)


def graph_run(on: bool, args, weights, steps: int = 3):
    """Per step, (drafts, done, soft) of two rows with CUDA graphs on or off: `steps` steps over one cache, then
    two over a second cache of other prompts in the same slots (a graph must follow the cache it is given); and
    the ms of the last step."""
    from dgrun.backends.row import Row
    from dgrun.bench_weights import make_backend
    from dgrun.bench_device import timed
    from dgrun.generate import SamplerConfig

    os.environ["DGRUN_CUDA_GRAPHS"] = "1" if on else "0"  # read when the backend is made
    be = make_backend("cuda", args, weights, "float32")
    out, ms = [], 0.0
    for first, n in ((5, steps), (100, 2)):
        cache = be.new_cache(2, 64)
        for slot in (0, 1):
            be.encode(slot, list(range(first, first + 20 + slot)), cache)
        state = be.start([Row(s, SamplerConfig(steps=8, seed=s)) for s in (0, 1)], cache)
        for _ in range(n):
            box = []
            ms = timed(lambda: box.append(be.step(state, cache)), "cuda") * 1e3
            state = box[0]
            out.append((be.tolist(be.canvas(state)), be.done(state), state.soft.float().cpu().clone()))
    return out, ms


def part_graphs() -> str:
    from dgrun.random_weights import ARCHES, random_weights
    from dgrun.models.diffusion_gemma import ModelArgs

    args = ModelArgs(**ARCHES["tiny"])
    weights = random_weights(args, "Q4_K_M", "cuda", seed=2)
    (eager, ms_off), (graphed, ms_on) = graph_run(False, args, weights), graph_run(True, args, weights)
    for i, ((ids0, done0, soft0), (ids1, done1, soft1)) in enumerate(zip(eager, graphed)):
        if ids0 != ids1 or done0 != done1 or not torch.allclose(soft0, soft1, atol=1e-5, rtol=0):
            raise RuntimeError(f"step {i + 1} of {len(eager)} (the last 2 on a second cache): graphs on and off "
                               f"differ (drafts equal: {ids0 == ids1}, done equal: {done0 == done1}, soft max gap "
                               f"{float((soft0 - soft1).abs().max()):.2e})")
    return (f"{len(eager)} steps identical with graphs on and off (3 on one cache, 2 on a second one); last step "
            f"{ms_on:.2f} ms (graphs) vs {ms_off:.2f} ms (eager)")


def part_bench(mix: str, extra: list[str]) -> str:
    out = subprocess.run([sys.executable, *BENCH, "--random-weights", f"26b-a4b:{mix}", *extra], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(f"dgrun bench exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip()


RUN = {"kernels": part_kernels, "parity": part_parity, "graphs": part_graphs,
       "bench-q4": lambda: part_bench("Q4_K_M", ["-r", "3", "--against-transformers"]),
       "bench-bf16": lambda: part_bench("BF16", ["-r", "2"])}


# --- the driver -----------------------------------------------------------------------------------------------

def run_part(name: str) -> tuple[str, float, str]:
    """(status, seconds, output) of one part in a fresh process under its budget."""
    budget = PARTS[name][0]
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "dgrun.gpu_check", name], capture_output=True, text=True,
                             timeout=budget)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "TIMEOUT", time.perf_counter() - t0, f"over its {budget} s budget\n{text.strip()[-2000:]}"
    status = "ok" if out.returncode == 0 else "FAIL"
    text = out.stdout.strip() if out.returncode == 0 else (out.stdout + out.stderr).strip()[-4000:]
    return status, time.perf_counter() - t0, text


def report(results: dict) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    lines = [f"# dgrun --gpu-check · {torch.cuda.get_device_name()} · torch {torch.__version__} · triton "
             f"{triton_version} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| part | checks | status | seconds (budget) |", "|---|---|---|---|"]
    lines += [f"| {n} | {PARTS[n][1]} | {s} | {t:.0f} ({PARTS[n][0]}) |" for n, (s, t, _) in results.items()]
    for n, (_, _, text) in results.items():
        lines += ["", f"## {n}", "", "```", text, "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in RUN:  # one part, in this process
        print(RUN[argv[0]]())
        return 0
    if not torch.cuda.is_available():
        print("dgrun: --gpu-check needs a CUDA GPU, and torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    results = {}
    for name in PARTS:
        results[name] = run_part(name)
        print(f"{name}: {results[name][0]} ({results[name][1]:.0f} s)", file=sys.stderr, flush=True)
    print(report(results))
    return 0 if all(s == "ok" for s, _, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
