"""`dgrun run` as a llama.cpp / mlx-lm user drives it (issue 13): flag spellings, prompt inputs, sampling
flags, stats, and the small bugs found trying it as a new user. Through the real entry point."""

import io
import json
import re

import pytest
import torch

import dgrun
from dgrun.cli import main
from dgrun.generate import Block, Draft, Stats
from test_cli import assert_one_line_error

FAST = ["-n", "16", "--steps", "3", "-s", "1"]


def cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ids_of(capsys, *argv, **kw):
    code, out, err = cli(capsys, "run", *argv, "--json", **kw)
    assert code == 0, err
    return json.loads(out)


# --- llama.cpp's multi-letter short flags (bug 3) -----------------------------------------------------------

def test_no_cnv_is_raw_completion_and_cnv_applies_the_template(ckpt_chat, capsys):
    raw = ids_of(capsys, "-m", ckpt_chat, "-p", "hi", *FAST)
    assert ids_of(capsys, "-m", ckpt_chat, "-p", "hi", "-no-cnv", *FAST)["ids"] == raw["ids"]
    templated = ids_of(capsys, "-m", ckpt_chat, "-p", "hi", "-cnv", *FAST)
    assert templated["stats"]["prompt_tokens"] > raw["stats"]["prompt_tokens"]


def test_sys_on_run_renders_the_chat_template(ckpt_chat, capsys):
    code, out, err = cli(capsys, "run", "-m", ckpt_chat, "-sys", "be brief", "-p", "hi", *FAST, "--verbose-prompt")
    assert code == 0, err
    shown = "".join(re.findall(r"-> '(.*)'", err))
    assert "system" in shown and "be brief" in shown.replace("▁", " ") and "<|turn>" in shown
    assert "Invalid value" not in err
    code, _, err = cli(capsys, "run", "-m", ckpt_chat, "-sys", "x", "-no-cnv", "-p", "hi")
    assert_one_line_error(code, err, "chat template")


def test_chat_takes_cnv(ckpt_chat, capsys, monkeypatch):
    code, out, err = cli(capsys, "chat", "-m", ckpt_chat, "-cnv", *FAST, stdin="hello\n", monkeypatch=monkeypatch)
    assert code == 0 and out.strip(), err
    code, _, err = cli(capsys, "chat", "-m", ckpt_chat, "-no-cnv", stdin="hello\n", monkeypatch=monkeypatch)
    assert_one_line_error(code, err, "dgrun run")


def test_ngl_fa_and_unsupported_llama_flags(ckpt_a, capsys):
    assert ids_of(capsys, "-m", ckpt_a, "-p", "x", *FAST, "-ngl", "0", "-fa", "on")["ids"] == \
        ids_of(capsys, "-m", ckpt_a, "-p", "x", *FAST)["ids"]
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "-ngl", "99")
    assert_one_line_error(code, err, "needs")  # no Apple silicon here: the GPU backend is cuda, which needs triton and a GPU
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "-ctk", "q8_0")
    assert_one_line_error(code, err, "-ctk", "not supported by dgrun")
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "-xyz", "-n", "8")
    assert_one_line_error(code, err, "no such option: -xyz")
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "--backend", "cuda")
    assert_one_line_error(code, err, "the cuda backend needs")
    code, _, err = cli(capsys, "run", "-hf", "not a repo", "-p", "x")
    assert_one_line_error(code, err, "-hf takes user/repo")


# --- prompt inputs ------------------------------------------------------------------------------------------

def test_prompt_from_file_and_stdin(ckpt_a, capsys, monkeypatch, tmp_path):
    text = "def add(a, b):\n    return"
    want = ids_of(capsys, "-m", ckpt_a, "-p", text, *FAST)["ids"]
    (tmp_path / "p.txt").write_text(text)
    assert ids_of(capsys, "-m", ckpt_a, "-f", tmp_path / "p.txt", *FAST)["ids"] == want
    assert ids_of(capsys, "-m", ckpt_a, "-p", "-", *FAST, stdin=text, monkeypatch=monkeypatch)["ids"] == want
    assert ids_of(capsys, "-m", ckpt_a, *FAST, stdin=text, monkeypatch=monkeypatch)["ids"] == want
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-f", tmp_path / "none.txt")
    assert_one_line_error(code, err, "none.txt")
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-f", tmp_path / "p.txt", "-p", "x")
    assert_one_line_error(code, err, "one of")


# --- sampling and seed ---------------------------------------------------------------------------------------

def test_temp_and_max_tokens_aliases(ckpt_a, capsys):
    args = ["-m", ckpt_a, "-p", "x", "--steps", "3", "-s", "2"]
    assert ids_of(capsys, *args, "--temp", "0.5", "--max-tokens", "20")["ids"] == \
        ids_of(capsys, *args, "--t-max", "0.5", "--t-min", "0.5", "-n", "20")["ids"]
    code, _, err = cli(capsys, "run", *args, "--temp", "0.5", "--t-max", "0.9")
    assert_one_line_error(code, err, "--temp")


