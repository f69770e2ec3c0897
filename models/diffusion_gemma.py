"""DiffusionGemma: hyperparameters, the per-layer plan and the weight-name table.

Backend-neutral. Weights are one flat dict keyed by the llama.cpp GGUF tensor names (SPEC.md §3), so a
GGUF loads as it is and an HF checkpoint goes through `sanitize`, whose renames are the one table below.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from dgrun import checks
from dgrun.errors import DgrunError

ARCH = "diffusion-gemma"
LAYER_TYPES = ("sliding_attention", "full_attention")
MAX_HEADS = 1024
# Upper bounds on sizes, far above the released model's, so a corrupt value stops here and not in an allocation.
# canvas_length: the released model uses 256 and known checkpoints go up to 512; 1024 leaves a 2x margin.
MAX_CANVAS = 1024
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
               "num_hidden_layers": 1024, "num_attention_heads": MAX_HEADS, "num_key_value_heads": MAX_HEADS,
               "head_dim": 8192, "global_head_dim": 8192, "sliding_window": 1 << 24, "num_experts": 4096,
               "top_k_experts": 4096, "moe_intermediate_size": 1 << 18, "canvas_length": MAX_CANVAS,
               "max_position_embeddings": 1 << 24}

# The transformers 5.23 defaults (configuration_diffusion_gemma.py), used where a config leaves a key out.
DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(slots=True)
class LayerSpec:
    sliding: bool
    head_dim: int
    n_kv_heads: int
    k_eq_v: bool  # no v_proj: V is the k_proj output (v_norm still applies, k_norm and rope do not)
    rope_type: str  # "default" or "proportional"
    rope_theta: float
    partial_rotary_factor: float


@dataclass(slots=True)
class ModelArgs:
    """The text_config of a DiffusionGemma checkpoint plus the root `canvas_length`; field names are the checkpoint's."""

    vocab_size: int = 262_144
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict = field(default_factory=lambda: dict(DEFAULT_ROPE))
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    hidden_activation: str = "gelu_pytorch_tanh"
    canvas_length: int = 256
    max_position_embeddings: int = 131_072  # the context length (GGUF `context_length`)
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    # Full-attention layers' overrides keyed by layer index, as transformers 5.23 writes `per_layer_config`.
    per_layer_config: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self):
        """Type, range and consistency of every field, whatever the source (config.json, GGUF, a caller)."""
        for name, hi in SIZE_LIMITS.items():
            setattr(self, name, checks.integer(name, getattr(self, name), 1, hi))
        checks.integer("top_k_experts", self.top_k_experts, 1, self.num_experts)
        if self.num_global_key_value_heads is not None:
            checks.integer("num_global_key_value_heads", self.num_global_key_value_heads, 1, MAX_HEADS)
        if not self.layer_types:
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        self.layer_types = checks.sequence("layer_types", self.layer_types, self.num_hidden_layers)
        for kind in self.layer_types:
            checks.text("layer_types entry", kind, LAYER_TYPES)
        self.layer_types[-1] = "full_attention"  # the reference forces the last layer to full attention
        self.rope_parameters = checks.mapping("rope_parameters", self.rope_parameters)
        self.per_layer_config = _per_layer(self.per_layer_config)
        checks.text("hidden_activation", self.hidden_activation, ("gelu_pytorch_tanh", "gelu_tanh"))
        self.rms_norm_eps = checks.real("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, above=True)
        if self.final_logit_softcapping is not None:
            self.final_logit_softcapping = checks.real("final_logit_softcapping", self.final_logit_softcapping,
                                                       0.0, 1e6, above=True)
        eos = self.eos_token_id
        eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else (eos or [])
        self.eos_token_id = [checks.integer("eos_token_id", t, 0, self.vocab_size - 1)
                             for t in checks.sequence("eos_token_id", eos, most=64)]
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) is not None:
                setattr(self, name, checks.integer(name, getattr(self, name), 0, self.vocab_size - 1))
        self.layers  # noqa: B018  (builds and checks every layer's plan now, not at the first forward)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Read a DiffusionGemma `config.json` (root with `text_config`), ignoring keys we do not use."""
        config = checks.mapping("config", config)
        archs = config.get("architectures")
        if config.get("model_type") != "diffusion_gemma" and not (
                isinstance(archs, list) and "DiffusionGemmaForBlockDiffusion" in archs):
            found = config.get("model_type") or archs or "unknown"
            raise DgrunError(f"not a DiffusionGemma checkpoint (model_type: {checks.show(found)})")
        text = dict(checks.mapping("text_config", config.get("text_config") or {}))
        if text.get("use_bidirectional_attention") == "all":
            raise DgrunError("config: use_bidirectional_attention='all' is not a DiffusionGemma setting")
        names = {f.name for f in fields(cls)}
        args = {k: v for k, v in text.items() if k in names and v is not None}
        if config.get("canvas_length") is not None:
            args["canvas_length"] = config["canvas_length"]
        return cls(**args)

    @property
    def layers(self) -> list[LayerSpec]:
        return [self.layer(i) for i in range(self.num_hidden_layers)]

    def layer(self, i: int) -> LayerSpec:
        kind = self.layer_types[i]
        sliding = kind == "sliding_attention"
        rope = checks.mapping(f"rope_parameters[{kind!r}]", self.rope_parameters.get(kind) or DEFAULT_ROPE[kind])
        head_dim, n_kv = self.head_dim, self.num_key_value_heads
        if not sliding:
            # Either form: transformers' per_layer_config, or the released config's flat global_* keys.
            override = self.per_layer_config.get(i)
            if override is not None:
                head_dim = override.get("head_dim", head_dim)
                n_kv = override.get("num_key_value_heads", n_kv)
            else:
                head_dim = self.global_head_dim
                n_kv = self.num_global_key_value_heads or n_kv
        if self.num_attention_heads % n_kv:
            raise DgrunError(f"config: layer {i} has {n_kv} kv heads for {self.num_attention_heads} query heads")
        if head_dim % 2:
            raise DgrunError(f"config: layer {i} has an odd head_dim {head_dim}: rope rotates pairs")
        rope_type = checks.text(f"rope_parameters[{kind!r}].rope_type", rope.get("rope_type", "default"),
                                ("default", "proportional"))
        factor = checks.real(f"rope_parameters[{kind!r}].partial_rotary_factor",
                             rope.get("partial_rotary_factor", 1.0), 0.0, 1.0, above=True)
        if rope_type == "default" and factor != 1.0:
            raise DgrunError(f"config: rope_parameters[{kind!r}]: default rope with partial_rotary_factor "
                             f"{factor:g} is not supported")
        return LayerSpec(
            sliding=sliding,
            head_dim=head_dim,
            n_kv_heads=n_kv,
            k_eq_v=not sliding,  # the reference builds v_proj on sliding layers only
            rope_type=rope_type,
            rope_theta=checks.real(f"rope_parameters[{kind!r}].rope_theta", rope.get("rope_theta"), 0.0, 1e12,
                                   above=True),
            partial_rotary_factor=factor,
        )

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 4) -> int:
    """Cache bytes one committed token takes on the full layers (sliding layers hold a fixed ring)."""
    return sum(2 * s.n_kv_heads * s.head_dim * dtype_bytes for s in args.layers if not s.sliding)


