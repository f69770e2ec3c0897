"""Tests for dgrun.convert.quants.

The only independent reference used here is gguf-py: its ``quantize`` for the
types it can produce (bit-exact comparison) and its ``dequantize`` for every
type (round trips and structural checks on the K-quants).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import gguf
import gguf.quants as gq
from gguf import GGMLQuantizationType as QT

from dgrun.convert.quants import SUPPORTED, TYPES, byte_shape, dequantize, quant_shape, quantize

K_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K)
GGUF_TYPES = (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)


def _normal(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def _rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    return float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))


def _edge_rows(rng: np.random.Generator, width: int = 256) -> np.ndarray:
    """Rows of awkward data; every 32-wide block of a row shares its character."""
    n = rng.standard_normal((1, width)).astype(np.float32)
    rows = [
        np.zeros((1, width), np.float32),                                  # all-zero blocks
        np.full((1, width), 0.75, np.float32),                             # constant positive
        np.full((1, width), -3.0, np.float32),                             # constant negative
        -np.abs(n),                                                        # negative only
        np.abs(n),                                                         # positive only
        n * np.float32(1e4),                                               # large
        n * np.float32(1e30),                                              # huge (fp16 scales overflow)
        n * np.float32(1e-3),                                              # small (fp16 subnormal scales)
        n * np.float32(1e-30),                                             # tiny (fp16 scales underflow)
        np.tile(np.float32([1.0, -1.0]), (1, width // 2)),                 # +a / -a ties
        np.where(np.arange(width) % 97 == 0, np.float32(50.0), np.float32(0.0))[None],  # spikes
        rng.integers(-8, 8, (1, width)).astype(np.float32),                # small integers (rounding ties)
    ]
    mixed = n.copy()
    mixed[:, :32] = 0.0                                                    # zero block inside a row
    mixed[:, 32:64] = 2.5                                                  # constant block inside a row
    mixed[:, 64:96] *= np.float32(1e-8)
    rows.append(mixed)
    return np.concatenate(rows + [rng.standard_normal((19, width)).astype(np.float32)], axis=0)


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------

def test_table_matches_gguf_sizes():
    assert SUPPORTED == set(GGUF_TYPES) | set(K_TYPES) | {QT.F32}
    for qt, row in TYPES.items():
        assert (row.block_size, row.type_size) == gguf.GGML_QUANT_SIZES[qt]
        assert row.bits == pytest.approx(row.type_size * 8 / row.block_size)
        assert row.source == ("dgrun" if qt in K_TYPES else "gguf")


@pytest.mark.parametrize("qt", sorted(SUPPORTED), ids=lambda t: t.name)
def test_shapes_and_dtype(qt):
    bs = TYPES[qt].block_size
    x = _normal(6, 2 * 256).reshape(2, 3, 512)
    q = quantize(x, qt)
    assert q.dtype == np.uint8
    assert q.shape == byte_shape(x.shape, qt) == (2, 3, 512 // bs * TYPES[qt].type_size)
    assert quant_shape(q.shape, qt) == x.shape
    y = dequantize(q, qt)
    assert y.dtype == np.float32 and y.shape == x.shape


def test_bad_inputs():
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 100), np.float32), QT.Q4_K)
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 48), np.float32), QT.Q8_0)
    with pytest.raises(NotImplementedError):
        quantize(np.zeros((2, 256), np.float32), QT.Q2_K)


# ---------------------------------------------------------------------------
# round trips on N(0, 1) data
# ---------------------------------------------------------------------------

# Relative RMSE bounds on N(0, 1) data. For a b-bit grid with step D the
# error RMS is about D/sqrt(12). Symmetric types (Q8_0, Q4_0, Q5_0) span
# about 2*2.5 sigma (abs max of 32 normals ~ 2.5) with 2^b - 1 steps, the
# min/max types (Q4_1, Q5_1) span max-min ~ 4.1 sigma with 2^b - 1 steps;
# bounds are those estimates plus ~15%. K-quants must beat the plain
# min/max type of the same bit width (their scale search is the point):
# Q4_K below Q4_1's bound, Q5_K below Q5_1's, Q6_K about half of Q5_K.
# F16/BF16 keep p = 11/8 significant bits: the rounding error is uniform over
# one ulp <= 2^-(p-1)|x|, so the relative RMS is at most 2^-(p-1)/sqrt(12).
RMSE_BOUND = {
    QT.F32: 0.0,
    QT.F16: 2.0 ** -10 / np.sqrt(12),          # 2.8e-4 (measured 2.1e-4)
    QT.BF16: 2.0 ** -7 / np.sqrt(12),          # 2.3e-3 (measured 1.7e-3)
    QT.Q8_0: 5.0 / 255 / np.sqrt(12) * 1.15,    # 0.0065
    QT.Q4_0: 5.0 / 15 / np.sqrt(12) * 1.15,     # 0.111 (measured 0.086)
    QT.Q5_0: 5.0 / 31 / np.sqrt(12) * 1.15,     # 0.054
    QT.Q4_1: 4.1 / 15 / np.sqrt(12) * 1.15,     # 0.091
    QT.Q5_1: 4.1 / 31 / np.sqrt(12) * 1.15,     # 0.044
    QT.Q4_K: 0.080,                             # measured 0.0714
    QT.Q5_K: 0.040,                             # measured 0.0361
    QT.Q6_K: 0.020,                             # measured 0.0178
}


@pytest.fixture(scope="module")
def normal_data() -> np.ndarray:
    return _normal(128, 4096, seed=1)


@pytest.mark.parametrize("qt", sorted(SUPPORTED), ids=lambda t: t.name)
def test_roundtrip_rmse(qt, normal_data):
    x = normal_data
    q = quantize(x, qt)
    y = np.asarray(gq.dequantize(q, qt), np.float32).reshape(x.shape)
    np.testing.assert_array_equal(dequantize(q, qt), y)
    err = _rel_rmse(x, y)
    assert err <= RMSE_BOUND[qt], f"{qt.name}: relative RMSE {err:.4g} > {RMSE_BOUND[qt]:.4g}"
    if qt != QT.F32:
        assert err > 0


def test_k_quant_error_ordering(normal_data):
    x = normal_data[:32]
    err = {qt: _rel_rmse(x, gq.dequantize(quantize(x, qt), qt)) for qt in K_TYPES}
    assert err[QT.Q6_K] < err[QT.Q5_K] < err[QT.Q4_K]
    # each extra bit should roughly halve the error
    assert err[QT.Q5_K] < 0.6 * err[QT.Q4_K]
    assert err[QT.Q6_K] < 0.6 * err[QT.Q5_K]


def _naive_minmax(x: np.ndarray, bits: int) -> np.ndarray:
    """Plain per-32 min/max asymmetric quantizer, float64, round to nearest."""
    b = x.reshape(-1, 32).astype(np.float64)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / (2 ** bits - 1)
    safe = np.where(d == 0, 1.0, d)
    q = np.clip(np.rint((b - lo) / safe), 0, 2 ** bits - 1)
    return (q * d + lo).reshape(x.shape)


@pytest.mark.parametrize("qt,bits", [(QT.Q4_K, 4), (QT.Q5_K, 5)], ids=["Q4_K", "Q5_K"])
def test_k_quant_beats_naive_minmax(qt, bits, normal_data):
    x = normal_data[:32]
    k = _rel_rmse(x, gq.dequantize(quantize(x, qt), qt))
    naive = _rel_rmse(x, _naive_minmax(x, bits))
    assert k <= naive, f"{qt.name} {k:.4g} worse than naive {bits}-bit min/max {naive:.4g}"


# ---------------------------------------------------------------------------
# bit-exactness with gguf-py where it can quantize
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("qt", GGUF_TYPES, ids=lambda t: t.name)
def test_bit_exact_with_gguf(qt):
    rng = np.random.default_rng(7)
    x = np.concatenate([_edge_rows(rng), _normal(64, 256, seed=3)], axis=0)
    with np.errstate(all="ignore"):
        ours = quantize(x, qt)
        ref = np.ascontiguousarray(gq.quantize(x, qt)).view(np.uint8)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_f32_is_exact():
    x = _edge_rows(np.random.default_rng(2))
    q = quantize(x, QT.F32)
    np.testing.assert_array_equal(q.view(np.float32), x)
    np.testing.assert_array_equal(dequantize(q, QT.F32), x)


# ---------------------------------------------------------------------------
# K-quant structure, decoded with gguf-py's dequantize
# ---------------------------------------------------------------------------

def _k4_scale_min(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte 6-bit scale/min packing -> (scale, min) per sub-block, (nb, 8)."""
    s = sc12.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    mn = np.empty((s.shape[0], 8), np.int32)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _assert_on_grid(q: np.ndarray, valid: np.ndarray, lo: int, hi: int):
    q = q[valid]
    assert q.size > 0
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q, np.rint(q), atol=2e-3)
    assert q.min() >= lo - 2e-3 and q.max() <= hi + 2e-3


