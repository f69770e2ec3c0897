"""`dgrun chat` with stdin not a terminal: one plain-text answer per line, slash commands, one-line errors."""

import io
import re
import shutil

import pytest

from dgrun.cli import main
from test_cli import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "-n", "24", "-s", "1"]


def chat(capsys, monkeypatch, lines, *argv):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def stats(out: str) -> dict:
    """The numbers of the /stats lines."""
    got = {}
    for line in out.splitlines():
        if m := re.match(r"context: (\d+) tokens", line):
            got["context"] = int(m.group(1))
        if m := re.match(r"last turn: encoded (\d+) new tokens, reused (\d+) from the cache \(a stateless turn "
                         r"encodes (\d+)\)", line):
            got["new"], got["reused"], got["full"] = map(int, m.groups())
        if m := re.match(r"session: (\d+) turns?, encoded (\d+) prompt tokens instead of (\d+)", line):
            got["turns"], got["encoded"], got["stateless"] = map(int, m.groups())
    return got


def test_piped_lines_get_answers_and_stats(ckpt_chat, capsys, monkeypatch):
    code, out, err = chat(capsys, monkeypatch, ["hello world", "", "/stats", "what next?", "/stats", "/exit", "never"],
                          "-m", str(ckpt_chat), *FAST)
    assert code == 0, err
    assert "context:" not in out and "session:" not in out  # piped: stdout holds the answers, /stats goes to stderr
    first, second = err.split("context:")[1:3]
    s1, s2 = stats("context:" + first), stats("context:" + second)
    assert s1["reused"] == 0 and s1["new"] == s1["full"] and s1["turns"] == 1
    assert s2["reused"] == s1["context"] and s2["new"] < s2["full"] and s2["turns"] == 2
    assert s2["encoded"] == s1["new"] + s2["new"] < s2["stateless"]
    assert err.rstrip().splitlines()[-1].startswith("session: 2 turns")  # nothing after /exit
    assert "Traceback" not in err and "\x1b[" not in out  # plain text


def test_piped_set_clear_and_bad_commands(ckpt_chat, capsys, monkeypatch):
    lines = ["/set steps 1", "/set trim_repeats off", "/set bogus 3", "/set steps x", "/set steps 0", "/nope",
             "/save", "hi", "/clear", "/stats"]
    code, out, err = chat(capsys, monkeypatch, lines, "-m", str(ckpt_chat), *FAST)
    assert code == 0
    assert "steps = 1" in err and "trim_repeats off" in err and "conversation cleared" in err
    errors = [ln for ln in err.splitlines() if ln.startswith("dgrun: error:")]
    assert len(errors) == 5 and "bogus" in errors[0] and "integer" in errors[1] and "steps" in errors[2]
    assert "unknown command /nope" in errors[3] and "usage: /save FILE" in errors[4]
    assert stats(err)["context"] == 0
    assert "hit the 1-step limit without converging" in err  # steps=1 never meets the stop rule


def test_piped_save_and_load(ckpt_chat, capsys, monkeypatch, tmp_path):
    path = tmp_path / "conv.json"
    chat(capsys, monkeypatch, ["remember this", f"/save {path}"], "-m", str(ckpt_chat), *FAST)
    code, out, err = chat(capsys, monkeypatch, [f"/load {path}", "/stats"], "-m", str(ckpt_chat), *FAST)
    assert code == 0 and re.search(r"loaded 2 messages from .* \((\d+) tokens encoded\)", err)
    n = int(re.search(r"\((\d+) tokens encoded\)", err).group(1))
    assert stats(err)["context"] == n > 0


def test_gguf_alone_and_fallback_template(gguf_chat, ckpt_chat, tmp_path, capsys, monkeypatch):
    lone = tmp_path / "only" / "model.gguf"
    lone.parent.mkdir()
    shutil.copy(gguf_chat, lone)  # no tokenizer.json or template next to it: all from the file
    code, out, err = chat(capsys, monkeypatch, ["hello", "again", "/stats"], "-m", str(lone), *FAST)
    assert code == 0 and "no chat template" not in err
    assert stats(err)["reused"] > 0
    no_template = tmp_path / "plain"
    shutil.copytree(ckpt_chat, no_template)
    (no_template / "chat_template.jinja").unlink()
    code, out, err = chat(capsys, monkeypatch, ["hello"], "-m", str(no_template), *FAST)
    assert code == 0 and "no chat template: using the Gemma 4 turn format" in err


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                      "{% include '/etc/passwd' %}"])
def test_hostile_template_file(ckpt_chat, tmp_path, capsys, monkeypatch, template):
    (tmp_path / "evil.jinja").write_text(template)
    code, _, err = chat(capsys, monkeypatch, ["hi"], "-m", str(ckpt_chat), "--chat-template",
                        str(tmp_path / "evil.jinja"))
    assert_one_line_error(code, err, "outside the sandbox")


def test_bad_chat_flags(ckpt_chat, ckpt_b, tmp_path, capsys, monkeypatch):
    cases = [(["-m", str(ckpt_chat), "-hf", "a/b"], "not both"),
             (["-m", str(ckpt_chat), "--steps", "0"], "steps"), (["-hf", "not a repo"], "user/repo"),
             (["-m", str(ckpt_chat), "--chat-template", str(tmp_path / "none.jinja")], "--chat-template"),
             (["-m", str(ckpt_b)], "tokenizer"), (["-m", str(tmp_path / "nope")], "no such file")]
    for argv, needle in cases:
        code, _, err = chat(capsys, monkeypatch, ["hi"], *argv)
        assert_one_line_error(code, err, needle)


def test_padding_only_answer_is_explained(capsys, monkeypatch):
    """Issue 13: the embedded model, -n 16, 8 steps, t_max 0.2, seed 5: the third answer is all <pad>."""
    lines = ["write a function that adds two numbers", "sort a list", "hello", "/stats"]
    code, out, err = chat(capsys, monkeypatch, lines, "-n", "16", "--steps", "8", "--t-max", "0.2", "-s", "5")
    assert code == 0, err
    assert err.count("the model wrote only padding") == 1
    assert "session: 3 turns" in err and "1 turns" not in err and "1 blocks" not in err


def test_set_temp_and_multiline_message(ckpt_chat, capsys, monkeypatch):
    lines = ["/set temp 0.5", '"""def add(a, b):', "    return a + b", '"""', "/stats"]
    code, out, err = chat(capsys, monkeypatch, lines, "-m", str(ckpt_chat), *FAST)
    assert code == 0, err
    assert "t_min = 0.5, t_max = 0.5" in err
    assert "session: 1 turn," in err  # three lines, one message
    code, _, err = chat(capsys, monkeypatch, ["/set temp -1"], "-m", str(ckpt_chat), *FAST)
    assert "dgrun: error: t_min = -1.0: must be >= 0" in err
