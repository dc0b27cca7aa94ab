"""Fixes found by fuzzing:

1. the node-gram route of a cross similarity matrix whose row and column
   models differ in degree summed the self products (the norms) on a
   quadrature grid exact only for the cross products' degree;
2. algorithm='hermite' failed on a rank-0 law (a point-mass Gaussian, or
   attention inputs that ignore x) instead of computing the constant moments.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import sympy

import tsalgebra as ts
from tsalgebra.node_sums import CHUNK, Forward

MEAN = np.array([0.3, -0.5])
COV = np.array([[1.2, 0.4], [0.4, 0.6]])


def _models():
    """Degree 1, 2 and 3 models of R^2 -> R^2."""
    rng = np.random.default_rng(7)
    lin = ts.Linear(rng.normal(size=(2, 2)), rng.normal(size=2))
    lin2 = ts.Linear(rng.normal(size=(2, 2)))
    bil = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)),
                      left_bias=[1.0, 0.5, -0.3], down_bias=[0.2, -0.1])
    x, y = sympy.symbols("x y")
    cub = ts.from_sympy([0.7 * x**3 - 1.1 * x * y + 0.25, -0.4 * y**3 + 0.9 * x**2 * y + 0.6 * x - 0.3], [x, y])
    return lin, lin2, bil, cub


def _oracle(rows, cols, centered):
    """Cosines by a 12-point-per-axis Gauss-Hermite rule written here (exact
    to degree 23, far above any product of these models), models evaluated
    with their own __call__."""
    t, w = np.polynomial.hermite_e.hermegauss(12)
    w = w / np.sqrt(2 * np.pi)
    Z = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    W = np.outer(w, w).ravel()
    X = MEAN + Z @ np.linalg.cholesky(COV).T

    def outs(m):
        F = np.asarray(m(X), dtype=float).reshape(len(X), -1)
        return F - W @ F if centered else F

    FR, FC = [outs(m) for m in rows], [outs(m) for m in cols]
    dot = lambda f, g: float(np.einsum("n,no,no->", W, f, g))  # noqa: E731
    return np.array([[dot(f, g) / np.sqrt(dot(f, f) * dot(g, g)) for g in FC] for f in FR])


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("high", ["bil", "cub"])  # degrees 1 vs 2 and 1 vs 3
def test_cross_node_gram_mixed_degrees_is_exact(centered, high):
    lin, lin2, bil, cub = _models()
    other = bil if high == "bil" else cub
    rows, cols = [lin, lin2], [other, lin]
    want = _oracle(rows, cols, centered)
    for r, c, expect in ((rows, cols, want), (cols, rows, want.T)):
        got = ts.cross_similarity_matrix(r, c, mean=MEAN, cov=COV, centered=centered, route="node-gram",
                                         progress=False)
        assert got.route == "node-gram" and got.exact
        np.testing.assert_allclose(got.values, expect, atol=1e-10)
    # and pair by pair, by another exact algorithm
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            twin = ts.similarity(a, b, mean=MEAN, cov=COV, centered=centered, algorithm="pairings")
            assert want[i, j] == pytest.approx(twin.value, abs=1e-10)


def test_cross_node_gram_tiled_store_mixed_degrees():
    lin, lin2, bil, cub = _models()
    rows, cols = [lin, lin2], [bil, cub, lin]
    for centered in (False, True):
        with tempfile.TemporaryDirectory() as d:
            got = ts.cross_similarity_matrix(rows, cols, mean=MEAN, cov=COV, centered=centered, store=d, tile=1,
                                             progress=False)
        np.testing.assert_allclose(got.values, _oracle(rows, cols, centered), atol=1e-10)


@pytest.mark.parametrize("high,degree", [("bil", 2), ("cub", 3)])
def test_cross_node_gram_costs_the_grid_it_runs(high, degree):
    """The planned grid integrates degree 2 D (D the highest degree on either
    side): (D + 1)^rank nodes, the nodes the route sums over, and the flops
    and the chunk the costs compare are counted on them."""
    lin, lin2, bil, cub = _models()
    other = bil if high == "bil" else cub
    rows, cols = [lin, lin2], [other]
    got = ts.cross_similarity_matrix(rows, cols, mean=MEAN, cov=COV, route="node-gram", progress=False)
    cost = got.candidates["node-gram"]
    plan = cost.layout
    points = (degree + 1) ** 2
    assert plan.facts["nodes"] == points
    assert sum(degree_of_grid for degree_of_grid in plan.problem.degrees) == 2 * degree
    ran = sum(len(x) for x, _ in ts.algorithms.registry._named(plan.algorithm).nodes(plan.problem))
    assert ran == points
    chunk = min(points, CHUNK)
    forward = sum(Forward(m).flops(chunk) for m in rows + cols) * (points / chunk)
    pairs = len(rows) * len(cols) + len(rows) + len(cols)
    assert cost.flops == int(forward + 2.0 * pairs * points * 2)


def test_square_matrix_unchanged():
    lin, lin2, bil, cub = _models()
    models = [lin, bil, cub, lin2]
    for centered in (False, True):
        m = ts.similarity_matrix(models, mean=MEAN, cov=COV, centered=centered, progress=False)
        assert m.route == "node-gram" and m.candidates["node-gram"].layout.facts["nodes"] == 4**2
        np.testing.assert_allclose(m.values, _oracle(models, models, centered), atol=1e-10)


# ------------------------------------------------------------------ bug 2


def _attention_model(rng, first_weight):
    w = lambda *s: rng.normal(size=s)  # noqa: E731
    attn = ts.BilinearAttention(w(1, 2, 2), w(1, 2, 2), w(1, 2, 2), w(1, 2, 2), w(1, 2, 2), w(1, 2, 2), n_ctx=2)
    return ts.Sequential(ts.PositionWise(ts.Linear(first_weight, w(2)), 2), attn,
                         ts.PositionWise(ts.Linear(w(2, 2), w(2)), 2))


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("case", ["point-mass", "constant-input-map"])
def test_hermite_rank_zero_law(centered, case):
    rng = np.random.default_rng(3)
    if case == "point-mass":  # cov = 0: every position at the mean
        a, b = _attention_model(rng, rng.normal(size=(2, 2))), _attention_model(rng, rng.normal(size=(2, 2)))
        measure = ts.Gaussian(np.array([0.4, -0.7]), np.zeros((2, 2)))
    else:  # the attention layers' input ignores x
        a, b = _attention_model(rng, np.zeros((2, 2))), _attention_model(rng, np.zeros((2, 2)))
        measure = ts.Gaussian(np.zeros(2), np.eye(2))
    for x, y in ((a, b), (a, a)):
        got = ts.inner(x, y, measure=measure, centered=centered, algorithm="hermite")
        assert got.algorithm == "hermite" and got.exact
        for other in ("moments", "quadrature"):
            try:
                twin = ts.inner(x, y, measure=measure, centered=centered, algorithm=other)
            except ts.RoundingError:  # moments' E[x x'] - E[x] E[x]' of a constant: round-off, no digit, said
                assert centered and x is y and other == "moments"
                continue
            assert got.value == pytest.approx(twin.value, rel=1e-10, abs=1e-10)
        # the input is constant: the moments are the function at one input
        x0 = np.tile(measure.padded_mean()[1:], 2)[None]
        fx, fy = np.asarray(x(x0), dtype=float).ravel(), np.asarray(y(x0), dtype=float).ravel()
        assert got.value == pytest.approx(0.0 if centered else float(fx @ fy), rel=1e-10, abs=1e-10)
    per = ts.inner(a, b, measure=measure, algorithm="hermite", per_output=True)
    np.testing.assert_allclose(per.value, ts.inner(a, b, measure=measure, algorithm="moments", per_output=True).value,
                               rtol=1e-10, atol=1e-12)
    if not centered:
        s = ts.similarity(a, b, measure=measure, algorithm="hermite")
        assert s.value == pytest.approx(ts.similarity(a, b, measure=measure, algorithm="moments").value, abs=1e-10)
