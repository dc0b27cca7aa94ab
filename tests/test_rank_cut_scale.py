"""The Gaussian pushed through the layers before an attention layer keeps
the rank of the joint image relative to each row of the maps, not to the
largest: a residual channel scaled by 10^k and read back by 10^-k is the
same function, yet from k = 5 (an embedding) every other direction fell
below the cut of 1e-10 and the exact similarity changed (0.00043 became
-0.0020, labelled exact; a Linear input layer drifted from k = 10 and
flipped sign at k = 20)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import tsalgebra as ts

G = ts.Gaussian()


def _layers(seed, scale, embedding):
    rng = np.random.default_rng(seed)
    H, dh, d, n = 1, 2, 3, 2
    w = lambda *s: rng.normal(size=s)  # noqa: E731
    maps = [w(H, dh, d) for _ in range(5)]
    biases = dict(q1_bias=w(H, dh), k1_bias=w(H, dh), q2_bias=w(H, dh), k2_bias=w(H, dh), v_bias=w(H, dh), o_bias=w(d))
    o, E, U = w(H, d, dh), w(d, 5), w(4, d)
    c = np.ones(d)
    c[0] = scale
    att = ts.BilinearAttention(*[m / c for m in maps[:4]], maps[4] / c, o, causal=True, n_ctx=n, **biases)
    first = ts.Embedding(E * c[:, None]) if embedding else ts.Linear(E * c[:, None], w(d) * c)
    return ts.Transformer(first, [(att, None)], ts.Linear(U), n_ctx=n)


@pytest.mark.parametrize("embedding", [True, False])
@pytest.mark.parametrize("k", [5, 10, 20, 30])
def test_a_rescaled_residual_channel_leaves_the_similarity(embedding, k):
    a, other = _layers(1, 1.0, embedding), _layers(2, 1.0, embedding)
    b = _layers(1, 10.0**k, embedding)
    x = np.random.default_rng(0).normal(size=(3, 2, 5))
    np.testing.assert_allclose(b(x), a(x), rtol=1e-9, atol=1e-9)  # the same function
    for algorithm in ("moments", "hermite"):
        for centered in (False, True):
            want = ts.similarity(a, other, measure=G, algorithm=algorithm, centered=centered)
            got = ts.similarity(b, other, measure=G, algorithm=algorithm, centered=centered)
            assert got.exact and got.value == pytest.approx(want.value, rel=1e-9, abs=1e-12), (algorithm, got, want)
    assert ts.similarity(a, b, measure=G).value == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("v", [1e-9, 1e-10, 1e-12, 1e-16])
def test_a_feature_of_small_variance_is_kept(v):
    """cov = diag(1, v), the models reading x2 / sqrt(v) = z ~ N(0, 1):
    f = (x1 + z)^2, g = z^2 + x1^2, so <f, g> = 8, |f|^2 = 12, |g|^2 = 8
    and the cosine is 8 / sqrt(96) at every v.  At v <= 1e-10 the direction
    fell below the cut (relative to the largest variance): 1.0, exact."""
    s = np.sqrt(v)
    f = ts.Bilinear([[1.0, 1 / s]], [[1.0, 1 / s]], [[1.0]])
    g = ts.Bilinear([[0.0, 1 / s], [1.0, 0.0]], [[0.0, 1 / s], [1.0, 0.0]], [[1.0, 1.0]])
    law = ts.Gaussian(cov=np.diag([1.0, v]))
    assert law.rank == 2
    for algorithm in (None, "quadrature", "pairings"):
        got = ts.similarity(f, g, measure=law, **({} if algorithm is None else {"algorithm": algorithm}))
        assert got.exact and got.value == pytest.approx(8 / np.sqrt(96), rel=1e-12), (algorithm, got)


def test_a_constant_feature_of_a_data_covariance_stays_a_zero_direction():
    """np.cov of data with a constant feature leaves about 5e-33 of rounding
    on its variance: taken to a unit variance that rounding became a
    direction (rank 4 for 3, the support note lost, quadrature 3 times the
    nodes)."""
    rng = np.random.default_rng(0)
    data = np.column_stack([rng.normal(size=(50, 3)), np.full(50, 0.1)])
    law = ts.Gaussian(mean=data.mean(0), cov=np.cov(data.T))
    assert law.rank == 3


def _exact(model):
    return model.map_weights(lambda w: np.vectorize(Fraction, otypes=[object])(np.asarray(w, dtype=float)))


@pytest.mark.parametrize("centered", [False, True])
def test_a_small_eigenvalue_of_a_correlation_is_a_direction(centered):
    """cov with x1 and x2 correlated to 1 - 1e-12 (an eigenvalue of 1e-12,
    positive definite), the models reading x1 - x2 with weight 1e6 (variance
    2 through them).  The rank cut was 1e-10 of the largest eigenvalue: the
    direction was dropped and every route gave a cosine of -1 for 0.80
    (0.76 centred), exact.  Against the exact LDL^T of the rational cov."""
    cov = np.array([[1.0, 1 - 1e-12, 0.0], [1 - 1e-12, 1.0, 0.0], [0.0, 0.0, 1.0]])
    u, e3 = [1e6, -1e6, 0.0], [0.0, 0.0, 1.0]
    models = [ts.Bilinear([u, e3], [u, e3], [[1.0, w]]) for w in (1.0, -0.5)]
    models.append(ts.Bilinear([e3, [1.0, 0.0, 0.0]], [e3, [1.0, 0.0, 0.0]], [[1.0, 0.3]]))
    exact_law = ts.Gaussian(None, np.vectorize(Fraction, otypes=[object])(cov))
    want = np.array([[float(ts.similarity(_exact(a), _exact(b), measure=exact_law, centered=centered).value)
                      for b in models] for a in models])
    law = ts.Gaussian(None, cov)
    assert law.rank == 3
    for route in ("materialize", "pairwise-gram", "pairwise"):
        S = ts.similarity_matrix(models, measure=law, centered=centered, route=route)
        np.testing.assert_allclose(S.values, want, atol=1e-12)
    assert ts.similarity(models[0], models[1], measure=law, centered=centered).value == pytest.approx(
        want[0, 1], abs=1e-12)


def test_a_diagonal_covariance_is_not_cut():
    """diag(1, 1e-26, 1), read with weight 1e13 (unit variance): the batched
    routes' factor dropped the feature (sd below 2^-40 of the largest) and
    gave a cosine of 0.71, exact, where the pair algorithms, which join a
    diagonal covariance without a factor, gave 0.24."""
    e1, e2, e3 = [1.0, 0.0, 0.0], [0.0, 1e13, 0.0], [0.0, 0.0, 1.0]
    f = ts.Bilinear([e1, e2], [e1, e2], [[1.0, 1.0]])  # x1^2 + z^2
    g = ts.Bilinear([e1, e2, e3], [e1, e2, e3], [[1.0, -0.5, 1.0]])  # x1^2 - z^2 / 2 + x3^2: a cosine of 18^-1/2
    law = ts.Gaussian(None, np.diag([1.0, 1e-26, 1.0]))
    want = ts.similarity(_exact(f), _exact(g), measure=ts.Gaussian(
        None, np.diag([Fraction(1), Fraction(1e-26), Fraction(1)])), centered=True).value
    for route in ("materialize", "pairwise-gram", "pairwise"):
        S = ts.similarity_matrix([f, g], measure=law, centered=True, route=route)
        assert S.values[0, 1] == pytest.approx(float(want), abs=1e-12), route


@pytest.mark.parametrize("below", [-1e-12, -1e-300])
def test_a_diagonal_variance_rounded_below_zero_is_zero(below):
    """The validation accepts round-off below 0 (to 1e-10 of the largest); a
    diagonal covariance's factor took its square root (NaN on every batched
    route) and the pairings weighted by it.  Now the same as a 0 there."""
    rng = np.random.default_rng(0)
    models = [ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3)),
                          left_bias=rng.normal(size=3), right_bias=rng.normal(size=3)) for _ in range(3)]
    mean = rng.normal(size=4)
    want = ts.similarity_matrix(models, mean=mean, cov=np.diag([1.0, 2.0, 0.5, 0.0]), route="pairwise").values
    law = ts.Gaussian(mean, np.diag([1.0, 2.0, 0.5, below]))
    assert law.rank == 3
    for route in ("materialize", "pairwise-gram", "pairwise"):
        np.testing.assert_allclose(ts.similarity_matrix(models, measure=law, route=route).values, want, atol=1e-14)
    assert ts.similarity(models[0], models[1], measure=law).value == pytest.approx(want[0, 1], abs=1e-14)
