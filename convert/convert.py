"""`convert()`: an HF checkpoint directory or a GGUF -> a DiffusionGemma GGUF (the `dgrun convert` verb).

Reads headers and metadata first (every check happens before a byte is written), plans each tensor's type
with `policy`, then streams the tensors through `gguf_writer`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from dgrun.convert import policy
from dgrun.convert.gguf_writer import Planned, WriteStats, write_gguf
from dgrun.convert.metadata import Metadata, copied_metadata, general_metadata, model_metadata, rope_freqs
from dgrun.convert.sources import SafetensorsFiles, SourceTensor, constant, gguf_tensor
from dgrun.convert.vocab import tokenizer_metadata
from dgrun.errors import DgrunError
from dgrun.formats.gguf import read_gguf
from dgrun.formats.safetensors import open_hf_dir
from dgrun.jsonfile import read_json
from dgrun.models.diffusion_gemma import ModelArgs


@dataclass
class ConvertResult:
    path: Path
    types: dict[str, str]  # tensor name -> GGUF type name
    stats: WriteStats


def order(name: str) -> tuple[int, str]:
    """Globals first, then layer by layer, by name within each (llama-quantize's order)."""
    layer = policy.layer_of(name)
    return (-1 if layer is None else layer), name


def default_output(src: Path, label: str) -> Path:
    """./ckpt -> ./ckpt-Q4_K_M.gguf; model-BF16.gguf -> model-Q4_K_M.gguf."""
    if src.is_dir():
        src = Path(os.path.abspath(src))  # "." still names the directory; links are not followed
        return src.parent / f"{src.name}-{label}.gguf"
    known = "|".join(re.escape(t.label) for t in policy.TARGETS.values())
    stem = re.sub(rf"[-.]({known})$", "", src.stem, flags=re.IGNORECASE)
    return src.with_name(f"{stem}-{label}.gguf")


def from_hf(src: Path, file_type: int) -> tuple[ModelArgs, Metadata, list[SourceTensor]]:
    ckpt = open_hf_dir(src)
    args = ckpt.args
    full = next(s for s in args.layers if not s.sliding)
    if full.rope_type != "proportional":
        raise DgrunError(f"{src}: full-attention rope_type {full.rope_type!r}: llama.cpp's layout needs "
                         "'proportional'")
    gen = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else None
    files = SafetensorsFiles()
    tensors = [constant("rope_freqs.weight", rope_freqs(args))]
    tensors += [files.tensor(name, ref) for name, ref in ckpt.weights.items()]
    general = general_metadata(src, {t.name: t.shape for t in tensors})
    meta = model_metadata(read_json(src / "config.json"), args, gen, general, file_type)
    tok = tokenizer_metadata(src, args.vocab_size)
    if tok is None:
        print(f"dgrun: warning: {src} has no tokenizer.json: the GGUF gets no tokenizer, so llama.cpp "
              "cannot load it", file=sys.stderr)
    else:
        meta.update(tok)
    return args, meta, tensors


def from_gguf(src: Path, file_type: int) -> tuple[ModelArgs, Metadata, list[SourceTensor]]:
    reader, args = read_gguf(src)
    return args, copied_metadata(reader, file_type), [gguf_tensor(t) for t in reader.tensors]


def plan(tensors: list[SourceTensor], args: ModelArgs, tgt: policy.Target, overrides, from_gguf_file: bool):
    names = [t.name for t in tensors]
    info = policy.MixInfo(
        n_layer=args.num_hidden_layers, n_expert=args.num_experts,
        attn_v_layers=tuple(sorted(policy.layer_of(n) for n in names if policy.category(n) == "attn_v")))
    out, used = [], set()
    for t in sorted(tensors, key=lambda t: order(t.name)):
        out.append(Planned(t, policy.choose(t.name, t.shape, t.qtype if from_gguf_file else None, tgt, info,
                                            overrides)))
        hit = policy.override_for(t.name, overrides)
        if hit is not None and policy.quantizable(t.name, len(t.shape)):
            used.add(hit[0])
    for glob, _ in overrides:
        if glob not in used:
            print(f"dgrun: warning: --tensor-type {glob!r} matches no quantizable tensor", file=sys.stderr)
    return out


def convert(src, to: str = "gguf-q4", out=None, tensor_types=(), force: bool = False, threads: int | None = None,
            progress: bool = False) -> ConvertResult:
    """Convert `src` (HF directory or GGUF) to `out` (default: next to src, named by type)."""
    src = Path(src).expanduser()
    tgt = policy.target(to)
    overrides = policy.parse_overrides(tensor_types)
    if not src.exists():
        raise DgrunError(f"{src}: no such file or directory")
    out = Path(out).expanduser() if out else default_output(src, tgt.label)
    if out.is_dir():
        raise DgrunError(f"{out}: is a directory (give a file name with -o)")
    if out.exists() and not force:
        raise DgrunError(f"{out} already exists (use --force to overwrite)")
    if out.exists() and out.resolve() == src.resolve():
        raise DgrunError(f"{out}: cannot overwrite the source while reading it")
    if not out.parent.is_dir():
        raise DgrunError(f"{out.parent}: no such directory")
    if src.is_dir():
        args, meta, tensors = from_hf(src, tgt.file_type)
    else:
        with open(src, "rb") as f:
            if f.read(4) != b"GGUF" and src.suffix.lower() != ".gguf":
                raise DgrunError(f"{src}: not a checkpoint directory or a .gguf file")
        args, meta, tensors = from_gguf(src, tgt.file_type)
    planned = plan(tensors, args, tgt, overrides, not src.is_dir())
    threads = threads or min(8, os.cpu_count() or 1)
    stats = write_gguf(out, meta, planned, threads=threads, progress=progress)
    return ConvertResult(out, {p.src.name: p.qtype.name for p in planned}, stats)
