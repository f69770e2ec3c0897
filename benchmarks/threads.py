"""Wall time and generation speed of `dgrun run` per thread count, idle and with one core kept busy.

    python benchmarks/threads.py                          # the embedded model, the issue's command
    python benchmarks/threads.py --model ./ckpt --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time


def run_once(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rate = float(re.search(r"generated \d+ tok in [\d.]+ s \(([\d.]+) tok/s\)", proc.stderr).group(1))
    return time.perf_counter() - t0, rate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", default="1,2,default")
    a = p.parse_args()
    base = [sys.executable, "-m", "dgrun.cli", "run", "-p", "def fib(n):", "-n", "64"]
    base += ["-m", a.model] if a.model else []
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    for loaded in (False, True):
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
        try:
            for t in a.threads.split(","):
                cmd = base + ([] if t == "default" else ["-t", t])
                walls, rates = zip(*(run_once(cmd) for _ in range(a.runs)))
                print(f"{'loaded' if loaded else 'idle  '} threads {t:>7}: wall {statistics.median(walls):.2f} s "
                      f"(min {min(walls):.2f}), generation {statistics.median(rates):.1f} tok/s (median of {a.runs})")
        finally:
            if burner is not None:
                burner.kill()


if __name__ == "__main__":
    main()
