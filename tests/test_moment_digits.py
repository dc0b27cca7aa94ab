"""The attention algorithms (token-moments, moments, hermite, closure's
read-out) take a centred product from features whose means they subtract:
a feature whose mean is far above its spread (an embedding 1e-7 of its
biases, one possible token) keeps only the digits of the difference.  A
self product is judged like the sums over pairings (Plan.rounded_result:
the terms |C| + |m m'| read through the output maps): fewer than 8 digits
is not exact, none hands the automatic choice to the next algorithm.
Before, token-moments' centred cosine was 6e-4 off at 1e-7 and +0.37 for
-0.95 at 1e-9, moments' 2e-2 off at 1e-8, all labelled exact, and a
vocabulary of 1 gave cosines of two constant models (0.96) or an
ArithmeticError."""

from __future__ import annotations

import itertools
from fractions import Fraction
import warnings

import numpy as np
import pytest
import torch

import tsalgebra as ts

V, N = 2, 2


def _model(seed, s):
    rng = np.random.default_rng(seed)
    W = lambda *sh: rng.normal(size=sh)  # noqa: E731
    att = ts.BilinearAttention(W(1, 2, 2), W(1, 2, 2), W(1, 2, 2), W(1, 2, 2), W(1, 2, 2), W(1, 2, 2), n_ctx=N)
    return ts.Transformer(ts.Linear(s * W(2, V), W(2)), [(att, None)], ts.Linear(W(1, 2)), n_ctx=N)


def _brute(a, b):
    """The centred cosine over every token sequence, each output centred on
    its mean first (float64 forwards: good to about 1e-8 here)."""
    x = np.array([np.eye(V)[list(toks)] for toks in itertools.product(range(V), repeat=N)])  # (sequences, N, V)
    fa, fb = (np.asarray(m(x)).reshape(len(x), -1) for m in (a, b))
    fa, fb = fa - fa.mean(0), fb - fb.mean(0)
    return (fa * fb).sum() / np.sqrt((fa * fa).sum() * (fb * fb).sum())


@pytest.mark.parametrize("s", [1e-3, 1e-6, 1e-7, 1e-9])
def test_token_moments_says_the_digits_it_keeps(s):
    a, b = _model(1, s), _model(2, s)
    law = ts.Tokens(V, N)
    want = _brute(a, b)
    got = ts.similarity(a, b, measure=law, centered=True)  # the automatic choice
    assert got.value == pytest.approx(want, rel=1e-7), got
    named = ts.similarity(a, b, measure=law, centered=True, algorithm="token-moments") if s > 1e-9 else None
    if s == 1e-3:
        assert got.algorithm == "token-moments" and got.exact and named.exact
    elif named is not None:  # 2e-6 .. 6e-4 off: said, with the digits left
        assert not named.exact and named.digits < 8 and "token-moments" in got.passed_over, (named, got)
        assert abs(named.value - want) < 10.0 ** -named.digits * abs(want)
    if s == 1e-9:  # no digit left: the named algorithm refuses, the automatic choice passes it over
        with pytest.raises(ts.RoundingError, match="token-moments"):
            ts.similarity(a, b, measure=law, centered=True, algorithm="token-moments")


@pytest.mark.parametrize("s", [1e-3, 1e-7, 1e-8])
def test_moments_and_hermite_say_the_digits_they_keep(s):
    """Under the Gaussian, against quadrature (exact to 4e-11 here)."""
    a, b = _model(1, s), _model(2, s)
    want = ts.similarity(a, b, centered=True, algorithm="quadrature").value
    for algorithm in ("moments", "hermite"):
        try:
            got = ts.similarity(a, b, centered=True, algorithm=algorithm)
        except ts.RoundingError:
            assert s <= 1e-8
            continue
        if got.exact:
            assert s == 1e-3 and got.value == pytest.approx(want, rel=1e-9), got
        else:
            assert s < 1e-3 and abs(got.value - want) < 10.0 ** -got.digits * abs(want), (algorithm, got)
    auto = ts.similarity(a, b, centered=True)
    assert auto.value == pytest.approx(want, rel=1e-8) and (auto.exact or auto.algorithm == "quadrature"), auto


