"""Random DiffusionGemma weights built directly on a device, in the layout of a real GGUF file.

A denoising step's speed depends on the weights' shapes and types, never on their values, so `dgrun bench
--random-weights 26b-a4b:Q4_K_M` measures the released shape without a download. The dict has every tensor
`expected_shapes` names, each of the type llama.cpp's mix would give it (models/quant_mix.py: Q4_K_M has
K-quants, Q6_K for the tied embedding, and 32-block fallbacks for rows that are not multiples of 256, such as the
704-wide expert down projections):

- a block-packed type is a `DevicePacked`: random code bytes (every byte pattern is a valid code) with each
  block's float16 scale fields overwritten by small positive values, so the decoded weights are finite, of
  standard deviation about 0.02-0.09 and centred (the `min` of Q4_1/Q5_1/K-quants offsets the codes' mean);
- BF16/F16 matrices are normal(0, 0.02) tensors of that dtype;
- what the mix keeps in F32 (norms, scales, layer scalars: ones; the router: normal(0, 0.02)) is `dtype`.

Everything is drawn by torch on `device`, tensor by tensor: no host copy of the model is ever made.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from dgrun.errors import DgrunError
from dgrun.models import quant_mix
from dgrun.models.diffusion_gemma import ModelArgs, expected_shapes
from dgrun.packed import DevicePacked

# DiffusionGemma 26B-A4B (SPEC.md §1): 30 layers (5 sliding, 1 full), hidden 2816, 128 experts top-8.
ARCHES = {
    "26b-a4b": dict(vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                    num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                    moe_intermediate_size=704, canvas_length=256),
    # The same plan at a size the CPU steps in milliseconds. Rows of 256 where the real model's rows are multiples
    # of 256 (K-quants), and rows that are not where its are not (dense down 192 ~ 2112, expert down 64 ~ 704); 16
    # experts, not 8: llama-quantize treats 8-expert models apart.
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                 sliding_window=16, num_experts=16, top_k_experts=4, moe_intermediate_size=64, canvas_length=16),
}
ARCH_26B_A4B = ModelArgs(**ARCHES["26b-a4b"])
ARCH_TINY = ModelArgs(**ARCHES["tiny"])

# A mix's name -> the type of a quantizable tensor before llama.cpp's per-tensor rules.
MIXES = {"Q4_K_M": QT.Q4_K, "Q8_0": QT.Q8_0, "BF16": QT.BF16}

# Per packed type: the byte offsets of its float16 scale fields in a block, the base scale d, and for the types
# with a min the ratio min/d that centres the decoded values (x = d*q + m for Q4_1/Q5_1, d*sc*q - dmin*m for K).
# d keeps float16 normal (>= 6.1e-5); decoded standard deviations come out between 0.02 and 0.09.
SCALES = {
    QT.Q8_0: ((0,), 2.7e-4, None),
    QT.Q4_0: ((0,), 4.3e-3, None),
    QT.Q4_1: ((0, 2), 4.3e-3, -7.5),
    QT.Q5_0: ((0,), 2.2e-3, None),
    QT.Q5_1: ((0, 2), 2.2e-3, -15.5),
    QT.Q4_K: ((0, 2), 8e-5, 7.5),
    QT.Q5_K: ((0, 2), 6.5e-5, 15.5),
    QT.Q6_K: ((208,), 6.5e-5, None),
}
STD = 0.02  # float matrices


def parse_spec(spec: str) -> tuple[ModelArgs, str]:
    """`ARCH:MIX` (e.g. 26b-a4b:Q4_K_M, tiny:q8_0) -> (a fresh ModelArgs, the mix's name)."""
    arch, sep, mix = str(spec).partition(":")
    mixes = {m.lower(): m for m in MIXES}
    if not sep or arch.lower() not in ARCHES or mix.lower() not in mixes:
        raise DgrunError(f"random weights take ARCH:MIX with ARCH one of {', '.join(ARCHES)} and MIX one of "
                         f"{', '.join(MIXES)}, got {spec!r}")
    return ModelArgs(**ARCHES[arch.lower()]), mixes[mix.lower()]


def mix_info(args: ModelArgs) -> quant_mix.MixInfo:
    return quant_mix.MixInfo(n_layer=args.num_hidden_layers, n_expert=args.num_experts,
                             attn_v_layers=tuple(i for i, s in enumerate(args.layers) if not s.k_eq_v))


def types(args: ModelArgs, mix: str) -> dict[str, QT]:
    """The GGUF type of every tensor in this mix: llama.cpp's choice for each name and shape."""
    if mix not in MIXES:
        raise DgrunError(f"unknown mix {mix!r} (choose from {', '.join(MIXES)})")
    info = mix_info(args)
    return {name: quant_mix.choose(name, shape, None, MIXES[mix], info)
            for name, shape in expected_shapes(args).items()}


def random_weights(args: ModelArgs, mix: str, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """Every weight of `args` in the `mix` layout, drawn on `device` (see the module docstring)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = expected_shapes(args)
    out = {}
    for name, qtype in types(args, mix).items():
        shape = shapes[name]
        if qtype in SCALES:
            out[name] = packed(shape, qtype, device, gen)
        elif qtype in (QT.BF16, QT.F16):
            out[name] = normal(shape, torch.bfloat16 if qtype == QT.BF16 else torch.float16, device, gen)
        elif name.endswith("ffn_gate_inp.weight"):  # the router: a float matrix the mix keeps in F32
            out[name] = normal(shape, dtype, device, gen)
        else:  # norms, the router and expert scales, layer scalars
            out[name] = torch.ones(shape, dtype=dtype, device=device)
    return out


def normal(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device, generator=gen).mul_(STD)


def packed(shape: tuple[int, ...], qtype: QT, device, gen) -> DevicePacked:
    """Random codes, float16 scale fields set block by block to d * U(0.75, 1.25) (and min = ratio * d)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise DgrunError(f"rows of {shape[-1]} do not split into {qtype.name} blocks of {block}")
    lead, nb = tuple(shape[:-1]), shape[-1] // block
    data = torch.randint(0, 256, (*lead, nb, size), dtype=torch.uint8, device=device, generator=gen)
    offsets, base, ratio = SCALES[qtype]
    d = (torch.rand((*lead, nb), device=device, generator=gen) * 0.5 + 0.75) * base
    fields = [d] if ratio is None else [d, d * ratio]
    for off, value in zip(offsets, fields):
        data[..., off:off + 2] = value.to(torch.float16).view(torch.uint8).view(*lead, nb, 2)
    return DevicePacked(data.view(*lead, nb * size), qtype, tuple(shape))
