"""Which GGUF type each tensor gets, for each `dgrun convert --to` target.

The rules are llama.cpp's: convert_hf_to_gguf.py for the float and Q8_0 files, llama-quantize's Q4_K_M mix
(src/llama-quant.cpp) for gguf-q4/q5/q6, including its shape fallbacks. Pure functions over names and shapes; the
per-tensor rule itself is models/quant_mix.py (the bench's random weights use it too), re-exported here.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from dgrun.errors import DgrunError
from dgrun.models import quant_mix
from dgrun.models.quant_mix import (K_FALLBACK, MixInfo, category, fallback, k_mix, keeps_float32, layer_of,
                                    quantizable, use_more_bits)
from dgrun.packed import GGUF_TYPES

# Re-exported from models/quant_mix.py for convert/ and its tests.
__all__ = ["K_FALLBACK", "MixInfo", "category", "fallback", "k_mix", "keeps_float32", "layer_of", "quantizable",
           "use_more_bits", "Target", "TARGETS", "target", "target_name", "parse_overrides", "override_for", "choose"]


@dataclass(frozen=True)
class Target:
    label: str  # file-name suffix, as llama.cpp names its files
    qtype: QT  # the default type of a quantizable tensor
    file_type: int  # general.file_type (llama_ftype)


TARGETS = {
    "gguf-bf16": Target("BF16", QT.BF16, 32),
    "gguf-f16": Target("F16", QT.F16, 1),
    "gguf-q8": Target("Q8_0", QT.Q8_0, 7),
    "gguf-q4": Target("Q4_K_M", QT.Q4_K, 15),
    "gguf-q5": Target("Q5_K_M", QT.Q5_K, 17),
    "gguf-q6": Target("Q6_K", QT.Q6_K, 18),
}
# `--to` also takes llama.cpp's type names, in any case: Q8_0, Q4_K_M, Q5_K_M, Q6_K, BF16, F16.
ALIASES = {t.label.lower(): name for name, t in TARGETS.items()}


def target_name(to: str) -> str:
    """A `--to` value as dgrun's target name; unknown ones get the whole list, MLX targets included."""
    from dgrun.backends.mlx_policy import TARGETS as MLX_TARGETS

    name = ALIASES.get(to.lower(), to.lower())
    if name not in TARGETS and name not in MLX_TARGETS:
        raise DgrunError(f"unknown --to {to!r} (choose from {', '.join([*TARGETS, *MLX_TARGETS])}, or a llama.cpp "
                         f"type: {', '.join(t.label for t in TARGETS.values())})")
    return name

# Types a --tensor-type override may name (the ones dgrun can write).
OVERRIDE_TYPES = {t.name.lower(): t for t in GGUF_TYPES}


def target(name: str) -> Target:
    name = target_name(name)
    if name not in TARGETS:
        raise DgrunError(f"--to {name} writes an MLX directory: use convert_mlx")
    return TARGETS[name]


def parse_overrides(specs) -> list[tuple[str, QT]]:
    """`GLOB=TYPE` strings -> [(glob, type)]; the first matching glob wins."""
    out = []
    for spec in specs or ():
        glob, sep, tname = spec.partition("=")
        if not sep or not glob or tname.lower() not in OVERRIDE_TYPES:
            raise DgrunError(f"--tensor-type takes GLOB=TYPE with TYPE one of {', '.join(OVERRIDE_TYPES)}, "
                             f"got {spec!r}")
        out.append((glob, OVERRIDE_TYPES[tname.lower()]))
    return out


def override_for(name: str, overrides) -> tuple[str, QT] | None:
    return next(((g, t) for g, t in overrides if fnmatch.fnmatchcase(name, g)), None)


def choose(name: str, shape: tuple[int, ...], source: QT | None, tgt: Target, info: MixInfo,
           overrides: list[tuple[str, QT]] = ()) -> QT:
    """The output type of one tensor. `source` is its GGUF type when requantizing, None from safetensors."""
    hit = override_for(name, overrides)
    return quant_mix.choose(name, shape, source, tgt.qtype, info, None if hit is None else hit[1])
