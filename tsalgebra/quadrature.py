"""Exact Gaussian inner products by Gauss-Hermite quadrature, for small input widths.

With x = m + A z, z ~ N(0, I_r) (A A^T = cov, r its rank), f(x) . g(x) is a
polynomial in z of degree at most k_a + k_b in each coordinate, and the
tensor-product Gauss-Hermite rule with q = floor((k_a + k_b) / 2) + 1 nodes
per coordinate integrates such polynomials exactly.  The cost is q^r model
evaluations: exponential in the input width, polynomial in the depth, the
opposite trade-off to pairing enumeration, which is exponential in the
number of input copies.  Exact up to floating-point round-off (float weights).
"""

from __future__ import annotations

from itertools import product
from typing import Any

import numpy as np

from .engine import evaluate, evaluation_network
from .expr import Network
from .pairing_sum import CostError
from .planner import plan

__all__ = ["grid_points", "quadrature_inner"]

_CHUNK = 4096


def _factor(cov: np.ndarray) -> np.ndarray:
    lam, V = np.linalg.eigh(cov)
    keep = lam > 1e-14 * max(1.0, float(np.abs(lam).max()))
    return V[:, keep] * np.sqrt(lam[keep])


def _evaluate(terms: list[tuple[Any, Network]], x: np.ndarray) -> np.ndarray:
    return sum(float(c) * evaluate(n, x)[:, 1:] for c, n in terms)


def _eval_flops(terms: list[tuple[Any, Network]]) -> int:
    """Flops of evaluating the terms on one sample."""
    return sum(plan(evaluation_network(n, 1)).flops for _, n in terms)


def grid_points(ta: list[tuple[Any, Network]], tb: list[tuple[Any, Network]], cov: np.ndarray) -> int:
    """Number of Gauss-Hermite nodes an exact product needs: q^rank(cov)
    (the rank read off the diagonal when cov is diagonal: no decomposition)."""
    k = max(n.degree for _, n in ta) + max(n.degree for _, n in tb)
    off_diagonal = cov.copy()
    np.fill_diagonal(off_diagonal, 0)
    rank = int(np.count_nonzero(np.diag(cov))) if not off_diagonal.any() else _factor(cov).shape[1]
    return (k // 2 + 1) ** rank


def quadrature_inner(ta: list[tuple[Any, Network]], tb: list[tuple[Any, Network]], mean: np.ndarray,
                     cov: np.ndarray, centered: bool, per_output: bool, budget: float) -> tuple[Any, int, int]:
    """E[f . g] (or the covariance form) for x ~ N(mean, cov); returns
    (value, grid points, flops).  Raises CostError before evaluating when
    grid points x evaluation flops exceed ``budget``."""
    k = max(n.degree for _, n in ta) + max(n.degree for _, n in tb)
    A = _factor(cov)
    q = k // 2 + 1
    r = A.shape[1]
    points = q**r
    flops = points * (_eval_flops(ta) + _eval_flops(tb))
    if flops > budget:
        raise CostError(
            f"Gauss-Hermite quadrature needs {q}^{r} = {points:,} evaluations ({flops:.3g} flops), "
            f"above the budget of {budget:.3g}"
        )
    nodes, weights = np.polynomial.hermite_e.hermegauss(q)
    weights = weights / np.sqrt(2 * np.pi)
    grid = np.array(list(product(range(q), repeat=r)), dtype=np.int64).reshape(points, r)
    acc_fg: Any = 0
    acc_f: Any = 0
    acc_g: Any = 0
    for start in range(0, points, _CHUNK):
        idx = grid[start : start + _CHUNK]
        z = nodes[idx]
        w = np.prod(weights[idx], axis=1)
        x = mean[None, :] + z @ A.T
        f, g = _evaluate(ta, x), _evaluate(tb, x)
        acc_fg = acc_fg + (w[:, None] * f * g).sum(axis=0)
        if centered:
            acc_f = acc_f + (w[:, None] * f).sum(axis=0)
            acc_g = acc_g + (w[:, None] * g).sum(axis=0)
    value = acc_fg - (acc_f * acc_g if centered else 0)
    return (value if per_output else float(np.sum(value))), points, int(flops)
