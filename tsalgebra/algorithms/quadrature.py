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
from itertools import product
from typing import Any

import numpy as np

from ..engine import evaluation_network, pad_input
from ..expr import Network
from ..measure import Gaussian
from ..planner import ContractionPlan, plan as plan_network
from ..problem import CostError, InnerProblem, Plan, format_count
from .registry import Algorithm, Triple

__all__ = ["Quadrature", "quadrature_inner"]

_CHUNK = 4096  # nodes evaluated at once


def _evaluation_plans(terms: list[tuple[Any, Network]], batch: int) -> list[ContractionPlan]:
    """The plan evaluating each term on ``batch`` inputs, a function of the
    shapes alone (the flops estimated are the flops run)."""
    return [plan_network(evaluation_network(n, batch) if n.inputs else n, n.outputs if not n.inputs else None,
                         cache=False) for _, n in terms]


def _chunks(points: int) -> list[int]:
    """Batch sizes of the evaluation: full chunks, then the rest."""
    full, rest = divmod(points, _CHUNK)
    return [_CHUNK] * full + ([rest] if rest else [])


def _evaluate(terms: list[tuple[Any, Network]], plans: list[ContractionPlan], x: np.ndarray) -> np.ndarray:
    xt = pad_input(x)
    out: Any = 0
    for (c, n), p in zip(terms, plans):
        data = [np.asarray(t.data, dtype=float) for t in n.tensors]
        if n.inputs:
            value = p.execute(*data, *([xt] * n.degree))
        else:  # a constant term: once, for every node
            const = p.execute(*data)
            value = np.broadcast_to(const, (len(x),) + const.shape)
        out = out + float(c) * value[:, 1:]
    return out


def quadrature_inner(ta: list[tuple[Any, Network]], tb: list[tuple[Any, Network]], measure: Gaussian,
                     centered: bool, per_output: bool) -> tuple[Any, int]:
    """E[f . g] (or the covariance form) for x under ``measure``; returns
    (value, nodes).  The caller checks the cost first (:class:`Quadrature`)."""
    k = max(n.degree for _, n in ta) + max(n.degree for _, n in tb)
    F = measure.factor()
    mean = measure.padded_mean()[1:]
    q, r = k // 2 + 1, F.shape[1]
    points = q**r
    nodes, weights = np.polynomial.hermite_e.hermegauss(q)
    weights = weights / np.sqrt(2 * np.pi)
    grid = np.array(list(product(range(q), repeat=r)), dtype=np.int64).reshape(points, r)
    acc_fg: Any = 0
    acc_f: Any = 0
    acc_g: Any = 0
    plans: dict[int, tuple[list[ContractionPlan], list[ContractionPlan]]] = {}
    start = 0
    for batch in _chunks(points):
        if batch not in plans:
            plans[batch] = (_evaluation_plans(ta, batch), _evaluation_plans(tb, batch))
        idx = grid[start : start + batch]
        start += batch
        w = np.prod(weights[idx], axis=1)
        x = mean[None, :] + nodes[idx] @ F.T
        f, g = _evaluate(ta, plans[batch][0], x), _evaluate(tb, plans[batch][1], x)
        acc_fg = acc_fg + (w[:, None] * f * g).sum(axis=0)
        if centered:
            acc_f = acc_f + (w[:, None] * f).sum(axis=0)
            acc_g = acc_g + (w[:, None] * g).sum(axis=0)
    value = acc_fg - (acc_f * acc_g if centered else 0)
    return (value if per_output else float(np.sum(value))), points


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
        ta, tb = problem.terms("a", False), problem.terms("b", False)
        chunk = min(points, _CHUNK)  # a plan of the first chunk bounds the cost before any plan of the rest
        per_chunk = sum(p.flops for p in _evaluation_plans(ta, chunk) + _evaluation_plans(tb, chunk))
        flops = float(per_chunk) * (points / chunk)
        if flops <= limit and points % chunk:
            sizes = _chunks(points)
            flops = float(per_chunk) * (len(sizes) - 1) + sum(
                p.flops for p in _evaluation_plans(ta, sizes[-1]) + _evaluation_plans(tb, sizes[-1]))
        if flops > limit:
            count = f"{points:,}" if points < 10**15 else f"about {format_count(points)}"
            raise CostError(f"Gauss-Hermite quadrature needs {q}^{r} = {count} evaluations "
                            f"({format_count(flops)} flops)", flops=flops)
        width, out = problem.widths
        peak = 8.0 * min(points, _CHUNK) * (width + 4 * out) + 8.0 * points * r  # a chunk's inputs, outputs; the grid
        return Plan(self.name, problem, flops, peak, points, facts={"nodes": points, "nodes_per_axis": q, "rank": r},
                    notes=(f"exact on {points:,} quadrature nodes",))

    def run(self, plan: Plan) -> Triple:
        p = plan.problem
        value, _ = quadrature_inner(p.terms("a"), p.terms("b"), p.measure, p.centered, p.per_output)  # type: ignore[arg-type]
        return plan.result(value), None, None
