"""Read a DiffusionGemma GGUF (the llama.cpp layout, SPEC.md §3) into a Checkpoint, memory-mapped.

Tensor names are already the flat-dict names, so nothing is renamed: F32/F16/BF16 become torch tensors that
share the file's pages (gguf_file maps it), quantized types stay packed as `QTensor`. Split expert tensors are
fused and `rope_freqs` is checked against the proportional RoPE the engine computes itself. The header is
parsed once: hyperparameters, sampler defaults and the tokenizer all read the same parse, and each metadata
value is type-checked here and range-checked by ModelArgs / checks.sampler before use.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from gguf import GGMLQuantizationType as QT, GGUFValueType

from dgrun import checks, tokenizer
from dgrun.errors import DgrunError
from dgrun.formats.common import Checkpoint, check_shapes
from dgrun.formats.gguf_file import GGUFFile
from dgrun.models.diffusion_gemma import ARCH, SAMPLER_KEYS, ModelArgs, expected_shapes
from dgrun.packed import GGUF_FLOAT, GGUF_TYPES, QTensor

INT_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                       GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
FLOAT_VTYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})
ROPE_UNROTATED = 1e29  # llama.cpp marks unrotated pairs with frequency factor 1e30 (theta / 1e30 ~ 0)


def _float(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def field_value(reader: GGUFFile, key: str, default=None):
    """A metadata value as Python (str, int, float, bool or list); `default` when the key is absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    if (f.sub or f.vtype) == GGUFValueType.FLOAT32:
        return [_float(v) for v in f.value] if f.sub else _float(f.value)
    return f.value


def _kind(vtype) -> str | None:
    return ("int" if vtype in INT_TYPES else "float" if vtype in FLOAT_VTYPES else
            "bool" if vtype == GGUFValueType.BOOL else "str" if vtype == GGUFValueType.STRING else None)


