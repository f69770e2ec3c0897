"""`dgrun convert --to mlx-*` (the MLX community layout) and `dgrun run --backend mlx` end to end."""

import json

import pytest
from safetensors import safe_open

mx = pytest.importorskip("mlx.core")

from dgrun.cli import main  # noqa: E402
from dgrun.convert.mlx_writer import convert_mlx  # noqa: E402


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err, expect: str):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("dgrun: skipping", "dgrun: warn"))]
    assert rc != 0 and len(lines) == 1, err
    assert lines[0].startswith("dgrun: error: ") and expect in lines[0], lines[0]


def tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            assert st.metadata() == {"format": "mlx"}
            for k in st.keys():
                out[k] = (f.name, st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape()))
    return out


@pytest.fixture(scope="module")
def mlx_q4(ckpt_bf16, tmp_path_factory):
    out = tmp_path_factory.mktemp("mq4") / "m-mlx-q4"
    rc = main(["convert", str(ckpt_bf16), "--to", "mlx-q4", "-o", str(out)])
    assert rc == 0
    return out


def test_q4_layout(mlx_q4, ckpt_bf16):
    config = json.loads((mlx_q4 / "config.json").read_text())
    q = config["quantization"]
    assert config["quantization_config"] == q and {k: q[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": 64, "bits": 4, "mode": "affine"}
    # The mix: everything but the experts at 8 bits, listed per module as mlx-vlm does; experts at the default.
    assert q["model.decoder.embed_tokens"]["bits"] == 8
    assert q["model.decoder.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 8}
    assert q["model.decoder.layers.0.router.proj"]["bits"] == q["model.decoder.layers.0.mlp.down_proj"]["bits"] == 8
    assert "model.decoder.layers.0.experts.gate_up_proj" not in q
    text = config["text_config"]
    assert (text["global_head_dim"], text["num_global_key_value_heads"]) == (32, 1)  # flat keys for mlx-vlm
    t = tensors(mlx_q4)
    e, h, i = 8, 64, 32
    assert t["model.decoder.layers.0.experts.gate_up_proj.weight"][1:] == ("U32", (e, 2 * i, h * 4 // 32))
    assert t["model.decoder.layers.0.experts.gate_up_proj.scales"][1:] == ("BF16", (e, 2 * i, h // 64))
    assert t["model.decoder.layers.0.self_attn.q_proj.weight"][1] == "U32"
    assert t["model.decoder.layers.0.input_layernorm.weight"][1] == "BF16"
    assert "model.encoder.language_model.layers.0.layer_scalar" in t
    index = json.loads((mlx_q4 / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {k: v[0] for k, v in t.items()}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (mlx_q4 / name).read_bytes() == (ckpt_bf16 / name).read_bytes(), name


def test_run_from_mlx_directory(mlx_q4, capsys):
    rc, out, err = cli(capsys, "run", "-m", mlx_q4, "--backend", "mlx", "-p", "def add(a, b):", "-n", "20",
                       "--steps", "3", "-s", "1")
    assert rc == 0 and out.strip() and "\nblocks 2 | steps/block 3.0" in "\n" + err
    runs = [json.loads(cli(capsys, "run", "-m", mlx_q4, "--backend", "mlx", "--ids", "2,5,9", "-n", "16",
                           "--steps", "4", "-s", "9", "--json")[1])["ids"] for _ in range(2)]
    assert runs[0] == runs[1]


def test_run_from_gguf_and_convert_it(ckpt_bf16, tmp_path, capsys):
    gguf = tmp_path / "m-Q8_0.gguf"
    assert cli(capsys, "convert", ckpt_bf16, "--to", "gguf-q8", "-o", gguf)[0] == 0
    rc, out, _ = cli(capsys, "run", "-m", gguf, "--backend", "mlx", "--ids", "2,5,9", "-n", "16", "--steps", "3",
                     "--json")
    assert rc == 0 and len(json.loads(out)["ids"]) <= 16
    # GGUF -> MLX: config.json, generation_config.json and the tokenizer are rebuilt from the GGUF's metadata.
    assert cli(capsys, "convert", gguf, "--to", "mlx-q4", "-o", tmp_path / "from-gguf")[0] == 0
    out = tmp_path / "from-gguf"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] == 24 and gen["sampler_config"] == {"entropy_bound": 0.2}
    rc, text, _ = cli(capsys, "run", "-m", out, "--backend", "mlx", "-p", "def add(a, b):", "-n", "8", "--steps", "2")
    assert rc == 0 and text.strip()


def test_quantize_at_load_from_the_cli(ckpt_a, capsys):
    rc, out, _ = cli(capsys, "run", "-m", ckpt_a, "--backend", "mlx", "--dtype", "q4", "--ids", "2,5,9", "-n", "8",
                     "--steps", "2", "--json")
    assert rc == 0 and json.loads(out)["ids"]


def test_q8_bf16_and_shards(ckpt_a, tmp_path):
    q8 = convert_mlx(ckpt_a, to="mlx-q8", out=tmp_path / "q8", max_shard_bytes=100_000)
    assert q8.shards > 1 and set(q8.quantized.values()) <= {(8, 64), (8, 32)}
    files = sorted(p.name for p in q8.path.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{q8.shards:05d}.safetensors" for i in range(1, q8.shards + 1)]
    index = json.loads((q8.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    bf16 = convert_mlx(ckpt_a, to="mlx-bf16", out=tmp_path / "bf16")
    assert "quantization" not in json.loads((bf16.path / "config.json").read_text())
    assert {v[1] for v in tensors(bf16.path).values()} == {"BF16"}
    import dgrun

    m = dgrun.load(bf16.path, backend="mlx")
    assert m.backend.dtype == mx.bfloat16 and m.generate([2, 5], max_new_tokens=8, steps=2).ids is not None


@pytest.mark.parametrize("argv, expect", [
    (["--to", "mlx-q3"], "unknown --to 'mlx-q3'"),
    (["--to", "mlx-q4", "--q-bits", "7"], "--q-bits 7"),
    (["--to", "mlx-q4", "--q-group-size", "48"], "--q-group-size 48"),
    (["--to", "mlx-bf16", "--q-bits", "4"], "apply to mlx-q4 and mlx-q8"),
    (["--to", "gguf-q8", "--q-bits", "4"], "apply to the mlx-* targets"),
])
def test_bad_flags(ckpt_b, tmp_path, capsys, argv, expect):
    one_error_line(*cli(capsys, "convert", ckpt_b, "-o", tmp_path / "out", *argv)[::2], expect)
    assert not (tmp_path / "out").exists()


def test_bad_mlx_directory(mlx_q4, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mlx_q4, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization"]["mode"] = "mxfp4"
    (bad / "config.json").write_text(json.dumps(config))
    one_error_line(*cli(capsys, "run", "-m", bad, "--backend", "mlx", "--ids", "2")[::2], "mode 'mxfp4'")
    config["quantization"] = {"group_size": 64, "bits": 4, "model.decoder.embed_tokens": {"group_size": 64,
                                                                                          "bits": 4}}
    (bad / "config.json").write_text(json.dumps(config))
    one_error_line(*cli(capsys, "run", "-m", bad, "--backend", "cpu", "--ids", "2")[::2], "config.json says 4-bit")


def test_info_on_mlx_directory(ckpt_a, tmp_path, capsys):
    import dgrun
    from dgrun.cli import main
    from dgrun.models.diffusion_gemma import n_params

    out = tmp_path / "mlx-q4"
    assert main(["convert", str(ckpt_a), "--to", "mlx-q4", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "mlx" and data["canvas_length"] == 16
    assert data["parameters"] == n_params(dgrun.load(ckpt_a).args)


def test_info_counts_packed_u32_words(mlx_q4, capsys):
    """Issue 13: U32 (the packed 4-bit words) was missing from info's item sizes, so sizes came out 4x small."""
    data = 0
    for f in mlx_q4.glob("*.safetensors"):
        header = int.from_bytes(f.read_bytes()[:8], "little")
        data += f.stat().st_size - 8 - header
    rc, out, _ = cli(capsys, "info", mlx_q4, "--json")
    d = json.loads(out)
    assert rc == 0 and "U32" in d["types"] and d["bytes"] == data
