import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET when it decorates a kernel, its own standard library (tl.zeros, ...) included, at
# its first import: set it before any test module is collected (test_kernels_aot imports triton first), or the
# kernel tests' interpreted kernels call compiled library functions and fail. test_kernels_aot unsets it for
# its compiling subprocess.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# `python -m dgrun.bench --gpu-check` runs the kernel tests natively: TRITON_INTERPRET=0 and
# DGRUN_KERNEL_DEVICE=cuda make new tensors (and tests/kernel_weights.py's packed weights) CUDA tensors.
KERNEL_DEVICE = os.environ.get("DGRUN_KERNEL_DEVICE", "cpu")
if KERNEL_DEVICE != "cpu":
    torch.set_default_device(KERNEL_DEVICE)

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


GENERATION = dict(max_denoising_steps=24, t_min=0.3, t_max=0.9,
                  sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.2},
                  stability_threshold=2, confidence_threshold=0.01)


@pytest.fixture(scope="session")
def ckpt_bf16(tmp_path_factory):
    """bf16 weights (a bf16 GGUF holds them bit for bit), a chat tokenizer and sampler defaults."""
    import torch

    from tiny import make_chat_tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("bf16"), SHAPE_A, canvas_length=16, seed=4,
                           dtype=torch.bfloat16, generation=GENERATION)
    return make_chat_tokenizer(path, SHAPE_A["vocab_size"])


@pytest.fixture(scope="session")
def ckpt_k(tmp_path_factory):
    """SHAPE_K (rows of 256 for the K-quants) with q/k norms scaled by 1/4: attention logits of a trained
    model's size, so logit errors measure quantization rather than near-one-hot attention flipping."""
    from safetensors.torch import load_file, save_file

    from tiny import SHAPE_K

    path = make_checkpoint(tmp_path_factory.mktemp("k"), SHAPE_K, canvas_length=16, seed=2)
    w = load_file(path / "model.safetensors")
    w = {k: v * 0.25 if k.endswith(("q_norm.weight", "k_norm.weight")) else v for k, v in w.items()}
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})
    return path


class KeyedDraws:
    """The reference's random draws replaced by dgrun's keyed ones (backends/torch/rng.py): its canvas and
    renoise `torch.randint` calls and its `torch.multinomial` draw, for row r, what dgrun draws for
    (seeds[r], block, step). The reference calls randint once per block to start, then per step multinomial
    followed by randint (renoise)."""

    def __init__(self, real_randint, seeds=(0,)):
        self.real_randint = real_randint
        self.seed(*seeds)

    def seed(self, *seeds):
        from dgrun.backends.torch.rng import split_seed

        self.seeds = torch.tensor([split_seed(s) for s in seeds])
        self.block, self.step, self.renoise = -1, 0, False

    def _keys(self, b):
        assert b == len(self.seeds), f"{b} rows for {len(self.seeds)} seeds"
        return self.seeds, torch.full((b,), self.block), torch.full((b,), self.step)

    def randint(self, *args, **kwargs):
        if "generator" in kwargs or "size" not in kwargs:
            return self.real_randint(*args, **kwargs)
        from dgrun.backends.torch import rng

        (b, c), high = kwargs["size"], kwargs["high"]
        if self.renoise:
            self.renoise, stream = False, rng.NOISE
        else:  # a new block's first canvas
            self.block, self.step, stream = self.block + 1, 0, rng.CANVAS
        return rng.tokens(*self._keys(b), stream, c, high)

    def multinomial(self, probs, num_samples=1, replacement=False, generator=None):
        from dgrun.backends.torch import rng
        from dgrun.backends.torch.sampler import draw

        assert num_samples == 1
        self.step += 1
        self.renoise = True
        b = len(self.seeds)
        u = rng.uniform(*self._keys(b), rng.DRAW, probs.shape[0] // b)
        return draw(probs, u.reshape(-1))[:, None]


@pytest.fixture
def reference_draws(monkeypatch):
    """Feed the reference dgrun's draws (KeyedDraws); call `.seed(*seeds)` before each reference generate."""
    keyed = KeyedDraws(torch.randint)
    monkeypatch.setattr(torch, "randint", keyed.randint)
    monkeypatch.setattr(torch, "multinomial", keyed.multinomial)
    return keyed


@pytest.fixture(scope="session")
def ckpt_chat(tmp_path_factory):
    """SHAPE_A with Gemma's turn tokens and a Gemma 4 style chat template (dgrun chat tests)."""
    from gemma_vocab import TEMPLATE
    from tiny import make_chat_tokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("chat"), SHAPE_A, canvas_length=16, seed=3)
    make_chat_tokenizer(path, SHAPE_A["vocab_size"])
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="session")
def gguf_chat(ckpt_chat, tmp_path_factory):
    """ckpt_chat as a lone BF16 GGUF (weights, tokenizer and template all in the file)."""
    from dgrun.convert.convert import convert

    return convert(ckpt_chat, to="gguf-bf16", out=tmp_path_factory.mktemp("gguf") / "chat-BF16.gguf").path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them slow.
    Session-scoped, so module fixtures (the default model's generations) run single-threaded too."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
