"""Matrix routes: messages found by probing the routes against exact oracles."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import tsalgebra as ts


def test_the_pairwise_routes_underflow_names_the_route_that_does_not():
    """Two depth-2 stacks whose network cosine is 1e-312: ts.inner's Gram
    underflows, and its advice was to call similarity_matrix(inner='network'),
    the call already made (route='pairwise'); the batched route normalises its
    Grams per layer and answers."""
    def stack(v):
        return ts.Sequential(ts.Bilinear([v], [v], [[1.0]]), ts.Bilinear([[1.0]], [[1.0]], [[1.0]]))

    models = [stack([1.0, 0.0, 0.0]), stack([1e-78, 1.0, 0.0])]
    with pytest.raises(FloatingPointError, match=r"underflows float64 at layer 2.*route='pairwise-gram' \(or 'auto'\)"):
        ts.similarity_matrix(models, inner="network", route="pairwise")
    S = ts.similarity_matrix(models, inner="network")
    assert S.route == "pairwise-gram" and S.values[0, 1] == pytest.approx(1e-312, rel=1e-9)


def _exact(model):
    return model.map_weights(lambda w: np.vectorize(Fraction, otypes=[object])(np.asarray(w, dtype=float)))


def test_hidden_units_that_cancel_are_judged_on_pairwise_gram():
    """Two hidden units with down weights +K and -K whose left rows differ by
    1/K: f = (dl.x)(R.x), of order 1.  pairwise-gram multiplies the pair's
    factor Grams before the units cancel, in terms K^2 times the product:
    its cosines were 2e-3 off at K = 1e7, labelled exact (at 1e9: 'zero
    norm').  Its self products are now judged by the size of their terms,
    and the automatic choice takes materialize, which cancels them within
    each model's tensor.  Against the exact rational products."""
    rng = np.random.default_rng(3)
    K, d = 1e7, 32
    models = []
    for _ in range(3):
        L, R, dl = rng.normal(size=(1, d)), rng.normal(size=(1, d)), rng.normal(size=(1, d)) / K
        models.append(ts.Bilinear(np.vstack([L, L - dl]), np.vstack([R, R]), [[K, -K]]))
    want = np.array([[float(ts.similarity(_exact(a), _exact(b)).value) for b in models] for a in models])
    lossy = ts.similarity_matrix(models, route="pairwise-gram")
    assert not lossy.exact and any("fewer than 8 digits of some model's self product" in n for n in lossy.notes)
    S = ts.similarity_matrix(models)
    assert S.route == "materialize" and S.exact
    np.testing.assert_allclose(S.values, want, atol=1e-9)


def test_ordinary_models_keep_every_digit_on_pairwise_gram():
    """The terms' sizes of random layers are a few times their sums: no
    false alarm (exact, equal to materialize), square and cross."""
    rng = np.random.default_rng(0)
    models = [ts.Bilinear(rng.normal(size=(16, 40)), rng.normal(size=(16, 40)), rng.normal(size=(3, 16)),
                          left_bias=rng.normal(size=16), right_bias=rng.normal(size=16)) for _ in range(5)]
    for centered in (False, True):
        S = ts.similarity_matrix(models, route="pairwise-gram", centered=centered)
        C = ts.cross_similarity_matrix(models[:2], models[2:], route="pairwise-gram", centered=centered)
        assert S.exact and C.exact and not S.notes and not C.notes
        M = ts.similarity_matrix(models, route="materialize", centered=centered)
        np.testing.assert_allclose(S.values, M.values, atol=1e-13)
        np.testing.assert_allclose(C.values, M.values[:2, 2:], atol=1e-13)
