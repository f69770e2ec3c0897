"""`dgrun chat --visual`: a rich Live view of the canvas denoising, step by step.

Each Draft is the argmax canvas after one step. Tokens that changed since the previous step are drawn
bright, settled ones green, so the canvas can be watched converging before the block is committed.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text


class CanvasView:
    def __init__(self, tokenizer, steps: int, console: Console | None = None):
        self.tok, self.steps = tokenizer, steps
        self.console = console or Console()
        self.live = Live(console=self.console, auto_refresh=False, transient=True)
        self.previous: list[int] | None = None
        self.answer = ""

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.stop()
        return False

    def piece(self, tid: int) -> str:
        text = self.tok.decode([tid])
        return text.replace("\n", "⏎").replace("\t", "⇥") or "·"

    def draft(self, block: int, step: int, ids: list[int]) -> None:
        canvas = Text()
        for i, tid in enumerate(ids):
            changed = self.previous is None or i >= len(self.previous) or self.previous[i] != tid
            canvas.append(self.piece(tid), style="bold yellow" if changed else "green")
        self.previous = ids
        title = f"block {block} · step {step}/{self.steps}"
        self.live.update(Group(Text(self.answer[-600:]), Panel(canvas, title=title, title_align="left")),
                         refresh=True)

    def block(self, answer: str) -> None:
        """A block was committed: it joins the answer above the next canvas."""
        self.answer, self.previous = answer, None
        self.live.update(Text(self.answer[-600:]), refresh=True)
