"""Gaussian closure (the reference's multi-layer method): approximate.

Propagate the joint mean and second moment of the two models' padded
features layer by layer, taking each bilinear layer's fourth moments as if
its input were Gaussian with the propagated moments.  Exact through the first
nonlinear layer, approximate beyond, where the error can be large (see
docs/inner-products.md).  Models with attention are closed after an exact
head: the joint moments up to and including their first attention layer come
from the attention-moments algorithm when it applies, else from pairing
orbits with both output legs open; only the bilinear layers after it are
closed.  One joint computation yields <a, b>, <a, a> and <b, b>.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..attention import BilinearAttention
from ..components import Bilinear, Component, Linear, PositionWise, Sequential
from ..folding import Block, chain_flops, fold, folded_shapes
from ..measure import Gaussian
from ..pairing_sum import OUTER, Joins, PairingPlan, plan_pairings, run_pairings
from ..problem import CostError, InnerProblem, InnerResult, Plan, format_count
from .hermite import HermiteMoments, attention_moments, moments_cost
from .moments import attention_rank, output_moment
from .registry import Algorithm, Triple

__all__ = ["GaussianClosure", "closure_steps"]


def _linear_block(W: np.ndarray) -> Block:
    """A padded linear map W~ as a bilinear block computing (W~ z) * 1."""
    R = np.zeros(W.shape)
    R[:, 0] = 1.0
    return W, R, np.eye(W.shape[0])


def _block_diag(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0] + y.shape[0], x.shape[1] + y.shape[1]))
    out[: x.shape[0], : x.shape[1]] = x
    out[x.shape[0] :, x.shape[1] :] = y
    return out


def _gaussian_state(measure: Gaussian) -> tuple[np.ndarray, np.ndarray]:
    """The joint (mean, second moment) of [x~; x~]: both models read one input."""
    mu0 = measure.padded_mean()
    M0 = measure.padded_cov() + np.outer(mu0, mu0)
    return np.concatenate([mu0, mu0]), np.block([[M0, M0], [M0, M0]])


def closure_steps(ba: list[Block], bb: list[Block], mu: np.ndarray, M: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Propagate a joint state (mean ``mu``, second moment ``M`` of the padded
    [u_a; u_b]) through two chains of bilinear blocks, taking each layer's
    fourth moments as if its input were Gaussian.  Returns (mu, M, steps)."""
    steps = max(len(ba), len(bb))
    for t in range(steps):
        # the shallower model waits at its output (an identity block)
        blk_a = ba[t] if t < len(ba) else _linear_block(np.eye(ba[-1][2].shape[0]))
        blk_b = bb[t] if t < len(bb) else _linear_block(np.eye(bb[-1][2].shape[0]))
        L, R, D = (_block_diag(x, y) for x, y in zip(blk_a, blk_b))
        LMR, LML, RMR = L @ M @ R.T, L @ M @ L.T, R @ M @ R.T
        lm, rm = L @ mu, R @ mu
        pair = np.diag(LMR)
        mean_prod = lm * rm
        Q = np.outer(pair, pair) + LML * RMR + LMR * LMR.T - 2 * np.outer(mean_prod, mean_prod)
        mu, M = D @ pair, D @ Q @ D.T
    return mu, M, steps


def _steps_flops(sa: list[tuple[tuple[int, int], ...]], sb: list[tuple[tuple[int, int], ...]], width: int) -> int:
    """Flops of :func:`closure_steps` from the blocks' shapes (state of ``width``)."""
    flops = 0
    for t in range(max(len(sa), len(sb))):
        wait = lambda s: ((s[-1][2][0],) * 2,) * 3  # noqa: E731 - an identity block at the output
        (La, _, Da), (Lb, _, Db) = (sa[t] if t < len(sa) else wait(sa)), (sb[t] if t < len(sb) else wait(sb))
        L, D = (La[0] + Lb[0], La[1] + Lb[1]), (Da[0] + Db[0], Da[1] + Db[1])
        flops += 3 * chain_flops(L, (width, width), L[::-1]) + 2 * chain_flops(L, (width, 1))
        flops += chain_flops(D, (L[0], L[0]), D[::-1]) + 8 * L[0] * L[0]
        width = D[0]
    return flops


def _split(model: Component) -> tuple[Component, Component | None]:
    """(head, tail): the head runs through the first attention layer (or the
    first bilinear layer when there is none); its moments are computed
    exactly, the tail's by closure."""
    layers = model.layers
    kinds = [isinstance(l, BilinearAttention) for l in layers]
    cut = kinds.index(True) if any(kinds) else next(
        (k for k, l in enumerate(layers) if l.degree > 1), len(layers) - 1)
    head = Sequential(*layers[: cut + 1])
    return head, (Sequential(*layers[cut + 1 :]) if cut + 1 < len(layers) else None)


def _chain_shapes(model: Component | None, width: int) -> list[Any]:
    """Shapes of the closed chain of a tail (an identity block when none)."""
    if model is None:
        return [((width, width), (width, width), (width, width))]
    blocks, linear = folded_shapes(model)
    return blocks or [(linear, linear, (linear[0], linear[0]))]  # type: ignore[list-item]


