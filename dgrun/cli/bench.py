"""`dgrun bench`: prefill, step and commit speed per (prompt size, batch size), llama-bench style (dgrun/bench.py)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from dgrun.cli.app import app
from dgrun.cli.options import Dtype, Threads
from dgrun.errors import DgrunError

EXAMPLES = """Examples:

\b
  dgrun bench --random-weights 26b-a4b:Q4_K_M --backend cuda -p 4096 -b 1,4
  dgrun bench --random-weights tiny:Q8_0 --backend cpu -p 16 -b 1,2 --steps 2 --json
  dgrun bench -m model-Q4_K_M.gguf -p 512 --adaptive
  python -m dgrun.bench --gpu-check        (kernel tests, parity, graphs, full-size benchmark)"""


def int_list(text: str) -> list[int]:
    """'512,4096' -> [512, 4096]; anything else is a usage error (one line, exit code 2)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"positive integers separated by commas (e.g. 512,4096), got {text!r}")
    return values


def check_spec(spec: str | None) -> str | None:
    from dgrun.random_weights import parse_spec

    if spec is not None:
        try:
            parse_spec(spec)
        except DgrunError as e:
            raise typer.BadParameter(str(e)) from None
    return spec


def check_backend(name: str) -> str:
    if name not in ("auto", "cpu", "cuda", "mlx"):
        raise typer.BadParameter(f"auto, cpu, cuda or mlx, got {name!r}")
    return name


# --- output --------------------------------------------------------------------------------------------------

COLUMNS = [("prompt", "prompt"), ("batch", "B"), ("steps", "steps"), ("prefill_tok_s", "prefill tok/s"),
           ("ms_per_step", "ms/step"), ("ms_per_commit", "ms/commit"), ("tok_s", "tok/s"),
           ("eff_tok_s", "eff. tok/s"), ("adaptive_steps", "steps (adaptive)"), ("peak_mem_mb", "peak MB"),
           ("roofline", "roofline"), ("ref_ms_per_step", "transformers ms/step"), ("speedup", "speedup")]


def cell(value) -> str:
    if isinstance(value, dict):
        return f"{fmt(value['mean'])} ± {fmt(value['sd'])}"
    return fmt(value) if isinstance(value, float) else str(value)


def fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 1000 else f"{x:,.0f}"


def render(report: dict) -> str:
    """The header lines and a markdown table, one row per configuration."""
    rows = report["rows"]
    cols = [(k, title) for k, title in COLUMNS if any(k in r for r in rows)]
    lines = [f"dgrun bench · {report['device']} · backend {report['backend']} · weights: {report['weights']} · "
             f"{report['date']}",
             f"weights read per step: {report['step_bytes'] / 1e9:.3f} GB (every decoder weight once, all experts, "
             f"the embedding twice) · copy bandwidth: {report['copy_bandwidth_gb_s']:.1f} GB/s (read + write, "
             f"{report['copy_probe_mb']:.0f} MiB buffer) · canvas {report['canvas_length']}"]
    if "reference" in report:
        lines.append(f"transformers reference: {report['reference']['described']}")
    lines += ["", "| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[k]) if k in r else "" for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


@app.command(epilog=EXAMPLES, short_help="Measure prefill, step and commit speed (llama-bench style).")
def bench(
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", metavar="PATH", help="Checkpoint dir, .gguf file or hub repo id [the embedded tiny model "
        "unless --random-weights].")] = None,
    random_weights: Annotated[Optional[str], typer.Option(
        "--random-weights", metavar="ARCH:MIX", help="Random weights built on the device: ARCH 26b-a4b | tiny, "
        "MIX Q4_K_M | Q8_0 | BF16 (speed does not depend on weight values).", callback=check_spec)] = None,
    backend: Annotated[str, typer.Option(
        "--backend", metavar="NAME", help="auto | cpu | cuda | mlx [auto].", callback=check_backend)] = "auto",
    n_prompt: Annotated[str, typer.Option("--n-prompt", "-p", metavar="N,N", help="Prompt sizes in tokens.",
                                          callback=int_list)] = "512",
    batch: Annotated[str, typer.Option("--batch", "-b", metavar="B,B", help="Batch sizes (rows per step).",
                                       callback=int_list)] = "1",
    steps: Annotated[int, typer.Option("--steps", metavar="S", min=1, help="Denoising steps per block, fixed "
                                                                            "(early stop off).")] = 16,
    adaptive: Annotated[bool, typer.Option("--adaptive", help="Also the engine's loop with the normal stop rule: "
                                                              "effective tok/s and steps per block.")] = False,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", metavar="N", min=1,
                                             help="Timed repetitions per configuration.")] = 3,
    against_transformers: Annotated[bool, typer.Option(
        "--against-transformers", help="Time transformers' reference step too, and print the ratio.")] = False,
    dtype: Dtype = None,
    threads: Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
):
    """Measure prefill tok/s, ms per denoising step, ms per commit, tok/s, peak memory and the fraction of the
    weight-streaming roofline, for each prompt size x batch size."""
    from dgrun import bench as b
    from dgrun.cli.options import model_path

    prompts, batches = n_prompt, batch  # lists, from the callbacks
    if random_weights is None:
        model = model_path(model, None)  # -m (a path or a hub repo id), else the embedded model
    elif model is not None:
        raise DgrunError("give -m/--model or --random-weights, not both")
    report = b.run(model, random_weights, backend, prompts, batches, steps, repetitions, adaptive,
                   against_transformers, dtype, threads=threads)
    print(json.dumps(report) if as_json else render(report))
