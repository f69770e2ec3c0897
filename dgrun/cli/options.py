"""Option aliases shared by the verbs that generate (run, chat): one definition per flag."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Checkpoint dir, .gguf file or hub repo id [the embedded tiny model].")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Max denoising steps per block [48].")]
TMax = Annotated[Optional[float], typer.Option("--t-max", help="Temperature at the first step [0.8].")]
TMin = Annotated[Optional[float], typer.Option("--t-min", help="Temperature at the last step [0.4].")]
EntropyBound = Annotated[Optional[float], typer.Option("--entropy-bound", help="Acceptance bound [0.1].")]
Stability = Annotated[Optional[int], typer.Option("--stability", help="stability_threshold [1].")]
Confidence = Annotated[Optional[float], typer.Option("--confidence", help="confidence_threshold [0.005].")]
Seed = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed [0].")]
Backend = Annotated[str, typer.Option("--backend", help="auto | cpu | mlx (auto: mlx on Apple silicon)")]
Dtype = Annotated[Optional[str], typer.Option(
    "--dtype", help="float32 | bfloat16 (cpu default float32); mlx also float16, q4, q8 (quantize at load)")]


def sampler_knobs(steps, t_max, t_min, entropy_bound, stability, confidence, seed, **more) -> dict:
    """The flags in the Python API's names."""
    return dict(steps=steps, t_max=t_max, t_min=t_min, entropy_bound=entropy_bound, stability_threshold=stability,
                confidence_threshold=confidence, seed=seed, **more)


def default_model():
    """The embedded tiny model, used when no -m is given."""
    from dgrun.errors import DgrunError
    from dgrun.models import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        raise DgrunError(f"no -m given and the embedded default model is missing ({DEFAULT_MODEL})")
    return DEFAULT_MODEL
