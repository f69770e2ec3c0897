"""Rebuild a `tokenizers` object from the tokenizer.* metadata that llama.cpp's Gemma 4 converter writes.

A "gemma4" GGUF keeps the vocab, token types, merges and special ids, but not the pipeline around the BPE;
that pipeline is Gemma 4's tokenizer.json: spaces become "▁" (no added prefix), one BPE pass over the whole
text with <0xNN> byte fallback, and a decoder that undoes both. What the converter drops is recovered here:
- which tokens were added tokens (matched whole before BPE): CONTROL, USER_DEFINED and UNKNOWN ones, plus
  NORMAL ones no merge can build, which only an added token can be;
- which are special: CONTROL ones, and Gemma's <|name> / <name|> markup that the converter may leave
  NORMAL or USER_DEFINED (llama.cpp re-tags <turn|> and <|tool_response> as CONTROL at load the same way).
"""

from __future__ import annotations

import json
import re

from dgrun.errors import DgrunError

# gguf TokenType values (gguf-py constants.py).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MARKUP = re.compile(r"<\|[^<>\s]*>|<[^<>\s|]*\|>")  # <|turn>, <turn|>, <|"|>, <|image|>
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # ▁


def split_merge(merge: str, vocab: dict) -> tuple[str, str]:
    """'a b' -> ('a', 'b'). The converter writes a space inside a part as 'Ġ' (U+0120); undo it only
    where the vocab says so, since Ġ is also a real letter."""
    pos = merge.find(" ", 1)  # llama.cpp's rule: a part may itself start with a space
    if pos < 0:
        raise DgrunError(f"GGUF tokenizer: malformed merge {merge!r}")
    parts = [merge[:pos], merge[pos + 1:]]
    for i, part in enumerate(parts):
        if part not in vocab and "\u0120" in part and part.replace("\u0120", " ") in vocab:
            parts[i] = part.replace("\u0120", " ")
    return parts[0], parts[1]


def added_entries(tokens: list[str], types: list[int], merged: set[str]) -> list[dict]:
    out = []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        unreachable = kind == NORMAL and len(text) > 1 and text not in merged
        if kind in (CONTROL, USER_DEFINED, UNKNOWN) or unreachable:
            special = kind in (CONTROL, UNKNOWN) or bool(MARKUP.fullmatch(text))
            out.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": special})
    return out


def post_processor(meta: dict, tokens: list[str]) -> dict | None:
    """<bos> $A (Gemma 4: the converter forces add_bos_token), plus <eos> when add_eos_token is set."""
    def special(flag: str, key: str):
        tid = meta.get(key)
        return (tokens[tid], tid) if meta.get(flag) and tid is not None and 0 <= tid < len(tokens) else None

    bos = special("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id")
    eos = special("tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id")
    if bos is None and eos is None:
        return None
    item = lambda t: [{"SpecialToken": {"id": t[0], "type_id": 0}}] if t else []  # noqa: E731
    seq = lambda name, type_id: [{"Sequence": {"id": name, "type_id": type_id}}]  # noqa: E731
    return {"type": "TemplateProcessing",
            "single": item(bos) + seq("A", 0) + item(eos),
            "pair": item(bos) + seq("A", 0) + item(eos) + item(bos) + seq("B", 1) + item(eos),
            "special_tokens": {t[0]: {"id": t[0], "ids": [t[1]], "tokens": [t[0]]} for t in (bos, eos) if t}}


def tokenizer_json(meta: dict) -> str:
    """The tokenizer.json text equivalent to a gemma4 GGUF's metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gemma4":
        raise DgrunError(f"GGUF tokenizer model {model!r} is not supported (dgrun reads 'gemma4')")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise DgrunError("GGUF tokenizer: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens) if isinstance(tokens, list) else None
    for key, value, kind in (("tokens", tokens, str), ("merges", merges, str), ("token_type", types, int)):
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            raise DgrunError(f"GGUF tokenizer: tokenizer.ggml.{key} is not a list of "
                             f"{'UTF-8 strings' if kind is str else 'integers'}")
    if len(types) != len(tokens):
        raise DgrunError(f"GGUF tokenizer: {len(types)} token types for {len(tokens)} tokens")
    for key in ("bos", "eos", "unknown", "padding"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < len(tokens)):
            raise DgrunError(f"GGUF tokenizer: tokenizer.ggml.{key}_token_id = {tid!r} is not a token id")
    vocab = {}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        # A <0xNN> that is not a BYTE token was an added token: keep it out of the byte-fallback lookup.
        # UNUSED ids pad the list to the embedding's rows: no tokenizer.json has them, so they decode to "".
        if text not in vocab and kind != UNUSED and not (kind != BYTE and BYTE_TOKEN.fullmatch(text)):
            vocab[text] = i
    pairs = [split_merge(m, vocab) for m in merges]
    merged = {a + b for a, b in pairs}
    byte_fallback = BYTE in types
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_text = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": added_entries(tokens, types, merged),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        "pre_tokenizer": None,  # one BPE pass over the whole text, as Gemma 4's tokenizer.json does
        "post_processor": post_processor(meta, tokens),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            *([{"type": "ByteFallback"}] if byte_fallback else []),
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk_text, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": byte_fallback, "byte_fallback": byte_fallback,
                  "ignore_merges": False, "vocab": vocab, "merges": [list(p) for p in pairs]},
    }, ensure_ascii=False)


def from_metadata(meta: dict):
    """A tokenizers.Tokenizer for a gemma4 GGUF's metadata."""
    from tokenizers import Tokenizer

    text = tokenizer_json(meta)
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises a bare Exception on inconsistent input
        raise DgrunError(f"GGUF tokenizer: cannot rebuild it ({e})") from e
