"""The Typer app the verb modules register on (its own module, so that cli/__init__ importing the verbs and
the verbs importing the app make no import cycle)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

EPILOG = """Examples:

\b
  dgrun run -p "def fib(n):"                   (the embedded tiny model)
  dgrun chat                                   (ditto)
  dgrun run -m ./my-checkpoint -p "def fib(n):" -n 64 -t 1
  dgrun run -p "def fib(n):" -p "class Stack:"   (two prompts, one batch)
  dgrun run -m model.gguf --ids "2,651,1378" --steps 16 --json
  dgrun convert ./my-checkpoint --to Q4_K_M
  dgrun info model-Q4_K_M.gguf
  dgrun bench --random-weights 26b-a4b:Q4_K_M --backend cuda -p 4096 -b 1,4
"""

app = typer.Typer(
    name="dgrun",
    help="Run DiffusionGemma locally: block diffusion with the reference sampler.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        from dgrun import __version__

        print(f"dgrun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None):
    pass


class Interrupted(Exception):
    """Ctrl-C during generation: what was printed stays; the message says where it stopped (exit 130)."""
