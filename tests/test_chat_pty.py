"""`dgrun chat` in a real pseudo-terminal (pexpect): what a user sees when typing.

Two turns, /stats showing the second turn reusing the first's cache, the live canvas, Ctrl-C in the middle of
an answer that could never finish on its own, /exit; then Ctrl-C at the prompt and Ctrl-D.
"""

import os
import re
import signal
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = r"\n(?:\x1b\[\?2004h)?> "  # readline may switch bracketed paste on
STATS = r"context: (\d+) tokens.*?last turn: encoded (\d+) new tokens, reused (\d+) from the cache"


def default_sigint():
    """A terminal's child takes Ctrl-C; a suite started in the background (`cmd &`) runs with SIGINT ignored,
    which its children would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(ckpt):
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1")  # one thread: the test machine is shared
    child = pexpect.spawn(sys.executable, ["-m", "dgrun.cli", "chat", "-m", str(ckpt), "--steps", "2", "-n", "16",
                                           "-s", "1"], env=env, encoding="utf-8", timeout=90, dimensions=(40, 200),
                          preexec_fn=default_sigint)
    child.expect("dgrun chat · template: ")
    child.expect(PROMPT)
    return child


def stats(child):
    child.sendline("/stats")
    child.expect(STATS, timeout=30)
    context, new, reused = map(int, child.match.groups())
    child.expect(PROMPT)
    return context, new, reused


def test_two_turns_stats_visual_ctrl_c_exit(ckpt_chat):
    child = spawn(ckpt_chat)
    child.sendline("hello world")
    child.expect(PROMPT)
    answer = child.before.split("hello world", 1)[1]
    assert answer.strip(), "the first answer shows on screen"
    context1, new1, reused1 = stats(child)
    assert reused1 == 0 and context1 > new1 > 0

    child.sendline("def add(a, b):")
    child.expect(PROMPT)
    context2, new2, reused2 = stats(child)
    assert reused2 == context1 and 0 < new2 < context1 and context2 > context1  # only the new turn was encoded

    for setting in ("steps 100000", "confidence 1e-9", "visual on"):  # an answer that cannot finish alone
        child.sendline("/set " + setting)
        child.expect(PROMPT)
    child.sendline("tell me more")
    child.expect(r"block 0 · step \d+/100000")  # the live canvas, mid-denoising
    child.expect(r"step \d+/100000")
    child.sendintr()
    child.expect(r"stopped \(Ctrl-C\); the conversation goes on")
    child.expect(PROMPT)
    context3, new3, reused3 = stats(child)
    assert reused3 == context2 and context3 > context2

    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_prompt_then_ctrl_d(ckpt_chat):
    child = spawn(ckpt_chat)
    child.sendintr()
    child.expect(r"Ctrl-D or /exit quits")
    child.expect("> ")
    child.sendline("/help")
    child.expect(r"/set KEY VALUE")
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert not re.search("Traceback", child.before or "")


def test_multiline_message_is_one_turn(ckpt_chat):
    """A pasted snippet between two \"\"\" lines is one message (llama.cpp's -mli, mlx-lm)."""
    child = spawn(ckpt_chat)
    child.sendline('"""')
    for line in ("def add(a, b):", "    return a + b", '"""'):
        child.expect(r"\. ")
        child.sendline(line)
    child.expect(PROMPT)
    child.sendline("/stats")
    child.expect(r"session: (\d+) turns?,")
    assert child.match.group(1) == "1"
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
