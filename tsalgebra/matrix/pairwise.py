"""Route "pairwise": each pair with :func:`tsalgebra.inner`, planned as
:func:`tsalgebra.similarity` plans that pair, and each norm once, behind a
progress bar (offered when the estimated time of all the products is long,
however few they are; each product's own bar, labelled with its pair,
offered as ts.similarity offers it).

The fallback for anything the batched routes do not cover (deeper models
under the gaussian or symmetric product, Polynomial models, exact weights
(their products taken as floats; symbolic weights, which have no float, are
refused before any route), ``method="closure"``, another ``degree``); it
applies to every job.  It is not costed: ts.inner plans each
pair itself, so :func:`layout` reports 0 flops and no memory (unknown, not an
estimate), and ``route="auto"`` takes it only where no costed route applies.
Each product is planned within the matrix's budget and the ``max_memory``
given (else ts.similarity's default bound, not the quarter the batched
routes' blocks get), as ts.similarity plans a pair: a pair refused there is
refused here, with its estimate and alternatives, and a pair granted there
is granted here.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

import numpy as np

from ..inner import _one_bound, _refusal_of, _similarity_plans, inner, joint_inner, similarity
from ..problem import CostError, MemoryBoundError, Plan
from ..progress import LONG_SECONDS, estimated_seconds, labelled, progress_bar
from ..rescale import canonical
from .job import Gram, Job
from .ops import Clock
from .results import RouteCost

NAME = "pairwise"
COSTED = False

# The seconds one call of ts.inner takes beyond its plan's work (arguments,
# canonical scales, planning from the cache): 210 calls on tiny bilinear
# models took 2.9 s exact (14 ms each; 0.6 s under closure), so this errs
# towards offering the bar (drawn only once the work has run half a second).
_CALL_SECONDS = 0.014

# What a matrix of jointly estimated cosines says of them (see run).
JOINT_NOTE = ("each cosine is ts.similarity's Monte Carlo estimate for its pair: <a,b>, <a,a> and <b,b> from the "
              "same samples; the norms are separate estimates")


def heavy_note(heavy: np.ndarray, symmetric: bool) -> tuple[str, ...]:
    """The note of a matrix whose estimated cosines include heavy-tailed ones
    (``heavy``: per entry, ts.similarity's flag for that pair), () if none."""
    cells = np.argwhere(np.triu(heavy, 1) if symmetric else heavy)
    if not len(cells):
        return ()
    i, j = (int(x) for x in cells[0])
    first = f"model {i} with model {j}" if symmetric else f"row model {i} with column model {j}"
    total = heavy.shape[0] * (heavy.shape[0] - 1) // 2 if symmetric else heavy.size
    return (f"HEAVY TAILS in {len(cells)} of {total} estimated cosines (the first: {first}): a product's sample "
            "variance is itself too uncertain (its kurtosis), so their standard errors are likely underestimated "
            "(more samples, or an exact or closure value, to check)",)


def applies(job: Job) -> str | None:
    """Every job: ts.inner computes whatever the similarity matrix may be asked."""
    return None


def layout(job: Job) -> RouteCost:
    """How many calls of ts.inner at most; flops 0 (unknown) and no memory bound."""
    n = len(job.rows)
    calls = n * (n + 1) // 2 if job.cols is None else n * len(job.cols) + n + len(job.cols)
    return RouteCost(NAME, 0, 0, True, f"ts.inner per model and per pair, at most {calls} calls (flops unknown)")


def run(job: Job, cost: RouteCost, clock: Clock) -> Gram:
    """Cosines with ts.inner (the clock is not used: ts.inner's work is not
    split into steps).  Each pair is planned as ts.similarity plans it
    (:func:`tsalgebra.inner.joint_inner`): an algorithm whose one
    computation yields <a,b>, <a,a> and <b,b> may spend three budgets, and
    its self products are the norms' (as in ts.similarity); a norm no pair
    gave is computed alone, as ts.similarity(m, m) would.  Monte Carlo
    estimates take each pair's cosine from ts.similarity, which estimates its
    three products from shared samples: the ratio of separately sampled
    estimates is another, noisier number, which can exceed 1."""
    A, logA = _canonical(job.rows)  # ts.inner of the canonical models: never under- or overflows
    sym = job.cols is None
    Bs, logB = (A, logA) if sym else _canonical(job.cols)
    # the symmetric product's degree is the whole set's (api._compute); the memory bound the one given
    # (the matrix's default, a quarter of the memory, is for the batched routes' blocks: a pair that
    # ts.similarity grants under its own default is granted here)
    options = dict(job.options, max_memory=job.pair_memory)
    joint = job.method == "sampled"
    n_pairs = len(A) * (len(A) - 1) // 2 if sym else len(A) * len(Bs)
    n_self = len(A) + (0 if sym else len(Bs)) if sym or job.selfs else 0
    # the estimate plans a pair (the calls then find its plans cached): only where a bar could show
    long = job.progress is None and _terminal() and seconds_of(job, A[0], Bs[-1], n_pairs, n_self) >= LONG_SECONDS
    bar = progress_bar(n_pairs + n_self, f"similarity matrix (pairwise {job.inner})", "inner", job.progress, long)
    # each product's own bar as ts.similarity offers it (a few long products: the matrix's bar hardly moves)
    each = False if job.progress is False else None
    results = []
    selfs: dict[int, float] = {}  # id of a canonical model -> its self product, computed once
    index = {id(m): k for k, m in enumerate(A)}
    index_b = index if sym else {id(m): k for k, m in enumerate(Bs)}

    def name(a: Any, b: Any) -> str:
        """The product's label on its bar: the models' indices (<2,5>; a
        cross matrix's <row 2,column 5>, a norm's <column 5,column 5>)."""
        if sym:
            return f"<{index[id(a)]},{index[id(b)]}>"
        first = f"row {index[id(a)]}" if id(a) in index else f"column {index_b[id(a)]}"
        return f"<{first},{first if a is b else f'column {index_b[id(b)]}'}>"

    def call(a: Any, b: Any, how: Any) -> Any:
        with labelled(name(a, b)):
            out = how(a, b, job.inner, job.method, measure=job.measure, centered=job.centered,
                      progress=each, **options)
        results.append(out[0] if isinstance(out, tuple) else out)
        bar.update(1)
        return out

    # a model's self product: the algorithm that gave it, and those the automatic choice passed over
    answered: dict[int, tuple[str, tuple[str, ...]]] = {}

    def self_of(m: Any) -> float:
        if id(m) not in selfs:
            r = call(m, m, inner)
            selfs[id(m)], answered[id(m)] = _as_float(r.value), (r.algorithm, r.passed_over)
        return selfs[id(m)]

    def ip(a: Any, b: Any) -> float:
        if a is b:
            return self_of(a)
        if job.centered and (sym or job.selfs):  # the norms first: an algorithm their rounding passed over
            self_of(a), self_of(b)
        ab, aa, bb = call(a, b, joint_inner)
        for m, r in ((a, aa), (b, bb)):  # a joint plan's self products: the norms ts.similarity takes
            if r is not None and (sym or job.selfs) and id(m) not in selfs:
                selfs[id(m)] = _as_float(r.value)
                bar.update(1)
        instead = [answered[id(m)][0] for m in (a, b) if ab.algorithm in answered.get(id(m), ("", ()))[1]]
        if instead and options.get("algorithm") is None:  # the cross product shares the rounding that lost a norm
            ab = call(a, b, partial(joint_inner, algorithm=instead[0]))[0]
        return _as_float(ab.value)

    try:
        K = np.zeros((len(A), len(Bs)))
        se = np.zeros_like(K) if joint else None  # the estimated cosines' standard errors
        heavy = np.zeros(K.shape, dtype=bool) if joint else None  # and which are heavy-tailed (doubtful errors)
        for i, a in enumerate(A):
            for j, b in enumerate(Bs):
                if sym and j <= i:
                    continue
                if joint:
                    r = call(a, b, similarity)
                    K[i, j] = _as_float(r.value)
                    se[i, j] = float(r.stderr)  # type: ignore[index, arg-type]
                    heavy[i, j] = r.estimate is not None and r.estimate.heavy_tailed  # type: ignore[index]
                else:
                    K[i, j] = ip(a, b)
                if sym:
                    K[j, i] = K[i, j]
                    if se is not None:
                        se[j, i] = se[i, j]
                        heavy[j, i] = heavy[i, j]  # type: ignore[index]
        if sym or job.selfs:  # the norms the pairs did not give
            sA = np.array([self_of(m) for m in A])
            sB = sA if sym else np.array([self_of(m) for m in Bs])
        else:  # a tile whose norms come from other tiles
            sA, sB = np.full(len(A), np.nan), np.full(len(Bs), np.nan)
        if sym:
            K[np.diag_indices(len(A))] = 1.0 if joint else sA
    except CostError as first:  # the budget it suggests must admit every product, not the first refused
        raise _every_refusal(job, A, Bs, options, first) from None
    except FloatingPointError as e:  # ts.inner's advice names this very call: the batched route is the way here
        said = str(e).split("; similarity_matrix(")[0]
        if said == str(e) or job.inner != "network":
            raise
        raise FloatingPointError(f"{said}; route='pairwise-gram' (or 'auto') computes the cosines with Grams "
                                 "normalised per layer") from None
    finally:
        bar.close()
    exact = all(r.exact for r in results)
    methods = sorted({r.method for r in results}) or ["exact"]
    return Gram(K, sA, sB, logA, logB, sum(r.flops for r in results), (), "float64", "numpy", exact,
                "/".join(methods), cosines=joint, stderr=se, heavy=heavy,
                algorithms=tuple(sorted({r.algorithm for r in results})))


# A refusal plans the matrix's other products too (at most this many pairs,
# each as ts.similarity plans it), so that its budget admits them all: a
# matrix of a bilinear layer and a stack suggested the pair's 1.6e5 flops,
# which its second norm (5.3e5) refused again.
_REFUSAL_PAIRS = 200


def _every_refusal(job: Job, A: list[Any], Bs: list[Any], options: dict[str, Any], first: CostError) -> CostError:
    """One refusal for the matrix's products refused (pairs and norms, by
    the models' numbers, which the command line says as its files), merged
    as ts.similarity merges a pair's: each bound the largest asked."""
    sym = job.cols is None
    pairs = [(i, j) for i in range(len(A)) for j in range(len(Bs)) if not sym or j > i] or [(0, 0)]
    names = (lambda i: f"model {i}", lambda j: f"model {j}") if sym else \
        (lambda i: f"row model {i}", lambda j: f"column model {j}")
    refused: dict[str, CostError] = {}
    for i, j in pairs[:_REFUSAL_PAIRS]:
        labels = {"<a,b>": f"{names[0](i)} with {names[1](j)}", "<a,a>": f"the norm of {names[0](i)}",
                  "<b,b>": f"the norm of {names[1](j)}"}
        try:
            products = _similarity_plans(A[i], Bs[j], job.inner, job.method, None, None, job.measure,
                                         dict(options, centered=job.centered))
        except (CostError, ValueError, TypeError):
            continue
        for label, p in products:
            if isinstance(p, CostError):
                refused.setdefault(labels[label], p)
    if not refused:
        return first
    items = list(refused.items())
    # said: the first refused and those that set the bounds (the most flops, the most bytes); the rest counted
    worst = {items[0][0]} | {max(items, key=lambda kv: kv[1].flops)[0]}
    needs = [kv for kv in items if isinstance(kv[1], MemoryBoundError)]
    worst |= {max(needs, key=lambda kv: kv[1].needed)[0]} if needs else set()
    said = [kv for kv in items if kv[0] in worst]
    rest = len(items) - len(said) + (0 if len(pairs) <= _REFUSAL_PAIRS else len(pairs) - _REFUSAL_PAIRS)
    if rest:
        more = f"{rest} more product{'s' if rest > 1 else ''} refused" if len(pairs) <= _REFUSAL_PAIRS else \
            f"the others of the first {_REFUSAL_PAIRS} pairs planned"
        said[-1] = (f"{said[-1][0]} (and {more})", said[-1][1])
    return _refusal_of(said)


def seconds_of(job: Job, a: Any, b: Any, n_pairs: int, n_self: int) -> float:
    """The estimated seconds of the route's products (:mod:`tsalgebra.progress`'s
    rates): the pair ``a``, ``b`` planned as ts.similarity plans it stands for
    every pair (the models of a matrix share their architecture), its
    self-products for the norms (none beyond the pairs' where its plan is
    joint), each call with _CALL_SECONDS more.  A pair refused or not
    planned: the calls' own time only (the run then says why)."""
    options = _one_bound(dict(job.options, max_memory=job.pair_memory, centered=job.centered))
    try:
        products = _similarity_plans(a, b, job.inner, job.method, None, None, job.measure, options)
    except (CostError, ValueError, TypeError):
        products = []
    plans = [p for _, p in products if isinstance(p, Plan)]
    if not plans or len(plans) < len(products):
        return (n_pairs + n_self) * _CALL_SECONDS
    secs = [estimated_seconds(p.flops, p.algorithm) + _CALL_SECONDS for p in plans]
    if plans[0].joint and job.method != "sampled" and n_pairs:  # the pairs give the norms
        return n_pairs * secs[0]
    # a self-product's plan (a model with itself: one plan), else each norm counted as a pair
    # (Monte Carlo samples each norm on its own: this errs long)
    own = sum(secs[1:]) / len(secs[1:]) if len(secs) > 1 else secs[0]
    return n_pairs * secs[0] + n_self * own


def _terminal() -> bool:
    """Whether stderr is a terminal (where tqdm shows a bar left to decide)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _canonical(models: list[Any]) -> tuple[list[Any], np.ndarray]:
    """The models at their canonical scale and the logs of the scales taken
    out (the factors U of :class:`Gram`)."""
    pairs = [canonical(m) for m in models]
    return [m for m, _ in pairs], np.array([log for _, log in pairs], dtype=float)


def _as_float(v: Any) -> float:
    """A float from an inner product's value (a sympy number evaluated)."""
    try:
        return float(v)
    except TypeError:
        import sympy

        try:
            return float(sympy.N(v))
        except TypeError:  # symbolic weights are refused before any route (api._numbers_only): a backstop
            raise TypeError(f"an inner product of the matrix is symbolic ({str(v):.60}), not a number; use "
                            "ts.similarity per pair") from None
