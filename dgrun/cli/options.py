"""Options shared by the verbs that generate (run, chat): one definition per flag, llama.cpp spellings included.

A default shown as [model] comes from the checkpoint (generation_config.json or GGUF metadata), falling back to
the reference's value given after it.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dgrun.api import MAX_SEED
from dgrun.errors import DgrunError

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="PATH", help="Checkpoint dir, .gguf file or hub repo id [the embedded tiny model].")]
HfRepo = Annotated[Optional[str], typer.Option(
    "--hf-repo", "-hf", metavar="USER/REPO[:QUANT]", help="Hub GGUF repo (Q4_K_M by default).")]
NPredict = Annotated[Optional[int], typer.Option(
    "--n-predict", "-n", "--max-tokens", metavar="N", help="Most tokens to generate (max_new_tokens).")]
Steps = Annotated[Optional[int], typer.Option(
    "--steps", "--diffusion-steps", metavar="S", help="Max denoising steps per block [model, else 48].")]
Temp = Annotated[Optional[float], typer.Option(
    "--temp", metavar="T", min=0, help="Constant temperature: t_min = t_max = T; 0 is greedy (argmax draws).")]
TMax = Annotated[Optional[float], typer.Option(
    "--t-max", metavar="T", min=0, help="Temperature at the first step [model, else 0.8].")]
TMin = Annotated[Optional[float], typer.Option(
    "--t-min", metavar="T", min=0, help="Temperature at the last step [model, else 0.4].")]
EntropyBound = Annotated[Optional[float], typer.Option(
    "--entropy-bound", metavar="B", help="Acceptance bound [model, else 0.1].")]
Stability = Annotated[Optional[int], typer.Option(
    "--stability", metavar="K", help="stability_threshold [model, else 1].")]
Confidence = Annotated[Optional[float], typer.Option(
    "--confidence", metavar="C", help="confidence_threshold [model, else 0.005].")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", "-s", metavar="SEED", min=-1, help="Random seed; -1 picks one and prints it [0].")]
CtxSize = Annotated[Optional[int], typer.Option(
    "--ctx-size", "-c", metavar="N",
    help="Context limit in tokens: prompt plus committed blocks [the model's context length, capped by memory].")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", "-t", metavar="N", min=1, help="CPU threads [1 for a model under 100M parameters, else the "
                                               "physical cores].")]
Backend = Annotated[str, typer.Option(
    "--backend", metavar="NAME", help="auto | cpu | cuda | mlx (auto: cuda with an NVIDIA GPU, mlx on Apple silicon, else cpu) [auto].",
    show_default=False)]
GpuLayers = Annotated[Optional[int], typer.Option(
    "--n-gpu-layers", "-ngl", metavar="N", help="llama.cpp's flag: N > 0 asks for the GPU backend (mlx on Apple "
                                                "silicon; cuda is not built yet), 0 for the cpu.")]
FlashAttn = Annotated[bool, typer.Option(
    "--flash-attn", "-fa", help="llama.cpp's flag, accepted: dgrun's backends always use their fused attention.")]
Dtype = Annotated[Optional[str], typer.Option(
    "--dtype", metavar="D", help="float32 | bfloat16 (cpu default float32); mlx also float16, q4, q8 (quantize "
                                 "at load).")]
System = Annotated[Optional[str], typer.Option("--system", "-sys", metavar="TEXT", help="System prompt.")]
Template = Annotated[Optional[str], typer.Option(
    "--chat-template", "--chat-template-file", metavar="FILE", help="Jinja chat template file (overrides the model's).")]
Conversation = Annotated[Optional[bool], typer.Option(
    "--chat/--no-chat-template", "-cnv/-no-cnv", help="Apply the chat template to the prompt, or not (raw "
    "completion) [run: only with -sys/--chat-template; chat: always].", show_default=False)]
Visual = Annotated[bool, typer.Option("--visual", "--diffusion-visual", help="Show the canvas denoising live (terminal only).")]


def sampler_knobs(steps, t_max, t_min, entropy_bound, stability, confidence, seed, temp=None, **more) -> dict:
    """The flags in the Python API's names; --temp T sets t_min = t_max = T."""
    if temp is not None:
        if t_max is not None or t_min is not None:
            raise DgrunError("give --temp or --t-max/--t-min, not both")
        t_max = t_min = temp
    if seed is not None and seed > MAX_SEED:
        raise DgrunError(f"--seed takes -1 (random) or 0 to {MAX_SEED}, got {seed}")
    knobs = dict(steps=steps, t_max=t_max, t_min=t_min, entropy_bound=entropy_bound, stability_threshold=stability,
                 confidence_threshold=confidence, seed=seed, **more)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    from dgrun.generate import SamplerConfig

    SamplerConfig(t_min=0.0, t_max=1e4).update(**knobs)  # bad values fail before the (slow) load; 1e4: the largest t
    return knobs


def backend_name(backend: str, n_gpu_layers: int | None) -> str:
    """--backend, or llama.cpp's -ngl: N > 0 means the GPU backend of this machine."""
    if n_gpu_layers is None:
        return backend
    if backend != "auto":
        raise DgrunError("give --backend or -ngl, not both")
    if n_gpu_layers <= 0:
        return "cpu"
    from dgrun.backends import _mlx_default

    return "mlx" if _mlx_default() else "cuda"


def default_model():
    """The embedded tiny model, used when no -m is given."""
    from dgrun.models import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        raise DgrunError(f"no -m given and the embedded default model is missing ({DEFAULT_MODEL})")
    return DEFAULT_MODEL


def model_path(model: str | None, hf_repo: str | None):
    """-m or -hf (a GGUF from the hub), else the embedded model."""
    from dgrun import hub

    if model is not None and hf_repo is not None:
        raise DgrunError("give one of -m/--model or -hf/--hf-repo, not both")
    if model is None and hf_repo is None:
        return default_model()
    if hf_repo is not None:
        if hub.parse(hf_repo) is None:
            raise DgrunError(f"-hf takes user/repo[:QUANT], got {hf_repo!r}")
        return hub.resolve(hf_repo, gguf=True)
    return hub.resolve(model)
