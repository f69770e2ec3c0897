"""Read an MLX-format DiffusionGemma directory (as mlx-vlm / mlx-lm write it, and `dgrun convert --to mlx-*`).

The layout is the HF checkpoint's, with two differences: the expert tensors end in `.weight`, and a quantized
matrix P is `P.weight` (uint32 words) + `P.scales` + `P.biases`, described by config.json's `quantization`
block (`group_size`, `bits`, `mode`, and per-module overrides keyed by module path). Weights come out as the
flat dict (GGUF names): float tensors as torch, quantized ones as `AffineTensor`.
"""

from __future__ import annotations

import re
from pathlib import Path

from dgrun.checkpoint import Checkpoint, check_shapes, read_generation_config, read_json
from dgrun.convert.affine import AffineTensor, check_params
from dgrun.errors import DgrunError, notice
from dgrun.models.diffusion_gemma import HF_TO_GGUF, HF_VISION, ModelArgs, expected_shapes, hf_to_gguf_name

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
    except Exception:  # an unreadable file is reported by the HF loader with its own message
        return False


def read_raw(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DgrunError(f"{path}: no *.safetensors files")
    raw = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    if not HF_VISION.match(k):
                        raw[k] = st.get_tensor(k)
                    else:
                        raw[k] = None  # noted, never read
        except (SafetensorError, OSError) as e:
            raise DgrunError(f"{f}: cannot read safetensors ({e})") from e
    return raw


def quant_block(config: dict, path: Path) -> dict | None:
    q = config.get("quantization") or config.get("quantization_config")
    if q is None:
        return None
    if q.get("mode", "affine") != "affine":
        raise DgrunError(f"{path}: MLX quantization mode {q.get('mode')!r} is not supported (affine only)")
    return q


def _affine(name: str, raw: dict, quant: dict | None, cols: int, path: Path) -> AffineTensor:
    words, scales, biases = raw[name], raw.get(module_path(name) + ".scales"), raw.get(module_path(name) + ".biases")
    if scales is None or biases is None:
        raise DgrunError(f"{path}: {name} is packed but {module_path(name)}.scales/.biases are missing")
    bits, rem = divmod(words.shape[-1] * 32, cols)
    group = cols // max(1, scales.shape[-1])
    if rem or group * scales.shape[-1] != cols or tuple(scales.shape) != tuple(biases.shape):
        raise DgrunError(f"{path}: {name} {list(words.shape)} with scales {list(scales.shape)} does not hold "
                         f"rows of {cols}")
    check_params(bits, group, cols, f"{path}: {name}")
    declared = (quant or {}).get(module_path(name))
    declared = declared if isinstance(declared, dict) else quant or {}
    if declared and (declared.get("bits", bits), declared.get("group_size", group)) != (bits, group):
        raise DgrunError(f"{path}: {name} is stored as {bits}-bit group {group}, config.json says "
                         f"{declared.get('bits')}-bit group {declared.get('group_size')}")
    return AffineTensor(words.numpy(), scales, biases, group, bits)


def load_mlx_dir(path: Path) -> Checkpoint:
    config = read_json(path / "config.json")
    args = ModelArgs.from_config(config)
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
                raise DgrunError(f"{path}: unexpected tensor {name!r}: not a DiffusionGemma checkpoint?")
            continue
        if flat not in shapes:
            raise DgrunError(f"{path}: unexpected tensor {name!r} for this config")
        packed = module_path(name) + ".scales" in raw and not tensor.dtype.is_floating_point
        weights[flat] = _affine(name, raw, quant, shapes[flat][-1], path) if packed else tensor
    if vision:
        notice("skipping the vision tower: image input is not supported yet")
    try:
        check_shapes(weights, args)
    except DgrunError as e:
        raise DgrunError(f"{path}: {e}") from None
    defaults = read_generation_config(path, args)
    return Checkpoint(args, weights, defaults, path)
