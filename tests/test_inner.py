"""Inner products and similarities against independent oracles (float64)."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles as O
import tsalgebra as ts
from helpers import model_of, spec_of
from tsalgebra.testing import stacks


def rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def gaussian_params(d: int, seed: int):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    return rng.normal(size=d) * 0.5, A @ A.T / d + 0.3 * np.eye(d)


small_pairs = st.integers(1, 3).flatmap(
    lambda d: st.tuples(
        stacks(max_depth=2, max_width=3, in_features=d, max_degree=4),
        stacks(max_depth=2, max_width=3, in_features=d, max_degree=4),
    )
).filter(lambda p: p[0].out_features == p[1].out_features) | st.integers(1, 3).flatmap(
    lambda d: stacks(max_depth=2, max_width=3, in_features=d, max_degree=4).map(lambda m: (m, m))
)


def _same_out(pair):
    a, b = pair
    return a.out_features == b.out_features


# ------------------------------------------------------------ brute force


@settings(max_examples=40)
@given(small_pairs, st.integers(0, 2**31), st.booleans(), st.sampled_from(["pairings", "quadrature"]))
def test_gaussian_matches_bruteforce(pair, seed, standard, algorithm):
    a, b = pair
    mean, cov = (None, None) if standard else gaussian_params(a.in_features, seed)
    want = O.gaussian_inner_bruteforce(spec_of(a), spec_of(b), mean, cov)
    got = ts.inner(a, b, "gaussian", mean=mean, cov=cov, algorithm=algorithm)
    assert got.exact and got.method == "exact" and got.inner == "gaussian"
    assert got.algorithm == algorithm  # the result and the argument share one vocabulary
    # to round-off of the norms' scale (Cauchy-Schwarz): an exact 0 may come back as 1e-20 after rescaling
    scale = np.sqrt(abs(O.gaussian_inner_bruteforce(spec_of(a), spec_of(a), mean, cov)
                        * O.gaussian_inner_bruteforce(spec_of(b), spec_of(b), mean, cov)))
    assert abs(got.value - want) <= 1e-10 * max(abs(want), scale, 1e-300)
    want_c = O.gaussian_inner_bruteforce(spec_of(a), spec_of(b), mean, cov, centered=True)
    got_c = ts.inner(a, b, "gaussian", mean=mean, cov=cov, centered=True, algorithm=algorithm)
    assert got_c.centered and abs(got_c.value - want_c) <= 1e-10 * max(abs(want), abs(want_c), 1e-12)


@pytest.mark.parametrize("kinds", [["bilinear", "bilinear"], ["bilinear", "linear", "bilinear"]])
def test_depth_two_pairs_match_bruteforce(kinds):
    rng = np.random.default_rng(2)
    sa = O.random_spec(rng, [2] * (len(kinds) + 1), kinds, hidden=2, residual=True)
    sb = O.random_spec(rng, [2] * (len(kinds) + 1), kinds, hidden=3)
    a, b = model_of(sa), model_of(sb)
    mean, cov = gaussian_params(2, 3)
    for algorithm in ("pairings", "quadrature"):
        for x, y, sx, sy in ((a, b, sa, sb), (a, a, sa, sa)):
            got = ts.inner(x, y, mean=mean, cov=cov, algorithm=algorithm).value
            assert rel(got, O.gaussian_inner_bruteforce(sx, sy, mean, cov)) < 1e-10
    assert rel(ts.inner(a, b, "symmetric").value, O.symmetric_inner_bruteforce(sa, sb)) < 1e-10
    c = ts.inner(a, b, mean=mean, cov=cov, centered=True).value
    assert rel(c, O.gaussian_inner_bruteforce(sa, sb, mean, cov, centered=True)) < 1e-9


@settings(max_examples=40)
@given(small_pairs)
def test_symmetric_matches_bruteforce(pair):
    a, b = pair
    got = ts.inner(a, b, "symmetric")
    want = O.symmetric_inner_bruteforce(spec_of(a), spec_of(b))
    assert got.degree == max(a.degree, b.degree)
    assert got.lifted == (a.degree != b.degree)
    assert abs(got.value - want) <= 1e-10 * max(abs(want), 1e-12) + 1e-13


def test_symmetric_similarity_lifts_norms_to_the_common_degree():
    """The same function as a linear and as a bilinear model: similarity 1."""
    W = np.random.default_rng(0).normal(size=(2, 3))
    lin = ts.Linear(W)
    same = ts.Bilinear(W, np.zeros((2, 3)), np.eye(2), right_bias=np.ones(2))
    r = ts.similarity(lin, same, "symmetric")
    assert r.value == pytest.approx(1, abs=1e-12) and r.degree == 2


def test_similarity_does_not_overflow_when_the_norm_product_would():
    rng = np.random.default_rng(0)
    b = lambda d, h, o: ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)))  # noqa: E731
    a, c = (ts.Sequential(b(3, 4, 3), b(3, 4, 3), b(3, 4, 2)) for _ in range(2))
    big = lambda m: m.map_weights(lambda w: w * 1e6)  # noqa: E731
    want = ts.similarity(a, c, "network").value
    assert abs(want) > 1e-3
    assert ts.similarity(big(a), big(c), "network").value == pytest.approx(want, rel=1e-9)


def test_symmetric_lift_to_higher_degree_is_reported():
    rng = np.random.default_rng(3)
    lin = model_of(O.random_spec(rng, [3, 2], ["linear"]))
    bil = model_of(O.random_spec(rng, [3, 2], ["bilinear"], hidden=2))
    r = ts.inner(lin, bil, "symmetric")
    assert r.degree == 2 and r.lifted
    assert rel(r.value, O.symmetric_inner_bruteforce(spec_of(lin), spec_of(bil))) < 1e-12
    r4 = ts.inner(lin, bil, "symmetric", degree=4)
    assert r4.degree == 4 and rel(r4.value, O.symmetric_inner_bruteforce(spec_of(lin), spec_of(bil), k=4)) < 1e-12
    assert rel(r4.value, r.value) > 1e-3  # Bombieri weights depend on k
    with pytest.raises(ValueError, match="below the models' degree"):
        ts.inner(lin, bil, "symmetric", degree=1)


def test_one_layer_core_formula():
    rng = np.random.default_rng(4)
    for residual in (False, True):
        sa = O.random_spec(rng, [3, 3], ["bilinear"], hidden=4, residual=residual)
        sb = O.random_spec(rng, [3, 3], ["bilinear"], hidden=2, residual=residual)
        La, Ra, Da = O.padded_bilinear_factors(sa[0])
        Lb, Rb, Db = O.padded_bilinear_factors(sb[0])
        want = O.bilinear_core_inner(La, Ra, Da[1:], Lb, Rb, Db[1:])
        a, b = model_of(sa), model_of(sb)
        assert rel(ts.inner(a, b, "symmetric").value, want) < 1e-12
        assert rel(ts.inner(a, b, "network").value, want) < 1e-12


# ------------------------------------------------------------------ orbits


@settings(max_examples=25)
@given(small_pairs, st.sampled_from(["gaussian", "symmetric"]), st.booleans())
def test_orbit_sum_equals_full_sum(pair, kind, per_output):
    """Every declared symmetry is checked: grouping by orbits must equal the
    plain sum over all pairings, also for self terms (side exchange)."""
    a, b = pair
    grouped = ts.inner(a, b, kind, per_output=per_output, algorithm="pairings" if kind == "gaussian" else None)
    full = ts.inner(a, b, kind, per_output=per_output, orbits=False, algorithm="pairings" if kind == "gaussian" else None)
    assert full.orbits == full.pairings >= grouped.orbits
    np.testing.assert_allclose(grouped.value, full.value, rtol=1e-10, atol=1e-12)


def test_wrongly_declared_symmetry_is_caught():
    """Declaring the L/R swap on an unsymmetrized layer with L != R is the
    reference's bug; the full-sum comparison above would catch it."""
    rng = np.random.default_rng(5)
    a = model_of(O.random_spec(rng, [3, 2], ["bilinear"], hidden=2))
    b = model_of(O.random_spec(rng, [3, 2], ["bilinear"], hidden=2))
    plain_a, plain_b = a.network(), b.network()
    assert plain_a.symmetries == ()
    lie_a = ts.Network(plain_a.tensors, plain_a.inputs, plain_a.outputs, ((1, 0),))
    lie_b = ts.Network(plain_b.tensors, plain_b.inputs, plain_b.outputs, ((1, 0),))
    pairs = dict(algorithm="pairings")
    honest = ts.inner(plain_a, plain_b, **pairs).value
    assert rel(honest, O.gaussian_inner_bruteforce(spec_of(a), spec_of(b))) < 1e-12
    assert rel(ts.inner(lie_a, lie_b, **pairs).value, honest) > 1e-3
    assert ts.inner(lie_a, lie_b, **pairs).orbits < ts.inner(plain_a, plain_b, **pairs).orbits


