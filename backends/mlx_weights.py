"""The flat weights dict -> MLX arrays for the mlx backend.

Float tensors become arrays in the compute dtype (quantized first when a policy asks, "quantize at load").
Packed weights are used as they are stored:
- MLX affine (`AffineTensor`, from MLX directories): the words as they are, scales/biases in the compute dtype;
- GGUF Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K: rewritten exactly as MLX affine groups of 32
  (backends/mlx_ggml.py; exact while scales are float32, see `exact_note`);
- GGUF Q6_K: 16-value sub-blocks fit no MLX group size, so it is dequantized and requantized to 8-bit groups
  of 32 (about 9 bits per weight with bf16 scales instead of 6.56; the added error is ~1/4 of Q6_K's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

from dgrun.packed import AffineTensor, pack
from dgrun.backends.mlx_ggml import ggml_to_affine
from dgrun.backends.mlx_policy import MATRIX, Policy
from dgrun.packed import QTensor

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}
REQUANT = (8, 32)  # bits, group for GGUF types without an exact MLX form


@dataclass(frozen=True)
class QLinear:
    """An MLX affine-quantized matrix (..., rows, cols), multiplied as it is stored."""

    w: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.w.shape[:-1], self.w.shape[-1] * 32 // self.bits)


def from_torch(t: torch.Tensor) -> mx.array:
    """A float torch tensor as an MLX array of the same dtype (bf16 through an int16 view: numpy has no bf16)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def quantize(w: mx.array, bits: int, group: int, dtype) -> QLinear:
    q, s, b = mx.quantize(w.astype(dtype), group_size=group, bits=bits)
    return QLinear(q, s, b, group, bits)


def from_qtensor(name: str, t: QTensor, dtype):
    mapped = ggml_to_affine(t.data, t.qtype, t.shape)
    if mapped is None:
        w = from_torch(t.dequantize())
        return quantize(w, *REQUANT, dtype) if MATRIX.match(name) else w.astype(dtype)
    q, scales, biases, bits = mapped
    return QLinear(mx.array(pack(q, bits)), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype),
                   32, bits)


def convert(name: str, value, dtype, policy: Policy | None):
    if isinstance(value, QTensor):
        return from_qtensor(name, value, dtype)
    if isinstance(value, AffineTensor):
        return QLinear(mx.array(value.weight), from_torch(value.scales).astype(dtype),
                       from_torch(value.biases).astype(dtype), value.group_size, value.bits)
    w = from_torch(torch.as_tensor(value))
    choice = policy.choose(name, tuple(w.shape)) if policy is not None else None
    return quantize(w, *choice, dtype) if choice else w.astype(dtype)


def prepare(weights: dict, dtype, policy: Policy | None = None) -> dict:
    """Every tensor converted and evaluated one at a time. Entries are popped from `weights` as they are
    converted, so a loaded checkpoint is never held twice (pass a copy of the dict to keep yours)."""
    out = {}
    for name in list(weights):
        out[name] = convert(name, weights.pop(name), dtype, policy)
        leaf = out[name]
        mx.eval(*(leaf.w, leaf.scales, leaf.biases) if isinstance(leaf, QLinear) else (leaf,))
    return out


def default_dtype(weights: dict) -> str:
    """float32 when the checkpoint stores its embedding in float32, else bfloat16 (quantized or bf16 files)."""
    e = weights.get("token_embd.weight")
    return "float32" if isinstance(e, torch.Tensor) and e.dtype == torch.float32 else "bfloat16"


def as_numpy(x) -> np.ndarray:
    """Host copy of an input given as torch, numpy, list or MLX."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy() if x.is_floating_point() else x.detach().numpy()
    return np.asarray(x)
