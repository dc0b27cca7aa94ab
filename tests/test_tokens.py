"""The token measure: independent one-hot tokens, uniform or with given
frequencies.  Every exact algorithm against a brute-force loop over every
token sequence (the models evaluated by their own forward)."""

from __future__ import annotations

import itertools
from fractions import Fraction
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import tsalgebra as ts
from tsalgebra.adapters import BilinearAttentionModule, BilinearLayer, Residual
from tsalgebra.problem import DEFAULT_BUDGET


def brute(a, b, measure, centered=False, per_output=False):
    """sum over every sequence of p(seq) f(x) . g(x), x the one-hot input."""
    n, V = measure.n_ctx, measure.vocab
    P = measure.token_probs()
    fg, fa, fb = 0.0, 0.0, 0.0
    for seq in itertools.product(range(V), repeat=n):
        x = np.zeros(n * V)
        x[np.arange(n) * V + np.array(seq)] = 1.0
        w = np.prod(P[np.arange(n), list(seq)])
        f, g = np.asarray(a(x)), np.asarray(b(x))
        fg, fa, fb = fg + w * f * g, fa + w * f, fb + w * g
    value = fg - (fa * fb if centered else 0)
    return value if per_output else float(np.sum(value))


def stack(rng, V, n, depth, out=3):
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    layers, d = [], n * V
    for k in range(depth):
        o = out if k == depth - 1 else 3
        layers.append(ts.Bilinear(W(3, d), W(3, d), W(o, 3), left_bias=W(3), down_bias=W(o)))
        d = o
    return ts.Sequential(*layers)


PROBS = {"uniform": None, "per token": "per token", "shared": "shared"}


