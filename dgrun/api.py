"""The Python API: `dgrun.load(path)` returns a `Model`; the CLI is a thin layer over it."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from dgrun import checkpoint, tokenizer
from dgrun.backends import create, pick
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft, SamplerConfig, Stats, stream


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
                 tok: tokenizer.Tokenizer | None = None):
        self.args = ckpt.args
        self.backend = create(backend, ckpt.args, ckpt.weights, dtype)
        self.defaults = SamplerConfig().update(**ckpt.defaults)
        self.tokenizer = tok

    # --- generation ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise DgrunError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def stream(self, prompt, cache=None, stop_ids=(), trim_repeats: bool = False,
               **knobs) -> Iterator[Draft | Block | Stats]:
        """Yield a `Draft` per denoising step (its `.ids` is the argmax canvas), a `Block` per committed
        block, and the final `Stats`. `cache` (from `new_cache()`) keeps earlier context. `stop_ids` end
        generation like EOS (e.g. end-of-turn); `trim_repeats` drops a block that repeats the previous one."""
        cfg = self.config(**knobs)
        eos = list(self.args.eos_token_id) + [int(t) for t in stop_ids]
        yield from self._texts(stream(self.backend, self._prompt_ids(prompt), cfg, eos, self.args.pad_token_id,
                                      cache, trim_repeats), cfg)

    def config(self, **knobs) -> SamplerConfig:
        """The checkpoint's defaults with `knobs` applied: seed -1 draws a random seed, t_max = t_min = 0 is
        greedy (argmax draws)."""
        cfg = self.defaults.update(**knobs)
        if cfg.seed == -1:
            cfg = replace(cfg, seed=random.SystemRandom().randrange(2**31))
        elif not 0 <= cfg.seed <= MAX_SEED:
            raise DgrunError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {cfg.seed}")
        return replace(cfg, t_min=GREEDY_T, t_max=GREEDY_T) if cfg.t_max == 0 else cfg

    def _texts(self, events, cfg: SamplerConfig):
        """Give each Block its text, decoded incrementally: a character split across blocks waits for its
        last byte. Fill the Stats' seed, stop reason and unconverged blocks."""
        ids, shown, blocks = [], "", []
        for event in events:
            if isinstance(event, Block):
                blocks.append(event)
                ids += event.ids
                text = self.decode(ids).rstrip("\ufffd")
                common = len(os.path.commonprefix([shown, text]))  # normally all of `shown`
                event.text, shown = text[common:], text
            elif isinstance(event, Stats):
                event.seed = cfg.seed
                last = blocks[-1] if blocks else None
                event.stop_reason = event.stop_reason or (
                    "repeat" if last and last.repeated else "eos" if last and last.eos else "length")
                event.unconverged = event.unconverged or [b.index for b in blocks
                                                          if not b.converged and not b.repeated]
            yield event

    def generate(self, prompt, cache=None, stop_ids=(), trim_repeats: bool = False, **knobs) -> Result:
        """Text (when a tokenizer is present) and ids, cut at EOS and max_new_tokens, plus stats."""
        return self._result(self.stream(prompt, cache, stop_ids, trim_repeats, **knobs))

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
                                                 self.args.pad_token_id, fixed=fixed), cfg))
        result.stats.tokens_per_forward = len(result.ids) / result.stats.steps_per_block[0]  # the gap's tokens only
        return result

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, without special tokens; <pad> (which the model writes after the end of a text) is
        never text."""
        pad = self.args.pad_token_id
        return self.tokenizer.decode([t for t in ids if t != pad], skip_special_tokens=True) \
            if self.tokenizer is not None else ""

    # --- low level, for parity tests and scripts ----------------------------------------------

    def new_cache(self):
        """An empty KV cache."""
        return self.backend.new_cache()

    def encode(self, ids, cache) -> None:
        """Commit tokens through the causal encoder into `cache`."""
        self.backend.encode(self._prompt_ids(ids), cache)

    def denoise(self, canvas_ids, cache, self_cond_logits=None):
        """One decoder pass: softcapped logits (canvas_length, vocab) for `canvas_ids` given `cache`.
        `self_cond_logits` is the previous step's processed logits (softcapped / temperature), or None."""
        return self.backend.denoise(canvas_ids, cache, self_cond_logits)


def load(path=None, backend: str = "auto", dtype: str | None = None, threads: int | None = None) -> Model:
    """Load an HF checkpoint directory or a GGUF file (its tokenizer comes from the file), a hub repo
    id `user/repo[:QUANT]`, or with no path the embedded default model (models/tiny-stdlib.md).
    backend: "auto" | "cpu" | "mlx"; dtype: "float32" | "bfloat16" (mlx also "float16", "q4", "q8":
    quantize at load); threads: CPU threads (default: 1 for a small model, else the physical cores)."""
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
    return Model(ckpt, backend, dtype, tokenizer.find(Path(path).expanduser()))
