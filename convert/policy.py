"""Which GGUF type each tensor gets, for each `dgrun convert --to` target.

The rules are llama.cpp's: convert_hf_to_gguf.py for the float and Q8_0 files, llama-quantize's Q4_K_M mix
(src/llama-quant.cpp) for gguf-q4/q5/q6, including its shape fallbacks. Pure functions over names and shapes.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from dgrun.errors import DgrunError
from dgrun.packed import GGUF_TYPES


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

# llama-quantize's fallback when a row is not a multiple of 256: a 32-block type of similar size.
K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


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


def keeps_float32(name: str, ndim: int) -> bool:
    """convert_hf_to_gguf's rule: 1-D tensors, norms, the router and non-`.weight` tensors (scales) stay F32."""
    return ndim <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight") \
        or not name.endswith(".weight")


def quantizable(name: str, ndim: int) -> bool:
    """llama-quantize's rule (tensor_allows_quantization) for the tensors of this architecture."""
    return ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def category(name: str) -> str:
    """llama-quantize's tensor category, matched on substrings in its order."""
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    """The layers llama-quantize gives more bits to: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class MixInfo:
    """What the Q4_K_M choice needs beyond a tensor's own name and row length."""

    n_layer: int
    n_expert: int
    attn_v_layers: tuple[int, ...]  # layers holding an attn_v, in order (llama-quantize counts them)


def k_mix(name: str, ne0: int, info: MixInfo, base: QT = QT.Q4_K) -> QT:
    """The Q4_K_M / Q5_K_M / Q6_K type (base Q4_K / Q5_K / Q6_K) before the shape fallback
    (llama_tensor_get_type_impl for LLAMA_FTYPE_MOSTLY_Q4_K_M, _Q5_K_M, _Q6_K)."""
    cat, t = category(name), base
    if cat == "token_embd":  # embeddings are tied, so they get the output tensor's treatment
        t = QT.Q8_0 if ne0 % 256 else QT.Q6_K
    elif cat == "attn_v":
        i = info.attn_v_layers.index(layer_of(name))
        t = QT.Q6_K if use_more_bits(i, len(info.attn_v_layers)) else base
        if info.n_expert == 8:
            t = QT.Q8_0
    elif cat == "attn_k" and info.n_expert == 8:
        t = QT.Q8_0
    elif cat == "ffn_down" and use_more_bits(layer_of(name), info.n_layer):
        t = QT.Q6_K
    elif cat == "attn_output" and info.n_expert == 8 and base == QT.Q4_K:
        t = QT.Q5_K
    return t


def fallback(t: QT, ne0: int) -> QT:
    """A type whose block divides the row: K-quants -> 32-blocks (llama-quantize), then F16."""
    if ne0 % GGML_QUANT_SIZES[t][0]:
        t = K_FALLBACK.get(t, QT.F16)
        if ne0 % GGML_QUANT_SIZES[t][0]:
            t = QT.F16
    return t


def override_for(name: str, overrides) -> tuple[str, QT] | None:
    return next(((g, t) for g, t in overrides if fnmatch.fnmatchcase(name, g)), None)


def choose(name: str, shape: tuple[int, ...], source: QT | None, tgt: Target, info: MixInfo,
           overrides: list[tuple[str, QT]] = ()) -> QT:
    """The output type of one tensor. `source` is its GGUF type when requantizing, None from safetensors."""
    ndim, ne0 = len(shape), shape[-1]
    if not quantizable(name, ndim) or keeps_float32(name, ndim):
        return QT.F32 if source is None else source  # llama-quantize leaves these as they are
    if (hit := override_for(name, overrides)) is not None:
        return fallback(hit[1], ne0)
    if tgt.qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return fallback(k_mix(name, ne0, info, tgt.qtype), ne0)
    return fallback(tgt.qtype, ne0)  # F16/BF16 always fit; Q8_0 falls back to F16 as the converter does