def measure(rng, V, n, kind):
    if kind is None:
        return ts.Tokens(V, n)
    if kind == "shared":
        p = rng.random(V)
        p[0] = 0.0  # a token that never occurs
        return ts.Tokens(V, n, p / p.sum())
    p = rng.random((n, V))
    if kind == "mixed":  # the first two positions share one law, a token absent from it; the others their own
        p[:2] = p[0]
        p[:2, 1] = 0.0
    return ts.Tokens(V, n, p / p.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("V,n,depth", [(3, 2, 1), (8, 1, 1), (2, 4, 1), (4, 2, 2), (2, 3, 2)])
@pytest.mark.parametrize("kind", list(PROBS.values()), ids=list(PROBS))
def test_contraction_and_enumeration_against_brute_force(V, n, depth, kind):
    rng = np.random.default_rng(V * 100 + n * 10 + depth)
    a, b = stack(rng, V, n, depth), stack(rng, V, n, depth)
    m = measure(rng, V, n, kind)
    constant = bool(np.all(m.token_probs().max(axis=1) == 1))  # one token at every position: f is constant
    for x, y in ((a, b), (a, a)):
        scale = abs(brute(x, y, m)) + abs(brute(x, x, m))  # round-off is relative to the uncentred size
        for kw in ({}, {"centered": True}, {"per_output": True}):
            want = brute(x, y, m, **kw)
            for algorithm in ("pairings", "enumeration"):
                if constant and x is y and "centered" in kw and algorithm == "pairings":  # E[f.f] - E[f].E[f]
                    with pytest.raises(ts.RoundingError, match="leaves no digit of the difference"):
                        ts.inner(x, y, measure=m, algorithm=algorithm, **kw)
                    assert ts.inner(x, y, measure=m, **kw).value == pytest.approx(0, abs=1e-12 * scale)
                    continue
                got = ts.inner(x, y, measure=m, algorithm=algorithm, **kw)
                assert got.inner == "tokens" and got.exact and got.measure == m.label
                np.testing.assert_allclose(got.value, want, rtol=1e-10, atol=1e-12 * scale)


def test_the_grokking_layer_is_the_logit_inner_product_over_all_inputs():
    """Two one-hot tokens of P = 13 into one bilinear layer (the grokking
    model's shape): the token similarity is the logit cosine over all P^2
    inputs, computed without running them."""
    rng = np.random.default_rng(0)
    P, h = 13, 8
    make = lambda: ts.Bilinear(rng.normal(size=(h, 2 * P)), rng.normal(size=(h, 2 * P)), rng.normal(size=(P, h)))  # noqa: E731
    a, b = make(), make()
    x = np.zeros((P * P, 2 * P))
    i, j = np.divmod(np.arange(P * P), P)
    x[np.arange(P * P), i], x[np.arange(P * P), P + j] = 1, 1
    fa, fb = a(x), b(x)
    want = (fa * fb).sum() / np.sqrt((fa * fa).sum() * (fb * fb).sum())
    got = ts.similarity(a, b, measure=ts.Tokens(P, 2))
    assert got.algorithm == "pairings" and got.value == pytest.approx(want, rel=1e-12)


def test_measure_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        ts.Tokens(3, probs=[0.5, 0.2, 0.2])
    with pytest.raises(ValueError, match="negative"):
        ts.Tokens(3, probs=[1.2, -0.2, 0.0])
    with pytest.raises(ValueError, match="last axis"):
        ts.Tokens(3, probs=[0.5, 0.5])
    with pytest.raises(ValueError, match="2 distributions for n_ctx=3"):
        ts.Tokens(2, 3, probs=[[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="^probs contains NaN or Inf"):
        ts.Tokens(3, probs=[np.nan, 0.5, 0.5])
    with pytest.raises(ValueError, match="positive integer"):
        ts.Tokens(0)
    a = ts.Bilinear(np.ones((2, 6)), np.ones((2, 6)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="whole number of one-hot tokens"):
        ts.inner(a, a, measure=ts.Tokens(4))
    with pytest.raises(ValueError, match="reads 2 tokens"):
        ts.inner(a, a, measure=ts.Tokens(3, 3))
    with pytest.raises(ValueError, match="inner='gaussian' takes a Gaussian measure"):
        ts.inner(a, a, "gaussian", measure=ts.Tokens(3))
    with pytest.raises(ValueError, match="needs measure=ts.Tokens"):
        ts.inner(a, a, "tokens")
    with pytest.raises(ValueError, match="Gaussian"):
        ts.inner(a, a, measure=ts.Tokens(3), mean=np.zeros(6))


def test_single_precision_frequencies_are_a_law():
    """Frequencies from torch in float32 sum to 1 only to float32's
    precision: accepted, renormalised in float64 (every algorithm then sums a
    law of mass 1: token moments equal the enumeration); a float64 law off
    by 1e-6 is still refused, naming the bound."""
    V, n = 512, 2
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(0))
    p32 = torch.softmax(logits, dim=-1)  # float32
    assert abs(float(p32.double().sum(-1).max()) - 1) > 1e-9  # would have been refused
    law = ts.Tokens(V, n, p32)
    assert np.abs(law.probs.sum(-1) - 1).max() < 1e-15
    np.testing.assert_allclose(law.probs, ts.Tokens(V, n, p32.double() / p32.double().sum(-1, keepdim=True)).probs,
                               rtol=1e-15)
    small = ts.Tokens(4, 3, torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), -1))
    rng = np.random.default_rng(1)
    # one model causal, the other not: the keys after the query are read by one of them only
    a, b = attention_lm(rng, 4, 3, 2, 2, 3, causal=True), attention_lm(rng, 4, 3, 1, 2, 3)
    got = ts.similarity(a, b, measure=small, algorithm="token-moments")
    assert got.value == pytest.approx(ts.similarity(a, b, measure=small, algorithm="enumeration").value, rel=1e-12)
    off = np.full(V, 1 / V)
    off[0] += 1e-6
    with pytest.raises(ValueError, match=r"sum to 1 over the vocabulary \(to 1e-09 for float64"):
        ts.Tokens(V, probs=off)
    exact_off = np.array([Fraction(1, 2), Fraction(1, 2) + Fraction(1, 10**12)], dtype=object)
    with pytest.raises(ValueError, match="exact probs must sum to exactly 1"):  # was accepted: mass 1 + 1e-12
        ts.Tokens(2, probs=exact_off)
    with pytest.raises(ValueError, match="no distribution"):  # was a measure of 0 tokens
        ts.Tokens(V, probs=np.zeros((0, V)))


def test_token_embeddings_from_torch():
    """nn.Embedding converts; the model takes token ids, equals the torch
    forward, and carries the token measure that similarity uses by default."""
    torch.manual_seed(0)
    V, d, n = 5, 4, 3
    att = lambda: BilinearAttentionModule(2, 2, d, n_ctx=n, causal=True, rotary_base=10.0, residual=True, bias=True)  # noqa: E731
    ta, tb = (nn.Sequential(nn.Embedding(V, d), att(), nn.Linear(d, V)) for _ in range(2))
    a, b = ts.from_torch(ta), ts.from_torch(tb)
    ids = torch.randint(0, V, (6, n))
    with torch.no_grad():
        want = ta(ids).double().numpy()
    got = np.asarray(a(ids.numpy()))  # (batch, positions, vocab), as torch's
    assert got.shape == want.shape and a(ids[0].numpy()).shape == want.shape[1:]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # torch computes in float32
    assert tuple(a(ids).shape) == want.shape and a.evaluate_flat(a.one_hot(ids.numpy())).shape == (6, n * V)
    assert a(np.zeros((0, n), dtype=int)).shape == (0, n, V)  # an empty batch, as torch's
    assert a.default_measure.label == ts.Tokens(V, n).label
    s = ts.similarity(a, b)
    assert s.inner == "tokens" and any("default" in note for note in s.notes)
    matrix = ts.similarity_matrix([a, b], progress=False)
    assert matrix.inner == "tokens" and matrix.notes[0] == s.notes[0] and matrix.values[0, 1] == pytest.approx(s.value)
    assert not any("default" in note for note in ts.similarity_matrix([a, b], measure=ts.Tokens(V, n), progress=False).notes)
    want_s = brute(a, b, ts.Tokens(V, n)) / np.sqrt(brute(a, a, ts.Tokens(V, n)) * brute(b, b, ts.Tokens(V, n)))
    assert s.value == pytest.approx(want_s, rel=1e-10)
    assert ts.similarity(a, b, "gaussian").measure == "N(0, I)"  # the Gaussian question, asked explicitly
    flat = ts.from_torch(nn.Sequential(nn.Embedding(V, d), nn.Flatten(), BilinearLayer(2 * d, 3, V)))
    assert flat.default_measure.label == ts.Tokens(V, 2).label and flat(np.array([[0, 4]])).shape == (1, V)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
        flat(np.array([[0, 7]]))
    renormed = nn.Sequential(nn.Embedding(V, d, max_norm=0.5), nn.Flatten(), nn.Linear(2 * d, 3))
    before = renormed[0].weight.detach().clone()
    with pytest.raises(ts.AdapterError, match=r"^0: Embedding\(max_norm=0.5\) rescales each row"):
        ts.from_torch(renormed)
    assert torch.equal(renormed[0].weight.detach(), before)  # the module is left as it was


def test_flat_readout_after_attention_from_torch():
    """A Linear after nn.Flatten after the attention reads every position at
    once (it was wrapped per position and refused as 72 inputs against 24)."""
    torch.manual_seed(1)
    V, d, n = 5, 6, 3
    nets = [nn.Sequential(nn.Embedding(V, d), BilinearAttentionModule(2, 3, d, n_ctx=n, causal=True, bias=True),
                          nn.Flatten(), nn.Linear(n * d, 4)).double().eval() for _ in range(2)]
    a, b = (ts.from_torch(t) for t in nets)
    ids = torch.randint(0, V, (6, n))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(a(ids)), nets[0](ids).numpy(), rtol=1e-12, atol=1e-12)
    want = brute(a, b, ts.Tokens(V, n)) / np.sqrt(brute(a, a, ts.Tokens(V, n)) * brute(b, b, ts.Tokens(V, n)))
    assert ts.similarity(a, b).value == pytest.approx(want, rel=1e-10)



