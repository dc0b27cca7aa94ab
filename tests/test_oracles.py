"""Cross-checks of the reference oracles against each other (and closed forms)."""

from __future__ import annotations

import zlib
from fractions import Fraction

import numpy as np
import pytest
import sympy
import torch

import oracles as O


# ---------------------------------------------------------------------------
# Spec fixtures
# ---------------------------------------------------------------------------

# (widths, kinds, residual, bias)
SPEC_CASES = [
    ([3, 2], ["linear"], False, True),
    ([3, 3], ["bilinear"], True, True),
    ([2, 3], ["bilinear"], False, True),
    ([3, 3], ["bilinear"], False, False),
    ([3, 2, 2], ["linear", "bilinear"], True, True),
    ([2, 3, 2], ["bilinear", "linear"], False, True),
    ([2, 2, 2], ["bilinear", "bilinear"], True, True),
    ([3, 3, 2], ["bilinear", "bilinear"], True, True),
    ([2, 2, 1], ["bilinear", "bilinear"], False, False),
]


def _case_id(case) -> str:
    widths, kinds, res, bias = case
    return "-".join(kinds) + f"_w{'x'.join(map(str, widths))}" + ("_res" if res else "") + ("_bias" if bias else "")


def _random_gaussian(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    A = 0.6 * rng.standard_normal((d, d))
    return 0.5 * rng.standard_normal(d), A @ A.T + 0.5 * np.eye(d)


# ---------------------------------------------------------------------------
# Padded tensors vs direct forward passes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", SPEC_CASES, ids=_case_id)
def test_padded_tensor_matches_forward(case):
    widths, kinds, res, bias = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))
    spec = O.random_spec(rng, widths, kinds, hidden=3, bias=bias, residual=res)
    T = O.padded_tensor(spec)
    k = O.spec_degree(spec)
    assert T.shape == (widths[-1] + 1,) + (widths[0] + 1,) * k
    assert T.dtype == np.float64
    x = rng.standard_normal((7, widths[0]))
    y_np = O.forward_numpy(spec, x)
    y_t = O.forward_torch(spec, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_np, y_t, rtol=1e-12, atol=1e-12)
    for n in range(x.shape[0]):
        v = O.contract_padded(T, x[n])
        assert v[0] == pytest.approx(1.0, abs=1e-13)
        np.testing.assert_allclose(v[1:], y_np[n], rtol=1e-10, atol=1e-10)
    # the constant channel is exactly e_{0...0}
    T0 = np.zeros_like(T[0])
    T0[(0,) * k] = 1.0
    np.testing.assert_array_equal(T[0], T0)


def test_padded_tensor_hand_examples():
    lin = {"kind": "linear", "weight": np.array([[2.0]]), "bias": np.array([3.0])}
    np.testing.assert_array_equal(O.padded_tensor([lin]), [[1.0, 0.0], [3.0, 2.0]])
    # y = (x + 1) * x = x^2 + x; residual adds x; down bias adds 5
    bil = {
        "kind": "bilinear",
        "left": np.array([[1.0]]),
        "right": np.array([[1.0]]),
        "down": np.array([[1.0]]),
        "left_bias": np.array([1.0]),
        "right_bias": None,
        "down_bias": np.array([5.0]),
        "residual": True,
    }
    B = O.padded_tensor([bil])
    expected = np.zeros((2, 2, 2))
    expected[0, 0, 0] = 1.0
    expected[1, 0, 0] = 5.0  # down bias
    expected[1, 0, 1] = 1.0  # left bias * x
    expected[1, 1, 1] = 1.0  # x * x
    expected[1, 1, 0] = 1.0  # residual x_1 * 1
    np.testing.assert_array_equal(B, expected)


