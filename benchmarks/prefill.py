"""Prefill time and peak memory for long prompts on the embedded model, one fresh process per length.

    python benchmarks/prefill.py                   # 1k, 4k and 13k tokens, cpu backend
    python benchmarks/prefill.py --tokens 13509 --threads 2

Uses only `Model.new_cache()` and `Model.encode(ids, cache)`, so the same script measures older dgrun trees.
Peak RSS is the process's high-water mark (ru_maxrss) after loading and after the prefill.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(n: int, threads: int) -> dict:
    import torch

    import dgrun

    torch.set_num_threads(threads)
    m = dgrun.load(backend="cpu")
    ids = torch.randint(10, m.args.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cache = m.new_cache()
    t0 = time.perf_counter()
    m.encode(ids, cache)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": n, "seconds": round(seconds, 2), "tok_per_s": round(n / seconds), "peak_rss_mb": round(peak),
            "rss_after_load_mb": round(loaded)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1000,4000,13509")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.threads)))
        return
    print("| tokens | prefill s | tok/s | peak RSS MB | RSS after load MB |")
    print("|---|---|---|---|---|")
    for n in (int(t) for t in a.tokens.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {n} | {r['seconds']} | {r['tok_per_s']} | {r['peak_rss_mb']} | {r['rss_after_load_mb']} |")


if __name__ == "__main__":
    main()