def test_per_token_layers_before_flatten_from_torch():
    """Layers between the embedding and nn.Flatten act per token (they were
    refused: 'takes 3 inputs but ... gives 6')."""
    torch.manual_seed(3)
    V, d, n = 4, 3, 2
    nets = [nn.Sequential(nn.Embedding(V, d), nn.Linear(d, d), nn.Flatten(), nn.Linear(n * d, 2)),
            nn.Sequential(nn.Embedding(V, d), Residual(BilinearLayer(d, 3, d)), nn.Flatten(), nn.Linear(n * d, 2))]
    a, b = (ts.from_torch(t.double().eval()) for t in nets)
    ids = torch.tensor(list(itertools.product(range(V), repeat=n)))
    with torch.no_grad():
        for net, model in zip(nets, (a, b)):
            np.testing.assert_allclose(np.asarray(model(ids)), net(ids).numpy(), rtol=1e-12, atol=1e-12)
    mu = ts.Tokens(V, n)
    assert ts.similarity(a, b).value == pytest.approx(
        brute(a, b, mu) / np.sqrt(brute(a, a, mu) * brute(b, b, mu)), rel=1e-10)


def attention_lm(rng, V, d, H, dh, n, noise=None, **flags):
    """embedding -> one BilinearAttention -> unembedding, position-wise;
    ``noise``: a generator adding 30 % noise to every weight."""
    def W(*s):
        w = rng.normal(size=s) / np.sqrt(s[-1])
        return w if noise is None else w + 0.3 * noise.normal(size=s) / np.sqrt(s[-1])

    att = ts.BilinearAttention(W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, d, dh),
                               q1_bias=W(H, dh), k2_bias=W(H, dh), **flags)
    return ts.Transformer(ts.Embedding(W(d, V)), [(att, None)], ts.Linear(W(3, d)), n_ctx=n)


ATTENTION_FLAGS = [{}, {"causal": True, "scale": 0.5}, {"rotary_base": 10.0, "residual": True},
                   {"causal": True, "rotary_base": 5.0, "residual": True}]


@pytest.mark.parametrize("flags", ATTENTION_FLAGS)
@pytest.mark.parametrize("kind", [None, "shared", "per token", "mixed"],
                         ids=["uniform", "frequencies", "per position", "some positions alike"])
def test_token_attention_moments_against_every_sequence(flags, kind):
    """One attention layer between an embedding and an unembedding, heads
    of different widths in the two models, 3 positions of a vocabulary of 4,
    tokens of one law or of one per position: the token-moments algorithm
    against the enumeration of all 64 sequences and against the brute-force
    loop."""
    rng = np.random.default_rng(7)
    V, n = 4, 3
    a, b = attention_lm(rng, V, 3, 2, 2, n, **flags), attention_lm(rng, V, 3, 1, 3, n, **flags)
    m = measure(rng, V, n, kind)
    for x, y in ((a, b), (a, a)):
        for kw in ({}, {"centered": True}, {"per_output": True}, {"centered": True, "per_output": True}):
            got = ts.inner(x, y, measure=m, algorithm="token-moments", **kw)
            want = ts.inner(x, y, measure=m, algorithm="enumeration", **kw)
            assert got.exact and got.algorithm == "token-moments"
            np.testing.assert_allclose(got.value, want.value, rtol=1e-10, atol=1e-12 * np.max(np.abs(want.value)))
    seq = lambda f: lambda x: f(x.reshape(n, V).argmax(axis=1))  # noqa: E731  (brute feeds flat one-hot vectors)
    assert ts.inner(a, b, measure=m, algorithm="token-moments").value == pytest.approx(brute(seq(a), seq(b), m),
                                                                                     rel=1e-10)
    joint = ts.similarity(a, b, measure=m, algorithm="token-moments")
    assert joint.value == pytest.approx(ts.similarity(a, b, measure=m, algorithm="enumeration").value, rel=1e-10)


