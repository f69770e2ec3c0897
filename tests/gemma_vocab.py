"""Gemma-style tiny tokenizers, and GGUF tokenizer metadata written the way llama.cpp's converter writes it.

The tokenizers copy Gemma 4's tokenizer.json layout: a byte_fallback BPE whose vocab starts with the
special tokens and the 256 <0xNN> byte tokens, a normalizer that turns spaces into "▁", no added space
prefix, a ByteFallback decoder and a <bos> post-processor. `write_vocab_gguf` runs gguf-py's own
LlamaHfVocab and SpecialVocab (transformers loads the tokenizer) exactly as conversion/gemma.py's
Gemma4Model.set_vocab does, so the GGUF does not come from dgrun's code.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n\n",
    "import os\nimport sys\n\nclass Box:\n    pass\n",
    "The quick brown fox jumps over the lazy dog.  Two  spaces.",
    "hello world, hello dgrun\tand tabs",
    "<|turn>user\nhi there<turn|>\n<|turn>model\nhello!<turn|>\n",
]
# In the base vocab, as Gemma's are. The converter types them CONTROL only when transformers lists them as
# special (tokenizer_config.json), so <turn|> ends up NORMAL; Gemma 4 forces <|channel> to USER_DEFINED.
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
LISTED = ["<|turn>", "<|channel>", "<channel|>"]  # tokenizer_config.json additional_special_tokens
NOT_SPECIAL = ["<start_of_image>"]  # an added token marked special=False: NORMAL in the GGUF
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PAST_BASE = ["[past_base]"]  # an added token past the base vocab: USER_DEFINED (LlamaHfVocab's added_tokens)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<turn|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")


def train(split_words: bool, vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Trained tokens and merges. Gemma merges across "▁" (whitespace runs); split_words keeps words apart."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "▁")
    if split_words:
        tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return tokens, [tuple(m) for m in model["merges"]]


def make_gemma_tokenizer(path: Path, split_words: bool = False, byte_tokens: bool = True,
                         vocab_size: int = 400) -> Path:
    """tokenizer.json + tokenizer_config.json (+ the chat template) in `path`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    path.mkdir(parents=True, exist_ok=True)
    trained, merges = train(split_words, vocab_size)
    head = SPECIAL + NOT_SPECIAL + (BYTES if byte_tokens else [])
    tokens = head + [t for t in trained if t not in head]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # as Gemma's: a no-op after "▁"
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in NOT_SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in PAST_BASE])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(path / "tokenizer.json"))
    config = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                  mask_token="<mask>", additional_special_tokens=LISTED, add_bos_token=True,
                  add_eos_token=False, chat_template=TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def write_vocab_gguf(src: Path, out: Path, arch: str = "diffusion-gemma") -> Path:
    """The tokenizer.* keys as conversion/gemma.py Gemma4Model.set_vocab writes them (no tensors)."""
    import gguf

    vocab = gguf.LlamaHfVocab(src)
    visible = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
               "<tool_response|>", '<|"|>'}
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in visible else kind)
    w = gguf.GGUFWriter(out, arch)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True).add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
