"""Exact Gaussian inner products by Gauss-Hermite quadrature, for small input ranks.

With x = m + F z, z ~ N(0, I_r) (F F^T = cov, r its rank), f(x) . g(x) is a
polynomial in z of degree at most k_a + k_b in each coordinate, and the
tensor-product Gauss-Hermite rule with q = floor((k_a + k_b) / 2) + 1 nodes
per coordinate integrates such polynomials exactly.  The cost is q^r model
evaluations: exponential in the input rank, polynomial in the depth, the
opposite trade-off to pairing enumeration, which is exponential in the
number of input copies.  Exact up to floating-point round-off (float weights).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from ..measure import Gaussian
from ..node_sums import CHUNK, Forward, NodeSum, chunk_sizes, node_flops, node_peak_bytes, node_sum
from ..problem import CostError, InnerProblem, Plan, degree_of, format_count
from .registry import Algorithm, Triple

__all__ = ["Quadrature", "quadrature_inner"]


def _grid(measure: Gaussian, degree: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tensor-product Gauss-Hermite nodes and weights integrating
    polynomials of ``degree`` in each coordinate exactly under ``measure``, in
    chunks (the q^r rows are never held at once)."""
    F = measure.factor()
    mean = measure.padded_mean()[1:]
    q, r = degree // 2 + 1, F.shape[1]
    nodes, weights = np.polynomial.hermite_e.hermegauss(q)
    weights = weights / np.sqrt(2 * np.pi)
    start = 0
    for batch in chunk_sizes(q**r):
        idx = np.stack(np.unravel_index(np.arange(start, start + batch), (q,) * r), axis=1) if r else \
            np.zeros((batch, 0), dtype=np.int64)
        start += batch
        yield mean[None, :] + nodes[idx] @ F.T, np.prod(weights[idx], axis=1)


def quadrature_inner(a: Any, b: Any, measure: Gaussian, centered: bool, per_output: bool) -> tuple[NodeSum, int]:
    """E[f . g] (or the covariance form) for x under ``measure``; returns
    (the sum, nodes).  The caller checks the cost first (:class:`Quadrature`)."""
    k = degree_of(a) + degree_of(b)
    points = (k // 2 + 1) ** measure.rank
    return node_sum(Forward(a), Forward(b), _grid(measure, k), centered, per_output, a is b), points


class Quadrature(Algorithm):
    name = "quadrature"
    title = "Gauss-Hermite quadrature"
    measures = (Gaussian,)

    def check(self, problem: InnerProblem) -> str | None:
        if problem.exact_numbers:
            return "it computes float inner products only"
        if not problem.orbits:
            return "orbits=False asks for the plain sum over pairings"
        return None

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        q, r = sum(problem.degrees) // 2 + 1, problem.measure.rank  # type: ignore[union-attr]
        if r * math.log10(q) > 300:  # beyond any budget, and beyond a float
            raise CostError(f"Gauss-Hermite quadrature needs {q}^{r} nodes (about 1e{r * math.log10(q):.0f})")
        points = q**r
        fa, fb = Forward(problem.a), Forward(problem.b)
        flops = node_flops(fa, fb, points, limit)
        if flops > limit:
            count = f"{points:,}" if points < 10**15 else f"about {format_count(points)}"
            raise CostError(f"Gauss-Hermite quadrature needs {q}^{r} = {count} evaluations "
                            f"({format_count(flops)} flops)", flops=flops)
        width, out = problem.widths
        # the grid's rows: indices, nodes and weights per coordinate, and the nodes mapped to inputs
        peak = node_peak_bytes(fa, fb, min(points, CHUNK), width, out, 3 * r + width)
        return Plan(self.name, problem, flops, peak, points, facts={"nodes": points, "nodes_per_axis": q, "rank": r},
                    notes=(f"exact on {points:,} quadrature nodes",))

    def run(self, plan: Plan) -> Triple:
        p = plan.problem
        summed, _ = quadrature_inner(p.a, p.b, p.measure, p.centered, p.per_output)  # type: ignore[arg-type]
        return summed.result(plan), None, None

    def nodes(self, problem: InnerProblem) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return _grid(problem.measure, sum(problem.degrees))  # type: ignore[arg-type]