def test_token_attention_moments_at_one_position():
    """One position, causal and rotary: no key offsets at all (the
    conditional tables carry nothing); equal to every sequence."""
    rng = np.random.default_rng(3)
    flags = dict(causal=True, rotary_base=5.0)
    a, b = attention_lm(rng, 5, 3, 2, 2, 1, **flags), attention_lm(rng, 5, 3, 1, 2, 1, **flags)
    m = ts.Tokens(5, 1)
    got = ts.similarity(a, b, measure=m, algorithm="token-moments")
    assert got.value == pytest.approx(ts.similarity(a, b, measure=m, algorithm="enumeration").value, rel=1e-10)


def test_score_blocks_smaller_than_the_vocabulary_and_ragged(monkeypatch):
    """Score blocks and the conditional tables' vocabulary blocks smaller
    than the vocabulary and not dividing it (the last blocks short), three
    rotary offsets: equal to the enumeration of every sequence, uniform,
    with frequencies, and with a law per position (several query laws
    per offset)."""
    import tsalgebra.algorithms.token_moments as token_moments

    monkeypatch.setattr(token_moments, "_QUERY_BLOCK", 3)
    monkeypatch.setattr(token_moments, "_KEY_BLOCK", 4)
    monkeypatch.setattr(token_moments, "_PAIR_ELEMENTS", 40)  # the conditional tables in blocks of 5 and 2 tokens
    rng = np.random.default_rng(9)
    V, n = 7, 4
    flags = dict(causal=True, rotary_base=5.0, residual=True)
    a, b = attention_lm(rng, V, 3, 2, 2, n, **flags), attention_lm(rng, V, 3, 1, 2, n, **flags)
    for kind in (None, "shared", "per token", "mixed"):
        m = measure(rng, V, n, kind)
        got = ts.similarity(a, b, measure=m, algorithm="token-moments")
        want = ts.similarity(a, b, measure=m, algorithm="enumeration")
        assert got.value == pytest.approx(want.value, rel=1e-10)
        centered = ts.inner(a, b, measure=m, algorithm="token-moments", centered=True)
        assert centered.value == pytest.approx(ts.inner(a, b, measure=m, algorithm="enumeration",
                                                        centered=True).value, rel=1e-10)


def test_token_attention_moments_at_width_is_chosen_and_polynomial():
    """Vocabulary 512, 4 positions (6.9e10 sequences): the token-moments
    algorithm is chosen, and agrees with a Monte Carlo mean over sampled
    sequences within 4 standard errors, uniform tokens and tokens of a
    different law at every position."""
    rng = np.random.default_rng(8)
    V, n = 512, 4
    flags = dict(causal=True, rotary_base=10000.0, residual=True)
    a = attention_lm(np.random.default_rng(8), V, 16, 2, 4, n, **flags)
    b = attention_lm(np.random.default_rng(8), V, 16, 2, 4, n, noise=rng, **flags)  # a's weights, perturbed
    p = rng.random((n, V)) ** 4  # far from uniform: a few tokens carry most of each position's mass
    for m in (ts.Tokens(V, n), ts.Tokens(V, n, p / p.sum(axis=1, keepdims=True))):
        plan = ts.plan_similarity(a, b, measure=m)
        assert plan.products[0][1].algorithm == "token-moments" and plan.products[0][1].joint
        exact = ts.inner(a, b, measure=m)
        assert exact.algorithm == "token-moments" and exact.exact
        P = m.token_probs()
        ids = np.stack([rng.choice(V, size=40000, p=P[i]) for i in range(n)], axis=1)
        prod = np.einsum("bo,bo->b", np.asarray(a(ids)).reshape(len(ids), -1), np.asarray(b(ids)).reshape(len(ids), -1))
        se = prod.std(ddof=1) / np.sqrt(len(prod))
        assert abs(prod.mean() - exact.value) < 4 * se and se < 0.1 * abs(exact.value)


