"""Text <-> ids with the `tokenizers` library, from a checkpoint's tokenizer.json or a GGUF's metadata.

The tokenizer also carries the chat template found next to it (tokenizer.chat_template in a GGUF;
chat_template.jinja, chat_template.json or tokenizer_config.json in a directory), as HF tokenizers do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dgrun.errors import DgrunError


class Tokenizer:
    def __init__(self, tok, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, template_source: str | None = None):
        self.tok = tok
        self.bos_token = bos_token if bos_token is not None else self._known("<bos>", "<s>")
        self.eos_token = eos_token if eos_token is not None else self._known("<eos>", "</s>")
        self.chat_template = chat_template
        self.template_source = template_source

    def _known(self, *texts: str) -> str | None:
        return next((t for t in texts if self.tok.token_to_id(t) is not None), None)

    @classmethod
    def from_file(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise DgrunError(f"{path}: cannot read tokenizer ({e})") from e
        config = _read_json(path.parent / "tokenizer_config.json")
        template, source = dir_template(path.parent, config)
        return cls(tok, _content(config.get("bos_token")), _content(config.get("eos_token")), template, source)

    @classmethod
    def from_gguf(cls, path: Path, meta: dict | None = None) -> "Tokenizer":
        from dgrun.gguf_file import read_metadata
        from dgrun.gguf_tokenizer import from_metadata

        meta = read_metadata(path) if meta is None else meta
        try:
            tok = from_metadata(meta)
        except DgrunError as e:
            raise DgrunError(f"{path}: {e}") from None
        tokens = meta["tokenizer.ggml.tokens"]
        text = lambda key: tokens[meta[key]] if 0 <= meta.get(key, -1) < len(tokens) else None  # noqa: E731
        template = meta.get("tokenizer.chat_template")
        return cls(tok, text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"), template,
                   f"{path.name} (tokenizer.chat_template)" if template else None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As the tokenizer.json says (e.g. <bos> first) unless add_special_tokens=False."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    def prefix_ids(self) -> list[int]:
        """What encode() puts before the text (Gemma: [<bos>]); chat templates usually write it themselves."""
        with_specials, plain = self.encode("a"), self.encode("a", add_special_tokens=False)
        n = len(with_specials) - len(plain)
        return with_specials[:n] if n > 0 and with_specials[n:n + len(plain)] == plain else []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DgrunError(f"{path}: cannot read JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _content(entry) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _default_template(value) -> str | None:
    """A template field is a string, or a list of {name, template} of which "default" is the one."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None


def dir_template(path: Path, config: dict) -> tuple[str | None, str | None]:
    """chat_template.jinja, then chat_template.json, then tokenizer_config.json (transformers' order)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    as_json = _default_template(_read_json(path / "chat_template.json").get("chat_template"))
    if as_json:
        return as_json, str(path / "chat_template.json")
    in_config = _default_template(config.get("chat_template"))
    if in_config:
        return in_config, str(path / "tokenizer_config.json")
    return None, None


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def find(path: Path) -> Tokenizer | None:
    """The tokenizer that sits with a checkpoint directory, or the one inside a GGUF's metadata, if any."""
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(path / "tokenizer.json")
    if is_gguf(path):
        from dgrun.gguf_file import read_metadata

        meta = read_metadata(path)
        if meta.get("tokenizer.ggml.tokens"):
            try:
                return Tokenizer.from_gguf(path, meta)
            except DgrunError as e:  # token ids still work: say why text does not
                print(f"dgrun: no tokenizer: {e}", file=sys.stderr)
    return None
