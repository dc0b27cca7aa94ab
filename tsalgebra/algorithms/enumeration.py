"""Exact inner products under the token measure by enumerating every token sequence.

E[f . g] over independent tokens is the weighted sum of f(x) . g(x) over all
sequences of nonzero probability, each x a concatenation of one-hot vectors.
Exact for every model (nothing about its structure is used), exponential in
the number of tokens: the slow, obvious twin of the contractions with the
measure's diagonal moments, and the exact answer for deep models at small
vocabularies.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..measure import Tokens, format_power
from ..node_sums import CHUNK, Forward, node_flops, node_peak_bytes, node_sum
from ..problem import CostError, InnerProblem, Plan, format_count
from .registry import Algorithm, Triple

__all__ = ["Enumeration"]

MAX_SEQUENCES = 10**9  # beyond this many, the loop itself (Python-driven chunks) is the obstacle


def _sequences(measure: Tokens) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(one-hot inputs, probabilities) of every sequence of nonzero
    probability, in chunks of at most CHUNK."""
    p = measure.token_probs()
    support = [np.flatnonzero(row) for row in p]
    sizes = [len(s) for s in support]
    total = math.prod(sizes)
    V = measure.vocab
    for start in range(0, total, CHUNK):
        flat = np.arange(start, min(start + CHUNK, total))
        idx = np.unravel_index(flat, sizes)
        x = np.zeros((len(flat), measure.width))
        w = np.ones(len(flat))
        for k, (s, i) in enumerate(zip(support, idx)):
            tokens = s[i]
            x[np.arange(len(flat)), k * V + tokens] = 1.0
            w *= p[k, tokens]
        yield x, w


class Enumeration(Algorithm):
    name = "enumeration"
    title = "enumeration of every token sequence"
    inners = ("tokens",)
    measures = (Tokens,)

    def check(self, problem: InnerProblem) -> str | None:
        if problem.exact_numbers:
            return "it computes float inner products only"
        if not problem.orbits:
            return "orbits=False asks for the plain sum over pairings"
        return None

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        measure: Tokens = problem.measure  # type: ignore[assignment]
        # the magnitude first, in log space: the exact count at a long context is a
        # huge integer that took minutes to form, only to be compared with 1e9
        digits = measure.log10_sequences
        if digits > math.log10(MAX_SEQUENCES) + 1e-9:
            raise CostError(f"enumeration would visit {format_power(digits)} token sequences (more than "
                            f"{format_count(MAX_SEQUENCES)})")
        count = measure.sequences
        if count > MAX_SEQUENCES:
            raise CostError(f"enumeration would visit {count:,} token sequences (more than "
                            f"{format_count(MAX_SEQUENCES)})")
        fa, fb = Forward(problem.a), Forward(problem.b)
        flops = node_flops(fa, fb, count, limit)
        if flops > limit:
            raise CostError(f"enumeration of {count:,} token sequences would cost {format_count(flops)} flops",
                            flops=flops)
        width, out = problem.widths
        # the chunk's token indices (one array per position) beside its one-hot rows
        peak = node_peak_bytes(fa, fb, min(count, CHUNK), width, out, measure.width // measure.vocab)
        return Plan(self.name, problem, flops, peak, count,
                    facts={"sequences": count, "nodes": count}, notes=(f"exact over all {count:,} token sequences",))

    def run(self, plan: Plan) -> Triple:
        p = plan.problem
        summed = node_sum(Forward(p.a), Forward(p.b), self.nodes(p), p.centered, p.per_output, p.a is p.b)
        return summed.result(plan), None, None

    def nodes(self, problem: InnerProblem) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return _sequences(problem.measure)  # type: ignore[arg-type]
