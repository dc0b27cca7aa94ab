"""The identities behind the attention-moments algorithm (tsalgebra/algorithms/hermite.py).

Claims:
1. probabilists' Hermite polynomials satisfy x He_n = He_{n+1} + n He_{n-1}
   and, under N(0, 1), E[He_m He_n] = n! [m = n]; so for multi-indices b, c
   E[He_b(z) He_c(z)] = b! [b = c] and Cov(p, q) = sum over b != 0 of b! p_b q_b;
2. the package's Hermite tables (products built one linear factor at a time
   from the shifts z_i p,
   covariance by degree blocks) reproduce sympy's polynomial products and
   Gaussian expectations exactly, in two variables up to degree 5;
3. for independent positions x and y, parts of centred features depending on
   different position sets are uncorrelated:
   E[f~(x) g~(y) h~(x)] = 0 and E[f~(x) g~(y) f'~(x) g'~(y)] = Cov(f, f') Cov(g, g').

Proof: symbolic (sympy) integration against the Gaussian density and
expansion; claim 2 evaluates the package on integer coefficients, where
float arithmetic is exact.
"""

import itertools
import math

import numpy as np
import sympy

from tsalgebra.algorithms.hermite import _Hermite

x, y = sympy.symbols("x y", real=True)


t = sympy.symbols("t", real=True)
# E[t^n] for t ~ N(0, 1), by integration against the density, once
MOMENTS = [sympy.integrate(t**n * sympy.exp(-t**2 / 2) / sympy.sqrt(2 * sympy.pi), (t, -sympy.oo, sympy.oo))
           for n in range(13)]


def gauss(expr, var):
    """E over var ~ N(0, 1) of a polynomial (other symbols are constants)."""
    poly = sympy.Poly(sympy.expand(expr), var)
    return sympy.expand(sum(c * MOMENTS[m[0]] for m, c in poly.terms()))


def He(n, var):
    return sympy.hermite_prob(n, var)


def test_recurrence_and_orthogonality():
    for n in range(1, 9):
        assert sympy.expand(x * He(n, x) - He(n + 1, x) - n * He(n - 1, x)) == 0
    for m, n in itertools.product(range(7), repeat=2):
        assert gauss(He(m, x) * He(n, x), x) == (math.factorial(n) if m == n else 0), (m, n)


def _as_sympy(coeffs: np.ndarray, basis: _Hermite, zs) -> sympy.Expr:
    total = 0
    for c, b in zip(coeffs, basis.exps):
        if c != 0:
            total += sympy.Integer(int(round(c))) * sympy.Mul(*(He(int(e), z) for e, z in zip(b, zs)))
    return sympy.expand(total)


def test_package_products_and_covariances_are_exact():
    basis = _Hermite(2, 5)
    zs = (x, y)
    rng = np.random.default_rng(0)
    lin = lambda: rng.integers(-3, 4, size=(1, 3)).astype(float)  # noqa: E731  [constant, z1, z2]
    as_poly = lambda L: int(L[0, 0]) + int(L[0, 1]) * x + int(L[0, 2]) * y  # noqa: E731
    for _ in range(3):
        forms = [lin() for _ in range(5)]
        p, want = forms[0], as_poly(forms[0])
        for deg, form in enumerate(forms[1:5], start=1):  # p times a linear form: its shifts by 1, z_1, z_2
            p = (form[0] @ basis.shifts(p, deg)[0])[None]
            want *= as_poly(form)
            assert sympy.expand(_as_sympy(p[0], basis, zs) - want) == 0
        shifted, want5 = p, sympy.expand(want)
        q = (forms[2][0] @ basis.shifts(forms[1], 1)[0])[None]  # a degree-2 partner, stored at its own width
        cov = basis.covariance([shifted], [q])[0, 0]
        pq = sympy.expand(want5 * _as_sympy(q[0], basis, zs))
        e = lambda f: gauss(gauss(f, x), y)  # noqa: E731
        assert sympy.Integer(int(round(cov))) == e(pq) - e(want5) * e(_as_sympy(q[0], basis, zs))
        assert float(cov) == round(cov)  # no round-off at all on integers


def test_parts_on_different_positions_are_uncorrelated():
    f, g, h, f2, g2 = (x**2 + 2 * x - 1, y**3 - y + 2, x**3 + 1, 3 * x**2 - x, y**2 + y)
    centre = lambda p, v: p - gauss(p, v)  # noqa: E731
    E = lambda p: gauss(gauss(p, x), y)  # noqa: E731
    fc, gc, hc, f2c, g2c = centre(f, x), centre(g, y), centre(h, x), centre(f2, x), centre(g2, y)
    assert E(fc * gc * hc) == 0
    assert sympy.simplify(E(fc * gc * f2c * g2c) - gauss(fc * f2c, x) * gauss(gc * g2c, y)) == 0
    # and the product of raw features splits into constant, one-position and two-position parts
    mf, mg = gauss(f, x), gauss(g, y)
    assert sympy.expand(f * g - (mf * mg + fc * mg + mf * gc + fc * gc)) == 0
