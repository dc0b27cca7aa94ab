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

__all__ = ["GramRecursion", "gram_peak_bytes", "network_gram"]

UNDERFLOW = 1e-280  # a Gram below this has lost its digits to float64's range (squared at the next layer)


def network_gram(a: Component, b: Component, exact: bool = False) -> np.ndarray:
    """The final cross Gram matrix (out+1, out+1) of the network inner product;
    ``exact``: in the weights' own numbers (Fractions, sympy), as an object array."""
    ba, wa = fold(a, exact)
    bb, wb = fold(b, exact)
    if not ba:
        return wa @ wb.T  # type: ignore[operator]
    G: np.ndarray | None = None  # the identity, never formed: (width + 1)^2 for the input alone
    half = Fraction(1, 2) if exact else 0.5
    for depth, ((La, Ra, Da), (Lb, Rb, Db)) in enumerate(zip(ba, bb), start=1):
        LaG, RaG = (La, Ra) if G is None else (La @ G, Ra @ G)
        # Da core Db' by blocks of core's rows: the four h_a x h_b products P G Q' and their sums are
        # never whole (with their temporaries 4.3 of them at once: 2.3 GB at hidden 8192); the
        # arithmetic unchanged (left to right, as gram_flops counts)
        DaC = None
        for x in _row_blocks(La.shape[0], Lb.shape[0]):
            core = half * ((LaG[x] @ Lb.T) * (RaG[x] @ Rb.T) + (LaG[x] @ Rb.T) * (RaG[x] @ Lb.T))
            part = Da[:, x] @ core
            DaC = part if DaC is None else DaC + part
        if exact:  # no range to leave
            G = DaC @ Db.T
            continue
        before = 1.0 if G is None else np.max(np.abs(G[1:, 1:]))
        G = DaC @ Db.T
        after = np.max(np.abs(G[1:, 1:]))
        if before > 0 and 0 < after < UNDERFLOW:  # (an exact 0 may be orthogonality: not flagged)
            # the recursion squares its Gram at every layer: a deep stack's falls below float64
            raise FloatingPointError(
                f"the network inner product underflows float64 at layer {depth} (its Gram reached "
                f"{after:.3g}); similarity_matrix([a, b], inner='network') computes the cosine with Grams "
                "normalised per layer")
    return G


# At most this many elements in one block of rows of the h_a x h_b products
# (16 MB): one block up to about 1448 x 1448 (the small cases run as before),
# blocks of equal rows beyond, hundreds of rows, so that the products stay
# BLAS-sized (at hidden 2048 on one BLAS thread as fast as whole products).
_ROWS_ELEMENTS = 2**21
_BLOCK_TEMPS = 6  # blocks live at once forming one of core (products, Hadamard products, sums): 4.5 measured
# (tracemalloc, 3 blocks of 683 rows at hidden 2048)


def _rows(ha: int, hb: int) -> int:
    blocks = -(-ha * hb // _ROWS_ELEMENTS)
    return -(-ha // blocks)


def _row_blocks(ha: int, hb: int) -> list[slice]:
    rows = _rows(ha, hb)
    return [slice(s, min(ha, s + rows)) for s in range(0, ha, rows)]


def gram_flops(a: Component, b: Component) -> int:
    """Flops of :func:`network_gram`, from the layers' shapes."""
    (ba, wa), (bb, wb) = folded_shapes(a), folded_shapes(b)
    if not ba:
        return chain_flops(wa, wb[::-1])  # type: ignore[index]
    G, flops = None, 0  # the input's identity is not multiplied
    for (La, _, Da), (Lb, _, Db) in zip(ba, bb):
        core = (La[0], Lb[0])
        if G is None:
            flops += 4 * chain_flops(La, Lb[::-1])
        else:  # La G and Ra G once, then four products with Lb', Rb'
            flops += 2 * chain_flops(La, G) + 4 * chain_flops((La[0], G[1]), Lb[::-1])
        flops += 3 * core[0] * core[1] + chain_flops(Da, core, Db[::-1])
        G = (Da[0], Db[0])
    return flops


def gram_peak_bytes(a: Component, b: Component) -> float:
    """Bytes :func:`network_gram` holds at its peak, from the layers' shapes:
    the folded blocks of both models throughout, beside the largest layer's
    G, La G and Ra G, one block of rows of the products with its
    temporaries, Da core and the next G (fold's copies of one layer while
    it folds, where larger)."""
    (ba, wa), (bb, wb) = folded_shapes(a), folded_shapes(b)
    held = sum(x[0] * x[1] for blocks in (ba, bb) for blk in blocks for x in blk)
    if not ba:
        return 8.0 * (wa[0] * wa[1] + wb[0] * wb[1] + wa[0] * wb[0])  # type: ignore[index]
    folding = 2 * max(sum(x[0] * x[1] for x in blk) for blk in ba + bb)
    G, step = None, 0
    for (La, _, Da), (Lb, _, Db) in zip(ba, bb):
        ha, hb, oa, ob = La[0], Lb[0], Da[0], Db[0]
        g = 0 if G is None else G[0] * G[1]
        step = max(step, g + 2 * ha * Lb[1] + _BLOCK_TEMPS * _rows(ha, hb) * hb + 2 * oa * hb + oa * ob)
        G = (oa, ob)
    return 8.0 * (held + max(folding, step))


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
        ba, _ = folded_shapes(problem.a)
        return Plan(self.name, problem, float(flops), gram_peak_bytes(problem.a, problem.b), max(len(ba), 1))

    def run(self, plan: Plan) -> Triple:
        p = plan.problem
        diag = np.diag(network_gram(p.a, p.b, exact=p.exact_numbers))[1:]
        total = sum(diag[1:], diag[0]) if p.exact_numbers else float(diag.sum())  # exact weights: an exact value
        return plan.result(diag if p.per_output else total), None, None