@pytest.mark.parametrize("V_, probs", [(1, None), (3, [0.0, 1.0, 0.0])])
def test_one_possible_sequence_is_a_constant_model(V_, probs):
    """Every output constant: the centred norm is 0 and the similarity
    undefined (zero-norm refusal, per output NaN with the warning)."""
    rng = np.random.default_rng(14)
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    att = lambda H: ts.BilinearAttention(W(H, 2, V_), W(H, 2, V_), W(H, 2, V_), W(H, 2, V_), W(H, 2, V_),  # noqa: E731
                                         W(H, 2, 2), causal=True, rotary_base=10000.0, n_ctx=3)
    a, b = att(1), att(2)
    law = ts.Tokens(V_, 3, probs)
    assert ts.norm(a, measure=law, centered=True).value == 0.0
    with pytest.raises(ValueError, match="zero norm"):
        ts.similarity(a, b, measure=law, centered=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(ts.similarity(a, b, measure=law, centered=True, per_output=True).value).all()


@pytest.mark.parametrize("base", [0.0, -10.0, float("nan"), float("inf"), True, "10000"])
def test_a_rotary_base_that_is_no_base_is_refused_by_name(base):
    """0, negative or NaN made every forward NaN, and similarity blamed 'a
    weight too large or too small'."""
    w = np.ones((1, 2, 2))
    with pytest.raises(ValueError, match="rotary_base must be a positive finite number"):
        ts.BilinearAttention(w, w, w, w, w, w, rotary_base=base, n_ctx=2)
    with pytest.raises(ValueError, match="scale must be finite"):
        ts.BilinearAttention(w, w, w, w, w, w, scale=float("nan"), n_ctx=2)
    for base in (np.array(10000.0), np.float32(10000.0), torch.tensor(10000.0)):  # a number in an array: accepted
        assert ts.BilinearAttention(w, w, w, w, w, w, rotary_base=base, n_ctx=2).rotary_base == 10000.0


def test_a_fixed_first_token_is_a_zero_variance_not_a_lost_one():
    """A BOS token at position 0 (its law one-hot): that position's outputs
    are constant and their variance came out 0 exactly, which the digits
    check read as 'no digit left' and refused (token-moments over budget for
    anything else).  Against the enumeration of every sequence."""
    rng = np.random.default_rng(3)
    Vb, n = 4, 3
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    att = lambda: ts.BilinearAttention(W(2, 2, Vb), W(2, 2, Vb), W(2, 2, Vb), W(2, 2, Vb), W(2, 2, Vb),  # noqa: E731
                                       W(2, 2, 2), causal=True, rotary_base=10000.0, n_ctx=n, v_bias=W(2, 2))
    a, b = att(), att()
    bos = np.full((n, Vb), 1.0 / Vb)
    bos[0] = [1.0, 0.0, 0.0, 0.0]
    law = ts.Tokens(Vb, n, bos)
    for per_output in (False, True):
        got = ts.inner(a, a, measure=law, centered=True, per_output=per_output, algorithm="token-moments")
        want = ts.inner(a, a, measure=law, centered=True, per_output=per_output, algorithm="enumeration")
        assert got.exact and np.allclose(got.value, want.value, rtol=1e-9, atol=0), (got, want)
    s = ts.similarity(a, b, measure=law, centered=True)
    assert s.exact and s.algorithm == "token-moments"
    assert s.value == pytest.approx(ts.similarity(a, b, measure=law, centered=True, algorithm="enumeration").value,
                                    rel=1e-9)


def _biased(vb, ks):
    """One causal head whose value bias is ``vb`` and whose query and key
    maps are ``ks`` of their biases: the outputs' mean about vb times their
    spread, and the scores nearly the same for every key (the shared-key
    term D a difference of two terms far above it)."""
    rng = np.random.default_rng(1)
    W = lambda *sh: rng.normal(size=sh)  # noqa: E731
    att = ts.BilinearAttention(ks * W(1, 2, 2), ks * W(1, 2, 2), ks * W(1, 2, 2), ks * W(1, 2, 2), W(1, 2, 2),
                               W(1, 2, 2), causal=True, n_ctx=3, v_bias=vb * W(1, 2), q1_bias=W(1, 2),
                               k1_bias=W(1, 2), q2_bias=W(1, 2), k2_bias=W(1, 2))
    return ts.Transformer(ts.Linear(W(2, 3), W(2)), [(att, None)], ts.Linear(W(2, 2)), n_ctx=3)


def _exact_variance(model):
    """The centred <a, a> in rationals: the model with its float weights as
    Fractions (the attention then evaluates exactly), over all 27 sequences."""
    exact = model.map_weights(lambda w: np.vectorize(Fraction, otypes=[object])(np.asarray(w, dtype=float)))
    x = np.array([np.eye(3, dtype=int)[list(t)].ravel() for t in itertools.product(range(3), repeat=3)], dtype=object)
    f = np.asarray(exact(x), dtype=object).reshape(len(x), -1)
    mean = f.sum(0) / len(x)
    return float(sum(((f - mean) ** 2).sum(0)) / len(x))


@pytest.mark.parametrize("vb, ks", [(1.0, 1.0), (1e6, 1e-4), (1e7, 1e-5), (1e8, 1e-6)])
def test_token_moments_digits_follow_what_it_subtracted(vb, ks):
    """Token-moments' rounding is the size of what it subtracted: the query
    token's conditional means (2 |m| sd per feature) and the shared-key
    term's two parts, whose entries' roundings add through the maps in
    quadrature.  It used to count |m m'| through |maps|, 2 digits below the
    digits kept (a 512-wide LM with a value bias 30 times its spread: 7.97
    said, about 12 kept).  Against the exact variance: said digits are kept,
    and (1e6, 1e-4: 9.6 kept) exact now, where 7.7 digits were said."""
    a = _biased(vb, ks)
    want = _exact_variance(a)
    got = ts.inner(a, a, measure=ts.Tokens(3, 3), centered=True, algorithm="token-moments")
    error = abs(float(got.value) - want) / want
    if got.exact:
        assert error < 1e-8, (got, want)
    else:
        assert vb >= 1e7 and error < 10.0 ** -got.digits and got.digits > -np.log10(error) - 1.5, (got, want)
    assert got.exact == (vb <= 1e6)