def test_orbits_reduce_depth_two_enumeration():
    rng = np.random.default_rng(6)
    a = model_of(O.random_spec(rng, [2, 2, 2], ["bilinear", "bilinear"], hidden=2))
    r = ts.inner(a, a, algorithm="pairings")
    assert r.pairings == 764 and r.orbits < 764 / 8
    s = ts.inner(a, a, "symmetric")
    assert s.pairings == 24 and s.orbits < 24


# --------------------------------------------------------- network product


@settings(max_examples=40)
@given(st.integers(1, 4).flatmap(lambda d: st.tuples(
    stacks(max_depth=3, max_width=4, in_features=d, max_degree=2),
    stacks(max_depth=3, max_width=4, in_features=d, max_degree=2))).filter(_same_out))
def test_network_equals_symmetric_at_depth_one(pair):
    a, b = pair
    if (a.degree == 1) != (b.degree == 1):
        return  # different layer structure
    net = ts.inner(a, b, "network")
    sym = ts.inner(a, b, "symmetric")
    assert abs(net.value - sym.value) <= 1e-10 * max(abs(sym.value), 1e-12) + 1e-13


def test_network_differs_when_features_differ():
    """x1^2 x2^2 computed as (x1^2)(x2^2) and as (x1 x2)^2: the same polynomial,
    so gaussian and symmetric similarities are 1; the network one is not."""
    e = np.eye(2)
    a = ts.Sequential(ts.Bilinear(e, e, e), ts.Bilinear([[1.0, 0.0]], [[0.0, 1.0]], [[1.0]]))
    b = ts.Sequential(ts.Bilinear([[1.0, 0.0]], [[0.0, 1.0]], [[1.0]]), ts.Bilinear([[1.0]], [[1.0]], [[1.0]]))
    x = np.random.default_rng(0).normal(size=(5, 2))
    np.testing.assert_allclose(a(x), b(x), rtol=1e-12)
    assert ts.similarity(a, b).value == pytest.approx(1, abs=1e-12)
    assert ts.similarity(a, b, "symmetric").value == pytest.approx(1, abs=1e-12)
    assert ts.similarity(a, b, "network").value < 1 - 1e-3


