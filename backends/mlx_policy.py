"""Which MLX affine (bits, group size) each matrix gets: `dgrun convert --to mlx-*` and quantize-at-load.

The default q4 mix keeps what the model is sensitive to at 8 bits and streams the experts (~95% of the
weights) at 4: users found 4-bit everywhere raises step counts (SPEC.md §4, mlx-vlm's quant_predicate).
Names are the flat-dict (GGUF) names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dgrun.packed import GROUP_SIZES
from dgrun.errors import DgrunError

EXPERTS = re.compile(r"^blk\.\d+\.ffn_(gate_up|gate|up|down)_exps\.weight$")
# Every matrix the forward multiplies by: the embedding (tied lm_head), attention, dense MLP, router, experts,
# self-conditioning. Norms, router/expert scales and layer scalars stay float.
MATRIX = re.compile(r"^(token_embd|self_cond_(gate|up|down)|blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down)"
                    r"|ffn_gate_inp|ffn_(gate_up|gate|up|down)_exps))\.weight$")


@dataclass(frozen=True)
class Policy:
    bits: int  # the experts' bits; the `quantization` block's default
    group_size: int = 64
    other_bits: int | None = 8  # everything else; None = the same as the experts ("uniform")

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise DgrunError(f"--q-bits {self.bits}: MLX affine takes 2, 3, 4, 5, 6 or 8")
        if self.group_size not in GROUP_SIZES:
            raise DgrunError(f"--q-group-size {self.group_size}: MLX takes {', '.join(map(str, GROUP_SIZES))}")

    def choose(self, name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """(bits, group_size) for a tensor, or None to keep it float (not a matrix, or rows that no
        MLX group divides, as mlx-vlm skips them)."""
        if not MATRIX.match(name) or len(shape) < 2:
            return None
        bits = self.bits if EXPERTS.match(name) or self.other_bits is None else self.other_bits
        for group in (self.group_size, 32):
            if shape[-1] % group == 0:
                return bits, group
        return None


TARGETS = {"mlx-q4": 4, "mlx-q8": 8, "mlx-bf16": None}


def policy_for(to: str, q_bits: int | None = None, q_group_size: int | None = None,
               uniform: bool = False) -> Policy | None:
    """The policy of a `--to mlx-*` target (None: bf16, nothing quantized)."""
    if to not in TARGETS:
        raise DgrunError(f"unknown --to {to!r} (choose from {', '.join(TARGETS)})")
    bits = TARGETS[to]
    if bits is None:
        if q_bits is not None or q_group_size is not None:
            raise DgrunError("--q-bits/--q-group-size apply to mlx-q4 and mlx-q8, not mlx-bf16")
        return None
    bits = q_bits or bits
    uniform = uniform or bits >= 8  # q8 is 8-bit everywhere
    return Policy(bits, q_group_size or 64, None if uniform else 8)
