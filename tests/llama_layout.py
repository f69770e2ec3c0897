"""A GGUF in llama.cpp's DiffusionGemma layout written directly with gguf-py's GGUFWriter, from a tiny HF
checkpoint: names, key types and dtype rules spelled out here (SPEC.md §3), independent of dgrun's writer."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file

# HF name under model.decoder.layers.N. -> llama.cpp name under blk.N.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight", "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
    "layer_scalar": "layer_output_scale.weight",
}
GLOBAL_NAMES = {
    "model.decoder.embed_tokens.weight": "token_embd.weight", "model.decoder.norm.weight": "output_norm.weight",
    "model.decoder.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "model.decoder.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "model.decoder.self_conditioning.up_proj.weight": "self_cond_up.weight",
    "model.decoder.self_conditioning.down_proj.weight": "self_cond_down.weight",
}


def llama_tensors(ckpt: Path, split_experts: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for name, t in load_file(ckpt / "model.safetensors").items():
        t = t.float().numpy()
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = t
        elif m := re.match(r"model\.decoder\.layers\.(\d+)\.(.+)$", name):
            out[f"blk.{m[1]}.{LAYER_NAMES[m[2]]}"] = t
        elif m := re.match(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$", name):
            out[f"blk.{m[1]}.enc_layer_output_scale.weight"] = t
    if split_experts:
        for name in [n for n in out if n.endswith("ffn_gate_up_exps.weight")]:
            gate_up = out.pop(name)
            half = gate_up.shape[1] // 2
            out[name.replace("gate_up", "gate")] = gate_up[:, :half]
            out[name.replace("gate_up", "up")] = gate_up[:, half:]
    return out


def write_llama_gguf(path: Path, ckpt: Path, shape: dict, canvas: int, matrix_type: QT = QT.F32,
                     split_experts: bool = False, arch: str = "diffusion-gemma", meta_override: dict | None = None,
                     drop: str | None = None, extra: dict | None = None) -> Path:
    """`shape` is the tiny text_config (tests/tiny.py); the last layer is the only full-attention one."""
    n = shape["num_hidden_layers"]
    w = gguf.GGUFWriter(path, arch)
    a = arch + "."
    keys = {
        a + "block_count": n, a + "context_length": 131072, a + "embedding_length": shape["hidden_size"],
        a + "feed_forward_length": shape["intermediate_size"], a + "attention.head_count": shape["num_attention_heads"],
        a + "expert_count": shape["num_experts"], a + "expert_used_count": shape["top_k_experts"],
        a + "attention.key_length": shape["global_head_dim"], a + "attention.value_length": shape["global_head_dim"],
        a + "attention.sliding_window": shape["sliding_window"], a + "attention.key_length_swa": shape["head_dim"],
        a + "attention.value_length_swa": shape["head_dim"],
        a + "expert_feed_forward_length": shape["moe_intermediate_size"],
        a + "rope.dimension_count": shape["global_head_dim"], a + "rope.dimension_count_swa": shape["head_dim"],
        "diffusion.canvas_length": canvas, "diffusion.eb_max_steps": 12, "tokenizer.ggml.eos_token_id": 1,
    }
    keys.update(meta_override or {})
    for k, v in keys.items():
        w.add_uint32(k, v)
    w.add_float32(a + "rope.freq_base", 1e6)
    w.add_float32(a + "rope.freq_base_swa", 1e4)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("diffusion.eb_t_max", 0.75)
    w.add_array(a + "attention.head_count_kv",
                [shape["num_key_value_heads"]] * (n - 1) + [shape["num_global_key_value_heads"]])
    w.add_array(a + "attention.sliding_window_pattern", [True] * (n - 1) + [False])
    w.add_bool(a + "attention.causal", False)
    rot = int(shape["global_head_dim"] * 0.25 / 2)
    tensors = {"rope_freqs.weight": np.array([1.0] * rot + [1e30] * (shape["global_head_dim"] // 2 - rot),
                                             dtype=np.float32)}
    tensors.update(llama_tensors(ckpt, split_experts))
    tensors.update(extra or {})
    for name, t in tensors.items():
        if name == drop:
            continue
        if isinstance(t, tuple):  # (raw bytes, type) for hand-made quantized data
            w.add_tensor(name, t[0], raw_dtype=t[1])
        elif t.ndim >= 2 and name.endswith(".weight") and "_norm" not in name and "gate_inp" not in name:
            w.add_tensor(name, gguf.quants.quantize(t, matrix_type), raw_dtype=matrix_type)
        else:
            w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
