"""Train dgrun's embedded default model: a tiny DiffusionGemma on the Python standard library's source.

    python -m dgrun.models.train_tiny --out /tmp/tiny-dg --bf16      # then: dgrun convert /tmp/tiny-dg --to gguf-q8

The model is transformers' reference `DiffusionGemmaForBlockDiffusion` (dev extra), so its architecture is
exactly DiffusionGemma's. The data are units of the standard library (without its tests): every function and
method and every short class, each `<bos> code <eos>`, plus a chat turn per documented function (the
docstring's first paragraph asks in Gemma 4's turn format, the code answers, ending `<turn|>`).

The objective matches how the model generates: the clean prefix goes through the causal encoder into the KV
cache; the canvas is the next block with uniform-state corruption at a random rate; cross-entropy on every
canvas position (<pad> after the unit's end, so the model learns to stop); on a random half of the batches a
no-grad first pass feeds its logits (divided by a temperature drawn from the sampler's range) as
self-conditioning to a second pass.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sysconfig
import textwrap
import time
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]  # Gemma's first ids, then its turn markers

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
             sliding_window=64, num_experts=8, top_k_experts=2, moe_intermediate_size=256,
             pad_token_id=0, eos_token_id=1, bos_token_id=2)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8)
CANVAS = 32
# The sampler defaults the model ships with: the reference's, but for a cooler temperature schedule (0.1 -> 0.3
# instead of 0.4 -> 0.8): eval_tiny's sweep found it stops after ~11 steps instead of ~28, for some syntax (card).
GENERATION = {"max_denoising_steps": 32, "t_min": 0.1, "t_max": 0.3, "sampler_config": {"entropy_bound": 0.1},
              "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1, 5], "pad_token_id": 0}
PAD, EOS_TEXT = 0, "<eos>"


def corpus_files() -> tuple[list[Path], list[Path]]:
    """This interpreter's standard library source (PSF license) without its tests; every 10th file held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    held = set(files[::10])
    return [f for f in files if f not in held], sorted(held)


def code_units(path: Path) -> list[str]:
    """Every function and method (decorators included, dedented) and every class of at most 60 lines; and
    for each function with a docstring, a chat turn: its docstring's first paragraph asks, the code answers."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    units = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno < 60):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            code = textwrap.dedent("".join(lines[start:node.end_lineno]))
            units.append(code + EOS_TEXT)
            doc = ast.get_docstring(node) if not isinstance(node, ast.ClassDef) else None
            if doc and doc.split("\n\n")[0].strip():
                ask = " ".join(doc.split("\n\n")[0].split())
                units.append(f"<|turn>user\n{ask}<turn|>\n<|turn>model\n{code.strip()}<turn|>")
    return units


def train_tokenizer(files: list[Path], vocab_size: int, out: Path):
    """A byte-fallback BPE in Gemma's style (▁ for spaces, <0xNN> byte tokens, no added prefix space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + byte_tokens,
                                  limit_alphabet=200, show_progress=False)
    tok.train([str(f) for f in files], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(out / "tokenizer.json"))
    from dgrun.chat_template import GEMMA4

    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "chat_template": GEMMA4}, indent=1))
    return tok


def encode_units(tok, files: list[Path], limit: int = 512) -> list[torch.Tensor]:
    """<bos> unit per unit (each ends with <eos> or <turn|>), the longest cut at `limit` tokens."""
    units = [u for f in files for u in code_units(f)]
    return [torch.tensor(e.ids[:limit]) for e in tok.encode_batch(units)]


def batch(units: list[torch.Tensor], size: int, prefix: int, gen: torch.Generator):
    """`size` rows of (prefix, canvas). The canvas is the next CANVAS tokens of a unit, <pad> after its end.
    Half the rows start at the unit's <bos>, as a prompt does; the others cut it at a random point."""
    rows = []
    while len(rows) < size:
        unit = units[torch.randint(len(units), (), generator=gen)]
        if len(unit) <= prefix:
            continue
        at_start = torch.rand((), generator=gen) < 0.5
        cut = prefix if at_start else int(torch.randint(prefix, len(unit), (), generator=gen))
        canvas = unit[cut:cut + CANVAS]
        rows.append(torch.cat([unit[cut - prefix:cut], canvas, torch.full((CANVAS - len(canvas),), PAD)]))
    rows = torch.stack(rows)
    return rows[:, :prefix], rows[:, prefix:]


