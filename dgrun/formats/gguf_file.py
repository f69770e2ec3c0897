"""A fast GGUF reader: metadata with its value types, tensor infos, and tensor data as views of one map.

gguf-py's GGUFReader makes a numpy view per string: opening a file with Gemma's vocab (262,144 tokens and
~515k merges) takes ~50 s there, ~1 s here. Tensor data follows GGUFReader's conventions (F32/F16 typed
arrays, other types uint8 with the last dim in bytes) over a copy-on-write map, so nothing is read until used.
Every count, length and offset is checked against the file's size and against the caps below before it is
used: a corrupt header costs at most one pass over the file's own bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

from dgrun import checks
from dgrun.errors import DgrunError

SCALAR_FORMATS = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
                  VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
ARRAY_DTYPES = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
                VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8",
                VT.FLOAT64: "<f8"}
MAX_TENSORS = 1 << 16  # the released model has ~700
MAX_KV = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 1 << 32
MAX_NESTING = 2  # arrays of arrays; dgrun reads flat ones
MAX_ALIGNMENT = 1 << 16


@dataclass(frozen=True)
class Field:
    value: Any  # str (bytes if not UTF-8), number, bool, or a list of those
    vtype: VT
    sub: VT | None = None  # element type of an array


@dataclass(frozen=True)
class Tensor:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # torch order (GGUF ne reversed)
    n_bytes: int
    data: np.ndarray  # a view of the file, GGUFReader's layout
    offset: int  # where the data starts in the file


class Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf: bytes | memoryview):
        self.buf, self.off = buf, 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.off + size > len(self.buf):
            raise Truncated
        v = struct.unpack_from(fmt, self.buf, self.off)[0]
        self.off += size
        return v

    def string(self):
        n = self.unpack("<Q")
        if self.off + n > len(self.buf):
            raise Truncated
        raw = bytes(self.buf[self.off:self.off + n])
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw  # kept as bytes so a copy writes it back unchanged

    def count(self, n: int, item_size: int) -> int:
        """An array or list length, refused before the loop when its items cannot fit in the rest of the file."""
        if n * item_size > len(self.buf) - self.off:
            raise Truncated
        return n

    def name(self, what: str) -> str:
        raw = self.string()
        if isinstance(raw, bytes):
            raise ValueError(f"{what} {raw[:40]!r} is not UTF-8")
        return raw

    def value(self, vtype: VT, depth: int = 0) -> Field:
        if vtype == VT.STRING:
            return Field(self.string(), vtype)
        if vtype == VT.ARRAY:
            sub, n = VT(self.unpack("<I")), self.unpack("<Q")
            if sub == VT.STRING:
                return Field([self.string() for _ in range(self.count(n, 8))], vtype, sub)
            if sub == VT.ARRAY:
                if depth >= MAX_NESTING:
                    raise ValueError(f"arrays nested deeper than {MAX_NESTING}")
                n = self.count(n, 12)
                return Field([self.value(VT(self.unpack("<I")), depth + 1).value for _ in range(n)], vtype, sub)
            dtype = np.dtype(ARRAY_DTYPES[sub])
            n = self.count(n, dtype.itemsize)
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.off).tolist()
            self.off += n * dtype.itemsize
            return Field(values, vtype, sub)
        return Field(self.unpack(SCALAR_FORMATS[vtype]), vtype)


class GGUFFile:
    """`fields` (key -> Field, file order) and `tensors` (file order) of one GGUF file."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise DgrunError(f"{self.path}: not a GGUF file (bad magic)")
        self.map = np.memmap(self.path, dtype=np.uint8, mode="c")
        try:
            self._parse(memoryview(self.map))
        except Truncated:
            raise DgrunError(f"{self.path}: truncated GGUF (the file ends inside its header)") from None
        except (ValueError, KeyError, OverflowError, struct.error) as e:
            raise DgrunError(f"{self.path}: corrupt GGUF header ({checks.reason(e)})") from None

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf)
        cur.off = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise DgrunError(f"{self.path}: GGUF version {version} is not supported (2 or 3, little-endian)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise ValueError(f"{n_tensors} tensors and {n_kv} metadata keys (at most {MAX_TENSORS} and {MAX_KV})")
        self.fields = {}
        for _ in range(cur.count(n_kv, 13)):  # a key's length, its type and one byte at least
            key = cur.name("metadata key")
            if key in self.fields:
                raise ValueError(f"metadata key {key} appears twice")
            self.fields[key] = cur.value(VT(cur.unpack("<I")))
        infos, names = [], set()
        for _ in range(cur.count(n_tensors, 24)):
            name = cur.name("tensor name")
            if name in names:
                raise ValueError(f"tensor {name} appears twice")
            names.add(name)
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            if max(ne) > MAX_DIM:
                raise ValueError(f"tensor {name} has a dimension of {max(ne)}")
            type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
            try:
                qtype = QT(type_id)
                GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise DgrunError(f"{self.path}: tensor {name} has unknown type id {type_id}: unsupported") from None
            infos.append((name, qtype, tuple(reversed(ne)), offset))
        align = self.fields.get("general.alignment", Field(32, VT.UINT32))
        if align.vtype != VT.UINT32 or not 0 < align.value <= MAX_ALIGNMENT or align.value & (align.value - 1):
            raise ValueError(f"general.alignment {align.value!r} is not a power of two up to {MAX_ALIGNMENT}")
        align = align.value
        start = -(-cur.off // align) * align
        self.tensors = [self._tensor(start, align, *info) for info in infos]
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in self.tensors)
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise DgrunError(f"{self.path}: tensors {a} and {b} overlap in the file")

    def _tensor(self, start: int, align: int, name: str, qtype: QT, shape: tuple[int, ...], offset: int) -> Tensor:
        block, size = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise DgrunError(f"{self.path}: tensor {name} has {qtype.name} rows of {shape[-1]} values")
        if offset % align:
            raise DgrunError(f"{self.path}: tensor {name} data at offset {offset} is not aligned to {align}")
        n_bytes = math.prod(shape) // block * size
        begin = start + offset
        if begin + n_bytes > len(self.map):
            raise DgrunError(f"{self.path}: truncated GGUF (tensor {name} runs past the end of the file)")
        raw = self.map[begin:begin + n_bytes]
        if qtype in (QT.F32, QT.F16):
            data = raw.view(np.float32 if qtype == QT.F32 else np.float16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] // block * size)
        return Tensor(name, qtype, shape, n_bytes, data, begin)

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value


def read_metadata(path) -> dict:
    """Every metadata key of a GGUF file with its plain value (lists for arrays), in file order."""
    return {key: field.value for key, field in GGUFFile(path).fields.items()}
