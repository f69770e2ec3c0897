"""`dgrun run`: generate once from a prompt, printing each block as it lands, then one stats line."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from dgrun.cli.app import Interrupted, app
from dgrun.cli.options import (Backend, Confidence, Conversation, CtxSize, Dtype, EntropyBound, FlashAttn, GpuLayers, HfRepo,
                               Model, NPredict, Seed, Stability, Steps, System, Temp, Template, Threads, TMax, TMin,
                               Visual, backend_name, model_path, sampler_knobs)
from dgrun.cli.output import notices, plural, printable, show_prefill, stats_json, stats_line
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft, Prefill, Stats


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise DgrunError(f"--ids takes integers separated by commas or spaces, got {text!r}") from None
    if not ids:
        raise DgrunError("--ids is empty")
    return ids


def read_prompt(prompt: str | None, file: str | None, ids: str | None) -> str | list[int]:
    """The prompt from -p TEXT, -p - (stdin), -f FILE, --ids, or stdin when it is not a terminal."""
    given = [x for x in (prompt, file, ids) if x is not None]
    if len(given) > 1:
        raise DgrunError("give one of -p/--prompt, -f/--file or --ids")
    if ids is not None:
        return parse_ids(ids)
    if file is not None:
        try:
            return Path(file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DgrunError(f"cannot read the prompt file {file} ({type(e).__name__}: {e})") from None
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
        if not text.strip():
            raise DgrunError("no prompt: give -p/--prompt TEXT, -f FILE or --ids (stdin was empty)")
        return text
    if prompt is None:
        raise DgrunError("give a prompt: -p TEXT, -p - or -f FILE (or pipe it on stdin), or --ids")
    return prompt


def show_prompt(m, ids: list[int]) -> None:
    """--verbose-prompt: the prompt's tokens, as llama.cpp prints them."""
    print(f"prompt: {len(ids)} tokens", file=sys.stderr)
    for t in ids:
        piece = m.tokenizer.decode([t]) if m.tokenizer is not None else ""
        print(f"{t:>8} -> {printable(piece)!r}", file=sys.stderr)


EXAMPLES = """Examples:

\b
  dgrun run -p "def fib(n):" -n 64                  (the embedded tiny model)
  dgrun run -m ./ckpt -f prompt.txt --steps 24 -s -1
  echo "def fib(n):" | dgrun run --temp 0
  dgrun run -m model.gguf -sys "You are terse." -p "What is a block?"
  dgrun run -p "def area(r):" --suffix "    return result" --gap 12   (fill the gap)
  dgrun run -p "def fib(n):" -p "class Stack:" -s 1     (two prompts, one batch)
  dgrun run -m model.gguf -c 8192 -f long_prompt.txt"""