def corrupt(clean: torch.Tensor, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform-state noise: each canvas token becomes a uniform random token with a per-row random rate."""
    rate = torch.rand(clean.shape[0], 1, generator=gen)
    noise = torch.randint(0, vocab, clean.shape, generator=gen)
    return torch.where(torch.rand(clean.shape, generator=gen) < rate, noise, clean)


def canvas_loss(model, prefix, canvas_in, target, self_cond: bool, gen: torch.Generator):
    from transformers import DynamicCache

    def forward(sc):
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        return model(input_ids=prefix, decoder_input_ids=canvas_in, past_key_values=cache,
                     self_conditioning_logits=sc).logits

    sc = None
    if self_cond:
        with torch.no_grad():
            temperature = 0.4 + 0.4 * torch.rand((), generator=gen).item()  # the reference sampler's t_min..t_max
            sc = forward(None) / temperature
    logits = forward(sc)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@torch.no_grad()
def held_out_loss(model, units, seed: int = 1234, batches: int = 8) -> float:
    """Canvas cross-entropy on held-out units, same batches every time (prefix lengths 1..64)."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    for prefix_len in torch.linspace(1, 64, batches).long().tolist():
        prefix, clean = batch(units, 32, prefix_len, gen)
        losses.append(canvas_loss(model, prefix, corrupt(clean, MODEL["vocab_size"], gen), clean, False, gen).item())
    model.train()
    return sum(losses) / len(losses)


def main():
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)

    train_files, held_files = corpus_files()
    tok = train_tokenizer(train_files, MODEL["vocab_size"], a.out)
    train, held = encode_units(tok, train_files), encode_units(tok, held_files)
    root = Path(sysconfig.get_paths()["stdlib"])
    names = "\n".join(str(f.relative_to(root)) for f in train_files + held_files)
    cfg = DiffusionGemmaConfig(text_config=dict(MODEL), vision_config=dict(VISION), canvas_length=CANVAS)
    model = DiffusionGemmaForBlockDiffusion(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(a.seed)
    log = {"command": f"python -m dgrun.models.train_tiny --out OUT --steps {a.steps} --batch {a.batch} "
                      f"--lr {a.lr} --seed {a.seed}" + (" --bf16" if a.bf16 else ""),
           "device": "cpu", "threads": a.threads,
           "data": {"stdlib": str(root), "train_files": len(train_files), "held_out_files": len(held_files),
                    "file_list_sha256": hashlib.sha256(names.encode()).hexdigest()[:16],
                    "train_units": len(train), "train_tokens": sum(map(len, train)),
                    "held_out_units": len(held), "held_out_tokens": sum(map(len, held))},
           "params": sum(p.numel() for n, p in model.named_parameters() if "vision" not in n), "curve": []}
    print(json.dumps(log), flush=True)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / a.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        prefix, clean = batch(train, a.batch, int(torch.randint(1, 65, (), generator=gen)), gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = canvas_loss(model, prefix, corrupt(clean, MODEL["vocab_size"], gen), clean,
                               bool(torch.rand((), generator=gen) < 0.5), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            point = {"step": step, "train_loss": round(loss.item(), 4),
                     "held_out_loss": round(held_out_loss(model, held), 4), "seconds": round(time.time() - t0, 1)}
            log["curve"].append(point)
            print(json.dumps(point), flush=True)
            model.save_pretrained(a.out)
            (a.out / "generation_config.json").write_text(json.dumps(GENERATION))  # the sampler's, not HF's
            log["wall_seconds"] = round(time.time() - t0, 1)
            (a.out / "training_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
