"""Typed value checks shared by ModelArgs, SamplerConfig and the format readers.

Every value from a file or a caller goes through one of these before use, so absurd input becomes one
DgrunError that names the key and the value, never a TypeError or an allocation deep in a backend.
"""

from __future__ import annotations

import math
import numbers

from dgrun.errors import DgrunError


def show(value) -> str:
    """A value for an error message: repr, cut short, on one line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def reason(e: BaseException) -> str:
    """A library's exception as a short one-line reason (their messages may hold newlines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def fail(name: str, value, why: str):
    raise DgrunError(f"{name} = {show(value)}: {why}")


def integer(name: str, value, lo: int = 1, hi: int = 2**31 - 1) -> int:
    """An int (not a bool, not a float) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(name, value, f"expected an integer from {lo} to {hi}")
    if not lo <= value <= hi:
        fail(name, value, f"must be from {lo} to {hi}")
    return int(value)


def real(name: str, value, lo: float = -math.inf, hi: float = math.inf, above: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] when `above`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(name, value, "expected a number")
    value = float(value)
    if not math.isfinite(value):
        fail(name, value, "must be finite")
    if value < lo or value > hi or (above and value == lo):
        fail(name, value, f"must be {'>' if above else '>='} {lo:g}" + ("" if hi == math.inf else f" and <= {hi:g}"))
    return value


def text(name: str, value, choices=None) -> str:
    if not isinstance(value, str):
        fail(name, value, "expected a string")
    if choices is not None and value not in choices:
        fail(name, value, f"expected one of {', '.join(map(repr, choices))}")
    return value


def mapping(name: str, value) -> dict:
    if not isinstance(value, dict):
        fail(name, value, "expected an object")
    return value


def sequence(name: str, value, length: int | None = None, most: int = 1 << 20) -> list:
    if not isinstance(value, (list, tuple)):
        fail(name, value, "expected a list")
    if length is not None and len(value) != length:
        fail(name, value, f"expected {length} entries, found {len(value)}")
    if len(value) > most:
        fail(name, value, f"more than {most} entries")
    return list(value)


# Sampler knob bounds: far beyond any useful setting, tight enough that a bad file cannot loop or allocate forever.
MAX_STEPS = 1_000_000
MAX_STABILITY = 1_000  # the backends keep this many argmax canvases per block: 8 MiB at a 1,024 canvas
MAX_NEW_TOKENS = 1 << 17  # 128 Ki tokens, a long context's worth


def sampler(knobs: dict) -> dict:
    """The sampler knobs present in `knobs`, checked and normalised (ints stay ints, floats become float)."""
    out = dict(knobs)
    for name in ("steps", "stability_threshold", "max_new_tokens", "seed"):
        if name in out:
            lo, hi = {"steps": (1, MAX_STEPS), "stability_threshold": (0, MAX_STABILITY),
                      "max_new_tokens": (1, MAX_NEW_TOKENS), "seed": (-(2**63), 2**64 - 1)}[name]
            out[name] = integer(name, out[name], lo, hi)
    for name in ("t_min", "t_max"):
        if name in out:
            out[name] = real(name, out[name], 0.0, 1e4)
    for name in ("entropy_bound", "confidence_threshold"):
        if name in out:
            out[name] = real(name, out[name], 0.0, 1e6, above=True)
    if "t_min" in out and "t_max" in out and not out["t_max"] >= out["t_min"]:  # equal: a constant temperature
        raise DgrunError(f"t_max = {out['t_max']:g} must be >= t_min = {out['t_min']:g}")
    return out
