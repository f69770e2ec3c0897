"""tokenizer.* metadata from an HF directory, as llama.cpp's Gemma4 converter writes it (model "gemma4").

Tokens come from tokenizer.json; their types follow gguf-py's LlamaHfVocab (BYTE for <0xNN>, CONTROL for the
tokenizer's special tokens, USER_DEFINED for other added tokens) plus Gemma4's always-visible tokens. Merges,
special ids, add_* flags and the chat template come from gguf-py's SpecialVocab, which the converter uses.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import gguf
from gguf import GGUFValueType as VT, TokenType

from dgrun.convert.metadata import Metadata
from dgrun.errors import DgrunError
from dgrun.jsonfile import read_json
from dgrun.tokenizer import special_text

# Gemma4 always renders these so chat parsers can see them (conversion/gemma.py, set_vocab).
VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
           '<|"|>'}
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
           "pad": "padding_token_id", "mask": "mask_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read(path: Path) -> dict:
    return read_json(path, missing={})


def special_texts(path: Path) -> set[str]:
    """transformers' all_special_tokens: the named special tokens plus the additional/extra ones."""
    out = set()
    for cfg in (_read(path / "special_tokens_map.json"), _read(path / "tokenizer_config.json")):
        for key in SPECIAL_KEYS:
            if (text := special_text(cfg.get(key))) is not None:
                out.add(text)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = cfg.get(key) or []
            for entry in (extra.values() if isinstance(extra, dict) else extra):
                if (text := special_text(entry)) is not None:
                    out.add(text)
    return out


def token_list(tok: dict, special: set[str]) -> tuple[list[str], list[int]]:
    """Token texts by id and their gguf TokenType (ids must run 0..n-1 without gaps)."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise DgrunError(f"tokenizer.json: model type {model.get('type')!r} is not BPE, which gemma4 GGUFs need")
    texts = {int(i): t for t, i in model.get("vocab", {}).items()}
    n_base = len(texts)
    for added in tok.get("added_tokens") or []:
        texts[int(added["id"])] = added["content"]
    if sorted(texts) != list(range(len(texts))):
        raise DgrunError("tokenizer.json: token ids are not contiguous from 0")
    tokens, types = [], []
    for i in range(len(texts)):
        text = texts[i]
        if i >= n_base:  # added past the base vocab: special or user-defined, never BYTE
            kind = TokenType.CONTROL if text in special else TokenType.USER_DEFINED
        elif BYTE_TOKEN.fullmatch(text):
            kind = TokenType.BYTE
        else:
            kind = TokenType.CONTROL if text in special else TokenType.NORMAL
        if text in VISIBLE:
            kind = TokenType.USER_DEFINED
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def tokenizer_metadata(path: Path, vocab_size: int) -> Metadata | None:
    """The tokenizer keys, or None when the directory has no tokenizer.json."""
    if not (path / "tokenizer.json").is_file():
        return None
    tokens, types = token_list(_read(path / "tokenizer.json"), special_texts(path))
    if len(tokens) > vocab_size:
        raise DgrunError(f"tokenizer.json has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    # llama.cpp trims token_embd to the tokenizer instead; padding the list keeps the logits' shape.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    quiet = logging.getLogger("gguf")
    level, quiet.level = quiet.level, logging.ERROR  # SpecialVocab logs warnings about odd templates
    try:
        sv = gguf.SpecialVocab(path, load_merges=True)
    except (ValueError, OSError) as e:
        raise DgrunError(f"{path}: cannot read the tokenizer's special tokens ({e})") from e
    finally:
        quiet.level = level
    m = Metadata()
    m.str("tokenizer.ggml.model", "gemma4")
    m.array("tokenizer.ggml.tokens", tokens, VT.STRING)
    m.array("tokenizer.ggml.scores", [-1000.0] * len(tokens), VT.FLOAT32)  # LlamaHfVocab's placeholder score
    m.array("tokenizer.ggml.token_type", types, VT.INT32)
    if sv.merges:
        m.array("tokenizer.ggml.merges", sv.merges, VT.STRING)
    for typ, tid in sv.special_token_ids.items():
        if typ in ID_KEYS:
            m.u32(f"tokenizer.ggml.{ID_KEYS[typ]}", tid)
    for typ, value in sv.add_special_token.items():
        m.bool(f"tokenizer.ggml.add_{typ}_token", value)
    chat_template(m, sv.chat_template)
    m.bool("tokenizer.ggml.add_space_prefix", False)
    m.bool("tokenizer.ggml.add_bos_token", True)  # Gemma4 always adds <bos>
    return m


def chat_template(m: Metadata, value) -> None:
    """One template as tokenizer.chat_template; named ones as tokenizer.chat_template.NAME (GGUFWriter's rule)."""
    if value is None:
        return
    if isinstance(value, str):
        if value:
            m.str("tokenizer.chat_template", value)
        return
    names = []
    for choice in value:
        name = re.sub(r"[^A-Za-z0-9]", "_", choice.get("name", ""))
        if name and choice.get("template") is not None:
            if name == "default":
                m.str("tokenizer.chat_template", choice["template"])
            else:
                names.append(name)
                m.str(f"tokenizer.chat_template.{name}", choice["template"])
    if names:
        m.array("tokenizer.chat_templates", names, VT.STRING)
