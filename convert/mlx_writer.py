"""`dgrun convert SRC --to mlx-q4|mlx-q8|mlx-bf16`: a directory in the MLX community layout.

What mlx-vlm writes for DiffusionGemma: config.json with a `quantization` block (and its copy
`quantization_config`), `model.safetensors` or `model-0000i-of-0000n.safetensors` shards (metadata
format "mlx"), `model.safetensors.index.json`, and the tokenizer / chat template / generation files.
Tensor names are the HF names, the experts with a `.weight` suffix; a quantized matrix P is
`P.weight` + `P.scales` + `P.biases`, quantized by `mx.quantize` from bf16 as mlx-vlm does.
Each shard is built and written in turn; the output appears only when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dgrun.backends.mlx_policy import Policy, policy_for
from dgrun.convert.mlx_source import Source, open_source
from dgrun.errors import DgrunError
from dgrun.formats.mlx import mlx_name, module_path
from dgrun.models.diffusion_gemma import expected_shapes

MAX_SHARD_BYTES = 5 << 30  # mlx-vlm's MAX_FILE_SIZE_GB


@dataclass
class Entry:
    flat: str
    name: str  # the MLX tensor name
    shape: tuple[int, ...]
    quant: tuple[int, int] | None  # (bits, group_size)

    @property
    def nbytes(self) -> int:
        rows, cols = math.prod(self.shape[:-1]), self.shape[-1]
        if self.quant is None:
            return 2 * rows * cols  # bf16
        bits, group = self.quant
        return rows * cols * bits // 8 + 2 * 2 * rows * (cols // group)


@dataclass
class MlxConvertResult:
    path: Path
    quantized: dict[str, tuple[int, int]]  # MLX module path -> (bits, group_size)
    shards: int
    output_bytes: int
    seconds: float


def plan(src: Source, policy: Policy | None) -> list[Entry]:
    order = list(expected_shapes(src.args))  # globals, then layer by layer
    entries = []
    for flat in sorted(src.tensors, key=order.index):
        shape = src.tensors[flat][0]
        entries.append(Entry(flat, mlx_name(flat), shape, policy.choose(flat, shape) if policy else None))
    return entries


def shard(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards, size = [[]], 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def quantization_block(entries: list[Entry], policy: Policy) -> dict:
    """The default (the experts' bits) plus one entry per module quantized otherwise, as mlx-vlm writes it."""
    block = {"group_size": policy.group_size, "bits": policy.bits, "mode": "affine"}
    for e in entries:
        if e.quant is not None and e.quant != (policy.bits, policy.group_size):
            block[module_path(e.name)] = {"group_size": e.quant[1], "bits": e.quant[0]}
    return block


def tensors_of(e: Entry, src: Source) -> dict:
    import mlx.core as mx

    from dgrun.backends.mlx_weights import from_torch

    w = from_torch(src.tensors[e.flat][1]()).astype(mx.bfloat16)
    if e.quant is None:
        return {e.name: w}
    q, scales, biases = mx.quantize(w, group_size=e.quant[1], bits=e.quant[0])
    base = module_path(e.name)
    return {f"{base}.weight": q, f"{base}.scales": scales, f"{base}.biases": biases}


def default_output(src: Path, to: str) -> Path:
    stem = src.name if src.is_dir() else src.stem
    return src.parent / f"{stem}-{to}"


def convert_mlx(src, to: str = "mlx-q4", out=None, q_group_size: int | None = None, q_bits: int | None = None,
                uniform: bool = False, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> MlxConvertResult:
    """Convert `src` (HF directory, GGUF or MLX directory) to an MLX directory `out` (default SRC-TO)."""
    try:
        import mlx.core as mx
    except ImportError:
        raise DgrunError(f"--to {to} needs MLX: pip install mlx (Apple silicon) or 'mlx[cpu]' (Linux)") from None
    policy = policy_for(to, q_bits, q_group_size, uniform)
    src = Path(src).expanduser()
    if not src.exists():
        raise DgrunError(f"{src}: no such file or directory")
    out = Path(out).expanduser() if out else default_output(src, to)
    if out.exists() and not force:
        raise DgrunError(f"{out} already exists (use --force to overwrite)")
    if out.exists() and out.resolve() == src.resolve():
        raise DgrunError(f"{out}: cannot overwrite the source while reading it")
    if out.exists() and not out.is_dir():
        raise DgrunError(f"{out}: exists and is not a directory")
    if not out.parent.is_dir():
        raise DgrunError(f"{out.parent}: no such directory")

    t0 = time.perf_counter()
    source = open_source(src)
    entries = plan(source, policy)
    shards = shard(entries, max_shard_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        weight_map, total = {}, 0
        for i, part in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            arrays = {}
            for e in part:
                arrays.update(tensors_of(e, source))
            mx.save_safetensors(str(tmp / fname), arrays, metadata={"format": "mlx"})
            total += sum(a.nbytes for a in arrays.values())
            weight_map.update({k: fname for k in arrays})
            del arrays
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        config = dict(source.config)
        if policy is not None:
            config["quantization"] = config["quantization_config"] = quantization_block(entries, policy)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
        if source.generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(source.generation, indent=2))
        for f in source.files:
            shutil.copy2(f, tmp / f.name)
        for name, text in source.written.items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    quantized = {module_path(e.name): e.quant for e in entries if e.quant}
    return MlxConvertResult(out, quantized, len(shards), total, time.perf_counter() - t0)
