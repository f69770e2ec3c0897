"""A fast GGUF reader: metadata with its value types, tensor infos, and tensor data as views of one map.

gguf-py's GGUFReader makes a numpy view per string: opening a file with Gemma's vocab (262,144 tokens and
~515k merges) takes ~50 s there, ~1 s here. Tensor data follows GGUFReader's conventions (F32/F16 typed
arrays, other types uint8 with the last dim in bytes) over a copy-on-write map, so nothing is read until used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

from dgrun.errors import DgrunError

SCALAR_FORMATS = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
                  VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
ARRAY_DTYPES = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4",
                VT.INT32: "<i4", VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8",
                VT.FLOAT64: "<f8"}


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

    def value(self, vtype: VT) -> Field:
        if vtype == VT.STRING:
            return Field(self.string(), vtype)
        if vtype == VT.ARRAY:
            sub, n = VT(self.unpack("<I")), self.unpack("<Q")
            if sub == VT.STRING:
                return Field([self.string() for _ in range(n)], vtype, sub)
            if sub == VT.ARRAY:
                return Field([self.value(VT(self.unpack("<I"))).value for _ in range(n)], vtype, sub)
            dtype = np.dtype(ARRAY_DTYPES[sub])
            end = self.off + n * dtype.itemsize
            if end > len(self.buf):
                raise Truncated
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.off).tolist()
            self.off = end
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
        except (ValueError, KeyError, OverflowError) as e:
            raise DgrunError(f"{self.path}: corrupt GGUF header ({type(e).__name__}: {e})") from None

    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf)
        cur.off = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise DgrunError(f"{self.path}: GGUF version {version} is not supported (2 or 3, little-endian)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.fields = {}
        for _ in range(n_kv):
            key = cur.string()
            self.fields[key] = cur.value(VT(cur.unpack("<I")))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            type_id, offset = cur.unpack("<I"), cur.unpack("<Q")
            try:
                qtype = QT(type_id)
            except ValueError:
                raise DgrunError(f"{self.path}: tensor {name} has unknown type id {type_id}: unsupported") from None
            infos.append((name, qtype, tuple(reversed(ne)), offset))
        align = self.get("general.alignment", 32)
        start = -(-cur.off // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _tensor(self, start: int, name: str, qtype: QT, shape: tuple[int, ...], offset: int) -> Tensor:
        block, size = GGML_QUANT_SIZES[qtype]
        if not shape or shape[-1] % block:
            raise DgrunError(f"{self.path}: tensor {name} has {qtype.name} rows of {shape[-1:]} values")
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * size
        begin = start + offset
        if begin + n_bytes > len(self.map):
            raise DgrunError(f"{self.path}: truncated GGUF (tensor {name} runs past the end of the file)")
        raw = self.map[begin:begin + n_bytes]
        if qtype in (QT.F32, QT.F16):
            data = raw.view(np.float32 if qtype == QT.F32 else np.float16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] // block * size)
        return Tensor(name, qtype, shape, n_bytes, data)

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value


def read_metadata(path) -> dict:
    """Every metadata key of a GGUF file with its plain value (lists for arrays), in file order."""
    return {key: field.value for key, field in GGUFFile(path).fields.items()}
