"""Fuzz dgrun's loaders: N seeded malformed checkpoints, each loaded and asked for a 1-step generation.

    python benchmarks/fuzz_loaders.py --cases 10000 --jobs 2

Prints the tally (ok / error / escape / hang / oversized / crash) and every case that was not ok or a
DgrunError, with its seed so `--first SEED --cases 1 -v` replays it. The mutator is tests/fuzz.py.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzz  # noqa: E402


def _chunk(args):
    seeds, first, count, work, timeout, verbose = args
    report = (lambda s, what, o, d, t: print(f"{s:6d} {o:9s} {t:5.2f}s {what}: {d[:160]}", flush=True)) \
        if verbose else None
    return fuzz.run_many(seeds, first, count, Path(work), timeout, report)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        seeds = fuzz.make_seeds(Path(tmp) / "seeds")
        print(f"seeds: {', '.join(sorted(seeds))} ({time.perf_counter() - t0:.1f} s)", flush=True)
        per = -(-a.cases // a.jobs)
        jobs = [(seeds, a.first + i * per, min(per, a.cases - i * per), str(Path(tmp) / f"w{i}"), a.timeout,
                 a.verbose) for i in range(a.jobs) if a.cases > i * per]
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(len(jobs)) as pool:
            results = pool.map(_chunk, jobs)
        seconds = time.perf_counter() - t0
    tally, bad = {}, []
    for r in results:
        for k, v in r["tally"].items():
            tally[k] = tally.get(k, 0) + v
        bad += r["bad"]
    for seed, what, outcome, detail in sorted(bad):
        print(f"{outcome:9s} seed {seed:6d} {what}: {detail[:240]}")
    n = sum(tally.values())
    print(f"{n} cases in {seconds:.0f} s ({a.jobs} jobs): " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    print(f"escapes {tally.get('escape', 0) + tally.get('crash', 0)}, hangs {tally.get('hang', 0)}, "
          f"oversized {tally.get('oversized', 0)}; slowest case {max(r['slowest'] for r in results):.2f} s, "
          f"largest memory growth {100 * max(r['memory'] for r in results):.0f}% of its budget")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
