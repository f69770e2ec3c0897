"""Text <-> ids with the `tokenizers` library, from a checkpoint's tokenizer.json or a GGUF's metadata.

The tokenizer also carries the chat template found next to it (tokenizer.chat_template in a GGUF;
chat_template.jinja, chat_template.json or tokenizer_config.json in a directory), as HF tokenizers do.
A tokenizer is checked when it is loaded: it must encode and decode a probe string, and its ids must fit the
model's vocab; a library failure later (the Rust side can panic) is still one DgrunError.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dgrun import checks
from dgrun.errors import DgrunError
from dgrun.jsonfile import read_json

PROBE = "Hello, world! 0123 <bos> \n\tdef f(x):\n    return x  # ünïcödé ✓ 日本"
MAX_TEMPLATE_BYTES = 1 << 20


def guarded(what: str, call, *args, **kwargs):
    """Run a `tokenizers` call; any failure, a Rust panic included (a BaseException), becomes a DgrunError."""
    try:
        return call(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001  (pyo3's PanicException derives from BaseException)
        raise DgrunError(f"{what} ({checks.reason(e)})") from None


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
    def from_file(cls, path: Path, vocab_size: int | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        tok = guarded(f"{path}: cannot read tokenizer", HFTokenizer.from_file, str(path))
        config = read_json(path.parent / "tokenizer_config.json", missing={})
        template, source = dir_template(path.parent, config)
        out = cls(tok, special_text(config.get("bos_token")), special_text(config.get("eos_token")), template, source)
        return out.checked(str(path), vocab_size)

    @classmethod
    def from_gguf(cls, reader, vocab_size: int | None = None) -> "Tokenizer":
        """From a parsed GGUF (dgrun.formats.gguf_file.GGUFFile): its tokenizer.* keys."""
        from dgrun.gguf_tokenizer import from_metadata

        path = reader.path
        meta = {k: f.value for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        try:
            tok = from_metadata(meta)
        except DgrunError as e:
            raise DgrunError(f"{path}: {e}") from None
        tokens = meta["tokenizer.ggml.tokens"]

        def text(key):
            tid = meta.get(key)
            ok = isinstance(tid, int) and 0 <= tid < len(tokens) and isinstance(tokens[tid], str)
            return tokens[tid] if ok else None

        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise DgrunError(f"{path}: tokenizer.chat_template is not UTF-8 text")
        out = cls(tok, text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"), template,
                  f"{path.name} (tokenizer.chat_template)" if template else None)
        return out.checked(str(path), vocab_size)

    def checked(self, source: str, vocab_size: int | None) -> "Tokenizer":
        """Refuse, at load, a tokenizer that cannot round-trip a probe or whose ids exceed the model's vocab."""
        ids = guarded(f"{source}: the tokenizer cannot encode a probe string", self.encode, PROBE)
        guarded(f"{source}: the tokenizer cannot decode a probe string", self.decode, ids)
        if vocab_size is not None:
            top = max(guarded(f"{source}: cannot read the tokenizer's vocab", self.tok.get_vocab, True).values(),
                      default=-1)
            if top >= vocab_size:
                raise DgrunError(f"{source}: the tokenizer has id {top}, past the model's vocab of {vocab_size}")
        return self

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As the tokenizer.json says (e.g. <bos> first) unless add_special_tokens=False."""
        enc = guarded("the tokenizer failed to encode this text", self.tok.encode, text,
                      add_special_tokens=add_special_tokens)
        return enc.ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return guarded("the tokenizer failed to decode these ids", self.tok.decode, list(ids),
                       skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    def prefix_ids(self) -> list[int]:
        """What encode() puts before the text (Gemma: [<bos>]); chat templates usually write it themselves."""
        with_specials, plain = self.encode("a"), self.encode("a", add_special_tokens=False)
        n = len(with_specials) - len(plain)
        return with_specials[:n] if n > 0 and with_specials[n:n + len(plain)] == plain else []


def special_text(entry) -> str | None:
    """A special token as tokenizer_config.json writes it: "<bos>" or {"content": "<bos>", ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _default_template(value) -> str | None:
    """A template field is a string, or a list of {name, template} of which "default" is the one."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") if isinstance(named.get("default"), str) else None
    return None


def dir_template(path: Path, config: dict) -> tuple[str | None, str | None]:
    """chat_template.jinja, then chat_template.json, then tokenizer_config.json (transformers' order)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return read_template(jinja), str(jinja)
    as_json = _default_template(read_json(path / "chat_template.json", missing={}).get("chat_template"))
    if as_json:
        return as_json, str(path / "chat_template.json")
    in_config = _default_template(config.get("chat_template"))
    if in_config:
        return in_config, str(path / "tokenizer_config.json")
    return None, None


def read_template(path: Path) -> str:
    """A template file: UTF-8 text of a bounded size."""
    try:
        size = path.stat().st_size
        if size > MAX_TEMPLATE_BYTES:
            raise DgrunError(f"{path}: {size} bytes is too large for a chat template (limit {MAX_TEMPLATE_BYTES})")
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DgrunError(f"{path}: cannot read the chat template ({checks.reason(e)})") from None


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def from_dir(path: Path, vocab_size: int | None = None) -> Tokenizer | None:
    """The tokenizer.json of a checkpoint directory (with its config and template), if there is one."""
    return Tokenizer.from_file(path / "tokenizer.json", vocab_size) if (path / "tokenizer.json").is_file() else None


def from_gguf_or_none(reader, vocab_size: int | None = None) -> Tokenizer | None:
    """The tokenizer in a parsed GGUF's metadata, or None when it has none or an unusable one."""
    if not reader.get("tokenizer.ggml.tokens"):
        return None
    try:
        return Tokenizer.from_gguf(reader, vocab_size)
    except DgrunError as e:  # token ids still work: say why text does not
        print(f"dgrun: no tokenizer: {e}", file=sys.stderr)
        return None


def find(path: Path, vocab_size: int | None = None) -> Tokenizer | None:
    """The tokenizer that sits with a checkpoint directory, or the one inside a GGUF's metadata, if any."""
    path = Path(path)
    if path.is_dir():
        return from_dir(path, vocab_size)
    if is_gguf(path):
        from dgrun.formats.gguf_file import GGUFFile

        return from_gguf_or_none(GGUFFile(path), vocab_size)
    return None
