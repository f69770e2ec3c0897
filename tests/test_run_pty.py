"""`dgrun run` in a real pseudo-terminal (pexpect): blocks stream as they land, Ctrl-C keeps them, model
output cannot drive the terminal, and --visual shows the canvas."""

import json
import os
import re
import shutil
import sys

import pytest

from test_chat_pty import default_sigint

pexpect = pytest.importorskip("pexpect")


def spawn(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1")
    return pexpect.spawn(sys.executable, ["-m", "dgrun.cli", "run", *map(str, argv)], env=env, encoding="utf-8",
                         timeout=90, dimensions=(40, 200), preexec_fn=default_sigint)


def test_blocks_stream_and_ctrl_c_keeps_them(ckpt_a):
    child = spawn("-m", ckpt_a, "-p", "hello", "-n", "4000", "--steps", "8", "--confidence", "1e-9", "-s", "1")
    child.expect(re.compile(r"^(?!dgrun: )\S[^\r\n]{7,}", re.M))  # text on screen while 250 blocks are to go
    assert child.isalive()
    child.sendintr()
    child.expect(r"dgrun: interrupted \(Ctrl-C\) after (\d+) blocks?, (\d+) tokens")
    blocks, tokens = map(int, child.match.groups())
    assert 0 < blocks < 250 and 0 < tokens < 4000
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in (child.before or "") and "error" not in (child.before or "")


def wordlevel_copy(src, dst, piece):
    """src's weights with a word-level vocabulary whose every word holds `piece` (control bytes, say)."""
    shutil.copytree(src, dst)
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
    vocab.update({f"w{i}{piece}": i for i in range(4, 160)})
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in list(vocab.items())[:4]],
           "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    return dst


def test_control_bytes_are_escaped_on_a_terminal(ckpt_a, tmp_path):
    model = wordlevel_copy(ckpt_a, tmp_path / "ctl", "\x02\r\x1b[2J")
    child = spawn("-m", model, "--ids", "2,5,9", "-n", "16", "--steps", "2", "-s", "1")
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert child.exitstatus == 0, out
    assert "\\x02\\r\\x1b[2J" in out and "\x02" not in out and "\x1b" not in out


def test_visual_shows_the_canvas(ckpt_a):
    child = spawn("-m", ckpt_a, "-p", "hello", "-n", "32", "--steps", "4", "-s", "1", "--visual")
    child.expect(r"block 0 · step \d+/4")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "blocks 2" in child.before