class GaussianClosure(Algorithm):
    name = "closure"
    title = "moment closure"
    method = "closure"
    measures = (Gaussian,)

    def check(self, problem: InnerProblem) -> str | None:
        if not problem.components:
            return "closure needs layered models (Linear/Bilinear/BilinearAttention/Sequential)"
        if problem.exact_numbers:
            return "closure computes with float weights only"
        for m in (problem.a, problem.b):
            odd = next((l for l in m.layers if not isinstance(l, (Linear, Bilinear, PositionWise, BilinearAttention))),
                       None)
            if odd is not None:
                return f"closure takes Linear, Bilinear and BilinearAttention layers, not {odd!r}"
            if sum(isinstance(l, BilinearAttention) for l in m.layers) > 1:
                return f"closure through a second attention layer is not implemented ({m!r})"
        return None

    def _head_problem(self, problem: InnerProblem) -> InnerProblem:
        (ha, _), (hb, _) = _split(problem.a), _split(problem.b)
        return problem.replace(a=ha, b=hb, method="exact", joint=True, algorithm=None)

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        a, b = problem.a, problem.b
        attention = any(isinstance(l, BilinearAttention) for m in (a, b) for l in m.layers)
        (ha, ta), (hb, tb) = _split(a), _split(b)
        head: Any = None
        flops = 0.0
        if not attention:  # a plain chain: closed from the input
            (sa, wa), (sb, wb) = folded_shapes(a), folded_shapes(b)
            chains = [sa or [(wa, wa, (wa[0], wa[0]))], sb or [(wb, wb, (wb[0], wb[0]))]]
            approx = max(max(len(sa), len(sb)) - 1, 0)
            width = 2 * (a.in_features + 1)
        else:
            hp = self._head_problem(problem)
            if HermiteMoments().check(hp, tail="any") is None:
                law = hp.measure.per_position(hp.a.layers[-1].n_ctx)  # type: ignore[union-attr]
                flops, head = float(moments_cost(ha, hb, attention_rank(hp), True)), ("moments", law)
            else:
                joins = Joins.gaussian(problem.measure, False)  # type: ignore[arg-type]
                Ha, Hb = ha.network(symmetric=True, data=False), hb.network(symmetric=True, data=False)
                same = ha.same_weights(hb)
                try:
                    plans = [plan_pairings(x, y, joins, OUTER if y is not None else None, limit, True, same)
                             for x, y in ((Ha, Ha), (Ha, Hb), (Hb, Hb), (Ha, None), (Hb, None))]
                except CostError as exc:
                    raise CostError(f"closure's exact head: {exc.reason}", flops=exc.flops) from None
                flops, head = float(sum(p.flops for p in plans)), ("pairings", plans)
            chains = [_chain_shapes(ta, ha.out_features + 1), _chain_shapes(tb, hb.out_features + 1)]
            approx = max(len(folded_shapes(t)[0]) if t is not None else 0 for t in (ta, tb))
            width = ha.out_features + hb.out_features + 2
        flops += _steps_flops(chains[0], chains[1], width)
        if flops > limit:
            raise CostError(f"closure would cost {format_count(flops)} flops", flops=flops)
        state = max(width, sum(c[-1][2][0] for c in chains))
        notes = (f"Gaussian closure over {approx} bilinear layer(s) after an exact first stage: approximate",
                 ) if approx else ()
        return Plan(self.name, problem, flops, 8.0 * 6 * state * state, max(len(chains[0]), len(chains[1])) + (
            0 if head is None else 1), exact=not approx, joint=True, facts={"approximate_layers": approx}, notes=notes,
                    payload=head)

    def run(self, plan: Plan) -> Triple:
        p = plan.problem
        a, b = p.a, p.b
        if plan.payload is None:
            ba, wa = fold(a)
            bb, wb = fold(b)
            mu, M = _gaussian_state(p.measure)  # type: ignore[arg-type]
            mu, M, _ = closure_steps(ba or [_linear_block(wa)], bb or [_linear_block(wb)], mu, M)
        else:
            mu, M = self._head_state(plan)
            chains = []
            for head, tail in (_split(a), _split(b)):
                blocks, linear = fold(tail) if tail is not None else ([], np.eye(head.out_features + 1))
                chains.append(blocks or [_linear_block(linear)])
            mu, M, _ = closure_steps(chains[0], chains[1], mu, M)
        oa = a.out_features + 1

        def result(x: slice, y: slice) -> InnerResult:
            return plan.result(output_moment(M[x, y], mu[x], mu[y], p.centered, p.per_output))

        A, B = slice(0, oa), slice(oa, None)
        return result(A, B), result(A, A), result(B, B)

    def _head_state(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """The exact joint (mean, second moment) of the two heads' outputs."""
        p = plan.problem
        (ha, _), (hb, _) = _split(p.a), _split(p.b)
        kind, detail = plan.payload
        if kind == "moments":
            hm = attention_moments(ha, hb, detail, joint=True)
            means, (M_aa, M_ab, M_bb) = [hm.mean_a, hm.mean_b], (hm.aa, hm.ab, hm.bb)
        else:
            joins = Joins.gaussian(p.measure, False)  # type: ignore[arg-type]
            Ha, Hb = ha.network(symmetric=True), hb.network(symmetric=True)
            plans: list[PairingPlan] = detail
            runs = [run_pairings(pp, x, y, joins, OUTER if y is not None else None)[0]
                    for pp, (x, y) in zip(plans, ((Ha, Ha), (Ha, Hb), (Hb, Hb), (Ha, None), (Hb, None)))]
            M_aa, M_ab, M_bb, mean_a, mean_b = runs
            means = [mean_a, mean_b]
        return np.concatenate(means), np.block([[M_aa, M_ab], [M_ab.T, M_bb]])
