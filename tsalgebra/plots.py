"""Similarity matrices over many models, and their figures.

:func:`compute_matrix` is the one place that computes an N x N similarity
matrix for the CLI and the demos: it uses ``tsalgebra.similarity_matrix``
(the batched engine in ``tsalgebra/batched.py``) when that exists, and
otherwise a pairwise loop over :func:`tsalgebra.inner` that computes each
model's norm once.  Both return an object with ``.values`` (N x N numpy
array), ``.route``, ``.flops``, ``.inner``, ``.method``, ``.exact`` and
``.plot(path=None, ax=None, labels=None)``.

Figures use matplotlib's non-interactive Agg backend when a path is given,
so nothing here needs a display.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["MatrixResult", "compute_matrix", "pairwise_matrix", "plot_matrix", "batched_available"]


def _plt() -> Any:
    """pyplot, on the file-only Agg backend unless pyplot is already in use
    (a notebook or an interactive session keeps its own backend)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(values: Any, path: str | Path | None = None, ax: Any = None, labels: Sequence[str] | None = None,
                title: str | None = None, vmin: float | None = None, vmax: float | None = 1.0,
                cmap: str = "viridis", colorbar: bool = True) -> Any:
    """Draw an N x N matrix as a heatmap on ``ax`` (a new figure if None) and,
    with ``path``, save the figure there (format from the suffix).  Labels are
    thinned to at most 12 ticks.  Returns the Axes."""
    plt = _plt()
    m = np.asarray(values, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"plot_matrix needs a square matrix, got shape {m.shape}")
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
    else:
        fig = ax.figure
    lo = vmin if vmin is not None else float(min(0.0, np.nanmin(m)))
    im = ax.imshow(m, vmin=lo, vmax=vmax, cmap=cmap, interpolation="nearest")
    if labels is not None:
        if len(labels) != m.shape[0]:
            raise ValueError(f"{len(labels)} labels for a {m.shape[0]} x {m.shape[0]} matrix")
        step = max(1, math.ceil(len(labels) / 12))
        ticks = list(range(0, len(labels), step))
        ax.set_xticks(ticks, [str(labels[i]) for i in ticks], rotation=60, fontsize=7, ha="right")
        ax.set_yticks(ticks, [str(labels[i]) for i in ticks], fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if path is not None:
        fig.tight_layout()
        fig.savefig(str(path), dpi=120)
        if own:
            plt.close(fig)
    return ax


@dataclass
class MatrixResult:
    """An N x N similarity matrix computed pairwise (the fallback route)."""

    values: np.ndarray
    inner: str
    method: str
    exact: bool
    flops: int
    route: str = "pairwise"
    labels: tuple[str, ...] | None = None
    notes: tuple[str, ...] = field(default=())

    def plot(self, path: str | Path | None = None, ax: Any = None, labels: Sequence[str] | None = None) -> Any:
        """Heatmap of :attr:`values` (see :func:`plot_matrix`)."""
        return plot_matrix(self.values, path, ax, labels if labels is not None else self.labels,
                           title=f"{self.inner} similarity")


def pairwise_matrix(models: Sequence[Any], inner: str = "gaussian", progress: bool = True,
                    labels: Sequence[str] | None = None, **kwargs: Any) -> MatrixResult:
    """Cosine matrix by one :func:`tsalgebra.inner` per model (the norms) and
    one per unordered pair; the diagonal is 1.  ``kwargs`` (method, centered,
    mean, cov, degree, budget) go to ``tsalgebra.inner``.  Raises ValueError
    for a model of zero norm.  With ``progress`` a tqdm bar goes to stderr."""
    from tqdm.auto import tqdm

    from .inner import inner as inner_product

    n = len(models)
    if n == 0:
        raise ValueError("no models to compare")
    total = n + n * (n - 1) // 2
    flops, exact, method = 0, True, "exact"
    notes: list[str] = []
    values = np.eye(n)
    with tqdm(total=total, desc=f"{inner} similarity", unit="product", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        norms = []
        for k, m in enumerate(models):
            r = inner_product(m, m, inner, **kwargs)
            flops, exact, method = flops + r.flops, exact and r.exact, r.method
            notes.extend(r.notes)
            v = float(r.value)
            if not v > 0:
                name = labels[k] if labels is not None else f"model {k}"
                raise ValueError(f"{name} has zero norm under the {inner} inner product; its similarity is undefined")
            norms.append(math.sqrt(v))
            bar.update()
        for i in range(n):
            for j in range(i + 1, n):
                r = inner_product(models[i], models[j], inner, **kwargs)
                flops, exact = flops + r.flops, exact and r.exact
                cos = float(r.value) / (norms[i] * norms[j])
                if abs(cos) > 1 + 1e-9:
                    raise ArithmeticError(f"|cosine| of models {i} and {j} exceeds 1 ({cos!r})")
                values[i, j] = values[j, i] = max(-1.0, min(1.0, cos))
                bar.update()
    return MatrixResult(values, inner, method, exact, flops, "pairwise (tsalgebra.inner, norms once)",
                        tuple(labels) if labels is not None else None, tuple(dict.fromkeys(notes)))


def batched_available() -> bool:
    """True when ``tsalgebra.similarity_matrix`` (tsalgebra/batched.py) exists."""
    return _batched() is not None


def _batched() -> Any:
    try:
        mod = importlib.import_module("tsalgebra.batched")
    except ImportError:
        return None
    return getattr(mod, "similarity_matrix", None)


def compute_matrix(models: Sequence[Any], inner: str = "gaussian", progress: bool = True,
                   labels: Sequence[str] | None = None, route: str = "auto", **kwargs: Any) -> Any:
    """The N x N similarity matrix of ``models`` under ``inner``.

    ``route``: "auto" (the batched ``tsalgebra.similarity_matrix`` when it
    exists, else the pairwise loop), "batched" or "pairwise".  The result has
    ``.values``, ``.route``, ``.flops``, ``.inner``, ``.method``, ``.exact``
    and ``.plot(path=None, ax=None, labels=None)``.
    """
    fn = _batched() if route in ("auto", "batched") else None
    if route == "batched" and fn is None:
        raise RuntimeError("tsalgebra.similarity_matrix is not available in this installation")
    if fn is not None:
        return fn(list(models), inner=inner, progress=progress, **kwargs)
    return pairwise_matrix(models, inner, progress, labels, **kwargs)
