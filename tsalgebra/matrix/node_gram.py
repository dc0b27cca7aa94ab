"""Route "node-gram": every model evaluated once on the nodes of an exact node sum.

Where the exact algorithm :func:`tsalgebra.inner` would choose for a pair is
a weighted sum over finitely many inputs (every token sequence under the
token measure; the Gauss-Hermite grid of a low-rank Gaussian), the inputs are
the same for every pair.  So each model is evaluated on them once, and the
matrix is one weighted Gram of the outputs, chunk by chunk:

    K[a, b] = sum_k w_k f_a(x_k) . f_b(x_k)     (minus the product of the weighted means when centred)

N forward passes and N^2 / 2 dot products of length (nodes x outputs) per
matrix, where the pairwise route runs N^2 forward passes.  Exact, like the
algorithm whose nodes it uses; the models are taken at their canonical scale
(:func:`tsalgebra.rescale.canonical`) so that no output overflows.
"""

from __future__ import annotations

import math

import numpy as np

from ..algorithms.registry import _named, choose
from ..problem import CENTRED_DIGITS, CostError, InnerProblem, MemoryBoundError, Plan, degree_of, format_count
from ..node_sums import CHUNK, CentredSums, Forward, rounded_variances
from ..progress import is_long, progress_bar
from .job import Gram, Job
from .ops import Clock
from .pairwise import _canonical
from .results import RouteCost

NAME = "node-gram"
COSTED = True


def _problem(job: Job, memory: int | None = None) -> InnerProblem:
    """A pair standing for every product the route computes, within the
    matrix's memory bound (``job.memory``, as the pairwise route plans each
    pair; the product default, half the memory, would choose the algorithm
    under another bound) unless ``memory`` says.

    The route sums every cross product *and* every self product (the norms
    of the rows and of the columns) over the stand-in's nodes, so its nodes
    must integrate products of degree up to 2 D exactly, D the highest
    degree of any model on either side: quadrature's grid for a pair is
    exact for the sum of the pair's degrees only, so the stand-in is two
    models of degree D (the highest-degree row model and the highest-degree
    column model where their degrees agree, else the one of higher degree
    twice; of a symmetric matrix, its highest-degree model twice).  Its plan
    then counts the nodes the route runs on."""
    a = max(job.rows, key=degree_of)
    b = max(job.cols, key=degree_of) if job.cols is not None else a
    da, db = degree_of(a), degree_of(b)
    if da < db:  # every product (rows: 2 da, crosses: da + db, columns: 2 db) is exact on the grid of (b, b)
        a = b
    elif db < da:
        b = a
    return InnerProblem.of(a, b, job.inner, job.method, measure=job.measure, centered=job.centered,
                           **dict(job.options, max_memory=memory or job.memory))


def _stand_in(job: Job) -> tuple[Plan, bool]:
    """The stand-in pair's plan, whose algorithm's nodes the route takes,
    and whether it fits the matrix's memory bound.  Where every exact plan
    within the budget exceeds the bound, the smallest of them (the bound
    that admits it: the chooser's ``needed``), so that the route is costed,
    does not fit, and a route named is refused with the bytes it needs
    rather than said not to apply."""
    try:
        return choose(_problem(job)), True
    except MemoryBoundError as exc:
        return choose(_problem(job, max(job.memory, math.ceil(exc.needed)))), False


def applies(job: Job) -> str | None:
    if job.inner not in ("gaussian", "tokens") or job.method not in ("auto", "exact"):
        return "it computes the exact functional inner products only"
    if job.ops.is_torch:
        return "it computes with numpy"
    try:
        plan, _ = _stand_in(job)
    except (CostError, ValueError, TypeError) as exc:
        return f"no exact algorithm plans a pair ({exc})"
    if _named(plan.algorithm).nodes(plan.problem) is None:
        return f"the exact algorithm for a pair ({plan.algorithm}) is not a sum over nodes"
    return None


def layout(job: Job) -> RouteCost:
    """One chunk of nodes at a time: every model's outputs on it held at once."""
    plan, within = _stand_in(job)
    points = int(plan.facts["nodes"])
    models = job.rows + (job.cols or [])
    _, out = plan.problem.widths
    out -= 1  # the constant channel is dropped
    chunk = min(points, CHUNK)
    forward = sum(Forward(m).flops(chunk) for m in models) * (points / chunk)
    n, m = len(job.rows), len(job.cols) if job.cols is not None else 0
    pairs = n * (n + 1) // 2 if job.cols is None else n * m + n + m
    flops = int(forward + 2.0 * pairs * points * out)
    # a chunk of nodes (with a quadrature grid's rows); every model's outputs on it: the list of them and
    # its stacked copy, then the weighted and (centred) shifted copies; beside them the forward pass of
    # the model being evaluated (its hidden activations: 370 MB at hidden 32768, where the outputs were
    # 2.7) and every model's padded weights, held by its evaluator through the run
    width, rank = plan.problem.widths[0], int(plan.facts.get("rank", 0))
    forwards = [Forward(m) for m in models]
    evaluating = max(f.activation_elements(chunk) for f in forwards) + sum(f.held_elements() for f in forwards)
    peak = int(8 * (chunk * (2 * width + 3 * rank) + 4 * len(models) * chunk * out + evaluating))
    blocking = f"{len(models)} models on {points:,} nodes ({plan.algorithm}) in chunks of {chunk}"
    if not within:  # the bound refuses the algorithm itself: no fit, and the bytes needed are at least its plan's
        peak = max(peak, math.ceil(plan.peak_bytes))
        blocking += f" (a pair's own plan needs {format_count(plan.peak_bytes)} bytes, over the memory bound)"
    return RouteCost(NAME, flops, peak, within and peak <= job.memory, blocking, layout=plan)


