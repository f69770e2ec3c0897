"""A GGUF-quantized weight kept packed, as the file stores it (SPEC.md §3).

Backends that have kernels for a type (cuda, mlx) use `data` as it is; the others call `dequantize()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

# The packed types dgrun reads and writes: ggml's legacy block types and the K-quants of Q4_K_M-style mixes.
PACKED = frozenset({QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K})


@dataclass(frozen=True, slots=True)
class QTensor:
    """`data` is uint8 of shape (*shape[:-1], bytes per row); `shape` is the torch (element) shape."""

    data: np.ndarray
    qtype: QT
    shape: tuple[int, ...]

    def __post_init__(self):
        block, size = GGML_QUANT_SIZES[self.qtype]
        if self.shape[-1] % block or self.data.shape != (*self.shape[:-1], self.shape[-1] // block * size):
            raise ValueError(f"{self.qtype.name} data of shape {self.data.shape} does not hold {self.shape}")

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self):
        """float32 torch tensor of `shape` (gguf-py's reference dequantizer)."""
        import gguf.quants
        import torch

        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(self.data, self.qtype), dtype=np.float32))

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, shape={list(self.shape)})"
