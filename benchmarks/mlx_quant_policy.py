"""The `mlx-q4` mix (experts 4-bit, the rest 8-bit) against 4-bit everywhere, and mlx-q8, on one checkpoint.

Each variant is written by `convert_mlx` (so it is exactly what `dgrun convert --to mlx-*` produces) and run
on the mlx backend in float32, so the numbers are storage error alone (mlx-bf16 is the baseline). Against the
float32 cpu backend, with every input the reference's: RMS and max-abs logit error and argmax agreement on step
1, a self-conditioned step and a second block, over several prompts; with --generate, the mean denoising steps per block at the same seeds (the symptom users
report for 4-bit everywhere; it only means something on a trained model).

    python benchmarks/mlx_quant_policy.py                        # random tiny checkpoint, 64-divisible rows
    python benchmarks/mlx_quant_policy.py --model ./trained --generate
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dgrun  # noqa: E402
from dgrun.convert.mlx_writer import convert_mlx  # noqa: E402
from tiny import make_checkpoint  # noqa: E402

# Rows divisible by 64 everywhere, so the policy's group size holds for every matrix.
SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
             sliding_window=16, num_experts=8, top_k_experts=2, moe_intermediate_size=128)
PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n",
           "class Stack:\n    def __init__(self):\n",
           "for i in range(10):\n", "def read_lines(path):\n    with open(path) as f:\n",
           "    return sorted(items, key=lambda x: x[1])\n\n\ndef ", "try:\n    import json\nexcept ImportError:\n",
           "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n"]
VARIANTS = {"mlx-bf16": dict(to="mlx-bf16"), "mlx-q8": dict(to="mlx-q8"), "mlx-q4 (mixed, default)": dict(to="mlx-q4"),
            "mlx-q4 --q-uniform": dict(to="mlx-q4", uniform=True)}


def random_checkpoint(path: Path) -> Path:
    """Every weight random; q/k norms scaled by 1/4 so attention is not near one-hot (as tests' ckpt_k)."""
    from safetensors.torch import load_file, save_file

    make_checkpoint(path, SHAPE, canvas_length=32, seed=5)
    w = load_file(path / "model.safetensors")
    w = {k: v * 0.25 if k.endswith(("q_norm.weight", "k_norm.weight")) else v for k, v in w.items()}
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})
    return path


def three_logits(m, prompt: list[int], canvas: torch.Tensor, ref: list[torch.Tensor] | None = None):
    """Step 1, a self-conditioned step, step 1 of a second block. Given the reference's logits, every input
    (self-conditioning, committed block) is the reference's, so each logit error is one forward's."""
    c = m.new_cache()
    m.encode(prompt, c)
    first = m.denoise(canvas, c)
    second = m.denoise(canvas, c, (ref or [first])[0] / 0.7)
    m.encode((ref or [None, second])[1].argmax(-1).tolist(), c)
    return [first, second, m.denoise(canvas, c)]


def bits_per_weight(path: Path) -> float:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    ckpt = dgrun.checkpoint.load(path)
    return 8 * index["metadata"]["total_size"] / sum(v.numel() for v in ckpt.weights.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="HF checkpoint directory [a random tiny one]")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--generate", action="store_true", help="also compare steps per block")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src = Path(a.model) if a.model else random_checkpoint(Path(d) / "src")
        exact = dgrun.load(src, backend="cpu")
        v, c = exact.args.vocab_size, exact.args.canvas_length
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, v, (24,), generator=g).tolist() for _ in range(a.prompts)]
        if exact.tokenizer is not None:  # a trained model: real prompts
            prompts = [exact.tokenizer.encode(t) for t in PROMPTS[: a.prompts]]
        cases = [(p, torch.randint(0, v, (c,), generator=g)) for p in prompts]
        refs = [three_logits(exact, p, cv) for p, cv in cases]
        scale = torch.stack([r.pow(2).mean() for rs in refs for r in rs]).mean().sqrt().item()
        print(f"model: {src if a.model else 'random tiny ' + json.dumps(SHAPE)}; logits RMS {scale:.2f}; "
              f"{a.prompts} prompts x (step 1, self-conditioned step, block 2) x {c} positions; mlx float32 compute")
        print(f"{'variant':26s} {'bits/w':>6s} {'RMS err':>8s} {'max err':>8s} {'argmax agree':>12s}"
              + (f" {'steps/block':>11s}" if a.generate else ""))
        models = {"float32 (cpu)": (exact, None)}
        for i, (name, kw) in enumerate(VARIANTS.items()):
            out = convert_mlx(src, out=Path(d) / f"variant{i}", **kw)
            models[name] = (dgrun.load(out.path, backend="mlx", dtype="float32"), bits_per_weight(out.path))
        for name, (m, bpw) in models.items():
            pairs = [(o, r) for (p, cv), rs in zip(cases, refs) for o, r in zip(three_logits(m, p, cv, rs), rs)]
            errs = [o - r for o, r in pairs]
            agree = [(o.argmax(-1) == r.argmax(-1)).float().mean().item() for o, r in pairs]
            rms = torch.stack([e.pow(2).mean() for e in errs]).mean().sqrt().item()
            line = (f"{name:26s} {bpw if bpw else 32:6.2f} {rms:8.4f} {max(e.abs().max().item() for e in errs):8.3f} "
                    f"{sum(agree) / len(agree):12.3f}")
            if a.generate:
                steps = [s for p, _ in cases for seed in (1, 2)
                         for s in m.generate(p, max_new_tokens=2 * c, steps=24, seed=seed).stats.steps_per_block]
                line += f" {sum(steps) / len(steps):11.2f}"
            print(line)


if __name__ == "__main__":
    main()