_MEMORY_SCRIPT = """
import sys, threading, time
import numpy as np
import tsalgebra as ts
import tsalgebra.heap
tsalgebra.heap._MALLOPT = None  # malloc as the environment sets it (kept_heap would keep the warm call's memory)
sys.path.insert(0, sys.argv[1])
from test_tokens import attention_lm
flags = dict(causal=True, rotary_base=10000.0, residual=True)
a = attention_lm(np.random.default_rng(0), 2048, 128, 8, 16, 4, **flags)
b = attention_lm(np.random.default_rng(1), 2048, 128, 8, 16, 4, **flags)
p = np.random.default_rng(2).random((4, 2048)) ** 4  # sys.argv[2] == "laws": a different law at every position
m = ts.Tokens(2048, 4, p / p.sum(axis=1, keepdims=True) if sys.argv[2] == "laws" else None)
planned = ts.plan_similarity(a, b, measure=m).products[0][1].peak_bytes
ts.similarity(a, b, measure=m)  # warm: libraries loaded, the models' maps made
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
start = rss(); peak = [start]; done = []
def watch():
    while not done:
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
t = threading.Thread(target=watch); t.start()
ts.similarity(a, b, measure=m); done.append(1); t.join()
print(planned, peak[0] - start)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets glibc's malloc")
@pytest.mark.parametrize("laws", ["uniform", "laws"], ids=["one law", "a law per position"])
def test_token_plan_memory_against_the_process(laws):
    """Vocabulary 2048, d_model 128, 8 heads of 16, 4 positions: the plan's
    memory against the peak of the process's resident memory above the
    start of a warm similarity (sampled every 0.5 ms, in a child process
    whose malloc returns every freed array at once), which also holds the
    rescaled models: within 25 % above the plan, and not below half of it."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, os.path.dirname(__file__), laws], capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    planned, used = (float(v) for v in out.stdout.split())
    assert 0.5 * planned < used < 1.25 * planned


def test_tokens_and_the_gaussian_of_the_same_moments():
    """A Gaussian with the one-hot vectors' mean p and covariance
    diag(p) - p p' per token agrees with the token measure on products of
    degree at most two per token (Linear models), and not beyond (a
    bilinear layer): the relation stated in docs/inner-products.md."""
    rng = np.random.default_rng(9)
    V, n = 5, 2
    p = rng.dirichlet(np.ones(V))
    mean = np.tile(p, n)
    cov = np.kron(np.eye(n), np.diag(p) - np.outer(p, p))
    tokens, gauss = ts.Tokens(V, n, p), ts.Gaussian(mean, cov)
    a, b = (ts.Linear(rng.normal(size=(3, n * V)), rng.normal(size=3)) for _ in range(2))
    for kw in ({}, {"centered": True}):
        assert ts.inner(a, b, measure=tokens, **kw).value == pytest.approx(ts.inner(a, b, measure=gauss, **kw).value,
                                                                           rel=1e-12)
    f, g = stack(rng, V, n, 1), stack(rng, V, n, 1)
    assert abs(ts.inner(f, g, measure=tokens).value - ts.inner(f, g, measure=gauss).value) > 1e-3


def test_token_inner_product_at_the_language_model_shape_fits_the_default_budget():
    """The field's language-model shape (vocabulary 4096, d_model 256, 8
    heads of 32, 4 positions, causal, rotary): the token inner product is
    planned as token-moments within the default budget (a refusal there
    would turn away the models the algorithm exists for)."""
    flags = dict(causal=True, rotary_base=10000.0, residual=True)
    a, b = (attention_lm(np.random.default_rng(s), 4096, 256, 8, 32, 4, **flags) for s in (0, 1))
    plan = ts.plan_inner(a, b, measure=ts.Tokens(4096, 4))
    assert plan.algorithm == "token-moments" and 1e11 < plan.flops <= DEFAULT_BUDGET


def test_verify_and_check_invariance_under_the_token_measure():
    """verify and check_invariance take measure=ts.Tokens (and a token model's
    own measure by default): their figures against the enumeration of every
    sequence; the token question differs from the Gaussian one where two
    models agree on one-hot inputs only."""
    from tsalgebra.symmetries import random_symmetry

    rng = np.random.default_rng(11)
    V, n = 4, 3
    a, b = attention_lm(rng, V, 3, 2, 2, n, causal=True, rotary_base=10.0), attention_lm(rng, V, 3, 1, 3, n)
    T = ts.Tokens(V, n)
    seq = lambda f: lambda x: f(x.reshape(n, V).argmax(axis=1))  # noqa: E731  (brute feeds flat one-hot vectors)
    ab, aa, bb = brute(seq(a), seq(b), T), brute(seq(a), seq(a), T), brute(seq(b), seq(b), T)
    v = ts.verify(b, a, measure=T)
    assert v.inner == "tokens" and v.similarity == pytest.approx(ab / np.sqrt(aa * bb), rel=1e-9)
    assert v.verdict == "different" and v.relative_residual == pytest.approx(1 - 2 * ab / aa + bb / aa, rel=1e-9)
    assert ts.verify(b, a, inner="gaussian").similarity == pytest.approx(ts.similarity(a, b, "gaussian").value, rel=1e-9)

    report = ts.check_invariance(a, random_symmetry(a, rng=3), measure=T)  # attention symmetries, a sequence model
    assert report.invariant and report.method == "tokens (exact)" and abs(report.relative_distance) < 1e-9
    moved = ts.check_invariance(a, b, measure=T)
    assert not moved.invariant and moved.method == "tokens (exact)"
    assert moved.relative_distance == pytest.approx(1 - 2 * ab / aa + bb / aa, rel=1e-9)

    # sum_i x_i^2 and sum_i x_i: equal on every one-hot block, different polynomials
    squares = ts.Bilinear(np.eye(2 * V), np.eye(2 * V), np.ones((1, 2 * V)))
    ones = ts.Linear(np.ones((1, 2 * V)))
    on_tokens = ts.check_invariance(squares, ones, measure=ts.Tokens(V, 2))
    assert on_tokens.invariant and on_tokens.method == "tokens (exact)" and on_tokens.relative_distance == pytest.approx(0, abs=1e-12)
    assert not ts.check_invariance(squares, ones).invariant  # the Gaussian question
    assert ts.verify(ones, squares, measure=ts.Tokens(V, 2)).verdict.startswith("equal")
    with pytest.raises(ValueError, match="function-level inner product: 'gaussian', 'tokens' or 'symmetric'"):
        ts.verify(ones, squares, inner="network")