def typed(reader: GGUFFile, key: str, kind: str, default=...):
    """A metadata value of the expected kind ("int", "float" (ints allowed), "str", "bool"), or a list of them
    (per-layer arrays); anything else is one error naming the key and what it holds."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise DgrunError(f"{reader.path}: missing metadata key {key}")
        return default
    got = _kind(f.sub if f.vtype == GGUFValueType.ARRAY else f.vtype)
    if got != kind and not (kind == "float" and got == "int"):
        what = f"an array of {f.sub.name}" if f.sub is not None else f.vtype.name
        raise DgrunError(f"{reader.path}: {key} = {checks.show(f.value)}: expected {kind}, found {what}")
    return field_value(reader, key)


def architecture(reader: GGUFFile, path: Path) -> str:
    arch = field_value(reader, "general.architecture")
    if arch != ARCH:
        raise DgrunError(f"{path}: architecture {checks.show(arch)} is not DiffusionGemma ({ARCH!r})")
    return arch


def scalar(reader, path, key, kind="int", default=...):
    value = typed(reader, key, kind, default)
    if isinstance(value, list):  # llama.cpp allows per-layer arrays for some keys; dgrun needs them uniform
        if len(set(value)) != 1:
            raise DgrunError(f"{path}: {key} varies per layer ({checks.show(value)}), which DiffusionGemma does "
                             f"not do")
        value = value[0]
    return value


def _per_class(values: list, pattern: list[bool], path, key) -> tuple[int, int]:
    """One value for the sliding layers and one for the full layers of a per-layer array."""
    sliding = {v for v, s in zip(values, pattern) if s}
    full = {v for v, s in zip(values, pattern) if not s}
    if len(sliding) > 1 or len(full) > 1:
        raise DgrunError(f"{path}: {key} varies within sliding or full layers ({checks.show(values)})")
    return (sliding or full).pop(), (full or sliding).pop()


def partial_rotary_factor(freqs: np.ndarray, head_dim: int, path) -> float:
    """rope_freqs holds 1.0 for each rotated pair, then 1e30 for each unrotated one (proportional RoPE)."""
    freqs = np.asarray(freqs, dtype=np.float32).reshape(-1)
    if freqs.size != head_dim // 2:
        raise DgrunError(f"{path}: rope_freqs has {freqs.size} entries, expected {head_dim // 2}")
    n_rot = int(np.argmax(freqs >= ROPE_UNROTATED)) if (freqs >= ROPE_UNROTATED).any() else freqs.size
    if not (np.all(freqs[:n_rot] == 1.0) and np.all(freqs[n_rot:] >= ROPE_UNROTATED)):
        raise DgrunError(f"{path}: rope_freqs is not a proportional-RoPE mask (1.0 then 1e30): unsupported")
    return 2 * n_rot / head_dim


def model_args(reader: GGUFFile, path: Path, vocab_size: int, rope_freqs) -> ModelArgs:
    """`diffusion-gemma.*` hyperparameters -> ModelArgs, with llama.cpp's defaults where it has them."""
    k = lambda name: f"{ARCH}.{name}"  # noqa: E731
    n_layer = checks.integer(k("block_count"), scalar(reader, path, k("block_count")), 1, 1024)
    pattern = typed(reader, k("attention.sliding_window_pattern"), "bool")
    if not isinstance(pattern, list) or len(pattern) != n_layer:
        raise DgrunError(f"{path}: {k('attention.sliding_window_pattern')} = {checks.show(pattern)}: expected "
                         f"{n_layer} booleans, one per layer")
    if pattern[-1]:
        raise DgrunError(f"{path}: the last layer must be full attention (sliding_window_pattern ends in true)")
    n_head = scalar(reader, path, k("attention.head_count"))
    n_kv = typed(reader, k("attention.head_count_kv"), "int", n_head)  # llama.cpp's default: no grouping
    n_kv = n_kv if isinstance(n_kv, list) else [n_kv] * n_layer
    if len(n_kv) != n_layer:
        raise DgrunError(f"{path}: head_count_kv has {len(n_kv)} entries for {n_layer} layers")
    kv_swa, kv_full = _per_class(n_kv, pattern, path, "head_count_kv")
    head_dim_full = scalar(reader, path, k("attention.key_length"))
    head_dim_swa = scalar(reader, path, k("attention.key_length_swa"))
    for key, want in (("attention.value_length", head_dim_full), ("attention.value_length_swa", head_dim_swa),
                      ("rope.dimension_count", head_dim_full), ("rope.dimension_count_swa", head_dim_swa)):
        got = scalar(reader, path, k(key), "int", want)
        if got != want:  # the engine rotates whole heads; partial rotary comes only from rope_freqs
            raise DgrunError(f"{path}: {k(key)} = {got}, expected {want}: unsupported")
    head_dim_full = checks.integer(k("attention.key_length"), head_dim_full, 2, 8192)
    prf = 0.25 if rope_freqs is None else partial_rotary_factor(rope_freqs, head_dim_full, path)
    softcap = scalar(reader, path, k("final_logit_softcapping"), "float", 30.0)
    eos = typed(reader, "tokenizer.ggml.eos_token_id", "int", None)
    try:
        return ModelArgs(
            vocab_size=vocab_size,
            hidden_size=scalar(reader, path, k("embedding_length")),
            intermediate_size=scalar(reader, path, k("feed_forward_length")),
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=kv_swa,
            num_global_key_value_heads=kv_full,
            head_dim=head_dim_swa,
            global_head_dim=head_dim_full,
            sliding_window=scalar(reader, path, k("attention.sliding_window")),
            layer_types=["sliding_attention" if s else "full_attention" for s in pattern],
            rope_parameters={
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": scalar(reader, path, k("rope.freq_base_swa"), "float",
                                                            10_000.0)},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": prf,
                                   "rope_theta": scalar(reader, path, k("rope.freq_base"), "float", 1_000_000.0)},
            },
            rms_norm_eps=scalar(reader, path, k("attention.layer_norm_rms_epsilon"), "float"),
            final_logit_softcapping=softcap or None,
            num_experts=scalar(reader, path, k("expert_count")),
            top_k_experts=scalar(reader, path, k("expert_used_count")),
            moe_intermediate_size=scalar(reader, path, k("expert_feed_forward_length")),
            canvas_length=scalar(reader, path, "diffusion.canvas_length"),
            max_position_embeddings=scalar(reader, path, k("context_length"), "int", 131_072),
            pad_token_id=typed(reader, "tokenizer.ggml.padding_token_id", "int", 0),
            bos_token_id=typed(reader, "tokenizer.ggml.bos_token_id", "int", 2),
            eos_token_id=eos_ids(reader, eos),
        )
    except DgrunError as e:
        raise DgrunError(f"{path}: {e}") from None


def eos_ids(reader: GGUFFile, eos) -> list[int]:
    """EOS plus the end-of-turn token, as the released generation_config lists them ([<eos>, <turn|>])."""
    ids = [eos if eos is not None else 1]
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if (v := typed(reader, key, "int", None)) is not None and v not in ids:
            ids.append(v)
    tokens = reader.get("tokenizer.ggml.tokens")
    tokens = tokens[:1024] if isinstance(tokens, list) else []
    if "<turn|>" in tokens:  # Gemma's control tokens sit at the start of the vocab
        tid = tokens.index("<turn|>")
        if tid not in ids:
            ids.append(tid)
    return ids


def sampler_defaults(reader: GGUFFile) -> dict:
    """diffusion.eb_* -> dgrun's knobs (SAMPLER_KEYS), checked as SamplerConfig will check them."""
    out = {}
    for knob, _, key, kind in SAMPLER_KEYS:
        if key is not None and key in reader.fields:
            out[knob] = typed(reader, key, kind.__name__)
    try:
        return checks.sampler(out)
    except DgrunError as e:
        raise DgrunError(f"{reader.path}: sampler defaults (diffusion.eb_*): {e}") from None


