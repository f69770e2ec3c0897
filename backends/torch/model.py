"""The DiffusionGemma forward in torch: batch-first, device-agnostic, over a handful of ops.

The model calls `embed`, `linear`, `moe`, `attention`, `soft_embedding` and `head_and_sample`, looked up by backend
in `op_table()`: ops_cpu.py holds the exact reference ops (the `cpu` backend, float weights), ops_cuda.py the Triton
kernels over GGUF-packed weights (the `cuda` backend; on CPU tensors under TRITON_INTERPRET=1 in its tests).
Encoder and decoder read the same weight tensors: one copy in memory.

A denoising step is B rows at any step of any request: per-row positions, cache slots, knobs and draws.
Nothing in a step reads the device back except the CPU's MoE op (see ops_cpu.moe).
"""

from __future__ import annotations

import os

import torch

from dgrun.backends.row import reserve
from dgrun.backends.torch import ops_cpu, sampler
from dgrun.backends.torch.cache import SlotCache, view_size
from dgrun.backends.torch.ops_cpu import gelu, rms_norm
from dgrun.errors import DgrunError
from dgrun.models.diffusion_gemma import ModelArgs, rope_inv_freq
from dgrun.packed import GGUF_PACKED, DevicePacked, QTensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}


def op_table(kind: str) -> dict:
    """The op table of a backend kind: "cpu" (exact torch reference) or "cuda" (Triton kernels, imported here so
    the cpu backend never imports triton)."""
    if kind == "cuda":
        from dgrun.backends.torch import ops_cuda

        return ops_cuda.OPS
    return ops_cpu.OPS

