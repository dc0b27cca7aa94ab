"""Under the token measure the heavy-tail flag also judges what the samples can check.

Any function of the token sequence has kurtosis at most 1/p, p the rarest
sequence's probability, so a product's variance error is at most
sqrt((1/p - 1) / n) whatever the samples show.  A two-layer attention model
whose product is carried by sequences of a rare token (probability 1e-3 at
three positions) gave estimates 10-25 standard errors off, unflagged, in the
runs that drew none of them: they are now flagged below 1/(9p) samples.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

import tsalgebra as ts
from tsalgebra.algorithms.sampled import TAIL_CEILING


def w(rng, *shape, scale=1.0):
    return scale * rng.normal(size=shape) / np.sqrt(shape[-1])


def attention(rng, heads, dh, d, n_ctx):
    biases = {f"{f}_bias": w(rng, heads, dh, scale=0.3) for f in ("q1", "k1", "q2", "k2")}
    return ts.BilinearAttention(*(w(rng, heads, dh, d) for _ in range(5)), w(rng, heads, d, dh), causal=True,
                                scale=0.5, residual=True, n_ctx=n_ctx, **biases)


def transformer(seed, vocab=4, d=4, heads=2, dh=2, n_ctx=3):
    rng = np.random.default_rng(seed)
    embed = ts.Embedding(rng.normal(size=(d, vocab)))
    first, second = attention(rng, heads, dh, d, n_ctx), attention(rng, heads, dh, d, n_ctx)
    mid = ts.Linear(w(rng, d, d), rng.normal(size=d) * 0.3)
    return ts.Transformer(embed, [(first, mid), (second, None)], ts.Linear(w(rng, 2, d), rng.normal(size=2) * 0.3),
                          n_ctx)


def enumerated_cosine(a, b, probs, vocab, n_ctx):
    """The cosine over every token sequence, from the models' own forwards."""
    ids = np.array(list(itertools.product(range(vocab), repeat=n_ctx)))
    p = np.prod(np.asarray(probs)[ids], axis=1)
    fa, fb = a(ids).reshape(len(ids), -1), b(ids).reshape(len(ids), -1)
    return (p @ (fa * fb).sum(1)) / math.sqrt((p @ (fa * fa).sum(1)) * (p @ (fb * fb).sum(1)))


def test_a_rare_token_flags_every_estimate_that_could_miss_it():
    probs = np.linspace(1, 0.1, 4) ** 3
    probs /= probs.sum()  # the rarest token 1.2e-3; sequences holding it carry the product
    a, b = transformer(2), transformer(3)
    law = ts.Tokens(4, 3, probs)
    exact = enumerated_cosine(a, b, probs, 4, 3)
    assert exact == ts.similarity(a, b, measure=law).value or math.isclose(
        exact, ts.similarity(a, b, measure=law).value, rel_tol=1e-9)
    ceiling = math.sqrt((1 / probs.min() ** 3 - 1) / 500)
    for seed in range(12):
        r = ts.similarity(a, b, measure=law, method="sampled", samples=500, seed=seed)
        assert math.isclose(r.estimate.tail_ceiling, ceiling, rel_tol=1e-9)
        assert r.estimate.heavy_tailed or abs(r.value - exact) <= 3 * r.stderr, (seed, r.value, r.stderr, exact)
        assert r.estimate.heavy_tailed and "heavy tails" in repr(r)
        note = next(n for n in r.notes if n.startswith("HEAVY TAILS"))
        assert f"rarest token sequence has probability about {probs.min() ** 3:.3g}" in note, note


def test_the_rarest_sequence_skips_impossible_tokens_and_reads_each_position():
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    law = ts.Tokens(3, probs=probs)
    assert math.isclose(law.log10_rarest, math.log10(0.5 * 0.2 / 3), rel_tol=1e-12)
    assert math.isclose(ts.Tokens(5, 4).log10_rarest, -4 * math.log10(5), rel_tol=1e-12)
    shared = ts.Tokens(3, 2, np.array([0.7, 0.0, 0.3]))
    assert math.isclose(shared.log10_rarest, 2 * math.log10(0.3), rel_tol=1e-12)


def test_a_small_uniform_law_is_judged_by_its_samples():
    """Nine sequences: the ceiling sqrt(8 / n) is far below the threshold, and
    one bilinear layer's estimate is judged by its sample kurtosis as before."""
    rng = np.random.default_rng(0)
    a, b = (ts.Bilinear(rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(2, 4))) for _ in range(2))
    law = ts.Tokens(3, 2)
    est = ts.similarity(a, b, measure=law, method="sampled", samples=2000, seed=0).estimate
    assert math.isclose(est.tail_ceiling, math.sqrt(8 / 2000), rel_tol=1e-12) and est.tail_ceiling < TAIL_CEILING
    assert est.variance_error < 1.0  # the samples' own judgement, not the cap


def test_the_estimate_gives_its_products_in_the_models_units():
    """The statistics are the canonical models'; products() scales them back."""
    rng = np.random.default_rng(0)
    a = ts.Bilinear(w(rng, 4, 3), w(rng, 4, 3), w(rng, 2, 4))
    b = ts.Bilinear(3 * w(rng, 4, 3), w(rng, 4, 3), w(rng, 2, 4))
    r = ts.inner(a, b, method="sampled", samples=20000, seed=0)
    values, errors = r.estimate.products()
    assert math.isclose(values[0, 0], r.value, rel_tol=1e-12) and math.isclose(errors[0, 0], r.stderr, rel_tol=1e-12)
    for k, (x, y) in enumerate(((a, a), (b, b)), start=1):  # the self products, within 4 of their errors
        assert abs(values[k, 0] - ts.inner(x, y).value) < 4 * errors[k, 0], (k, values[k, 0], ts.inner(x, y).value)
    s = ts.similarity(a, b, method="sampled", samples=20000, seed=0)
    np.testing.assert_allclose(s.estimate.products()[0], values, rtol=1e-12)
