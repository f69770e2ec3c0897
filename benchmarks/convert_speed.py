"""Conversion throughput of `dgrun convert` for each --to, and reconstruction RMSE per GGUF type.

A synthetic bf16 checkpoint in the released layout (hidden 1024, 8 layers, 32 experts, vocab 32768 by
default; ~290M parameters, ~0.58 GB) is written once, then converted with each target. Throughput is in MB/s
of source (safetensors) bytes, end to end: headers, reading, quantizing, writing, fsync.

    python benchmarks/convert_speed.py [--dir /tmp/dgrun-bench] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from dgrun.convert.convert import convert
from dgrun.convert.quants import dequantize, quantize
from dgrun.models.diffusion_gemma import HF_TO_GGUF, ModelArgs, expected_shapes

TEXT = dict(vocab_size=32768, hidden_size=1024, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=128, global_head_dim=256, num_global_key_value_heads=1,
            sliding_window=512, num_experts=32, top_k_experts=4, moe_intermediate_size=256,
            layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] + ["full_attention"])
RMSE_TYPES = (QT.BF16, QT.F16, QT.Q8_0, QT.Q6_K, QT.Q5_K, QT.Q5_1, QT.Q5_0, QT.Q4_K, QT.Q4_1, QT.Q4_0)


def gguf_to_hf() -> dict[str, str]:
    """The inverse of the name table, `{bid}` kept."""
    return {dst: src for src, dst in HF_TO_GGUF.items()}


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """Random bf16 weights (N(0, 0.02), norms near 1) under the HF names transformers 5.23 saves."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors").is_file():
        return path
    config = {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
              "canvas_length": 256, "text_config": TEXT}
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    inverse, weights = gguf_to_hf(), {}
    for name, shape in expected_shapes(ModelArgs.from_config(config)).items():
        parts = name.split(".")
        key = ".".join(["blk", "{bid}"] + parts[2:]) if parts[0] == "blk" else name
        hf = inverse[key].format(bid=parts[1]) if parts[0] == "blk" else inverse[key]
        t = torch.randn(shape, generator=g) * 0.02
        if len(shape) == 1:
            t = 1.0 + t
        weights[hf] = t.to(torch.bfloat16)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def rmse_table(n: int = 1 << 22, seed: int = 1) -> list[tuple[str, float, float]]:
    """(type, relative RMSE, bits per weight) on N(0, 0.02) rows of 1024 (gguf-py dequantizes)."""
    x = (np.random.default_rng(seed).standard_normal((n // 1024, 1024)) * 0.02).astype(np.float32)
    out = []
    for t in RMSE_TYPES:
        q = quantize(x, t, threads=os.cpu_count())
        y = dequantize(q, t).reshape(x.shape)
        rel = float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)) / np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        out.append((t.name, rel, q.nbytes * 8 / x.size))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/dgrun-bench")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--to", nargs="+", default=["gguf-bf16", "gguf-f16", "gguf-q8", "gguf-q4"])
    a = ap.parse_args()
    root = Path(a.dir)
    t0 = time.perf_counter()
    src = make_checkpoint(root / "ckpt")
    size = (src / "model.safetensors").stat().st_size
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; checkpoint {size / 1e9:.2f} GB "
          f"bf16 ({size // 2 / 1e6:.0f}M params), made in {time.perf_counter() - t0:.0f} s\n")
    print("| --to | threads | seconds | MB/s (source) | output MB |")
    print("|---|---|---|---|---|")
    for to in a.to:
        for threads in sorted(set(a.threads)):
            out = root / f"{to}-t{threads}.gguf"
            r = convert(src, to, out, force=True, threads=threads)
            s = r.stats
            print(f"| {to} | {threads} | {s.seconds:.1f} | {s.mb_per_s:.0f} | {s.output_bytes / 1e6:.0f} |", flush=True)
            out.unlink()
    print("\n| type | relative RMSE | bits/weight |")
    print("|---|---|---|")
    for name, rel, bits in rmse_table():
        print(f"| {name} | {rel:.5f} | {bits:.2f} |")


if __name__ == "__main__":
    main()
