"""Backends: the tensor maths behind the shared block-diffusion loop (dgrun.backends).

A backend is anything with the methods of `Backend`. The loop (dgrun.generate, dgrun.engine) holds no tensor
maths: it encodes prompts and finished blocks into cache slots, steps B rows at once, reads one done vector per
step, and reads a row's draft canvas back only when its block ends.
"""

from __future__ import annotations

import platform
from typing import Any, Protocol, Sequence

from dgrun.backends.row import Row
from dgrun.errors import DgrunError

BACKENDS = ("cpu", "cuda", "mlx")


class Backend(Protocol):
    name: str
    args: Any  # ModelArgs: the loop reads canvas_length and vocab_size

    def new_cache(self, slots: int, max_len: int) -> Any:
        """A preallocated KV cache of `slots` rows, each holding up to `max_len` committed tokens."""

    def encode(self, slot: int, ids: Sequence[int], cache: Any) -> None:
        """Commit tokens to a slot: the causal encoder over them (in chunks), their K/V into the cache."""

    def start(self, rows: list[Row], cache: Any) -> Any:
        """A step state for new blocks: per row a uniform-random canvas drawn from (seed, block), pins applied,
        positions continuing the row's slot."""

    def step(self, state: Any, cache: Any) -> Any:
        """One denoising step of every row (decoder, sampler, next self-conditioning input) on the device."""

    def done(self, state: Any) -> list[bool]:
        """Per row, the stable-and-confident flag: the loop's one host read per step."""

    def canvas(self, state: Any) -> Any:
        """(B, canvas_length) argmax drafts, on the device; committed when a row's block ends."""

    def take(self, state: Any, index: list[int]) -> Any:
        """The rows `index` of a state."""

    def cat(self, states: list[Any]) -> Any:
        """The rows of several states in one."""

    def tolist(self, ids: Any) -> list:
        """Token ids on the host."""

    def denoise(self, canvas: Any, cache: Any, self_cond_logits: Any = None, slots: Any = None) -> Any:
        """One decoder pass, for tests and scripts: softcapped float32 logits (C, V), or (B, C, V)."""


def pick(name: str) -> str:
    """Resolve "auto" to a backend name: cuda where torch sees a GPU, mlx on Apple silicon, else cpu."""
    if name == "auto":
        return "cuda" if _cuda_available() else "mlx" if _mlx_default() else "cpu"
    if name not in BACKENDS:
        raise DgrunError(f"unknown backend {name!r} (available on {platform.machine()}: {', '.join(BACKENDS)})")
    return name


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mlx_default() -> bool:
    """Apple silicon with mlx installed."""
    import importlib.util

    return platform.system() == "Darwin" and platform.machine() == "arm64" and importlib.util.find_spec("mlx") is not None


def create(name: str, args, weights: dict, dtype: str | None = None, device: str | None = None) -> Backend:
    """A backend over a flat weights dict. device: only for cuda, "cpu" runs its Triton kernels on CPU tensors
    under TRITON_INTERPRET=1 (the test mode of the cuda backend; slow, tiny models only)."""
    import importlib.util

    name = pick(name)
    if device is not None and name != "cuda":
        raise DgrunError(f"device= is for the cuda backend's test mode, not for {name}")
    if name == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise DgrunError("the mlx backend needs MLX: pip install mlx (Apple silicon) or 'mlx[cpu]' (Linux)")
        from dgrun.backends.mlx import MlxBackend

        return MlxBackend(args, weights, dtype=dtype)
    from dgrun.backends.torch.model import TorchBackend
    from dgrun.packed import dequantizing

    if name == "cuda":
        device = _cuda_device(device)
        return TorchBackend(args, dequantizing(weights), dtype=dtype or ("float32" if device == "cpu" else "bfloat16"),
                            device=device, ops="cuda")
    return TorchBackend(args, dequantizing(weights), dtype=dtype or "float32")  # MLX-affine weights as float


def _cuda_device(device: str | None) -> str:
    """The torch device of the cuda backend, or one line saying why it cannot run here."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        raise DgrunError("the cuda backend needs Triton: pip install triton (or pip install 'dgrun[cuda]')")
    if device in (None, "cuda") or str(device).startswith("cuda:"):
        if not _cuda_available():
            raise DgrunError("the cuda backend needs an NVIDIA GPU: torch sees no CUDA device here "
                             "(use --backend cpu, or a CUDA build of torch)")
        return device or "cuda"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise DgrunError("the cuda backend runs on device='cpu' only under TRITON_INTERPRET=1 (its test mode)")
        return "cpu"
    raise DgrunError(f"unknown device {device!r} for the cuda backend (cuda, cuda:N, or cpu under TRITON_INTERPRET=1)")
