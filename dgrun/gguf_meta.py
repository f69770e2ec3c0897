"""Read a GGUF's metadata (key/value) section only, fast.

gguf-py's GGUFReader builds numpy views for every string of every array: on a Gemma vocab (262,144 tokens
and their merges) that takes tens of seconds. The tokenizer needs only a few keys, so this walks the
key/value section with plain slicing and stops before the tensor infos.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from dgrun.errors import DgrunError

# GGUFValueType -> numpy dtype for fixed-size values (the GGUF spec's numbering).
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
           11: "<i8", 12: "<f8"}
BOOL, STRING, ARRAY = 7, 8, 9


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.off, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.off + n > len(self.buf):
            raise DgrunError(f"{self.path}: truncated GGUF metadata")
        view = self.buf[self.off:self.off + n]
        self.off += n
        return view

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        try:
            return str(self.take(self.u64()), "utf-8")
        except UnicodeDecodeError as e:
            raise DgrunError(f"{self.path}: a metadata string is not UTF-8 ({e})") from None

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            sub, n = self.u32(), self.u64()
            if sub == STRING:
                return [self.string() for _ in range(n)]
            if sub not in SCALARS:
                return [self.value(sub) for _ in range(n)]
            dtype = np.dtype(SCALARS[sub])
            arr = np.frombuffer(self.take(n * dtype.itemsize), dtype=dtype)
            return [bool(v) for v in arr] if sub == BOOL else arr.tolist()
        if vtype not in SCALARS:
            raise DgrunError(f"{self.path}: unknown GGUF value type {vtype}")
        dtype = np.dtype(SCALARS[vtype])
        v = np.frombuffer(self.take(dtype.itemsize), dtype=dtype)[0].item()
        return bool(v) if vtype == BOOL else v


def read_metadata(path) -> dict:
    """Every metadata key of a GGUF file as plain Python values (lists for arrays)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return _parse(buf, path)
            finally:
                buf.release()
    except (OSError, ValueError) as e:
        raise DgrunError(f"{path}: cannot read GGUF ({e})") from e


def _parse(buf: memoryview, path: Path) -> dict:
    cur = _Cursor(buf, path)
    if bytes(cur.take(4)) != b"GGUF":
        raise DgrunError(f"{path}: not a GGUF file (bad magic)")
    version = cur.u32()
    if version not in (2, 3):
        raise DgrunError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    cur.u64()  # tensor count
    n_kv = cur.u64()
    out = {}
    for _ in range(n_kv):
        key = cur.string()
        out[key] = cur.value(cur.u32())
    return out
