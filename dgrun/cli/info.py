"""`dgrun info`: what a GGUF or HF checkpoint holds, from its headers (no weights are read)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from dgrun.cli.app import app


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def render(d: dict) -> str:
    lines = [f"{d['path']}  ({d['format']})",
             f"  architecture     {d['architecture']}",
             f"  parameters       {d['parameters']:,}",
             f"  canvas_length    {d['canvas_length']}",
             f"  tensors          {d['tensors']}  ({_size(d['bytes'])})"]
    for name, row in d["types"].items():
        lines.append(f"    {name:<14} {row['tensors']:>5} tensors  {_size(row['bytes']):>10}")
    lines.append("  metadata")
    lines += [f"    {k:<24} {v}" for k, v in d["metadata"].items() if v is not None]
    lines.append("  hyperparameters")
    lines += [f"    {k:<24} {v}" for k, v in d["hyperparameters"].items()]
    lines.append("  sampler defaults" + ("" if d["sampler_defaults"] else "  (none stored: dgrun's defaults apply)"))
    lines += [f"    {k:<24} {v}" for k, v in d["sampler_defaults"].items()]
    return "\n".join(lines)


@app.command(epilog="Examples: dgrun info model-Q4_K_M.gguf · dgrun info (the embedded model)",
             short_help="What a checkpoint holds (headers only).")
def info(
    model: Annotated[Optional[str], typer.Argument(metavar="MODEL", hidden=True)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
):
    """Show what MODEL (a .gguf file, an HF or MLX checkpoint directory) [the embedded tiny model] holds:
    architecture, parameters, canvas length, tensor types and sizes, metadata and sampler defaults."""
    from dgrun.info import info as describe

    d = describe(model)
    print(json.dumps(d) if as_json else render(d))
