"""kernels/head_sampler.py and kernels/self_cond.py under TRITON_INTERPRET=1 on CPU: the split-vocabulary partials
and their reduce against torch, the inverse-CDF draw against sampler.draw, the soft embedding against
softmax @ dequantize(embed), and the whole head against ops_cpu.head_and_sample on the dequantized embedding, for
every weight type.

Float rounding differs between the kernels and torch (another summation order, tanh from exp under the
interpreter), so a decision taken within rounding of a threshold could legitimately go either way. The tests
make that impossible by construction instead of tolerating "mostly equal": the draw test places each uniform in
the middle of its token's CDF interval, and the head tests assert, on the reference's own numbers, that every
decision has a margin (CDF boundaries, top-2 logit gap, entropy-bound and confidence thresholds) far above
rounding before they compare the decisions exactly. A fixture that fails its margin check needs another seed;
it is not a kernel failure.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is decorated: before dgrun.kernels is imported

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from dgrun.backends import Row  # noqa: E402
from dgrun.backends.torch import ops_cpu, rng, sampler  # noqa: E402
from dgrun.generate import SamplerConfig  # noqa: E402
from dgrun.kernels import head_sampler as hs, self_cond as sc  # noqa: E402
from dgrun.kernels.dequant import dequantize  # noqa: E402
from kernel_weights import ALL, weight  # noqa: E402

B, C, H, V = 2, 16, 256, 512
SPLIT = 256  # 2 splits of the test vocabulary (the interpreter's cost is per program)
CAP = 30.0


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows from flat to peaked (a per-row scale), so entropies spread out."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, 12.0, rows)[:, None]


def reference_processed(logits: torch.Tensor, temp: torch.Tensor, cap: float | None) -> torch.Tensor:
    out = logits.float()
    if cap:
        out = torch.tanh(out / cap) * cap
    return out / temp.repeat_interleave(logits.shape[0] // temp.shape[0])[:, None]


# --- partials and reduce ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [CAP, None])
def test_partials_and_reduce_match_torch(cap):
    logits = random_logits(2 * C, 600, seed=1)  # 600 = 2 full splits of 256 and a ragged one
    temp = torch.tensor([0.55, 1.3])
    ref = reference_processed(logits, temp, cap)
    processed, stats, index = hs.partials(logits.clone(), temp, C, cap, bf16=True, split=SPLIT)
    assert stats.shape == (2 * C, 3, 4) and index.shape == (2 * C, 3)
    torch.testing.assert_close(processed, ref, rtol=2e-6, atol=2e-6)

    red = hs.reduce_partials(stats, index, bf16=True)
    top2 = ref.topk(2, -1).values
    assert ((top2[:, 0] - top2[:, 1]) > 1e-4).all(), "fixture: a near-tie at the top"
    assert torch.equal(red.argmax, ref.argmax(-1))
    torch.testing.assert_close(red.max, ref.max(-1).values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(red.max + red.total.log(), ref.logsumexp(-1), rtol=1e-6, atol=1e-5)
    entropy = sampler.token_entropy(ref, torch.softmax(ref, -1))
    assert entropy.min() < 0.1 and entropy.max() > 5  # the rows span peaked to flat
    torch.testing.assert_close(red.entropy, entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(red.mass.sum(-1), red.total, rtol=1e-6, atol=0)
    rounded = ref.to(torch.bfloat16).float()  # the bf16 model's softmax: of the rounded logits
    assert torch.equal(red.soft_max, rounded.max(-1).values)
    torch.testing.assert_close(red.soft_total, (rounded - red.soft_max[:, None]).exp().sum(-1), rtol=1e-6, atol=0)


def test_bf16_logits_are_read_into_a_float32_buffer():
    logits = random_logits(C, 300, seed=2).to(torch.bfloat16)
    processed, _, _ = hs.partials(logits, torch.tensor([0.7]), C, CAP, split=SPLIT)
    assert processed.dtype == torch.float32 and processed.data_ptr() != logits.data_ptr()
    torch.testing.assert_close(processed, reference_processed(logits, torch.tensor([0.7]), CAP), rtol=2e-6,
                               atol=2e-6)


# --- the draw -----------------------------------------------------------------------------------------------

def midpoint_uniforms(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """u that put u * total in the middle of token k's CDF interval: no rounding can move the draw."""
    cdf = probs.double().cumsum(-1)
    hi = cdf.gather(-1, tokens[:, None])[:, 0]
    lo = hi - probs.double().gather(-1, tokens[:, None])[:, 0]
    return ((lo + hi) / 2 / cdf[:, -1]).float()


