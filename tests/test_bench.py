"""`dgrun bench` and its random weights, on the CPU at the tiny shape: the table's rows, the fixed step count,
bad flags, the packed bytes of each mix, the mlx backend, the transformers comparison and `--gpu-check`."""

import importlib.util
import json
import subprocess
import sys

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from dgrun import bench
from dgrun.bench_weights import make_backend
from dgrun.cli import main
from dgrun.models.diffusion_gemma import expected_shapes
from dgrun.packed import DevicePacked
from dgrun.random_weights import ARCH_26B_A4B, ARCH_TINY, parse_spec, random_weights, types

CMD = ["bench", "--random-weights", "tiny:Q8_0", "-p", "16", "-b", "1,2", "--steps", "2", "--json"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def figures(row):
    return {k: v for k, v in row.items() if isinstance(v, dict)}


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_bench_json_rows(capsys, backend):
    if backend == "mlx" and importlib.util.find_spec("mlx") is None:
        pytest.skip("mlx is not installed")
    extra = ["-b", "1", "-r", "1", "--steps", "1"] if backend == "mlx" else []  # mlx[cpu] is slow: one of each
    code, out, err = run_cli(capsys, *CMD, "--backend", backend, *extra)
    assert code == 0, err
    report = json.loads(out)
    assert report["backend"] == backend and "speed does not depend on weight values" in report["weights"]
    batches = [1] if backend == "mlx" else [1, 2]
    steps = 1 if backend == "mlx" else 2
    assert [(r["prompt"], r["batch"], r["steps"]) for r in report["rows"]] == [(16, b, steps) for b in batches]
    assert report["step_bytes"] > 0 and report["copy_bandwidth_gb_s"] > 0
    for row in report["rows"]:
        assert all(f["mean"] > 0 and f["sd"] >= 0 for f in figures(row).values()), row
        assert 0 < row["roofline"]["mean"] < 1.5
        assert row["peak_mem_mb"] > 0


def test_table_has_one_row_per_config(capsys):
    code, out, err = run_cli(capsys, *CMD[:-1], "--backend", "cpu", "-r", "1", "-b", "1,3", "-p", "8,16")
    assert code == 0, err
    lines = out.splitlines()
    assert "random tiny:Q8_0 (speed does not depend on weight values)" in lines[0]
    assert lines[1].startswith("weights read per step:")
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0].startswith("| prompt | B | steps | prefill tok/s | ms/step | ms/commit | tok/s |")
    assert [tuple(ln.split(" | ")[:3]) for ln in table[1:]] == [
        ("| 8", "1", "2"), ("| 8", "3", "2"), ("| 16", "1", "2"), ("| 16", "3", "2")]


class Counting:
    """A backend that counts its step and done calls."""

    def __init__(self, inner):
        self.inner, self.steps, self.dones = inner, 0, 0

    def step(self, state, cache):
        self.steps += 1
        return self.inner.step(state, cache)

    def done(self, state):
        self.dones += 1
        return self.inner.done(state)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def tiny_cpu():
    return make_backend("cpu", ARCH_TINY, random_weights(ARCH_TINY, "Q4_K_M"), "float32")


def test_fixed_steps_ignore_done(tiny_cpu):
    be = Counting(tiny_cpu)
    row = bench.measure(be, prompt=8, batch=2, steps=3, reps=2)
    assert be.steps == be.dones == bench.WARMUP_STEPS + 2 * 3
    assert len(row["step_ms_runs"]) == 2 and "eff_tok_s" not in row


def test_adaptive_stops_within_the_step_limit(tiny_cpu):
    row = bench.measure(tiny_cpu, prompt=8, batch=1, steps=3, reps=1, adaptive=True)
    assert row["eff_tok_s"]["mean"] > 0 and 1 <= row["adaptive_steps"]["mean"] <= 3


