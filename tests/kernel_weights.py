"""Packed test weights for the kernel tests: random float matrices quantized to each GGUF type (gguf-py for the
legacy types, dgrun's own quantizers for the K-quants) and wrapped as DevicePacked on the CPU (on the GPU when
DGRUN_KERNEL_DEVICE=cuda: the gpu check's native run)."""

from __future__ import annotations

import os

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from dgrun.convert import quants
from dgrun.packed import DevicePacked

PACKED = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K)
FLOATS = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
ALL = PACKED + tuple(FLOATS)
DEVICE = os.environ.get("DGRUN_KERNEL_DEVICE", "cpu")


def weight(shape: tuple[int, ...], qtype: QT, seed: int = 0, scale: float = 1.0):
    """A (..., K) weight of `qtype`: DevicePacked for block types, a plain tensor of the dtype for float types."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale
    if qtype in FLOATS:
        return torch.from_numpy(x).to(DEVICE, FLOATS[qtype])
    data = torch.from_numpy(np.ascontiguousarray(quants.quantize(x, qtype))).to(DEVICE)
    return DevicePacked(data, qtype, tuple(shape))
