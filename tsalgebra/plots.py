"""Figures: the heatmap of a similarity matrix.

:func:`plot_matrix` is the one heatmap renderer: ``SimilarityMatrix.plot``,
the ``tsalgebra matrix`` command and the demos all draw through it.  A new
figure is made without pyplot (on an Agg canvas), so nothing here needs a
display or leaves figures open; :func:`pyplot` gives pyplot to the demos, whose
figures hold several panels.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["plot_matrix", "pyplot"]

# Tick labels per axis at most (more are thinned to every k-th), and the size
# up to which the values are written in the cells by default.
_MAX_TICKS = 25
_ANNOTATE_UP_TO = 12


def pyplot() -> Any:
    """pyplot, on the file-only Agg backend unless pyplot is already in use
    (a notebook or an interactive session keeps its own backend)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ink(rgba: np.ndarray) -> np.ndarray:
    """The text colour legible on each cell of colours ``rgba`` (..., 4), as
    drawn (over the white axes where transparent: a NaN cell): black on
    light cells, white on dark, by perceived brightness, whatever the scale."""
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    light = rgb @ np.array([0.299, 0.587, 0.114]) > 0.5
    return np.where(light, "black", "white")


def plot_matrix(values: Any, path: str | Path | None = None, ax: Any = None, labels: Sequence[str] | None = None,
                col_labels: Sequence[str] | None = None, title: str | None = None, annotate: bool | None = None,
                vmin: float = -1.0, vmax: float = 1.0, stderr: Any = None, flagged: Any = None) -> Any:
    """Draw a matrix of cosines as a heatmap; returns the figure.

    Draws into ``ax`` when given, otherwise on a new figure, and saves the
    figure to ``path`` when given (format from the suffix).  ``labels`` name
    the rows and ``col_labels`` the columns (raising ValueError when their
    number differs from the matrix's); more than 25 are thinned.  The colour
    scale runs from ``vmin`` to ``vmax`` (default the cosine's range, [-1, 1],
    diverging at 0).  ``annotate`` writes the values in the cells (default:
    for matrices up to 12 x 12), black or white by each cell's colour.  Estimates: ``stderr`` (the matrix's shape)
    writes each value's standard error under it (where nonzero), and the
    cells ``flagged`` (a boolean matrix: heavy tails, their errors doubtful)
    are outlined.  A title of several lines is drawn smaller.
    """
    vals = np.asarray(values, dtype=float)
    if vals.ndim != 2:
        raise ValueError(f"plot_matrix needs a 2-D matrix, got shape {vals.shape}")
    n, m = vals.shape
    se = None if stderr is None else np.broadcast_to(np.asarray(stderr, dtype=float), vals.shape)
    marked = None if flagged is None else np.broadcast_to(np.asarray(flagged, dtype=bool), vals.shape)
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        size = min(12.0, 3.0 + 0.25 * max(n, m))
        fig = Figure(figsize=(size * 1.15, size))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    im = ax.imshow(vals, cmap="RdBu_r", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    for setter, names, count in ((ax.set_yticks, labels, n), (ax.set_xticks, col_labels, m)):
        if names is not None:
            if len(names) != count:
                raise ValueError(f"{len(names)} labels for {count} models")
            ticks = range(0, count, math.ceil(count / _MAX_TICKS))
            small = {"fontsize": 7} if count > _ANNOTATE_UP_TO else {}
            setter(ticks, labels=[str(names[k]) for k in ticks], **small)
    if col_labels is not None:
        for lab in ax.get_xticklabels():
            lab.set_rotation(90)
    if annotate is None:
        annotate = max(n, m) <= _ANNOTATE_UP_TO
    if annotate:
        ink = _ink(im.cmap(im.norm(vals))).tolist()
        for i in range(n):
            for j in range(m):
                text = f"{vals[i, j]:.2f}"
                if se is not None and se[i, j] > 0:
                    text += f"\n\u00b1{se[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7 if se is None else 6, color=ink[i][j])
    if marked is not None:
        from matplotlib.patches import Rectangle

        for i, j in np.argwhere(marked):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5,
                                   linestyle="--"))
    if title:
        ax.set_title(title, fontsize=None if "\n" not in title else 9)
    if path is not None:
        fig.savefig(str(path), bbox_inches="tight")
    return fig
