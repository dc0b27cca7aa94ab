"""The one-layer closed form of the symmetric inner product.

Claim: for bilinear layers with padded factors (L, R, D),
    <a, b>_S = sum_{h,h'} core[h,h'] (Da^T Db)[h,h'],
    core = 1/2 ((La Lb^T) * (Ra Rb^T) + (La Rb^T) * (Ra Lb^T))   (elementwise),
equals the Frobenius product of the symmetrized tensors
B[o,i,j] = sum_h D[o,h] L[h,i] R[h,j] over outputs.

Proof: fully symbolic factors (padded width 3, two hidden units each, two
outputs), brute-force symmetrization against the formula; then the same
symbolic layers through tsalgebra's exact symmetric inner product (which
contracts pairing networks) and through its Gram recursion.
"""

import numpy as np
import sympy

import tsalgebra as ts
from tsalgebra.algorithms.gram import network_gram

d1, h, o = 3, 2, 2  # padded input width, hidden units, outputs


def factors(name):
    L = sympy.Matrix(h, d1, lambda i, j: sympy.Symbol(f"{name}L{i}{j}"))
    R = sympy.Matrix(h, d1, lambda i, j: sympy.Symbol(f"{name}R{i}{j}"))
    D = sympy.Matrix(o, h, lambda i, j: sympy.Symbol(f"{name}D{i}{j}"))
    return L, R, D


def sym_tensor(L, R, D):
    return [[[sum(D[q, u] * (L[u, i] * R[u, j] + L[u, j] * R[u, i]) / 2 for u in range(h)) for j in range(d1)]
             for i in range(d1)] for q in range(o)]


def core_formula(a, b):
    (La, Ra, Da), (Lb, Rb, Db) = a, b
    core = ((La * Lb.T).multiply_elementwise(Ra * Rb.T) + (La * Rb.T).multiply_elementwise(Ra * Lb.T)) / 2
    return sum((core.multiply_elementwise(Da.T * Db)))


def test_core_formula_equals_symmetrized_frobenius():
    a, b = factors("a"), factors("b")
    Ta, Tb = sym_tensor(*a), sym_tensor(*b)
    brute = sum(Ta[q][i][j] * Tb[q][i][j] for q in range(o) for i in range(d1) for j in range(d1))
    assert sympy.expand(brute - core_formula(a, b)) == 0


def test_code_paths_agree_with_formula():
    """The same symbolic layers (column 0 of L and R as biases, inputs of
    width 2) through the package's exact symmetric product, and through its
    Gram recursion at a rational point."""
    def layer(name):
        L, R, D = factors(name)
        arr = lambda M: np.array(M.tolist(), dtype=object)  # noqa: E731
        return ts.Bilinear(arr(L[:, 1:]), arr(R[:, 1:]), arr(D), left_bias=arr(L[:, 0]).ravel(),
                           right_bias=arr(R[:, 0]).ravel()), (L, R, D)
    A, fa = layer("a")
    B, fb = layer("b")
    want = core_formula(fa, fb)
    assert sympy.expand(ts.inner(A, B, "symmetric").value - want) == 0
    # the Gram recursion in float agrees at a random rational point
    point = {s: sympy.Rational(np.random.default_rng(0).integers(-9, 9), 7) for s in want.free_symbols}
    fA = A.map_weights(lambda w: np.array([[float(sympy.sympify(v).subs(point)) for v in row] for row in np.atleast_2d(w)]).reshape(w.shape))
    fB = B.map_weights(lambda w: np.array([[float(sympy.sympify(v).subs(point)) for v in row] for row in np.atleast_2d(w)]).reshape(w.shape))
    G = network_gram(fA, fB)
    assert abs(float(np.trace(G[1:, 1:])) - float(want.subs(point))) < 1e-9 * max(1.0, abs(float(want.subs(point))))