def run(job: Job, cost: RouteCost, clock: Clock) -> Gram:
    plan = cost.layout
    A, logA = _canonical(job.rows)
    sym = job.cols is None
    Bs, logB = (A, logA) if sym else _canonical(job.cols)
    fa = [Forward(m) for m in A]
    fb = fa if sym else [Forward(m) for m in Bs]
    points = int(plan.facts["nodes"])
    bar = progress_bar(points, f"similarity matrix (node-gram, {plan.algorithm})", "node", job.progress,
                       is_long(cost.flops, plan.algorithm))
    # at the rate of the algorithm whose nodes it sums: ten attention LMs on every sequence of 5 tokens at n 6,
    # 1.78e9 flops, took 15 s here (1.2e8 flop/s; enumeration's rate 9.7e7), and no bar showed over 1e10 flops
    K = np.zeros((len(A), len(Bs)))
    sA, sB = np.zeros(len(A)), np.zeros(len(Bs))
    # centred: the cross and self co-moments about the running means, chunk by chunk (CentredSums)
    # (the self co-moments per output: their rounding is judged per output, as node_sum's)
    cross, own_a, own_b = (CentredSums(p) for p in (lambda a, b: a @ b.T, np.multiply, np.multiply))
    origin = None
    clock.start()
    try:
        for x, w in _named(plan.algorithm).nodes(plan.problem):
            FA = np.stack([f(x) for f in fa])  # (models, nodes, outputs)
            FB = FA if sym else np.stack([f(x) for f in fb])
            clock.lap("evaluate", sum(f.flops(len(x)) for f in (fa if sym else fa + fb)))
            if job.centered:  # each chunk about its own weighted means (as node_sum)
                weight = w.sum()
                if weight == 0:
                    continue
                if origin is None:  # the first chunk's means, taken out of every output
                    origin = (np.einsum("n,mno->mo", w, FA) / weight, None if sym else np.einsum("n,mno->mo", w, FB) / weight)
                FA = FA - origin[0][:, None, :]
                FB = FA if sym else FB - origin[1][:, None, :]
                mA = np.einsum("n,mno->mo", w, FA) / weight
                mB = mA if sym else np.einsum("n,mno->mo", w, FB) / weight
                FA = FA - mA[:, None, :]
                FB = FA if sym else FB - mB[:, None, :]
            WA = FA * w[None, :, None]
            Kc = WA.reshape(len(A), -1) @ FB.reshape(len(Bs), -1).T
            sAc = np.einsum("mno,mno->mo" if job.centered else "mno,mno->m", WA, FA)
            sBc = sAc if sym else np.einsum("mno,mno->mo" if job.centered else "mno,mno->m", FB * w[None, :, None], FB)
            if job.centered:
                cross.add(weight, mA, mB, Kc)
                own_a.add(weight, mA, mA, sAc)
                own_b.add(weight, mB, mB, sBc)
            else:
                K, sA, sB = K + Kc, sA + sAc, sB + sBc
            clock.lap("gram", 2 * len(A) * len(Bs) * FA.shape[1] * FA.shape[2])
            bar.update(len(x))
    finally:
        bar.close()
    exact = True
    if job.centered:
        K, sA, sB = cross.total, own_a.total, own_b.total
        if origin is not None:  # each variance judged as node_sum judges it
            sA, exact = _judged(sA, origin[0] + own_a.mean_f)
            if not sym:
                sB, exact_b = _judged(sB, origin[1] + own_b.mean_f)
                exact = exact and exact_b
            else:
                sB = sA
    if sym:
        K = (K + K.T) / 2
        K[np.diag_indices(len(A))] = sA
    return Gram(K, sA, sB, logA, logB, cost.flops, clock.steps(), "float64", "numpy", exact, "exact")


def _judged(variances: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, bool]:
    """Each model's variance summed over its outputs (models, outputs) ->
    (models,), 0 within the float64 rounding of its outputs' means (a model
    constant on every token sequence gave 7.8e-33 and cosines of 1e-17), and
    whether all are exact: none taken as 0 from a rounding, and each keeping
    CENTRED_DIGITS digits of its rounding (node_sums.rounded_variances)."""
    kept, rounding, zeroed = rounded_variances(variances, means, per_output=False)
    total, rounding = kept.sum(-1), rounding.sum(-1)
    return total, not zeroed.any() and bool(np.all(total >= 10.0**CENTRED_DIGITS * rounding))
