"""Text <-> ids with the `tokenizers` library, from a checkpoint's tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from dgrun.errors import DgrunError


class Tokenizer:
    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def from_file(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise DgrunError(f"{path}: cannot read tokenizer ({e})") from e

    def encode(self, text: str) -> list[int]:
        """As the tokenizer.json says, special tokens (e.g. <bos>) included."""
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def find(path: Path) -> Tokenizer | None:
    """The tokenizer that sits with a checkpoint directory, if any."""
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(path / "tokenizer.json")
    return None
