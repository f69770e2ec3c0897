"""`dgrun convert` and `dgrun info` through the real CLI entry point: outputs, one-line errors, atomic writes."""

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from llama_layout import write_llama_gguf
from tiny import SHAPE_A

import dgrun.convert.gguf_writer as gguf_writer
from dgrun.cli import main


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err, expect: str):
    """Non-zero exit and exactly one stderr line, `dgrun: error: ...`, that says what is wrong."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("dgrun: skipping the vision")]
    assert rc != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("dgrun: error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def good(ckpt_a, tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("g") / "good.gguf", ckpt_a, SHAPE_A, canvas=16)


def test_convert_then_info(ckpt_bf16, tmp_path, capsys):
    out = tmp_path / "m-Q8_0.gguf"
    rc, _, err = cli(capsys, "convert", ckpt_bf16, "--to", "gguf-q8", "-o", out)
    assert rc == 0 and out.is_file() and "wrote" in err
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {QT.Q8_0, QT.F32}
    rc, text, _ = cli(capsys, "info", out)
    assert rc == 0
    for needle in ("diffusion-gemma", "canvas_length    16", "Q8_0", "MOSTLY_Q8_0", "gemma4, 160 tokens", "steps"):
        assert needle in text, needle
    rc, text, _ = cli(capsys, "info", ckpt_bf16, "--json")
    d = json.loads(text)
    assert d["format"] == "safetensors" and d["canvas_length"] == 16 and d["sampler_defaults"]["steps"] == 24
    assert set(d["types"]) == {"BF16"} and d["tensors"] == 7 + 5 * 23 + 22 - 1  # no rope_freqs in safetensors


def test_default_output_name_and_force(ckpt_bf16, tmp_path, capsys):
    src = tmp_path / "ck"
    src.symlink_to(ckpt_bf16, target_is_directory=True)
    rc, _, err = cli(capsys, "convert", src, "--to", "gguf-bf16")
    assert rc == 0 and (tmp_path / "ck-BF16.gguf").is_file()
    rc, _, err = cli(capsys, "convert", tmp_path / "ck-BF16.gguf", "--to", "gguf-f16")
    assert rc == 0 and (tmp_path / "ck-F16.gguf").is_file()
    one_error_line(*cli(capsys, "convert", src, "--to", "gguf-bf16")[::2], "already exists (use --force")
    assert cli(capsys, "convert", src, "--to", "gguf-bf16", "--force")[0] == 0


# --- bad input: one line, non-zero exit ------------------------------------------------------------------

def test_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_text("just some text, not a model\n")
    one_error_line(*cli(capsys, "info", bad)[::2], "not a GGUF file")
    one_error_line(*cli(capsys, "run", "-m", bad, "--ids", "1,2")[::2], "not a GGUF file")


def test_truncated(good, tmp_path, capsys):
    data = good.read_bytes()
    for n, name in ((len(data) // 2, "half.gguf"), (200, "head.gguf")):
        cut = tmp_path / name
        cut.write_bytes(data[:n])
        one_error_line(*cli(capsys, "info", cut)[::2], "truncated GGUF")
        one_error_line(*cli(capsys, "convert", cut, "-o", tmp_path / "o.gguf")[::2], "truncated GGUF")
    assert not (tmp_path / "o.gguf").exists()


def test_foreign_architecture(ckpt_a, tmp_path, capsys):
    path = write_llama_gguf(tmp_path / "llama.gguf", ckpt_a, SHAPE_A, canvas=16, arch="llama")
    one_error_line(*cli(capsys, "info", path)[::2], "architecture 'llama' is not DiffusionGemma")


def test_unsupported_tensor_type(ckpt_a, tmp_path, capsys):
    q2k = (np.zeros((160, 84), dtype=np.uint8), QT.Q2_K)  # one 256-wide Q2_K row block per row
    path = write_llama_gguf(tmp_path / "q2k.gguf", ckpt_a, SHAPE_A, canvas=16, extra={"blk.0.ffn_up.weight": q2k})
    one_error_line(*cli(capsys, "info", path)[::2], "has type Q2_K, which dgrun does not support")


def test_shape_inconsistent_with_metadata(ckpt_a, tmp_path, capsys):
    path = write_llama_gguf(tmp_path / "s.gguf", ckpt_a, SHAPE_A, canvas=16,
                            meta_override={"diffusion-gemma.expert_feed_forward_length": 16})
    one_error_line(*cli(capsys, "info", path)[::2], "expected [8, 32, 64] from the config")


def test_missing_tensor(ckpt_a, tmp_path, capsys):
    path = write_llama_gguf(tmp_path / "m.gguf", ckpt_a, SHAPE_A, canvas=16, drop="blk.2.attn_q.weight")
    one_error_line(*cli(capsys, "run", "-m", path, "--ids", "1,2")[::2], "missing tensor blk.2.attn_q.weight")


def test_existing_output_without_force(good, tmp_path, capsys):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    one_error_line(*cli(capsys, "convert", good, "-o", out)[::2], "already exists (use --force")
    assert out.read_bytes() == b"keep me"


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    one_error_line(*cli(capsys, "convert", tmp_path, "-o", tmp_path / "o.gguf")[::2], "no config.json")
    one_error_line(*cli(capsys, "info", tmp_path)[::2], "no config.json")


def test_bad_options(good, tmp_path, capsys):
    rc, _, err = cli(capsys, "convert", good, "--to", "gguf-q3", "-o", tmp_path / "o.gguf")
    one_error_line(rc, err, "unknown --to")
    for target in ("gguf-q4", "gguf-q5", "gguf-q6", "mlx-q4", "mlx-q8", "mlx-bf16", "Q4_K_M", "Q5_K_M", "Q6_K"):
        assert target in err, target  # every target --help lists, the mlx ones too
    one_error_line(*cli(capsys, "convert", good, "--tensor-type", "attn_q", "-o", tmp_path / "o.gguf")[::2],
                   "GLOB=TYPE")


# --- llama.cpp's type names as targets (issue 13) ------------------------------------------------------------

def k_mix(base: str, fallback: str, more: str = "Q6_K") -> dict:
    """llama-quantize's choice for ckpt_k (src/llama-quant.cpp, LLAMA_FTYPE_MOSTLY_Q5_K_M / _Q6_K): `base`
    everywhere, Q6_K on the more-bits layers' ffn_down / attn_v, the 32-block `fallback` for 96/128-wide rows
    that 256 does not divide, and Q8_0 for those rows on the more-bits layers."""
    want = {"token_embd.weight": "Q6_K", "self_cond_down.weight": base}
    for i in range(4):
        b = f"blk.{i}."
        want.update({b + "attn_q.weight": base, b + "ffn_gate_up_exps.weight": base,
                     b + "ffn_down.weight": more if i >= 2 else base,
                     b + "ffn_down_exps.weight": "Q8_0" if i >= 2 or base == "Q6_K" else fallback,
                     b + "attn_output.weight": base if i == 3 else fallback})
        if i < 3:
            want[b + "attn_v.weight"] = more if i == 2 else base
    return want


@pytest.mark.parametrize("to,base,fallback,file_type", [("Q5_K_M", "Q5_K", "Q5_1", 17), ("q6_k", "Q6_K", "Q8_0", 18)])
def test_llama_cpp_type_names(ckpt_k, tmp_path, capsys, to, base, fallback, file_type):
    out = tmp_path / f"k-{to}.gguf"
    rc, _, err = cli(capsys, "convert", ckpt_k, "--to", to, "-o", out)
    assert rc == 0, err
    r = gguf.GGUFReader(out)
    got = {t.name: t.tensor_type.name for t in r.tensors}
    want = k_mix(base, fallback)
    assert {k: got[k] for k in want} == want
    assert r.fields["general.file_type"].contents() == file_type


def test_q8_0_and_bf16_by_name(ckpt_bf16, tmp_path, capsys):
    for to, want in (("Q8_0", {QT.Q8_0, QT.F32}), ("bf16", {QT.BF16, QT.F32})):
        rc, _, err = cli(capsys, "convert", ckpt_bf16, "--to", to, "-o", tmp_path / f"{to}.gguf")
        assert rc == 0, err
        assert {t.tensor_type for t in gguf.GGUFReader(tmp_path / f"{to}.gguf").tensors} == want


# --- atomic writes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_failed_convert_leaves_no_file(failure, good, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    encode = gguf_writer.encode

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 40:  # part-way through the tensors
            raise failure("simulated crash")
        return encode(*args)

    monkeypatch.setattr(gguf_writer, "encode", flaky)
    out = tmp_path / "o.gguf"
    rc, _, err = cli(capsys, "convert", good, "--to", "gguf-q8", "-o", out)
    one_error_line(rc, err, "interrupted" if failure is KeyboardInterrupt else "simulated crash")
    assert calls["n"] >= 40 and list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous")  # with --force, a failure keeps the old file whole
    calls["n"] = 0
    assert cli(capsys, "convert", good, "--to", "gguf-q8", "-o", out, "--force")[0] != 0
    assert out.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [out]
