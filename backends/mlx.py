"""The `mlx` backend: DiffusionGemma on MLX (Metal on Apple silicon; `mlx[cpu]` runs the same code on Linux).

The forward is backends/cpu.py's, operation for operation, on MLX primitives: `mx.quantized_matmul` for
packed matrices, `mx.gather_qmm` / `mx.gather_mm` over tokens sorted by expert (the `sorted_indices` fast
path), `mx.fast.rms_norm`, and `mx.fast.scaled_dot_product_attention` for every attention. SDPA is exact
here: its fused kernels and its fallback (scores matmul, float32 softmax, matmul) compute the same maths; on
Metal, MLX 0.32 has no fused kernel for 256 queries at head dims 256 or 512, so the canvas takes the fallback.
Both the bidirectional canvas (over cache + canvas) and the causal sliding encoder use one boolean mask.

The KV cache (mlx_cache.py) is static slots, one per row; each entry records its absolute position, so the
masks need nothing else. Rows step together at any step of any request, as in the torch backend.

A denoising step (decoder + sampler + next self-conditioning input) is one function of arrays, `mx.compile`d
on Metal (see compile_enabled): no host read inside it (MLX raises if a compiled function tries). The loop's
`done()` is the one host sync per step; `step` queues the work with `mx.async_eval` and returns at once.
"""

from __future__ import annotations

import math
import os
import mlx.core as mx
import numpy as np
import torch

from dgrun.backends import mlx_sampler
from dgrun.backends.mlx_cache import MlxSlotCache
from dgrun.backends.row import reserve
from dgrun.backends.mlx_sampler import MlxState
from dgrun.backends.mlx_weights import DTYPES, QLinear, as_numpy, default_dtype, prepare
from dgrun.backends.mlx_policy import policy_for
from dgrun.errors import DgrunError
from dgrun.models.diffusion_gemma import ModelArgs, rope_inv_freq

ENCODE_CHUNK = 512  # prompt tokens per encoder pass: bounds the (chunk x context) score matrices
QUANTIZE_AT_LOAD = {"q4": "mlx-q4", "q8": "mlx-q8"}


def compile_enabled() -> bool:
    """mx.compile on a GPU (Metal); eager on the CPU device, where MLX builds each fused kernel as a C++ shared
    library (~1.5 s apiece, 36 for one step, measured) for little gain. DGRUN_MLX_COMPILE=1/0 overrides."""
    flag = os.environ.get("DGRUN_MLX_COMPILE")
    return flag == "1" if flag in ("0", "1") else mx.default_device().type == mx.DeviceType.gpu


def gelu(x: mx.array) -> mx.array:
    """tanh-approximate GELU in float32, as torch computes it for every dtype."""
    xf = x.astype(mx.float32)
    return (0.5 * xf * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)))).astype(x.dtype)


def linear(x: mx.array, w) -> mx.array:
    """x @ w.T for a float or packed (rows, cols) matrix."""
    if isinstance(w, QLinear):
        return mx.quantized_matmul(x, w.w, w.scales, w.biases, transpose=True, group_size=w.group_size,
                                   bits=w.bits)
    return x @ w.T


def gather_linear(x: mx.array, w, experts: mx.array) -> mx.array:
    """Row r of x (rows, 1, cols) times expert experts[r]'s matrix, transposed; experts sorted ascending."""
    if isinstance(w, QLinear):
        return mx.gather_qmm(x, w.w, w.scales, w.biases, rhs_indices=experts, transpose=True,
                             group_size=w.group_size, bits=w.bits, sorted_indices=True)
    if x.dtype != mx.float32 and mx.default_device() == mx.cpu:  # MLX's CPU gather_mm is float32-only
        return gather_linear(x.astype(mx.float32), w.astype(mx.float32), experts).astype(x.dtype)
    return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=experts, sorted_indices=True)


