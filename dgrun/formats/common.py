"""What every format reader shares: the Checkpoint it returns, the shape and type check, and the sampler
defaults of a directory's generation_config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgrun import checks
from dgrun.errors import DgrunError
from dgrun.jsonfile import read_json
from dgrun.models.diffusion_gemma import SAMPLER_KEYS, ModelArgs, expected_shapes
from dgrun.packed import GGUF_PACKED, AffineTensor, QTensor

FLOAT_DTYPES = {"F32", "F16", "BF16", "float32", "float16", "bfloat16"}  # safetensors and torch names


@dataclass
class Checkpoint:
    args: ModelArgs
    weights: dict
    defaults: dict = field(default_factory=dict)  # sampler knobs from generation_config.json or GGUF metadata
    path: Path | None = None
    tokenizer: Any = None  # dgrun.tokenizer.Tokenizer, when the checkpoint has one


def _dtype(value) -> str | None:
    """A weight's element type, by name, for the float weights (torch tensors and header-only refs)."""
    dtype = getattr(value, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def check_shapes(weights: dict, args: ModelArgs) -> None:
    """Every tensor the config needs is there, with the config's shape and a type the engine runs."""
    want = expected_shapes(args)
    missing = [k for k in want if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DgrunError(f"missing tensor {missing[0]}{more}")
    for name, shape in want.items():
        value = weights[name]
        got = tuple(value.shape)
        if got != shape:
            raise DgrunError(f"tensor {name} has shape {list(got)}, expected {list(shape)} from the config")
        if isinstance(value, QTensor):
            if value.qtype not in GGUF_PACKED:
                raise DgrunError(f"tensor {name} has type {value.qtype.name}, which dgrun does not run")
        elif not isinstance(value, AffineTensor) and _dtype(value) not in FLOAT_DTYPES | {None}:
            raise DgrunError(f"tensor {name} has dtype {_dtype(value)}, expected float32, float16 or bfloat16")


def generation_defaults(gen: dict, source) -> dict:
    """Sampler knobs from a `generation_config.json` (SAMPLER_KEYS), checked as SamplerConfig checks them."""
    out = {}
    for knob, key, _, _ in SAMPLER_KEYS:
        node = gen
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[knob] = node
    try:
        return checks.sampler(out)
    except DgrunError as e:
        raise DgrunError(f"{source}: {e}") from None


def read_generation_config(path: Path, args: ModelArgs) -> tuple[dict, ModelArgs]:
    """A directory's `generation_config.json`: sampler defaults, and args with its EOS / pad ids."""
    file = path / "generation_config.json"
    gen = read_json(file, missing={})
    ids = {name: gen[name] for name in ("eos_token_id", "pad_token_id") if gen.get(name) is not None}
    try:
        args = dataclasses.replace(args, **ids) if ids else args
    except DgrunError as e:
        raise DgrunError(f"{file}: {e}") from None
    return generation_defaults(gen, file), args
