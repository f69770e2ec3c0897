"""Malformed checkpoints end as a DgrunError or a working model, never anything else (tests/fuzz.py).

A fast subset of benchmarks/fuzz_loaders.py (which runs 10,000 cases): each case is one seeded mutation of the
tests' own tiny GGUF, safetensors and MLX checkpoints, loaded in a forked child under a memory cap and a
deadline, then asked for a 1-step generation.
"""

import pytest

import fuzz

CASES = 300
FIRST = 100_000  # seeds the 10,000-case script (0-9,999) does not run
TIMEOUT = 10.0  # seconds per case; a case takes ~0.1 s


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz.make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


def test_seeds_load_and_generate(seeds, tmp_path):
    assert {"hf", "gguf-bf16", "gguf-q8"} <= set(seeds)
    for kind, path in seeds.items():
        outcome, detail, _, _ = fuzz.run_case(path, TIMEOUT)
        assert outcome == "ok", (kind, detail)


def test_damage_is_caught(seeds, tmp_path):
    """Each kind of damage the mutator makes is seen by the loader (the mutator is not a no-op)."""
    result = fuzz.run_many(seeds, 0, 40, tmp_path, TIMEOUT)
    assert result["tally"].get("error", 0) >= 20, result


def test_fuzz_subset(seeds, tmp_path):
    result = fuzz.run_many(seeds, FIRST, CASES, tmp_path, TIMEOUT)
    assert result["bad"] == [], "\n".join(f"seed {s} {what}: {o} {d}" for s, what, o, d in result["bad"])
    tally = result["tally"]
    assert sum(tally.values()) == CASES
    assert tally.get("ok", 0) >= CASES // 10 and tally.get("error", 0) >= CASES // 3, tally
