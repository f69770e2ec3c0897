"""Backends: the tensor maths behind the shared block-diffusion loop (dgrun.backends).

A backend is anything with the methods of `Backend`. The loop in `dgrun.generate` holds no tensor maths:
it calls these, reads one "done" flag per step and the finished canvas once per block.
"""

from __future__ import annotations

import platform
from typing import Any, Protocol, Sequence

from dgrun.errors import DgrunError

BACKENDS = ("cpu", "mlx")


class Backend(Protocol):
    name: str

    def new_cache(self) -> Any:
        """An empty KV cache for this backend."""

    def encode(self, ids: Sequence[int], cache: Any) -> None:
        """Commit tokens: run the causal encoder over them and append their K/V to the cache."""

    def denoise(self, canvas: Any, cache: Any, self_cond_logits: Any = None) -> Any:
        """One bidirectional decoder pass over a canvas: softcapped float32 logits (canvas_length, vocab)."""

    def rng(self, seed: int) -> Any:
        """A seeded random generator on the backend's device."""

    def start_block(self, rng: Any, sampler: Any, fixed: Sequence[int] | None = None) -> Any:
        """A new block's fixed-shape step state, starting from a uniform-random canvas. `fixed` (a token
        id or -1 per canvas position) pins tokens that the sampler never changes: infilling."""

    def step(self, state: Any, cache: Any, temperature: float, sampler: Any, rng: Any) -> Any:
        """One whole denoising step, sampler included, on device: returns the next state."""

    def done(self, state: Any) -> bool:
        """The stable-and-confident flag: the loop's one host read per step."""

    def tolist(self, ids: Any) -> list[int]:
        """Token ids on the host."""


def pick(name: str) -> str:
    """Resolve "auto" to a backend name."""
    if name == "auto":
        return "mlx" if _mlx_default() else "cpu"  # the cuda backend arrives with its own issue
    if name == "cuda":
        raise DgrunError("the cuda backend is not built yet (available: cpu, mlx)")
    if name not in BACKENDS:
        raise DgrunError(f"unknown backend {name!r} (available on {platform.machine()}: {', '.join(BACKENDS)})")
    return name


def _mlx_default() -> bool:
    """Apple silicon with mlx installed."""
    import importlib.util

    return platform.system() == "Darwin" and platform.machine() == "arm64" and importlib.util.find_spec("mlx") is not None


def create(name: str, args, weights: dict, dtype: str | None = None) -> Backend:
    name = pick(name)
    if name == "mlx":
        import importlib.util

        if importlib.util.find_spec("mlx") is None:
            raise DgrunError("the mlx backend needs MLX: pip install mlx (Apple silicon) or 'mlx[cpu]' (Linux)")
        from dgrun.backends.mlx import MlxBackend

        return MlxBackend(args, weights, dtype=dtype)
    from dgrun.backends.cpu import CpuBackend
    from dgrun.convert.affine import dequantizing

    return CpuBackend(args, dequantizing(weights), dtype=dtype or "float32")  # MLX-affine weights as float
