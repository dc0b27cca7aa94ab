"""Isserlis' theorem with means, in the partial-matching form the code uses.

Claim: for x ~ N(m, C) and any indices i_1..i_n (n = 2, 4),
    E[x_i1 ... x_in] = sum over partial matchings of {1..n} of
                       prod over pairs C[i_a, i_b] * prod over singletons m[i_a],
and the same holds on the padded input x~ = [1; x] with the padded mean
[1; m] and the padded covariance [[0, 0], [0, C]].

Proof: moments are derivatives at t = 0 of the moment generating function
exp(t.m + t.C.t / 2); sympy differentiates it with symbolic m and C (d = 2)
and compares with the sum over the matchings that tsalgebra.pairings
enumerates (so the enumeration used by the code is checked too).
"""

from itertools import product

import sympy

from tsalgebra.pairings import partial_matchings

d = 2
m = sympy.symbols("m1:3")
c11, c12, c22 = sympy.symbols("c11 c12 c22")
C = sympy.Matrix([[c11, c12], [c12, c22]])
t = sympy.symbols("t1:3")
tv = sympy.Matrix(t)
mgf = sympy.exp((tv.T * sympy.Matrix(m))[0] + (tv.T * C * tv)[0] / 2)


def moment(indices):
    expr = mgf
    for i in indices:
        expr = sympy.diff(expr, t[i])
    return expr.subs({ti: 0 for ti in t})


def matching_sum(indices, mean, cov):
    total = 0
    for partner in partial_matchings(len(indices)):
        term = 1
        for a, b in enumerate(partner):
            if a == b:
                term *= mean[indices[a]]
            elif a < b:
                term *= cov[indices[a], indices[b]]
        total += term
    return total


def test_isserlis_with_means_degree_2_and_4():
    for n in (2, 4):
        for idx in product(range(d), repeat=n):
            assert sympy.expand(moment(idx) - matching_sum(idx, m, C)) == 0, idx


def test_isserlis_on_padded_input():
    mean_p = (1,) + m
    cov_p = sympy.zeros(d + 1, d + 1)
    cov_p[1:, 1:] = C
    for n in (2, 4):
        for idx in product(range(d + 1), repeat=n):
            raw = [i - 1 for i in idx if i > 0]  # x~_0 = 1 contributes a factor 1
            want = moment(raw) if raw else 1
            assert sympy.expand(want - matching_sum(idx, mean_p, cov_p)) == 0, idx
