"""`dgrun chat`: multi-turn chat that keeps the conversation in the KV cache.

In a terminal: a prompt, answers streamed block by block (or the denoising canvas with --visual), slash
commands, Ctrl-C to stop an answer, Ctrl-D to quit. With stdin not a terminal: one answer per input
line on stdout, in plain text, for scripts; everything else on stderr. A line of three double quotes
starts and ends a multi-line message, as llama.cpp's -mli and mlx-lm do.
"""

from __future__ import annotations

import signal
import sys
from contextlib import nullcontext
from typing import Annotated

import typer

from dgrun.cli.app import app
from dgrun.cli.chat_commands import EXIT, Commands
from dgrun.cli.options import (Backend, Confidence, Conversation, CtxSize, Dtype, EntropyBound, FlashAttn, GpuLayers, HfRepo,
                               Model, NPredict, Seed, Stability, Steps, System, Temp, Template, Threads, TMax, TMin,
                               Visual, backend_name, model_path, sampler_knobs)
from dgrun.cli.output import notices, printable, show_prefill
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft, Prefill

EXAMPLE = """Examples:

\b
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


def turn_notices(turn, steps: int, pad_id: int | None) -> list[str]:
    st = turn.stats
    out = ["stopped (Ctrl-C); the conversation goes on"] if st.interrupted else []
    out += notices(st.gen, steps, pad_id) if st.gen is not None else []
    if st.rebuilt:
        out.append("earlier text changed (template or system prompt): the KV cache was rebuilt")
    return out


MULTILINE = '"""'


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
        """Command output: dim in a terminal; on stderr when piped, so stdout holds only the answers."""
        if self.interactive:
            self.console.print(line, style="dim", markup=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, line: str):
        if self.interactive:
            self.console.print(f"[{line}]", style="dim italic", markup=False)
        else:
            print(f"dgrun: {line}", file=sys.stderr, flush=True)

    def line(self, prompt: str) -> str | None:
        """One input line; None at end of input (Ctrl-D)."""
        if not self.interactive:
            line = sys.stdin.readline()
            return None if line == "" else line.rstrip("\n")
        while True:
            try:
                return input(prompt)
            except EOFError:
                print()
                return None
            except KeyboardInterrupt:
                print("\n(Ctrl-D or /exit quits)")

    def read(self) -> str | None:
        """The next message: one line, or the lines between two \"\"\" lines (text may follow the opening one)."""
        first = self.line("> ")
        if first is None or not first.lstrip().startswith(MULTILINE):
            return first
        lines, more = [], first.lstrip()[len(MULTILINE):]
        while more is not None and not more.rstrip().endswith(MULTILINE):
            lines.append(more)
            more = self.line(". ")
        if more is not None:
            lines.append(more.rstrip()[: -len(MULTILINE)])
        return "\n".join(lines)

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
        shown, turn = "", None
        try:
            with CtrlC() as ctrl_c, (view or nullcontext()):
                for event in self.chat.send(line, interrupted=ctrl_c):
                    if isinstance(event, Prefill):
                        show_prefill(event)
                    elif isinstance(event, Draft):
                        if view is not None:
                            view.draft(event.block, event.step, event.ids)
                    elif isinstance(event, Block):
                        piece = event.text if shown else event.text.lstrip()
                        shown += piece
                        if view is not None:
                            view.block(shown)
                        elif self.interactive:
                            sys.stdout.write(printable(piece))
                            sys.stdout.flush()
                    else:
                        turn = event
        except KeyboardInterrupt:  # a second Ctrl-C: it may have landed mid-encode, so start the cache afresh
            self.chat.drop_cache()
            print()
            self.note("interrupted; the KV cache is rebuilt on the next turn")
            return
        if not self.interactive:
            sys.stdout.write(turn.text)
        elif view is not None:
            sys.stdout.write(printable(turn.text))
        elif turn.text.startswith(shown):
            sys.stdout.write(printable(turn.text[len(shown):]))
        sys.stdout.write("\n")
        sys.stdout.flush()
        for n in turn_notices(turn, steps, self.chat.model.args.pad_token_id):
            self.note(n)


Trim = Annotated[bool, typer.Option("--trim-repeats/--no-trim-repeats",
                                    help="Drop a block that repeats the previous one.")]


@app.command(epilog=EXAMPLE, short_help="Chat; the conversation stays in the KV cache.")
def chat(
    model: Model = None,
    hf_repo: HfRepo = None,
    system: System = None,
    chat_template: Template = None,
    conversation: Conversation = None,
    visual: Visual = False,
    trim_repeats: Trim = True,
    n_predict: NPredict = None,
    steps: Steps = None,
    temp: Temp = None,
    t_max: TMax = None,
    t_min: TMin = None,
    entropy_bound: EntropyBound = None,
    stability: Stability = None,
    confidence: Confidence = None,
    seed: Seed = None,
    threads: Threads = None,
    ctx_size: CtxSize = None,
    backend: Backend = "auto",
    n_gpu_layers: GpuLayers = None,
    flash_attn: FlashAttn = False,
    dtype: Dtype = None,
):
    """Chat with the model; the conversation stays in the KV cache between turns [-n: 1024 per answer]."""
    import dgrun
    from dgrun.chat import Chat
    from dgrun.chat_template import choose

    if conversation is False:
        raise DgrunError("chat is always a conversation: for one raw completion use dgrun run")
    knobs = sampler_knobs(steps, t_max, t_min, entropy_bound, stability, confidence, seed, temp,
                          max_new_tokens=1024 if n_predict is None else n_predict)
    override = choose(None, chat_template) if chat_template is not None else None
    m = dgrun.load(model_path(model, hf_repo), backend=backend_name(backend, n_gpu_layers), dtype=dtype,
                   threads=threads, ctx_size=ctx_size)
    template = override or choose(m.tokenizer)
    session = Session(Chat(m, system, template, trim_repeats, **knobs), visual, sys.stdin.isatty())
    if template.fallback:
        print("dgrun: the model has no chat template: using the Gemma 4 turn format", file=sys.stderr)
    if session.interactive:
        session.say(f"dgrun chat · template: {template.source}")
        session.say("/help for commands · Ctrl-C stops an answer · Ctrl-D quits")
    session.run()