def context_limit(args: ModelArgs, requested: int | None = None, budget: int | None = None) -> int:
    """Tokens a cache slot holds: `requested` (-c/--ctx-size), else the model's context length capped so one
    float32 slot takes at most `budget` bytes (a quarter of this machine's memory)."""
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
            raise DgrunError(f"ctx_size must be a positive integer, got {requested!r}")
        if requested > args.max_position_embeddings:
            raise DgrunError(f"ctx_size {requested} exceeds the model's context length {args.max_position_embeddings}")
        return requested
    if budget is None:
        import os

        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    return max(1, min(args.max_position_embeddings, budget // max(1, kv_bytes_per_token(args))))


def _per_layer(value) -> dict[int, dict]:
    """transformers' per_layer_config: {"5": {"head_dim": 512, "num_key_value_heads": 2}}; other keys ignored."""
    out = {}
    for key, entry in checks.mapping("per_layer_config", value or {}).items():
        if not (str(key).isdigit() and len(str(key)) < 6):
            continue
        entry = checks.mapping(f"per_layer_config[{key!r}]", entry)
        out[int(key)] = {k: checks.integer(f"per_layer_config[{key!r}].{k}", entry[k], 1, hi)
                         for k, hi in (("head_dim", 8192), ("num_key_value_heads", MAX_HEADS)) if k in entry}
    return out


def rope_inv_freq(spec: LayerSpec):
    """Inverse frequencies of length head_dim/2, computed as transformers does (float32 torch ops, same order)."""
    import torch

    d = spec.head_dim
    if spec.rope_type == "proportional":
        # Only the first partial_rotary_factor of the angles rotate; the rest are zero frequency (identity).
        n_rot = int(spec.partial_rotary_factor * d // 2)
        rot = 1.0 / (spec.rope_theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / d))
        return torch.cat([rot, torch.zeros(d // 2 - n_rot, dtype=torch.float32)])
    if spec.rope_type == "default" and spec.partial_rotary_factor == 1.0:
        return 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    raise DgrunError(f"unsupported rope: {spec.rope_type} with partial_rotary_factor {spec.partial_rotary_factor}")


# Sampler defaults: dgrun's knob, its generation_config.json key (a dot means nested), the GGUF key llama.cpp
# writes, and the value type. Readers and writers of both formats use this one table.
SAMPLER_KEYS = [
    ("steps", "max_denoising_steps", "diffusion.eb_max_steps", int),
    ("t_min", "t_min", "diffusion.eb_t_min", float),
    ("t_max", "t_max", "diffusion.eb_t_max", float),
    ("entropy_bound", "sampler_config.entropy_bound", "diffusion.eb_entropy_bound", float),
    ("stability_threshold", "stability_threshold", "diffusion.eb_stability_threshold", int),
    ("confidence_threshold", "confidence_threshold", "diffusion.eb_confidence_threshold", float),
    ("max_new_tokens", "max_new_tokens", None, int),
]


# HF safetensors name -> flat weights-dict name (the llama.cpp GGUF name). `{bid}` is the layer index.
HF_TO_GGUF = {
    "model.decoder.embed_tokens.weight": "token_embd.weight",
    "model.decoder.norm.weight": "output_norm.weight",
    "model.decoder.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "model.decoder.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "model.decoder.self_conditioning.up_proj.weight": "self_cond_up.weight",
    "model.decoder.self_conditioning.down_proj.weight": "self_cond_down.weight",
    "model.decoder.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.decoder.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.decoder.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.decoder.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.decoder.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.decoder.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.decoder.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.decoder.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm.weight",
    "model.decoder.layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.decoder.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.decoder.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.decoder.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "model.decoder.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm.weight",
    "model.decoder.layers.{bid}.post_feedforward_layernorm_1.weight": "blk.{bid}.post_ffw_norm_1.weight",
    "model.decoder.layers.{bid}.pre_feedforward_layernorm_2.weight": "blk.{bid}.pre_ffw_norm_2.weight",
    "model.decoder.layers.{bid}.post_feedforward_layernorm_2.weight": "blk.{bid}.post_ffw_norm_2.weight",
    "model.decoder.layers.{bid}.router.proj.weight": "blk.{bid}.ffn_gate_inp.weight",
    "model.decoder.layers.{bid}.router.scale": "blk.{bid}.ffn_gate_inp.scale",
    "model.decoder.layers.{bid}.router.per_expert_scale": "blk.{bid}.ffn_down_exps.scale",
    "model.decoder.layers.{bid}.experts.gate_up_proj": "blk.{bid}.ffn_gate_up_exps.weight",
    "model.decoder.layers.{bid}.experts.down_proj": "blk.{bid}.ffn_down_exps.weight",
    "model.decoder.layers.{bid}.layer_scalar": "blk.{bid}.layer_output_scale.weight",
    "model.encoder.language_model.layers.{bid}.layer_scalar": "blk.{bid}.enc_layer_output_scale.weight",
}

# Present in an HF checkpoint but not needed: the tied lm_head, tied encoder copies, the vision tower.
HF_DROP = re.compile(r"^(lm_head\.|model\.encoder\.(vision_tower|embed_vision)\.|model\.encoder\.language_model\.)")
HF_VISION = re.compile(r"^model\.encoder\.(vision_tower|embed_vision)\.")

_HF_PATTERNS = [
    (re.compile("^" + re.escape(src).replace(r"\{bid\}", r"(\d+)") + "$"), dst) for src, dst in HF_TO_GGUF.items()
]


def hf_to_gguf_name(name: str) -> str | None:
    """The flat-dict name for an HF tensor name, or None when dgrun does not use the tensor."""
    for pattern, dst in _HF_PATTERNS:
        m = pattern.match(name)
        if m:
            return dst.format(bid=m.group(1)) if m.groups() else dst
    return None


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine needs, with its torch shape (GGUF stores the dims reversed)."""
    h, v, e = args.hidden_size, args.vocab_size, args.num_experts
    shapes = {
        "token_embd.weight": (v, h),
        "output_norm.weight": (h,),
        "self_cond_pre_norm.weight": (h,),
        "self_cond_gate.weight": (args.intermediate_size, h),
        "self_cond_up.weight": (args.intermediate_size, h),
        "self_cond_down.weight": (h, args.intermediate_size),
    }
    for i, spec in enumerate(args.layers):
        q, kv = args.num_attention_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (h,),
            b + "attn_q.weight": (q, h),
            b + "attn_k.weight": (kv, h),
            b + "attn_output.weight": (h, q),
            b + "attn_q_norm.weight": (spec.head_dim,),
            b + "attn_k_norm.weight": (spec.head_dim,),
            b + "post_attention_norm.weight": (h,),
            b + "ffn_norm.weight": (h,),
            b + "ffn_gate.weight": (args.intermediate_size, h),
            b + "ffn_up.weight": (args.intermediate_size, h),
            b + "ffn_down.weight": (h, args.intermediate_size),
            b + "post_ffw_norm.weight": (h,),
            b + "post_ffw_norm_1.weight": (h,),
            b + "pre_ffw_norm_2.weight": (h,),
            b + "post_ffw_norm_2.weight": (h,),
            b + "ffn_gate_inp.weight": (e, h),
            b + "ffn_gate_inp.scale": (h,),
            b + "ffn_down_exps.scale": (e,),
            b + "ffn_gate_up_exps.weight": (e, 2 * args.moe_intermediate_size, h),
            b + "ffn_down_exps.weight": (e, h, args.moe_intermediate_size),
            b + "layer_output_scale.weight": (1,),
            b + "enc_layer_output_scale.weight": (1,),
        })
        if not spec.k_eq_v:
            shapes[b + "attn_v.weight"] = (kv, h)
    return shapes


def n_params(args: ModelArgs) -> int:
    return sum(math.prod(s) for s in expected_shapes(args).values())
