"""Load a checkpoint, whatever its format, into a Checkpoint (ModelArgs, flat weights dict, sampler defaults,
tokenizer). Each format has one reader in dgrun/formats/; this module only picks it."""

from __future__ import annotations

from pathlib import Path

from dgrun.errors import DgrunError
from dgrun.formats import gguf, mlx, safetensors
from dgrun.formats.common import Checkpoint

__all__ = ["Checkpoint", "load"]


def load(path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise DgrunError(f"{path}: no such file or directory")
    if path.is_dir():
        return mlx.load(path) if mlx.is_mlx_dir(path) else safetensors.load(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DgrunError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix.lower() == ".gguf" or magic == b"GGUF":
        return gguf.load(path)
    raise DgrunError(f"{path}: not a checkpoint directory or a .gguf file")
