"""The sympy bridge, exact arithmetic, verification and eigen-circuits."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import sympy

import oracles as O
import tsalgebra as ts
from helpers import model_of

x1, x2, x3 = sympy.symbols("x1 x2 x3")


def rational_spec(rng, widths, kinds, hidden=2):
    """A spec whose weights are small Fractions (exact) as object arrays."""
    spec = O.random_spec(rng, widths, kinds, hidden=hidden, residual=True)
    frac = np.vectorize(lambda v: Fraction(round(v * 4), 4), otypes=[object])
    return [{k: (frac(v) if isinstance(v, np.ndarray) else v) for k, v in layer.items()} for layer in spec]


@pytest.mark.parametrize("kinds", [["bilinear"], ["linear", "bilinear"], ["bilinear", "bilinear"]])
def test_to_sympy_matches_oracle_exactly(kinds):
    spec = rational_spec(np.random.default_rng(0), [2] * (len(kinds) + 1), kinds)
    model = model_of(spec)
    got = ts.to_sympy(model, [x1, x2])
    want = O.sympy_polynomials(spec, [x1, x2])
    assert len(got) == 2 and all(sympy.expand(g - w) == 0 for g, w in zip(got, want))
    assert all(c.is_Rational for p in got for c in sympy.Poly(p, x1, x2).coeffs())


def test_to_sympy_floats_and_limits():
    spec = O.random_spec(np.random.default_rng(1), [2, 2], ["bilinear"])
    got = ts.to_sympy(model_of(spec))
    f = sympy.lambdify(sympy.symbols("x1 x2"), got)
    x = np.array([0.3, -1.2])
    np.testing.assert_allclose(f(*x), O.forward_numpy(spec, x[None])[0], rtol=1e-12)
    big = model_of(O.random_spec(np.random.default_rng(1), [60, 60, 60], ["bilinear", "bilinear"]))
    with pytest.raises(ValueError, match="entries.*above the limit"):
        ts.to_sympy(big)
    with pytest.raises(ValueError, match="symbols"):
        ts.to_sympy(model_of(spec), [x1])


def test_from_sympy_round_trip_and_evaluation():
    polys = [x1**2 * x2 - sympy.Rational(1, 3) * x1 + 2, x2**3 - x1 * x2]
    model = ts.from_sympy(polys, [x1, x2])
    assert model.degree == 3 and model.exact and model.out_features == 2
    assert all(sympy.expand(a - b) == 0 for a, b in zip(ts.to_sympy(model, [x1, x2]), polys))
    x = np.array([[0.5, -2.0]])
    np.testing.assert_allclose(model(x)[0], [0.25 * -2 - 0.5 / 3 + 2, -8 + 1.0], rtol=1e-14)
    # declared symmetries (all input swaps) hold: the tensor is symmetric
    T = model.tensor.astype(float)
    assert np.array_equal(T, T.transpose(0, 2, 1, 3)) and np.array_equal(T, T.transpose(0, 1, 3, 2))
    floats = ts.from_sympy(0.5 * x1 * x2, [x1, x2])
    assert not floats.exact and floats.tensor.dtype == np.float64


def test_polynomial_models_in_every_function_level_inner_product():
    spec = rational_spec(np.random.default_rng(2), [2, 2], ["bilinear"])
    model = model_of(spec)
    poly = ts.from_sympy(O.sympy_polynomials(spec, [x1, x2]), [x1, x2])
    target = O.sympy_gaussian_inner(O.sympy_polynomials(spec, [x1, x2]), O.sympy_polynomials(spec, [x1, x2]), [x1, x2])
    for a, b in ((model, poly), (poly, poly), (poly, model)):
        r = ts.inner(a, b)
        assert isinstance(r.value, Fraction)
        assert sympy.Rational(r.value.numerator, r.value.denominator) == target
        assert ts.similarity(a, b).value == 1
        assert ts.similarity(a, b, "symmetric").value == 1
    with pytest.raises(ts.CostError, match="no exact algorithm applies.*Linear/Bilinear"):  # a refusal, with why
        ts.inner(model, poly, "network")


def test_symbolic_entries_give_symbolic_inner_products():
    a, c = sympy.symbols("a c")
    p = ts.from_sympy(a * x1**2 + c, [x1])
    q = ts.from_sympy(x1**2, [x1])
    # E[(a x^2 + c) x^2] = 3a + c under N(0, 1)
    assert sympy.expand(ts.inner(p, q).value - (3 * a + c)) == 0
    # symmetric at degree 2 (padded coords x0, x1): <a e11 + c e00, e11> = a
    assert sympy.expand(ts.inner(p, q, "symmetric").value - a) == 0


def test_exact_matches_float_to_round_off():
    spec_a = rational_spec(np.random.default_rng(3), [2, 2, 2], ["bilinear", "bilinear"])
    spec_b = rational_spec(np.random.default_rng(4), [2, 2, 2], ["bilinear", "bilinear"])
    a, b = model_of(spec_a), model_of(spec_b)
    exact = ts.inner(a, b).value
    tofloat = lambda m: m.map_weights(lambda w: np.asarray(w, dtype=float))  # noqa: E731
    approx = ts.inner(tofloat(a), tofloat(b)).value
    assert isinstance(exact, Fraction) and isinstance(approx, float)
    assert abs(float(exact) - approx) <= 1e-12 * abs(float(exact))
    # exactify recovers the float model's exact value
    assert ts.inner(ts.exactify(tofloat(a)), ts.exactify(tofloat(b))).value == exact


# ----------------------------------------------------------------- verify


def exact_layer():
    """A bilinear layer computing (x1 + x2)(x1 - x2) + 3 = x1^2 - x2^2 + 3 exactly."""
    obj = lambda *rows: np.array(rows, dtype=object)  # noqa: E731
    one = Fraction(1)
    return ts.Bilinear(obj([one, one]), obj([one, -one]), obj([one]), down_bias=obj(Fraction(3)))


def test_verify_exact_verdicts():
    layer = exact_layer()
    eq = ts.verify(x1**2 - x2**2 + 3, layer)
    assert eq.verdict == "equal" and eq.exact and eq.relative_residual == 0 and eq.similarity == 1
    scaled = ts.verify(sympy.Rational(1, 2) * (x1**2 - x2**2 + 3), layer)
    assert scaled.verdict == "equal up to scale" and scaled.scale == 2
    diff = ts.verify(x1**2 - x2**2 + x1, layer)
    assert diff.verdict == "different" and diff.similarity < 1
    assert sympy.expand(diff.certificate[0] - (3 - x1)) == 0
    assert 0 < diff.explained < 1
    with pytest.raises(ValueError, match="not inputs"):
        ts.verify(x1 * x3, layer)
    with pytest.raises(ValueError, match="outputs"):
        ts.verify([x1, x2], layer)
    with pytest.raises(ValueError, match="function-level"):
        ts.verify(x1, layer, inner="network")


def test_verify_float_is_a_tolerance_verdict():
    layer = exact_layer().map_weights(lambda w: np.asarray(w, dtype=float))
    r = ts.verify(x1**2 - x2**2 + 3, layer)
    assert not r.exact and r.tolerance == 1e-9 and "within tolerance" in r.verdict
    assert "floating point" in repr(r)
    assert ts.verify(x1**2 - x2**2 + 3, layer, exact=True).verdict == "equal"
    off = ts.verify(x1**2 - x2**2 + 3 + 1e-3 * x1, layer)
    assert off.verdict == "different" and 0 < float(off.relative_residual) < 1e-5
    assert off.per_output["similarity"].shape == (1,)


def test_eigen_circuit_faithfulness():
    rng = np.random.default_rng(5)
    layer = ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6)),
                        left_bias=rng.normal(size=6), residual=False)
    target = ts.circuits.project(layer, 2)
    Q = ts.circuits.interaction_matrix(layer, 2)
    x = rng.normal(size=(5, 4))
    xt = np.hstack([np.ones((5, 1)), x])
    np.testing.assert_allclose(np.einsum("ni,ij,nj->n", xt, Q, xt), layer(x)[:, 2], rtol=1e-12)
    reports = [ts.verify(ts.circuits.top_eigen(layer, 2, k), target) for k in range(1, 6)]
    assert reports[-1].verdict.startswith("equal") and reports[0].verdict == "different"
    curve = reports[0].faithfulness
    assert [k for k, _, _ in curve] == [1, 2, 3, 4, 5]
    assert curve[-1][1] == pytest.approx(1, abs=1e-12) and curve[0][1] < 0.999
    assert [r.similarity for r in reports] == pytest.approx([s for _, s, _ in curve], abs=1e-12)
    with pytest.raises(ValueError, match="k must be"):
        ts.circuits.top_eigen(layer, 2, 9)
    two = ts.Sequential(layer, ts.Bilinear(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.normal(size=(1, 2))))
    with pytest.raises(ValueError, match="exactly one bilinear layer"):
        ts.circuits.top_eigen(two, 0, 1)
