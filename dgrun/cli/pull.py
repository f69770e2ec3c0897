"""`dgrun pull REPO[:QUANT]`: download a model from the hub into the Hugging Face cache, without running it."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from dgrun.cli.app import app
from dgrun.errors import DgrunError


@app.command(epilog="Examples: dgrun pull user/DiffusionGemma-GGUF:Q8_0 · dgrun pull google/diffusiongemma",
             short_help="Download a model from the hub.")
def pull(
    repo: Annotated[str, typer.Argument(metavar="REPO", hidden=True)],
):
    """Download REPO (user/repo: a checkpoint, or its GGUF Q4_K_M; user/repo:QUANT: that GGUF), reusing the
    cache, and print its local path."""
    from dgrun import hub

    if hub.parse(repo) is None:
        raise DgrunError(f"pull takes user/repo[:QUANT], got {repo!r}")
    path = hub.resolve(repo, progress=sys.stderr.isatty())
    print(path)
