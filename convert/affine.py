"""Kept for backends/ until issue 10 imports dgrun.packed directly (the format lives in dgrun/packed.py)."""

from dgrun.packed import BITS, GROUP_SIZES, AffineTensor, check_params, dequantizing, pack, unpack  # noqa: F401
