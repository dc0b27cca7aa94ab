"""The network inner product by the Gram recursion.

Propagate the cross Gram matrix between the two folded chains, symmetrizing
each bilinear node locally:

    G_0 = I,   G_{l+1} = Da [1/2 ((La G Lb^T) * (Ra G Rb^T) + (La G Rb^T) * (Ra G Lb^T))] Db^T,

<a, b>_N = the diagonal of the last G over the output channels >= 1.  Exact
for its own definition, O(depth h^2 d).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..components import Component
from ..folding import chain_flops, fold, folded_shapes
from ..problem import CostError, InnerProblem, Plan, format_count
from .registry import Algorithm, Triple

__all__ = ["GramRecursion", "network_gram"]

UNDERFLOW = 1e-280  # a Gram below this has lost its digits to float64's range (squared at the next layer)


def network_gram(a: Component, b: Component, exact: bool = False) -> np.ndarray:
    """The final cross Gram matrix (out+1, out+1) of the network inner product;
    ``exact``: in the weights' own numbers (Fractions, sympy), as an object array."""
    ba, wa = fold(a, exact)
    bb, wb = fold(b, exact)
    if not ba:
        return wa @ wb.T  # type: ignore[operator]
    G: np.ndarray | None = None  # the identity, never formed: (width + 1)^2 for the input alone

    def through(P: np.ndarray, Q: np.ndarray) -> np.ndarray:  # P G Q^T
        return P @ Q.T if G is None else P @ G @ Q.T

    half = Fraction(1, 2) if exact else 0.5
    for depth, ((La, Ra, Da), (Lb, Rb, Db)) in enumerate(zip(ba, bb), start=1):
        core = half * (through(La, Lb) * through(Ra, Rb) + through(La, Rb) * through(Ra, Lb))
        if exact:  # no range to leave
            G = Da @ core @ Db.T
            continue
        before = 1.0 if G is None else np.max(np.abs(G[1:, 1:]))
        G = Da @ core @ Db.T
        after = np.max(np.abs(G[1:, 1:]))
        if before > 0 and 0 < after < UNDERFLOW:  # (an exact 0 may be orthogonality: not flagged)
            # the recursion squares its Gram at every layer: a deep stack's falls below float64
            raise FloatingPointError(
                f"the network inner product underflows float64 at layer {depth} (its Gram reached "
                f"{after:.3g}); similarity_matrix([a, b], inner='network') computes the cosine with Grams "
                "normalised per layer")
    return G


def gram_flops(a: Component, b: Component) -> int:
    """Flops of :func:`network_gram`, from the layers' shapes."""
    (ba, wa), (bb, wb) = folded_shapes(a), folded_shapes(b)
    if not ba:
        return chain_flops(wa, wb[::-1])  # type: ignore[index]
    G, flops = None, 0  # the input's identity is not multiplied
    for (La, _, Da), (Lb, _, Db) in zip(ba, bb):
        core = (La[0], Lb[0])
        flops += 4 * (chain_flops(La, Lb[::-1]) if G is None else chain_flops(La, G, Lb[::-1]))
        flops += 3 * core[0] * core[1] + chain_flops(Da, core, Db[::-1])
        G = (Da[0], Db[0])
    return flops


class GramRecursion(Algorithm):
    name = "gram"
    title = "Gram recursion"
    inners = ("network",)

    def check(self, problem: InnerProblem) -> str | None:
        if not problem.components:
            return "the network inner product needs layered models (Linear/Bilinear/Sequential)"
        try:
            (ba, _), (bb, _) = folded_shapes(problem.a), folded_shapes(problem.b)
        except TypeError as exc:
            return str(exc)
        if len(ba) != len(bb):
            return (f"the network inner product needs the same layer structure: {problem.a!r} has {len(ba)} "
                    f"bilinear layers and {problem.b!r} has {len(bb)} (Linear layers fold into their neighbours)")
        return None

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        flops = gram_flops(problem.a, problem.b)
        if flops > limit:
            raise CostError(f"the Gram recursion would cost {format_count(flops)} flops", flops=flops)
        (ba, wa), (bb, wb) = folded_shapes(problem.a), folded_shapes(problem.b)
        widest = max([x[0] * x[1] for blocks in (ba, bb) for blk in blocks for x in blk] + [1])
        return Plan(self.name, problem, float(flops), 8.0 * 6 * widest, max(len(ba), 1))

    def run(self, plan: Plan) -> Triple:
        p = plan.problem
        diag = np.diag(network_gram(p.a, p.b, exact=p.exact_numbers))[1:]
        total = sum(diag[1:], diag[0]) if p.exact_numbers else float(diag.sum())  # exact weights: an exact value
        return plan.result(diag if p.per_output else total), None, None
