"""Chat templates rendered in jinja2's immutable sandbox, as transformers renders them.

A template comes from the model (GGUF tokenizer.chat_template, chat_template.jinja, tokenizer_config.json),
from --chat-template FILE, or, when there is none, is Gemma 4's turn format. Templates are untrusted
input: the sandbox refuses attribute tricks (``''.__class__``), mutation of the messages and file loads,
and any such attempt becomes one DgrunError. A render is also bounded in time, output and memory (`Budget`),
so a template that loops for ever or builds gigabytes stops with one line too.
"""

from __future__ import annotations

import functools
import json
import numbers
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dgrun import checks
from dgrun.errors import DgrunError

# A real template renders a conversation in milliseconds and its output is the prompt; these are far above.
TIME_LIMIT = 2.0  # seconds
OUTPUT_LIMIT = 8 << 20  # characters
MEMORY_LIMIT = 512 << 20  # bytes of resident memory the render may add
BIG_WIDTH = re.compile(r"\d{7,}")  # a %-format or str.format width of a million or more


class Stop(Exception):
    """A render ran past a Budget limit."""


class Budget:
    """Deadline, output and memory bounds for one render. `tick` runs on every line and call of the
    template's code (a trace function), so even a loop with an empty body is stopped."""

    def __init__(self):
        self.deadline = time.monotonic() + TIME_LIMIT
        self.rss0 = _rss()
        self.next_rss = 0.0

    def tick(self):
        now = time.monotonic()
        if now > self.deadline:
            raise Stop(f"it ran past {TIME_LIMIT:g} s")
        if now >= self.next_rss:  # reading /proc costs a few microseconds: once a millisecond
            self.next_rss = now + 0.001
            if _rss() - self.rss0 > MEMORY_LIMIT:
                raise Stop(f"it took more than {MEMORY_LIMIT >> 20} MiB of memory")

    def size(self, n: int, what: str):
        if n > OUTPUT_LIMIT:
            raise Stop(f"{what} of {n} would pass the limit of {OUTPUT_LIMIT} characters")

    def args(self, args, kwargs):
        """Refuse huge widths and counts before a call or filter runs ('x'.ljust(10**10), center(10**10))."""
        for v in (*args, *kwargs.values()):
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and abs(v) > OUTPUT_LIMIT:
                self.size(abs(int(v)), "an argument")
            if isinstance(v, str) and BIG_WIDTH.search(v) and ("%" in v or "{" in v):
                raise Stop("a format width of a million or more")

    def replace(self, s, old, new, count=-1):
        """str.replace's result size, before it is built."""
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            n = s.count(old) if old else len(s) + 1
            n = n if not isinstance(count, int) or count < 0 else min(n, count)
            self.size(len(s) + n * (len(new) - len(old)), "a replacement")

    def tracer(self, frame, event, arg):
        self.tick()
        return self.tracer if frame.f_code.co_filename == "<template>" else None


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:  # not Linux: the time and size bounds still hold
        return 0


def _length(value) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None

# Gemma 4's turn format (google/gemma-4 chat templates without tools or thinking).
GEMMA4 = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] in ['system', 'developer'] %}"
    "<|turn>system\n{{ messages[0]['content'] | trim }}<turn|>\n"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}"
    "<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


@dataclass
class ChatTemplate:
    text: str
    source: str  # where it came from, for messages: a path, "--chat-template FILE", or the fallback's name
    fallback: bool = False

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **context) -> str:
        return render(self.text, messages, add_generation_prompt, **context)


def _environment(budget: Budget):
    from jinja2 import BaseLoader, ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class NoFiles(BaseLoader):
        def get_source(self, environment, name):  # include / import / extends
            raise SecurityError(f"templates may not load other files ({name!r})")

    def tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def unsafe_undefined(self, obj, attribute):  # fail at once instead of rendering an empty string
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's own signature)
            budget.tick()
            budget.args(args, kwargs)
            if getattr(__obj, "__name__", None) == "replace":
                budget.replace(getattr(__obj, "__self__", None), *args[:3])
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):  # str.format / format_map: the widths are in the string
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None

            def checked(*args, **kwargs):
                budget.args((value.__self__,), {})
                return wrapped(*args, **kwargs)
            return checked

        def call_binop(self, context, operator, left, right):
            budget.tick()
            if operator == "*":  # 'x' * n and [..] * n: the size before it is allocated
                for seq, n in ((left, right), (right, left)):
                    if _length(seq) is not None and isinstance(n, numbers.Integral):
                        budget.size(_length(seq) * max(0, int(n)), "a repeated value")
            elif operator == "+" and _length(left) is not None and _length(right) is not None:
                budget.size(_length(left) + _length(right), "a concatenation")
            elif operator == "**" and isinstance(left, numbers.Integral) and isinstance(right, numbers.Integral):
                if abs(left) > 1 and right > 4096:
                    raise Stop(f"{left} ** {right} is too large")
            return super().call_binop(context, operator, left, right)

    def bounded(f):
        @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
        def call(*args, **kwargs):
            budget.tick()
            budget.args(args, kwargs)
            return f(*args, **kwargs)
        return call

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, loader=NoFiles(), extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded(f) for name, f in env.filters.items()}
    replace = env.filters["replace"]

    @functools.wraps(replace)
    def checked_replace(eval_ctx, s, old, new, count=None):  # its size follows from its arguments
        budget.replace(str(s), old, new, -1 if count is None else count)
        return replace(eval_ctx, s, old, new, count)

    env.filters["replace"] = checked_replace
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(text: str, messages: list[dict], add_generation_prompt: bool = True, **context) -> str:
    """Render untrusted template text; every failure, and a render past the Budget, is one DgrunError."""
    from jinja2.exceptions import SecurityError, TemplateError

    budget = Budget()
    previous = sys.gettrace()
    try:
        template = _environment(budget).from_string(text)
        out, n = [], 0
        sys.settrace(budget.tracer)
        for chunk in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **context):
            n += len(chunk)
            budget.size(n, "the output")
            out.append(chunk)
        return "".join(out)
    except Stop as e:
        raise DgrunError(f"chat template stopped: {e}") from None
    except SecurityError as e:
        raise DgrunError(f"chat template blocked: it tried to reach outside the sandbox ({e})") from None
    except TemplateError as e:
        raise DgrunError(f"chat template error: {e}") from None
    except OverflowError as e:  # the sandbox's range() limit
        raise DgrunError(f"chat template blocked: {e}") from None
    except Exception as e:  # a template can raise anything (a bad index, a recursion): still one line
        raise DgrunError(f"chat template failed: {checks.reason(e)}") from None
    finally:
        sys.settrace(previous)


def choose(tokenizer, override: str | Path | None = None) -> ChatTemplate:
    """--chat-template FILE, else the model's own template, else Gemma 4's turn format."""
    if override is not None:
        path = Path(override).expanduser()
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise DgrunError(f"--chat-template: cannot read {path} ({e})") from None
    if tokenizer is not None and tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, tokenizer.template_source or "the model")
    return ChatTemplate(GEMMA4, "Gemma 4 turn format (built in)", fallback=True)
