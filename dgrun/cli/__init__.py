"""The `dgrun` command: a thin Typer layer over the Python API. One module per verb."""

from __future__ import annotations

import logging
import os
import re
import sys

# OpenMP threads that spin while waiting collapse when another process holds a core (README, *Threads*): 2 threads
# ran at 1-13 tok/s spinning, 34-42 tok/s sleeping. Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx

from dgrun.cli.app import Interrupted, app
from dgrun.errors import DgrunError

from dgrun.cli import run  # noqa: E402,F401  (registers its verb on `app`)
from dgrun.cli import convert, info  # noqa: E402,F401
from dgrun.cli import chat, pull  # noqa: E402,F401
from dgrun.cli import bench  # noqa: E402,F401


def fail(message: str, code: int = 1) -> int:
    print(f"dgrun: error: {message}", file=sys.stderr)
    return code


# llama.cpp flags dgrun does not take, with their long names; the ones it takes are declared on the verbs.
LLAMA_ONLY = {"-b": "--batch-size", "-ub": "--ubatch-size", "-ctk": "--cache-type-k", "-ctv": "--cache-type-v",
              "-tb": "--threads-batch", "-np": "--parallel", "-cb": "--cont-batching", "-nkvo": "--no-kv-offload",
              "-sm": "--split-mode", "-mg": "--main-gpu", "-ts": "--tensor-split", "-dev": "--device",
              "-ot": "--override-tensor", "-cmoe": "--cpu-moe", "-ncmoe": "--n-cpu-moe", "-mli": "--multiline-input",
              "-i": "--interactive", "-if": "--interactive-first", "-cml": "--chatml", "-e": "--escape",
              "-r": "--reverse-prompt", "-md": "--model-draft", "-lcs": "--lookup-cache-static",
              "-ps": "--prompt-cache", "-jf": "--json-schema-file", "-j": "--json-schema", "-dkvc": "--dump-kv-cache",
              "-rea": "--reasoning-format", "-mm": "--mmproj", "--top-k": "", "--top-p": "", "--min-p": "",
              "--repeat-penalty": "", "--presence-penalty": "", "--frequency-penalty": "", "--mirostat": "",
              "--grammar": "", "--grammar-file": "", "--lora": "", "--mlock": "", "--no-mmap": "", "--numa": ""}
HINTS = {"-mli": ' (in chat, a """ line starts and ends a multi-line message)', "-i": " (use dgrun chat)",
         "-if": " (use dgrun chat)"}
MULTI_LETTER = re.compile(r"^-[A-Za-z][A-Za-z-]+$")  # click would read -ngl as -n gl


def check_flags(argv: list[str]) -> list[str]:
    """Reject llama.cpp flags dgrun does not take, and any undeclared multi-letter short flag, before click
    misreads it as a bundle of one-letter flags. `-fa on|off|auto` becomes `-fa`."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    cmd = typer.main.get_command(app).commands.get(verb) if verb else None
    if cmd is None:
        return argv
    takes_value = {name: not p.is_flag for p in cmd.params if getattr(p, "param_type_name", "") == "option"
                   for name in p.opts + p.secondary_opts}
    out, i = [], 0
    while i < len(argv):
        arg, name = argv[i], argv[i].split("=", 1)[0]
        out.append(arg)
        if arg == "--":
            return out + argv[i + 1:]
        if name in takes_value:
            if takes_value[name] and "=" not in arg and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
            elif name in ("-fa", "--flash-attn") and argv[i + 1:i + 2] in (["on"], ["off"], ["auto"]):
                i += 1
        elif name in LLAMA_ONLY:
            long = f" ({LLAMA_ONLY[name]})" if LLAMA_ONLY[name] else ""
            raise cx.UsageError(f"llama.cpp's {name}{long} is not supported by dgrun{HINTS.get(name, '')}")
        elif MULTI_LETTER.match(name) and i > argv.index(verb):
            raise cx.UsageError(f"no such option: {name} (dgrun {verb} --help lists the options)")
        i += 1
    return out


class _Once(logging.Handler):
    """Library notices (dgrun.errors.notice) on stderr, each message once per process."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen: set[str] = set()

    def emit(self, record):
        message = record.getMessage()
        if message not in self.seen:
            self.seen.add(message)
            print(f"dgrun: {message}", file=sys.stderr, flush=True)


def _show_notices() -> None:
    log = logging.getLogger("dgrun")
    if not any(isinstance(h, _Once) for h in log.handlers):
        log.addHandler(_Once())
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point: every error becomes one line on stderr; DGRUN_DEBUG=1 shows tracebacks."""
    debug = os.environ.get("DGRUN_DEBUG") == "1"
    _show_notices()
    try:
        argv = check_flags(sys.argv[1:] if argv is None else list(argv))
        code = app(args=argv, prog_name="dgrun", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C inside a command into Exit(130) and returns its code
            return fail("interrupted", 130)
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except cx.NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        return 0
    except cx.UsageError as e:
        if debug:
            raise
        return fail(e.format_message().replace("\n", " "), 2)
    except Interrupted as e:
        print(f"dgrun: {e}", file=sys.stderr)
        return 130
    except (KeyboardInterrupt, typer.Abort):
        return fail("interrupted", 130)
    except DgrunError as e:
        if debug:
            raise
        return fail(str(e))
    except Exception as e:  # a bug or an unforeseen input: still one line unless debugging
        if debug:
            raise
        return fail(f"{type(e).__name__}: {e} (set DGRUN_DEBUG=1 for the traceback)")


if __name__ == "__main__":
    sys.exit(main())
