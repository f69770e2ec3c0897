"""GGUF metadata as llama.cpp's DiffusionGemma converter writes it (types included), plus copying a GGUF's.

Keys and value types follow conversion/diffusion_gemma.py -> Gemma4 -> Gemma3 -> TextModel at
unslothai/llama.cpp c3fb97241; a key the converter writes twice is written once, with its final value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType as VT

from dgrun.formats.gguf_file import GGUFFile
from dgrun.models.diffusion_gemma import ARCH, SAMPLER_KEYS, ModelArgs


@dataclass(frozen=True)
class KV:
    value: Any
    vtype: VT
    sub: VT | None = None  # element type of an array


class Metadata(dict):
    """key -> KV in writing order; the typed setters mirror GGUFWriter's add_* calls."""

    def u32(self, key: str, v) -> None:
        self[key] = KV(int(v), VT.UINT32)

    def f32(self, key: str, v) -> None:
        self[key] = KV(float(v), VT.FLOAT32)

    def bool(self, key: str, v) -> None:
        self[key] = KV(bool(v), VT.BOOL)

    def str(self, key: str, v) -> None:
        self[key] = KV(v, VT.STRING)

    def array(self, key: str, values: list, sub: VT) -> None:
        self[key] = KV(list(values), VT.ARRAY, sub)


def text_hparams(config: dict) -> dict:
    """The converter's hparams: the root config with text_config merged over it."""
    return {**config, **(config.get("text_config") or {})}


def parameter_counts(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, experts) as GGUFWriter.get_total_parameter_count counts them."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        if "_exps." in name and len(shape) >= 3:
            expert += size // shape[-3]
            expert_sum += shape[-3]
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def general_metadata(model_dir: Path, shapes: dict[str, tuple[int, ...]]) -> Metadata:
    """general.* as the converter derives it: gguf-py's model-card heuristics, the directory name, a size label."""
    counts = parameter_counts(shapes)
    meta = gguf.Metadata.load(None, model_dir, None, counts[0])
    meta.name = meta.name or model_dir.name
    meta.size_label = meta.size_label or gguf.size_label(*counts)
    scratch = gguf.GGUFWriter(None, ARCH)
    scratch.add_type("model")
    meta.set_gguf_meta_model(scratch)
    return Metadata({k: KV(v.value, v.type, v.sub_type) for k, v in scratch.kv_data[0].items()})


def model_metadata(config: dict, args: ModelArgs, generation: dict | None, general: Metadata,
                   file_type: int) -> Metadata:
    """general.*, diffusion-gemma.* and diffusion.* keys for an HF checkpoint's config."""
    hp, m = text_hparams(config), Metadata(general)
    k = lambda key: f"{ARCH}.{key}"  # noqa: E731
    full = next(s for s in args.layers if not s.sliding)
    swa = next((s for s in args.layers if s.sliding), full)
    m.u32(k("block_count"), args.num_hidden_layers)
    m.u32(k("context_length"), hp.get("max_position_embeddings") or 131072)
    m.u32(k("embedding_length"), args.hidden_size)
    m.u32(k("feed_forward_length"), args.intermediate_size)
    m.u32(k("attention.head_count"), args.num_attention_heads)
    if hp.get("num_global_key_value_heads") is not None or args.per_layer_config:
        # Gemma4 writes a per-layer INT32 array when full layers have their own kv-head count.
        m.array(k("attention.head_count_kv"), [s.n_kv_heads for s in args.layers], VT.INT32)
    else:
        m.u32(k("attention.head_count_kv"), args.num_key_value_heads)
    m.f32(k("rope.freq_base"), full.rope_theta)
    m.f32(k("rope.freq_base_swa"), swa.rope_theta)
    m.f32(k("attention.layer_norm_rms_epsilon"), args.rms_norm_eps)
    m.u32(k("expert_count"), args.num_experts)
    m.u32(k("expert_used_count"), args.top_k_experts)
    m.u32(k("attention.key_length"), full.head_dim)  # key/value_length describe the full layers
    m.u32(k("attention.value_length"), full.head_dim)
    if hp.get("final_logit_softcapping"):
        m.f32(k("final_logit_softcapping"), hp["final_logit_softcapping"])
    m.u32("general.file_type", file_type)
    m.u32(k("attention.sliding_window"), args.sliding_window)
    m.u32(k("attention.shared_kv_layers"), 0)
    m.u32(k("embedding_length_per_layer_input"), 0)
    m.array(k("attention.sliding_window_pattern"), [s.sliding for s in args.layers], VT.BOOL)
    m.u32(k("attention.key_length_swa"), swa.head_dim)
    m.u32(k("attention.value_length_swa"), swa.head_dim)
    m.u32(k("expert_feed_forward_length"), args.moe_intermediate_size)
    m.u32(k("rope.dimension_count"), full.head_dim)  # the whole head: partial rotary lives in rope_freqs
    top_factor = (hp.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    m.u32(k("rope.dimension_count_swa"), int(swa.head_dim * top_factor))
    m.bool(k("attention.causal"), False)
    m.u32("diffusion.canvas_length", args.canvas_length)
    m.update(sampler_metadata(generation or {}))
    m.u32("general.quantization_version", 2)
    return m


def sampler_metadata(gen: dict) -> Metadata:
    """diffusion.eb_* from generation_config.json (SAMPLER_KEYS; entropy_bound is nested under sampler_config)."""
    m = Metadata()
    for _, key, gguf_key, kind in SAMPLER_KEYS:
        node = gen
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if gguf_key is not None and node is not None:  # released configs may hold nulls: write only what is set
            (m.u32 if kind is int else m.f32)(gguf_key, node)
    return m


def rope_freqs(args: ModelArgs) -> list[float]:
    """The full layers' frequency factors: 1.0 for each rotated pair, 1e30 (no rotation) for the rest."""
    full = next(s for s in args.layers if not s.sliding)
    n_rot = int(full.head_dim * full.partial_rotary_factor / 2)
    return [1.0] * n_rot + [1e30] * (full.head_dim // 2 - n_rot)


def copied_metadata(reader: GGUFFile, file_type: int) -> Metadata:
    """A source GGUF's keys as they are (types kept); the quantization version and the new file type go
    last, where llama-quantize puts them."""
    m = Metadata()
    for key, f in reader.fields.items():
        if key not in ("general.alignment", "general.quantization_version", "general.file_type"):
            m[key] = KV(f.value, f.vtype, f.sub)
    m.u32("general.quantization_version", 2)
    m.u32("general.file_type", file_type)
    return m
