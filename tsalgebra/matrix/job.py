"""The interface between the public API and the routes: the :class:`Job` a
route is given, the :class:`Gram` it gives back, and the :class:`Route`
protocol every route module follows (a new route is one more module with
these names, listed in ``tsalgebra.matrix.api.REGISTRY``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Protocol

import numpy as np

from ..measure import Measure
from .ops import Clock, Ops
from ..problem import CENTRED_DIGITS
from .prepare import Prepared, judged_selfs
from .results import RouteCost, StepTime


@dataclass(frozen=True)
class Job:
    """One similarity matrix to compute, its arguments checked.

    ``rows`` / ``cols`` are the models of the rows and the columns (``cols``
    None for a symmetric matrix: the rows are the columns); ``inner`` to
    ``options`` mean what they mean in :func:`tsalgebra.inner` (``options``:
    degree, budget, orbits), ``progress`` as in :func:`similarity_matrix`;
    ``measure`` is the measure bound to the models' input (None for the
    inner products without one).  ``prepared`` holds the models as chains for the
    batched routes (None where none covers them), ``ops`` the engine they
    compute with, ``memory`` the bound in bytes on their blocks
    (``max_memory``, else a quarter of the device's memory), ``pair_memory``
    the bound the pairwise route plans each product within (``max_memory``
    given; None: ts.similarity's own default, so that a pair it grants is
    granted here), ``threads`` the worker threads numpy may use.
    """

    rows: list[Any]
    cols: list[Any] | None
    inner: str
    method: str
    centered: bool
    options: Mapping[str, Any]
    progress: bool | None
    measure: Measure | None
    prepared: Prepared | None
    ops: Ops
    memory: int
    threads: int
    selfs: bool = True  # False: the self products are not needed (a tile whose norms come from another)
    unprepared: str | None = None  # why the models were not prepared for the batched routes (memory), if so
    pair_memory: int | None = None

    @property
    def symmetric(self) -> bool:
        return self.cols is None


@dataclass(frozen=True)
class Gram:
    """What a route computes, on the scale it computes it at.

    ``cross[a, b]`` is the inner product of row model a and column model b,
    ``row_self`` / ``col_self`` those of each model with itself (the same
    array for a symmetric matrix), each up to the factors U of
    ``row_log_scale`` / ``col_log_scale`` (log U per model: the true <a, b>
    is cross[a, b] U_a U_b; None where the values are unscaled).  ``flops``
    and ``steps`` are the work done and where the time went, ``dtype`` and
    ``device`` what it was computed in, ``exact`` and ``method`` as in
    :class:`tsalgebra.InnerResult`.

    ``cosines``: ``cross`` holds the cosines themselves (the self products
    and scales then give the norms only): where each pair's three products
    are estimated jointly from shared samples, as :func:`tsalgebra.similarity`
    does, a cross product divided by self products estimated from other
    samples is no such estimate and can exceed 1.  ``stderr``: the standard
    errors of those estimated cosines (None for exact or approximate values);
    ``heavy``: per cosine, whether its samples were heavy-tailed (its error
    doubtful, as :attr:`tsalgebra.algorithms.sampled.Estimate.heavy_tailed`).
    ``algorithms``: the registered algorithms (``algorithm=``'s vocabulary)
    that computed the products, () where a batched route computed them.
    ``digits``: the fewest digits that the route's rounding left of any
    self product it judged (0: one taken as 0), None where it judged none.
    """

    cross: np.ndarray
    row_self: np.ndarray
    col_self: np.ndarray
    row_log_scale: np.ndarray | None
    col_log_scale: np.ndarray | None
    flops: int
    steps: tuple[StepTime, ...]
    dtype: str
    device: str
    exact: bool = True
    method: str = "exact"
    cosines: bool = False
    stderr: np.ndarray | None = None
    heavy: np.ndarray | None = None
    algorithms: tuple[str, ...] = ()
    digits: float | None = None


def judged_gram(gram: Gram, rounding: np.ndarray | None, col_rounding: np.ndarray | None, symmetric: bool) -> Gram:
    """A route's Gram with both sides' self products judged at their
    rounding (:func:`.prepare.judged_selfs`; None: not judged): exact where
    every one kept CENTRED_DIGITS digits, none taken as 0 that was not.  A
    symmetric matrix's sides are one."""
    rows, digits = judged_selfs(gram.row_self, rounding)
    if symmetric:
        cols = rows
    else:
        cols, col_digits = judged_selfs(gram.col_self, col_rounding)
        digits = min(digits, col_digits)
    if math.isinf(digits):
        return gram
    return replace(gram, row_self=rows, col_self=cols, exact=gram.exact and digits >= CENTRED_DIGITS, digits=digits)


@dataclass(frozen=True)
class Tiling:
    """Where the tiles of a matrix run and are kept (the arguments of
    :func:`~tsalgebra.matrix.similarity_matrix`): a dask ``client``, a
    ``scheduler`` address, or ``workers`` for a local cluster; a ``store``
    directory; ``tile`` models a side (None: chosen from the workers)."""

    client: Any = None
    scheduler: str | None = None
    workers: int | None = None
    store: Any = None
    tile: int | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.client, self.scheduler, self.workers, self.store))


@dataclass(frozen=True)
class TileGram:
    """What one tile returns: its cross block and self products (NaN where
    the tile was not asked for them), the logs of the scale factors of its
    rows and columns (see :class:`Gram`; zeros where unscaled), the route
    that ran, its flops, exactness and method, the seconds it took,
    whether ``cross`` holds cosines, their standard errors and heavy-tail
    flags, the algorithms and device (see :class:`Gram`), the memory
    bound its blocks were laid out within (0 where not known: a tile
    stored by an older tsalgebra, as its device ""), and the notes on its
    route's choice (e.g. that it went pair by pair; none from an older
    tsalgebra's store)."""

    cross: np.ndarray
    row_self: np.ndarray
    col_self: np.ndarray
    row_log_scale: np.ndarray
    col_log_scale: np.ndarray
    route: str
    flops: int
    exact: bool
    method: str
    seconds: float
    cosines: bool = False
    stderr: np.ndarray | None = None
    heavy: np.ndarray | None = None
    algorithms: tuple[str, ...] = ()
    device: str = ""
    memory: int = 0
    notes: tuple[str, ...] = ()


class Route(Protocol):
    """A way to compute a job's Gram: a module with these names.

    ``NAME`` is its ``route=`` name.  ``COSTED``: whether :func:`layout`
    counts its flops and memory, which makes it a candidate of
    ``route="auto"`` (the routes that are not costed are the fallback, taken
    by auto only where no costed route applies).  :func:`applies` says why
    the route cannot compute the job (None when it can); :func:`layout` lays
    the job out within ``job.memory`` and says what that costs; :func:`run`
    computes it as laid out, timing its steps on ``clock`` (which holds the
    preparation's time already).
    """

    NAME: str
    COSTED: bool

    def applies(self, job: Job) -> str | None: ...

    def layout(self, job: Job) -> RouteCost: ...

    def run(self, job: Job, cost: RouteCost, clock: Clock) -> Gram: ...
