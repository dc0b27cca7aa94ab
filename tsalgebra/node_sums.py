"""Expectations as weighted sums of two models evaluated on finitely many inputs.

Gauss-Hermite quadrature (exact for a Gaussian and polynomials of bounded
degree) and the enumeration of every token sequence (exact for a token
measure) both compute sum_k w_k f(x_k) . g(x_k): the models are evaluated
chunk by chunk with contraction plans made for the chunk's size from shapes
alone, so the flops planned are the flops run.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .engine import evaluation_network, pad_input
from .expr import Network
from .planner import ContractionPlan, plan as plan_network

__all__ = ["CHUNK", "chunk_sizes", "node_flops", "node_sum"]

CHUNK = 4096  # inputs evaluated at once

Terms = list[tuple[Any, Network]]


def _plans(terms: Terms, batch: int) -> list[ContractionPlan]:
    """The plan evaluating each term on ``batch`` inputs, a function of the
    shapes alone."""
    return [plan_network(evaluation_network(n, batch) if n.inputs else n, n.outputs if not n.inputs else None,
                         cache=False) for _, n in terms]


def chunk_sizes(points: int) -> list[int]:
    """Batch sizes of the evaluation: full chunks, then the rest."""
    full, rest = divmod(points, CHUNK)
    return [CHUNK] * full + ([rest] if rest else [])


def node_flops(ta: Terms, tb: Terms, points: int, limit: float = float("inf")) -> float:
    """Planned flops of evaluating both models on ``points`` inputs (the
    first chunk's plan extrapolated, an exact count once it is within
    ``limit``)."""
    chunk = min(points, CHUNK)
    per_chunk = sum(p.flops for p in _plans(ta, chunk) + _plans(tb, chunk))
    flops = float(per_chunk) * (points / chunk)
    if flops <= limit and points % chunk:
        sizes = chunk_sizes(points)
        flops = float(per_chunk) * (len(sizes) - 1) + sum(p.flops for p in _plans(ta, sizes[-1]) + _plans(tb, sizes[-1]))
    return flops


def _evaluate(terms: Terms, plans: list[ContractionPlan], x: np.ndarray) -> np.ndarray:
    xt = pad_input(x)
    out: Any = 0
    for (c, n), p in zip(terms, plans):
        data = [np.asarray(t.data, dtype=float) for t in n.tensors]
        if n.inputs:
            value = p.execute(*data, *([xt] * n.degree))
        else:  # a constant term: once, for every input
            const = p.execute(*data)
            value = np.broadcast_to(const, (len(x),) + const.shape)
        out = out + float(c) * value[:, 1:]
    return out


def node_sum(ta: Terms, tb: Terms, chunks: Iterable[tuple[np.ndarray, np.ndarray]], centered: bool,
             per_output: bool) -> Any:
    """sum_k w_k f(x_k) . g(x_k) (minus the product of the weighted means when
    ``centered``), summed over channels unless ``per_output``; ``chunks``
    yields (inputs (m, width), weights (m,)) of at most :data:`CHUNK` rows."""
    acc_fg: Any = 0
    acc_f: Any = 0
    acc_g: Any = 0
    plans: dict[int, tuple[list[ContractionPlan], list[ContractionPlan]]] = {}
    for x, w in chunks:
        if len(x) not in plans:
            plans[len(x)] = (_plans(ta, len(x)), _plans(tb, len(x)))
        f, g = _evaluate(ta, plans[len(x)][0], x), _evaluate(tb, plans[len(x)][1], x)
        acc_fg = acc_fg + (w[:, None] * f * g).sum(axis=0)
        if centered:
            acc_f = acc_f + (w[:, None] * f).sum(axis=0)
            acc_g = acc_g + (w[:, None] * g).sum(axis=0)
    value = acc_fg - (acc_f * acc_g if centered else 0)
    return value if per_output else float(np.sum(value))
