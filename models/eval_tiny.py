"""Measure the embedded model for its card: held-out loss per precision, early stopping, Python validity,
completions, infills, and bf16 / Q8_0 / Q4_K_M agreement.

    python -m dgrun.models.eval_tiny --out /tmp/tiny-eval                    # the shipped file; writes evidence.json
    python -m dgrun.models.eval_tiny --ckpt /tmp/tiny-dg --out /tmp/tiny-eval   # bf16 / Q8_0 / Q4_K_M from training

Prompts come from held-out stdlib files (train_tiny's split), so nothing here was trained on. Everything
runs through dgrun itself (cpu backend, float32 compute) on GGUFs converted from the checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import tokenize
from pathlib import Path

import torch

from dgrun.models.train_tiny import CANVAS, batch, code_units, corpus_files, corrupt

QUANTS = {"bf16": "gguf-bf16", "Q8_0": "gguf-q8", "Q4_K_M": "gguf-q4"}


def held_out_prompts(n: int) -> tuple[list[str], list[str]]:
    """(code prompts, chat questions) from held-out functions: each function's first line; its docstring's
    first paragraph."""
    code, asks = [], []
    for f in corpus_files()[1]:
        for unit in code_units(f):
            if unit.startswith("<|turn>user\n"):
                asks.append(unit.split("\n", 1)[1].split("<turn|>")[0])
            elif unit.startswith("def ") and "\n" in unit:
                code.append(unit.split("\n", 1)[0] + "\n")
    step_c, step_a = max(1, len(code) // n), max(1, len(asks) // n)
    return code[::step_c][:n], asks[::step_a][:n]


def python_token_validity(text: str) -> float:
    """Share of Python tokens that are not ERRORTOKEN, up to where the tokenizer gives up (an unclosed
    bracket or string at the end of a cut completion is not counted against it)."""
    good = bad = 0
    try:
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.ERRORTOKEN and not t.string.isspace():
                bad += 1
            elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENDMARKER):
                good += 1
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return good / max(1, good + bad)


def parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


def closes(text: str) -> bool:
    """text parses as it is, or once a `pass` closes a block it leaves open."""
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    indent = len(last) - len(last.lstrip())
    return any(parses(text + tail) for tail in ("", "\n" + " " * (indent + 4) + "pass", "\n" + " " * indent + "pass"))


def syntax_share(prompt: str, completion: str) -> float:
    """Share of the completion's lines inside the longest run of lines (from the top, prompt included) that
    parses once closed: random tokens score about 0, code that stays valid to its end scores 1."""
    lines = (prompt + completion).split("\n")
    first = prompt.count("\n")
    new = len(lines) - first
    for k in range(len(lines), first, -1):
        if closes("\n".join(lines[:k])):
            return (k - first) / new
    return 0.0


def shuffled(path):
    """The model in `path` with every weight tensor's values shuffled: a random-weights baseline with the
    same tokenizer and value statistics."""
    import dgrun

    m = dgrun.load(path, backend="cpu")
    gen = torch.Generator().manual_seed(0)
    for w in m.backend.w.values():
        w.copy_(w.flatten()[torch.randperm(w.numel(), generator=gen)].view(w.shape))
    return m


@torch.no_grad()
def held_out_loss(m, units, samples: int = 96, seed: int = 1234) -> tuple[float, float]:
    """(canvas cross-entropy, argmax accuracy) of one denoising pass on corrupted held-out canvases."""
    gen = torch.Generator().manual_seed(seed)
    losses, hits = [], []
    for k in range(samples):
        prefix, clean = batch(units, 1, 1 + k % 64, gen)
        noisy = corrupt(clean, m.args.vocab_size, gen)
        cache = m.new_cache()
        m.encode(prefix[0].tolist(), cache)
        logits = m.denoise(noisy[0].tolist(), cache)
        losses.append(torch.nn.functional.cross_entropy(logits, clean[0]).item())
        hits.append((logits.argmax(-1) == clean[0]).float().mean().item())
    return sum(losses) / samples, sum(hits) / samples


def chat_ids(m, ask: str) -> list[int]:
    """One user turn in the file's chat template, ready for the model's answer."""
    from dgrun.chat_template import choose

    text = choose(m.tokenizer).render([{"role": "user", "content": ask}], True, bos_token="<bos>")
    return m.tokenizer.encode(text, add_special_tokens=False)


def completions(m, prompts: list[str], chat: bool, max_new_tokens: int, seed: int, **knobs) -> list[dict]:
    out = []
    for p in prompts:
        ids = chat_ids(m, p) if chat else m.tokenizer.encode(p)
        r = m.generate(ids, max_new_tokens=max_new_tokens, seed=seed, stop_ids=[5] if chat else (), **knobs)
        code = r.text if chat else p + r.text
        out.append({"prompt": p, "text": r.text, "ids": r.ids, "steps": r.stats.steps_per_block,
                    "tokens_per_forward": r.stats.tokens_per_forward,
                    "valid_tokens": python_token_validity(code), "syntax": syntax_share("" if chat else p, r.text),
                    "parses": parses(code)})
    return out


SWEEP = [  # temperature schedules (t_min, t_max) tried against the file's own defaults
    dict(t_min=0.4, t_max=0.8), dict(t_min=0.3, t_max=0.6), dict(t_min=0.2, t_max=0.5), dict(t_min=0.1, t_max=0.3)]

INFILLS = [  # (prefix, suffix): code the model has not seen verbatim; the gap is one line or two
    ("def is_even(n):\n    ", "\n\n\ndef is_odd(n):\n    return not is_even(n)\n"),
    ("def read_lines(path):\n    with open(path) as f:\n        ", "\n    return lines\n"),
    ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        ", "\n\n    def norm(self):\n"),
    ("def mean(values):\n    total = 0\n    for v in values:\n        ", "\n    return total / len(values)\n"),
]


def summary(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    return {"avg_steps_per_block": sum(steps) / len(steps), "blocks": len(steps),
            "blocks_under_max": sum(s < 32 for s in steps) / len(steps),
            "tokens_per_forward": sum(r["tokens_per_forward"] for r in runs) / len(runs),
            "valid_python_tokens": sum(r["valid_tokens"] for r in runs) / len(runs),
            "syntax_valid_lines": sum(r["syntax"] for r in runs) / len(runs),
            "parses": sum(r["parses"] for r in runs) / len(runs)}


def agreement(a: list[dict], b: list[dict]) -> float:
    """Share of generated token positions where two precisions produced the same token."""
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x["ids"]), len(y["ids"]))
        same += sum(p == q for p, q in zip(x["ids"], y["ids"]))
        total += n
    return same / max(1, total)


def main():
    import shutil

    import dgrun
    from dgrun.convert.convert import convert
    from dgrun.models import DEFAULT_MODEL
    from dgrun.models.train_tiny import encode_units

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", type=Path, help="train_tiny's output directory: compare bf16, Q8_0 and Q4_K_M "
                                              "made from it (default: the shipped Q8_0 file and a Q4_K_M made from it)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.ckpt is None:
        shutil.copyfile(DEFAULT_MODEL, a.out / "tiny-stdlib-Q8_0.gguf")
    labels = list(QUANTS) if a.ckpt else ["Q8_0", "Q4_K_M"]
    code_prompts, asks = held_out_prompts(a.prompts)
    evidence = {"source": str(a.ckpt or DEFAULT_MODEL), "prompts": {"code": code_prompts, "chat": asks},
                "by_precision": {}}
    runs = {}
    for label in labels:
        path = a.out / f"tiny-stdlib-{label}.gguf"
        if not path.exists():
            convert(a.ckpt or a.out / "tiny-stdlib-Q8_0.gguf", QUANTS[label], path)
        m = dgrun.load(path, backend="cpu")
        units = encode_units(m.tokenizer.tok, corpus_files()[1])
        loss, accuracy = held_out_loss(m, units)
        code = completions(m, code_prompts, False, 64, a.seed)
        chat = completions(m, asks, True, 96, a.seed)
        infill = []
        for prefix, suffix in INFILLS:
            r = m.infill(prefix, suffix, seed=a.seed)
            infill.append({"prefix": prefix, "suffix": suffix, "fill": r.text, "steps": r.stats.steps_per_block,
                           "closes": closes(prefix + r.text + suffix)})
        runs[label] = code + chat
        evidence["by_precision"][label] = {
            "file_mb": round(path.stat().st_size / 2**20, 2), "held_out_loss": loss, "held_out_accuracy": accuracy,
            "code": summary(code), "chat": summary(chat), "all": summary(code + chat),
            "examples": {"code": code[:6], "chat": chat[:4], "infill": infill}}
        print(label, json.dumps({k: v for k, v in evidence["by_precision"][label].items() if k != "examples"}),
              flush=True)
    m = dgrun.load(a.out / f"tiny-stdlib-{labels[0]}.gguf", backend="cpu")
    evidence["sampler_sweep"] = []
    for knobs in SWEEP:  # why the file's temperature defaults are what they are
        point = dict(knobs, **summary(completions(m, code_prompts, False, 64, a.seed, **knobs)
                                      + completions(m, asks, True, 96, a.seed, **knobs)))
        evidence["sampler_sweep"].append(point)
        print("sweep", json.dumps(point), flush=True)
    base = shuffled(a.out / f"tiny-stdlib-{labels[0]}.gguf")
    evidence["shuffled_baseline"] = summary(completions(base, code_prompts, False, 64, a.seed)
                                            + completions(base, asks, True, 96, a.seed))
    print("shuffled", json.dumps(evidence["shuffled_baseline"]), flush=True)
    evidence[f"token_agreement_with_{labels[0]}"] = {q: agreement(runs[labels[0]], runs[q]) for q in labels[1:]}
    (a.out / "evidence.json").write_text(json.dumps(evidence, indent=1))
    print(json.dumps(evidence[f"token_agreement_with_{labels[0]}"]))


if __name__ == "__main__":
    main()
