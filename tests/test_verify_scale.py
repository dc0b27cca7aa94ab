"""ts.verify reads only ratios of its three products (a similarity, a
residual, a scale), so models whose weights are beyond float64's squares
(1e160: products of 10^640) or below them (1e-160) have the figures of the
same models at unit scale.  Before, the float products overflowed ("<a, b> =
e^1473 overflows float64") and the exact ones failed in float() ("integer
division result too large for a float")."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts


def _pair(scale, rng=None):
    rng = rng or np.random.default_rng(0)
    L, R, D = rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3))
    m = ts.Bilinear(L * scale, R * scale, D)
    near = ts.Bilinear(L * scale, R * scale, D + 0.01 * rng.normal(size=D.shape))
    half = ts.Bilinear(L * scale, R * scale, D / 2)
    return m, near, half


@pytest.mark.parametrize("scale", [1e160, 1e-160])
@pytest.mark.parametrize("kw", [{}, {"exact": True}, {"method": "sampled", "samples": 400, "seed": 3}],
                         ids=["float", "exact", "sampled"])
def test_the_figures_do_not_depend_on_the_models_common_scale(scale, kw):
    (m, near, half), (m1, near1, half1) = _pair(scale), _pair(1.0)
    for c, c1, verdict in ((near, near1, "different"), (half, half1, "equal up to scale")):
        got, want = ts.verify(c, m, **kw), ts.verify(c1, m1, **kw)
        assert got.verdict.split(" (")[0] == want.verdict.split(" (")[0] == verdict
        for figure in ("similarity", "relative_residual", "explained", "scale"):
            assert float(getattr(got, figure)) == pytest.approx(float(getattr(want, figure)), rel=1e-9, abs=1e-12)
        assert np.allclose(np.asarray(got.per_output["similarity"], dtype=float),
                           np.asarray(want.per_output["similarity"], dtype=float), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1e100, 1e150])
def test_a_circuit_far_larger_than_the_component_has_a_finite_error_bar(scale):
    """Sampled, a circuit 1e100 times the component (plus noise): the
    residual's standard error was NaN (the multiple r = 1e100 squared again
    in its variance: inf - inf), and its interval (nan, nan).  It now
    covers the exact residual like any other."""
    rng = np.random.default_rng(0)
    L, R, D = rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3))
    m = ts.Bilinear(L, R, D)
    c = ts.Bilinear(L, R, D * scale + 1e-3 * scale * rng.normal(size=D.shape))
    exact = ts.verify(c, m).relative_residual
    v = ts.verify(c, m, method="sampled", samples=2000, seed=1)
    se = v.stderr["relative_residual"]
    assert np.isfinite(se) and 0 < se < 1e-3 * v.relative_residual
    lo, hi = v.interval["relative_residual"]
    assert np.isfinite(lo) and np.isfinite(hi)
    assert abs(v.relative_residual - exact) < 4 * se
