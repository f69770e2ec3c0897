"""Kept for backends/ until issue 10 imports dgrun.packed directly."""

from dgrun.packed import PACKED, QTensor  # noqa: F401
