"""The tokenizer rebuilt from a GGUF's metadata encodes and decodes exactly like the tokenizer.json it came from.

The GGUFs are written by gguf-py's LlamaHfVocab / SpecialVocab as llama.cpp's Gemma 4 converter calls them
(tests/gemma_vocab.py), from Gemma-style BPEs trained here.
"""

import random

import pytest
from tokenizers import Tokenizer

from dgrun.errors import DgrunError
from dgrun.formats.gguf_file import read_metadata
from dgrun.gguf_tokenizer import tokenizer_json
from dgrun.tokenizer import find
from gemma_vocab import CORPUS, NOT_SPECIAL, PAST_BASE, SPECIAL, make_gemma_tokenizer, write_vocab_gguf

TEXTS = CORPUS + [
    "héllo wörld ✓ 🦄 日本語 ünïcödé",  # outside the trained alphabet: byte fallback
    "  leading and trailing  ", "a\n\n\nb\t\tc", "", " ", "x", "▁ already a metaspace", "Ġ Ġx ĠĠ",
    "<|turn>user\nhi<turn|>x<turn|><|channel>y<channel|><start_of_image>z[past_base]<bos><eos><pad>",
    "<0x41> is literal text, not a byte", "<|turn", "turn|>", "<|turn>model\n", "def add(a,b):return a+b",
]


@pytest.fixture(scope="module", params=["whole-text", "split-words"])
def pair(request, tmp_path_factory):
    """(source tokenizer.json, the GGUF written from it)."""
    path = make_gemma_tokenizer(tmp_path_factory.mktemp(request.param), split_words=request.param == "split-words")
    gguf = write_vocab_gguf(path, path / "vocab.gguf")
    return Tokenizer.from_file(str(path / "tokenizer.json")), gguf


def test_encode_matches_source(pair):
    src, gguf = pair
    tok = find(gguf)
    for text in TEXTS:
        assert tok.encode(text) == src.encode(text).ids, text
        assert tok.encode(text, add_special_tokens=False) == src.encode(text, add_special_tokens=False).ids, text
    assert tok.encode("hi")[0] == src.token_to_id("<bos>")  # no added space prefix, <bos> first
    assert tok.encode("hi", add_special_tokens=False) == src.encode("hi", add_special_tokens=False).ids


def test_decode_matches_source(pair):
    src, gguf = pair
    tok = find(gguf)
    rng = random.Random(0)
    n = src.get_vocab_size()
    samples = [src.encode(t).ids for t in TEXTS] + [[rng.randrange(n) for _ in range(rng.randrange(1, 20))]
                                                    for _ in range(300)]
    for ids in samples:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == src.decode(ids, skip_special_tokens=skip), ids


def test_round_trip_and_metadata(pair):
    src, gguf = pair
    tok = find(gguf)
    for text in TEXTS:
        if "▁" not in text:  # a literal ▁ decodes to a space, in Gemma's tokenizer.json too
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert (tok.bos_token, tok.eos_token) == ("<bos>", "<eos>")
    assert tok.chat_template and "<|turn>" in tok.chat_template
    assert tok.template_source.endswith("(tokenizer.chat_template)")
    for t in SPECIAL + NOT_SPECIAL + PAST_BASE:
        assert tok.token_id(t) == src.token_to_id(t)


def test_without_byte_tokens(tmp_path):
    """No <0xNN> tokens: no byte fallback, so unknown characters become <unk> as in the source."""
    path = make_gemma_tokenizer(tmp_path / "t", byte_tokens=False)
    src, tok = Tokenizer.from_file(str(path / "tokenizer.json")), find(write_vocab_gguf(path, tmp_path / "v.gguf"))
    for text in ["plain text", "ünïcödé 🦄", "hello\n\nworld"]:
        assert tok.encode(text) == src.encode(text).ids


def test_unused_padding_and_bad_metadata(pair):
    src, gguf = pair
    meta = read_metadata(gguf)
    padded = dict(meta, **{"tokenizer.ggml.tokens": meta["tokenizer.ggml.tokens"] + ["[PAD999]"],
                           "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"] + [5]})
    assert "[PAD999]" not in tokenizer_json(padded)  # UNUSED rows decode to nothing, as ids no tokenizer.json has
    for bad, needle in [({"tokenizer.ggml.model": "llama"}, "not supported"),
                        ({"tokenizer.ggml.merges": None}, "missing"),
                        ({"tokenizer.ggml.token_type": [1]}, "token types"),
                        ({"tokenizer.ggml.merges": ["nospace"]}, "malformed merge")]:
        with pytest.raises(DgrunError, match=needle):
            tokenizer_json(dict(meta, **bad))


def test_metadata_reader_matches_gguf_py(pair):
    import gguf

    _, path = pair
    mine, ref = read_metadata(path), gguf.GGUFReader(path)
    assert set(mine) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert mine[key] == field.contents(), key


def test_dgrun_convert_keeps_the_tokenizer(gguf_chat, ckpt_chat):
    """`dgrun convert` writes the same keys; a Metaspace-split BPE without byte tokens also comes back exact."""
    src, tok = find(ckpt_chat), find(gguf_chat)
    texts = TEXTS + ["<|turn>user\nhello world<turn|>\n<|turn>model\n"]
    for text in texts:
        assert tok.encode(text) == src.encode(text), text
    ids = src.encode(" ".join(texts))
    assert tok.decode(ids) == src.decode(ids) and tok.chat_template == src.chat_template
