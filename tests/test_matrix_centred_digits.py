"""The batched matrix routes' centred products when the outputs' mean is far
above their spread: each route's float64 rounding is judged, as the pair
algorithms judge theirs, against an exact oracle in rationals.

Centring cancels each output's constant term: materialize cancels it within
each model's tensor (an error of about 2^-50 of the term, squared in the
self product), pairwise-gram only in the sum of the pair's products (2^-50
of the term squared), so the second keeps about half the digits."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import tsalgebra as ts

D, H, O = 48, 3, 2  # wide input, few hidden units: the automatic choice is pairwise-gram


def _models(scale: float, d: int = D) -> list[ts.Sequential]:
    """Two ordinary layers, and one whose input-dependent part is ``scale``
    of its constant part (its outputs' mean 1/scale times their spread)."""
    rng = np.random.default_rng(0)
    out = []
    for s in (1.0, 1.0, scale):
        L, R = rng.normal(size=(H, d)) * s, rng.normal(size=(H, d)) * s
        lb, rb = rng.normal(size=H), rng.normal(size=H)
        out.append(ts.Sequential(ts.Bilinear(L, R, rng.normal(size=(O, H)), left_bias=lb, right_bias=rb)))
    return out


def _quadratic(model: ts.Sequential, mean: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per output, the exact quadratic and linear parts (A symmetric, b) of
    f(m + z) = c + b.z + z'Az, in rationals from the float weights."""
    layer = model.layers[0]
    F = np.vectorize(Fraction, otypes=[object])
    m = F(np.zeros(layer.left.shape[1]) if mean is None else np.asarray(mean))
    L, R, Dm = F(np.asarray(layer.left)), F(np.asarray(layer.right)), F(np.asarray(layer.down))
    lb, rb = F(np.asarray(layer.left_bias)), F(np.asarray(layer.right_bias))
    out = []
    for o in range(Dm.shape[0]):
        A = sum(Dm[o, h] * (np.outer(L[h], R[h]) + np.outer(R[h], L[h])) / 2 for h in range(L.shape[0]))
        b = sum(Dm[o, h] * (lb[h] * R[h] + rb[h] * L[h]) for h in range(L.shape[0]))
        out.append((A, b + 2 * A.dot(m)))
    return out


def _exact_cosines(models: list[ts.Sequential], mean: np.ndarray | None = None) -> np.ndarray:
    """The centred Gaussian cosines in rationals: under N(m, I) the
    covariance of two quadratics in z = x - m is 2 tr(A_f A_g) + b_f . b_g
    per output."""
    parts = [_quadratic(m, mean) for m in models]

    def cov(p: list, q: list) -> Fraction:
        return sum(2 * (Af * Ag).sum() + (bf * bg).sum() for (Af, bf), (Ag, bg) in zip(p, q))

    n = len(models)
    K = [[cov(parts[i], parts[j]) for j in range(n)] for i in range(n)]
    return np.array([[float(K[i][j]) / float(np.sqrt(float(K[i][i]) * float(K[j][j]))) for j in range(n)]
                     for i in range(n)])


def test_ordinary_models_are_exact_on_both_routes() -> None:
    models = _models(1.0)
    oracle = _exact_cosines(models)
    for route in ("pairwise-gram", "materialize"):
        S = ts.similarity_matrix(models, centered=True, route=route)
        assert S.exact and not S.notes
        np.testing.assert_allclose(S.values, oracle, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-5, 1e-8])
def test_the_automatic_choice_takes_the_route_that_keeps_the_digits(scale: float) -> None:
    models = _models(scale)
    oracle = _exact_cosines(models)
    lossy = ts.similarity_matrix(models, centered=True, route="pairwise-gram")
    assert not lossy.exact and any("fewer than 8 digits" in n for n in lossy.notes)
    S = ts.similarity_matrix(models, centered=True)
    assert S.route == "materialize" and S.exact
    assert any("pairwise-gram route's rounding kept fewer digits" in n for n in S.notes)
    np.testing.assert_allclose(S.values, oracle, atol=1e-9)
    # the cross matrix judges both sides the same way
    C = ts.cross_similarity_matrix(models[:2], models[2:], centered=True)
    assert C.route == "materialize" and C.exact
    np.testing.assert_allclose(C.values, oracle[:2, 2:], atol=1e-9)


def test_digits_lost_on_every_route_are_said() -> None:
    models = _models(1e-12)
    S = ts.similarity_matrix(models, centered=True)
    assert not S.exact and any("fewer than 8 digits" in n for n in S.notes)
    np.testing.assert_allclose(S.values, _exact_cosines(models), atol=1e-6)


@pytest.mark.parametrize("route", ["auto", "materialize", "pairwise-gram"])
def test_a_constant_model_has_no_centred_similarity(route: str) -> None:
    # the input-dependent part 0: a model constant in exact arithmetic, whose
    # centred norm float64 left at 1e-16 (materialize: cosines of 0 and 1, exact)
    with pytest.raises(ValueError, match="row model 2 has zero norm.*rounding of the terms it sums, so taken as 0"):
        ts.similarity_matrix(_models(0.0, d=4), centered=True, route=route)


def test_float32_judges_at_its_own_rounding() -> None:
    # float32 rounds 2^29 times coarser: a mean 1e5 times the spread leaves about 3 digits of the variance
    # (said), 1e8 none (refused); an ordinary model only the float32 note
    S = ts.similarity_matrix(_models(1e-5, d=4), centered=True, route="materialize", dtype="float32")
    assert not S.exact and any("float32's rounding left about 3 digits" in n for n in S.notes)
    np.testing.assert_allclose(S.values, _exact_cosines(_models(1e-5, d=4)), atol=1e-4)
    plain = ts.similarity_matrix(_models(1.0, d=4), route="pairwise-gram", dtype="float32")
    assert not plain.exact and len(plain.notes) == 1 and "computed in float32" in plain.notes[0]
    with pytest.raises(ValueError, match="constant to float32"):
        ts.similarity_matrix(_models(1e-8, d=4), centered=True, route="materialize", dtype="float32")


def _inside(seed: int, down_bias: float) -> tuple[list[ts.Sequential], list[ts.Sequential]]:
    """Two layers whose output constant ``down_bias`` sits inside the model
    (a Linear after it: centring drops only the last layer's bias), two
    ordinary ones, and for the oracle the same functions up to a constant."""
    rng = np.random.default_rng(seed)
    models, plain = [], []
    for db in (down_bias, down_bias, 1.0, 1.0):
        L, R, Dm = rng.normal(size=(1, D)), rng.normal(size=(1, D)), rng.normal(size=(O, 1))
        lb, rb, P = rng.normal(size=1), rng.normal(size=1), rng.normal(size=(1, O))
        models.append(ts.Sequential(ts.Bilinear(L, R, Dm, left_bias=lb, right_bias=rb,
                                                down_bias=db * rng.normal(size=O)), ts.Linear(P)))
        plain.append(ts.Sequential(ts.Bilinear(L, R, P @ Dm, left_bias=lb, right_bias=rb)))
    return models, plain


def test_a_self_product_rounded_to_zero_is_no_exact_zero() -> None:
    # pairwise-gram's own self products of the rows came out 0.0 exactly (a variance of 1.2e4 under an output
    # constant of 1e10), taken for a true 0: 'row model 0 has zero norm' on the automatic route, nothing retried
    models, plain = _inside(43, 1e10)
    oracle = _exact_cosines(plain)[:2, 2:]
    C = ts.cross_similarity_matrix(models[:2], models[2:], centered=True)
    assert C.route == "materialize" and C.exact
    np.testing.assert_allclose(C.values, oracle, atol=1e-9)
    with pytest.raises(ValueError, match="so taken as 0: route='materialize' rounds less"):
        ts.cross_similarity_matrix(models[:2], models[2:], centered=True, route="pairwise-gram")


def test_a_cosine_beyond_1_from_rounding_says_so() -> None:
    # under N(m, I), m about 1e3, and an output constant of 1e9 inside: pairwise-gram's cosines exceeded 1,
    # said as 'the inner product is not positive definite here'
    rng = np.random.default_rng(16)
    models, plain = [], []
    for db in (1e9, 1e9, 1.0, 1.0):
        L, R, Dm = rng.normal(size=(2, 2)), rng.normal(size=(2, 2)), rng.normal(size=(O, 2))
        lb, rb, bias = rng.normal(size=2), rng.normal(size=2), db * rng.normal(size=O)
        P = rng.normal(size=(1, O))
        models.append(ts.Sequential(ts.Bilinear(L, R, Dm, left_bias=lb, right_bias=rb, down_bias=bias), ts.Linear(P)))
        plain.append(ts.Sequential(ts.Bilinear(L, R, P @ Dm, left_bias=lb, right_bias=rb)))
    mean = 1000 * rng.normal(size=2)
    law = ts.Gaussian(mean, np.eye(2))
    with pytest.raises(ArithmeticError, match="rounding left .* digits of some model's self product; route='mat"):
        ts.cross_similarity_matrix(models[:2], models[2:], centered=True, route="pairwise-gram", measure=law)
    C = ts.cross_similarity_matrix(models[:2], models[2:], centered=True, measure=law)
    assert C.route == "materialize"
    np.testing.assert_allclose(C.values, _exact_cosines(plain, mean)[:2, 2:], atol=1e-9 if C.exact else 1e-6)
