"""The Python API: `dgrun.load(path)` returns a `Model`; the CLI is a thin layer over it."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from typing import Iterator

from dgrun import checkpoint, tokenizer
from dgrun.backends import create, pick
from dgrun.engine import Engine
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft, Prefill, Request, SamplerConfig, Stats, cache_need, stream
from dgrun.models.diffusion_gemma import context_limit


GREEDY_T = 1e-30  # temperature 0 means argmax draws; the backends divide by it, so 0 stands for this
MAX_SEED = 2**63 - 1


@dataclass
class Result:
    text: str
    ids: list[int]
    stats: Stats


class Model:
    """A loaded DiffusionGemma on one backend. Knobs: steps, t_min, t_max, entropy_bound,
    stability_threshold, confidence_threshold, max_new_tokens, seed."""

    def __init__(self, ckpt: checkpoint.Checkpoint, backend: str = "auto", dtype: str | None = None,
                 tok: tokenizer.Tokenizer | None = None, ctx_size: int | None = None, device: str | None = None):
        self.args = ckpt.args
        self.backend = create(backend, ckpt.args, ckpt.weights, dtype, device)
        self.defaults = SamplerConfig().update(**ckpt.defaults)
        self.tokenizer = tok
        self.ctx = context_limit(ckpt.args, ctx_size)  # tokens a cache slot holds: prompt + committed blocks

    # --- generation ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise DgrunError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def stream(self, prompt, cache=None, stop_ids=(), trim_repeats: bool = False,
               **knobs) -> Iterator[Draft | Prefill | Block | Stats]:
        """Yield a `Draft` per denoising step (its `.ids` is the argmax canvas), a `Block` per committed
        block, and the final `Stats` (a `Prefill` per chunk of a long prompt). `cache` (from `new_cache()`)
        keeps earlier context. `stop_ids` end generation like EOS (e.g. end-of-turn); `trim_repeats` drops a
        block that repeats the previous one. Each Block carries its text, decoded incrementally.
        A list of prompts runs as one batch: every event carries its prompt's `prompt_index`, and each prompt
        ends with its own Stats. `seed` may then be a list, one per prompt."""
        if is_batch(prompt):
            yield from self._stream_batch(list(prompt), stop_ids, trim_repeats, knobs)
            return
        cfg = self.config(**knobs)
        ids = self._prompt_ids(prompt)
        if cache is None:  # sized to what the request can use; a prompt over ctx is Engine.add's error
            cache = self.backend.new_cache(1, max(1, min(self.ctx, cache_need(len(ids), cfg, self.args.canvas_length))))
        events = stream(self.backend, ids, cfg, self._eos(stop_ids), self.args.pad_token_id, cache, trim_repeats)
        yield from self._texts(events, [cfg])

    def config(self, **knobs) -> SamplerConfig:
        """The checkpoint's defaults with `knobs` applied: seed -1 draws a random seed, t_max = t_min = 0 is
        greedy (argmax draws)."""
        cfg = self.defaults.update(**knobs)
        if cfg.seed == -1:
            cfg = replace(cfg, seed=random.SystemRandom().randrange(2**31))
        elif not 0 <= cfg.seed <= MAX_SEED:
            raise DgrunError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {cfg.seed}")
        return replace(cfg, t_min=GREEDY_T, t_max=GREEDY_T) if cfg.t_max == 0 else cfg

    def _texts(self, events, cfgs: list[SamplerConfig]):
        """Give each Block its text, decoded incrementally per prompt: a character split across blocks waits
        for its last byte. Fill the Stats' seed."""
        ids, shown, blocks = {}, {}, {}
        for event in events:
            i = event.prompt_index
            if isinstance(event, Block):
                blocks.setdefault(i, []).append(event)
                ids[i] = ids.get(i, []) + event.ids
                text = self.decode(ids[i]).rstrip("\ufffd")
                common = len(os.path.commonprefix([shown.get(i, ""), text]))  # normally all of what was shown
                event.text, shown[i] = text[common:], text
            elif isinstance(event, Stats):
                event.seed = cfgs[i].seed
                mine = blocks.get(i, [])
                last = mine[-1] if mine else None
                event.stop_reason = event.stop_reason or (
                    "repeat" if last and last.repeated else "eos" if last and last.eos else "length")
            yield event

    def _stream_batch(self, prompts: list, stop_ids, trim_repeats: bool, knobs: dict):
        seeds = knobs.pop("seed", None)
        seeds = seeds if isinstance(seeds, (list, tuple)) else [seeds] * len(prompts)
        if len(seeds) != len(prompts):
            raise DgrunError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        cfgs = [self.config(**knobs, seed=s) for s in seeds]
        ids = [self._prompt_ids(p) for p in prompts]
        if not all(ids):
            raise DgrunError("empty prompt")
        need = max(cache_need(len(x), c, self.args.canvas_length) for x, c in zip(ids, cfgs))
        engine = Engine(self.backend, self.backend.new_cache(len(ids), min(self.ctx, need)))
        reqs = [Request(x, c, self._eos(stop_ids), self.args.pad_token_id, trim_repeats, index=i)
                for i, (x, c) in enumerate(zip(ids, cfgs))]
        for req in reqs:
            engine.add(req)
        def events():
            while engine.busy:
                for req, event in engine.step():
                    yield event
                    if isinstance(event, Block) and req.finished:
                        yield req.close()

        try:
            yield from self._texts(events(), cfgs)
        finally:
            for req in reqs:
                engine.cancel(req)

    def _eos(self, stop_ids) -> list[int]:
        return list(self.args.eos_token_id) + [int(t) for t in stop_ids]

    def generate(self, prompt, cache=None, stop_ids=(), trim_repeats: bool = False, **knobs):
        """Text (when a tokenizer is present) and ids, cut at EOS and max_new_tokens, plus stats. A list of
        prompts runs as one batch and returns a list of `Result`s in order."""
        events = self.stream(prompt, cache, stop_ids, trim_repeats, **knobs)
        if not is_batch(prompt):
            return self._result(events)
        stats = {e.prompt_index: e for e in events if isinstance(e, Stats)}
        return [Result(self.decode(stats[i].ids), stats[i].ids, stats[i]) for i in range(len(stats))]

    def _result(self, events) -> Result:
        stats = [e for e in events if isinstance(e, Stats)][-1]
        return Result(self.decode(stats.ids), stats.ids, stats)

    def infill(self, prefix, suffix, gap: int | None = None, **knobs) -> Result:
        """Fill the gap between `prefix` and `suffix` (text or ids) in one block: the canvas holds `gap` free
        positions, then the suffix's first tokens pinned in place (any positions after a short suffix stay free
        and are dropped). `gap` defaults to the canvas minus the suffix, at least half the canvas. The Result
        holds the gap's tokens, cut at EOS."""
        canvas = self.args.canvas_length
        head = self._prompt_ids(prefix)
        tail = self.tokenizer.encode(suffix, add_special_tokens=False) if isinstance(suffix, str) else list(suffix)
        if not tail:
            raise DgrunError("infilling needs a non-empty suffix")
        gap = max(canvas - len(tail), canvas // 2) if gap is None else gap
        if not 0 < gap < canvas:
            raise DgrunError(f"the gap must be between 1 and {canvas - 1} tokens (the canvas is {canvas})")
        pinned = [int(t) for t in tail[: canvas - gap]]
        fixed = [-1] * gap + pinned + [-1] * (canvas - gap - len(pinned))  # past a short suffix: free, dropped
        cfg = self.config(**knobs)
        cfg = cfg.update(max_new_tokens=min(gap, knobs["max_new_tokens"]) if knobs.get("max_new_tokens") else gap)
        result = self._result(self._texts(stream(self.backend, head, cfg, self.args.eos_token_id,
                                                 self.args.pad_token_id, fixed=fixed), [cfg]))
        result.stats.tokens_per_forward = len(result.ids) / result.stats.steps_per_block[0]  # the gap's tokens only
        return result

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, without special tokens; <pad> (which the model writes after the end of a text) is
        never text."""
        pad = self.args.pad_token_id
        return self.tokenizer.decode([t for t in ids if t != pad], skip_special_tokens=True) \
            if self.tokenizer is not None else ""

    # --- low level, for parity tests and scripts ----------------------------------------------

    def new_cache(self, slots: int = 1):
        """An empty KV cache of `slots` rows, each holding up to the context limit (`ctx_size`)."""
        return self.backend.new_cache(slots, self.ctx)

    def encode(self, ids, cache, slot: int = 0) -> None:
        """Commit tokens through the causal encoder into a cache slot."""
        self.backend.encode(slot, self._prompt_ids(ids), cache)

    def denoise(self, canvas_ids, cache, self_cond_logits=None, slots=None):
        """One decoder pass: softcapped logits (canvas_length, vocab) for `canvas_ids` given `cache`, or
        (B, canvas_length, vocab) for B canvases over cache slots `slots` (default 0..B-1).
        `self_cond_logits` is the previous step's processed logits (softcapped / temperature), or None."""
        return self.backend.denoise(canvas_ids, cache, self_cond_logits, slots)


def is_batch(prompt) -> bool:
    """A list of prompts (texts or id lists), as opposed to one prompt given as text or ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(p, (str, list, tuple)) for p in prompt)


def load(path=None, backend: str = "auto", dtype: str | None = None, ctx_size: int | None = None,
         threads: int | None = None, device: str | None = None) -> Model:
    """Load an HF checkpoint directory or a GGUF file (its tokenizer comes from the file), a hub repo
    id `user/repo[:QUANT]`, or with no path the embedded default model (models/tiny-stdlib.md).
    backend: "auto" | "cpu" | "cuda" | "mlx"; dtype: "float32" | "bfloat16" (mlx also "float16", "q4", "q8":
    quantize at load; cuda defaults to bfloat16, GGUF block types staying packed). device: the cuda backend's
    torch device ("cuda:1"), or "cpu" for its test mode under TRITON_INTERPRET=1. ctx_size: tokens a cache slot holds (default: the model's context length, capped by
    memory); threads: CPU threads (default: 1 for a small model, else the physical cores)."""
    from dgrun import hub
    from dgrun.models import DEFAULT_MODEL
    from dgrun.models.diffusion_gemma import n_params
    from dgrun.threads import set_threads

    path = DEFAULT_MODEL if path is None else path
    if hub.is_repo_id(str(path)):
        path = hub.resolve(str(path))
    ckpt = checkpoint.load(path)
    if pick(backend) == "cpu":
        set_threads(threads, n_params(ckpt.args))
    return Model(ckpt, backend, dtype, ckpt.tokenizer, ctx_size, device)
