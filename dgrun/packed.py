"""Packed weights, kept as the file stores them: GGUF block types (`QTensor`) and MLX affine (`AffineTensor`).

One table says which types dgrun reads and which backends run each packed; backends without a kernel for a
type call `dequantize()`. Formats build these, `convert/` writes them, backends run them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from dgrun.errors import DgrunError

# GGUF block types dgrun reads and writes (ggml's legacy types and the K-quants of Q4_K_M-style mixes), each with
# the backends that run it packed: cuda decodes every one in registers (kernels/dequant.py); mlx rewrites them as
# affine groups (Q6_K's 16-value sub-blocks fit none); cpu dequantizes at load.
GGUF_PACKED = {QT.Q8_0: ("cuda", "mlx"), QT.Q4_0: ("cuda", "mlx"), QT.Q4_1: ("cuda", "mlx"), QT.Q5_0: ("cuda", "mlx"),
               QT.Q5_1: ("cuda", "mlx"), QT.Q4_K: ("cuda", "mlx"), QT.Q5_K: ("cuda", "mlx"), QT.Q6_K: ("cuda",)}
GGUF_FLOAT = (QT.F32, QT.F16, QT.BF16)
GGUF_TYPES = GGUF_FLOAT + tuple(GGUF_PACKED)  # every tensor type a DiffusionGemma GGUF may hold
PACKED = frozenset(GGUF_PACKED)

# MLX affine: the bit widths and group sizes mlx.core.quantize makes; run packed by mlx, dequantized by cpu.
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
AFFINE_BACKENDS = ("mlx",)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values (..., n) below 2**bits -> uint32 words (..., n * bits / 32)."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if bits == 8:
        return q.view(np.uint32)
    if bits == 4:  # the common case without the 8x bit expansion: element 2i low nibble, 2i+1 high
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).view(np.uint32)
    planes = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (..., n, bits): bit j of each value
    return np.packbits(planes.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little").view(np.uint32)


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words (..., m) -> uint8 values (..., m * 32 / bits)."""
    raw = np.ascontiguousarray(words, dtype=np.uint32).view(np.uint8)
    if bits == 8:
        return raw
    if bits == 4:  # the common case without the 8x bit expansion
        return np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(*raw.shape[:-1], -1)
    planes = np.unpackbits(raw, axis=-1, bitorder="little").reshape(*raw.shape[:-1], -1, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def check_params(bits: int, group_size: int, cols: int, what: str = "tensor") -> None:
    if bits not in BITS:
        raise DgrunError(f"{what}: {bits}-bit affine quantization is not an MLX format ({BITS})")
    if group_size not in GROUP_SIZES:
        raise DgrunError(f"{what}: group size {group_size} is not an MLX group size ({GROUP_SIZES})")
    if cols % group_size:
        raise DgrunError(f"{what}: rows of {cols} do not split into groups of {group_size}")


@dataclass(frozen=True)
class AffineTensor:
    """A packed MLX-affine matrix as stored: `weight` uint32 numpy, `scales`/`biases` torch (any float dtype)."""

    weight: np.ndarray  # (..., rows, cols * bits / 32)
    scales: object  # torch.Tensor (..., rows, cols / group_size)
    biases: object
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.scales.numel() * self.scales.element_size() * 2)

    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self):
        """float32 torch tensor: scale * q + bias, group by group."""
        import torch

        q = torch.from_numpy(unpack(self.weight, self.bits)).float()
        q = q.view(*self.shape[:-1], -1, self.group_size)
        out = q * self.scales.float()[..., None] + self.biases.float()[..., None]
        return out.reshape(self.shape)

    def __repr__(self) -> str:
        return f"AffineTensor({self.bits}-bit, group {self.group_size}, shape={list(self.shape)})"


def dequantizing(weights: dict) -> dict:
    """For backends without affine kernels: the same dict, but reading an AffineTensor gives float32,
    converted one at a time as items() is walked, so the model is never held twice in float32."""
    return _Dequantizing(weights)


class _Dequantizing(dict):
    def __getitem__(self, key):
        v = super().__getitem__(key)
        return v.dequantize() if isinstance(v, AffineTensor) else v

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return ((k, self[k]) for k in self.keys())

    def values(self):
        return (self[k] for k in self.keys())


@dataclass(frozen=True, slots=True)
class QTensor:
    """`data` is uint8 of shape (*shape[:-1], bytes per row); `shape` is the torch (element) shape."""

    data: np.ndarray
    qtype: QT
    shape: tuple[int, ...]

    def __post_init__(self):
        block, size = GGML_QUANT_SIZES[self.qtype]
        if self.shape[-1] % block or self.data.shape != (*self.shape[:-1], self.shape[-1] // block * size):
            raise DgrunError(f"{self.qtype.name} data of shape {self.data.shape} does not hold {list(self.shape)}")

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


@dataclass(frozen=True, slots=True)
class DevicePacked:
    """A GGUF block-packed matrix on a torch device, byte for byte as the file stores it (the cuda backend's
    weights; kernels/dequant.py decodes it in registers). `data` is a torch uint8 tensor of shape
    (*shape[:-1], bytes per row); `shape` is the element shape, as QTensor's."""

    data: object  # torch.Tensor, uint8
    qtype: QT
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    @property
    def device(self):
        return self.data.device

    @classmethod
    def upload(cls, q: QTensor, device) -> "DevicePacked":
        """One tensor from the file's memory map to the device: no whole-model host copy."""
        import warnings

        import torch

        with warnings.catch_warnings():  # the map is read-only; the bytes are only read, then copied
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(np.ascontiguousarray(q.data))
        return cls(data.to(device), q.qtype, tuple(q.shape))

    def __repr__(self) -> str:
        return f"DevicePacked({self.qtype.name}, shape={list(self.shape)}, device={self.device})"
