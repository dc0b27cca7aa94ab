"""A centred product taken as E[f.g] - E[f].E[g] keeps only the digits of
the difference.  A model whose embedding is far below its biases has a mean
far above its spread: by pairings its variance lost 3 to all 16 digits (a
token similarity 5 % off at 1e-8, labelled exact; at 1e-10 "zero norm", and
-0.0038 in a matrix for -0.1004).  A self product now says how many digits
are left (not exact below 8), none is refused (RoundingError), and the
automatic choice then takes the next algorithm, for the cross product too."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tsalgebra as ts

V, N = 8, 3


def _models(scale):
    rng = np.random.default_rng(1)
    b = ts.Sequential(ts.Linear(rng.normal(size=(4, V * N))),
                      ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))))
    E, bias = rng.normal(size=(4, V * N)), rng.normal(size=4)
    mlp = ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3)))
    return ts.Sequential(ts.Linear(scale * E, bias), mlp), b


def _brute(fa, fb):
    """The centred cosine over every token sequence, in float64 (each output
    centred on its mean first)."""
    fa, fb = fa - fa.mean(0), fb - fb.mean(0)
    return (fa * fb).sum() / np.sqrt((fa * fa).sum() * (fb * fb).sum())


ALL = np.array([np.concatenate([np.eye(V)[t] for t in toks]) for toks in itertools.product(range(V), repeat=N)])
LAW = ts.Tokens(V, N)


@pytest.mark.parametrize("scale, exact", [(1e-5, True), (1e-7, True), (1e-8, False), (1e-10, False)])
def test_the_automatic_choice_keeps_the_digits(scale, exact):
    """Enumeration keeps more digits, not all: at a mean 2e7 times the spread
    (scale 1e-8) its forwards' rounding leaves about 7 and it says so (the
    result and the float64 brute force differ by 4e-9 there, by 8e-8 at
    1e-10)."""
    a, b = _models(scale)
    want = ts.similarity(a, b, measure=LAW, centered=True, algorithm="enumeration").value
    assert want == pytest.approx(_brute(a(ALL), b(ALL)), rel=1e-6)  # float64 forwards: the constant's rounding
    got = ts.similarity(a, b, measure=LAW, centered=True)
    assert got.exact == exact and got.value == pytest.approx(want, rel=1e-9), got
    assert exact or any("sums outputs whose mean is about" in n and "(not exact)" in n for n in got.notes), got.notes
    assert "pairings" in got.passed_over and any("pairings was passed over" in n for n in got.notes)
    matrix = ts.similarity_matrix([a, b], measure=LAW, centered=True, progress=False)
    assert matrix.exact == exact and matrix.values[0, 1] == pytest.approx(want, rel=1e-7)


def test_a_named_algorithm_says_the_digits_left_or_refuses():
    a, _ = _models(1e-5)
    r = ts.inner(a, a, measure=LAW, centered=True, algorithm="pairings")
    note = next(n for n in r.notes if "E[f.g] - E[f].E[g]" in n)
    assert not r.exact and "digits of it left" in note, r
    assert r.value == pytest.approx(ts.inner(a, a, measure=LAW, centered=True, algorithm="enumeration").value,
                                    rel=1e-5)
    with pytest.raises(ts.RoundingError, match="leaves no digit of the difference.*algorithm='enumeration'"):
        ts.inner(*[_models(1e-8)[0]] * 2, measure=LAW, centered=True, algorithm="pairings")
    wide = ts.inner(*[_models(1e-3)[0]] * 2, measure=LAW, centered=True, algorithm="pairings")
    assert wide.exact and not wide.passed_over  # 11 digits left: as before


def test_uncorrelated_cross_products_are_not_judged_by_their_own_size():
    """<a, b> of two models may be 0: its rounding is judged against the
    variances (through them), not against itself."""
    rng = np.random.default_rng(3)
    a = ts.Bilinear(rng.normal(size=(2, V)), rng.normal(size=(2, V)), rng.normal(size=(1, 2)))
    b = ts.Linear(np.zeros((1, V)), np.array([5.0]))  # constant: covariance 0 with anything
    law = ts.Tokens(V, 1)
    r = ts.inner(a, b, measure=law, centered=True, algorithm="pairings")
    assert r.exact and abs(r.value) < 1e-12


def test_a_variance_within_the_rounding_of_the_mean_is_zero():
    """A model constant on every token sequence, computed through sums that
    round differently per sequence: variance 7.8e-33 beside a mean of 1, a
    cosine of 1e-17 'exact' (similarity, the node-gram and auto matrix routes)."""
    rng = np.random.default_rng(0)
    law = ts.Tokens(3, 2)
    constant = ts.Linear(np.tile(rng.normal(size=(2, 1)), (1, 6)))  # every token of every position: one weight
    other = ts.Bilinear(rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(2, 3)),
                        left_bias=rng.normal(size=3), right_bias=rng.normal(size=3))
    assert ts.norm(constant, measure=law, centered=True).value == 0.0
    with pytest.raises(ValueError, match="zero norm under the tokens inner product"):
        ts.similarity(other, constant, measure=law, centered=True)
    for route in ("auto", "node-gram", "pairwise"):
        with pytest.raises(ValueError, match="zero norm under the tokens inner product"):
            ts.similarity_matrix([other, constant], measure=law, centered=True, route=route, progress=False)
    # a spread 1e-6 of the mean is no rounding: kept (about 10 digits)
    varied = constant.replace(weight=constant.weight + 1e-6 * rng.normal(size=(2, 6)))
    assert ts.norm(varied, measure=law, centered=True).value > 0
    assert abs(ts.similarity(other, varied, measure=law, centered=True).value) > 1e-3


def test_a_constant_model_per_output_is_nan_not_plus_minus_one():
    """Its per-channel variances 0, the cross products' round-off (1e-43)
    over them gave +-inf, which the clip to [-1, 1] turned into +-1 'exact',
    with no dead-channel warning."""
    rng = np.random.default_rng(0)
    law = ts.Tokens(3, 2)
    constant = ts.Linear(np.tile(rng.normal(size=(2, 1)), (1, 6)))
    other = ts.Bilinear(rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(2, 3)),
                        left_bias=rng.normal(size=3), right_bias=rng.normal(size=3))
    with pytest.warns(RuntimeWarning, match="zero norm"):
        r = ts.similarity(other, constant, measure=law, centered=True, per_output=True)
    assert np.isnan(r.value).all(), r.value


def test_a_constant_deep_model_per_output_is_nan_under_the_gaussian():
    """The same through quadrature: a Transformer whose embedding is 0 is
    constant; its channels' similarities came out as -1 and 1 'exact'."""
    rng = np.random.default_rng(0)

    def w(*s):
        return rng.normal(size=s) / np.sqrt(s[-1])

    def att():
        return ts.BilinearAttention(w(1, 2, 1), w(1, 2, 1), w(1, 2, 1), w(1, 2, 1), w(1, 2, 1), w(1, 1, 2),
                                    causal=True, residual=True, scale=0.5, n_ctx=2)

    const = ts.Transformer(ts.Linear(np.zeros((1, 1)), bias=[0.7]), [(att(), None), (att(), None)],
                           ts.Linear(w(2, 1)), n_ctx=2)
    other = ts.Transformer(ts.Linear(w(1, 1), bias=[0.7]), [(att(), None), (att(), None)], ts.Linear(w(2, 1)), n_ctx=2)
    with pytest.warns(RuntimeWarning, match="zero norm"):
        r = ts.similarity(const, other, centered=True, per_output=True)
    assert np.isnan(np.asarray(r.value, dtype=float)).all(), r.value