@pytest.mark.parametrize("case", SPEC_CASES[:5], ids=_case_id)
def test_lift_and_symmetrize_preserve_function(case):
    widths, kinds, res, bias = case
    rng = np.random.default_rng(7)
    spec = O.random_spec(rng, widths, kinds, bias=bias, residual=res)
    T = O.padded_tensor(spec)
    k = T.ndim - 1
    L = O.lift(T, k + 2)
    S = O.symmetrize(L)
    np.testing.assert_allclose(O.symmetrize(S), S, atol=1e-14)
    for _ in range(3):
        x = rng.standard_normal(widths[0])
        v = O.contract_padded(T, x)
        np.testing.assert_allclose(O.contract_padded(L, x), v, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(O.contract_padded(S, x), v, rtol=1e-12, atol=1e-12)


def test_padded_bilinear_factors_reconstruct_tensor():
    rng = np.random.default_rng(3)
    for res, (din, dout) in [(True, (3, 3)), (False, (2, 3)), (True, (2, 2))]:
        layer = O.random_spec(rng, [din, dout], ["bilinear"], hidden=3, residual=res)[0]
        Lt, Rt, Dt = O.padded_bilinear_factors(layer)
        assert Lt.shape == Rt.shape == (1 + 3 + (din if res else 0), din + 1)
        B = np.einsum("ou,ui,uj->oij", Dt, Lt, Rt)
        np.testing.assert_allclose(B, O.padded_bilinear(layer), atol=1e-14)


# ---------------------------------------------------------------------------
# Matchings and moment tensors
# ---------------------------------------------------------------------------


def test_matching_counts():
    telephone = [1, 1, 2, 4, 10, 26, 76, 232, 764]
    for n, c in enumerate(telephone):
        ms = list(O.partial_matchings(n))
        assert len(ms) == c
        for m in ms:  # every position covered exactly once
            assert sorted(p for block in m for p in block) == list(range(n))
    for n in range(0, 9):
        expected = 0 if n % 2 else int(sympy.factorial2(n - 1))
        assert len(list(O.perfect_matchings(range(n)))) == expected


def test_moment_tensor_closed_forms():
    M4 = O.gaussian_moment_tensor(4, np.zeros(1), np.eye(1))
    assert M4[1, 1, 1, 1] == pytest.approx(3.0)
    assert M4[0, 0, 0, 0] == 1.0
    assert M4[0, 1, 0, 1] == pytest.approx(1.0)
    assert M4[0, 0, 0, 1] == 0.0
    m, s2 = 0.7, 1.3
    M2 = O.gaussian_moment_tensor(2, np.array([m]), np.array([[1.0]]))
    assert M2[1, 1] == pytest.approx(1 + m**2)
    assert M2[0, 1] == pytest.approx(m)
    M4 = O.gaussian_moment_tensor(4, np.array([m]), np.array([[s2]]))
    assert M4[1, 1, 1, 1] == pytest.approx(m**4 + 6 * m**2 * s2 + 3 * s2**2)
    assert M4[0, 1, 1, 1] == pytest.approx(m**3 + 3 * m * s2)
    # multivariate: E[x1 x2] = C12 + m1 m2, E[x1^2 x2^2] (zero mean) = C11 C22 + 2 C12^2
    rng = np.random.default_rng(0)
    mean, cov = _random_gaussian(rng, 2)
    M2 = O.gaussian_moment_tensor(2, mean, cov)
    assert M2[1, 2] == pytest.approx(cov[0, 1] + mean[0] * mean[1])
    M4 = O.gaussian_moment_tensor(4, np.zeros(2), cov)
    assert M4[1, 1, 2, 2] == pytest.approx(cov[0, 0] * cov[1, 1] + 2 * cov[0, 1] ** 2)


def test_moment_tensor_entrywise_and_symmetric():
    rng = np.random.default_rng(1)
    mean, cov = _random_gaussian(rng, 2)
    M = O.gaussian_moment_tensor(5, mean, cov)
    for _ in range(20):
        idx = tuple(rng.integers(0, 3, size=5))
        assert M[idx] == pytest.approx(O.gaussian_moment_entry_slow(idx, mean, cov), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(np.transpose(M, (3, 0, 4, 1, 2)), M, atol=1e-13)
    # index 0 is the constant: M_n[0, rest] = M_{n-1}[rest]
    np.testing.assert_allclose(M[0], O.gaussian_moment_tensor(4, mean, cov), atol=1e-13)


def test_moment_tensor_vs_sample_moments():
    rng = np.random.default_rng(2)
    mean, cov = _random_gaussian(rng, 2)
    x = rng.multivariate_normal(mean, cov, size=400_000)
    xt = np.concatenate([np.ones((x.shape[0], 1)), x], axis=1)
    M3 = O.gaussian_moment_tensor(3, mean, cov)
    emp = np.einsum("ni,nj,nk->ijk", xt, xt, xt) / x.shape[0]
    np.testing.assert_allclose(emp, M3, atol=0.05)


# ---------------------------------------------------------------------------
# Gaussian inner product: brute force vs Monte Carlo
# ---------------------------------------------------------------------------

MC_CASES = [
    (([2, 2], ["bilinear"], True), ([2, 2], ["bilinear"], False)),
    (([2, 2], ["linear"], False), ([2, 2], ["bilinear"], True)),
    (([3, 2], ["bilinear"], False), ([3, 2, 2], ["linear", "bilinear"], True)),
    (([2, 2, 2], ["bilinear", "bilinear"], True), ([2, 2], ["bilinear"], True)),
]


@pytest.mark.parametrize("ci", range(len(MC_CASES)))
@pytest.mark.parametrize("standard", [False, True])
def test_gaussian_inner_vs_monte_carlo(ci, standard):
    (wa, ka, ra), (wb, kb, rb) = MC_CASES[ci]
    rng = np.random.default_rng(100 + ci)
    spec_a = O.random_spec(rng, wa, ka, hidden=2, residual=ra, scale=0.5)
    spec_b = O.random_spec(rng, wb, kb, hidden=3, residual=rb, scale=0.5)
    d = wa[0]
    mean, cov = (None, None) if standard else _random_gaussian(rng, d)
    exact = O.gaussian_inner_bruteforce(spec_a, spec_b, mean, cov)
    est, se = O.monte_carlo_inner(spec_a, spec_b, 200_000, np.random.default_rng(7 + ci), mean, cov)
    assert abs(exact - est) < 4 * se, (exact, est, se)
    # a sanity check that the test is not vacuous
    assert se < 0.2 * max(1.0, abs(exact))


# ---------------------------------------------------------------------------
# Gaussian inner product: brute force vs exact sympy
# ---------------------------------------------------------------------------


def _rational_spec(rng: np.random.Generator, widths, kinds, residual=False, as_fraction=False):
    """Spec with small integer / half-integer weights (optionally Fraction object arrays)."""

    def mat(*shape):
        a = rng.integers(-2, 3, size=shape) / 2.0
        if as_fraction:
            return np.array([Fraction(v).limit_denominator(2) for v in a.ravel()], dtype=object).reshape(shape)
        return a

    spec = []
    for kind, din, dout in zip(kinds, widths[:-1], widths[1:]):
        if kind == "linear":
            spec.append({"kind": "linear", "weight": mat(dout, din), "bias": mat(dout)})
        else:
            spec.append(
                {
                    "kind": "bilinear",
                    "left": mat(2, din),
                    "right": mat(2, din),
                    "down": mat(dout, 2),
                    "left_bias": mat(2),
                    "right_bias": None,
                    "down_bias": mat(dout),
                    "residual": residual and din == dout,
                }
            )
    return spec


SYMPY_CASES = [
    (([2, 2], ["bilinear"]), ([2, 2], ["bilinear"])),
    (([3, 2], ["linear"]), ([3, 2], ["bilinear"])),
    (([2, 2, 2], ["bilinear", "bilinear"]), ([2, 2], ["linear"])),
    (([2, 2, 2], ["bilinear", "bilinear"]), ([2, 2, 2], ["linear", "bilinear"])),
    (([2, 2, 1], ["bilinear", "bilinear"]), ([2, 2, 1], ["bilinear", "bilinear"])),
]


@pytest.mark.parametrize("ci", range(len(SYMPY_CASES)))
def test_gaussian_inner_vs_sympy(ci):
    (wa, ka), (wb, kb) = SYMPY_CASES[ci]
    rng = np.random.default_rng(200 + ci)
    spec_a = _rational_spec(rng, wa, ka, residual=True, as_fraction=(ci % 2 == 0))
    spec_b = _rational_spec(rng, wb, kb, residual=(ci % 2 == 1))
    xs = sympy.symbols(f"x0:{wa[0]}")
    pa = O.sympy_polynomials(spec_a, xs)
    pb = O.sympy_polynomials(spec_b, xs)
    # the sympy polynomials agree with the numeric forward pass
    pts = rng.standard_normal((3, wa[0]))
    ya = O.forward_numpy(spec_a, pts)
    for n in range(pts.shape[0]):
        subs = dict(zip(xs, pts[n]))
        np.testing.assert_allclose([float(p.subs(subs)) for p in pa], ya[n], rtol=1e-10, atol=1e-10)
    exact = O.sympy_gaussian_inner(pa, pb, xs)
    assert exact.is_Rational
    bf = O.gaussian_inner_bruteforce(spec_a, spec_b)
    assert bf == pytest.approx(float(exact), rel=1e-10, abs=1e-10)
    # centered version against sympy: E[(p - Ep)(q - Eq)]
    one = [sympy.Integer(1)]
    pa_c = [p - O.sympy_gaussian_inner([p], one, xs) for p in pa]
    pb_c = [q - O.sympy_gaussian_inner([q], one, xs) for q in pb]
    exact_c = O.sympy_gaussian_inner(pa_c, pb_c, xs)
    bf_c = O.gaussian_inner_bruteforce(spec_a, spec_b, centered=True)
    assert bf_c == pytest.approx(float(exact_c), rel=1e-10, abs=1e-10)


def test_sympy_polynomials_hand_example():
    x = sympy.Symbol("x")
    bil = {
        "kind": "bilinear",
        "left": np.array([[1.0]]),
        "right": np.array([[1.0]]),
        "down": np.array([[Fraction(1, 3)]], dtype=object),
        "left_bias": np.array([1.0]),
        "right_bias": None,
        "down_bias": np.array([0.1]),
        "residual": True,
    }
    (p,) = O.sympy_polynomials([bil], [x])
    assert sympy.expand(p - (sympy.Rational(1, 3) * (x + 1) * x + sympy.Rational(1, 10) + x)) == 0
    # E[p^2] for p = x^2/3 + 4x/3 + 1/10: 3/9 + 16/9 + 1/100 + 2*(1/3)(1/10)
    expected = sympy.Rational(1, 3) + sympy.Rational(16, 9) + sympy.Rational(1, 100) + sympy.Rational(1, 15)
    assert O.sympy_gaussian_inner([p], [p], [x]) == expected


# ---------------------------------------------------------------------------
# Symmetric inner product: brute force vs bilinear closed form
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("res_a,res_b", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_symmetric_inner_vs_bilinear_core(seed, res_a, res_b, bias):
    rng = np.random.default_rng(seed)
    d = 3 if seed % 2 else 2
    la = O.random_spec(rng, [d, d], ["bilinear"], hidden=2, bias=bias, residual=res_a)
    lb = O.random_spec(rng, [d, d], ["bilinear"], hidden=3, bias=bias, residual=res_b)
    La, Ra, Da = O.padded_bilinear_factors(la[0])
    Lb, Rb, Db = O.padded_bilinear_factors(lb[0])
    closed = O.bilinear_core_inner(La, Ra, Da[1:], Lb, Rb, Db[1:])
    brute = O.symmetric_inner_bruteforce(la, lb)
    assert closed == pytest.approx(brute, rel=1e-12, abs=1e-12)


def test_symmetric_inner_is_frobenius_on_symmetric_part():
    rng = np.random.default_rng(11)
    spec = O.random_spec(rng, [2, 2], ["linear"], bias=True)
    bil = O.random_spec(rng, [2, 2], ["bilinear"], bias=True, residual=True)
    # linear vs bilinear: lift the linear one with e0, then symmetrize
    T = O.padded_tensor(spec)
    B = O.padded_tensor(bil)
    Tl = np.einsum("oi,j->oij", T, np.eye(3)[0])
    manual = np.sum(0.5 * (Tl + Tl.transpose(0, 2, 1))[1:] * 0.5 * (B + B.transpose(0, 2, 1))[1:])
    assert O.symmetric_inner_bruteforce(spec, bil) == pytest.approx(manual, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_centered_gaussian_equals_twice_symmetric_for_pure_quadratic(seed):
    rng = np.random.default_rng(50 + seed)
    d = 2 + seed % 2
    a = O.random_spec(rng, [d, 2], ["bilinear"], hidden=3, bias=False, residual=False)
    b = O.random_spec(rng, [d, 2], ["bilinear"], hidden=2, bias=False, residual=False)
    centered = O.gaussian_inner_bruteforce(a, b, centered=True)
    sym = O.symmetric_inner_bruteforce(a, b)
    assert centered == pytest.approx(2 * sym, rel=1e-12, abs=1e-12)
    # and the uncentered one picks up E f . E g = sum_o tr(A_o) tr(B_o)
    Ta, Tb = O.padded_tensor(a), O.padded_tensor(b)
    tr = sum(np.trace(Ta[o, 1:, 1:]) * np.trace(Tb[o, 1:, 1:]) for o in range(1, 3))
    assert O.gaussian_inner_bruteforce(a, b) == pytest.approx(2 * sym + tr, rel=1e-12, abs=1e-12)