def test_a_token_model_is_checked_under_its_own_measure_by_default():
    torch.manual_seed(1)
    V, d, n = 6, 4, 3
    att = BilinearAttentionModule(2, 2, d, n_ctx=n, causal=True, rotary_base=10.0, residual=True, bias=True)
    a = ts.from_torch(nn.Sequential(nn.Embedding(V, d), att, nn.Linear(d, V)))
    from tsalgebra.symmetries import random_symmetry

    report = ts.check_invariance(a, random_symmetry(a, rng=0))  # failed before: the wire scales fed attention flat inputs
    assert report.invariant and report.method.startswith("tokens")
    assert ts.verify(a, a).inner == "tokens"
    with pytest.raises(ValueError, match="mean= and cov= describe a Gaussian"):
        ts.check_invariance(a, a, mean=np.zeros(a.in_features))


def test_a_token_refusal_names_only_what_applies_under_tokens():
    """Two attention layers under the token measure, over budget: the refusal
    names the budget and method='sampled', never the Gaussian-only closure;
    the Gaussian refusal of the same models offers closure."""
    torch.manual_seed(2)
    att = lambda: BilinearAttentionModule(2, 2, 4, n_ctx=3, causal=True, residual=True)  # noqa: E731
    a, b = (ts.from_torch(nn.Sequential(nn.Embedding(6, 4), att(), att(), nn.Linear(4, 6))) for _ in range(2))
    with pytest.raises(ts.CostError) as err:
        ts.similarity(a, b, budget=1e3)
    assert "closure" not in str(err.value) and "method='sampled'" in str(err.value)
    assert "token-moments: does not apply: only position-wise Linear layers may follow the attention" in str(err.value)
    with pytest.raises(ts.CostError, match="method='closure'"):
        ts.similarity(a, b, "gaussian", budget=1e3)


@pytest.mark.parametrize("flags_a, flags_b", [({"causal": True}, {}),
                                              ({"causal": True, "rotary_base": 10.0}, {"rotary_base": 5.0}),
                                              ({}, {"causal": True, "rotary_base": 10.0, "residual": True})],
                         ids=["causal-full", "causal-rotary-full-rotary", "full-causal-rotary"])
@pytest.mark.parametrize("kind", [None, "per token", "mixed"], ids=["uniform", "per position", "some positions alike"])
def test_models_of_different_masks_against_every_sequence(flags_a, flags_b, kind):
    """Two models that read different key positions (one causal, one not;
    rotary on one side or with different bases): the pairs of a similarity
    share some offsets only.  With a law per position this raised KeyError
    (the shared-key correction was made for every pair at every offset any
    pair read).  Equal to the enumeration of every sequence."""
    rng = np.random.default_rng(5)
    V, n = 3, 3
    a, b = attention_lm(rng, V, 3, 2, 2, n, **flags_a), attention_lm(rng, V, 3, 1, 3, n, **flags_b)
    m = measure(rng, V, n, kind)
    for kw in ({}, {"centered": True}):
        got = ts.similarity(a, b, measure=m, algorithm="token-moments", **kw)
        want = ts.similarity(a, b, measure=m, algorithm="enumeration", **kw)
        assert got.value == pytest.approx(want.value, rel=1e-10)
        inner = ts.inner(a, b, measure=m, algorithm="token-moments", **kw)
        assert inner.value == pytest.approx(ts.inner(a, b, measure=m, algorithm="enumeration", **kw).value, rel=1e-10)


def test_models_that_read_different_tokens_are_refused():
    """3 tokens of 8 and 4 tokens of 6 are both 24 one-hot features: the
    widths agree, the inputs do not.  The similarity was computed under the
    first model's measure, a number without meaning; now every entry point
    refuses, naming both readings."""
    torch.manual_seed(0)
    att = lambda n: BilinearAttentionModule(2, 2, 4, n_ctx=n, causal=True, residual=True)  # noqa: E731
    a = ts.from_torch(nn.Sequential(nn.Embedding(8, 4), att(3), nn.Linear(4, 8)))
    c = ts.from_torch(nn.Sequential(nn.Embedding(6, 4), att(4), nn.Linear(4, 6)))
    flat8 = ts.from_torch(nn.Sequential(nn.Embedding(8, 4), nn.Flatten(), nn.Linear(12, 2)))
    flat6 = ts.from_torch(nn.Sequential(nn.Embedding(6, 4), nn.Flatten(), nn.Linear(16, 2)))
    says = r"read different tokens \(.*reads 3 tokens of a vocabulary of 8; .*reads 4 tokens of a vocabulary of 6\)"
    for call in (lambda: ts.similarity(a, c), lambda: ts.inner(a, c, measure=ts.Tokens(8)),
                 lambda: ts.similarity(a, c, "gaussian"), lambda: ts.similarity(flat8, flat6),
                 lambda: ts.similarity_matrix([a, a, c], progress=False),
                 lambda: ts.cross_similarity_matrix([a], [c], progress=False)):
        with pytest.raises(ValueError, match=says):
            call()
    assert ts.similarity(a, ts.Linear(np.ones((24, 24)))).inner == "tokens"  # a model of plain features reads them