def test_network_needs_same_structure():
    rng = np.random.default_rng(7)
    a = model_of(O.random_spec(rng, [2, 2], ["bilinear"]))
    b = model_of(O.random_spec(rng, [2, 2, 2], ["bilinear", "bilinear"]))
    with pytest.raises(ValueError, match="same layer structure"):
        ts.inner(a, b, "network")


# ------------------------------------------------------------- quadrature


@pytest.mark.parametrize("centered", [False, True])
def test_quadrature_agrees_with_enumeration(centered):
    """Two independent exact algorithms on the same depth-2 pair."""
    from tsalgebra.algorithms.quadrature import quadrature_inner

    rng = np.random.default_rng(20)
    a, b = (model_of(O.random_spec(rng, [2, 3, 2], ["bilinear", "bilinear"], hidden=2, residual=True)) for _ in range(2))
    mean, cov = gaussian_params(2, 21)
    enum = ts.inner(a, b, mean=mean, cov=cov, centered=centered, per_output=True)
    problem = ts.InnerProblem.of(a, b, mean=mean, cov=cov)
    quad, points = quadrature_inner(problem.a, problem.b, problem.measure, centered, True)
    assert points == 5**2  # degree 8 in z: 5 nodes per coordinate
    np.testing.assert_allclose(quad.value, enum.value, rtol=1e-10)