class MlxBackend:
    name = "mlx"

    def __init__(self, args: ModelArgs, weights: dict, dtype: str | None = None, quantize: str | None = None):
        if dtype in QUANTIZE_AT_LOAD:  # `--dtype q4`: quantize an HF checkpoint at load, compute in bf16
            dtype, quantize = None, dtype
        if quantize is not None and quantize not in QUANTIZE_AT_LOAD:
            raise DgrunError(f"unsupported quantization {quantize!r} for the mlx backend (q4 or q8)")
        dtype = dtype or ("bfloat16" if quantize else default_dtype(weights))
        if dtype not in DTYPES:
            raise DgrunError(f"unsupported dtype {dtype!r} for the mlx backend (float32, bfloat16, float16, q4, q8)")
        self.args = args
        self.dtype = DTYPES[dtype]
        self.specs = args.layers
        policy = policy_for(QUANTIZE_AT_LOAD[quantize]) if quantize else None
        self.w = prepare(weights, self.dtype, policy)
        self.inv_freq = [mx.array(rope_inv_freq(s).numpy()) for s in self.specs]
        self.embed_scale = mx.array(args.embed_scale, dtype=self.dtype)
        self.chunk = 8 * args.canvas_length  # full-layer context seen by a step: the compiled step retraces only then
        self.compiled = compile_enabled()
        self._step_fn = mx.compile(self._step) if self.compiled else self._step

    # --- the Backend protocol -------------------------------------------------------------------

    def new_cache(self, slots: int, max_len: int) -> MlxSlotCache:
        return MlxSlotCache(self.specs, slots, max_len, self.args.sliding_window, self.dtype, self.chunk)

    def encode(self, slot: int, ids, cache: MlxSlotCache) -> None:
        ids = as_numpy(ids).astype(np.int64).reshape(-1)
        if ids.size == 0:
            return
        if ids.max() >= self.args.vocab_size or ids.min() < 0:
            raise DgrunError(f"token id out of range for vocab_size {self.args.vocab_size}")
        reserve(cache, slot, ids.size)
        for start in range(0, ids.size, ENCODE_CHUNK):
            self._encode_chunk(slot, mx.array(ids[start:start + ENCODE_CHUNK].astype(np.int32))[None], cache)
        mx.async_eval(cache.keys, cache.values, [p for p in cache.pos if p is not None])

    def start(self, rows, cache: MlxSlotCache) -> MlxState:
        return mlx_sampler.start(rows, [cache.lengths[r.slot] for r in rows], self.args.vocab_size,
                                 self.args.canvas_length, self.args.hidden_size, self.dtype)

    def step(self, state: MlxState, cache: MlxSlotCache) -> MlxState:
        views = [cache.view(i, state.slot) for i in range(len(self.specs))]
        out = self._step_fn(state.canvas, state.soft, state.offset, views, state.seed, state.block, state.step,
                            state.steps, state.t_min, state.t_span, state.bound, state.confidence, state.stability,
                            state.fixed, state.history)
        mx.async_eval(*out)  # queue the work; done() waits for it
        canvas, argmax, soft, history, done, step = out
        return MlxState(state.slot, state.offset, state.seed, state.block, step, state.steps, state.t_min,
                        state.t_span, state.bound, state.confidence, state.stability, canvas, argmax, state.fixed,
                        history, soft, done)

    def done(self, state: MlxState) -> list[bool]:
        return np.array(state.done).tolist()

    def canvas(self, state: MlxState) -> mx.array:
        return state.argmax

    take = staticmethod(mlx_sampler.take)
    cat = staticmethod(mlx_sampler.cat)

    def tolist(self, ids) -> list:
        return np.array(ids).tolist()

    def denoise(self, canvas, cache: MlxSlotCache, self_cond_logits=None, slots=None) -> torch.Tensor:
        """Softcapped float32 logits as a torch tensor, like the torch backend: canvas (C,) -> (C, V), or
        (B, C) -> (B, C, V) over cache slots `slots` (default 0..B-1)."""
        canvas = as_numpy(canvas).astype(np.int32)
        one = canvas.ndim == 1
        canvas = mx.array(canvas.reshape(-1, canvas.shape[-1]))
        slots = list(range(canvas.shape[0])) if slots is None else list(slots)
        if self_cond_logits is None:
            soft = mx.zeros(canvas.shape + (self.args.hidden_size,), dtype=self.dtype)
        else:  # as the reference: softmax in float32 of the logits cast to the compute dtype
            sc = mx.array(as_numpy(self_cond_logits).astype(np.float32)).reshape(*canvas.shape, -1)
            probs = mx.softmax(sc.astype(self.dtype).astype(mx.float32), axis=-1, precise=True).astype(self.dtype)
            soft = self._soft_embedding(probs)
        offset = mx.array([cache.lengths[s] for s in slots], dtype=mx.int32)
        views = [cache.view(i, slots) for i in range(len(self.specs))]
        logits = self._logits(self._decode(canvas, soft, offset, views))
        out = torch.from_numpy(np.array(logits))
        return out[0] if one else out

    # --- the compiled step ----------------------------------------------------------------------

    def _step(self, canvas, soft, offset, views, seed, block, step, steps, t_min, t_span, bound, confidence,
              stability, fixed, history):
        logits = self._logits(self._decode(canvas, soft, offset, views))
        canvas, argmax, processed, probs, history, done, step = mlx_sampler.sample(
            logits, seed, block, step, steps, t_min, t_span, bound, confidence, stability, fixed, history)
        if self.dtype != mx.float32:  # the reference re-takes the softmax of the logits cast to the dtype
            probs = mx.softmax(processed.astype(self.dtype).astype(mx.float32), axis=-1, precise=True)
        return canvas, argmax, self._soft_embedding(probs.astype(self.dtype)), history, done, step

    # --- the forward ----------------------------------------------------------------------------

    def _norm(self, x: mx.array, name: str | None) -> mx.array:
        return mx.fast.rms_norm(x, self.w[name] if name else None, self.args.rms_norm_eps)

    def _embed(self, ids: mx.array) -> mx.array:
        e = self.w["token_embd.weight"]
        if isinstance(e, QLinear):
            rows = mx.dequantize(e.w[ids], e.scales[ids], e.biases[ids], group_size=e.group_size, bits=e.bits)
        else:
            rows = e[ids]
        return rows * self.embed_scale

    def _soft_embedding(self, probs: mx.array) -> mx.array:
        """softmax(previous logits) @ embedding, scaled like the embedding: the self-conditioning input."""
        e = self.w["token_embd.weight"]
        if isinstance(e, QLinear):  # probs @ E with E packed along its rows: no transpose
            soft = mx.quantized_matmul(probs, e.w, e.scales, e.biases, transpose=False, group_size=e.group_size,
                                       bits=e.bits)
        else:
            soft = probs @ e
        return soft * self.embed_scale

    def _self_condition(self, x: mx.array, soft: mx.array) -> mx.array:
        """A zero soft embedding adds exactly nothing (rms_norm(0) = gelu(0) = 0): a block's first step."""
        h = self._norm(soft, "self_cond_pre_norm.weight")
        gate, up = linear(h, self.w["self_cond_gate.weight"]), linear(h, self.w["self_cond_up.weight"])
        signal = linear(gelu(gate) * up, self.w["self_cond_down.weight"])
        return self._norm(x + signal, None)

    def _logits(self, x: mx.array) -> mx.array:
        logits = linear(x, self.w["token_embd.weight"]).astype(mx.float32)
        cap = self.args.final_logit_softcapping
        return mx.tanh(logits / cap) * cap if cap else logits

    def _decode(self, canvas, soft, offset, views):
        """(B, C) canvases over their slots' cache views -> final-normed hidden states (B, C, hidden)."""
        x = self._self_condition(self._embed(canvas), soft)
        positions = offset[:, None] + mx.arange(canvas.shape[1], dtype=mx.int32)[None, :]
        for i in range(len(self.specs)):
            x = self._block(i, x, positions, lambda h, i=i: self._attend_canvas(i, h, positions, *views[i]),
                            encode=False)
        return self._norm(x, "output_norm.weight")

    def _encode_chunk(self, slot: int, ids: mx.array, cache: MlxSlotCache) -> None:
        n = ids.shape[1]
        start = cache.lengths[slot]
        positions = mx.arange(start, start + n, dtype=mx.int32)[None]
        x = self._embed(ids)
        last = len(self.specs) - 1
        for i in range(len(self.specs)):
            attend = lambda h, i=i: self._attend_causal(i, h, positions, slot, cache, kv_only=i == last)  # noqa: E731
            if i == last:  # the encoder's output is never read, only its K/V
                attend(self._norm(x, f"blk.{i}.attn_norm.weight"))
                break
            x = self._block(i, x, positions, attend, encode=True)
        cache.lengths[slot] += n

    def _block(self, i, x, positions, attend, encode: bool):
        b = f"blk.{i}."
        residual = x
        h = attend(self._norm(x, b + "attn_norm.weight"))
        x = residual + self._norm(h, b + "post_attention_norm.weight")

        residual = x
        h = self._norm(x, b + "ffn_norm.weight")
        dense = linear(gelu(linear(h, self.w[b + "ffn_gate.weight"])) * linear(h, self.w[b + "ffn_up.weight"]),
                       self.w[b + "ffn_down.weight"])
        dense = self._norm(dense, b + "post_ffw_norm_1.weight")
        flat = residual.reshape(-1, residual.shape[-1])
        moe = self._moe(i, flat, self._norm(flat, b + "pre_ffw_norm_2.weight")).reshape(residual.shape)
        moe = self._norm(moe, b + "post_ffw_norm_2.weight")
        x = residual + self._norm(dense + moe, b + "post_ffw_norm.weight")
        return x * self.w[b + ("enc_layer_output_scale.weight" if encode else "layer_output_scale.weight")]

    def _moe(self, i: int, x_route: mx.array, x: mx.array) -> mx.array:
        """Top-k routed experts over tokens sorted by expert, so gather_(q)mm takes its sorted fast path."""
        a, w, b = self.args, self.w, f"blk.{i}."
        h = self._norm(x_route, None) * w[b + "ffn_gate_inp.scale"] * (a.hidden_size**-0.5)
        probs = mx.softmax(linear(h, w[b + "ffn_gate_inp.weight"]).astype(mx.float32), axis=-1, precise=True)
        top_i = mx.argpartition(-probs, kth=a.top_k_experts - 1, axis=-1)[:, :a.top_k_experts]
        top_w = mx.take_along_axis(probs, top_i, axis=-1)
        top_w = top_w / top_w.sum(-1, keepdims=True) * w[b + "ffn_down_exps.scale"][top_i]  # float32, as the reference

        flat_e = top_i.reshape(-1)
        order = mx.argsort(flat_e)
        experts = flat_e[order]
        xs = x[order // a.top_k_experts][:, None, :]  # (tokens * k, 1, hidden), grouped by expert
        gate, up = mx.split(gather_linear(xs, w[b + "ffn_gate_up_exps.weight"], experts), 2, axis=-1)
        ys = gather_linear(gelu(gate) * up, w[b + "ffn_down_exps.weight"], experts)[:, 0]
        ys = (ys * top_w.reshape(-1)[order][:, None]).astype(x.dtype)
        return ys[mx.argsort(order)].reshape(x.shape[0], a.top_k_experts, -1).sum(axis=1)

    # --- attention ------------------------------------------------------------------------------

    def _rope(self, i: int, x: mx.array, positions: mx.array) -> mx.array:
        """x (B, n, heads, d), positions (B, n): rotate-half RoPE with float32 angles, as the reference."""
        freqs = positions[..., None].astype(mx.float32) * self.inv_freq[i]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        cos, sin = mx.cos(emb).astype(x.dtype)[:, :, None], mx.sin(emb).astype(x.dtype)[:, :, None]
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def _kv(self, i, h, positions):
        spec, b, (bsz, n) = self.specs[i], f"blk.{i}.", h.shape[:2]
        k_raw = linear(h, self.w[b + "attn_k.weight"]).reshape(bsz, n, -1, spec.head_dim)
        v = k_raw if spec.k_eq_v else linear(h, self.w[b + "attn_v.weight"]).reshape(bsz, n, -1, spec.head_dim)
        k = self._rope(i, self._norm(k_raw, b + "attn_k_norm.weight"), positions)
        return k.transpose(0, 2, 1, 3), self._norm(v, None).transpose(0, 2, 1, 3)

    def _q(self, i, h, positions):
        spec, b, (bsz, n) = self.specs[i], f"blk.{i}.", h.shape[:2]
        q = linear(h, self.w[b + "attn_q.weight"]).reshape(bsz, n, -1, spec.head_dim)
        return self._rope(i, self._norm(q, b + "attn_q_norm.weight"), positions).transpose(0, 2, 1, 3)

    def _attend(self, i, q, keys, values, mask):
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)
        return linear(out, self.w[f"blk.{i}.attn_output.weight"])

    def _attend_canvas(self, i, h, positions, k_cache, v_cache, valid):
        """Bidirectional: every canvas token sees its row's valid cache entries and the whole canvas."""
        k, v = self._kv(i, h, positions)
        mask = mx.concatenate([valid, mx.ones((h.shape[0], h.shape[1]), dtype=mx.bool_)], axis=1)
        return self._attend(i, self._q(i, h, positions), mx.concatenate([k_cache, k], axis=2),
                            mx.concatenate([v_cache, v], axis=2), mask[:, None, None, :])

    def _attend_causal(self, i, h, positions, slot: int, cache: MlxSlotCache, kv_only: bool):
        """Causal (windowed on sliding layers) over [the slot's cache, new tokens] by absolute position; the new
        K/V are written into the slot (a ring entry only after the chunk has read it)."""
        k, v = self._kv(i, h, positions)
        start, n, pos = cache.lengths[slot], h.shape[1], positions[0]
        if self.specs[i].sliding:
            keys = mx.concatenate([cache.keys[i][slot:slot + 1], k], axis=2)
            values = mx.concatenate([cache.values[i][slot:slot + 1], v], axis=2)
            kpos = mx.concatenate([cache.pos[i][slot], pos])
            cache.write(i, slot, k, v, pos, start)
        else:
            cache.write(i, slot, k, v, pos, start)
            keys, values = cache.keys[i][slot:slot + 1, :, :start + n], cache.values[i][slot:slot + 1, :, :start + n]
            kpos = mx.arange(start + n, dtype=mx.int32)
        if kv_only:
            return None
        delta = pos[:, None] - kpos[None, :]
        mask = (kpos >= 0)[None, :] & (delta >= 0)
        if self.specs[i].sliding:
            mask = mask & (delta < self.args.sliding_window)
        return self._attend(i, self._q(i, h, positions), keys, values, mask[None, None])
