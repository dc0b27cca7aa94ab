"""What a similarity matrix call returns: the matrix with the facts needed to
trust it, what each candidate route would have cost, and where the time went."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..algorithms.sampled import Z95
from ..planner import ContractionPlan
from ..problem import HEAVY_TAILS


@dataclass(frozen=True)
class RouteCost:
    """A candidate route: planner flops for the block sizes that fit the memory
    bound, the estimated peak bytes of its blocks, and how it is blocked.
    ``layout`` is the route's own description of those blocks, which its run
    follows (private to the route)."""

    route: str
    flops: int
    peak_bytes: int
    fits: bool
    blocking: str
    plans: tuple[tuple[str, ContractionPlan], ...] = ()
    layout: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        fit = "" if self.fits else ", does not fit"
        return f"RouteCost({self.route}: {self.flops:.3g} flops, {self.peak_bytes / 2**20:.1f} MiB peak, {self.blocking}{fit})"


@dataclass(frozen=True)
class TileReport:
    """How a tiled matrix was computed (:mod:`tsalgebra.matrix.cluster`):
    ``size`` models a tile side, ``total`` tiles, of which ``computed`` ran
    in this call and ``from_store`` were read back; ``routes`` counts the
    route each computed tile took; ``where`` the workers ("this process", a
    local cluster, a scheduler address); ``store`` the directory kept, if
    any; ``worker_seconds`` the time the computed tiles took on their workers."""

    size: int
    total: int
    computed: int
    from_store: int
    routes: Mapping[str, int]
    where: str
    store: str | None
    worker_seconds: float


@dataclass(frozen=True)
class StepTime:
    """Wall time and planner flops spent in one kind of step of the chosen route
    (in worker threads: each worker's time in the step over their number)."""

    name: str
    flops: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.flops / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class SimilarityMatrix:
    """A matrix of cosines with the facts needed to trust it.

    ``values[i, j]`` is the cosine of row model i and column model j;
    ``norms`` / ``col_norms`` the norms sqrt(<m, m>) of the row / column models
    (float64; the same array for :func:`similarity_matrix`).  ``route`` is the
    route that ran, ``flops`` its planner flop count, ``candidates`` what every
    route would have cost; ``exact`` is False for approximations (closure)
    and for Monte Carlo estimates (``method="sampled"``: :attr:`estimated`),
    whose standard errors are ``stderr`` (one per entry, 0 on the diagonal
    of a symmetric matrix; None for exact and approximate values) and 95 %
    intervals :attr:`interval`; ``heavy_tailed`` marks the entries whose
    samples were heavy-tailed, their standard errors doubtful (as
    :func:`tsalgebra.similarity` flags a pair; None where nothing was sampled).
    ``log_norms`` / ``col_log_norms`` are the natural logs of the norms,
    which float64 holds for any model: a norm beyond float64's range is NaN
    in ``norms``, with a note (the cosines do not need it).  ``algorithms``
    names the registered algorithms (as :attr:`tsalgebra.InnerResult.algorithm`)
    that computed the products pair by pair, () where a batched route
    computed them all.
    """

    values: np.ndarray
    route: str
    flops: int
    inner: str
    method: str
    exact: bool
    norms: np.ndarray
    col_norms: np.ndarray
    symmetric: bool
    centered: bool = False
    measure: str = ""
    dtype: str = "float64"
    device: str = "numpy"
    max_memory: int = 0
    candidates: Mapping[str, RouteCost] = field(default_factory=dict)
    steps: tuple[StepTime, ...] = ()
    seconds: float = 0.0
    labels: tuple[str, ...] | None = None
    col_labels: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()
    tiles: "TileReport | None" = None
    stderr: np.ndarray | None = None
    heavy_tailed: np.ndarray | None = None
    log_norms: np.ndarray | None = None
    col_log_norms: np.ndarray | None = None
    algorithms: tuple[str, ...] = ()

    @property
    def estimated(self) -> bool:
        """True for Monte Carlo estimates (as :attr:`tsalgebra.InnerResult.estimated`)."""
        return "sampled" in self.method.split("/")

    @property
    def interval(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The normal 95 % intervals of estimated cosines, values -/+ 1.96
        stderr (None for exact and approximate values)."""
        if self.stderr is None:
            return None
        return self.values - Z95 * self.stderr, self.values + Z95 * self.stderr

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def dominant_step(self) -> StepTime | None:
        """The step that took the most time (None for the pairwise route)."""
        return max(self.steps, key=lambda s: s.seconds) if self.steps else None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.values, dtype=dtype)

    @property
    def accuracy(self) -> str:
        """How the values were obtained, as the repr says it: the method, with
        "(approximate)" or "(estimated)" (and the heavy-tails warning) where
        they are not exact."""
        # inside the "(estimated, ...)" parenthesis, as InnerResult's repr says it of one estimate
        heavy = f", {HEAVY_TAILS}" if self.heavy_tailed is not None and np.any(
            self.heavy_tailed) else ""
        kind = f" (estimated{heavy})" if self.estimated else "" if self.exact else " (approximate)"
        return self.method + kind

    def title(self, annotated: bool | None = None) -> str:
        """The default title of :meth:`plot`: what the figure shows and how its
        numbers were obtained (exact / approximate / estimated, the heavy-tails
        warning, centred, the measure, the route), and for estimates the
        largest standard error: a figure kept alone says what its repr says.
        ``annotated``: whether the cells are written out (default: as
        :meth:`plot` does, up to 12 x 12), each estimate with its error."""
        if annotated is None:
            from ..plots import _ANNOTATE_UP_TO  # at call time: the renderer is above this layer

            annotated = max(self.values.shape) <= _ANNOTATE_UP_TO
        lines = [f"{self.inner}{' centred' if self.centered else ''} similarity: {self.accuracy}",
                 ", ".join(([self.measure] if self.measure else []) + [f"route {self.route}"])]
        if self.stderr is not None:
            off = ~np.eye(*self.values.shape, dtype=bool) if self.symmetric else np.ones(self.values.shape, bool)
            se = np.asarray(self.stderr, dtype=float)[off]
            lines.append(f"standard errors up to \u00b1{float(np.max(se, initial=0.0)):.2g}"
                         + (" (each under its cosine)" if annotated else ""))
            if self.heavy_tailed is not None and np.any(self.heavy_tailed[off]):
                k = int(np.count_nonzero(np.asarray(self.heavy_tailed)[off]) // (2 if self.symmetric else 1))
                total = int(off.sum() // (2 if self.symmetric else 1))
                lines.append(f"heavy tails in {k} of {total} cosines (outlined)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        n, m = self.values.shape
        flags = [self.inner, self.accuracy] + (["/".join(self.algorithms)] if self.algorithms else []) + [
            f"route {self.route}"]
        if self.centered:
            flags.append("centred")
        if self.measure:
            flags.append(self.measure)
        flags.append(f"{self.dtype} on {self.device}")
        return (f"SimilarityMatrix({n} x {m}{', symmetric' if self.symmetric else ''}; {', '.join(flags)}; "
                f"{self.flops:.3g} flops in {self.seconds:.3g} s)")

    def plot(self, path: str | os.PathLike | None = None, ax: Any = None, labels: Sequence[str] | None = None,
             col_labels: Sequence[str] | None = None, title: str | None = None, annotate: bool | None = None) -> Any:
        """A heatmap of the cosines (see :func:`tsalgebra.plots.plot_matrix`);
        returns the figure.  ``labels`` name the rows (and the columns of a
        symmetric matrix); by default the labels the models were given under,
        if any.  The default ``title`` is :meth:`title`: how the values were
        obtained.  Estimated cosines carry their standard errors in the cells
        written out, and the heavy-tailed ones are outlined."""
        from ..plots import plot_matrix

        rows = list(labels) if labels is not None else (list(self.labels) if self.labels else None)
        if col_labels is not None:
            cols = list(col_labels)
        elif self.symmetric:
            cols = rows
        else:
            cols = list(self.col_labels) if self.col_labels else None
        return plot_matrix(self.values, path, ax, labels=rows, col_labels=cols, title=title or self.title(annotate),
                           annotate=annotate, stderr=self.stderr, flagged=self.heavy_tailed)