def check_type(t, path: Path) -> None:
    if t.qtype not in GGUF_TYPES:
        names = ", ".join(q.name for q in GGUF_TYPES)
        raise DgrunError(f"{path}: tensor {t.name} has type {t.qtype.name}, which dgrun does not support ({names})")


def tensor_value(t):
    """A file tensor as a torch tensor over the mapped file, or a packed QTensor."""
    import torch

    if t.qtype == QT.BF16:
        return torch.from_numpy(t.data.view(np.int16)).view(torch.bfloat16)
    if t.qtype in GGUF_FLOAT:
        return torch.from_numpy(t.data)
    return QTensor(t.data, t.qtype, t.shape)


def _fuse_values(gate, up):
    import torch

    if isinstance(gate, QTensor) and isinstance(up, QTensor) and gate.qtype == up.qtype:
        # Blocks run along rows, so stacking the rows of packed data is exact.
        return QTensor(np.concatenate([gate.data, up.data], axis=1), gate.qtype,
                       (gate.shape[0], 2 * gate.shape[1], gate.shape[2]))
    as_float = lambda t: t.dequantize() if isinstance(t, QTensor) else t.float()  # noqa: E731
    return torch.cat([as_float(gate), as_float(up)], dim=1)


def _fuse_shapes(gate, up):
    return SimpleNamespace(shape=(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]))


def fuse_split_experts(weights: dict, path: Path, fuse=_fuse_values) -> None:
    """`ffn_gate_exps` + `ffn_up_exps` -> `ffn_gate_up_exps`, gate rows first (as llama.cpp splits them)."""
    for gate_name in [n for n in weights if n.endswith(".ffn_gate_exps.weight")]:
        prefix = gate_name[: -len("ffn_gate_exps.weight")]
        up_name = prefix + "ffn_up_exps.weight"
        if up_name not in weights:
            raise DgrunError(f"{path}: {gate_name} has no matching {up_name}")
        if prefix + "ffn_gate_up_exps.weight" in weights:
            raise DgrunError(f"{path}: {prefix} has both fused and split expert tensors")
        gate, up = weights.pop(gate_name), weights.pop(up_name)
        if tuple(gate.shape) != tuple(up.shape) or len(gate.shape) != 3:
            raise DgrunError(f"{path}: {gate_name} {list(gate.shape)} and {up_name} {list(up.shape)} do not pair")
        weights[prefix + "ffn_gate_up_exps.weight"] = fuse(gate, up)
    orphans = [n for n in weights if n.endswith(".ffn_up_exps.weight")]
    if orphans:
        raise DgrunError(f"{path}: {orphans[0]} has no matching ffn_gate_exps")


def read_gguf(path) -> tuple[GGUFFile, ModelArgs]:
    """Open and validate a GGUF (architecture, types, names, shapes) without reading tensor data."""
    path = Path(path)
    reader = GGUFFile(path)
    architecture(reader, path)
    shapes = {}
    for t in reader.tensors:
        check_type(t, path)
        shapes[t.name] = SimpleNamespace(shape=t.shape)
    if "token_embd.weight" not in shapes or len(shapes["token_embd.weight"].shape) != 2:
        raise DgrunError(f"{path}: missing tensor token_embd.weight (or it is not a matrix)")
    if "output.weight" in shapes:
        raise DgrunError(f"{path}: an untied output.weight is not a DiffusionGemma tensor")
    rope = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    shapes.pop("rope_freqs.weight", None)
    if rope is not None:
        rope = tensor_value(rope)
        rope = (rope.dequantize() if isinstance(rope, QTensor) else rope.float()).numpy()
    fuse_split_experts(shapes, path, _fuse_shapes)
    vocab = checks.integer("token_embd.weight rows", shapes["token_embd.weight"].shape[0], 1, 1 << 22)
    args = model_args(reader, path, vocab, rope)
    try:
        check_shapes(shapes, args)
    except DgrunError as e:
        raise DgrunError(f"{path}: {e}") from None
    extra = sorted(set(shapes) - set(expected_shapes(args)))
    if extra:
        more = f" (and {len(extra) - 1} more)" if extra[1:] else ""
        raise DgrunError(f"{path}: unexpected tensor {extra[0]}{more}")
    return reader, args


def load(path) -> Checkpoint:
    reader, args = read_gguf(path)
    weights = {t.name: tensor_value(t) for t in reader.tensors if t.name != "rope_freqs.weight"}
    fuse_split_experts(weights, Path(path))
    tok = tokenizer.from_gguf_or_none(reader, args.vocab_size)  # the same parse: the header is read once
    return Checkpoint(args, weights, sampler_defaults(reader), Path(path), tok)