def test_draw_matches_sampler_draw():
    logits = random_logits(2 * C, 600, seed=3)
    logits[0, 599] = 40.0  # nearly all mass on the last token (the ragged split's last)
    logits[1, 300] = 40.0  # ... on one token inside a middle split
    temp = torch.tensor([1.0, 0.8])
    processed, stats, index = hs.partials(logits, temp, C, CAP, split=SPLIT)
    red = hs.reduce_partials(stats, index)
    probs = torch.softmax(processed, -1)
    g = torch.Generator().manual_seed(4)
    tokens = torch.multinomial(probs, 1, generator=g)[:, 0]  # a token per row, among the likely ones
    tokens[2] = 0
    u = midpoint_uniforms(probs, tokens)
    assert (probs.gather(-1, tokens[:, None]) > 1e-5).all(), "fixture: a token too unlikely to place u inside"
    u[3] = 0.0  # the first token with any mass
    expected = sampler.draw(probs, u)
    assert torch.equal(expected[:3], tokens[:3]) and expected[0] == 599 and expected[1] == 300
    assert len(set((expected // SPLIT).tolist())) == 3  # draws in every split
    assert torch.equal(hs.draw(processed, red, u, split=SPLIT), expected)


def test_draw_from_random_uniforms():
    """Uniform draws on one row: wherever u * total is not within rounding of a CDF boundary (nearly always),
    the reference's token."""
    logits = random_logits(1, 512, seed=5) * 0.2
    n = 64
    processed, stats, index = hs.partials(logits.repeat(n, 1), torch.tensor([1.0]), n, None, split=SPLIT)
    red = hs.reduce_partials(stats, index)
    u = torch.rand(n, generator=torch.Generator().manual_seed(6))
    probs = torch.softmax(processed, -1)
    cdf = probs[0].double().cumsum(0)
    safe = (u.double()[:, None] * cdf[-1] - cdf[None, :]).abs().min(-1).values > 1e-5
    assert safe.float().mean() > 0.9
    expected = sampler.draw(probs, u)
    assert len(set(expected.tolist())) > n // 2
    assert torch.equal(hs.draw(processed, red, u, split=SPLIT)[safe], expected[safe])


# --- the soft embedding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["Q6_K", "Q8_0", "Q4_0", "F32"])  # every type: in test_head_and_sample_matches_ops_cpu
def test_soft_embedding_float32(qtype):
    from gguf import GGMLQuantizationType as QT

    qtype = QT[qtype]
    logits = random_logits(2 * C, V, seed=7)
    processed, stats, index = hs.partials(logits, torch.tensor([0.6, 0.9]), C, CAP, split=SPLIT)
    red = hs.reduce_partials(stats, index)
    embed = weight((V, H), qtype, seed=8)
    scale = torch.tensor(16.0)
    ref = (torch.softmax(processed, -1) @ dequantize(embed)) * scale
    for split_k in (1, 3):  # 3: vocabulary slices of 192 = 6 steps of 32, the last slice short
        got = sc.soft_embedding(processed, red.max, red.total, embed, scale, torch.float32, split_k=split_k)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_soft_embedding_of_processed_logits_alone(dtype):
    from gguf import GGMLQuantizationType as QT

    processed = reference_processed(random_logits(2 * C, V, seed=11), torch.tensor([0.6, 0.9]), CAP)
    embed = weight((V, H), QT.Q8_0, seed=12)
    scale = torch.tensor(16.0).to(dtype)
    got = sc.soft_embedding_of(processed, embed, scale, dtype)
    w = dequantize(embed).to(dtype)
    if dtype == torch.float32:
        ref = ops_cpu.soft_embedding(torch.softmax(processed, -1), w, scale)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    else:
        ref = bf16_reference_soft(processed, w, scale)
        assert (got != ref).float().mean() < 0.01


def bf16_reference_soft(processed, embed_bf16, scale):
    """ops_cpu's bf16 path: the softmax of the processed logits cast to bf16, the probabilities cast to bf16."""
    probs = processed.to(torch.bfloat16).softmax(-1, dtype=torch.float32)
    return ops_cpu.soft_embedding(probs.to(torch.bfloat16), embed_bf16, scale)


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0"])
def test_soft_embedding_bf16_rounds_as_the_reference(qtype):
    from gguf import GGMLQuantizationType as QT

    logits = random_logits(2 * C, V, seed=9)
    processed, stats, index = hs.partials(logits, torch.tensor([0.6, 0.9]), C, CAP, bf16=True, split=SPLIT)
    red = hs.reduce_partials(stats, index, bf16=True)
    embed = weight((V, H), QT[qtype], seed=10)
    scale = torch.tensor(16.0).to(torch.bfloat16)
    ref = bf16_reference_soft(processed, dequantize(embed).to(torch.bfloat16), scale)
    got = sc.soft_embedding(processed, red.soft_max, red.soft_total, embed, scale, torch.bfloat16, split_k=2)
    assert got.dtype == torch.bfloat16
    # the same roundings: equal but where a float32 ulp of p crosses a bf16 rounding boundary (rare, one ulp)
    ulp = 2.0 ** (torch.frexp(ref.float()).exponent - 8).float()
    assert ((got.float() - ref.float()).abs() <= ulp).all()
    assert (got != ref).float().mean() < 0.01


# --- the whole head -----------------------------------------------------------------------------------------

def start_state(dtype=torch.float32) -> sampler.State:
    """Two rows with their own knobs and schedules; the second pins two positions."""
    a = SamplerConfig(steps=8, t_min=0.4, t_max=0.9, entropy_bound=3.0, stability_threshold=2,
                      confidence_threshold=10.0, seed=11)
    b = SamplerConfig(steps=6, t_min=0.2, t_max=0.7, entropy_bound=1.5, stability_threshold=1,
                      confidence_threshold=0.05, seed=12)
    pins = [-1] * C
    pins[3], pins[7] = 5, 77
    return sampler.start([Row(0, a, 0), Row(1, b, 2, pins)], [0, 0], V, C, H, dtype, "cpu")


def hidden(seed: int, dtype=torch.float32) -> torch.Tensor:
    """x whose logits run from flat to peaked across positions."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, generator=g) * torch.linspace(0.02, 0.5, C)[None, :, None]).to(dtype)


def check_margins(logits: torch.Tensor, state: sampler.State) -> torch.Tensor:
    """Every decision of the reference's step has a margin far above float rounding (module docstring).
    Returns the accepted positions (B, C)."""
    b, c, vocab = logits.shape
    processed = logits / sampler.temperature(state)[:, None, None]
    probs = torch.softmax(processed, -1)
    top2 = processed.topk(2, -1).values
    assert ((top2[..., 0] - top2[..., 1]) > 1e-4).all(), "fixture: argmax near-tie"
    cdf = probs.double().cumsum(-1)
    u = rng.uniform(state.seed, state.block, state.step + 1, rng.DRAW, c).double()
    target = u[..., None] * cdf[..., -1:]
    assert ((target - cdf).abs().min(-1).values > 1e-5).all(), "fixture: a uniform at a CDF boundary"
    entropy = sampler.token_entropy(processed, probs)
    if state.fixed is not None:
        entropy = entropy.masked_fill(state.fixed >= 0, 0.0)
    ordered = entropy.sort(-1).values
    assert ((ordered.cumsum(-1) - ordered - state.bound[:, None]).abs() > 1e-3).all(), "fixture: bound margin"
    free = (state.fixed < 0).sum(-1).clamp(min=1) if state.fixed is not None else c
    assert ((entropy.sum(-1) / free - state.confidence).abs() > 1e-3).all(), "fixture: confidence margin"
    return sampler.accept_mask(entropy, state.bound[:, None])


def run_steps(x, embed, head, steps: int):
    """`steps` steps of `head` from the same start, each checked for margins on the reference's numbers.
    Returns the states and the accepted positions of each step."""
    state, trace, accepted = start_state(x.dtype), [], []
    w = dequantize(embed).to(x.dtype)
    for _ in range(steps):
        accepted.append(check_margins(torch.tanh((x @ w.T).float() / CAP) * CAP, state))  # as ops_cpu
        state = head(x, embed, CAP, state, torch.tensor(16.0).to(x.dtype))
        trace.append(state)
    return trace, accepted


def assert_same_steps(got, ref):
    for k, (g, r) in enumerate(zip(got, ref)):
        for name in ("canvas", "argmax", "done", "history", "step"):
            assert torch.equal(getattr(g, name), getattr(r, name)), f"step {k}: {name} differs"
        torch.testing.assert_close(g.soft, r.soft, rtol=1e-4, atol=1e-4 * r.soft.abs().max().item())


def reference_head(x, embed, cap, state, scale):
    return ops_cpu.head_and_sample(x, dequantize(embed).to(x.dtype), cap, state, scale)


def test_head_decisions_are_not_vacuous():
    """Guards the parity tests: each row accepts some draws and renoises others, the pins hold, one row stops
    at the third step and the other does not, and the canvas changes from step to step."""
    from gguf import GGMLQuantizationType as QT

    trace, accepted = run_steps(hidden(22), weight((V, H), QT.Q6_K, seed=13), reference_head, 3)
    for acc in accepted:
        assert ((acc.sum(-1) > 2) & (acc.sum(-1) < C - 2)).all()
    pinned = trace[0].fixed >= 0
    assert all(torch.equal(t.canvas[pinned], t.fixed[pinned]) for t in trace)
    assert [t.done.tolist() for t in trace] == [[False, False], [False, False], [True, False]]
    assert len({tuple(t.canvas.flatten().tolist()) for t in trace}) == 3


def test_sample_logits_bf16_matches_reference_over_steps():
    """A bf16 model: the same bf16 logits (torch's matmul) into both heads; decisions identical, the soft
    embedding to one bf16 ulp (see kernels/self_cond.py)."""
    from gguf import GGMLQuantizationType as QT

    embed = weight((V, H), QT.BF16, seed=13)
    x = hidden(58, torch.bfloat16)  # a seed whose bf16 logits have no near-tie at the top (bf16 ties often)

    def head(x, embed, cap, state, scale):
        return hs.sample_logits(x.reshape(-1, H) @ embed.T, embed, cap, state, scale, x.dtype, split=SPLIT)

    got, ref = run_steps(x, embed, head, 3)[0], run_steps(x, embed, ops_cpu.head_and_sample, 3)[0]
    for k, (g, r) in enumerate(zip(got, ref)):
        for name in ("canvas", "argmax", "done", "history", "step"):
            assert torch.equal(getattr(g, name), getattr(r, name)), f"step {k}: {name} differs"
        assert g.soft.dtype == torch.bfloat16
        ulp = 2.0 ** (torch.frexp(r.soft.float()).exponent - 8).float()
        assert ((g.soft.float() - r.soft.float()).abs() <= ulp).all()


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_head_and_sample_matches_ops_cpu(qtype):
    """The whole head (kernels.qmatmul for the logits) against ops_cpu.head_and_sample on the dequantized
    embedding, float32: canvas, argmax, done and history identical, soft to 1e-4. Three steps (history, the
    stop) for the embedding types of published files, Q6_K and Q8_0; one for the others (the interpreter is
    slow, and the per-position steps do not depend on the weight type)."""
    embed = weight((V, H), qtype, seed=13)
    x = hidden(22)
    steps = 3 if qtype.name in ("Q6_K", "Q8_0") else 1

    def head(x, embed, cap, state, scale):
        return hs.head_and_sample(x, embed, cap, state, scale, split=SPLIT)

    assert_same_steps(run_steps(x, embed, head, steps)[0], run_steps(x, embed, reference_head, steps)[0])


def test_head_and_sample_bf16_packed_is_close_to_ops_cpu():
    """A bf16 model over a Q6_K embedding. The head is its logits (kernels.qmatmul) then `sample_logits`, whose
    bf16 path matches the reference exactly on the same logits (above); the logits themselves differ from
    ops_cpu's by bf16 roundings (under the interpreter more: its float32 -> bf16 casts truncate, so qmatmul's
    decoded weights and output round down), and a softmax at temperature < 1 magnifies a logit's rounding into
    percents of a probability. So against ops_cpu on dequantize(embed).to(bf16) the bound is statistical:
    positions whose reference top-2 gap is over 4 bf16 ulps keep their argmax; the soft embedding within 5%."""
    from gguf import GGMLQuantizationType as QT

    from dgrun.kernels.qmatmul import qmatmul

    embed = weight((V, H), QT.Q6_K, seed=13)
    x = hidden(58, torch.bfloat16)
    scale = torch.tensor(16.0).to(torch.bfloat16)
    got = hs.head_and_sample(x, embed, CAP, start_state(torch.bfloat16), scale, split=SPLIT)
    same = hs.sample_logits(qmatmul(x.reshape(-1, H), embed), embed, CAP, start_state(torch.bfloat16), scale,
                            torch.bfloat16, split=SPLIT)
    assert torch.equal(got.canvas, same.canvas) and torch.equal(got.soft, same.soft)

    ref = reference_head(x, embed, CAP, start_state(torch.bfloat16), scale)
    logits = torch.tanh((x @ dequantize(embed).to(torch.bfloat16).T).float() / CAP) * CAP
    top2 = logits.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 4 * 2.0 ** (torch.frexp(top2[..., 0]).exponent - 8).float()
    assert clear.float().mean() > 0.5
    assert torch.equal(got.argmax[clear], ref.argmax[clear])
    assert got.soft.dtype == torch.bfloat16
    assert (got.soft.float() - ref.soft.float()).norm() < 0.05 * ref.soft.float().norm()
