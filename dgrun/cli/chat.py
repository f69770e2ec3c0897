"""`dgrun chat`: multi-turn chat that keeps the conversation in the KV cache.

In a terminal: a prompt, answers streamed block by block (or the denoising canvas with --visual), slash
commands, Ctrl-C to stop an answer, Ctrl-D to quit. With stdin not a terminal: one answer per input
line, in plain text, for scripts.
"""

from __future__ import annotations

import signal
import sys
from contextlib import nullcontext
from typing import Annotated, Optional

import typer

from dgrun.cli.app import app
from dgrun.cli.options import (Backend, Confidence, Dtype, EntropyBound, Model, Seed, Stability, Steps, TMax,
                               TMin, default_model, sampler_knobs)
from dgrun.cli.chat_commands import EXIT, Commands
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft, SamplerConfig

EXAMPLE = """Examples:

  dgrun chat -m ./ckpt -sys "You are terse."

  dgrun chat -hf user/DiffusionGemma-GGUF:Q4_K_M --visual

  echo "What is 2+2?" | dgrun chat -m model.gguf
"""


class CtrlC:
    """While generating, the first Ctrl-C asks the loop to stop after the current step; a second one
    interrupts at once."""

    def __enter__(self):
        self.hits = 0
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.hits += 1
        if self.hits > 1:
            raise KeyboardInterrupt

    def __call__(self) -> bool:
        return self.hits > 0

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)
        return False


def notices(stats, steps: int) -> list[str]:
    out = []
    if stats.interrupted:
        out.append("stopped (Ctrl-C); the conversation goes on")
    if stats.unconverged:
        blocks = ", ".join(map(str, stats.unconverged))
        out.append(f"block {blocks} hit the {steps}-step limit without converging")
    if stats.trimmed:
        out.append("dropped a block that repeated the previous one (--no-trim-repeats keeps it)")
    if stats.rebuilt:
        out.append("earlier text changed (template or system prompt): the KV cache was rebuilt")
    return out


class Session:
    """The read-answer loop shared by the terminal and the piped modes."""

    def __init__(self, chat, visual: bool, interactive: bool):
        from rich.console import Console

        self.chat, self.interactive = chat, interactive
        if interactive:
            try:  # line editing and history for input()
                import readline  # noqa: F401
            except ImportError:  # pragma: no cover (Windows)
                pass
        self.settings = {"visual": visual}
        self.console = Console(highlight=False)
        self.commands = Commands(chat, self.say, self.settings)

    def say(self, line: str):
        if self.interactive:
            self.console.print(line, style="dim", markup=False)
        else:
            print(line, flush=True)

    def note(self, line: str):
        if self.interactive:
            self.console.print(f"[{line}]", style="dim italic", markup=False)
        else:
            print(f"dgrun: {line}", file=sys.stderr, flush=True)

    def read(self) -> str | None:
        """The next input line; None at end of input (Ctrl-D)."""
        if not self.interactive:
            line = sys.stdin.readline()
            return None if line == "" else line
        while True:
            try:
                return input("> ")
            except EOFError:
                print()
                return None
            except KeyboardInterrupt:
                print("\n(Ctrl-D or /exit quits)")

    def run(self):
        while (line := self.read()) is not None:
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if self.commands.run(line) is EXIT:
                        return
                else:
                    self.answer(line)
            except DgrunError as e:  # a bad command or template error: report it, keep the session
                print(f"dgrun: error: {e}", file=sys.stderr, flush=True)

    def answer(self, line: str):
        steps = self.chat.model.defaults.update(**self.chat.knobs).steps
        view = None
        if self.settings["visual"] and self.interactive:  # a live view would garble piped output
            from dgrun.cli.canvas_view import CanvasView

            view = CanvasView(self.chat.tok, steps, self.console)
        ids, shown, turn = [], "", None
        try:
            with CtrlC() as ctrl_c, (view or nullcontext()):
                for event in self.chat.send(line, interrupted=ctrl_c):
                    if isinstance(event, Draft):
                        if view is not None:
                            view.draft(event.block, event.step, event.ids)
                    elif isinstance(event, Block):
                        ids += event.ids
                        text = self.chat.tok.decode(ids, skip_special_tokens=True).lstrip()
                        if view is not None:
                            view.block(text)
                        elif self.interactive and not text.endswith("\ufffd"):  # wait for a whole character
                            sys.stdout.write(text[len(shown):])
                            sys.stdout.flush()
                            shown = text
                    else:
                        turn = event
        except KeyboardInterrupt:  # a second Ctrl-C: it may have landed mid-encode, so start the cache afresh
            self.chat.drop_cache()
            print()
            self.note("interrupted; the KV cache is rebuilt on the next turn")
            return
        if view is not None or not self.interactive:
            sys.stdout.write(turn.text)
        elif turn.text.startswith(shown):
            sys.stdout.write(turn.text[len(shown):])
        sys.stdout.write("\n")
        sys.stdout.flush()
        for n in notices(turn.stats, steps):
            self.note(n)