def test_depth_three_gaussian_falls_back_to_quadrature():
    """Depth 3 has 46 million pairings; at input width 2 the Gauss-Hermite grid
    is exact.  The slow twin is sympy's exact integration of the expanded
    polynomials (weights are multiples of 1/4, so exact in float)."""
    rng = np.random.default_rng(22)
    spec = O.random_spec(rng, [2, 2, 2, 2], ["bilinear"] * 3, hidden=2, residual=True, scale=0.6)
    for layer in spec:
        for key, val in layer.items():
            if isinstance(val, np.ndarray):
                layer[key] = np.round(val * 4) / 4
    model = model_of(spec)
    r = ts.inner(model, model)
    assert r.exact and r.algorithm == "quadrature" and r.notes
    x = sympy.symbols("x1 x2")
    polys = O.sympy_polynomials(spec, x)
    want = float(O.sympy_gaussian_inner(polys, polys, x))
    assert rel(r.value, want) < 1e-10


# ------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("kinds", [["bilinear"], ["bilinear", "bilinear"], ["linear", "bilinear"]])
def test_gaussian_against_monte_carlo(kinds):
    rng = np.random.default_rng(8)
    d = 8
    sa = O.random_spec(rng, [d] * (len(kinds) + 1), kinds, hidden=8, residual=True, scale=0.4)
    sb = O.random_spec(rng, [d] * (len(kinds) + 1), kinds, hidden=8, scale=0.4)
    mean, cov = gaussian_params(d, 9)
    exact = ts.inner(model_of(sa), model_of(sb), mean=mean, cov=cov).value
    est, se = O.monte_carlo_inner(sa, sb, 400_000, np.random.default_rng(10), mean, cov)
    assert abs(est - exact) < 4 * se
    assert se < 0.05 * abs(exact)  # the check has power


# -------------------------------------------------------------- properties


@settings(max_examples=30)
@given(small_pairs, st.sampled_from(["gaussian", "symmetric", "network"]))
def test_similarity_properties(pair, kind):
    a, b = pair
    if kind == "network" and len(ts.folding.fold(a)[0]) != len(ts.folding.fold(b)[0]):
        return
    try:
        s_ab = ts.similarity(a, b, kind)
    except ValueError as exc:  # a zero model (e.g. all-zero bias-free output) is refused, not scored
        assert "zero norm" in str(exc)
        return
    s_ba = ts.similarity(b, a, kind)
    assert abs(s_ab.value) <= 1
    assert abs(s_ab.value - s_ba.value) < 1e-12
    assert ts.similarity(a, copy.deepcopy(a), kind).value == pytest.approx(1, abs=1e-12)
    assert ts.similarity(a, a, kind).value == pytest.approx(1, abs=1e-12)


def test_centred_gaussian_is_twice_symmetric_for_bias_free_layer():
    rng = np.random.default_rng(11)
    a = model_of(O.random_spec(rng, [4, 3], ["bilinear"], hidden=5, bias=False))
    b = model_of(O.random_spec(rng, [4, 3], ["bilinear"], hidden=3, bias=False))
    c = ts.inner(a, b, centered=True)
    s = ts.inner(a, b, "symmetric")
    assert c.centered and rel(c.value, 2 * s.value) < 1e-12
    assert rel(ts.inner(a, b).value, c.value) > 1e-6  # uncentred differs


