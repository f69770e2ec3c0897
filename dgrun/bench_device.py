"""The device side of `dgrun bench`: which clock, the copy-bandwidth probe, peak memory, and the device's name.

cuda is timed with CUDA events (recorded around the work, then a synchronize), mlx and cpu with the wall clock
(mlx synchronized after). The copy bandwidth is the roofline's denominator: one device-to-device copy of a
buffer, best of 5, counting the bytes read plus the bytes written (a 1 GiB buffer on cuda, far above any L2).
"""

from __future__ import annotations

import platform
import resource
import sys
import time

import torch

COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20, "mlx": 256 << 20}  # the bandwidth probe's buffer


def kind(backend) -> str:
    """"cuda", "mlx" or "cpu": which clock and memory counter fit this backend."""
    name, device = str(getattr(backend, "name", "")), getattr(backend, "device", None)
    if name == "mlx":
        return "mlx"
    if device is not None:  # the torch backends; the cuda backend's test mode runs on device "cpu"
        return "cuda" if torch.device(device).type == "cuda" else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def timed(fn, clock: str) -> float:
    """Seconds `fn()` takes: CUDA events around it on cuda (then a synchronize), else the wall clock."""
    if clock == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()  # earlier work does not count
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    if clock == "mlx":
        import mlx.core as mx

        mx.synchronize()
    return time.perf_counter() - t0


def copy_bandwidth(clock: str, nbytes: int | None = None, reps: int = 5) -> tuple[float, int]:
    """(bytes/s, buffer bytes): the best of `reps` device-to-device copies of one buffer, counting the bytes read
    and the bytes written."""
    nbytes = nbytes or COPY_BYTES[clock]
    if clock == "mlx":
        import mlx.core as mx

        src = mx.zeros((nbytes // 4,), dtype=mx.float32)
        mx.eval(src)
        def copy():
            mx.eval(src + 1)
    else:
        device = "cuda" if clock == "cuda" else "cpu"
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        def copy():
            dst.copy_(src)
    copy()  # warm-up
    best = min(timed(copy, clock) for _ in range(reps))
    return 2 * nbytes / best, nbytes


def reset_peak(clock: str) -> None:
    """Start a new peak: the allocator's on cuda and mlx, the process's resident high-water mark on Linux."""
    if clock == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif clock == "mlx":
        import mlx.core as mx

        mx.reset_peak_memory()
    try:  # Linux >= 4.0: "5" resets VmHWM, the peak RSS (proc(5), /proc/pid/clear_refs)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(clock: str, rss0: int) -> int:
    """Bytes: the allocator's peak since `reset_peak` on cuda and mlx (weights included); on cpu the process's peak
    RSS since `reset_peak` minus its RSS `rss0` when the bench started (before the weights were built)."""
    if clock == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if clock == "mlx":
        import mlx.core as mx

        return int(mx.get_peak_memory())
    return max(0, rss("VmHWM") - rss0)


def rss(field: str = "VmRSS") -> int:
    """The process's resident bytes now (VmRSS) or at its peak (VmHWM), from /proc; elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def device_name(clock: str) -> str:
    if clock == "cuda":
        return torch.cuda.get_device_name()
    if clock == "mlx":
        import mlx.core as mx

        return f"mlx {mx.default_device()} ({platform.machine()})"
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu {model or platform.processor() or platform.machine()}, {n} thread{'s' if n > 1 else ''}"
