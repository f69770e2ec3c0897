"""GGUF block types -> MLX affine groups of 32, exactly, where the maths allows.

Every legacy block and the Q4_K/Q5_K sub-blocks are `scale * q + bias` over 32 values with q unsigned:
  Q8_0  d*q_s, q_s int8 = q-128:              scale d,      bias -128 d   (8-bit)
  Q4_0  d*(q-8):                              scale d,      bias -8 d     (4-bit)
  Q4_1  d*q + m:                              scale d,      bias m        (4-bit)
  Q5_0  d*(q-16):                             scale d,      bias -16 d    (5-bit)
  Q5_1  d*q + m:                              scale d,      bias m        (5-bit)
  Q4_K  d*sc_j*q - dmin*m_j per 32-value sub-block j                       (4-bit)
  Q5_K  the same with 5-bit q                                              (5-bit)
In float32 the products are exact (fp16 d times a 6-bit sc times q needs at most 22 bits), so
`scale * q + bias` gives ggml's floats bit for bit. Q6_K has 16-value sub-blocks, which no MLX group size
(32, 64, 128) fits: it returns None and the caller requantizes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

EXACT_BITS = {QT.Q8_0: 8, QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q4_K: 4, QT.Q5_K: 5}


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: low nibbles are values 0-15, high nibbles 16-31 (ggml's legacy layout)."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes -> bit j of the little-endian uint32, for j in 0..31, as 0/16."""
    word = np.ascontiguousarray(qh).view("<u4")
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _legacy(blocks: np.ndarray, qtype: QT):
    """(n, block bytes) -> q (n, 32), scale (n, 1), bias (n, 1)."""
    d = _f16(blocks[:, 0:2])
    if qtype == QT.Q8_0:
        q = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, -128 * d
    if qtype == QT.Q4_0:
        return _nibbles(blocks[:, 2:18]), d, -8 * d
    if qtype == QT.Q4_1:
        return _nibbles(blocks[:, 4:20]), d, _f16(blocks[:, 2:4])
    if qtype == QT.Q5_0:
        return _nibbles(blocks[:, 6:22]) | _high_bits(blocks[:, 2:6]), d, -16 * d
    # Q5_1
    return _nibbles(blocks[:, 8:24]) | _high_bits(blocks[:, 4:8]), d, _f16(blocks[:, 2:4])


def _k_scales(scales: np.ndarray):
    """12 bytes -> eight 6-bit scales and mins (ggml's get_scale_min_k4)."""
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quant(blocks: np.ndarray, qtype: QT):
    """(n, block bytes) -> q (n, 8, 32), scale (n, 8), bias (n, 8) for Q4_K / Q5_K super-blocks of 256."""
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scales(blocks[:, 4:16])
    qs = blocks[:, -128:].reshape(-1, 4, 32)  # 64 values per 32 bytes: low nibbles, then high nibbles
    q = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
    if qtype == QT.Q5_K:
        qh = blocks[:, 16:48]  # bit j of byte l is the fifth bit of value l in sub-block j
        q = q | ((((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4))
    return q, d * sc, -(dmin * mn)


def ggml_to_affine(data: np.ndarray, qtype: QT, shape: tuple[int, ...]):
    """Packed GGUF rows -> (q uint8 (*shape), scales float32, biases float32 (*shape[:-1], cols/32), bits),
    or None for a type that has no exact MLX form."""
    if qtype not in EXACT_BITS:
        return None
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    q, scale, bias = (_k_quant if block == 256 else _legacy)(blocks, qtype)
    groups = (*shape[:-1], shape[-1] // 32)
    return q.reshape(shape), scale.reshape(groups), bias.reshape(groups), EXACT_BITS[qtype]
