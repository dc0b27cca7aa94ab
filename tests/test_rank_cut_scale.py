"""The Gaussian pushed through the layers before an attention layer keeps
the rank of the joint image relative to each row of the maps, not to the
largest: a residual channel scaled by 10^k and read back by 10^-k is the
same function, yet from k = 5 (an embedding) every other direction fell
below the cut of 1e-10 and the exact similarity changed (0.00043 became
-0.0020, labelled exact; a Linear input layer drifted from k = 10 and
flipped sign at k = 20)."""

from __future__ import annotations

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
