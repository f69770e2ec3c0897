"""`dgrun run`: generate once from a prompt and print the text and one stats line."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from dgrun.cli.app import app
from dgrun.cli.options import (Backend, Confidence, Dtype, EntropyBound, Model, Seed, Stability, Steps, TMax,
                               TMin, default_model, sampler_knobs)
from dgrun.errors import DgrunError
from dgrun.generate import SamplerConfig


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise DgrunError(f"--ids takes integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise DgrunError("--ids is empty")
    return ids


def stats_line(s) -> str:
    return (f"blocks {s.blocks} | steps/block {s.avg_steps:.1f} | tokens/forward {s.tokens_per_forward:.2f} | "
            f"{s.tokens_per_second:.1f} tok/s | prompt {s.prompt_tokens} tok")


EXAMPLES = """Examples:

  dgrun run -p "def fib(n):" -n 64                  (the embedded tiny model)

  dgrun run -m ./ckpt -p "def fib(n):" --steps 24 -s 1

  dgrun run -p "def area(r):" --suffix "    return result" --gap 12   (fill the gap)"""


@app.command(epilog=EXAMPLES)
def run(
    model: Model = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text (needs the model's tokenizer).")] = None,
    ids: Annotated[Optional[str], typer.Option("--ids", help="Prompt as raw token ids: '2,651,1378'.")] = None,
    suffix: Annotated[Optional[str], typer.Option(
        "--suffix", help="Infill: text after the gap; prints only what fills it (one block).")] = None,
    gap: Annotated[Optional[int], typer.Option(
        "--gap", help="Infill: tokens in the gap [canvas minus suffix, at least half the canvas].")] = None,
    n_predict: Annotated[Optional[int], typer.Option("--n-predict", "-n", help="max_new_tokens [256]")] = None,
    steps: Steps = None,
    t_max: TMax = None,
    t_min: TMin = None,
    entropy_bound: EntropyBound = None,
    stability: Stability = None,
    confidence: Confidence = None,
    seed: Seed = None,
    backend: Backend = "auto",
    dtype: Dtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
):
    """Generate from a prompt with block diffusion, or fill a gap (--suffix)."""
    import dgrun

    if (prompt is None) == (ids is None):
        raise DgrunError("give exactly one of -p/--prompt or --ids")
    if gap is not None and suffix is None:
        raise DgrunError("--gap needs --suffix")
    if suffix is not None and prompt is None:
        raise DgrunError("--suffix needs a text prompt (-p)")
    knobs = sampler_knobs(steps, t_max, t_min, entropy_bound, stability, confidence, seed, max_new_tokens=n_predict)
    SamplerConfig().update(**knobs)  # reject bad values before the (slow) load
    source = prompt if prompt is not None else parse_ids(ids)
    m = dgrun.load(model if model is not None else default_model(), backend=backend, dtype=dtype)
    if suffix is not None:
        if m.tokenizer is None:
            raise DgrunError("--suffix needs the model's tokenizer")
        result = m.infill(source, suffix, gap, **knobs)
    else:
        result = m.generate(source, **knobs)
    s = result.stats
    if as_json:
        print(json.dumps({
            "text": result.text, "ids": result.ids,
            "stats": {"blocks": s.blocks, "steps_per_block": s.steps_per_block,
                      "tokens_per_forward": s.tokens_per_forward, "seconds": s.seconds,
                      "tokens_per_second": s.tokens_per_second, "prompt_tokens": s.prompt_tokens},
        }))
        return
    print(result.text if m.tokenizer is not None else " ".join(map(str, result.ids)))
    print(stats_line(s), file=sys.stderr)
