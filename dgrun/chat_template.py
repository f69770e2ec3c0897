"""Chat templates rendered in jinja2's immutable sandbox, as transformers renders them.

A template comes from the model (GGUF tokenizer.chat_template, chat_template.jinja, tokenizer_config.json),
from --chat-template FILE, or, when there is none, is Gemma 4's turn format. Templates are untrusted
input: the sandbox refuses attribute tricks (``''.__class__``), mutation of the messages and file loads,
and any such attempt becomes one DgrunError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dgrun.errors import DgrunError

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


def _environment():
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
        def unsafe_undefined(self, obj, attribute):  # fail at once instead of rendering an empty string
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, loader=NoFiles(), extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(text: str, messages: list[dict], add_generation_prompt: bool = True, **context) -> str:
    """Render untrusted template text; every failure is one DgrunError."""
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        template = _environment().from_string(text)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except SecurityError as e:
        raise DgrunError(f"chat template blocked: it tried to reach outside the sandbox ({e})") from None
    except TemplateError as e:
        raise DgrunError(f"chat template error: {e}") from None
    except OverflowError as e:  # the sandbox's range() limit
        raise DgrunError(f"chat template blocked: {e}") from None
    except Exception as e:  # a template can raise anything (a bad index, a recursion): still one line
        raise DgrunError(f"chat template failed: {type(e).__name__}: {e}") from None


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
