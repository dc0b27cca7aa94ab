"""The heavy-tail flag under a Gaussian also judges what the samples can check.

The sample kurtosis of n samples reaches about n at most, so it cannot see a
kurtosis far beyond n: two bilinear layers (degree-8 outputs, degree-16
products) have exact kurtoses near 5e4 (quadrature of s^4 below), and their
estimates that the sample kurtosis left unflagged covered the exact value in
67-92 % of seeds (three layers: 10-34 %).  Hypercontractivity bounds a
degree-k product's kurtosis by 9^k whatever the samples show; where the
variance error that allows, sqrt((9^k - 1) / n), is over TAIL_CEILING, the
estimate is flagged.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

import tsalgebra as ts
from tsalgebra.algorithms.sampled import TAIL_CEILING, HEAVY_TAIL_VARIANCE_ERROR, Z95
from tsalgebra.node_sums import Forward


def pair(depth, seed=0):
    """Two stacks of ``depth`` bilinear layers 2 -> 3 -> 2 (normal weights)."""
    rng = np.random.default_rng(seed)

    def model():
        layers = [ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
                  for _ in range(depth)]
        return ts.Sequential(*layers) if depth > 1 else layers[0]

    return model(), model()


def exact_kurtosis(model, degree):
    """m4 / m2^2 of the per-sample product f.f by Gauss-Hermite quadrature
    (exact for the polynomial s^4 of degree 4 * degree)."""
    x, w = hermegauss(2 * degree + 1)
    w = w / w.sum()
    X = np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2)
    W = np.outer(w, w).ravel()
    f = Forward(model)(X)
    s = (f * f).sum(1)
    d = s - W @ s
    return (W @ d ** 4) / (W @ d ** 2) ** 2


def test_the_ceiling_is_the_hypercontractive_bound_and_holds_the_exact_kurtosis():
    a, _ = pair(2)
    k = 2 * 4  # degree of f.f for two bilinear layers
    kurtosis = exact_kurtosis(a, k)
    assert 1e3 < kurtosis < 9.0 ** k  # far beyond what 2,000 samples show, within the ceiling
    r = ts.inner(a, a, method="sampled", samples=2000, seed=0)
    est = r.estimate
    assert math.isclose(est.tail_ceiling, math.sqrt((9.0 ** k - 1) / 2000), rel_tol=1e-12)
    # the true variance error is far over the threshold: the estimate must be flagged
    assert math.sqrt((kurtosis - 1) / 2000) > HEAVY_TAIL_VARIANCE_ERROR
    assert est.heavy_tailed and est.variance_error == 1.0
    assert any(n.startswith("HEAVY TAILS") and "degree 8" in n for n in r.notes) and "heavy tails" in repr(r)


def test_depth_2_estimates_the_sample_kurtosis_left_unflagged_are_now_flagged():
    """Seeds whose samples missed the tail: unflagged by their own kurtosis,
    they cover the exact value far less than 95 % of the time."""
    a, _ = pair(2)
    exact = ts.inner(a, a).value
    runs = [ts.inner(a, a, method="sampled", samples=500, seed=s) for s in range(30)]
    assert all(r.estimate.heavy_tailed for r in runs)
    missed = sum(abs(r.value - exact) > Z95 * r.stderr for r in runs)
    assert missed >= 5, f"only {missed} of 30 intervals miss: this case no longer shows a doubtful error bar"


def test_one_bilinear_layer_is_judged_by_its_samples_from_729_on():
    a, b = pair(1)
    k = 4
    assert (9.0 ** k - 1) / TAIL_CEILING ** 2 < 729 < 9.0 ** k / TAIL_CEILING ** 2 + 1
    few = ts.similarity(a, b, method="sampled", samples=500, seed=0).estimate
    assert few.tail_ceiling > TAIL_CEILING and few.heavy_tailed
    enough = [ts.similarity(a, b, method="sampled", samples=2000, seed=s).estimate for s in range(10)]
    assert all(e.tail_ceiling <= TAIL_CEILING for e in enough)
    assert sum(e.heavy_tailed for e in enough) <= 1
