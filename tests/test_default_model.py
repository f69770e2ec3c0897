"""The embedded default model (models/tiny-stdlib-Q8_0.gguf): behaviour that random weights cannot show.

Each claim is checked against a baseline run here: the same file with its weights shuffled (same tokenizer,
same value statistics, no training). Prompts are held-out stdlib functions' first lines and docstrings
(models/eval_tiny.py); the bounds are the model card's measurements with a margin.
"""

import os
import subprocess
import sys

import pytest

import dgrun
from dgrun.convert.convert import convert
from dgrun.gguf_file import read_metadata
from dgrun.models import DEFAULT_MODEL
from dgrun.models.eval_tiny import INFILLS, closes, shuffled, syntax_share

CODE = ["def write(self, data):\n", "def set_exception(self, exception):\n", "def get_version(name, members):\n",
        "def parseaddr(addr):\n", "def setstate(self, state):\n", "def handle_one_request(self):\n",
        "def __repr__(self):\n", "def __eq__(self, other):\n", "def get_class_members(klass):\n",
        "def get_platform():\n", "def _get_opener(self):\n", "def fib(n):\n"]
MAX_STEPS = 32  # the model's own max_denoising_steps (generation_config)


def runs(m, prompts=CODE, **knobs):
    return [m.generate(p, max_new_tokens=64, seed=0, **knobs) for p in prompts]


def avg_steps(results) -> float:
    steps = [s for r in results for s in r.stats.steps_per_block]
    return sum(steps) / len(steps)


def avg_tpf(results) -> float:
    return sum(r.stats.tokens_per_forward for r in results) / len(results)


@pytest.fixture(scope="module")
def tiny():
    return dgrun.load(backend="cpu")  # no path: the embedded model


@pytest.fixture(scope="module")
def tiny_runs(tiny):
    return runs(tiny)


@pytest.fixture(scope="module")
def baseline_runs():
    return runs(shuffled(DEFAULT_MODEL))


def test_ships_as_a_small_q8_gguf_with_its_tokenizer():
    assert DEFAULT_MODEL.stat().st_size <= 25 * 2**20
    meta = read_metadata(DEFAULT_MODEL)
    assert meta["general.file_type"] == 7  # MOSTLY_Q8_0
    assert len(meta["tokenizer.ggml.tokens"]) == 4096 and "<|turn>" in meta["tokenizer.chat_template"]


def test_sampler_stops_early(tiny_runs, baseline_runs):
    """Fewer steps per block than the limit, more than one token per forward: and not so with random weights."""
    assert avg_steps(tiny_runs) <= STEPS_BOUND < MAX_STEPS
    assert avg_tpf(tiny_runs) >= TPF_BOUND > 1
    assert avg_steps(baseline_runs) > avg_steps(tiny_runs) + 8


def test_decodes_mostly_valid_python(tiny_runs, baseline_runs):
    """The share of generated lines inside a prefix that parses (models/eval_tiny.py's syntax_share)."""
    ours = [syntax_share(p, r.text) for p, r in zip(CODE, tiny_runs)]
    theirs = [syntax_share(p, r.text) for p, r in zip(CODE, baseline_runs)]
    assert sum(ours) / len(ours) >= SYNTAX_BOUND
    assert sum(ours) / len(ours) > sum(theirs) / len(theirs) + 0.3


def test_q4_costs_few_steps(tiny, tiny_runs, tmp_path):
    q4 = dgrun.load(convert(DEFAULT_MODEL, "gguf-q4", tmp_path / "tiny-Q4_K_M.gguf").path, backend="cpu")
    assert avg_steps(runs(q4)) <= avg_steps(tiny_runs) + Q4_EXTRA_STEPS


def test_infill_fills_gaps(tiny):
    fills = [tiny.infill(prefix, suffix, seed=0) for prefix, suffix in INFILLS]
    valid = [closes(prefix + f.text + suffix) for (prefix, suffix), f in zip(INFILLS, fills)]
    assert sum(valid) >= INFILL_BOUND
    assert all(f.stats.steps_per_block[0] < MAX_STEPS for f in fills)


def test_cli_runs_the_embedded_model_without_m():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "dgrun.cli", "run", "-p", "def fib(n):\n", "-n", "32"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "steps/block" in run.stderr
    chat = subprocess.run([sys.executable, "-m", "dgrun.cli", "chat", "-n", "64"], input="Return the sum of a and b.\n",
                          capture_output=True, text=True, env=env, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