def test_per_output():
    rng = np.random.default_rng(12)
    sa, sb = (O.random_spec(rng, [3, 3], ["bilinear"], hidden=2) for _ in range(2))
    a, b = model_of(sa), model_of(sb)
    for kind in ("gaussian", "symmetric", "network"):
        vec = ts.inner(a, b, kind, per_output=True)
        assert vec.per_output and vec.value.shape == (3,)
        assert rel(vec.value.sum(), ts.inner(a, b, kind).value) < 1e-12
        with pytest.raises(TypeError):
            float(vec)
    for o in range(3):  # one output channel at a time through the oracle
        one = lambda s: [dict(s[0], down=s[0]["down"][o : o + 1], down_bias=s[0]["down_bias"][o : o + 1])]  # noqa: E731
        want = O.gaussian_inner_bruteforce(one(sa), one(sb))
        assert rel(ts.inner(a, b, per_output=True).value[o], want) < 1e-12
    cos = ts.similarity(a, b, per_output=True).value
    assert cos.shape == (3,) and np.all(np.abs(cos) <= 1)


def test_exact_rational_weights_give_rational_answer():
    half = Fraction(1, 2)
    L = np.array([[Fraction(1), -half], [Fraction(2, 3), Fraction(1)]], dtype=object)
    R = np.array([[half, Fraction(1)], [Fraction(-1), Fraction(1, 3)]], dtype=object)
    D = np.array([[Fraction(3, 4), Fraction(-2)]], dtype=object)
    lb = np.array([Fraction(1, 5), Fraction(0)], dtype=object)
    a = ts.Bilinear(L, R, D, left_bias=lb)
    b = ts.Bilinear(R, L, D * 2)
    r = ts.inner(a, b)
    assert isinstance(r.value, Fraction)
    x = sympy.symbols("x0 x1")
    want = O.sympy_gaussian_inner(O.sympy_polynomials(spec_of(a), x), O.sympy_polynomials(spec_of(b), x), x)
    assert sympy.Rational(r.value.numerator, r.value.denominator) == want
    assert rel(float(r.value), ts.inner(ts.Bilinear(*(m.astype(float) for m in (L, R, D)), left_bias=lb.astype(float)),
                                        ts.Bilinear(R.astype(float), L.astype(float), (D * 2).astype(float))).value) < 1e-14


# ---------------------------------------------------------------- closure


def test_closure_is_exact_at_depth_one_and_flagged_beyond():
    rng = np.random.default_rng(13)
    mean, cov = gaussian_params(3, 14)
    a1, b1 = (model_of(O.random_spec(rng, [3, 3], ["bilinear"], hidden=3, residual=True)) for _ in range(2))
    c1 = ts.inner(a1, b1, method="closure", mean=mean, cov=cov)
    assert c1.method == "closure" and c1.exact
    assert rel(c1.value, ts.inner(a1, b1, mean=mean, cov=cov).value) < 1e-12
    assert rel(ts.inner(a1, b1, method="closure", centered=True).value, ts.inner(a1, b1, centered=True).value) < 1e-12
    a2, b2 = (model_of(O.random_spec(rng, [3, 3, 3], ["bilinear"] * 2, hidden=3)) for _ in range(2))
    c2 = ts.inner(a2, b2, method="closure")
    assert not c2.exact and "approximate" in repr(c2) and c2.notes
    assert rel(c2.value, ts.inner(a2, b2).value) > 1e-6
    assert not ts.similarity(a2, b2, method="closure").exact


# -------------------------------------------------------------- bad input


