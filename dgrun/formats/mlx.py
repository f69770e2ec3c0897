"""Read an MLX-format DiffusionGemma directory (as mlx-vlm / mlx-lm write it, and `dgrun convert --to mlx-*`).

The layout is the HF checkpoint's, with two differences: the expert tensors end in `.weight`, and a quantized
matrix P is `P.weight` (uint32 words) + `P.scales` + `P.biases`, described by config.json's `quantization`
block (`group_size`, `bits`, `mode`, and per-module overrides keyed by module path). Weights come out as the
flat dict (GGUF names): float tensors as torch, quantized ones as `AffineTensor`.
"""

from __future__ import annotations

import re
from pathlib import Path

from dgrun import checks, tokenizer
from dgrun.errors import DgrunError, notice
from dgrun.formats.common import Checkpoint, check_shapes, read_generation_config
from dgrun.formats.safetensors import headers, read_config, read_tensors, safetensors_files
from dgrun.jsonfile import read_json
from dgrun.models.diffusion_gemma import HF_TO_GGUF, HF_VISION, expected_shapes, hf_to_gguf_name
from dgrun.packed import BITS, GROUP_SIZES, AffineTensor, check_params

QUANT_PARTS = (".scales", ".biases")
_EXPERT_SUFFIX = re.compile(r"\.experts\.(gate_up_proj|down_proj)\.weight$")
_FLAT_TO_HF = [(re.compile("^" + re.escape(dst).replace(r"\{bid\}", r"(\d+)") + "$"), src)
               for src, dst in HF_TO_GGUF.items()]


def mlx_name(flat: str) -> str:
    """Flat-dict name -> the MLX checkpoint's tensor name."""
    for pattern, src in _FLAT_TO_HF:
        m = pattern.match(flat)
        if m:
            name = src.format(bid=m.group(1)) if m.groups() else src
            return name + ".weight" if name.endswith((".experts.gate_up_proj", ".experts.down_proj")) else name
    raise KeyError(flat)


def flat_name(name: str) -> str | None:
    """An MLX checkpoint tensor name (without .scales/.biases) -> the flat-dict name, or None if unused."""
    name = name.removeprefix("language_model.")
    return hf_to_gguf_name(_EXPERT_SUFFIX.sub(lambda m: f".experts.{m.group(1)}", name))


def module_path(name: str) -> str:
    return name.removesuffix(".weight")


def is_mlx_dir(path: Path) -> bool:
    """A quantization block in config.json, or safetensors that say format "mlx" or hold MLX-named experts."""
    from safetensors import safe_open

    if not (path / "config.json").is_file():
        return False
    if "quantization" in read_json(path / "config.json"):
        return True
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return False
    try:
        with safe_open(files[0], framework="pt") as st:
            if (st.metadata() or {}).get("format") == "mlx":
                return True
            return any(_EXPERT_SUFFIX.search(k) or k.endswith(".scales") for k in st.keys())
    except Exception:  # noqa: BLE001  (an unreadable file is reported by the HF loader with its own message)
        return False


def read_raw(path: Path) -> dict:
    """Every tensor of the directory, read; the vision tower's are noted (None), never read."""
    refs = headers(safetensors_files(path), skip=lambda name: bool(HF_VISION.match(name)))
    out = read_tensors({k: v for k, v in refs.items() if v is not None})
    return {k: out.get(k) for k in refs}


def _quant_entry(name: str, entry) -> dict:
    entry = checks.mapping(name, entry)
    out = {}
    if "bits" in entry:
        out["bits"] = checks.integer(f"{name}.bits", entry["bits"], 1, 32)
        if out["bits"] not in BITS:
            checks.fail(f"{name}.bits", entry["bits"], f"expected one of {BITS}")
    if "group_size" in entry:
        out["group_size"] = checks.integer(f"{name}.group_size", entry["group_size"], 1, 1 << 16)
        if out["group_size"] not in GROUP_SIZES:
            checks.fail(f"{name}.group_size", entry["group_size"], f"expected one of {GROUP_SIZES}")
    return out


