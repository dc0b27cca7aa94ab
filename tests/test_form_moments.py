"""Moments of products of bilinear and linear factors (tsalgebra.form_moments)
against Gauss-Hermite quadrature, exact for these polynomial degrees."""

from __future__ import annotations

from itertools import product

import numpy as np
import pytest

from tsalgebra.form_moments import Factor, Leg, moment


def _setup(rng, D, heads, dims, slots):
    """Random padded linear forms of u ~ N(mu, I_D) per family: (heads, dim, D + 1)."""
    mu = rng.normal(size=D) * 0.5
    forms = {fam: rng.normal(size=(heads[side], dims[fam], D + 1)) for fam, side in slots}
    return mu, forms


def _quadrature_moment(factors, forms, mu, D, heads):
    """E[prod factors] per (P, ha, hb, e, f) by tensor Gauss-Hermite quadrature on u."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(6)
    weights = weights / np.sqrt(2 * np.pi)
    P = max(f.bond.shape[0] for f in factors if not f.linear)
    Ha, Hb = heads
    dims = {0: 1, 1: 1}
    for f in factors:
        if f.linear:
            dims[f.side] = forms[f.legs[0].family].shape[1]
    out = np.zeros((P, Ha, Hb, dims[0], dims[1]))
    for idx in product(range(6), repeat=D):
        u = mu + nodes[list(idx)]
        w = np.prod(weights[list(idx)])
        ut = np.concatenate([[1.0], u])
        val = np.ones((P, Ha, Hb, dims[0], dims[1]))
        for f in factors:
            x = forms[f.legs[0].family] @ ut  # (heads, dim)
            h = (slice(None), None) if f.side == 0 else (None, slice(None))
            if f.linear:
                v = x[h + ((slice(None), None) if f.side == 0 else (None, slice(None)))]
                val = val * v[None]
            else:
                y = forms[f.legs[1].family] @ ut
                s = np.einsum("phxy,hx,hy->ph", np.broadcast_to(f.bond, (P,) + f.bond.shape[1:]), x, y)
                val = val * (s[:, :, None, None, None] if f.side == 0 else s[:, None, :, None, None])
        out += w * val
    return out


@pytest.mark.parametrize("seed", range(4))
def test_six_factors_against_quadrature(seed):
    """Two bilinear factors and a linear one per side, one slot (every leg
    correlated with every other), mean shifted, two position tuples."""
    rng = np.random.default_rng(seed)
    D, heads = 2, (2, 3)
    fams = [("q1", 0), ("k1", 0), ("q2", 0), ("k2", 0), ("v", 0), ("Q1", 1), ("K1", 1), ("Q2", 1), ("K2", 1), ("V", 1)]
    dims = {f: 2 for f, _ in fams}
    dims["v"], dims["V"] = 3, 2
    mu, forms = _setup(rng, D, heads, dims, fams)
    side = dict(fams)

    def gram(x, y):
        X, Y = forms[x.family][..., 1:], forms[y.family][..., 1:]
        if x.side == y.side:
            return np.einsum("hxd,hyd->hxy", X, Y)
        return np.einsum("hxd,kyd->hxky", X, Y)

    def mean(x):
        X = forms[x.family]
        return X[..., 0] + X[..., 1:] @ mu

    leg = lambda f: Leg(f, side[f])  # noqa: E731
    bond = lambda s, a, b: rng.normal(size=(2, heads[s], dims[a], dims[b]))  # noqa: E731
    factors = [Factor((leg("q1"), leg("k1")), bond(0, "q1", "k1")), Factor((leg("q2"), leg("k2")), bond(0, "q2", "k2")),
               Factor((leg("v"),)), Factor((leg("Q1"), leg("K1")), bond(1, "Q1", "K1")),
               Factor((leg("Q2"), leg("K2")), bond(1, "Q2", "K2")), Factor((leg("V"),))]
    got, cost = moment(factors, gram, mean)
    want = _quadrature_moment(factors, forms, mu, D, heads)
    np.testing.assert_allclose(got[..., 0, 0], want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    assert cost.flops > 0
    dry, dry_cost = moment(factors, lambda x, y: np.empty(np.shape(gram(x, y))), lambda x: np.empty(np.shape(mean(x))), dry=True)
    assert dry.shape == got.shape  # the dry run counts what the run spends
    assert (dry_cost.flops, dry_cost.largest) == (cost.flops, cost.largest) and dry_cost.peak >= dry_cost.largest


def test_the_dry_runs_peak_is_the_runs_footprint():
    """The elements the dry run counts live at once (its peak, with three of
    the largest tensor for an operation's transients) bound the memory the
    real run allocates, traced, and are not far above it."""
    import tracemalloc

    rng = np.random.default_rng(5)
    heads, w, P = (6, 6), 16, 8
    fams = [("q1", 0), ("k1", 0), ("q2", 0), ("k2", 0), ("v", 0), ("Q1", 1), ("K1", 1), ("Q2", 1), ("K2", 1), ("V", 1)]
    forms = {f: rng.normal(size=(heads[s], w, 9)) for f, s in fams}
    side = dict(fams)

    def gram(x, y):
        X, Y = forms[x.family][..., 1:], forms[y.family][..., 1:]
        return np.einsum("hxd,hyd->hxy", X, Y) if x.side == y.side else np.einsum("hxd,kyd->hxky", X, Y)

    def mean(x):
        return forms[x.family][..., 0]

    leg = lambda f: Leg(f, side[f])  # noqa: E731
    bond = lambda s: rng.normal(size=(P, 1, w, w))  # noqa: E731
    factors = [Factor((leg("q1"), leg("k1")), bond(0)), Factor((leg("q2"), leg("k2")), bond(0)), Factor((leg("v"),)),
               Factor((leg("Q1"), leg("K1")), bond(1)), Factor((leg("Q2"), leg("K2")), bond(1)), Factor((leg("V"),))]
    _, planned = moment(factors, gram, mean, dry=True)
    tracemalloc.start()
    try:
        value, _ = moment(factors, gram, mean)
        used = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = 8 * (planned.peak + 3 * planned.largest)
    assert used <= bound, (used, bound)
    assert used >= bound / 4, (used, bound)
