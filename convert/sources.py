"""Tensors to convert, read a slab of rows at a time: from safetensors (by header) or from a mapped GGUF.

Every source tensor reads its rows [start, stop) of dim 0 in its stored encoding, so a tensor is never held
whole: peak memory is a few slabs, whatever the model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QT

from dgrun.convert.quants import dequantize

SLAB_ELEMENTS = 1 << 22  # 4M elements (16 MB as float32) per work item
SAFETENSORS_TYPES = {"BF16": QT.BF16, "F16": QT.F16, "F32": QT.F32}
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}


@dataclass
class SourceTensor:
    name: str  # the GGUF name
    shape: tuple[int, ...]  # torch order
    qtype: QT  # how `rows` returns the data
    nbytes: int  # bytes in the source file (throughput is counted in these)
    rows: Callable[[int, int], np.ndarray]

    def slabs(self) -> list[tuple[int, int]]:
        if len(self.shape) <= 1:
            return [(0, self.shape[0] if self.shape else 1)]
        step = max(1, SLAB_ELEMENTS // math.prod(self.shape[1:]))
        return [(i, min(i + step, self.shape[0])) for i in range(0, self.shape[0], step)]

    def float32(self, start: int, stop: int) -> np.ndarray:
        return to_float32(self.rows(start, stop), self.qtype)


def to_float32(a: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.BF16:
        return np.left_shift(a.view(np.uint16), 16, dtype=np.uint32).view(np.float32)  # one pass, exact
    if qtype in (QT.F32, QT.F16):
        return a.astype(np.float32)
    return dequantize(a, qtype)


def constant(name: str, values: list[float]) -> SourceTensor:
    """A generated F32 tensor (rope_freqs)."""
    data = np.asarray(values, dtype=np.float32)
    return SourceTensor(name, data.shape, QT.F32, data.nbytes, lambda a, b: data[a:b])


class SafetensorsFiles:
    """Open safe_open handles, one per file, shared by the tensors read from them."""

    def __init__(self):
        self.handles = {}

    def tensor(self, gguf_name: str, ref) -> SourceTensor:
        from safetensors import safe_open

        if ref.file not in self.handles:
            self.handles[ref.file] = safe_open(ref.file, framework="pt")
        handle, qtype = self.handles[ref.file], SAFETENSORS_TYPES.get(ref.dtype)
        itemsize = ITEMSIZE.get(ref.dtype, 1)

        def rows(start: int, stop: int) -> np.ndarray:
            import torch

            t = handle.get_slice(ref.name)[start:stop]
            if qtype == QT.BF16:
                return t.view(torch.int16).numpy()
            return t.numpy() if qtype is not None else t.float().numpy()  # other dtypes arrive as float32

        return SourceTensor(gguf_name, tuple(ref.shape), qtype or QT.F32, math.prod(ref.shape) * itemsize, rows)


def gguf_tensor(t) -> SourceTensor:
    """A GGUFFile tensor; its rows are views of the mapped file."""
    return SourceTensor(t.name, t.shape, t.qtype, t.n_bytes, lambda a, b: t.data[a:b])
