"""The `cpu` backend: the exact DiffusionGemma forward in torch, float32 or bfloat16.

Mirrors transformers 5.23 `modeling_diffusion_gemma.py` operation by operation, including its dtype casts,
so float32 logits agree to ~1e-6. Encoder and decoder read the same weight tensors: one copy in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dgrun.backends import torch_sampler
from dgrun.errors import DgrunError
from dgrun.models.diffusion_gemma import ModelArgs, rope_inv_freq
from dgrun.qtensor import QTensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TorchCache:
    """Per-layer K/V of shape (1, kv_heads, T, head_dim). Sliding layers keep the last sliding_window - 1
    tokens, as the reference's DynamicSlidingWindowLayer does; `length` counts every committed token."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    length: int = 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class CpuBackend:
    name = "cpu"

    def __init__(self, args: ModelArgs, weights: dict, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise DgrunError(f"unsupported dtype {dtype!r} for the cpu backend (float32 or bfloat16)")
        self.args = args
        self.dtype = DTYPES[dtype]
        self.device = torch.device("cpu")
        self.specs = args.layers
        self.w = {k: self._to_dtype(k, v) for k, v in weights.items()}
        self.inv_freq = [rope_inv_freq(s) for s in self.specs]
        self.embed_scale = torch.tensor(args.embed_scale).to(self.dtype)

    def _to_dtype(self, name: str, t) -> torch.Tensor:
        if isinstance(t, QTensor):
            t = t.dequantize()  # float32, one tensor at a time: the model is never held twice in float32
        elif not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        if name.endswith(".scale") or "layer_output_scale" in name:
            return t.to(self.dtype)
        return t.to(self.dtype).contiguous()

    # --- the Backend protocol -------------------------------------------------------------------

    def new_cache(self) -> TorchCache:
        n = self.args.num_hidden_layers
        return TorchCache(keys=[None] * n, values=[None] * n)

    def rng(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(int(seed))

    @torch.inference_mode()
    def encode(self, ids, cache: TorchCache) -> None:
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device).view(1, -1)
        if ids.shape[1] == 0:
            return
        if int(ids.max()) >= self.args.vocab_size or int(ids.min()) < 0:
            raise DgrunError(f"token id out of range for vocab_size {self.args.vocab_size}")
        x = self._embed(ids)
        self._run_layers(x, cache, encode=True)
        cache.length += ids.shape[1]

    @torch.inference_mode()
    def denoise(self, canvas, cache: TorchCache, self_cond_logits=None) -> torch.Tensor:
        probs = None
        if self_cond_logits is not None:
            # As the reference: softmax in float32 of the logits cast to the embedding dtype.
            probs = torch.as_tensor(self_cond_logits).to(self.dtype).softmax(-1, dtype=torch.float32)
        return self._decode(canvas, cache, probs)

    def _decode(self, canvas, cache: TorchCache, sc_probs: torch.Tensor | None) -> torch.Tensor:
        canvas = torch.as_tensor(canvas, dtype=torch.int64, device=self.device).view(1, -1)
        x = self._embed(canvas)
        if sc_probs is not None:
            x = self._self_condition(x, sc_probs.to(self.dtype).view(1, canvas.shape[1], -1))
        else:
            x = rms_norm(x, None, self.args.rms_norm_eps)  # a zero signal leaves only the post-norm
        x = self._run_layers(x, cache, encode=False)
        x = rms_norm(x, self.w["output_norm.weight"], self.args.rms_norm_eps)
        logits = (x @ self.w["token_embd.weight"].T).float()[0]
        cap = self.args.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def start_block(self, rng: torch.Generator, sampler, fixed=None) -> torch_sampler.StepState:
        return torch_sampler.start_block(self.args.vocab_size, self.args.canvas_length,
                                         sampler.stability_threshold, rng, fixed)

    @torch.inference_mode()
    def step(self, state, cache, temperature: float, sampler, rng) -> torch_sampler.StepState:
        if state.sc_logits is None or self.dtype != torch.float32:
            logits = self.denoise(state.canvas, cache, state.sc_logits)
        else:  # in float32 the sampler's probabilities are exactly the self-conditioning softmax: reuse them
            logits = self._decode(state.canvas, cache, state.probs)
        t = torch.tensor(temperature, dtype=torch.float32)
        return torch_sampler.sampler_step(state, logits, t, sampler.entropy_bound, sampler.confidence_threshold, rng)

    def done(self, state) -> bool:
        return bool(state.done)

    def tolist(self, ids) -> list[int]:
        return torch.as_tensor(ids).view(-1).tolist()

    # --- the forward ----------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w["token_embd.weight"]) * self.embed_scale

    def _self_condition(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        w, eps = self.w, self.args.rms_norm_eps
        soft = (probs @ w["token_embd.weight"]) * self.embed_scale
        h = rms_norm(soft, w["self_cond_pre_norm.weight"], eps)
        signal = (gelu(h @ w["self_cond_gate.weight"].T) * (h @ w["self_cond_up.weight"].T)) @ w["self_cond_down.weight"].T
        return rms_norm(x + signal, None, eps)

    def _rope(self, i: int, positions: torch.Tensor):
        freqs = positions[:, None].float() * self.inv_freq[i][None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _run_layers(self, x: torch.Tensor, cache: TorchCache, encode: bool) -> torch.Tensor:
        n, start = x.shape[1], cache.length
        positions = torch.arange(start, start + n)
        last = self.args.num_hidden_layers - 1
        for i, spec in enumerate(self.specs):
            b = f"blk.{i}."
            if encode and i == last:
                # The encoder's output is never read, only its K/V: the last layer stops after writing them.
                self._attention(i, rms_norm(x, self.w[b + "attn_norm.weight"], self.args.rms_norm_eps),
                                positions, cache, encode, kv_only=True)
                break
            x = self._block(i, x, positions, cache, encode)
        return x

    def _block(self, i, x, positions, cache, encode):
        w, eps, b = self.w, self.args.rms_norm_eps, f"blk.{i}."
        residual = x
        h = self._attention(i, rms_norm(x, w[b + "attn_norm.weight"], eps), positions, cache, encode)
        x = residual + rms_norm(h, w[b + "post_attention_norm.weight"], eps)

        residual = x
        h = rms_norm(x, w[b + "ffn_norm.weight"], eps)
        dense = (gelu(h @ w[b + "ffn_gate.weight"].T) * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
        dense = rms_norm(dense, w[b + "post_ffw_norm_1.weight"], eps)
        flat = residual.reshape(-1, residual.shape[-1])
        moe = self._moe(i, flat, rms_norm(flat, w[b + "pre_ffw_norm_2.weight"], eps)).view_as(residual)
        moe = rms_norm(moe, w[b + "post_ffw_norm_2.weight"], eps)
        x = residual + rms_norm(dense + moe, w[b + "post_ffw_norm.weight"], eps)
        scalar = w[b + ("enc_layer_output_scale.weight" if encode else "layer_output_scale.weight")]
        return x * scalar

    def _attention(self, i, x, positions, cache: TorchCache, encode: bool, kv_only: bool = False):
        spec, w, eps, b = self.specs[i], self.w, self.args.rms_norm_eps, f"blk.{i}."
        n, d = x.shape[1], spec.head_dim
        cos, sin = self._rope(i, positions)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]

        k_raw = (x @ w[b + "attn_k.weight"].T).view(1, n, -1, d)
        v = k_raw if spec.k_eq_v else (x @ w[b + "attn_v.weight"].T).view(1, n, -1, d)
        k = rms_norm(k_raw, w[b + "attn_k_norm.weight"], eps)
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)
        v = rms_norm(v, None, eps).transpose(1, 2)

        past_k, past_v = cache.keys[i], cache.values[i]
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        if encode:
            keep = self.args.sliding_window - 1 if spec.sliding else keys.shape[2]
            cache.keys[i], cache.values[i] = keys[:, :, -keep:], values[:, :, -keep:]
            if kv_only:
                return None

        q = (x @ w[b + "attn_q.weight"].T).view(1, n, -1, d)
        q = rms_norm(q, w[b + "attn_q_norm.weight"], eps)
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)

        mask = None
        if encode:
            # Causal (and windowed on sliding layers) over [cached tokens, new tokens] by absolute position.
            end = int(positions[-1]) + 1
            kpos = torch.arange(end - keys.shape[2], end)
            delta = positions[:, None] - kpos[None, :]
            mask = delta >= 0
            if spec.sliding:
                mask &= delta < self.args.sliding_window
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                             enable_gqa=q.shape[1] != keys.shape[1])
        out = out.transpose(1, 2).reshape(1, n, -1)
        return out @ w[b + "attn_output.weight"].T

    def _moe(self, i: int, x_route: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Top-k routed experts, computed expert by expert over the tokens routed to each (sorted once)."""
        a, w, b = self.args, self.w, f"blk.{i}."
        h = rms_norm(x_route, None, a.rms_norm_eps) * w[b + "ffn_gate_inp.scale"] * (a.hidden_size**-0.5)
        probs = torch.softmax(h @ w[b + "ffn_gate_inp.weight"].T, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, k=a.top_k_experts, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        top_w = top_w * w[b + "ffn_down_exps.scale"][top_i]

        flat_e = top_i.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        token = order // a.top_k_experts
        counts = torch.bincount(flat_e, minlength=a.num_experts).tolist()  # host read: CPU only
        xs = x[token]
        gate_up, down = w[b + "ffn_gate_up_exps.weight"], w[b + "ffn_down_exps.weight"]
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                gate, up = (xs[start:start + c] @ gate_up[e].T).chunk(2, dim=-1)
                ys[start:start + c] = (gelu(gate) * up) @ down[e].T
            start += c
        ys = (ys * top_w.reshape(-1)[order, None]).to(x.dtype)  # float32 weights, as the reference
        return torch.zeros_like(x).index_add_(0, token, ys)