def model_path(model: str | None, hf_repo: str | None):
    from dgrun import hub

    if model is not None and hf_repo is not None:
        raise DgrunError("give one of -m/--model or -hf/--hf-repo, not both")
    if model is None and hf_repo is None:
        return default_model()
    if hf_repo is not None:
        if hub.parse(hf_repo) is None:
            raise DgrunError(f"-hf takes user/repo[:QUANT], got {hf_repo!r}")
        return hub.resolve(hf_repo, gguf=True)
    return hub.resolve(model)


HfRepo = Annotated[Optional[str], typer.Option("--hf-repo", "-hf",
                                               help="Hub GGUF repo: user/repo[:QUANT] (Q4_K_M by default).")]
System = Annotated[Optional[str], typer.Option("--system", "-sys", help="System prompt.")]
Template = Annotated[Optional[str], typer.Option("--chat-template", help="Jinja chat template FILE (overrides).")]
Trim = Annotated[bool, typer.Option("--trim-repeats/--no-trim-repeats",
                                    help="Drop a block that repeats the previous one.")]


@app.command(epilog=EXAMPLE)
def chat(
    model: Model = None,
    hf_repo: HfRepo = None,
    system: System = None,
    chat_template: Template = None,
    visual: Annotated[bool, typer.Option("--visual", help="Show the canvas denoising live.")] = False,
    trim_repeats: Trim = True,
    n_predict: Annotated[int, typer.Option("--n-predict", "-n", help="max_new_tokens per answer.")] = 1024,
    steps: Steps = None,
    t_max: TMax = None,
    t_min: TMin = None,
    entropy_bound: EntropyBound = None,
    stability: Stability = None,
    confidence: Confidence = None,
    seed: Seed = None,
    backend: Backend = "auto",
    dtype: Dtype = None,
):
    """Chat with the model; the conversation stays in the KV cache between turns."""
    import dgrun
    from dgrun.chat import Chat
    from dgrun.chat_template import choose

    knobs = sampler_knobs(steps, t_max, t_min, entropy_bound, stability, confidence, seed, max_new_tokens=n_predict)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    SamplerConfig().update(**knobs)  # reject bad values and files before the (slow) load
    override = choose(None, chat_template) if chat_template is not None else None
    m = dgrun.load(model_path(model, hf_repo), backend=backend, dtype=dtype)
    template = override or choose(m.tokenizer)
    session = Session(Chat(m, system, template, trim_repeats, **knobs), visual, sys.stdin.isatty())
    if template.fallback:
        print("dgrun: the model has no chat template: using the Gemma 4 turn format", file=sys.stderr)
    if session.interactive:
        session.say(f"dgrun chat · template: {template.source}")
        session.say("/help for commands · Ctrl-C stops an answer · Ctrl-D quits")
    session.run()
