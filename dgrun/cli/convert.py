"""`dgrun convert`: an HF checkpoint or a GGUF -> a GGUF in llama.cpp's DiffusionGemma layout."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from dgrun.cli.app import app
from dgrun.errors import DgrunError

TO_HELP = ("gguf-bf16 (BF16) | gguf-f16 (F16) | gguf-q8 (Q8_0) | gguf-q6 (Q6_K) | gguf-q5 (Q5_K_M) | gguf-q4 "
           "(Q4_K_M): llama.cpp's mixes, by either name, any case | mlx-bf16 | mlx-q8 | mlx-q4 (MLX directory: "
           "experts 4-bit, the rest 8-bit).")
TYPE_HELP = "GLOB=TYPE, e.g. 'blk.*.ffn_down_exps.weight=q8_0' (repeatable; the first match wins)."


@app.command(epilog="Example: dgrun convert ./ckpt --to Q4_K_M -o model-Q4_K_M.gguf",
             short_help="Convert a checkpoint to GGUF or MLX.")
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", hidden=True)],
    to: Annotated[str, typer.Option("--to", metavar="TYPE", help=TO_HELP)] = "gguf-q4",
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="OUT", help="Output file [SRC-TYPE.gguf next to SRC].")] = None,
    tensor_type: Annotated[Optional[list[str]], typer.Option("--tensor-type", metavar="GLOB=TYPE", help=TYPE_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUT if it exists.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", metavar="N", help="Worker threads [CPUs, at most 8].")] = None,
    q_group_size: Annotated[Optional[int], typer.Option("--q-group-size", metavar="N", help="mlx-*: group size [64].")] = None,
    q_bits: Annotated[Optional[int], typer.Option("--q-bits", metavar="N", help="mlx-*: bits of the experts [4 or 8].")] = None,
    q_uniform: Annotated[bool, typer.Option("--q-uniform", help="mlx-q4: --q-bits everywhere, no 8-bit rest.")] = False,
):
    """Convert SRC (an HF checkpoint directory, or a GGUF to requantize) to GGUF or to an MLX directory; the
    output appears only when complete."""
    from dgrun.convert.policy import target_name

    to = target_name(to)
    if to.startswith("mlx-"):  # MLX targets live in convert/mlx_writer.py (issue 5)
        from dgrun.convert.mlx_writer import convert_mlx

        m = convert_mlx(src, to=to, out=out, q_group_size=q_group_size, q_bits=q_bits, uniform=q_uniform,
                        force=force)
        print(f"dgrun: wrote {m.path} ({m.output_bytes / 1e6:.1f} MB in {m.shards} shard(s), "
              f"{len(m.quantized)} quantized matrices) in {m.seconds:.1f} s", file=sys.stderr)
        return
    if q_group_size is not None or q_bits is not None or q_uniform:
        raise DgrunError("--q-group-size/--q-bits/--q-uniform apply to the mlx-* targets")
    from dgrun.convert.convert import convert as run_convert

    r = run_convert(src, to=to, out=out, tensor_types=tensor_type or (), force=force, threads=threads,
                    progress=sys.stderr.isatty())
    s = r.stats
    print(f"dgrun: wrote {r.path} ({s.output_bytes / 1e6:.1f} MB, {s.tensors} tensors) in {s.seconds:.1f} s, "
          f"{s.mb_per_s:.0f} MB/s of source", file=sys.stderr)
