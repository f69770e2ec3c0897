"""Quantizers for GGUF tensor types.

Quantization is data plus pure functions. The type table lives next to
quantize and dequantize.

Each supported type is one row of ``TYPES``: its block geometry (taken from
``gguf.GGML_QUANT_SIZES``, never duplicated here) and a pure function mapping
``(n_blocks, block_size)`` float32 blocks to ``(n_blocks, type_size)`` uint8
blocks, in the style of gguf-py's ``gguf/quants.py``.

* F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 delegate to
  ``gguf.quants.quantize``, which is bit-exact with ggml's reference code.
* Q4_K, Q5_K and Q6_K (which gguf-py cannot quantize) are implemented here.
  They follow ggml's ``quantize_row_q{4,5,6}_K_ref`` -- the path that
  ``llama-quantize`` takes when no importance matrix is given -- including
  the parameter search of ``make_qkx2_quants`` / ``make_qx_quants``, the
  ``nearest_int`` rounding trick, 6-bit scale/min packing and fp16 super-block
  scales. All arithmetic is float32, one IEEE operation at a time, and every
  reduction over the elements of a sub-block is a sequential left-to-right
  sum, as in the C code, so the output is meant to be bit-identical to it.

Vectorisation: a sub-block's elements lie along axis 0 and the sub-blocks
along axis 1, so ``np.add.reduce(a, axis=0)`` adds rows one after another,
which is exactly the C summation order. The only Python loops are over the
small fixed number of search steps and over chunks of blocks (optionally on
threads: numpy releases the GIL inside its loops; off by default, as it did
not pay on a 2-core machine).

Parity was checked against ggml's C reference built for plain x86-64 (how
ggml-base, which holds ggml-quants.c, is built by default). A build where the
compiler contracts a*b+c into FMA (-march=native with FMA, most aarch64
builds) rounds differently and produces different bytes for some blocks.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import gguf.quants as _gq
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

__all__ = ["QuantType", "TYPES", "SUPPORTED", "quantize", "dequantize", "quant_shape", "byte_shape"]

QK_K = 256
_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23, ggml's nearest_int bias


# --------------------------------------------------------------------------
# scalar helpers shared by the K-quants
# --------------------------------------------------------------------------

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int``: add 1.5*2**23 in float32 and read the mantissa.

    Round-half-to-even for |v| < 2**22; for anything else (inf, nan, huge)
    it reproduces the same bits the C trick yields. Returns int32.
    """
    t = np.add(v, _MAGIC, dtype=_F32)
    i = t.view(np.int32)
    np.bitwise_and(i, 0x007FFFFF, out=i)
    np.subtract(i, 0x00400000, out=i)
    return i


