"""Tiny DiffusionGemma checkpoints made with transformers (the reference), every weight randomised."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8)

# The real 5:1 sliding/full pattern, k_eq_v, global_head_dim != head_dim, a window shorter than the prompts.
SHAPE_A = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
               sliding_window=8, num_experts=8, top_k_experts=2, moe_intermediate_size=32)
# Other MoE sizes and top-k, two full layers, the global kv heads left to default.
SHAPE_B = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=3, head_dim=8, global_head_dim=16, sliding_window=6, num_experts=6,
               top_k_experts=3, moe_intermediate_size=24,
               layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
# Rows of 256 (the K-quant super-block) where llama-quantize picks K-quants, and rows of 128 and 96 where it
# falls back (attn_output of sliding layers, ffn_down_exps), as the released 704-wide experts do.
SHAPE_K = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
               sliding_window=8, num_experts=4, top_k_experts=2, moe_intermediate_size=96)


def randomize(model, seed: int = 0) -> None:
    """Random values for every weight, norms and scalars included, so a misplaced one shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if "layer_scalar" in n]
        for name, t in tensors:
            if "vision" in name:
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")):
                t.copy_(1.0 + 0.2 * r.abs() * r.sign())
            else:
                t.copy_(0.08 * r)


def make_checkpoint(path: Path, shape: dict, canvas_length: int = 16, seed: int = 0, dtype=torch.float32,
                    generation: dict | None = None) -> Path:
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=dict(shape), vision_config=dict(VISION), canvas_length=canvas_length)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    randomize(model, seed)
    model.to(dtype).save_pretrained(path)
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def reference(path: Path, dtype=torch.float32, attn: str = "eager"):
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "import os\nimport sys\n\nclass Box:\n    pass\n",
    "The quick brown fox jumps over the lazy dog.",
    "hello world, hello dgrun",
]


def make_tokenizer(path: Path, vocab_size: int) -> Path:
    """A small BPE with <pad>=0, <eos>=1, <bos>=2, <unk>=3 (Gemma's first ids), at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  limit_alphabet=vocab_size // 2, show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(path / "tokenizer.json"))
    return path


# Gemma-style extras for the GGUF tokenizer tests: chat specials, an always-visible token, a byte token.
CHAT_TEMPLATE = "{% for m in messages %}<|turn>{{ m['role'] }}\n{{ m['content'] }}<turn|>\n{% endfor %}"
EXTRA_SPECIAL = ["<|turn>", "<turn|>"]
EXTRA_TOKENS = ["<|channel>", "<0x0A>"]


def make_chat_tokenizer(path: Path, vocab_size: int) -> Path:
    """make_tokenizer plus Gemma's turn markers, tokenizer_config.json and chat_template.jinja."""
    from tokenizers import Tokenizer

    make_tokenizer(path, vocab_size - len(EXTRA_SPECIAL) - len(EXTRA_TOKENS))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens(EXTRA_SPECIAL)
    tok.add_tokens(EXTRA_TOKENS)
    tok.save(str(path / "tokenizer.json"))
    config = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                  additional_special_tokens=["<|turn>", "<turn|>"], add_eos_token=False)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path