ENCODE_CHUNK = 512  # prompt tokens per encoder pass: memory is chunk x context, not prompt^2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TorchBackend:
    def __init__(self, args: ModelArgs, weights: dict, dtype: str = "float32", device: str = "cpu",
                 ops: str = "cpu"):
        if dtype not in DTYPES:
            raise DgrunError(f"unsupported dtype {dtype!r} for the {ops} backend (float32 or bfloat16)")
        self.name = ops
        self.args = args
        self.dtype = DTYPES[dtype]
        self.device = torch.device(device)
        self.ops = op_table(ops)
        self.packed = ops == "cuda"  # GGUF block types stay packed on the device, read by the kernels
        self.graphs = None
        if self.device.type == "cuda" and os.environ.get("DGRUN_CUDA_GRAPHS", "1") != "0":
            from dgrun.backends.torch.graphs import StepGraphs

            self.graphs = StepGraphs(self)
        self.specs = args.layers
        self.w = {k: self._to_dtype(k, v) for k, v in weights.items()}
        self.inv_freq = [rope_inv_freq(s).to(self.device) for s in self.specs]
        self.embed_scale = torch.tensor(args.embed_scale).to(self.dtype).to(self.device)

    def _to_dtype(self, name: str, t):
        if isinstance(t, DevicePacked):
            return t if t.device == self.device else DevicePacked(t.data.to(self.device), t.qtype, t.shape)
        if isinstance(t, QTensor) and self.name in GGUF_PACKED.get(t.qtype, ()):
            return DevicePacked.upload(t, self.device)  # byte for byte, one tensor at a time from the map
        if isinstance(t, QTensor):
            t = t.dequantize()  # float32, one tensor at a time: the model is never held twice in float32
        elif not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        t = t.to(self.dtype).to(self.device)
        return t if name.endswith(".scale") or "layer_output_scale" in name else t.contiguous()

    # --- the Backend protocol -------------------------------------------------------------------

    def new_cache(self, slots: int, max_len: int) -> SlotCache:
        return SlotCache(self.specs, slots, max_len, self.args.sliding_window, self.dtype, self.device)

    @torch.inference_mode()
    def encode(self, slot: int, ids, cache: SlotCache) -> None:
        """Commit tokens to a slot through the causal encoder, ENCODE_CHUNK tokens per pass."""
        ids = torch.as_tensor(ids, dtype=torch.int64).view(-1)
        if ids.numel() == 0:
            return
        if int(ids.max()) >= self.args.vocab_size or int(ids.min()) < 0:
            raise DgrunError(f"token id out of range for vocab_size {self.args.vocab_size}")
        reserve(cache, slot, ids.numel())
        for start in range(0, ids.numel(), ENCODE_CHUNK):
            self._encode_chunk(slot, ids[start:start + ENCODE_CHUNK].to(self.device)[None], cache)

    def start(self, rows: list[sampler.Row], cache: SlotCache) -> sampler.State:
        return sampler.start(rows, [cache.lengths[r.slot] for r in rows], self.args.vocab_size,
                             self.args.canvas_length, self.args.hidden_size, self.dtype, self.device)

    @torch.inference_mode()
    def step(self, state: sampler.State, cache: SlotCache) -> sampler.State:
        """One denoising step for every row: decoder, head, sampler and the next soft embedding."""
        if self.graphs is not None:
            return self.graphs.step(state, cache)
        return self.step_with(state, cache, self.static_view(state.slot.tolist(), cache))

    def step_with(self, state: sampler.State, cache: SlotCache, static) -> sampler.State:
        x = self._decode(state.canvas, state.soft, state.offset, state.slot.tolist(), cache, static)
        return self.ops["head_and_sample"](x, self.w["token_embd.weight"], self.args.final_logit_softcapping,
                                           state, self.embed_scale)

    def static_view(self, slots: list[int], cache: SlotCache, lengths: torch.Tensor | None = None):
        """For the cuda backend: (rows, size, lengths) of fixed-shape cache views (cache.static_view), after
        zeroing what they show past the written entries; None for the cpu backend's exact host-sized views."""
        if not self.packed:
            return None
        size = view_size(max(cache.lengths[s] for s in slots), cache.max_len)
        cache.zero_past(slots, size)
        first = slots[0]
        rows = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else \
            torch.tensor(slots, device=self.device)
        host = torch.tensor([cache.lengths[s] for s in slots])
        if lengths is None:
            return rows, size, host.to(self.device)
        lengths.copy_(host)  # a graph's own input buffer
        return rows, size, lengths

    def done(self, state: sampler.State) -> list[bool]:
        return state.done.tolist()

    def canvas(self, state: sampler.State) -> torch.Tensor:
        return state.argmax

    take = staticmethod(sampler.take)
    cat = staticmethod(sampler.cat)

    def tolist(self, ids) -> list:
        return torch.as_tensor(ids).tolist()

    @torch.inference_mode()
    def denoise(self, canvas, cache: SlotCache, self_cond_logits=None, slots: list[int] | None = None):
        """Softcapped float32 logits of one decoder pass: canvas (C,) -> (C, V), or (B, C) -> (B, C, V) for the
        cache rows `slots` (default 0..B-1). self_cond_logits: the previous step's processed logits, or None."""
        canvas = torch.as_tensor(canvas, dtype=torch.int64, device=self.device)
        one = canvas.dim() == 1
        canvas = canvas.view(-1, canvas.shape[-1])
        slots = list(range(canvas.shape[0])) if slots is None else list(slots)
        if self_cond_logits is None:
            soft = torch.zeros(canvas.shape + (self.args.hidden_size,), dtype=self.dtype, device=self.device)
        else:  # as the reference: softmax in float32 of the logits cast to the embedding dtype
            sc = torch.as_tensor(self_cond_logits).to(self.device, self.dtype).view(canvas.shape + (-1,))
            probs = sc.softmax(-1, dtype=torch.float32).to(self.dtype)
            soft = self.ops["soft_embedding"](probs, self.w["token_embd.weight"], self.embed_scale)
        offset = torch.tensor([cache.lengths[s] for s in slots], device=self.device)
        x = self._decode(canvas, soft, offset, slots, cache, self.static_view(slots, cache))
        logits = self.ops["linear"](x, self.w["token_embd.weight"]).float()
        cap = self.args.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap if cap else logits
        return logits[0] if one else logits

    # --- the forward ----------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ops["embed"](ids, self.w["token_embd.weight"], self.dtype) * self.embed_scale

    def _self_condition(self, x: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """A zero soft embedding adds exactly nothing (rms_norm(0) = gelu(0) = 0): a block's first step."""
        w, eps, linear = self.w, self.args.rms_norm_eps, self.ops["linear"]
        h = rms_norm(soft, w["self_cond_pre_norm.weight"], eps)
        signal = linear(gelu(linear(h, w["self_cond_gate.weight"])) * linear(h, w["self_cond_up.weight"]),
                        w["self_cond_down.weight"])
        return rms_norm(x + signal, None, eps)

    def _rope(self, i: int, positions: torch.Tensor):
        """cos, sin of shape positions.shape + (head_dim,)."""
        freqs = positions[..., None].float() * self.inv_freq[i]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _decode(self, canvas, soft, offset, slots: list[int], cache: SlotCache, static=None) -> torch.Tensor:
        """(B, C) canvases attending to their slots' caches -> final-normed hidden states (B, C, hidden).
        static: fixed-shape cache views (see static_view), or None."""
        x = self._self_condition(self._embed(canvas), soft)
        positions = offset[:, None] + torch.arange(canvas.shape[1], device=self.device)[None, :]
        for i in range(len(self.specs)):
            x = self._block(i, x, positions, lambda h, i=i: self._attend_canvas(i, h, positions, slots, cache, static),
                            encode=False)
        return rms_norm(x, self.w["output_norm.weight"], self.args.rms_norm_eps)

    def _encode_chunk(self, slot: int, ids: torch.Tensor, cache: SlotCache) -> None:
        start = cache.lengths[slot]
        positions = torch.arange(start, start + ids.shape[1], device=self.device)[None]
        x = self._embed(ids)
        last = len(self.specs) - 1
        for i in range(len(self.specs)):
            attend = lambda h, i=i: self._attend_causal(i, h, positions, slot, cache, kv_only=i == last)  # noqa: E731
            if i == last:  # the encoder's output is never read, only its K/V
                attend(rms_norm(x, self.w[f"blk.{i}.attn_norm.weight"], self.args.rms_norm_eps))
                break
            x = self._block(i, x, positions, attend, encode=True)
        cache.lengths[slot] += ids.shape[1]

    def _block(self, i, x, positions, attend, encode: bool):
        w, eps, b, linear = self.w, self.args.rms_norm_eps, f"blk.{i}.", self.ops["linear"]
        residual = x
        h = attend(rms_norm(x, w[b + "attn_norm.weight"], eps))
        x = residual + rms_norm(h, w[b + "post_attention_norm.weight"], eps)

        residual = x
        h = rms_norm(x, w[b + "ffn_norm.weight"], eps)
        dense = linear(gelu(linear(h, w[b + "ffn_gate.weight"])) * linear(h, w[b + "ffn_up.weight"]),
                       w[b + "ffn_down.weight"])
        dense = rms_norm(dense, w[b + "post_ffw_norm_1.weight"], eps)
        flat = residual.reshape(-1, residual.shape[-1])
        moe = self.ops["moe"](flat, rms_norm(flat, w[b + "pre_ffw_norm_2.weight"], eps), w, b, self.args)
        moe = rms_norm(moe.view_as(residual), w[b + "post_ffw_norm_2.weight"], eps)
        x = residual + rms_norm(dense + moe, w[b + "post_ffw_norm.weight"], eps)
        return x * w[b + ("enc_layer_output_scale.weight" if encode else "layer_output_scale.weight")]

    def _qkv(self, i, x, positions, need_q: bool = True):
        """q (B, heads, n, d) or None, k and v (B, kv_heads, n, d), roped and normed as the reference."""
        spec, w, eps, b, linear = self.specs[i], self.w, self.args.rms_norm_eps, f"blk.{i}.", self.ops["linear"]
        bsz, n, d = x.shape[0], x.shape[1], spec.head_dim
        cos, sin = self._rope(i, positions)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        k_raw = linear(x, w[b + "attn_k.weight"]).view(bsz, n, -1, d)
        v = k_raw if spec.k_eq_v else linear(x, w[b + "attn_v.weight"]).view(bsz, n, -1, d)
        k = rms_norm(k_raw, w[b + "attn_k_norm.weight"], eps)
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)
        v = rms_norm(v, None, eps).transpose(1, 2)
        if not need_q:
            return None, k, v
        q = rms_norm(linear(x, w[b + "attn_q.weight"]).view(bsz, n, -1, d), w[b + "attn_q_norm.weight"], eps)
        return (q * cos + rotate_half(q) * sin).transpose(1, 2), k, v

    def _output(self, i, out):
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return self.ops["linear"](out, self.w[f"blk.{i}.attn_output.weight"])

    def _attend_canvas(self, i, x, positions, slots, cache: SlotCache, static=None):
        """Bidirectional: every canvas token sees its row's valid cache entries and the whole canvas."""
        q, k, v = self._qkv(i, x, positions)
        k_cache, v_cache, valid = cache.view(i, slots) if static is None else cache.static_view(i, *static)
        mask = None
        if valid is not None:
            mask = torch.cat([valid, torch.ones(valid.shape[0], x.shape[1], dtype=torch.bool, device=self.device)],
                             dim=1)[:, None, None, :]
        return self._output(i, self.ops["attention"](q, torch.cat([k_cache, k], dim=2),
                                                     torch.cat([v_cache, v], dim=2), mask))

    def _attend_causal(self, i, x, positions, slot: int, cache: SlotCache, kv_only: bool):
        """Causal (windowed on sliding layers) over [the slot's cache, the new tokens] by absolute position; the
        new K/V are written into the slot (a ring entry only after the chunk has read it)."""
        q, k, v = self._qkv(i, x, positions, need_q=not kv_only)
        start, n = cache.lengths[slot], x.shape[1]
        pos = positions[0]
        if self.specs[i].sliding:
            keys = torch.cat([cache.keys[i][slot:slot + 1], k], dim=2)
            values = torch.cat([cache.values[i][slot:slot + 1], v], dim=2)
            kpos = torch.cat([cache.pos[i][slot], pos])
            cache.write(i, slot, k, v, pos, start)
        else:
            cache.write(i, slot, k, v, pos, start)
            keys, values = cache.keys[i][slot:slot + 1, :, :start + n], cache.values[i][slot:slot + 1, :, :start + n]
            kpos = torch.arange(start + n, device=self.device)
        if kv_only:
            return None
        delta = pos[:, None] - kpos[None, :]
        mask = (kpos >= 0)[None, :] & (delta >= 0)
        if self.specs[i].sliding:
            mask &= delta < self.args.sliding_window
        return self._output(i, self.ops["attention"](q, keys, values, mask[None, None]))
