"""Sums over inputs (enumeration, quadrature) centre outputs that their
float64 forwards computed with the mean in them: a variance keeps about
log10(sd / (2^-52 |mean|)) digits.  Below 8 the result is not exact and
says how many are left; one within the rounding is 0 and says so.  Before,
at a mean 1e7 to 1e12 times the spread, 9 to 4 digits came back labelled
exact, and at 1e13 a variance of 0 (an attention LM with 4 good digits)."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

import tsalgebra as ts

from test_tokens import _lm_with_constants


def _digits_said(result):
    note = next(n for n in result.notes if "sums outputs whose mean is about" in n)
    return int(re.search(r"about (\d+) digits? of it left \(not exact\)", note).group(1))


def _exact(a):
    return np.vectorize(Fraction, otypes=[object])(a)


def _shifted(c, exact=False):
    """x -> Bilinear(L, R, D)(W x + c): a constant c inside, mean ~ c^2."""
    rng = np.random.default_rng(0)
    W, L, R = (rng.integers(-3, 4, size=(3, k)).astype(float) for k in (2, 3, 3))
    D = rng.integers(-3, 4, size=(2, 3)).astype(float)
    f = _exact if exact else np.asarray
    return ts.Sequential(ts.Linear(f(W), f(np.full(3, c))), ts.Bilinear(f(L), f(R), f(D)))


@pytest.mark.parametrize("c", [1e2, 1e6, 1e8, 1e10])
def test_quadrature_says_the_digits_its_forwards_leave(c):
    """Against the exact rational variance (pairings on Fractions): exact to
    1e-9 while 8 digits are left, else labelled with fewer digits than it
    kept (at 1e8: 8.4 kept, 7 said; at 1e10: 6.5 kept, 5 said)."""
    exact, model = _shifted(c, exact=True), _shifted(c)
    want = float(ts.inner(exact, exact, centered=True).value)
    got = ts.inner(model, model, centered=True, algorithm="quadrature")
    error = abs(got.value - want) / want
    if got.exact:
        assert c <= 1e6 and error < 1e-9, got
    else:
        assert c >= 1e8 and "digits lost" in repr(got)
        assert error < 10.0 ** -_digits_said(got), (error, got.notes)


@pytest.mark.parametrize("c", [1e3, 1e9, 1e12])
def test_enumeration_says_the_digits_its_forwards_leave(c):
    """An attention LM whose attention output bias is c, under every token
    sequence, against the same LM without it (the variance does not depend
    on it).  At 1e12 (seed 2) its variance was taken as 0 before, labelled
    exact: 4 digits are left there."""
    V, n = 4, 3
    law = ts.Tokens(V, n)
    plain, shifted = (_lm_with_constants(2, V, n, o, 0.0) for o in (0.0, c))
    want = ts.inner(plain, plain, measure=law, algorithm="enumeration", centered=True).value
    for per_output in (False, True):
        got = ts.inner(shifted, shifted, measure=law, algorithm="enumeration", centered=True, per_output=per_output)
        error = np.max(np.abs(np.asarray(got.value) - want if not per_output else np.asarray(got.value) -
                              ts.inner(plain, plain, measure=law, algorithm="enumeration", centered=True,
                                       per_output=True).value) / np.sum(want))
        if c == 1e3:
            assert got.exact and error < 1e-11, got
        else:
            assert not got.exact and 0 < _digits_said(got) < 8 and error < 10.0 ** -_digits_said(got), got


def test_a_variance_taken_as_zero_says_so():
    """A model constant in exact arithmetic whose float64 forwards round
    differently per sequence (0.1 * 3a - 0.3 * a): its variance is their
    rounding, taken as 0 (the zero-norm refusal follows) and not called
    exact.  A model whose outputs are the same float on every sequence (one
    weight per position), or 0, has variance 0 exactly: exact."""
    rng = np.random.default_rng(0)
    law = ts.Tokens(3, 2)
    a = rng.normal(size=6)
    rounded = ts.Sequential(ts.Linear(np.vstack([3 * a, -a]), np.ones(2)), ts.Linear(np.array([[0.1, 0.3]])))
    r = ts.norm(rounded, measure=law, centered=True, algorithm="enumeration")
    assert r.value == 0.0 and not r.exact and r.digits == 0 and any("taken as 0" in n for n in r.notes), r
    for constant in (ts.Linear(np.tile(rng.normal(size=(2, 1)), (1, 6))), ts.Linear(np.zeros((2, 6)))):
        r = ts.norm(constant, measure=law, centered=True, algorithm="enumeration")
        assert r.value == 0.0 and r.exact, r


def _token_layers(c):
    """Three token models whose first layer's bias carries c: means c^2."""
    V, n = 5, 2

    def layer(seed):
        rng = np.random.default_rng(seed)
        W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
        return ts.Sequential(ts.Linear(W(3, n * V), W(3) + c), ts.Bilinear(W(3, 3), W(3, 3), W(2, 3)))

    return [layer(s) for s in (1, 2, 3)], ts.Tokens(V, n)


def test_the_automatic_choice_keeps_the_run_with_more_digits():
    """At c = 1e7 enumeration keeps about 6 digits of a variance and pairings
    none: the automatic choice handed enumeration's result to pairings, whose
    RoundingError then ended the call.  Enumeration's result stands, not
    exact, its digits said, and right to them (against exact rationals)."""
    (model, *_), law = _token_layers(1e7)
    got = ts.norm(model, measure=law, centered=True)
    assert got.algorithm == "enumeration" and not got.exact and 1 <= got.digits < 8, got
    exact = model.map_weights(_exact)
    want = float(ts.norm(exact, measure=law, centered=True).value)
    assert abs(got.value - want) / want < 10.0 ** -got.digits


@pytest.mark.parametrize("c", [1e3, 1e7])
def test_the_node_gram_route_judges_the_variances_as_the_sums_do(c):
    models, law = _token_layers(c)
    matrix = ts.similarity_matrix(models, measure=law, centered=True, route="node-gram", progress=False)
    pairwise = ts.similarity_matrix(models, measure=law, centered=True, route="pairwise", progress=False)
    np.testing.assert_allclose(matrix.values, pairwise.values, rtol=1e-6)
    assert matrix.exact == pairwise.exact == (c == 1e3), (matrix.notes, pairwise.notes)
    assert matrix.exact or any("left fewer than 8 digits" in n for n in matrix.notes), matrix.notes
