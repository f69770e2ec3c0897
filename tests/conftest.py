import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import SHAPE_A, SHAPE_B, make_checkpoint, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def ckpt_a(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("a"), SHAPE_A, canvas_length=16, seed=0)
    make_tokenizer(path, SHAPE_A["vocab_size"])
    return path


@pytest.fixture(scope="session")
def ckpt_b(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("b"), SHAPE_B, canvas_length=8, seed=1)
