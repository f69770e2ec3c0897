"""A multi-turn chat over one KV cache: only each new turn's tokens go through the encoder.

The cache stands for the conversation rendered by the chat template. A turn renders the whole conversation
again and encodes only the text after what the cache already holds (llama.cpp's `-cnv` does the same diff).
The answer's own tokens are what the model generated, committed as they are: the finished blocks by the
block loop, then the last block and the template's end of turn (e.g. "<turn|>\\n") by `Model.encode`.
When the template rewrites earlier text (a new system prompt, say) the cache is rebuilt from scratch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dgrun.chat_template import ChatTemplate, choose
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft, Prefill, Stats

SENTINEL = "DGRUNANSWER7f3a"  # stands for the answer when rendering, to find the text around it
END_OF_TURN = ("<turn|>", "<end_of_turn>", "<eos>", "<|im_end|>", "<|eot_id|>")


@dataclass
class TurnStats:
    """What one turn cost. `full_prompt_tokens` is what a stateless run would have encoded."""

    new_tokens: int = 0  # the turn's text, through the encoder now
    reused_tokens: int = 0  # already in the cache: not encoded again
    full_prompt_tokens: int = 0
    committed_tokens: int = 0  # answer tail + end of turn, committed after the answer
    prefill_seconds: float = 0.0
    rebuilt: bool = False  # the template changed earlier text: the cache was rebuilt
    interrupted: bool = False
    unconverged: list[int] = field(default_factory=list)  # blocks that ran out of steps
    trimmed: bool = False  # a block repeating the previous one was dropped
    gen: Stats | None = None


@dataclass
class Turn:
    """Yielded once at the end of `Chat.send`: the answer and what the turn cost."""

    text: str
    ids: list[int]
    stats: TurnStats


class Chat:
    """`Chat(model, system=...)`; `for event in chat.send("hi")`: Draft / Block events, then a `Turn`.
    Knobs (steps, max_new_tokens, ...) are those of `Model.generate`."""

    def __init__(self, model, system: str | None = None, template: ChatTemplate | None = None,
                 trim_repeats: bool = True, **knobs):
        if model.tokenizer is None:
            raise DgrunError("chat needs a tokenizer: the model has no tokenizer.json or GGUF vocab")
        self.model, self.tok = model, model.tokenizer
        self.template = template or choose(self.tok)
        self.system, self.trim_repeats, self.knobs = system, trim_repeats, dict(knobs)
        self.model.defaults.update(**self.knobs)  # reject bad knobs now
        self.history: list[dict] = []
        self.turns: list[TurnStats] = []
        self.prefix = self.tok.prefix_ids()
        self.stop_ids = self._stop_ids()
        self.clear()

    # --- conversation ---------------------------------------------------------------------------

    def messages(self, extra: list[dict] = ()) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + list(extra)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages, add_generation_prompt, bos_token=self.tok.bos_token or "",
                                    eos_token=self.tok.eos_token or "")

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays) and start an empty cache."""
        self.history = []
        self.drop_cache()

    def drop_cache(self) -> None:
        """Start an empty cache; the next turn encodes the whole history again."""
        self.cache, self.cached_text, self.cached_tokens = self.model.new_cache(), "", 0

    def _tokens(self, text: str, first: bool) -> list[int]:
        """Template text -> ids; the tokenizer's own prefix (<bos>) only if the template left it out."""
        ids = self.tok.encode(text, add_special_tokens=False)
        prefix = self.prefix if first else []
        return prefix + ids if prefix and ids[: len(prefix)] != prefix else ids

    def _stop_ids(self) -> list[int]:
        """End-of-turn tokens: Gemma's and the first token of what the template writes after an answer."""
        ids = {self.tok.token_id(t) for t in END_OF_TURN} - {None}
        rendered = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}],
                               False)
        after = rendered.split(SENTINEL, 1)[1] if SENTINEL in rendered else ""
        closing = self.tok.encode(after, add_special_tokens=False)[:1]
        if closing and self.tok.decode(closing, skip_special_tokens=True) == "":  # a special token
            ids.add(closing[0])
        return sorted(ids)

    # --- one turn -------------------------------------------------------------------------------

    def prompt_ids(self, text: str) -> list[int]:
        """The system prompt and one user turn, rendered up to the answer: what `dgrun run -sys` generates from,
        with `stop_ids=chat.stop_ids`, without touching this chat's conversation or cache."""
        return self._tokens(self.render(self.messages([{"role": "user", "content": text}]), True), True)

    def _prepare(self, text: str, st: TurnStats) -> list[int]:
        """The token ids to encode for this turn; rebuilds the cache when the history text changed."""
        full = self.render(self.messages([{"role": "user", "content": text}]), True)
        st.full_prompt_tokens = len(self._tokens(full, True))
        if self.cached_tokens and not full.startswith(self.cached_text):
            self.drop_cache()
            st.rebuilt = True
        ids = self._tokens(full[len(self.cached_text):], first=self.cached_tokens == 0)
        st.new_tokens, st.reused_tokens = len(ids), self.cached_tokens
        self.cached_text = full
        return ids

    def send(self, text: str, interrupted=lambda: False) -> Iterator[Prefill | Draft | Block | Turn]:
        """Answer `text`. `interrupted()` is polled after every step: when true the answer stops there,
        keeps the blocks finished so far, and the conversation stays usable."""
        st = TurnStats()
        ids = self._prepare(text, st)
        blocks = []
        events = self.model.stream(ids, cache=self.cache, stop_ids=self.stop_ids, trim_repeats=self.trim_repeats,
                                   **self.knobs)
        try:
            for event in events:
                if isinstance(event, Stats):
                    st.gen, st.prefill_seconds = event, event.prefill_seconds
                    break
                if isinstance(event, Block):
                    blocks.append(event)
                    if not event.converged and not event.repeated:
                        st.unconverged.append(event.index)
                    st.trimmed |= event.repeated
                yield event
                if interrupted():
                    st.interrupted = True
                    break
        except BaseException:  # a hard interrupt may have cut an encode short: the cache is unknown now
            self.drop_cache()
            raise
        finally:
            events.close()
        if st.interrupted and self.cache.lengths[0] < self.cached_tokens + st.new_tokens:
            self.drop_cache()  # stopped inside the prompt's prefill: forget the turn, rebuild next time
            self.cached_text = ""
            yield Turn("", [], st)
            return
        answer = [t for b in blocks for t in b.ids]
        committed = self.cache.lengths[0] - self.cached_tokens - st.new_tokens  # blocks the loop committed
        reply = self.tok.decode(answer, skip_special_tokens=True).strip()
        self.cached_tokens += st.new_tokens + committed
        self._close_turn(text, reply, answer[committed:], st)
        yield Turn(reply, answer, st)

    def _close_turn(self, text: str, reply: str, uncommitted: list[int], st: TurnStats) -> None:
        """Commit the answer's uncommitted tail and the template's end of turn; the cache then stands for
        the history including this answer."""
        t0 = time.perf_counter()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        rendered = self.render(self.messages()[:-1] + [{"role": "assistant", "content": SENTINEL}], False)
        after = rendered.split(SENTINEL, 1)[1] if SENTINEL in rendered else ""
        tail = uncommitted + self.tok.encode(after, add_special_tokens=False)
        self.model.encode(tail, self.cache)
        self.cached_tokens += len(tail)
        self.cached_text = self.render(self.messages(), False)
        st.committed_tokens = len(tail)
        st.prefill_seconds += time.perf_counter() - t0
        self.turns.append(st)

    # --- persistence ----------------------------------------------------------------------------

    def save(self, path) -> None:
        data = {"system": self.system, "messages": self.history, "knobs": self.knobs}
        try:
            Path(path).expanduser().write_text(json.dumps(data, indent=1, ensure_ascii=False))
        except OSError as e:
            raise DgrunError(f"cannot save the chat to {path} ({e})") from None

    def load(self, path) -> int:
        """Replace the conversation (and its settings) with a saved one and encode it; returns the tokens
        encoded."""
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
            messages = data["messages"]
            ok = all(isinstance(m, dict) and isinstance(m.get("content"), str) and
                     m.get("role") in ("user", "assistant") for m in messages)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DgrunError(f"cannot load a chat from {path} ({type(e).__name__}: {e})") from None
        if not ok:
            raise DgrunError(f"{path}: messages must be {{role: user|assistant, content: text}} objects")
        knobs = dict(self.knobs, **(data.get("knobs") or {}))
        self.model.defaults.update(**knobs)  # a hand-edited file may hold bad settings
        self.clear()
        self.knobs = knobs
        self.system, self.history = data.get("system", self.system), messages
        if not messages:
            return 0
        self.cached_text = self.render(self.messages(), False)
        ids = self._tokens(self.cached_text, first=True)
        self.model.encode(ids, self.cache)
        self.cached_tokens = len(ids)
        return len(ids)

    def totals(self) -> dict:
        """Session totals: what was encoded against what stateless turns would have encoded."""
        new = sum(t.new_tokens for t in self.turns)
        full = sum(t.full_prompt_tokens for t in self.turns)
        return {"turns": len(self.turns), "context_tokens": self.cached_tokens, "encoded_prompt_tokens": new,
                "stateless_prompt_tokens": full, "reused_tokens": sum(t.reused_tokens for t in self.turns),
                "saved": 1 - new / full if full else 0.0}
