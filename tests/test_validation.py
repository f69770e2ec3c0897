"""Every value a checkpoint holds is checked before use: one DgrunError naming the key and the value."""

import json
import os
import shutil
import struct

import pytest

import dgrun
from dgrun.errors import DgrunError
from dgrun.generate import SamplerConfig
from fuzz import gguf_parse, gguf_write


@pytest.fixture
def hf(ckpt_a, tmp_path):
    """A private copy of ckpt_a (hard links, so writing a file means replacing it)."""
    dst = tmp_path / "m"
    shutil.copytree(ckpt_a, dst, copy_function=os.link)
    return dst


def put(path, data):
    """Replace a file (never write through a hard link into the shared checkpoint)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def rewrite_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    put(path, json.dumps(data))


def load_error(path) -> str:
    with pytest.raises(DgrunError) as e:
        dgrun.load(path, backend="cpu")
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("key, value, needle", [
    ("canvas_length", 10**6, "canvas_length = 1000000"),
    ("sliding_window", 0, "sliding_window = 0"),
    ("num_attention_heads", float("nan"), "num_attention_heads = nan"),
    ("hidden_size", "64", "hidden_size = '64'"),
    ("num_key_value_heads", 3, "3 kv heads for 4 query heads"),
    ("top_k_experts", 9, "top_k_experts = 9"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps = inf"),
    ("layer_types", ["sliding_attention"] * 5, "expected 6 entries, found 5"),
    ("layer_types", ["sliding_attention", "chunked"] * 3, "'chunked'"),
    ("rope_parameters", [1, 2], "rope_parameters = [1, 2]"),
    ("per_layer_config", {"5": {"head_dim": -1}}, "head_dim = -1"),
    ("eos_token_id", [1, 10**9], "eos_token_id = 1000000000"),
])
def test_config_values(hf, key, value, needle):
    def edit(cfg):
        target = cfg if key == "canvas_length" else cfg["text_config"]
        target[key] = value
    rewrite_json(hf / "config.json", edit)
    message = load_error(hf)
    assert needle in message and "config.json" in message, message


@pytest.mark.parametrize("key, value, needle", [
    ("t_max", "hot", "t_max = 'hot'"),
    ("max_denoising_steps", 10**12, "steps = 1000000000000"),
    ("stability_threshold", 524_290, "stability_threshold = 524290"),
    ("confidence_threshold", float("nan"), "confidence_threshold = nan"),
    ("sampler_config", {"entropy_bound": -1}, "entropy_bound = -1"),
    ("eos_token_id", "x", "eos_token_id = 'x'"),
])
def test_generation_config_values(hf, key, value, needle):
    put(hf / "generation_config.json", json.dumps({key: value}))
    message = load_error(hf)
    assert needle in message and "generation_config.json" in message, message


def test_json_is_bounded(hf):
    put(hf / "generation_config.json", "[" * 100_000 + "]" * 100_000)
    assert "cannot read JSON" in load_error(hf)
    put(hf / "generation_config.json", json.dumps({"a": json.loads("[" * 40 + "]" * 40)}))
    assert "nested deeper than 32" in load_error(hf)
    put(hf / "generation_config.json", b'{"t_min": "\xff"}')
    assert "cannot read JSON" in load_error(hf)


def test_tokenizer_checked_at_load(hf):
    tok = json.loads((hf / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<far>"] = 10_000
    put(hf / "tokenizer.json", json.dumps(tok))
    message = load_error(hf)
    assert "tokenizer.json" in message and "id 10000, past the model's vocab of 160" in message
    put(hf / "tokenizer.json", '{"model": {"type": "BPE", "vocab": 3}}')
    assert "tokenizer.json: cannot read tokenizer" in load_error(hf)


def test_safetensors_dtype(hf):
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(hf / "model.safetensors")
    w["model.decoder.norm.weight"] = w["model.decoder.norm.weight"].to(torch.int32)
    (hf / "model.safetensors").unlink()
    save_file(w, hf / "model.safetensors")
    assert "tensor output_norm.weight has dtype I32" in load_error(hf)


def test_sampler_config_checks():
    for knobs, needle in [(dict(steps=0), "steps = 0"), (dict(steps=True), "steps = True"),
                          (dict(t_min=float("nan")), "t_min = nan"), (dict(t_max=0.1), "t_max = 0.1 must be >= t_min"),
                          (dict(max_new_tokens=2**40), "max_new_tokens"), (dict(entropy_bound="0.1"), "entropy_bound")]:
        with pytest.raises(DgrunError, match=needle.replace("(", r"\(")):
            SamplerConfig(**knobs)
    assert SamplerConfig(t_min=0, t_max=1).t_min == 0.0


@pytest.fixture(scope="module")
def gguf_seed(ckpt_a, tmp_path_factory):
    from dgrun.convert.convert import convert

    return convert(ckpt_a, to="gguf-q8", out=tmp_path_factory.mktemp("g") / "a-Q8_0.gguf").path


def edited_gguf(src, dst, edit):
    g = gguf_parse(src.read_bytes())
    edit(g)
    dst.write_bytes(gguf_write(g))
    return dst


def set_field(key, vtype, value, sub=None):
    def edit(g):
        f = next((f for f in g["fields"] if f[0] == key.encode()), None)
        if f is None:
            g["fields"].append([key.encode(), vtype, value, sub])
        else:
            f[1:] = [vtype, value, sub]
    return edit


@pytest.mark.parametrize("edit, needle", [
    (set_field("diffusion.canvas_length", 4, 2**31), "canvas_length = 2147483648"),
    (set_field("diffusion-gemma.attention.head_count", 8, b"four"), "head_count = 'four': expected int"),
    (set_field("diffusion-gemma.attention.layer_norm_rms_epsilon", 6, float("nan")), "rms_norm_eps = nan"),
    (set_field("diffusion-gemma.attention.sliding_window", 4, 0), "sliding_window = 0"),
    (set_field("diffusion-gemma.expert_used_count", 4, 99), "top_k_experts = 99"),
    (set_field("diffusion-gemma.attention.sliding_window_pattern", 9, [True, False], 7),
     "expected 6 booleans"),
    (set_field("diffusion.eb_t_max", 6, float("inf")), "t_max = inf"),
    (set_field("general.alignment", 4, 0), "general.alignment 0 is not a power of two"),
    (lambda g: g["tensors"][1].__setitem__(3, g["tensors"][0][3]), "overlap"),
    (lambda g: g["tensors"][1].__setitem__(3, g["tensors"][1][3] + 1), "is not aligned"),
    (lambda g: g["tensors"][0].__setitem__(1, [2**33, 2**33]), "has a dimension of"),
    (lambda g: g["tensors"][0].__setitem__(3, 2**40), "runs past the end of the file"),
    (lambda g: g["fields"].append(list(g["fields"][0])), "appears twice"),
])
def test_gguf_values(gguf_seed, tmp_path, edit, needle):
    path = edited_gguf(gguf_seed, tmp_path / "x.gguf", edit)
    message = load_error(path)
    assert needle in message and str(path) in message, message


def test_gguf_counts_checked_before_reading(gguf_seed, tmp_path):
    data = bytearray(gguf_seed.read_bytes())
    data[8:16] = struct.pack("<Q", 2**40)  # tensor count
    (tmp_path / "a.gguf").write_bytes(data)
    assert "1099511627776 tensors" in load_error(tmp_path / "a.gguf")
    data = bytearray(gguf_seed.read_bytes())
    data[16:24] = struct.pack("<Q", 60_000)  # metadata count: allowed, but more than the file can hold
    (tmp_path / "b.gguf").write_bytes(data)
    assert "truncated GGUF" in load_error(tmp_path / "b.gguf")


def test_one_type_table():
    """The types a GGUF may hold (dgrun/packed.py) are exactly those the quantizers write and --tensor-type names."""
    from dgrun.convert import policy, quants
    from dgrun.packed import GGUF_TYPES

    assert set(quants.TYPES) == set(GGUF_TYPES) == set(policy.OVERRIDE_TYPES.values())
