"""The CLI over the batched engine: several -p prompts in one batch, -c/--ctx-size, prefill progress."""

import json
import os
import re
import sys

import pytest

from test_chat_pty import default_sigint
from test_cli import assert_one_line_error
from test_cli_llama import FAST, cli, ids_of


def test_several_prompts_run_as_one_batch(ckpt_a, capsys):
    code, out, err = cli(capsys, "run", "-m", ckpt_a, "-p", "hello world", "-p", "def add(a, b):", *FAST, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["prompt_index"] for r in rows] == [0, 1]
    for row, prompt in zip(rows, ("hello world", "def add(a, b):")):
        alone = ids_of(capsys, "-m", ckpt_a, "-p", prompt, *FAST)
        assert row["ids"] == alone["ids"] and row["text"] == alone["text"]
    code, out, err = cli(capsys, "run", "-m", ckpt_a, "-p", "hello world", "-p", "def add(a, b):", *FAST)
    assert code == 0, err
    assert re.findall(r"^\[(\d)\]$", out, re.M) == ["0", "1"]  # each answer under its prompt's index
    assert len(re.findall(r"^\[\d\] blocks 1 \| steps/block", err, re.M)) == 2
    for argv in (["--suffix", "x"], ["--visual"], ["-f", "prompt.txt"]):
        code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "a", "-p", "b", *argv)
        assert_one_line_error(code, err, "batch")


def test_ctx_size(ckpt_a, ckpt_chat, capsys, monkeypatch):
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "hello world, hello dgrun", "-c", "3", *FAST)
    assert_one_line_error(code, err, "context limit of 3")
    code, _, err = cli(capsys, "run", "-m", ckpt_a, "-p", "hi", "-c", "0")
    assert_one_line_error(code, err, "ctx_size")
    res = ids_of(capsys, "-m", ckpt_a, "--ids", "3,4,5,6,7", "-c", "20", "-n", "64", "--steps", "2")
    assert res["stats"]["stop_reason"] == "context" and len(res["ids"]) == 16  # 5 + 16 > 20: one block
    code, out, err = cli(capsys, "chat", "-m", ckpt_chat, "-c", "4", *FAST, stdin="hello\n", monkeypatch=monkeypatch)
    assert "context limit of 4" in err and "Traceback" not in err
    code, out, err = cli(capsys, "chat", "-m", ckpt_chat, "-c", "512", *FAST, stdin="hello\n",
                         monkeypatch=monkeypatch)
    assert code == 0 and out.strip(), err


def test_long_prompt_shows_prefill_progress(tmp_path):
    """Over 512 tokens the prompt goes through the encoder in chunks, and a terminal sees their progress."""
    pexpect = pytest.importorskip("pexpect")
    ids = ",".join(str(3 + i % 150) for i in range(1300))
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1")
    from tiny import SHAPE_A, make_checkpoint

    path = make_checkpoint(tmp_path, SHAPE_A, canvas_length=16)
    child = pexpect.spawn(sys.executable, ["-m", "dgrun.cli", "run", "-m", str(path), "--ids", ids, "-n", "16",
                                           "--steps", "2"], env=env, encoding="utf-8", timeout=90,
                          preexec_fn=default_sigint)
    child.expect(r"prefill 512/1300 tokens")
    child.expect(r"prefill 1024/1300 tokens")
    child.expect(r"blocks 1 \| steps/block")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
