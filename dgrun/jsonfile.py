"""The one JSON reader for checkpoint files (config.json, generation_config.json, tokenizer_config.json, ...).

Bounded before parsing (file size) and after (nesting depth), so a hostile file costs little and later code
can walk the result without recursing deep. Every failure is one DgrunError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from dgrun import checks
from dgrun.errors import DgrunError

MAX_BYTES = 64 << 20  # tokenizer_config.json of real models is < 2 MB; tokenizer.json is read by `tokenizers`
MAX_DEPTH = 32


def depth_ok(value, limit: int = MAX_DEPTH) -> bool:
    """Whether containers nest at most `limit` deep (iterative, so a deep value cannot overflow the stack)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return False
                stack.append((child, depth + 1))
    return True


def read_json(path: Path, missing: dict | None = None) -> dict:
    """A JSON object from `path`; `missing` (when given) is returned for an absent file."""
    path = Path(path)
    if missing is not None and not path.is_file():
        return missing
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DgrunError(f"{path}: {size} bytes is too large for a JSON config (limit {MAX_BYTES})")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except DgrunError:
        raise
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DgrunError(f"{path}: cannot read JSON ({checks.reason(e)})") from None
    if not isinstance(data, dict):
        raise DgrunError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if not depth_ok(data):
        raise DgrunError(f"{path}: JSON nested deeper than {MAX_DEPTH} levels")
    return data
