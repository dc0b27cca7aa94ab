"""Orbit-weighted pairing sums equal full pairing sums for a depth-2 stack.

Claim: for two depth-2 bilinear stacks (input width 1, one hidden unit per
layer, biases), the sum over all partial matchings of the 8 input legs of
the joined contraction (Gaussian) and over all 24 bijections (symmetric)
equals the sum over orbits under the declared symmetries (L/R swap at every
symmetrized node, and the exchange of the sides for a self product), each
orbit taken once and weighted by its size.

Proof: the weights are sympy symbols, so both sums are polynomials in them;
tsalgebra computes each (orbits=True and orbits=False) in exact symbolic
arithmetic and the difference expands to zero.  A symbolic identity in the
weights holds for every numeric model of this shape.
"""

import numpy as np
import sympy

import tsalgebra as ts


def stack(name):
    def layer(k):
        s = lambda tag: np.array([[sympy.Symbol(f"{name}{tag}{k}")]], dtype=object)  # noqa: E731
        b = lambda tag: np.array([sympy.Symbol(f"{name}{tag}{k}")], dtype=object)  # noqa: E731
        return ts.Bilinear(s("L"), s("R"), s("D"), left_bias=b("l"), right_bias=b("r"), down_bias=b("d"))
    return ts.Sequential(layer(1), layer(2))


a, b = stack("a"), stack("b")


def check(x, y, kind):
    grouped = ts.inner(x, y, kind)
    full = ts.inner(x, y, kind, orbits=False)
    assert grouped.orbits < full.orbits == full.pairings
    assert sympy.expand(grouped.value - full.value) == 0


def test_gaussian_cross_and_self():
    check(a, b, "gaussian")
    check(a, a, "gaussian")


def test_symmetric_cross_and_self():
    check(a, b, "symmetric")
    check(a, a, "symmetric")
