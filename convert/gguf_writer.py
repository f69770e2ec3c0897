"""Stream a GGUF to disk atomically: header and tensor table first, then each tensor slab by slab.

Slabs are converted on a thread pool (numpy releases the GIL) and written in order, with at most a few
in flight, so memory stays a small multiple of one slab. The file is written as OUT.tmp-XXXX and renamed
over OUT only when complete: an error or Ctrl-C leaves no partial output.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFWriter

from dgrun.convert.metadata import Metadata
from dgrun.convert.quants import byte_shape, quantize
from dgrun.convert.sources import SourceTensor, to_float32
from dgrun.models.diffusion_gemma import ARCH

ALIGNMENT = 32  # GGUF's default general.alignment, which dgrun does not change


@dataclass
class Planned:
    src: SourceTensor
    qtype: QT

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.src.shape[:-1]) * (self.src.shape[-1] // block) * size


@dataclass
class WriteStats:
    tensors: int
    source_bytes: int
    output_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / 1e6 / max(self.seconds, 1e-9)


def encode(p: Planned, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor in its output type, as bytes (a copy when the type is unchanged)."""
    rows = p.src.rows(start, stop)
    if p.qtype == p.src.qtype:
        return np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
    return quantize(to_float32(rows, p.src.qtype), p.qtype, threads=1).reshape(-1)


def _pad(f, n: int) -> None:
    f.write(b"\0" * (-n % ALIGNMENT))


def _progress(total: int):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn("{task.description:<36}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    return bar, bar.add_task("converting", total=total)


def write_gguf(out: Path, meta: Metadata, plan: list[Planned], threads: int = 1, progress: bool = False) -> WriteStats:
    """Write `meta` and the planned tensors to `out` atomically."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".tmp-")
    os.close(fd)
    writer, t0 = None, time.perf_counter()
    total = sum(p.src.nbytes for p in plan)
    bar, task = _progress(total) if progress else (None, None)
    try:
        writer = GGUFWriter(tmp, ARCH)
        for key, kv in meta.items():
            if key != "general.architecture":  # the writer puts it first itself
                writer.add_key_value(key, kv.value, kv.vtype, kv.sub)
        for p in plan:
            writer.add_tensor_info(p.src.name, byte_shape(p.src.shape, p.qtype), np.dtype(np.uint8), p.nbytes,
                                   raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        _pad(f, f.tell())
        if bar is not None:
            bar.start()
        _write_data(f, plan, threads, bar, task)
        f.flush()
        os.fsync(f.fileno())
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it a normal file's mode
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.stop()
    return WriteStats(len(plan), total, out.stat().st_size, time.perf_counter() - t0)


def _write_data(f, plan: list[Planned], threads: int, bar, task) -> None:
    jobs = [(i, a, b, j == len(slabs) - 1) for i, p in enumerate(plan)
            for slabs in [p.src.slabs()] for j, (a, b) in enumerate(slabs)]
    pending, written = deque(), 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        try:
            for i, a, b, last in jobs:
                pending.append((i, a, b, last, pool.submit(encode, plan[i], a, b)))
                if len(pending) > 2 * threads:  # bound the slabs in flight
                    written = _drain_one(f, plan, pending, written, bar, task)
            while pending:
                written = _drain_one(f, plan, pending, written, bar, task)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _drain_one(f, plan, pending, written, bar, task) -> int:
    i, a, b, last, fut = pending.popleft()
    data = fut.result()
    f.write(memoryview(data))
    written += data.nbytes
    p = plan[i]
    if bar is not None:
        rows = p.src.shape[0] if p.src.shape else 1
        bar.update(task, advance=p.src.nbytes * (b - a) / rows, description=p.src.name)
    if last:
        if written != p.nbytes:
            raise RuntimeError(f"{p.src.name}: wrote {written} bytes, expected {p.nbytes}")
        _pad(f, written)
        return 0
    return written
