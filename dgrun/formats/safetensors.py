"""Read a Hugging Face DiffusionGemma directory (config.json + *.safetensors) into a Checkpoint.

The safetensors files are globbed into one flat dict with `safe_open` (the library checks each header: dtypes,
offsets inside the file, no overlap) and renamed by `sanitize` through the table in models/diffusion_gemma.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dgrun import checks, tokenizer
from dgrun.errors import DgrunError, notice
from dgrun.formats.common import Checkpoint, check_shapes, read_generation_config
from dgrun.jsonfile import read_json
from dgrun.models.diffusion_gemma import HF_DROP, HF_VISION, ModelArgs, hf_to_gguf_name

MAX_FILES = 4096  # the released checkpoint has a few dozen shards


@dataclass(frozen=True)
class LazyTensor:
    """A safetensors tensor known by its header only; `convert` and `info` stream these."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str  # the safetensors dtype: "BF16", "F16", "F32", ...


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DgrunError(f"{path}: no *.safetensors files")
    if len(files) > MAX_FILES:
        raise DgrunError(f"{path}: {len(files)} safetensors files (at most {MAX_FILES})")
    return files


def read_config(path: Path) -> tuple[dict, ModelArgs]:
    """config.json and the ModelArgs it describes, every value checked (errors name the file)."""
    if not (path / "config.json").is_file():
        raise DgrunError(f"{path}: no config.json, not a Hugging Face checkpoint directory")
    config = read_json(path / "config.json")
    try:
        return config, ModelArgs.from_config(config)
    except DgrunError as e:
        raise DgrunError(f"{path / 'config.json'}: {e}") from None


def headers(files: list[Path], skip=None) -> dict:
    """Every tensor of `files` as a LazyTensor (headers only), except names `skip` matches (kept as None)."""
    from safetensors import SafetensorError, safe_open

    refs = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    if name in refs:
                        raise DgrunError(f"{f}: tensor {name} is also in another file")
                    if skip is not None and skip(name):
                        refs[name] = None
                        continue
                    part = st.get_slice(name)
                    refs[name] = LazyTensor(f, name, tuple(part.get_shape()), part.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            raise DgrunError(f"{f}: cannot read safetensors ({checks.reason(e)})") from None
    return refs


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """HF names -> flat-dict names; drop what dgrun does not use; check every needed tensor and its shape."""
    out, vision = {}, False
    for name, tensor in weights.items():
        new = hf_to_gguf_name(name)
        if new is None:
            vision |= bool(HF_VISION.match(name))
            if not HF_DROP.match(name):
                raise DgrunError(f"unexpected tensor {name[:120]!r}: not a DiffusionGemma checkpoint?")
            continue
        out[new] = tensor
    if vision:
        notice("skipping the vision tower: image input is not supported yet")
    check_shapes(out, args)
    return out


def open_hf_dir(path: Path) -> Checkpoint:
    """Config, sampler defaults and the sanitized weights as LazyTensor (nothing is read but headers)."""
    _, args = read_config(path)
    refs = headers(safetensors_files(path))
    defaults, args = read_generation_config(path, args)
    try:
        weights = sanitize(refs, args)
    except DgrunError as e:
        raise DgrunError(f"{path}: {e}") from None
    return Checkpoint(args, weights, defaults, path)


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
        except (SafetensorError, OSError, ValueError) as e:
            raise DgrunError(f"{f}: cannot read safetensors ({checks.reason(e)})") from None
    return {k: out[k] for k in refs}


def load(path: Path) -> Checkpoint:
    ckpt = open_hf_dir(path)
    ckpt.weights = read_tensors(ckpt.weights)
    ckpt.tokenizer = tokenizer.from_dir(path, ckpt.args.vocab_size)
    return ckpt
