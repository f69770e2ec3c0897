"""Which GGUF type a tensor gets in a llama.cpp quantization mix: pure functions over names and shapes.

llama.cpp's rules: convert_hf_to_gguf.py keeps norms, the router and scales in F32; llama-quantize's Q4_K_M /
Q5_K_M / Q6_K mix (src/llama-quant.cpp) gives some tensors more bits, and a row that is not a multiple of 256
falls back to a 32-block type of similar size. `dgrun convert` (convert/policy.py) writes files with these rules,
and `dgrun bench --random-weights` (dgrun/random_weights.py) builds the same mix without a file, so the rule
lives here, where both may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

# llama-quantize's fallback when a row is not a multiple of 256: a 32-block type of similar size.
K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


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


def choose(name: str, shape: tuple[int, ...], source: QT | None, base: QT, info: MixInfo,
           override: QT | None = None) -> QT:
    """The type of one tensor in the mix whose default type is `base` (Q8_0, Q4_K for Q4_K_M, BF16, ...).
    `source` is its GGUF type when requantizing, None from safetensors; `override` a --tensor-type choice."""
    ndim, ne0 = len(shape), shape[-1]
    if not quantizable(name, ndim) or keeps_float32(name, ndim):
        return QT.F32 if source is None else source  # llama-quantize leaves these as they are
    if override is not None:
        return fallback(override, ne0)
    if base in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return fallback(k_mix(name, ne0, info, base), ne0)
    return fallback(base, ne0)  # F16/BF16 always fit; Q8_0 falls back to F16 as the converter does