def test_temp_zero_is_greedy(ckpt_a):
    """Argmax draws: every position is accepted at once, so a block stops as soon as its argmax canvas repeats."""
    m = dgrun.load(ckpt_a)
    events = list(m.stream([2, 5, 9], max_new_tokens=48, steps=20, t_max=0, t_min=0, seed=1))
    blocks = [e for e in events if isinstance(e, Block)]
    assert any(b.converged for b in blocks)
    for b in blocks:  # entropy is exactly 0, so the first repeated canvas ends the block (greedy may also cycle)
        drafts = [e.ids for e in events if isinstance(e, Draft) and e.block == b.index]
        assert all(x != y for x, y in zip(drafts[:-2], drafts[1:-1]))
        assert b.converged == (drafts[-1] == drafts[-2])
    assert all(0 <= t < m.args.vocab_size for t in events[-1].ids)


def test_random_seed_is_printed(ckpt_a, capsys):
    seeds = set()
    for _ in range(2):
        code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "-n", "8", "--steps", "2", "-s", "-1")
        seeds.add(int(re.search(r"\| seed (\d+)", err).group(1)))
    assert len(seeds) == 2 and 0 not in seeds
    assert ids_of(capsys, "-m", ckpt_a, "-p", "x", *FAST)["stats"]["seed"] == 1


# --- stats ------------------------------------------------------------------------------------------------------

def test_stats_split_prompt_from_generation(ckpt_a, capsys):
    data = ids_of(capsys, "-m", ckpt_a, "-p", "def add(a, b):", "-n", "20", "--steps", "3", "-s", "1")
    s = data["stats"]
    assert 0 < s["prefill_seconds"] < s["seconds"]
    assert s["stop_reason"] in ("eos", "length") and s["unconverged"] == [0, 1]  # 3 steps never converge here
    assert s["prompt_tokens_per_second"] == pytest.approx(s["prompt_tokens"] / s["prefill_seconds"])
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "def add(a, b):", "-n", "20", "--steps", "3", "-s", "1")
    assert re.search(r"prompt \d+ tok in [\d.]+ ms \([\d.]+ tok/s\) \| generated \d+ tok in [\d.]+ s \([\d.]+ "
                     r"tok/s\)", err), err


# --- the small bugs (7) ---------------------------------------------------------------------------------------

def test_bad_values_are_one_line(ckpt_a, capsys):
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "-s", "99999999999999999999")
    assert_one_line_error(code, err, "--seed")
    assert "Overflow" not in err and "ValueError" not in err
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "--t-max", "-1")
    assert_one_line_error(code, err, "--t-max")
    assert "t_min" not in err
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "x", "-t", "0")
    assert_one_line_error(code, err, "--threads")


def test_infill_honours_n(ckpt_a, capsys):
    data = ids_of(capsys, "-m", ckpt_a, "-p", "def f(x):", "--suffix", "    return x", "--gap", "12", "-n", "4",
                  "--steps", "3")
    assert 0 < len(data["ids"]) <= 4


def test_text_has_no_special_tokens(ckpt_a):
    m = dgrun.load(ckpt_a)
    assert "<bos>" in m.tokenizer.decode([2, 40, 41]) and "<bos>" not in m.decode([2, 40, 41])


def test_mistyped_local_path_is_not_a_hub_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    code, _, err = cli(capsys, "run", "-m", "models/foo", "-p", "x")
    assert_one_line_error(code, err, "models/foo: no such file or directory")


def test_vision_notice_once_and_cli_only(ckpt_a, capsys):
    dgrun.load(ckpt_a)  # the tiny checkpoints carry a vision tower
    assert "vision" not in capsys.readouterr().err
    errs = [cli(capsys, "run", "-m", ckpt_a, "-p", "x", "-n", "4", "--steps", "1")[2] for _ in range(2)]
    assert sum(e.count("skipping the vision tower") for e in errs) <= 1


def test_info_without_argument_is_the_embedded_model(capsys):
    code, out, _ = cli(capsys, "info")
    assert code == 0 and "tiny-stdlib-Q8_0.gguf" in out and "diffusion-gemma" in out


def test_help_is_plain_and_says_where_defaults_come_from(capsys):
    code, out, _ = cli(capsys, "run", "--help")
    assert code == 0 and "<" not in out and "[x" not in out.replace("[x>=", "")
    flat = " ".join(out.split())
    assert "[the embedded tiny model]" in flat and "[model, else 48]" in flat
    assert "--temp" in out and "-sys" in out and "-ngl" in out and "--threads" in out


# --- threads (bug 1) ---------------------------------------------------------------------------------------------

def test_threads_default_and_flag(ckpt_a):
    torch.set_num_threads(2)
    dgrun.load(ckpt_a)
    assert torch.get_num_threads() == 1  # a tiny model: one thread measured fastest, and safe under load
    dgrun.load(ckpt_a, threads=2)
    assert torch.get_num_threads() == 2


# --- Block events carry their text ------------------------------------------------------------------------------

def test_block_text_joins_split_characters():
    m = dgrun.load()
    ids = m.tokenizer.encode("é€ ok", add_special_tokens=False)
    assert len(ids) >= 3, "the embedded tokenizer spells these characters in byte tokens"
    blocks = [Block(i, [t], 1, True, False) for i, t in enumerate(ids)]
    texts = [b.text for b in m._texts(iter([*blocks, Stats(ids=ids)]), [m.config()]) if isinstance(b, Block)]
    assert "".join(texts) == "é€ ok" and not any("\ufffd" in t for t in texts)
