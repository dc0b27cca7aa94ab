"""The symmetric (Bombieri) inner product is the complex-Gaussian functional
inner product divided by k!.

Claim: for homogeneous polynomials p, q of degree k in the padded coordinates
z = (z_0, ..., z_d) with symmetric coefficient tensors T, S,
    <T, S>_F = E[p(z) conj(q(z))] / k!,   z standard complex Gaussian.

Proof: (1) sympy integrates in polar coordinates to get the monomial rule
E[z^a conj(z)^b] = delta_ab a! for one standard complex normal; (2) with it,
the expectation of the product of two symbolic polynomials (d = 1, k = 2, 3,
real symbolic coefficients) is compared with k! times the Frobenius product
of their symmetric tensors, and with what tsalgebra's symmetric inner product
returns on the same symbolic polynomials.
"""

import sympy
from sympy import I, exp, factorial, integrate, oo, pi

import tsalgebra as ts

r, th = sympy.symbols("r theta", positive=True)


def complex_moment(a, b):
    """E[z^a conj(z)^b], density exp(-|z|^2)/pi, by integration."""
    integrand = r ** (a + b) * exp(I * (a - b) * th) * exp(-(r**2)) * r / pi
    return sympy.simplify(integrate(integrate(integrand, (r, 0, oo)), (th, 0, 2 * pi)))


def test_complex_gaussian_monomial_rule():
    for a in range(4):
        for b in range(4):
            assert complex_moment(a, b) == (factorial(a) if a == b else 0), (a, b)


def _expectation(p, q, zs):
    """E[p(z) conj(q(z))] for real-coefficient p, q by the monomial rule."""
    P, Q = sympy.Poly(p, *zs), sympy.Poly(q, *zs)
    total = 0
    for ea, ca in P.terms():
        for eb, cb in Q.terms():
            if ea == eb:
                w = 1
                for e in ea:
                    w *= factorial(e)
                total += ca * cb * w
    return total


def test_symmetric_inner_is_complex_gaussian_over_k_factorial():
    x1 = sympy.Symbol("x1")
    z0, z1 = sympy.symbols("z0 z1")
    for k in (2, 3):
        a = sympy.symbols(f"a0:{k + 1}", real=True)
        b = sympy.symbols(f"b0:{k + 1}", real=True)
        p = sum(a[j] * x1**j for j in range(k + 1))  # degree k in x1, inhomogeneous
        q = sum(b[j] * x1**j for j in range(k + 1))
        P, Q = ts.from_sympy(p, [x1], degree=k), ts.from_sympy(q, [x1], degree=k)
        # Frobenius product of the symmetric tensors (output channel 1)
        frob = sympy.expand(sum(P.tensor[1][idx] * Q.tensor[1][idx] for idx in sympy.utilities.iterables.product(*[range(2)] * k)))
        homog = lambda poly: sympy.expand(z0**k * poly.subs(x1, z1 / z0))  # noqa: E731
        expectation = _expectation(homog(p), homog(q), (z0, z1))
        assert sympy.expand(frob - expectation / factorial(k)) == 0
        code = ts.inner(P, Q, "symmetric").value
        assert sympy.expand(code - frob) == 0