def quant_block(config: dict, path: Path) -> dict | None:
    """config.json's quantization block: the defaults, and per-module overrides keyed by module path."""
    q = config.get("quantization") or config.get("quantization_config")
    if q is None:
        return None
    try:
        q = checks.mapping("quantization", q)
        if q.get("mode", "affine") != "affine":
            raise DgrunError(f"MLX quantization mode {checks.show(q.get('mode'))} is not supported (affine only)")
        out = _quant_entry("quantization", {k: v for k, v in q.items() if k in ("bits", "group_size")})
        for key, entry in q.items():
            if isinstance(entry, dict):
                out[key] = _quant_entry(f"quantization[{key[:80]!r}]", entry)
        return out
    except DgrunError as e:
        raise DgrunError(f"{path / 'config.json'}: {e}") from None


def _affine(name: str, raw: dict, quant: dict | None, cols: int, path: Path) -> AffineTensor:
    import torch

    words, scales, biases = raw[name], raw.get(module_path(name) + ".scales"), raw.get(module_path(name) + ".biases")
    if scales is None or biases is None:
        raise DgrunError(f"{path}: {name} is packed but {module_path(name)}.scales/.biases are missing")
    if words.dtype != torch.uint32 or words.dim() < 2:
        raise DgrunError(f"{path}: {name} is packed but holds {words.dtype} of {words.dim()} dims, not uint32 words")
    if not (scales.dtype.is_floating_point and biases.dtype.is_floating_point and scales.dim() == words.dim()):
        raise DgrunError(f"{path}: {module_path(name)}.scales/.biases must be float tensors shaped like the words")
    bits, rem = divmod(words.shape[-1] * 32, cols)
    group = cols // max(1, scales.shape[-1])
    if (rem or group * scales.shape[-1] != cols or tuple(scales.shape) != tuple(biases.shape)
            or tuple(scales.shape[:-1]) != tuple(words.shape[:-1])):
        raise DgrunError(f"{path}: {name} {list(words.shape)} with scales {list(scales.shape)} and biases "
                         f"{list(biases.shape)} does not hold rows of {cols}")
    check_params(bits, group, cols, f"{path}: {name}")
    declared = (quant or {}).get(module_path(name))
    declared = declared if isinstance(declared, dict) else quant or {}
    if declared and (declared.get("bits", bits), declared.get("group_size", group)) != (bits, group):
        raise DgrunError(f"{path}: {name} is stored as {bits}-bit group {group}, config.json says "
                         f"{declared.get('bits')}-bit group {declared.get('group_size')}")
    return AffineTensor(words.numpy(), scales, biases, group, bits)


def load(path: Path) -> Checkpoint:
    config, args = read_config(path)
    quant = quant_block(config, path)
    raw = read_raw(path)
    shapes = expected_shapes(args)
    weights, vision = {}, False
    for name, tensor in raw.items():
        if name.endswith(QUANT_PARTS):
            continue
        flat = flat_name(name)
        if flat is None:
            vision |= bool(HF_VISION.match(name))
            if not (vision or name.startswith(("lm_head.", "model.encoder.language_model."))):
                raise DgrunError(f"{path}: unexpected tensor {name[:120]!r}: not a DiffusionGemma checkpoint?")
            continue
        if flat not in shapes:
            raise DgrunError(f"{path}: unexpected tensor {name[:120]!r} for this config")
        packed = module_path(name) + ".scales" in raw and not tensor.dtype.is_floating_point
        weights[flat] = _affine(name, raw, quant, shapes[flat][-1], path) if packed else tensor
    if vision:
        notice("skipping the vision tower: image input is not supported yet")
    defaults, args = read_generation_config(path, args)
    try:
        check_shapes(weights, args)
    except DgrunError as e:
        raise DgrunError(f"{path}: {e}") from None
    return Checkpoint(args, weights, defaults, path, tokenizer.from_dir(path, args.vocab_size))
