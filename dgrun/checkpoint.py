"""Read a checkpoint into (ModelArgs, flat weights dict, sampler defaults).

An HF directory is globbed into one flat dict with `safe_open` and renamed by `sanitize`
(models/diffusion_gemma.py holds the table); a GGUF file is read by dgrun.gguf_io.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dgrun.errors import DgrunError, notice
from dgrun.models.diffusion_gemma import HF_DROP, HF_VISION, ModelArgs, expected_shapes, hf_to_gguf_name


@dataclass
class Checkpoint:
    args: ModelArgs
    weights: dict
    defaults: dict = field(default_factory=dict)  # sampler knobs from generation_config.json or GGUF metadata
    path: Path | None = None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DgrunError(f"{path}: cannot read JSON ({e})") from e


def generation_defaults(gen: dict) -> dict:
    """Sampler knobs from a `generation_config.json`, in dgrun's names."""
    out = {}
    names = {"max_denoising_steps": "steps", "t_min": "t_min", "t_max": "t_max", "max_new_tokens": "max_new_tokens",
             "stability_threshold": "stability_threshold", "confidence_threshold": "confidence_threshold"}
    for src, dst in names.items():
        if gen.get(src) is not None:
            out[dst] = gen[src]
    bound = (gen.get("sampler_config") or {}).get("entropy_bound")
    if bound is not None:
        out["entropy_bound"] = bound
    return out


def read_generation_config(path: Path, args: ModelArgs) -> dict:
    """A directory's `generation_config.json`: sampler defaults, and its EOS / pad ids into `args`."""
    if not (path / "generation_config.json").is_file():
        return {}
    gen = read_json(path / "generation_config.json")
    if gen.get("eos_token_id") is not None:
        eos = gen["eos_token_id"]
        args.eos_token_id = [eos] if isinstance(eos, int) else list(eos)
    if gen.get("pad_token_id") is not None:
        args.pad_token_id = gen["pad_token_id"]
    return generation_defaults(gen)


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """HF names -> flat-dict names; drop what dgrun does not use; check every needed tensor and its shape."""
    out, vision = {}, False
    for name, tensor in weights.items():
        new = hf_to_gguf_name(name)
        if new is None:
            vision |= bool(HF_VISION.match(name))
            if not HF_DROP.match(name):
                raise DgrunError(f"unexpected tensor {name!r}: not a DiffusionGemma checkpoint?")
            continue
        out[new] = tensor
    if vision:
        notice("skipping the vision tower: image input is not supported yet")
    check_shapes(out, args)
    return out


def check_shapes(weights: dict, args: ModelArgs) -> None:
    want = expected_shapes(args)
    missing = [k for k in want if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DgrunError(f"missing tensor {missing[0]}{more}")
    for name, shape in want.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise DgrunError(f"tensor {name} has shape {list(got)}, expected {list(shape)} from the config")


@dataclass(frozen=True)
class LazyTensor:
    """A safetensors tensor known by its header only; `convert` and `info` stream these."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str  # the safetensors dtype: "BF16", "F16", "F32", ...


def open_hf_dir(path: Path) -> Checkpoint:
    """Config, sampler defaults and the sanitized weights as LazyTensor (nothing is read but headers)."""
    from safetensors import SafetensorError, safe_open

    if not (path / "config.json").is_file():
        raise DgrunError(f"{path}: no config.json, not a Hugging Face checkpoint directory")
    args = ModelArgs.from_config(read_json(path / "config.json"))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DgrunError(f"{path}: no *.safetensors files")
    refs = {}
    try:
        for f in files:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    part = st.get_slice(name)
                    refs[name] = LazyTensor(f, name, tuple(part.get_shape()), part.get_dtype())
    except (SafetensorError, OSError) as e:
        raise DgrunError(f"{f}: cannot read safetensors ({e})") from e
    defaults = read_generation_config(path, args)
    return Checkpoint(args, sanitize(refs, args), defaults, path)


def read_tensors(refs: dict) -> dict:
    """Read LazyTensor refs into torch tensors, each file opened once."""
    from safetensors import SafetensorError, safe_open

    out, by_file = {}, {}
    for key, ref in refs.items():
        by_file.setdefault(ref.file, []).append((key, ref.name))
    for f, names in by_file.items():
        try:
            with safe_open(f, framework="pt") as st:
                for key, name in names:
                    out[key] = st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise DgrunError(f"{f}: cannot read safetensors ({e})") from e
    return {k: out[k] for k in refs}


def load_hf_dir(path: Path) -> Checkpoint:
    ckpt = open_hf_dir(path)
    ckpt.weights = read_tensors(ckpt.weights)
    return ckpt


def load(path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise DgrunError(f"{path}: no such file or directory")
    if path.is_dir():
        from dgrun.mlx_io import is_mlx_dir, load_mlx_dir  # MLX-format directories (issue 5)

        return load_mlx_dir(path) if is_mlx_dir(path) else load_hf_dir(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix.lower() == ".gguf" or magic == b"GGUF":
        from dgrun.gguf_io import load_gguf

        return load_gguf(path)
    raise DgrunError(f"{path}: not a checkpoint directory or a .gguf file")
