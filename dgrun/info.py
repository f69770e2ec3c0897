"""`info(model)`: what a checkpoint holds, read from headers only (GGUF or HF directory)."""

from __future__ import annotations

import math
from pathlib import Path

from dgrun.errors import DgrunError
from dgrun.models.diffusion_gemma import ARCH, ModelArgs, context_limit

ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def itemsize(dtype: str) -> int:
    if dtype not in ST_ITEMSIZE:
        raise DgrunError(f"unknown safetensors dtype {dtype}")
    return ST_ITEMSIZE[dtype]


def hyperparameters(args: ModelArgs) -> dict:
    specs = args.layers
    full = next(s for s in specs if not s.sliding)
    swa = next((s for s in specs if s.sliding), full)
    return {
        "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
        "layers": f"{args.num_hidden_layers} ({sum(s.sliding for s in specs)} sliding, "
                  f"{sum(not s.sliding for s in specs)} full)",
        "attention_heads": args.num_attention_heads,
        "kv_heads": f"{swa.n_kv_heads} sliding, {full.n_kv_heads} full",
        "head_dim": f"{swa.head_dim} sliding, {full.head_dim} full",
        "sliding_window": args.sliding_window,
        "context_length": args.max_position_embeddings,
        "context_limit": f"{context_limit(args)} tokens per cache slot here (-c/--ctx-size; the context length "
                         "capped by memory)",
        "rope_theta": f"{swa.rope_theta:g} sliding, {full.rope_theta:g} full "
                      f"(partial {full.partial_rotary_factor:g})",
        "experts": f"{args.num_experts}, top-{args.top_k_experts}, ffn {args.moe_intermediate_size}",
        "dense_ffn": args.intermediate_size,
        "final_logit_softcapping": args.final_logit_softcapping,
        "rms_norm_eps": args.rms_norm_eps,
        "eos_token_id": args.eos_token_id,
    }


def _gguf(path: Path) -> dict:
    from gguf import LlamaFileType

    from dgrun.formats.gguf import scalar, read_gguf, sampler_defaults

    reader, args = read_gguf(path)
    types, params = {}, 0
    for t in reader.tensors:
        row = types.setdefault(t.qtype.name, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += t.n_bytes
        params += math.prod(t.shape) if t.name != "rope_freqs.weight" else 0
    ftype = scalar(reader, path, "general.file_type", "int", None)
    tokens = reader.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else None
    meta = {"general.name": scalar(reader, path, "general.name", "str", None),
            "general.file_type": LlamaFileType(ftype).name if ftype in set(LlamaFileType) else ftype,
            "tokenizer": f"{reader.get('tokenizer.ggml.model')}, {len(tokens)} tokens" if tokens else None,
            "chat_template": "tokenizer.chat_template" in reader.fields}
    return _summary("gguf", path, args, params, len(reader.tensors), types, meta, sampler_defaults(reader))


def _mlx(path: Path) -> dict:
    """An MLX-format directory: sizes from the safetensors headers (packed words, scales, biases as stored)."""
    from dgrun.formats.common import read_generation_config
    from dgrun.formats.mlx import quant_block
    from dgrun.formats.safetensors import headers, read_config, safetensors_files
    from dgrun.models.diffusion_gemma import n_params

    config, args = read_config(path)
    quant_block(config, path)
    defaults, args = read_generation_config(path, args)
    types, n = {}, 0
    for ref in headers(safetensors_files(path)).values():
        row = types.setdefault(ref.dtype, {"tensors": 0, "bytes": 0})
        row["tensors"] += 1
        row["bytes"] += math.prod(ref.shape) * itemsize(ref.dtype)
        n += 1
    q = config.get("quantization") or {}
    q = q if isinstance(q, dict) else {}
    overrides = sum(isinstance(v, dict) for v in q.values())
    meta = {"quantization": f"{q.get('bits')}-bit, group {q.get('group_size')}; {overrides} matrices overridden",
            "tokenizer": "tokenizer.json" if (path / "tokenizer.json").is_file() else None}
    return _summary("mlx", path, args, n_params(args), n, types, meta, defaults)


def _hf(path: Path) -> dict:
    from dgrun.formats.mlx import is_mlx_dir
    from dgrun.formats.safetensors import open_hf_dir

    if is_mlx_dir(path):
        return _mlx(path)
    ckpt = open_hf_dir(path)
    types, params = {}, 0
    for ref in ckpt.weights.values():
        row = types.setdefault(ref.dtype, {"tensors": 0, "bytes": 0})
        n = math.prod(ref.shape)
        row["tensors"] += 1
        row["bytes"] += n * itemsize(ref.dtype)
        params += n
    meta = {"files": len(list(path.glob("*.safetensors"))),
            "tokenizer": "tokenizer.json" if (path / "tokenizer.json").is_file() else None}
    return _summary("safetensors", path, ckpt.args, params, len(ckpt.weights), types, meta, ckpt.defaults)


def _summary(fmt, path, args, params, n_tensors, types, meta, defaults) -> dict:
    return {"path": str(path), "format": fmt, "architecture": ARCH, "parameters": params,
            "canvas_length": args.canvas_length, "tensors": n_tensors,
            "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
            "bytes": sum(r["bytes"] for r in types.values()), "metadata": meta,
            "hyperparameters": hyperparameters(args), "sampler_defaults": defaults}


def info(model=None) -> dict:
    """Architecture, parameter count, canvas length, tensors and bytes per type, key metadata, sampler defaults.
    With no model: the embedded one."""
    from dgrun.models import DEFAULT_MODEL

    path = Path(DEFAULT_MODEL if model is None else model).expanduser()
    if not path.exists():
        raise DgrunError(f"{path}: no such file or directory")
    if path.is_dir():
        return _hf(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF" and path.suffix.lower() != ".gguf":
            raise DgrunError(f"{path}: not a checkpoint directory or a .gguf file")
    return _gguf(path)
