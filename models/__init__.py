"""Model definitions (dgrun.models), and the embedded default model: a tiny DiffusionGemma trained on the
Python standard library by train_tiny.py (card: tiny-stdlib.md)."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).with_name("tiny-stdlib-Q8_0.gguf")
