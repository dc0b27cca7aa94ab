"""The token measure: polynomial circuits (several input legs of one tensor
on one token), a token embedding's vocabulary checked against the measure,
and ragged probabilities.  Every value against an enumeration of every token
sequence written here: the one-hot inputs built by hand, circuits evaluated
by sympy substitution (exact rationals), components by their formula, torch
models by their own forward."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import sympy
import torch
from torch import nn

import tsalgebra as ts
from tsalgebra.adapters import BilinearAttentionModule, BilinearLayer


def sequences(V, n, probs=None):
    """Every token sequence as (ids, one-hot input, probability); probs: None
    (uniform, exact), one row for every token or one per token (exact
    Fractions stay exact)."""
    if probs is None:
        P = [[Fraction(1, V)] * V] * n
    else:
        P = [probs] * n if np.ndim(probs) == 1 else list(probs)
    for ids in itertools.product(range(V), repeat=n):
        x = [0] * (n * V)
        w = 1
        for k, t in enumerate(ids):
            x[k * V + t] = 1
            w = w * P[k][t]
        yield ids, x, w


def brute(f, g, V, n, probs=None, centered=False):
    """Per output: E f(x) g(x) (or the covariance), over every sequence."""
    rows = [(w, np.asarray(f(x), dtype=object), np.asarray(g(x), dtype=object)) for _, x, w in sequences(V, n, probs)]
    fg = sum(w * a * b for w, a, b in rows)
    if centered:
        fg = fg - sum(w * a for w, a, _ in rows) * sum(w * b for w, _, b in rows)
    return fg


def sympy_fn(polys, xs):
    """A list of sympy polynomials evaluated exactly at a 0/1 input."""
    return lambda x: [sympy.Rational(p.subs(dict(zip(xs, x)))) for p in polys]


V, N = 3, 2
XS = sympy.symbols(f"x1:{V * N + 1}")
x1, x2, x3, x4, x5, x6 = XS
# legs of one tensor on one token: x1^3 puts three on token 1, x1^2 x4 two on
# token 1 and one on token 2; constants and linear terms read the constant channel
POLY_A = [x1**3 - 2 * x1**2 * x4 + x2 * x5 - x3 + 2, sympy.Rational(1, 2) * x6**2 * x1 + 3 * x2**2 - x4]
POLY_B = [x1**2 + x2 * x3 - 5 * x6**3 + 1, x4 * x5 * x1 - x3 * x5**2 + 7 * x2]
EXACT_PROBS = [[Fraction(1, 2), Fraction(1, 3), Fraction(1, 6)], [Fraction(1, 5), Fraction(2, 5), Fraction(2, 5)]]


@pytest.mark.parametrize("probs", [None, EXACT_PROBS, [Fraction(1, 7), Fraction(2, 7), Fraction(4, 7)]])
@pytest.mark.parametrize("centered", [False, True])
def test_polynomial_legs_on_one_token_are_exact(probs, centered):
    """Was: ValueError "tensor 'b.P': repeated leg" for any from_sympy circuit
    of degree >= 2 under ts.Tokens (every input leg is on the one tensor P,
    and the legs reading one token were renamed to one index)."""
    a, b = ts.from_sympy(POLY_A, XS), ts.from_sympy(POLY_B, XS)
    fa, fb = sympy_fn(POLY_A, XS), sympy_fn(POLY_B, XS)
    measure = ts.Tokens(V, N, probs)
    for f, g, m, n in ((fa, fb, a, b), (fa, fa, a, a), (fb, fb, b, b)):
        want = brute(f, g, V, N, probs, centered)
        got = ts.inner(m, n, measure=measure, per_output=True, centered=centered)
        assert [sympy.nsimplify(v) for v in got.value] == list(want)  # exact: no rounding anywhere
        total = ts.inner(m, n, measure=measure, centered=centered, algorithm="pairings")
        assert sympy.nsimplify(total.value) == sum(want)


def test_polynomial_under_float_probs_and_against_a_float_component():
    """Float frequencies, and a degree-3 polynomial against a float Bilinear of
    degree 2 (legs of one tensor on one token beside legs of another tensor)."""
    rng = np.random.default_rng(3)
    L, R, D = rng.normal(size=(4, V * N)), rng.normal(size=(4, V * N)), rng.normal(size=(2, 4))
    comp = ts.Bilinear(L, R, D)
    f_comp = lambda x: list(D @ ((L @ np.asarray(x, float)) * (R @ np.asarray(x, float))))  # noqa: E731
    floats = [sympy.expand(1.0 * p) for p in POLY_A]  # float coefficients: the float path
    fa = lambda x: [float(v) for v in sympy_fn(POLY_A, XS)(x)]  # noqa: E731
    probs = rng.dirichlet(np.ones(V), size=N)
    measure = ts.Tokens(V, N, probs)
    ab, aa, bb = (float(sum(brute(f, g, V, N, probs))) for f, g in ((fa, f_comp), (fa, fa), (f_comp, f_comp)))
    a = ts.from_sympy(floats, XS)
    assert float(ts.inner(a, comp, measure=measure).value) == pytest.approx(ab, rel=1e-10)
    assert float(ts.inner(a, a, measure=measure).value) == pytest.approx(aa, rel=1e-10)
    per = ts.inner(comp, a, measure=measure, per_output=True, centered=True).value
    assert np.allclose(np.asarray(per, float), np.asarray(brute(f_comp, fa, V, N, probs, True), float), rtol=1e-10)
    for a in (ts.from_sympy(floats, XS), ts.from_sympy(POLY_A, XS)):  # float and exact coefficients
        assert float(ts.similarity(a, comp, measure=measure).value) == pytest.approx(ab / np.sqrt(aa * bb), rel=1e-10)


def one_hot_reduction(poly):
    """The polynomial on one-hot blocks: x^k -> x, products of two features
    of one block dropped (they are never both 1)."""
    out = 0
    for mon, c in sympy.Poly(sympy.expand(poly), *XS).terms():
        used = [i for i, e in enumerate(mon) if e]
        if len({i // V for i in used}) == len(used):
            out += c * sympy.Mul(*(XS[i] for i in used))
    return out


@pytest.mark.parametrize("exact", [False, True])
def test_verify_a_formula_equal_on_every_token_sequence(exact):
    """Was: ts.verify(..., measure=ts.Tokens(...)) raised the repeated-leg
    ValueError.  A Bilinear and its one-hot reduction differ as polynomials
    (the Gaussian says so) and agree on every token sequence."""
    rng = np.random.default_rng(7)
    L, R = rng.integers(-2, 3, size=(4, V * N)).astype(float), rng.integers(-2, 3, size=(4, V * N)).astype(float)
    D = rng.integers(-2, 3, size=(2, 4)).astype(float)
    comp = ts.Bilinear(L, R, D)
    circuit = [one_hot_reduction(p) for p in ts.to_sympy(comp, XS)]
    f_comp = lambda x: list(D @ ((L @ np.asarray(x, float)) * (R @ np.asarray(x, float))))  # noqa: E731
    f_circ = sympy_fn(circuit, XS)
    assert all(np.allclose(f_comp(x), np.asarray(f_circ(x), float)) for _, x, _ in sequences(V, N))  # the premise
    measure = ts.Tokens(V, N)
    v = ts.verify(circuit, comp, measure=measure, exact=exact)
    assert v.verdict in ("equal", "equal (within tolerance)") and v.inner == "tokens"
    assert ts.verify(circuit, comp, exact=exact).verdict == "different"  # not the same polynomial
    # a circuit that is off on some sequences: the figures are the enumeration's
    changed = [circuit[0] + x1 * x5 - 2, circuit[1]]
    f_changed = sympy_fn(changed, XS)
    fc, ff, cc = (sum(brute(f, g, V, N)) for f, g in ((f_comp, f_changed), (f_comp, f_comp), (f_changed, f_changed)))
    v = ts.verify(changed, comp, measure=measure, exact=exact)
    assert v.verdict == "different"
    assert float(v.similarity) == pytest.approx(float(fc) / np.sqrt(float(ff * cc)), rel=1e-10)
    assert float(v.relative_residual) == pytest.approx(float((ff + cc - 2 * fc) / ff), rel=1e-10)


def _embedding_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(4, 3), BilinearLayer(3, 5, 2)).double().eval()


def test_a_token_embedding_refuses_a_measure_of_other_tokens():
    """Was: an nn.Embedding(4, .) model (one token of 4) under Tokens(2) or
    Tokens(2, 2) (two tokens of 2: the same 4 features) or Tokens(1) returned
    a number labelled exact that is no average over its tokens."""
    nets = [_embedding_model(0), _embedding_model(1)]
    a, b = (ts.from_torch(n) for n in nets)
    with torch.no_grad():
        out = [n(torch.arange(4)[:, None]).reshape(4, -1).numpy() for n in nets]
    probs = [0.1, 0.2, 0.3, 0.4]
    for measure, p in ((None, None), (ts.Tokens(4), None), (ts.Tokens(4, 1), None), (ts.Tokens(4, probs=probs), probs)):
        w = np.full(4, 0.25) if p is None else np.asarray(p)
        ab, aa, bb = (float(w @ (x * y).sum(1)) for x, y in ((out[0], out[1]), (out[0], out[0]), (out[1], out[1])))
        assert ts.similarity(a, b, measure=measure).value == pytest.approx(ab / np.sqrt(aa * bb), rel=1e-10)
    says = (r"measure=Tokens\(.*\) does not fit .*Embedding.*: the model reads 1 token of a vocabulary of 4, the "
            r"measure draws .* of a vocabulary of {} \(give measure=ts.Tokens\(4, 1")
    for measure in (ts.Tokens(2), ts.Tokens(2, 2), ts.Tokens(1), ts.Tokens(1, 4), ts.Tokens(4, 2), ts.Tokens(8)):
        match = says.format(measure.vocab)
        for call in (lambda: ts.similarity(a, b, measure=measure), lambda: ts.inner(a, b, measure=measure),
                     lambda: ts.inner(ts.Linear(np.ones((2, 4))), b, measure=measure),  # the embedding model second
                     lambda: ts.check_invariance(a, b, measure=measure),
                     lambda: ts.similarity_matrix([a, b], measure=measure, progress=False)):
            with pytest.raises(ValueError, match=match):
                call()
    # a sequence model names the same mismatch
    torch.manual_seed(2)
    lm = ts.from_torch(nn.Sequential(nn.Embedding(4, 4), BilinearAttentionModule(1, 2, 4, n_ctx=2),
                                     nn.Linear(4, 4)).double())
    with pytest.raises(ValueError, match=r"reads 2 tokens of a vocabulary of 4, the measure draws tokens of a "
                                         r"vocabulary of 2"):
        ts.similarity(lm, lm, measure=ts.Tokens(2))


def test_flat_one_hot_models_still_read_n_ctx_blocks():
    """A model of plain features knows only its width: Tokens(2) or
    Tokens(2, 2) on 4 features is two one-hot blocks of 2, as documented."""
    rng = np.random.default_rng(5)
    L, R, D = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))
    comp = ts.Bilinear(L, R, D)
    f = lambda x: list(D @ ((L @ np.asarray(x, float)) * (R @ np.asarray(x, float))))  # noqa: E731
    want = float(sum(brute(f, f, 2, 2)))
    for measure in (ts.Tokens(2), ts.Tokens(2, 2)):
        assert float(ts.inner(comp, comp, measure=measure).value) == pytest.approx(want, rel=1e-10)
    assert float(ts.inner(comp, comp, measure=ts.Tokens(4)).value) == pytest.approx(float(sum(brute(f, f, 4, 1))),
                                                                                     rel=1e-10)


def test_ragged_arrays_are_refused_by_name():
    """Was: numpy's "setting an array element with a sequence ... inhomogeneous
    shape" ValueError, naming no argument."""
    with pytest.raises(ValueError, match=r"^probs is ragged .*expected one distribution \(4,\) or one per token"):
        ts.Tokens(4, 2, probs=[[0.5, 0.5, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"^probs has shape \(1, 1, 4\); expected one distribution \(4,\)"):
        ts.Tokens(4, probs=[[[0.25] * 4]])
    with pytest.raises(ValueError, match=r"^cov is ragged .*expected a square matrix"):
        ts.Gaussian(cov=[[1.0, 0.0], [0.0]])
    with pytest.raises(ValueError, match=r"^mean is ragged .*expected a vector"):
        ts.Gaussian(mean=[[1.0], [1.0, 2.0]])
    assert ts.Tokens(4, 2, probs=[[0.5, 0.5, 0, 0], [1, 0, 0, 0]]).n_ctx == 2  # rows of one length still pass


@pytest.mark.parametrize("measure", ["gaussian", "tokens"])
def test_an_exact_circuit_beside_a_rescaled_float_model_keeps_the_scale(measure):
    # The float model is rescaled to its canonical scale and the exact one is
    # not; the product came back as a sympy Float, which was never scaled back
    # (0.338 for 2.499 under the Gaussian: off by e^2).
    rng = np.random.default_rng(3)
    L, R, D = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(2, 4))
    xs = sympy.symbols("x1:7")
    const = ts.from_sympy([sympy.Integer(1), sympy.Integer(0)], xs)  # the model (1, 0)
    b = ts.Bilinear(L, R, D)
    if measure == "gaussian":
        kw = {}
        want = float(D[0] @ np.einsum("ki,ki->k", L, R))  # E[b_0(x)] = sum_k D_0k E[(Lx)_k (Rx)_k]
    else:
        kw = {"measure": ts.Tokens(3, 2)}
        want = sum(float(w) * float(D[0] @ ((L @ np.array(x, float)) * (R @ np.array(x, float))))
                   for _, x, w in sequences(3, 2))
    got = ts.inner(const, b, **kw)
    assert float(got.value) == pytest.approx(want, rel=1e-10)
    per = ts.inner(const, b, per_output=True, **kw).value
    assert float(per[0]) == pytest.approx(want, rel=1e-10) and float(per[1]) == 0