@pytest.mark.parametrize("qt,nmax", [(QT.Q4_K, 15), (QT.Q5_K, 31)], ids=["Q4_K", "Q5_K"])
def test_q45k_values_on_grid(qt, nmax):
    x = _normal(64, 256, seed=5) * np.exp(np.random.default_rng(6).normal(0, 1, (64, 1))).astype(np.float32)
    blk = quantize(x, qt).reshape(-1, TYPES[qt].type_size)
    y = gq.dequantize(blk, qt).reshape(-1, 8, 32).astype(np.float64)
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = blk[:, 2:4].copy().view(np.float16).astype(np.float64)
    sc, mn = _k4_scale_min(blk[:, 4:16])
    # ggml maps the largest sub-block scale and min of each super-block to 63
    assert np.all(sc.max(axis=1) == 63) and np.all(mn.max(axis=1) == 63)
    step = (d * sc)[..., None]
    off = (dmin * mn)[..., None]
    valid = np.broadcast_to(step != 0, y.shape)
    with np.errstate(all="ignore"):
        q = (y + off) / step
    _assert_on_grid(q, valid, 0, nmax)
    # and the grid point is the nearest one (within the clamp) for most values
    xq = (x.reshape(-1, 8, 32).astype(np.float64) + off) / step
    near = np.clip(np.rint(xq), 0, nmax)
    assert np.mean(near == np.rint(q)) > 0.99