def test_bad_input():
    rng = np.random.default_rng(15)
    a = model_of(O.random_spec(rng, [3, 2], ["bilinear"]))
    wide = model_of(O.random_spec(rng, [4, 2], ["bilinear"]))
    other_out = model_of(O.random_spec(rng, [3, 5], ["bilinear"]))
    zero = ts.Bilinear(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="input widths differ"):
        ts.inner(a, wide)
    with pytest.raises(ValueError, match="output widths differ"):
        ts.similarity(a, other_out)
    with pytest.raises(ValueError, match="zero norm"):
        ts.similarity(a, zero)
    with pytest.raises(ValueError, match="inner must be one of"):
        ts.inner(a, a, "cosine")
    with pytest.raises(ValueError, match="method must be one of"):
        ts.inner(a, a, method="fast")
    with pytest.raises(ValueError, match="gaussian"):
        ts.inner(a, a, "symmetric", method="closure")
    with pytest.raises(ValueError, match="positive semi-definite"):
        ts.inner(a, a, cov=-np.eye(3))
    with pytest.raises(ValueError, match=r"mean has shape"):
        ts.inner(a, a, mean=np.zeros(2))
    with pytest.raises(ts.CostError, match="exceed the budget.*closure"):
        ts.inner(a, a, budget=10)
    deep = model_of(O.random_spec(rng, [12, 2, 2, 2], ["bilinear"] * 3))
    with pytest.raises(ts.CostError, match="quadrature needs 9\\^12") as refused:
        ts.inner(deep, deep)  # 16 input legs and 12 input coordinates: refused before any contraction
    assert "46,206,736 pairings" in str(refused.value)
    assert not ts.similarity(deep, deep, method="closure").exact  # the offered alternative works


def test_the_network_product_keeps_exact_weights_exact():
    """Fraction weights gave a float labelled exact; sympy symbols raised a
    sympy TypeError.  One bilinear layer: the network product is the
    symmetric one (docs), in the weights' own numbers."""
    import sympy
    from fractions import Fraction as Fr

    F = lambda *r: np.array(r, dtype=object)  # noqa: E731
    b = ts.Bilinear(F([Fr(1, 3), Fr(1)]), F([Fr(1), Fr(1, 7)]), F([Fr(1)]))
    got = ts.inner(b, b, "network").value
    assert got == Fr(100, 147) == ts.inner(b, b, "symmetric").value
    assert float(got) == pytest.approx(ts.inner(b.map_weights(lambda w: np.asarray(w, dtype=float)),
                                                b.map_weights(lambda w: np.asarray(w, dtype=float)), "network").value)
    a, c = sympy.symbols("a c")
    s = ts.Bilinear(F([a, 1]), F([1, c]), F([1]))
    assert sympy.expand(ts.inner(s, s, "network").value - ts.inner(s, s, "symmetric").value) == 0


def test_centred_node_sums_are_stable_whatever_the_order_and_the_constant():
    """The centred sum over nodes, chunk by chunk: nodes whose first lies far
    out (a quadrature grid's corner, weight 1e-30) and outputs carrying a
    constant of 1e6, against the two-pass covariance.  E[f g] - E f E g lost
    12 digits to the constant, sums about the first node's outputs 8 to its
    distance; each chunk about its own means, merged, loses none (2.4e-10
    without taking the first chunk's means out first: the merged means then
    carry the constant's rounding)."""
    from tsalgebra.node_sums import Forward, node_sum

    rng = np.random.default_rng(0)
    a = ts.Linear(rng.normal(size=(2, 1)), np.array([1e6, -1e6]))
    b = ts.Bilinear(rng.normal(size=(2, 1)), rng.normal(size=(2, 1)), rng.normal(size=(2, 2)), down_bias=np.full(2, 1e6))
    x = np.r_[-1e4, rng.normal(size=299)][:, None]
    w = np.r_[1e-30, rng.random(299)]
    w /= w.sum()
    chunks = [(x[:100], w[:100]), (x[100:], w[100:])]
    fa, fb = Forward(a)(x), Forward(b)(x)  # the very outputs the sums read: only the summing is compared
    ma, mb = w @ fa, w @ fb
    for per_output in (False, True):
        want = (w[:, None] * (fa - ma) * (fb - mb)).sum(axis=0)
        got = node_sum(Forward(a), Forward(b), chunks, True, per_output).value
        np.testing.assert_allclose(got, want if per_output else want.sum(), rtol=1e-11)
