"""The exact reference ops: plain torch, float weights. The cpu backend runs these, and every kernel of another
device is tested against them op by op.

Each mirrors transformers 5.23 `modeling_diffusion_gemma.py` / `generation_diffusion_gemma.py`, dtype casts
included, so float32 logits agree with it to ~1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgrun.backends.torch import sampler


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def embed(ids: torch.Tensor, w: torch.Tensor, dtype) -> torch.Tensor:
    """Rows of the embedding for token ids, in the activation dtype."""
    return F.embedding(ids, w).to(dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.T


def attention(q, keys, values, mask):
    """q (B, heads, n, d) over keys/values (B, kv_heads, L, d); mask (B, 1, n or 1, L) bool or None."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def moe(x_route: torch.Tensor, x: torch.Tensor, w: dict, b: str, args) -> torch.Tensor:
    """Top-k routed experts over tokens (T, hidden), expert by expert over the tokens routed to each (sorted
    once). The per-expert counts are read on the host: a CPU loop, the cpu backend's own way."""
    h = rms_norm(x_route, None, args.rms_norm_eps) * w[b + "ffn_gate_inp.scale"] * (args.hidden_size**-0.5)
    probs = torch.softmax(linear(h, w[b + "ffn_gate_inp.weight"]), dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, k=args.top_k_experts, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    top_w = top_w * w[b + "ffn_down_exps.scale"][top_i]

    flat_e = top_i.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    token = order // args.top_k_experts
    counts = torch.bincount(flat_e, minlength=args.num_experts).tolist()  # host read: this op is the CPU's
    xs = x[token]
    gate_up, down = w[b + "ffn_gate_up_exps.weight"], w[b + "ffn_down_exps.weight"]
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts):
        if c:
            gate, up = linear(xs[start:start + c], gate_up[e]).chunk(2, dim=-1)
            ys[start:start + c] = linear(gelu(gate) * up, down[e])
        start += c
    ys = (ys * top_w.reshape(-1)[order, None]).to(x.dtype)  # float32 weights, as the reference
    return torch.zeros_like(x).index_add_(0, token, ys)


def soft_embedding(probs: torch.Tensor, embed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The self-conditioning input: softmax(previous logits) @ embedding, scaled like the embedding.
    probs (B, C, V) in the embedding's dtype."""
    return (probs @ embed) * scale


def head_and_sample(x: torch.Tensor, embed: torch.Tensor, cap: float | None, state, scale: torch.Tensor):
    """Tied lm_head, softcap, then the sampler; returns the next state with its soft embedding."""
    logits = linear(x, embed).float()
    if cap:  # tanh(logits / cap) * cap, in place: one (B, C, V) float32 buffer fewer at the peak
        logits = logits.div_(cap).tanh_().mul_(cap)
    nxt, processed, probs = sampler.sample(state, logits)
    if embed.dtype != torch.float32:  # the reference re-takes the softmax of the logits cast to the dtype
        probs = processed.to(embed.dtype).softmax(-1, dtype=torch.float32)
    nxt.soft = soft_embedding(probs.to(embed.dtype), embed, scale)
    return nxt


OPS = {"embed": embed, "linear": linear, "attention": attention, "moe": moe, "soft_embedding": soft_embedding,
       "head_and_sample": head_and_sample}