def test_q6k_values_on_grid():
    x = _normal(64, 256, seed=8)
    blk = quantize(x, QT.Q6_K).reshape(-1, 210)
    y = gq.dequantize(blk, QT.Q6_K).reshape(-1, 16, 16).astype(np.float64)
    sc = blk[:, 192:208].view(np.int8).astype(np.float64)
    d = blk[:, 208:210].copy().view(np.float16).astype(np.float64)
    # ggml maps the sub-block scale of largest magnitude to -128
    assert np.all((sc == -128).any(axis=1))
    step = (d * sc)[..., None]
    valid = np.broadcast_to(step != 0, y.shape)
    with np.errstate(all="ignore"):
        q = y / step
    _assert_on_grid(q, valid, -32, 31)


@pytest.mark.parametrize("qt", K_TYPES, ids=lambda t: t.name)
def test_k_quant_edge_cases(qt):
    rng = np.random.default_rng(9)
    x = _edge_rows(rng)
    q = quantize(x, qt)
    with np.errstate(all="ignore"):                  # the 1e30 row decodes to inf/nan, as in ggml
        y = gq.dequantize(q, qt).reshape(x.shape)
    # all-zero rows decode to exact zeros
    np.testing.assert_array_equal(y[0], 0)
    if qt == QT.Q6_K:
        np.testing.assert_array_equal(q[0], 0)       # ggml memsets an all-zero Q6_K block
    # constant and sign-only rows, moderate magnitudes: close to the input
    for i in (1, 2, 3, 4, 5, 7, 9, 11, 12):
        assert _rel_rmse(x[i], y[i]) < 0.12, (qt.name, i)
    # zero block inside a row stays (nearly) zero, relative to the row scale
    assert np.max(np.abs(y[12, :32])) <= 0.1 * np.max(np.abs(x[12]))
    # the remaining normal rows
    assert _rel_rmse(x[13:], y[13:]) < RMSE_BOUND[qt] * 1.1


