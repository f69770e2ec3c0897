"""The `dgrun` command: a thin Typer layer over the Python API. One module per verb."""

from __future__ import annotations

import os
import sys

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx

from dgrun.cli.app import app
from dgrun.errors import DgrunError

from dgrun.cli import run  # noqa: E402,F401  (registers its verb on `app`)
from dgrun.cli import convert, info  # noqa: E402,F401
from dgrun.cli import chat, pull  # noqa: E402,F401


def fail(message: str, code: int = 1) -> int:
    print(f"dgrun: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: every error becomes one line on stderr; DGRUN_DEBUG=1 shows tracebacks."""
    debug = os.environ.get("DGRUN_DEBUG") == "1"
    try:
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