class _BlocksLM(nn.Module):
    """The papers' layout in torch: embed, a ModuleList of blocks looped over, head."""

    def __init__(self, V, d, n):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([BilinearAttentionModule(2, 2, d, n_ctx=n, causal=True) for _ in range(2)])
        self.head = nn.Linear(d, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class _ResidualBlocksLM(_BlocksLM):
    """Each block adds its own residual; the loop is x = block(x)."""

    def __init__(self, V, d, n):
        super().__init__(V, d, n)
        self.blocks = nn.ModuleList([BilinearAttentionModule(2, 2, d, n_ctx=n, causal=True, residual=True)
                                     for _ in range(2)])

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_blocks_in_a_module_list_reading_token_ids_from_torch():
    """Checked on token ids (the check fed it random float vectors, and every
    such language model was refused: 'forward matches none of them')."""
    torch.manual_seed(2)
    V, n = 4, 3
    net = _BlocksLM(V, 4, n).double().eval()
    model = ts.from_torch(net)
    ids = torch.randint(0, V, (5, n))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(model(ids)), net(ids).numpy(), rtol=1e-10, atol=1e-12)
    assert model.default_measure.label == ts.Tokens(V, n).label
    # blocks with their own residual, looped as x = block(x): the reading x + block(x) failed inside a
    # block, and that refusal stopped the other reading from being tried
    net = _ResidualBlocksLM(V, 4, n).double().eval()
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(ts.from_torch(net)(ids)), net(ids).numpy(), rtol=1e-10, atol=1e-12)


def test_a_circuit_without_a_measure_is_compared_under_the_models_measure():
    """A hand-written circuit on the one-hot tokens carries no measure; a
    similarity with a language model took each self-product under its own
    model's default (<b,b> Gaussian: 0.039 for 0.087), and the answer
    depended on the order.  Now the pair's measure, in either order."""
    torch.manual_seed(0)
    V = 5
    net = nn.Sequential(nn.Embedding(V, 3), nn.Linear(3, 2)).double().eval()
    lm, circuit = ts.from_torch(net), ts.Linear(np.random.default_rng(1).normal(size=(2, V)))
    mu = ts.Tokens(V, 1)
    want = brute(lm, circuit, mu) / np.sqrt(brute(lm, lm, mu) * brute(circuit, circuit, mu))
    for x, y in ((lm, circuit), (circuit, lm)):
        s = ts.similarity(x, y)
        assert s.value == pytest.approx(want, rel=1e-10) and s.inner == "tokens"
        assert ts.inner(x, y, inner="tokens").value == pytest.approx(brute(lm, circuit, mu), rel=1e-10)
        assert ts.similarity_matrix([x, y], progress=False).values[0, 1] == pytest.approx(want, rel=1e-10)
    assert ts.verify(circuit, lm).inner == "tokens"
    assert ts.check_invariance(circuit, lm).method.startswith("tokens")  # the model given second reads tokens


def test_many_tiny_orbits_are_refused_before_they_are_planned():
    """59,049 pairings of a one-head attention model under tokens: 29,646
    orbits of 2.7 KFLOP each never reached the flop budget, and planning
    them took minutes; more than MAX_ORBITS are refused at once."""
    from tsalgebra.pairing_sum import MAX_ORBITS

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(4, 3), BilinearAttentionModule(1, 2, 3, n_ctx=2, bias=True), nn.Linear(3, 2))
    a = ts.from_torch(net.double().eval())
    with pytest.raises(ts.CostError, match=f"29,646 orbit contractions .*more than {MAX_ORBITS:,} to plan"):
        ts.plan_inner(a, a, algorithm="pairings")
    assert ts.inner(a, a).algorithm == "token-moments"  # the chooser's answer is unchanged


def _nestings(V, d, n):
    """Four ways to nest a Flatten: (emb lin) flat lin, emb (lin flat) lin,
    emb attn (flat lin), emb (attn flat) lin."""
    emb, attn = (lambda: nn.Embedding(V, d)), (lambda: BilinearAttentionModule(2, 2, d, n_ctx=n))
    S = nn.Sequential
    return [S(S(emb(), nn.Linear(d, 2)), nn.Flatten(), nn.Linear(2 * n, 5)),
            S(emb(), S(nn.Linear(d, 2), nn.Flatten()), nn.Linear(2 * n, 5)),
            S(emb(), attn(), S(nn.Flatten(), nn.Linear(d * n, 5))),
            S(emb(), S(attn(), nn.Flatten()), nn.Linear(d * n, 5))]