@pytest.mark.parametrize("qt", K_TYPES, ids=lambda t: t.name)
def test_k_quant_is_deterministic_across_chunking_and_threads(qt, monkeypatch):
    import dgrun.convert.quants as Q
    x = _normal(3 * 7, 256 * 5, seed=11)             # 105 super-blocks
    ref = quantize(x, qt)
    monkeypatch.setattr(Q, "_CHUNK_BLOCKS", 8)       # ragged last chunk
    np.testing.assert_array_equal(quantize(x, qt, threads=3), ref)
    np.testing.assert_array_equal(quantize(x.astype(np.float64), qt), ref)
    # each row is quantized independently of its neighbours
    np.testing.assert_array_equal(quantize(x[5:6], qt), ref[5:6])


def _det_data(n: int) -> np.ndarray:
    """Platform-independent float32 test data (integer hash, exact float ops only).

    Uniform noise with per-super-block scales 1/16 .. 16, cubed in places for
    heavier tails, plus all-zero, constant and negative-only 32-blocks.
    """
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)) >> np.uint64(40)
    u = (h & np.uint64(0xFFFFFF)).astype(np.float32) / np.float32(2 ** 24)        # [0, 1)
    v = (u - np.float32(0.5)) * np.float32(4.0)
    blk = i // 32
    v = np.where(blk % 3 == 2, v * v * v, v)
    v = np.where(blk % 7 == 0, np.float32(0), v)
    v = np.where(blk % 11 == 5, np.float32(1.25), v)
    v = np.where(blk % 5 == 1, -np.abs(v), v)
    scale = np.float32(2.0) ** ((i // 256) % 9).astype(np.float32) / np.float32(16)
    return (v * scale).reshape(-1, 512)


# sha256 of our output on _det_data(65536). These bytes were cross-checked to
# be identical to ggml's quantize_row_q{4,5,6}_K_ref while developing; the pin
# guards against regressions in the float32 operation order.
GOLDEN = {
    QT.Q4_K: "095002c8eab1deaf96bc530ed95a31347ef0b3f2db8426322027d1f6bdf3eeae",
    QT.Q5_K: "44bdc0dac7f2e7aede64340dd6bf42c517ff3c2f5143a765d4e1d217b99342d9",
    QT.Q6_K: "812eed41f69ce5d0ec6cd0977ad9c16d3fe7ddfa451c497a21ef7f568ef8bd02",
}


@pytest.mark.parametrize("qt", K_TYPES, ids=lambda t: t.name)
def test_k_quant_golden_digest(qt):
    q = quantize(_det_data(65536), qt)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GOLDEN[qt]


def test_nearest_int_matches_ggml_trick():
    # ggml's nearest_int is round-half-to-even (float32 add of 1.5*2^23), and
    # the vectorised fast path must agree with the exact bit-level emulation.
    from dgrun.convert.quants import _nearest_clamped, _nearest_int
    v = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 14.5, 15.5, -31.5, 3.0, -0.0])
    np.testing.assert_array_equal(_nearest_int(v), [0, 2, 2, 0, -2, -2, 0, 14, 16, -32, 3, 0])
    # out of range: the C trick reads the low 23 mantissa bits
    np.testing.assert_array_equal(_nearest_int(np.float32([np.nan, np.inf, -np.inf])),
                                  [0, -0x400000, -0x400000])
    rng = np.random.default_rng(4)
    w = np.concatenate([rng.uniform(-40, 40, 4000), np.arange(-80, 80) / 2.0]).astype(np.float32)
    for lo, hi in ((0, 15), (0, 31), (-32, 31)):
        fast = _nearest_clamped(w.copy(), lo, hi, in_range=True)
        exact = _nearest_clamped(w.copy(), lo, hi)
        np.testing.assert_array_equal(fast, exact)
        np.testing.assert_array_equal(exact, np.clip(np.rint(w), lo, hi))
