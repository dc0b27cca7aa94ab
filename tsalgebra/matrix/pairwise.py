"""Route "pairwise": each norm once with :func:`tsalgebra.inner`, then each
pair with it, behind a progress bar.

The fallback for anything the batched routes do not cover (deeper models
under the gaussian or symmetric product, Polynomial models, exact/symbolic
weights that do not convert to floats, ``method="closure"``, another
``degree``); it applies to every job.  It is not costed: ts.inner plans each
pair itself, so :func:`layout` reports 0 flops and no memory (unknown, not an
estimate), and ``route="auto"`` takes it only where no costed route applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..inner import inner, similarity
from ..progress import progress_bar
from ..rescale import canonical
from .job import Gram, Job
from .ops import Clock
from .results import RouteCost

NAME = "pairwise"
COSTED = False

# A progress bar is offered (progress=None: shown on a terminal) above this many inner products.
_LONG_PAIRS = 50

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
    return (f"HEAVY TAILS in {len(cells)} of {total} estimated cosines (the first: {first}): one sample carries too "
            "large a share of a product's spread, so their standard errors are likely underestimated (more samples, "
            "or an exact or closure value, to check)",)


def applies(job: Job) -> str | None:
    """Every job: ts.inner computes whatever the similarity matrix may be asked."""
    return None


def layout(job: Job) -> RouteCost:
    """How many calls of ts.inner at most; flops 0 (unknown) and no memory bound."""
    n = len(job.rows)
    calls = n * (n + 1) // 2 if job.cols is None else n * len(job.cols) + n + len(job.cols)
    return RouteCost(NAME, 0, 0, True, f"ts.inner per model and per pair, at most {calls} calls (flops unknown)")


def run(job: Job, cost: RouteCost, clock: Clock) -> Gram:
    """Cosines with ts.inner: each norm once, then the pairs (the clock is
    not used: ts.inner's work is not split into steps).  Monte Carlo
    estimates take each pair's cosine from ts.similarity, which estimates its
    three products from shared samples: the ratio of separately sampled
    estimates is another, noisier number, which can exceed 1."""
    A, logA = _canonical(job.rows)  # ts.inner of the canonical models: never under- or overflows
    sym = job.cols is None
    Bs, logB = (A, logA) if sym else _canonical(job.cols)
    options = dict(job.options)  # the symmetric product's degree is the whole set's (api._compute)
    joint = job.method == "sampled"
    n_pairs = len(A) * (len(A) - 1) // 2 if sym else len(A) * len(Bs)
    n_self = len(A) + (0 if sym else len(Bs)) if sym or job.selfs else 0
    bar = progress_bar(n_pairs + n_self, f"similarity matrix (pairwise {job.inner})", "inner", job.progress,
                       n_pairs + n_self > _LONG_PAIRS)
    results = []

    def ip(a: Any, b: Any, how: Any = inner) -> float:
        r = how(a, b, job.inner, job.method, measure=job.measure, centered=job.centered, progress=False,  # the matrix's bar
                **options)
        results.append(r)
        bar.update(1)
        return _as_float(r.value)

    try:
        if sym or job.selfs:
            sA = np.array([ip(m, m) for m in A])
            sB = sA if sym else np.array([ip(m, m) for m in Bs])
        else:  # a tile whose norms come from other tiles
            sA, sB = np.full(len(A), np.nan), np.full(len(Bs), np.nan)
        K = np.zeros((len(A), len(Bs)))
        se = np.zeros_like(K) if joint else None  # the estimated cosines' standard errors
        heavy = np.zeros(K.shape, dtype=bool) if joint else None  # and which are heavy-tailed (doubtful errors)
        for i, a in enumerate(A):
            for j, b in enumerate(Bs):
                if sym and j <= i:
                    continue
                if joint:
                    K[i, j] = ip(a, b, similarity)
                    se[i, j] = float(results[-1].stderr)  # type: ignore[index, arg-type]
                    est = results[-1].estimate  # ts.similarity's heavy-tail flag, kept per cosine
                    heavy[i, j] = est is not None and est.heavy_tailed  # type: ignore[index]
                else:
                    K[i, j] = sA[i] if a is b and np.isfinite(sA[i]) else ip(a, b)
                if sym:
                    K[j, i] = K[i, j]
                    if se is not None:
                        se[j, i] = se[i, j]
                        heavy[j, i] = heavy[i, j]  # type: ignore[index]
        if sym:
            K[np.diag_indices(len(A))] = 1.0 if joint else sA
    finally:
        bar.close()
    exact = all(r.exact for r in results)
    methods = sorted({r.method for r in results}) or ["exact"]
    return Gram(K, sA, sB, logA, logB, sum(r.flops for r in results), (), "float64", "numpy", exact,
                "/".join(methods), cosines=joint, stderr=se, heavy=heavy)


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

        return float(sympy.N(v))
