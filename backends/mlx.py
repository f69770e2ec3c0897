"""The `mlx` backend: DiffusionGemma on MLX (Metal on Apple silicon; `mlx[cpu]` runs the same code on Linux).

The forward is backends/cpu.py's, operation for operation, on MLX primitives: `mx.quantized_matmul` for
packed matrices, `mx.gather_qmm` / `mx.gather_mm` over tokens sorted by expert (the `sorted_indices` fast
path), `mx.fast.rms_norm`, and `mx.fast.scaled_dot_product_attention` for every attention. SDPA is exact
here: its fused kernels and its fallback (scores matmul, float32 softmax, matmul) compute the same maths; on
Metal, MLX 0.32 has no fused kernel for 256 queries at head dims 256 or 512, so the canvas takes the fallback.
Both the bidirectional canvas (over cache + canvas) and the causal sliding encoder use one boolean mask.

The KV cache (mlx_cache.py) has fixed-size slots, each holding its absolute position, so the step keeps its
shapes and the masks need nothing else.

A denoising step (decoder + sampler) is one function of arrays, `mx.compile`d on Metal (see compile_enabled):
no host read inside it (MLX raises if a compiled function tries). The loop's `done()` is the one host sync
per step; `step` queues the work with `mx.async_eval` and returns at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

from dgrun.backends import mlx_sampler
from dgrun.backends.mlx_cache import MlxCache
from dgrun.backends.mlx_weights import DTYPES, QLinear, as_numpy, default_dtype, prepare
from dgrun.convert.mlx_policy import policy_for
from dgrun.errors import DgrunError
from dgrun.models.diffusion_gemma import ModelArgs, rope_inv_freq

ENCODE_CHUNK = 512  # prompt tokens per encoder pass: bounds the (chunk x context) score matrices
QUANTIZE_AT_LOAD = {"q4": "mlx-q4", "q8": "mlx-q8"}


@dataclass
class MlxState:
    canvas: mx.array  # (1, C) int32: the next decoder input
    argmax: mx.array  # (1, C) int32: the draft
    sc: mx.array | None  # (C, V) self-conditioning probabilities in the compute dtype; None on the first step
    history: mx.array  # (stability_threshold, 1, C) int32
    done: mx.array  # () bool
    fixed: mx.array  # (1, C) int32: tokens pinned in place (infilling), -1 where free


@dataclass
class MlxRng:
    key: mx.array  # advanced by every draw, so one seed fixes the whole run


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
        self.chunk = 8 * args.canvas_length  # full-layer cache growth: the compiled step retraces only then
        self.compiled = compile_enabled()
        jit = mx.compile if self.compiled else (lambda f: f)
        self._decode_first = jit(lambda c, k, v, p, o: self._decode(c, None, k, v, p, o))
        self._decode_next = jit(self._decode)
        self._step_first = jit(lambda c, *rest: self._step(c, None, *rest))
        self._step_next = jit(self._step)

    # --- the Backend protocol -------------------------------------------------------------------

    def new_cache(self) -> MlxCache:
        return MlxCache.empty(self.specs, self.args.sliding_window, self.chunk, self.dtype)

    def rng(self, seed: int) -> MlxRng:
        return MlxRng(mx.random.key(int(seed)))

    def encode(self, ids, cache: MlxCache) -> None:
        ids = as_numpy(ids).astype(np.int64).reshape(-1)
        if ids.size == 0:
            return
        if ids.max() >= self.args.vocab_size or ids.min() < 0:
            raise DgrunError(f"token id out of range for vocab_size {self.args.vocab_size}")
        for start in range(0, ids.size, ENCODE_CHUNK):
            self._encode_chunk(mx.array(ids[start:start + ENCODE_CHUNK].astype(np.int32))[None], cache)
        mx.async_eval(cache.keys, cache.values, cache.pos)

    def denoise(self, canvas, cache: MlxCache, self_cond_logits=None) -> torch.Tensor:
        """Softcapped float32 logits (C, V) as a torch tensor, like the cpu backend (for tests and scripts)."""
        canvas = mx.array(as_numpy(canvas).astype(np.int32).reshape(1, -1))
        kv = (cache.keys, cache.values, cache.pos, mx.array(cache.length, dtype=mx.int32))
        if self_cond_logits is None:
            logits = self._decode_first(canvas, *kv)
        else:  # as the reference: softmax in float32 of the logits cast to the compute dtype
            sc = mx.array(as_numpy(self_cond_logits).astype(np.float32)).astype(self.dtype)
            sc = mx.softmax(sc.astype(mx.float32), axis=-1, precise=True).astype(self.dtype)
            logits = self._decode_next(canvas, sc, *kv)
        return torch.from_numpy(np.array(logits))

    def start_block(self, rng: MlxRng, sampler, fixed=None) -> MlxState:
        canvas, history, fixed, rng.key = mlx_sampler.start_block(
            rng.key, self.args.vocab_size, self.args.canvas_length, sampler.stability_threshold, fixed)
        return MlxState(canvas, canvas, None, history, mx.array(False), fixed)

    def step(self, state: MlxState, cache: MlxCache, temperature: float, sampler, rng: MlxRng) -> MlxState:
        args = self.step_inputs(state, cache, temperature, sampler, rng)
        if state.sc is None:
            out = self._step_first(state.canvas, *args)
        else:
            out = self._step_next(state.canvas, state.sc, *args)
        canvas, argmax, sc, history, done, rng.key = out
        mx.async_eval(canvas, argmax, sc, history, done, rng.key)  # queue the work; done() waits for it
        return MlxState(canvas, argmax, sc, history, done, state.fixed)

    def step_inputs(self, state: MlxState, cache: MlxCache, temperature: float, sampler, rng: MlxRng) -> tuple:
        """Everything the step reads after the canvas and self-conditioning, as arrays: knobs as 0-d arrays
        so a new temperature or bound does not retrace the compiled step."""
        return (cache.keys, cache.values, cache.pos, mx.array(cache.length, dtype=mx.int32),
                mx.array(temperature, dtype=mx.float32), rng.key, state.history, state.fixed,
                mx.array(sampler.entropy_bound, dtype=mx.float32),
                mx.array(sampler.confidence_threshold, dtype=mx.float32))

    def done(self, state: MlxState) -> bool:
        return bool(state.done.item())

    def tolist(self, ids) -> list[int]:
        return np.array(ids).reshape(-1).tolist()

    # --- the compiled step ----------------------------------------------------------------------

    def _step(self, canvas, sc, keys, values, pos, offset, temperature, key, history, fixed, bound, confidence):
        logits = self._decode(canvas, sc, keys, values, pos, offset)
        canvas, argmax, probs, history, done, key = mlx_sampler.sampler_step(
            logits, temperature, key, history, fixed, bound, confidence)
        if self.dtype != mx.float32:  # the reference re-takes the softmax of the logits cast to the dtype
            probs = mx.softmax((logits / temperature).astype(self.dtype).astype(mx.float32), axis=-1, precise=True)
        return canvas, argmax, probs.astype(self.dtype), history, done, key

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

    def _self_condition(self, x: mx.array, probs: mx.array) -> mx.array:
        e = self.w["token_embd.weight"]
        probs = probs.reshape(1, *probs.shape[-2:])
        if isinstance(e, QLinear):  # probs @ E with E packed along its rows: no transpose
            soft = mx.quantized_matmul(probs, e.w, e.scales, e.biases, transpose=False, group_size=e.group_size,
                                       bits=e.bits)
        else:
            soft = probs @ e
        h = self._norm(soft * self.embed_scale, "self_cond_pre_norm.weight")
        gate, up = linear(h, self.w["self_cond_gate.weight"]), linear(h, self.w["self_cond_up.weight"])
        signal = linear(gelu(gate) * up, self.w["self_cond_down.weight"])
        return self._norm(x + signal, None)

    def _decode(self, canvas, sc, keys, values, pos, offset):
        x = self._embed(canvas)
        x = self._self_condition(x, sc) if sc is not None else self._norm(x, None)  # a zero signal: post-norm only
        positions = offset + mx.arange(canvas.shape[1], dtype=mx.int32)
        for i in range(len(self.specs)):
            x = self._block(i, x, positions, lambda h, i=i: self._attend_canvas(i, h, positions, keys[i], values[i],
                                                                               pos[i]), encode=False)
        x = self._norm(x, "output_norm.weight")
        logits = linear(x, self.w["token_embd.weight"]).astype(mx.float32)[0]
        cap = self.args.final_logit_softcapping
        return mx.tanh(logits / cap) * cap if cap else logits

    def _encode_chunk(self, ids: mx.array, cache: MlxCache) -> None:
        n = ids.shape[1]
        positions = mx.arange(cache.length, cache.length + n, dtype=mx.int32)
        cache.reserve(cache.length + n)
        x = self._embed(ids)
        last = len(self.specs) - 1
        for i in range(len(self.specs)):
            attend = lambda h, i=i: self._attend_causal(i, h, positions, cache, kv_only=i == last)  # noqa: E731
            if i == last:  # the encoder's output is never read, only its K/V
                attend(self._norm(x, f"blk.{i}.attn_norm.weight"))
                break
            x = self._block(i, x, positions, attend, encode=True)
        cache.length += n

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
        """x (1, n, heads, d): rotate-half RoPE with float32 angles, computed as the reference does."""
        freqs = positions[:, None].astype(mx.float32) * self.inv_freq[i][None, :]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        cos, sin = mx.cos(emb).astype(x.dtype)[None, :, None], mx.sin(emb).astype(x.dtype)[None, :, None]
        half = x.shape[-1] // 2
        rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def _kv(self, i, h, positions):
        spec, b, n = self.specs[i], f"blk.{i}.", h.shape[1]
        k_raw = linear(h, self.w[b + "attn_k.weight"]).reshape(1, n, -1, spec.head_dim)
        v = k_raw if spec.k_eq_v else linear(h, self.w[b + "attn_v.weight"]).reshape(1, n, -1, spec.head_dim)
        k = self._rope(i, self._norm(k_raw, b + "attn_k_norm.weight"), positions)
        return k.transpose(0, 2, 1, 3), self._norm(v, None).transpose(0, 2, 1, 3)

    def _q(self, i, h, positions):
        spec, b = self.specs[i], f"blk.{i}."
        q = linear(h, self.w[b + "attn_q.weight"]).reshape(1, h.shape[1], -1, spec.head_dim)
        return self._rope(i, self._norm(q, b + "attn_q_norm.weight"), positions).transpose(0, 2, 1, 3)

    def _attend(self, i, q, keys, values, mask):
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(1, q.shape[2], -1)
        return linear(out, self.w[f"blk.{i}.attn_output.weight"])

    def _attend_canvas(self, i, h, positions, k_cache, v_cache, pos_cache):
        """Bidirectional: every canvas token sees the valid cache slots and the whole canvas."""
        k, v = self._kv(i, h, positions)
        mask = mx.concatenate([pos_cache >= 0, mx.ones((h.shape[1],), dtype=mx.bool_)])
        return self._attend(i, self._q(i, h, positions), mx.concatenate([k_cache, k], axis=2),
                            mx.concatenate([v_cache, v], axis=2), mask[None, None, None, :])

    def _attend_causal(self, i, h, positions, cache: MlxCache, kv_only: bool):
        """Causal (windowed on sliding layers) over [cache slots, new tokens] by absolute position; then the new
        K/V are written into the cache."""
        k, v = self._kv(i, h, positions)
        keys, values = mx.concatenate([cache.keys[i], k], axis=2), mx.concatenate([cache.values[i], v], axis=2)
        kpos = mx.concatenate([cache.pos[i], positions])
        cache.write(i, k, v, positions)
        if kv_only:
            return None
        delta = positions[:, None] - kpos[None, :]
        mask = (kpos >= 0)[None, :] & (delta >= 0)
        if self.specs[i].sliding:
            mask = mask & (delta < self.args.sliding_window)
        return self._attend(i, self._q(i, h, positions), keys, values, mask[None, None])
