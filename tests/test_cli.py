"""`dgrun run` through the real entry point: output, JSON, and one clear line per bad input."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from dgrun.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.startswith("dgrun: error:")]
    assert code != 0 and len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_run_prints_text_then_stats(ckpt_a, capsys):
    code, out, err = run_cli(capsys, "run", "-m", str(ckpt_a), "-p", "def add(a, b):", "-n", "20", "--steps", "3",
                             "-s", "1")
    assert code == 0
    stats = next(line for line in err.splitlines() if line.startswith("blocks"))
    assert stats.startswith("blocks 2 | steps/block 3.0 | tokens/forward") and "tok/s" in stats
    assert "dgrun: blocks 0, 1 hit the 3-step limit without converging" in err  # as chat reports it
    assert out.strip()


def test_run_json_and_ids(ckpt_a, capsys):
    code, out, _ = run_cli(capsys, "run", "-m", str(ckpt_a), "--ids", "2,5,9 14", "-n", "10", "--steps", "2",
                           "--json", "--t-max", "0.9", "--t-min", "0.3", "--entropy-bound", "0.5", "--stability", "0",
                           "--confidence", "0.1", "--backend", "cpu")
    assert code == 0
    data = json.loads(out)
    assert data["stats"]["prompt_tokens"] == 4 and len(data["ids"]) <= 10
    assert set(data["stats"]) >= {"blocks", "steps_per_block", "tokens_per_forward", "seconds", "tokens_per_second"}
    assert all(s <= 2 for s in data["stats"]["steps_per_block"])


def test_same_seed_same_output(ckpt_a, capsys):
    outs = [run_cli(capsys, "run", "-m", str(ckpt_a), "--ids", "2,5,9", "-n", "16", "--steps", "4", "-s", "9",
                    "--json")[1] for _ in range(2)]
    assert json.loads(outs[0])["ids"] == json.loads(outs[1])["ids"]


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("dgrun ")
    code, out, _ = run_cli(capsys, "run", "--help")
    assert code == 0 and "Example" in out and "--entropy-bound" in out


@pytest.mark.parametrize("argv,needle", [
    (["-n", "0"], "max_new_tokens"),
    (["-n", "abc"], "--n-predict"),
    (["--t-min", "0.9", "--t-max", "0.5"], "t_max"),
    (["--steps", "-3"], "steps"),
    (["--entropy-bound", "0"], "entropy_bound"),
    (["--backend", "tpu"], "backend"),
    (["--dtype", "int3"], "dtype"),
    (["--bogus"], "--bogus"),
    (["--gap", "4"], "--gap needs --suffix"),
    (["--suffix", "y", "--gap", "16"], "gap must be between 1 and 15"),
    (["--suffix", ""], "non-empty suffix"),
])
def test_bad_flags(ckpt_a, capsys, argv, needle):
    code, _, err = run_cli(capsys, "run", "-m", str(ckpt_a), "-p", "x", *argv)
    assert_one_line_error(code, err, needle)


def test_bad_prompts(ckpt_a, ckpt_b, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no -p and nothing piped in
    assert_one_line_error(*run_cli(capsys, "run", "-m", str(ckpt_a))[::2], "--prompt")
    assert_one_line_error(*run_cli(capsys, "run", "-m", str(ckpt_a), "--ids", "1,x")[::2], "--ids")
    assert_one_line_error(*run_cli(capsys, "run", "-m", str(ckpt_a), "--ids", "1,99999")[::2], "out of range")
    assert_one_line_error(*run_cli(capsys, "run", "-m", str(ckpt_b), "-p", "hi")[::2], "tokenizer")
    assert_one_line_error(*run_cli(capsys, "run", "-m", str(ckpt_a), "--ids", "1,2", "--suffix", "y")[::2],
                          "--suffix needs a text prompt")


def broken_copy(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(dst / "model.safetensors")
        edit_tensors(t)
        save_file(t, dst / "model.safetensors")
    return dst


def test_bad_checkpoints(ckpt_b, tmp_path, capsys):
    def llama(cfg):
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])

    def wider(cfg):
        cfg["text_config"]["moe_intermediate_size"] = 40

    cases = [
        (tmp_path / "nope", "no such file"),
        (broken_copy(ckpt_b, tmp_path / "noconf", edit_config=None), None),
        (broken_copy(ckpt_b, tmp_path / "llama", edit_config=llama), "not a DiffusionGemma"),
        (broken_copy(ckpt_b, tmp_path / "shape", edit_config=wider), "ffn_gate_up_exps"),
        (broken_copy(ckpt_b, tmp_path / "missing",
                     edit_tensors=lambda t: t.pop("model.decoder.layers.1.self_attn.q_proj.weight")), "attn_q"),
        (broken_copy(ckpt_b, tmp_path / "garbage",
                     edit_tensors=lambda t: t.update({"model.decoder.layers.0.mystery.weight": t["model.decoder.norm.weight"].clone()})),
         "unexpected tensor"),
    ]
    (tmp_path / "noconf" / "config.json").unlink()
    cases[1] = (tmp_path / "noconf", "config.json")
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    cases.append((tmp_path / "junk.bin", "not a checkpoint"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{nope")
    cases.append((tmp_path / "badjson", "JSON"))
    for path, needle in cases:
        code, _, err = run_cli(capsys, "run", "-m", str(path), "--ids", "1,2")
        assert_one_line_error(code, err, needle)


def test_debug_env_shows_traceback(tmp_path):
    env = dict(os.environ, DGRUN_DEBUG="1")
    cmd = [sys.executable, "-m", "dgrun.cli", "run", "-m", str(tmp_path / "nope"), "-p", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    env.pop("DGRUN_DEBUG")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "dgrun: error:" in proc.stderr