def _nearest_clamped(v: np.ndarray, lo: int, hi: int, in_range: bool = False) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32 (exact small integers).

    Overwrites and returns ``v`` (which must be a float32 temporary). With
    ``in_range=True`` the caller guarantees |v| < 4e6 (< 2**22), where the C
    trick is plain round-half-to-even and two float adds reproduce it.
    """
    if in_range:
        v += _MAGIC
        v -= _MAGIC
    else:
        v[...] = _nearest_int(v)
    np.clip(v, _F32(lo), _F32(hi), out=v)
    return v


_SAFE = _F32(4.0e6)


def _all_in_range(bound: np.ndarray) -> bool:
    """True if every per-column bound on |v| is finite and < 4e6 (NaN -> False)."""
    return bool(np.all(bound < _SAFE))


def _fp16_roundtrip(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even) and back: (half bits, float32)."""
    h = v.astype(np.float16)
    return h, h.astype(_F32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in order a[0] + a[1] + ... (the C loop order)."""
    return np.add.reduce(a, axis=0)


# --------------------------------------------------------------------------
# make_qkx2_quants: asymmetric (scale, min) search, used by Q4_K and Q5_K
# --------------------------------------------------------------------------

@dataclass
class _QKX2:
    """Result of the vectorised make_qkx2_quants over M sub-blocks.

    The chosen quants ``L`` are not kept during the search; they are
    recomputed on demand from the (iscale, min) pair that produced them,
    which is deterministic, so only the rare sub-blocks that need them pay.
    """
    scale: np.ndarray     # (M,) return value
    the_min: np.ndarray   # (M,) *the_min
    l_iscale: np.ndarray  # (M,) iscale that produced L
    l_min: np.ndarray     # (M,) min used with it
    flat: np.ndarray      # (M,) bool, max == min: L is all zero
    nmax: int

    def L(self, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """L[:, cols] as float32 (n, len(cols))."""
        v = x[:, cols] - self.l_min[cols]
        v *= self.l_iscale[cols]
        v = _nearest_clamped(v, 0, self.nmax)
        v[:, self.flat[cols]] = 0
        return v


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> _QKX2:
    """Vectorised ``make_qkx2_quants(n, nmax, x, w, L, &the_min, Laux, rmin, rdelta, nstep, false)``.

    x, w: (n, M) float32, elements along axis 0, one sub-block per column.
    """
    # running min/max seeded with x[0]: NaNs are skipped unless x[0] is NaN
    mn = np.fmin.reduce(x, axis=0)
    mx = np.fmax.reduce(x, axis=0)
    nan0 = np.isnan(x[0])
    if nan0.any():
        mn[nan0] = np.nan
        mx[nan0] = np.nan
    xlo = np.minimum.reduce(x, axis=0)                  # NaN-propagating: NaN -> slow exact path
    np.minimum(mn, _F32(0), out=mn)                     # if (min > 0) min = 0
    flat = mx == mn
    mn_flat = mn.copy()

    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)

    def reach(iscale, mn):
        # |fl(iscale*(x - mn))| <= this, by monotonicity of rounding
        return np.abs(iscale) * np.maximum(np.abs(mx - mn), np.abs(xlo - mn))

    iscale = _F32(nmax) / (mx - mn)
    scale = _F32(1) / iscale
    t = x - mn
    t *= iscale
    L = _nearest_clamped(t, 0, nmax, _all_in_range(reach(iscale, mn)))
    L *= scale
    L += mn
    L -= x
    L *= L
    L *= w
    best_error = _seqsum(L)
    l_iscale = iscale.copy()
    l_min = mn.copy()

    fn = _F32(nmax)
    t = np.empty_like(x)
    wl = np.empty_like(x)
    for step in range(nstep + 1):
        num = (_F32(rmin) + _F32(rdelta) * _F32(step)) + fn
        iscale = num / (mx - mn)
        np.subtract(x, mn, out=t)
        t *= iscale
        laux = _nearest_clamped(t, 0, nmax, _all_in_range(reach(iscale, mn)))
        np.multiply(w, laux, out=wl)
        sum_l = _seqsum(wl)
        wl *= laux
        sum_l2 = _seqsum(wl)
        np.multiply(w, laux, out=wl)
        wl *= x
        sum_xl = _seqsum(wl)

        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        if pos.any():
            this_min[pos] = 0
            this_scale[pos] = sum_xl[pos] / sum_l2[pos]

        laux *= this_scale
        laux += this_min
        laux -= x
        laux *= laux
        laux *= w
        cur_error = _seqsum(laux)

        take = (D > 0) & (cur_error < best_error)
        np.copyto(l_iscale, iscale, where=take)
        np.copyto(l_min, mn, where=take)
        np.copyto(best_error, cur_error, where=take)
        np.copyto(scale, this_scale, where=take)
        np.copyto(mn, this_min, where=take)

    if flat.any():                                      # max == min: early return in C
        scale[flat] = 0
        mn[flat] = mn_flat[flat]
    return _QKX2(scale, -mn, l_iscale, l_min, flat, nmax)


# --------------------------------------------------------------------------
# make_qx_quants (rmse_type 1, no weights): symmetric search used by Q6_K
# --------------------------------------------------------------------------

@dataclass
class _QX:
    scale: np.ndarray     # (M,) return value
    l_iscale: np.ndarray  # (M,) iscale that produced L
    zero: np.ndarray      # (M,) bool, all-zero group: L is all zero
    nmax: int

    def L(self, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """L[:, cols] (``l + nmax``) as float32 (n, len(cols))."""
        v = x[:, cols] * self.l_iscale[cols]
        v = _nearest_clamped(v, -self.nmax, self.nmax - 1)
        v += _F32(self.nmax)
        v[:, self.zero[cols]] = 0
        return v


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> _QX:
    """Vectorised ``make_qx_quants(n, nmax, x, L, 1, NULL)``.

    x: (n, M) float32, elements along axis 0, one group per column.
    """
    n, m = x.shape
    ax = np.abs(x)
    amax_nan = np.maximum.reduce(ax, axis=0)            # NaN-propagating: NaN -> slow exact path
    ax[np.isnan(ax)] = 0                                # `ax > amax` never picks a NaN
    idx = np.argmax(ax, axis=0)                         # first strict maximum, like the C loop
    cols = np.arange(m)
    mx = x[idx, cols]
    zero = ax[idx, cols] < _GROUP_MAX_EPS
    del ax

    w = x * x
    wx = w * x
    lo, hi = -nmax, nmax - 1
    t = np.empty_like(x)
    l = np.empty_like(x)

    def sums(iscale):
        np.multiply(x, iscale, out=l)
        _nearest_clamped(l, lo, hi, _all_in_range(np.abs(iscale) * amax_nan))
        np.multiply(wx, l, out=t)
        slx = _seqsum(t)
        np.multiply(w, l, out=t)
        np.multiply(t, l, out=t)
        sl2 = _seqsum(t)
        return slx, sl2

    iscale = _F32(-nmax) / mx
    sumlx, suml2 = sums(iscale)
    l_iscale = iscale
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32, copy=False)
    best = scale * sumlx
    fn = _F32(nmax)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fn + _F32(0.1) * _F32(step)) / mx
        sumlx, suml2 = sums(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        np.copyto(l_iscale, iscale, where=take)
        np.copyto(scale, new_scale, where=take)
        np.copyto(best, new_scale * sumlx, where=take)

    scale[zero] = 0
    return _QX(scale, l_iscale, zero, nmax)


# --------------------------------------------------------------------------
# Q4_K / Q5_K
# --------------------------------------------------------------------------

def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales/mins of 8 sub-blocks -> the 12 bytes ``get_scale_min_k4`` reads.

    ls, lm: (nb, 8) uint8 in [0, 63].
    """
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return np.concatenate([
        lo_s | ((hi_s >> 4) << 6),
        lo_m | ((hi_m >> 4) << 6),
        (hi_s & 0x0F) | ((hi_m & 0x0F) << 4),
    ], axis=1)


def _qkx_super_blocks(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared body of quantize_row_q4_K_ref / quantize_row_q5_K_ref.

    Returns d (nb, 2) u8, dmin (nb, 2) u8, scales (nb, 12) u8, L (nb, 256) u8.
    """
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)   # (32, nb*8)

    sum_x2 = _seqsum(x * x)
    av_x = np.sqrt(sum_x2 / _F32(32))
    w = np.abs(x)
    w += av_x

    r = _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep)
    scales = r.scale.reshape(nb, 8)
    mins = r.the_min.reshape(nb, 8)

    max_scale = np.fmax(np.fmax.reduce(scales, axis=1), _F32(0))   # `if (scale > max_scale)`
    max_min = np.fmax(np.fmax.reduce(mins, axis=1), _F32(0))
    inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32, copy=False)
    inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32, copy=False)
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls);
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)

    d16, d = _fp16_roundtrip(max_scale / _F32(63))
    m16, dmin = _fp16_roundtrip(max_min / _F32(63))

    dj = (d[:, None] * ls.astype(_F32)).reshape(-1)      # per sub-block, (nb*8,)
    dmj = (dmin[:, None] * lm.astype(_F32)).reshape(-1)
    q = x + dmj
    q /= dj
    L = _nearest_clamped(q, 0, nmax)
    keep = np.flatnonzero(dj == 0)                       # if (!d) continue;  keeps the search's L
    if keep.size:
        L[:, keep] = r.L(x, keep)

    Lb = L.astype(np.uint8).T.reshape(nb, QK_K)
    return (d16.view(np.uint8).reshape(nb, 2), m16.view(np.uint8).reshape(nb, 2),
            _pack_scale_min_k4(ls, lm), Lb)


def _quantize_blocks_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _qkx_super_blocks(blocks, 15, -1.0, 0.1, 20)
    Lr = L.reshape(-1, 4, 2, 32)
    qs = (Lr[:, :, 0] | (Lr[:, :, 1] << 4)).reshape(-1, QK_K // 2)
    return np.concatenate([d, dmin, sc, qs], axis=1)


def _quantize_blocks_q5_k(blocks: np.ndarray) -> np.ndarray:
    # NB: ggml uses rmin -0.5, nstep 15 here (Q4_K: rmin -1, nstep 20).
    d, dmin, sc, L = _qkx_super_blocks(blocks, 31, -0.5, 0.1, 15)
    Lr = L.reshape(-1, 8, 32)                            # sub-block s = 2*chunk + half
    qh = np.zeros((L.shape[0], 32), dtype=np.uint8)
    for s in range(8):
        qh |= (Lr[:, s] >> 4) << s
    Lr = (L & 0x0F).reshape(-1, 4, 2, 32)
    qs = (Lr[:, :, 0] | (Lr[:, :, 1] << 4)).reshape(-1, QK_K // 2)
    return np.concatenate([d, dmin, sc, qh, qs], axis=1)


# --------------------------------------------------------------------------
# Q6_K
# --------------------------------------------------------------------------

def _quantize_blocks_q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # (16, nb*16)
    r = _make_qx_quants_rmse1(x, 32)
    scales = r.scale.reshape(nb, 16)

    a = np.abs(scales)
    a[np.isnan(a)] = 0
    ia = np.argmax(a, axis=1)
    max_scale = scales[np.arange(nb), ia]
    zero = a[np.arange(nb), ia] < _GROUP_MAX_EPS

    iscale = _F32(-128) / max_scale
    d16, d = _fp16_roundtrip(_F32(1) / iscale)
    # y.scales[ib] = MIN(127, nearest_int(iscale*scales[ib]))  stored as int8_t
    sq = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)

    dj = (d[:, None] * sq.astype(_F32)).reshape(-1)
    q = x / dj
    L = _nearest_clamped(q, -32, 31)
    L += _F32(32)
    keep = np.flatnonzero(dj == 0)                       # if (!d) continue;  keeps the search's L
    if keep.size:
        L[:, keep] = r.L(x, keep)

    Lb = L.astype(np.uint8).T.reshape(nb, 2, 4, 32)      # [half][quarter][l]
    lo = Lb & 0x0F
    ql = np.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = Lb >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sq.view(np.uint8),
                          d16.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0                                        # memset(&y[i], 0, sizeof(block_q6_K))
    return out


# --------------------------------------------------------------------------
# the type table
# --------------------------------------------------------------------------

BlockFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class QuantType:
    """One row of the type table."""
    qtype: QT
    quantize_blocks: BlockFn | None   # (n_blocks, block_size) f32 -> (n_blocks, type_size) u8; None = gguf
    bits: float                       # nominal bits per weight (type_size * 8 / block_size)

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def source(self) -> str:
        return "gguf" if self.quantize_blocks is None else "dgrun"


def _row(qtype: QT, fn: BlockFn | None = None) -> QuantType:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return QuantType(qtype, fn, ts * 8 / bs)


TYPES: dict[QT, QuantType] = {r.qtype: r for r in (
    _row(QT.F32),
    _row(QT.F16),
    _row(QT.BF16),
    _row(QT.Q8_0),
    _row(QT.Q4_0),
    _row(QT.Q4_1),
    _row(QT.Q5_0),
    _row(QT.Q5_1),
    _row(QT.Q4_K, _quantize_blocks_q4_k),
    _row(QT.Q5_K, _quantize_blocks_q5_k),
    _row(QT.Q6_K, _quantize_blocks_q6_k),
)}
SUPPORTED: frozenset[QT] = frozenset(TYPES)

# Super-blocks per work item for the K-quants: big enough to amortise numpy
# call overhead, small enough that the (32, n) working arrays stay in cache.
_CHUNK_BLOCKS = 512


def _threads(threads: int | None) -> int:
    if threads is None:
        env = os.environ.get("DGRUN_QUANT_THREADS")
        threads = int(env) if env else 1
    return max(1, threads)


def byte_shape(shape: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    """Shape of the uint8 array ``quantize`` returns for an input of ``shape``."""
    return _gq.quant_shape_to_byte_shape(shape, qtype)


def quant_shape(shape: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    """Logical (element) shape for a uint8 array of ``shape`` holding ``qtype`` data."""
    return _gq.quant_shape_from_byte_shape(shape, qtype)


def _row_of(qtype) -> QuantType:
    qtype = QT(qtype)
    try:
        return TYPES[qtype]
    except KeyError:
        raise NotImplementedError(f"quantization to {qtype.name} is not supported") from None


def _quantize_k(x: np.ndarray, row: QuantType, threads: int | None) -> np.ndarray:
    bs, ts = row.block_size, row.type_size
    blocks = x.reshape(-1, bs)
    nb = blocks.shape[0]
    out = np.empty((nb, ts), dtype=np.uint8)
    starts = range(0, nb, _CHUNK_BLOCKS)

    def work(s: int) -> None:
        with np.errstate(all="ignore"):   # errstate is per thread; inf/nan intermediates are expected
            out[s:s + _CHUNK_BLOCKS] = row.quantize_blocks(blocks[s:s + _CHUNK_BLOCKS])

    nt = min(_threads(threads), len(starts))
    if nt <= 1:
        for s in starts:
            work(s)
    else:
        with ThreadPoolExecutor(nt) as ex:
            for _ in ex.map(work, starts):
                pass
    return out.reshape(byte_shape(x.shape, row.qtype))


def quantize(x: np.ndarray, qtype: QT, *, threads: int | None = None) -> np.ndarray:
    """Quantize ``x`` (any real dtype, converted to float32 first) to ``qtype``.

    Returns uint8 with the gguf byte-shape convention: leading dims kept, the
    last dim becomes bytes per row (see ``byte_shape``). The last dim must be
    a multiple of the type's block size. For F32 the result may be a view of
    ``x``. ``threads`` (default: $DGRUN_QUANT_THREADS or 1) only affects the
    K-quants; the output does not depend on it.
    """
    row = _row_of(qtype)
    x = np.ascontiguousarray(x, dtype=_F32)
    if x.ndim == 0:
        raise ValueError("cannot quantize a 0-d array")
    if x.shape[-1] % row.block_size:
        raise ValueError(f"row size {x.shape[-1]} is not a multiple of the "
                         f"{row.qtype.name} block size {row.block_size}")
    if row.quantize_blocks is not None:
        return _quantize_k(x, row, threads)
    if row.qtype == QT.F32:
        return x.view(np.uint8)
    q = _gq.quantize(x, row.qtype)
    if q.dtype != np.uint8:                             # F16 comes back as float16
        q = np.ascontiguousarray(q).view(np.uint8)
    return q


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Inverse of ``quantize`` (any type gguf-py can decode): uint8 bytes -> float32."""
    qtype = QT(qtype)
    data = np.ascontiguousarray(data)
    if qtype in (QT.F32, QT.F16) and data.dtype != np.uint8:
        data = data.view(np.uint8)
    out = _gq.dequantize(data, qtype)
    return np.asarray(out, dtype=_F32)