@app.command(epilog=EXAMPLES, short_help="Generate from a prompt (or fill a gap).")
def run(
    model: Model = None,
    hf_repo: HfRepo = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", metavar="TEXT", help="Prompt text; - reads stdin (as does no -p with stdin piped). "
        "Given more than once, the prompts run as one batch.")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", metavar="FILE", help="Read the prompt from FILE.")] = None,
    ids: Annotated[Optional[str], typer.Option("--ids", metavar="IDS", help="Prompt as raw token ids: '2,651,1378'.")] = None,
    system: System = None,
    chat_template: Template = None,
    conversation: Conversation = None,
    suffix: Annotated[Optional[str], typer.Option(
        "--suffix", metavar="TEXT", help="Infill: text after the gap; prints only what fills it (one block).")] = None,
    gap: Annotated[Optional[int], typer.Option(
        "--gap", metavar="N", help="Infill: tokens in the gap [canvas minus suffix, at least half the canvas].")] = None,
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
    visual: Visual = False,
    verbose_prompt: Annotated[bool, typer.Option("--verbose-prompt", help="Print the prompt's tokens first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
):
    """Generate from a prompt with block diffusion, or fill a gap (--suffix)."""
    import dgrun

    if gap is not None and suffix is None:
        raise DgrunError("--gap needs --suffix")
    templated = conversation if conversation is not None else (system is not None or chat_template is not None)
    if not templated and (system is not None or chat_template is not None):
        raise DgrunError("-sys/--chat-template apply the chat template: drop -no-cnv/--no-chat-template")
    batch = prompt is not None and len(prompt) > 1
    if batch and (file is not None or ids is not None or suffix is not None or visual or "-" in prompt):
        raise DgrunError("several -p prompts run as one batch: without -f, --ids, --suffix, --visual or -p -")
    source = list(prompt) if batch else read_prompt(prompt[0] if prompt else None, file, ids)
    if suffix is not None and not isinstance(source, str):
        raise DgrunError("--suffix needs a text prompt (-p or -f)")
    if suffix is not None and templated:
        raise DgrunError("--suffix fills a gap in raw text: it does not take the chat template")
    knobs = sampler_knobs(steps, t_max, t_min, entropy_bound, stability, confidence, seed, temp,
                          max_new_tokens=n_predict)
    m = dgrun.load(model_path(model, hf_repo), backend=backend_name(backend, n_gpu_layers), dtype=dtype,
                   threads=threads, ctx_size=ctx_size)
    if suffix is not None and m.tokenizer is None:
        raise DgrunError("--suffix needs the model's tokenizer")
    stop_ids = ()
    if templated:
        from dgrun.chat import Chat
        from dgrun.chat_template import choose

        if not isinstance(source, (str, list)) or not all(isinstance(p, str) for p in source):
            raise DgrunError("the chat template needs a text prompt (-p or -f), not --ids")
        chat = Chat(m, system, choose(None, chat_template) if chat_template else None, **knobs)
        source = [chat.prompt_ids(p) for p in source] if batch else chat.prompt_ids(source)
        stop_ids = chat.stop_ids
    if verbose_prompt:
        for p in source if batch else [source]:
            show_prompt(m, m.tokenizer.encode(p) if isinstance(p, str) else p)
    if batch:
        write_batch(m, m.stream(source, stop_ids=stop_ids, **knobs), len(source), m.config(**knobs).steps, as_json)
        return
    if suffix is not None:
        r = m.infill(source, suffix, gap, **knobs)
        events = [Block(0, r.ids, r.stats.steps_per_block[0], not r.stats.unconverged, False, text=r.text), r.stats]
    else:
        events = m.stream(source, stop_ids=stop_ids, **knobs)
    write(m, events, m.defaults.update(**knobs).steps, as_json, visual, strip=templated)


def write(m, events, steps: int, as_json: bool, visual: bool, strip: bool) -> None:
    """Print each block's text as it lands (or the canvas, --visual), then the stats and notices on stderr.
    Ctrl-C keeps what was printed and says where it stopped."""
    view = None
    if visual and sys.stdout.isatty() and not as_json and m.tokenizer is not None:
        from dgrun.cli.canvas_view import CanvasView

        view = CanvasView(m.tokenizer, steps)
    elif visual:
        print("dgrun: --visual needs a terminal and a tokenizer: printing the text only", file=sys.stderr)
    ids, text, blocks, stats = [], "", 0, None
    tty = sys.stdout.isatty()
    try:
        with view or nullcontext():
            for event in events:
                if isinstance(event, Prefill):
                    show_prefill(event)
                elif isinstance(event, Draft) and view is not None:
                    view.draft(event.block, event.step, event.ids)
                elif isinstance(event, Block):
                    ids += event.ids
                    blocks += 1
                    piece = event.text.lstrip() if strip and not text else event.text
                    text += piece
                    if view is not None:
                        view.block(text)
                    elif not as_json and m.tokenizer is not None:
                        sys.stdout.write(printable(piece) if tty else piece)
                        sys.stdout.flush()
                elif isinstance(event, Stats):
                    stats = event
    except KeyboardInterrupt:
        stats = Stats(ids=ids, stop_reason="interrupted")
    if as_json:
        print(json.dumps({"text": m.decode(stats.ids), "ids": stats.ids, "stats": stats_json(stats)}))
    elif m.tokenizer is None:
        print(" ".join(map(str, stats.ids)))
    else:
        if view is not None:
            sys.stdout.write(printable(text))
        print(flush=True)
    if stats.stop_reason == "interrupted":
        raise Interrupted(f"interrupted (Ctrl-C) after {plural(blocks, 'block')}, {plural(len(ids), 'token')}")
    print(stats_line(stats), file=sys.stderr)
    for line in notices(stats, steps, m.args.pad_token_id):
        print(f"dgrun: {line}", file=sys.stderr)


def write_batch(m, events, n: int, steps: int, as_json: bool) -> None:
    """Several prompts in one batch: each answer under its prompt's index once all are done (blocks of
    different prompts land interleaved), then one stats line per prompt on stderr."""
    stats = {}
    try:
        for event in events:
            if isinstance(event, Prefill):
                show_prefill(event)
            elif isinstance(event, Stats):
                stats[event.prompt_index] = event
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted (Ctrl-C) with {len(stats)} of {n} answers finished") from None
    if as_json:
        print(json.dumps([{"prompt_index": i, "text": m.decode(s.ids), "ids": s.ids, "stats": stats_json(s)}
                          for i, s in sorted(stats.items())]))
    for i, s in sorted(stats.items()):
        if not as_json:
            text = m.decode(s.ids) if m.tokenizer is not None else " ".join(map(str, s.ids))
            print(f"[{i}]\n{printable(text) if sys.stdout.isatty() else text}", flush=True)
        print(f"[{i}] {stats_line(s)}", file=sys.stderr)
        for line in notices(s, steps, m.args.pad_token_id):
            print(f"dgrun: [{i}] {line}", file=sys.stderr)
