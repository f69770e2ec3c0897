"""`dgrun.chat.Chat`: each turn encodes only its own tokens, the history stays in the KV cache.

Every backend.encode call is recorded; the tests rebuild the conversation's token stream from the template
format written out by hand and compare, then check the incrementally built cache against one encoded in one go.
"""

import pytest
import torch

import dgrun
from dgrun.chat import Chat
from dgrun.errors import DgrunError
from dgrun.generate import Block, Draft

pytestmark = pytest.mark.usefixtures("one_thread")

KNOBS = dict(steps=2, max_new_tokens=40, seed=1)


@pytest.fixture(scope="module")
def model(ckpt_chat):
    return dgrun.load(ckpt_chat)


@pytest.fixture
def spy(model):
    """The ids of every encode call, in order."""
    calls = []
    real = model.backend.encode
    model.backend.encode = lambda slot, ids, cache: (calls.append([int(t) for t in ids]), real(slot, ids, cache))[1]
    yield calls
    model.backend.encode = real


def tok(model, text):
    return model.tokenizer.encode(text, add_special_tokens=False)


def talk(chat, text, stop_when=None):
    """Run one turn; `stop_when(event)` true makes it stop there (as Ctrl-C does)."""
    flag = []
    for event in chat.send(text, interrupted=lambda: bool(flag)):
        if stop_when is not None and stop_when(event):
            flag.append(1)
        last = event
    return last


def flat(calls):
    return [t for c in calls for t in c]


def same_cache(model, cache, ids):
    """The incremental cache and a cache of `ids` encoded at once give the same decoder logits."""
    fresh = model.new_cache()
    model.encode(ids, fresh)
    canvas = torch.arange(3, 3 + model.args.canvas_length)
    a, b = model.denoise(canvas, cache), model.denoise(canvas, fresh)
    return cache.lengths == fresh.lengths == [len(ids)] and torch.allclose(a, b, atol=1e-4)


def test_turns_encode_only_their_own_tokens(model, spy):
    chat = Chat(model, system=" Be brief. ", **KNOBS)
    t1 = talk(chat, "hello world")
    t2 = talk(chat, "def add(a, b):")
    eot = tok(model, "<turn|>\n")
    turn1 = tok(model, "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nhello world<turn|>\n<|turn>model\n")
    turn2 = tok(model, "<|turn>user\ndef add(a, b):<turn|>\n<|turn>model\n")
    want = turn1 + t1.ids + eot + turn2 + t2.ids + eot
    assert flat(spy) == want
    assert spy[0] == turn1 and turn2 in spy  # the second prompt went through the encoder alone
    assert (t2.stats.new_tokens, t2.stats.reused_tokens) == (len(turn2), len(turn1) + len(t1.ids) + len(eot))
    assert t2.stats.full_prompt_tokens > t2.stats.new_tokens * 2
    assert chat.cached_tokens == len(want)
    assert same_cache(model, chat.cache, want)
    tot = chat.totals()
    assert tot["encoded_prompt_tokens"] == len(turn1) + len(turn2) and 0 < tot["saved"] < 1
    assert [m["role"] for m in chat.history] == ["user", "assistant"] * 2


@pytest.mark.parametrize("where", ["after-block", "mid-block"])
def test_interrupt_keeps_the_conversation(model, spy, where, monkeypatch):
    monkeypatch.setattr(model.args, "eos_token_id", [])  # no EOS: block 0 is always followed by block 1
    chat = Chat(model, **dict(KNOBS, max_new_tokens=64))
    chat.stop_ids = []
    if where == "after-block":
        stop = lambda e: isinstance(e, Block) and e.index == 0  # noqa: E731  (block 0 not committed yet)
    else:
        stop = lambda e: isinstance(e, Draft) and e.block == 1  # noqa: E731  (block 0 already committed)
    t1 = talk(chat, "hello", stop)
    assert t1.stats.interrupted and len(t1.ids) == model.args.canvas_length
    assert chat.history[-1] == {"role": "assistant", "content": t1.text}
    prompt = tok(model, "<bos><|turn>user\nhello<turn|>\n<|turn>model\n")
    eot = tok(model, "<turn|>\n")
    assert flat(spy) == prompt + t1.ids + eot
    t2 = talk(chat, "again")
    assert t2.stats.reused_tokens == len(prompt) + len(t1.ids) + len(eot) and not t2.stats.rebuilt
    ids = flat(spy)
    assert chat.cached_tokens == len(ids) and same_cache(model, chat.cache, ids)


def test_changed_history_rebuilds_the_cache(model, spy):
    chat = Chat(model, system="one", **KNOBS)
    talk(chat, "hi")
    chat.system = "two"
    t = talk(chat, "hi again")
    assert t.stats.rebuilt and t.stats.reused_tokens == 0
    assert t.stats.new_tokens == t.stats.full_prompt_tokens


def test_stop_ids_include_end_of_turn(model):
    chat = Chat(model, **KNOBS)
    assert model.tokenizer.token_id("<turn|>") in chat.stop_ids
    assert model.tokenizer.token_id("<eos>") in chat.stop_ids


def test_save_load_clear(model, spy, tmp_path):
    chat = Chat(model, system="sys", **KNOBS)
    talk(chat, "first")
    chat.save(tmp_path / "c.json")
    other = Chat(model, **KNOBS)
    spy.clear()
    n = other.load(tmp_path / "c.json")
    assert other.history == chat.history and other.system == "sys"
    want = tok(model, other.render(other.messages(), False))
    assert spy == [want] and n == len(want) == other.cached_tokens
    t = talk(other, "second")
    assert t.stats.reused_tokens == n
    other.clear()
    assert other.history == [] and other.cached_tokens == 0 and other.system == "sys"
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard", "content": 1}]}')
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        with pytest.raises(DgrunError):
            other.load(bad)


def test_needs_a_tokenizer(ckpt_b):
    with pytest.raises(DgrunError, match="tokenizer"):
        Chat(dgrun.load(ckpt_b))
