"""Peak memory of denoising steps at the real vocabulary (262,144), per row, on the cpu backend.

tests/tiny.py's shape A (hidden 64) so that what remains is what scales with the vocabulary: the logits, the sampler's
passes over them, and what a row carries from one step to the next. Each batch size runs in a fresh process;
the figure is its peak RSS after 3 steps minus its RSS before the first.

    python benchmarks/step_memory.py               # B = 1, 2, 4 at canvas 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import SHAPE_A  # noqa: E402

SHAPE = dict(SHAPE_A, vocab_size=262144)  # tests/tiny.py's shape A at the real vocabulary


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(batch: int, canvas: int, path: str) -> dict:
    import torch

    import dgrun
    from dgrun.backends import Row

    torch.set_num_threads(1)
    m = dgrun.load(path, backend="cpu")
    be = m.backend
    cache = be.new_cache(batch, 64)
    for slot in range(batch):
        be.encode(slot, list(range(3, 35)), cache)
    state = be.start([Row(s, m.defaults.update(steps=10, seed=s)) for s in range(batch)], cache)
    before = peak_mb()
    for _ in range(3):
        state = be.step(state, cache)
        be.done(state)
    return {"batch": batch, "step_peak_mb": round(peak_mb() - before)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.canvas, a.path)))
        return
    from tiny import make_checkpoint  # noqa: E402

    with tempfile.TemporaryDirectory() as d:
        path = make_checkpoint(Path(d), SHAPE, canvas_length=a.canvas)
        rows = []
        for b in (int(x) for x in a.batch.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", str(b), "--canvas", str(a.canvas),
                                  "--path", str(path)], capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"vocab 262144, canvas {a.canvas}, float32; one (C, V) float32 tensor is {a.canvas * 262144 * 4 / 2**20:.0f} MB")
    print("| B | step peak MB (above the state before stepping) | per row MB |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_peak_mb']} | {r['step_peak_mb'] / r['batch']:.0f} |")


if __name__ == "__main__":
    main()
