"""What `run` and `chat` print besides the text: the stats line, notices, and terminal-safe text."""

from __future__ import annotations

import re
import sys

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls but tab and newline


def printable(text: str) -> str:
    """Control bytes from the model shown as escapes (\\r, \\x02), so they cannot drive the terminal."""
    return CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def show_prefill(event) -> None:
    """A long prompt's progress through the encoder, on one self-erasing stderr line (terminals only)."""
    if not sys.stderr.isatty():
        return
    end = "\r\x1b[K" if event.done >= event.total else ""
    sys.stderr.write(f"\r\x1b[Kprefill {event.done}/{event.total} tokens{end}")
    sys.stderr.flush()


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def stats_line(s) -> str:
    """llama.cpp's split: prompt evaluation apart from generation."""
    gen_seconds = max(s.seconds - s.prefill_seconds, 1e-9)
    prompt_rate = s.prompt_tokens / s.prefill_seconds if s.prefill_seconds else 0.0
    return (f"blocks {s.blocks} | steps/block {s.avg_steps:.1f} | tokens/forward "
            f"{s.tokens_per_forward:.2f} | prompt {s.prompt_tokens} tok in {s.prefill_seconds * 1000:.1f} ms "
            f"({prompt_rate:.1f} tok/s) | generated {len(s.ids)} tok in {gen_seconds:.2f} s "
            f"({len(s.ids) / gen_seconds:.1f} tok/s) | seed {s.seed}")


def stats_json(s) -> dict:
    gen_seconds = max(s.seconds - s.prefill_seconds, 1e-9)
    return {"blocks": s.blocks, "steps_per_block": s.steps_per_block, "tokens_per_forward": s.tokens_per_forward,
            "seconds": s.seconds, "tokens_per_second": s.tokens_per_second, "prompt_tokens": s.prompt_tokens,
            "prefill_seconds": s.prefill_seconds,
            "prompt_tokens_per_second": s.prompt_tokens / s.prefill_seconds if s.prefill_seconds else 0.0,
            "generation_tokens_per_second": len(s.ids) / gen_seconds, "stop_reason": s.stop_reason,
            "unconverged": s.unconverged, "seed": s.seed}


def only_padding(ids: list[int], pad_id: int | None) -> bool:
    return bool(ids) and all(t == pad_id for t in ids)


def notices(stats, steps: int, pad_id: int | None) -> list[str]:
    """Why an answer looks the way it does: step limits, padding, trimmed repeats."""
    out = []
    if stats.unconverged:
        blocks = ", ".join(map(str, stats.unconverged))
        out.append(f"{'block' if len(stats.unconverged) == 1 else 'blocks'} {blocks} hit the {steps}-step limit "
                   "without converging")
    if only_padding(stats.ids, pad_id):
        out.append(f"the model wrote only padding ({plural(len(stats.ids), '<pad> token')}): an empty answer")
    if stats.stop_reason == "repeat":
        out.append("dropped a block that repeated the previous one (--no-trim-repeats keeps it)")
    return out
