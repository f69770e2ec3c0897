"""What `dgrun convert --to mlx-*` reads: any checkpoint dgrun loads, as config.json + flat tensors read
one at a time in float32, + generation config + tokenizer files to copy.

HF directories are read lazily by header (helper functions of dgrun.checkpoint); GGUF files are memory-mapped,
their packed types dequantized tensor by tensor (so a GGUF source is requantized, not mapped); MLX directories
are read whole. A GGUF has no config.json or tokenizer files: they are written from its ModelArgs, sampler
defaults and tokenizer metadata.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dgrun.formats.safetensors import LazyTensor, open_hf_dir
from dgrun.jsonfile import read_json
from dgrun.models.diffusion_gemma import SAMPLER_KEYS, ModelArgs
from dgrun.packed import AffineTensor, QTensor

TOKENIZER_GLOBS = ("*.json", "*.jinja", "*.model", "*.txt")  # as mlx-vlm's convert copies them
NOT_COPIED = {"config.json", "model.safetensors.index.json"}


@dataclass
class Source:
    args: ModelArgs
    config: dict  # config.json for the output, without any quantization block
    generation: dict | None  # generation_config.json to write (GGUF sampler defaults); directories copy theirs
    tensors: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]  # flat name -> (shape, read)
    files: list[Path]  # tokenizer / processor / template files to copy
    written: dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> text (from a GGUF)


def _reader(value) -> Callable[[], torch.Tensor]:
    if isinstance(value, LazyTensor):
        def read():
            from safetensors import safe_open

            with safe_open(value.file, framework="pt") as st:
                return st.get_tensor(value.name)
        return read
    if isinstance(value, (QTensor, AffineTensor)):
        return value.dequantize
    return lambda: torch.as_tensor(value)


def _copy_list(path: Path) -> list[Path]:
    return sorted({f for g in TOKENIZER_GLOBS for f in path.glob(g) if f.name not in NOT_COPIED and f.is_file()})


def config_from_args(args: ModelArgs) -> dict:
    """A DiffusionGemma config.json for a GGUF source (text only: GGUF files hold no vision tower)."""
    text = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("canvas_length", "per_layer_config")}
    text.update(model_type="diffusion_gemma_text", tie_word_embeddings=True)
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": args.canvas_length, "text_config": text, "vision_config": None,
            "eos_token_id": args.eos_token_id, "tie_word_embeddings": True}


def generation_from_defaults(defaults: dict, args: ModelArgs) -> dict:
    """dgrun's sampler knobs -> generation_config.json keys (SAMPLER_KEYS; a dotted key is nested)."""
    gen = {}
    for knob, key, gguf_key, _ in SAMPLER_KEYS:
        if knob in defaults and gguf_key is not None:  # what a GGUF can hold
            *parents, leaf = key.split(".")
            node = gen
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = defaults[knob]
    gen.update(eos_token_id=args.eos_token_id, pad_token_id=args.pad_token_id, bos_token_id=args.bos_token_id)
    return gen


def gguf_tokenizer_files(src: Path, tok) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja rebuilt from a GGUF's tokenizer."""
    import json

    if tok is None:
        print(f"dgrun: warning: {src.name} holds no tokenizer: the output can only take token ids", file=sys.stderr)
        return {}
    files = {"tokenizer.json": tok.tok.to_str(),
             "tokenizer_config.json": json.dumps({"bos_token": tok.bos_token, "eos_token": tok.eos_token}, indent=2)}
    if tok.chat_template:
        files["chat_template.jinja"] = tok.chat_template
    return files


def open_source(src: Path) -> Source:
    from dgrun.checkpoint import load
    from dgrun.formats.mlx import is_mlx_dir

    if src.is_dir() and not is_mlx_dir(src):
        ckpt = open_hf_dir(src)
    else:
        ckpt = load(src)
    tensors = {name: (tuple(v.shape), _reader(v)) for name, v in ckpt.weights.items()}
    if not src.is_dir():
        return Source(ckpt.args, config_from_args(ckpt.args), generation_from_defaults(ckpt.defaults, ckpt.args),
                      tensors, [], gguf_tokenizer_files(src, ckpt.tokenizer))
    config = read_json(src / "config.json")
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["vision_config"] = None  # the vision tower is not converted: text-only, as mlx-vlm loads it
    full = next((s for s in ckpt.args.layers if not s.sliding), None)
    if full is not None:  # mlx-vlm reads the released config's flat keys, not transformers' per_layer_config
        config["text_config"] = {**config.get("text_config", {}), "global_head_dim": full.head_dim,
                                 "num_global_key_value_heads": full.n_kv_heads}
    files = _copy_list(src)  # generation_config.json included, copied as it is
    if not any(f.name == "tokenizer.json" for f in files):
        print(f"dgrun: warning: {src} has no tokenizer.json: the output can only take token ids", file=sys.stderr)
    return Source(ckpt.args, config, None, tensors, files)