@pytest.mark.parametrize("k", range(4))
def test_flatten_inside_nested_sequentials_from_torch(k):
    """A Flatten inside a nested nn.Sequential was lost (a width error that
    did not name it); plain nn.Sequential children are read in line."""
    torch.manual_seed(4)
    V, d, n = 3, 4, 3
    net = _nestings(V, d, n)[k].double().eval()
    model = ts.from_torch(net)
    ids = torch.tensor(list(itertools.product(range(V), repeat=n)))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(model(ids)), net(ids).numpy(), rtol=1e-12, atol=1e-12)


def _lm_with_constants(seed, V, n, o_bias, tail_bias):
    """embedding -> attention (output bias ``o_bias`` added) -> unembedding
    (bias ``tail_bias`` added): the constants shift every output alike."""
    rng = np.random.default_rng(seed)
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    att = ts.BilinearAttention(W(2, 2, 3), W(2, 2, 3), W(2, 2, 3), W(2, 2, 3), W(2, 2, 3), W(2, 3, 2), causal=True,
                               n_ctx=n, rotary_base=10.0, q1_bias=W(2, 2), v_bias=W(2, 2), o_bias=W(3) + o_bias)
    return ts.Sequential(ts.position_wise(ts.Linear(W(3, V), W(3)), n), att,
                         ts.position_wise(ts.Linear(W(2, 3), W(2) + tail_bias), n))


@pytest.mark.parametrize("kind, algorithm, constants, rel", [
    ("tokens", "token-moments", (1e7, 0.0), 1e-9), ("tokens", "token-moments", (0.0, 1e7), 1e-9),
    ("tokens", "enumeration", (1e7, 1e7), 1e-7), ("gaussian", "moments", (1e7, 0.0), 1e-9),
    ("gaussian", "moments", (0.0, 1e7), 1e-9), ("gaussian", "hermite", (0.0, 1e7), 1e-9)])
def test_centred_products_blind_to_large_output_constants(kind, algorithm, constants, rel):
    """A covariance does not see a constant added to the outputs: with the
    attention's output bias or the unembedding's bias raised by 1e7, the
    centred inner product and similarity equal those of the same models
    without it, to 1e-9 (E[f g] - E[f] E[g] subtracted terms 1e14 times the
    answer: 2 to 12 digits lost).  The token-moments algorithm takes the
    covariance over the query token as such, every algorithm subtracts the
    means before the unembedding reads them, enumeration merges each chunk's
    co-moment about its own means; the attention algorithms leave the output bias
    out of centred products.  Enumeration to 1e-7: its forward passes round
    outputs that carry the attention's constant at 1e-16 of 1e7."""
    V, n = 4, 3
    m = ts.Tokens(V, n) if kind == "tokens" else ts.Gaussian()
    plain = [_lm_with_constants(s, V, n, 0.0, 0.0) for s in (1, 2)]
    shifted = [_lm_with_constants(s, V, n, *constants) for s in (1, 2)]
    for f in (ts.inner, ts.similarity):
        want = f(*plain, measure=m, algorithm=algorithm, centered=True).value
        got = f(*shifted, measure=m, algorithm=algorithm, centered=True)
        assert got.algorithm == algorithm and got.value == pytest.approx(want, rel=rel)


def test_centred_node_gram_matrix_blind_to_large_output_constants():
    """The node-gram route's centred Gram, each chunk about its own means:
    a constant of 1e7 on every output of three bilinear layers on
    two one-hot tokens leaves the matrix unchanged to 1e-6 (off by 1e-2
    before; what is left is the rounding of outputs that carry the constant,
    1e-16 of 1e7, in the forward passes themselves)."""
    V, n = 5, 2

    def layer(seed, c):
        rng = np.random.default_rng(seed)
        W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
        return ts.Bilinear(W(3, n * V), W(3, n * V), W(2, 3), left_bias=W(3), down_bias=W(2) + c)

    want, got = (ts.similarity_matrix([layer(s, c) for s in (1, 2, 3)], measure=ts.Tokens(V, n), centered=True,
                                      route="node-gram") for c in (0.0, 1e7))
    np.testing.assert_allclose(np.asarray(got.values), np.asarray(want.values), rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["pairings", "quadrature", "sampled"])
def test_centred_products_without_output_bias_on_every_route(algorithm):
    """The output bias is left out of centred products before any algorithm
    or matrix route runs: a bilinear layer whose down bias is raised by 1e8
    gives the centred product of the layer without it (pairings and
    quadrature to 1e-9, where E[f g] - E f E g lost half the digits; the
    Monte Carlo estimate exactly, with the same seed), and so does the
    batched matrix route."""
    rng = np.random.default_rng(4)
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    L, R, D, lb, db = W(3, 2), W(3, 2), W(2, 3), W(3), W(2)
    plain = [ts.Bilinear(L, R, D, left_bias=lb, down_bias=db), ts.Bilinear(R, L, D, right_bias=lb, down_bias=db)]
    shifted = [m.replace(down_bias=m.down_bias + 1e8) for m in plain]
    kw = dict(algorithm=algorithm, centered=True) | ({"seed": 3, "samples": 2000} if algorithm == "sampled" else {})
    want, got = (ts.inner(*ms, **kw).value for ms in (plain, shifted))
    assert got == pytest.approx(want, rel=1e-9)
    want, got = (ts.similarity_matrix(ms + [ms[0]], centered=True).values for ms in (plain, shifted))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9)
