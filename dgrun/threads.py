"""How many CPU threads torch gets: `threads=` / `-t`, else a default that holds up on a loaded machine.

Measured on 2 cores (README, *Threads*): the embedded 15M-parameter model runs 4x slower with 2 threads than
with 1 when another process keeps one core busy (OpenMP threads wait on each other), and no faster when idle.
"""

from __future__ import annotations

import os

SMALL_MODEL = 100_000_000  # parameters; below this one thread measured as fast as two, and safe under load


def physical_cores() -> int:
    """Cores this process may use, counting hyper-threads once (Linux /proc/cpuinfo; else the CPU count)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return usable
    cores = {(b.split("physical id")[1].split("\n")[0], b.split("core id")[1].split("\n")[0])
             for b in text.split("\n\n") if "core id" in b and "physical id" in b}
    return max(1, min(usable, len(cores) or usable))


def default_threads(n_params: int) -> int:
    return 1 if n_params < SMALL_MODEL else physical_cores()


def set_threads(threads: int | None, n_params: int) -> int:
    """Apply `threads` (None: the default for a model of `n_params`) to torch; returns the count used."""
    import torch

    from dgrun.errors import DgrunError

    if threads is not None and threads < 1:
        raise DgrunError(f"threads must be >= 1, got {threads}")
    n = threads or default_threads(n_params)
    torch.set_num_threads(n)
    return n