@pytest.mark.parametrize("argv, needle", [
    (["--random-weights", "huge:Q4_K_M"], "ARCH one of 26b-a4b, tiny"),
    (["--random-weights", "tiny"], "ARCH:MIX"),
    (["--random-weights", "tiny:Q3_K"], "MIX one of Q4_K_M, Q8_0, BF16"),
    (["-p", "0"], "--n-prompt"),
    (["-b", "1,x"], "--batch"),
    (["--steps", "0"], "--steps"),
    (["--backend", "tpu"], "--backend"),
])
def test_bad_flags_one_line_exit_2(capsys, argv, needle):
    code, out, err = run_cli(capsys, "bench", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dgrun: error:") and needle in lines[0], err
    assert out == ""


def test_spec_parsing():
    args, mix = parse_spec("26B-A4B:q4_k_m")
    assert mix == "Q4_K_M" and args.num_hidden_layers == 30 and args.num_experts == 128
    assert parse_spec("tiny:BF16")[1] == "BF16"


def test_26b_shape_and_mix_types():
    a = ARCH_26B_A4B
    assert (a.hidden_size, a.num_experts, a.top_k_experts, a.moe_intermediate_size, a.intermediate_size) == \
        (2816, 128, 8, 704, 2112)
    assert [s.sliding for s in a.layers[:6]] == [True] * 5 + [False] and a.layers[5].k_eq_v
    assert (a.layers[0].head_dim, a.layers[0].n_kv_heads, a.layers[5].head_dim, a.layers[5].n_kv_heads) == (256, 8, 512, 2)
    t = types(a, "Q4_K_M")
    assert t["token_embd.weight"] == QT.Q6_K
    assert t["blk.3.ffn_down_exps.weight"] == QT.Q5_0 and t["blk.0.ffn_down_exps.weight"] == QT.Q8_0  # 704 wide
    assert t["blk.3.ffn_down.weight"] == QT.Q5_0 and t["self_cond_down.weight"] == QT.Q5_0  # 2112 wide
    assert t["blk.3.ffn_gate_up_exps.weight"] == QT.Q4_K and t["blk.0.attn_v.weight"] == QT.Q6_K
    assert t["blk.0.ffn_gate_inp.weight"] == QT.F32 and "blk.5.attn_v.weight" not in t  # k_eq_v
    assert types(a, "Q8_0")["token_embd.weight"] == QT.Q8_0 == types(a, "Q8_0")["blk.3.ffn_down_exps.weight"]
    assert types(a, "BF16")["blk.3.ffn_down_exps.weight"] == QT.BF16


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q8_0", "BF16"])
def test_random_weights_decode_finite(mix):
    w = random_weights(ARCH_TINY, mix, "cpu", seed=3)
    shapes, want = expected_shapes(ARCH_TINY), types(ARCH_TINY, mix)
    assert set(w) == set(shapes)
    seen = set()
    for name, v in w.items():
        if isinstance(v, DevicePacked):
            assert v.qtype == want[name] and v.shape == shapes[name]
            x = gguf.quants.dequantize(v.data.numpy(), v.qtype)
            assert x.shape == shapes[name] and np.isfinite(x).all() and 0.005 < x.std() < 0.2, name
            seen.add(v.qtype)
        else:
            assert tuple(v.shape) == shapes[name] and torch.isfinite(v.float()).all()
            assert v.dtype == (torch.bfloat16 if want[name] == QT.BF16 else torch.float32), name
    if mix == "Q4_K_M":  # the tiny arch keeps the real mix's variety
        assert seen == {QT.Q4_K, QT.Q5_0, QT.Q6_K, QT.Q8_0}
        assert w["blk.3.ffn_down_exps.weight"].qtype == QT.Q5_0 and w["token_embd.weight"].qtype == QT.Q6_K


def test_step_bytes_follow_the_mix():
    sizes = {m: bench.step_bytes(random_weights(ARCH_TINY, m)) for m in ("Q4_K_M", "Q8_0", "BF16")}
    assert sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["BF16"]


def test_reference_config_matches_the_arch():
    pytest.importorskip("transformers")
    from dgrun.bench_reference import build
    from dgrun.models.diffusion_gemma import n_params

    ref, how = build(ARCH_TINY, None, "cpu", torch.float32)
    n = sum(p.numel() for k, p in ref.named_parameters() if "vision" not in k)
    layer_scalars = 2 * ARCH_TINY.num_hidden_layers  # buffers in transformers, weights in the GGUF layout
    assert n + layer_scalars == n_params(ARCH_TINY) and "random init" in how


def test_against_transformers(capsys, ckpt_a):
    pytest.importorskip("transformers")
    code, out, err = run_cli(capsys, "bench", "-m", str(ckpt_a), "--backend", "cpu", "-p", "8", "--steps", "1",
                             "-r", "1", "--against-transformers", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert "from_pretrained" in report["reference"]["described"]
    assert report["reference"]["rows"][0]["ms_per_step"]["mean"] > 0
    assert report["rows"][0]["speedup"] > 0
    from dgrun.cli.bench import render

    assert "| speedup |" in render(report)


def test_gpu_check_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-m", "dgrun.bench", "--gpu-check"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "dgrun: --gpu-check needs a CUDA GPU, and torch.cuda.is_available() is False here"]


def test_gpu_check_report_and_exit_code(monkeypatch, capsys):
    """The driver without a GPU: every part reported, a failed one makes the exit code 1."""
    from dgrun import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "FakeGPU")
    fake = {name: ("ok", 1.0, f"{name} output") for name in gpu_check.PARTS}
    fake["graphs"] = ("FAIL", 2.0, "step 1: graphs on and off differ")
    monkeypatch.setattr(gpu_check, "run_part", lambda name: fake[name])
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out
    assert out.startswith("# dgrun --gpu-check · FakeGPU")
    assert "| graphs | CUDA graphs on vs off | FAIL | 2 (45) |" in out
    assert all(f"## {name}" in out for name in gpu_check.PARTS) and "graphs on and off differ" in out
    assert sum(budget for budget, _ in gpu_check.PARTS.values()) <= 480  # under 8 minutes
