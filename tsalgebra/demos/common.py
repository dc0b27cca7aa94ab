"""Shared pieces of the demos: statistics, figures, results."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..jsonable import dumps, jsonable

__all__ = ["DemoResult", "Checks", "cosine_matrix", "pearson", "upper", "torch_threads", "labelled_steps", "start",
           "write_outputs", "demo_main", "colour_range", "plot_cosines", "drop_empty_panels", "grid", "training_bar"]


def cosine_matrix(rows: np.ndarray) -> np.ndarray:
    """Cosines between the rows of ``rows`` (N x M), accumulated in float64."""
    r = np.asarray(rows)
    gram = np.zeros((r.shape[0], r.shape[0]))
    step = max(1, 4_000_000 // max(1, r.shape[0]))
    for s in range(0, r.shape[1], step):
        block = r[:, s : s + step].astype(np.float64)
        gram += block @ block.T
    n = np.sqrt(np.diag(gram))
    if np.any(n == 0):
        raise ValueError("a zero row has no direction")
    return np.clip(gram / np.outer(n, n), -1.0, 1.0)


def upper(m: np.ndarray) -> np.ndarray:
    """The strictly upper-triangular entries (one per unordered pair)."""
    i, j = np.triu_indices(m.shape[0], k=1)
    return np.asarray(m)[i, j]


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (tiny full-batch models
    train fastest on one), restoring the previous setting after."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def labelled_steps(paths: Sequence[Path]) -> list[int]:
    """The step number in each checkpoint file name (the last digit run)."""
    import re

    steps = []
    for p in paths:
        found = re.findall(r"\d+", p.stem)
        if not found:
            raise ValueError(f"{p}: no step number in the file name")
        steps.append(int(found[-1]))
    return steps


class Checks:
    """Range checks of a demo's settings, each error a ValueError naming the
    setting as its caller spells it: the flag (``--lr``) on the command line,
    the keyword (``lr``) in Python (``python=True``).  NaN and infinities fail
    every number check that does not ask for them."""

    def __init__(self, cfg: Any, python: bool) -> None:
        self.cfg, self.python = cfg, python

    def name(self, field: str) -> str:
        return field if self.python else "--" + field.replace("_", "-")

    def given(self, field: str, value: Any = None) -> str:
        """The setting with a value (its own by default; a string is written as it is), as the caller would
        write it: ``--n-ctx 3``, ``n_ctx=3``."""
        value = getattr(self.cfg, field) if value is None else value
        text = value if isinstance(value, str) else repr(value) if self.python else str(value)
        return f"{field}={text}" if self.python else f"{self.name(field)} {text}"

    def finite(self, field: str) -> float:
        v = getattr(self.cfg, field)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{self.name(field)} must be a finite number, got {v!r}")
        return float(v)

    def integer(self, field: str, least: int = 1, most: int | None = None, most_said: str | None = None) -> int:
        v = getattr(self.cfg, field)
        what = f"an integer >= {least}" + ("" if most is None else f" and <= {most_said or most}")
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least or (most is not None and v > most):
            raise ValueError(f"{self.name(field)} must be {what}, got {v!r}")
        return int(v)

    def number(self, field: str, least: float, strict: bool, below: float | None = None,
               infinite: bool = False) -> float:
        v = getattr(self.cfg, field)
        what = f"a {'' if infinite else 'finite '}number {'>' if strict else '>='} {least:g}" + (
            "" if below is None else f" and < {below:g}")
        ok = (not isinstance(v, bool) and isinstance(v, numbers.Real) and not math.isnan(v)
              and (infinite or math.isfinite(v)) and (v > least if strict else v >= least)
              and (below is None or v < below))
        if not ok:
            raise ValueError(f"{self.name(field)} must be {what}, got {v if isinstance(v, numbers.Real) else repr(v)}")
        return float(v)

    def seed(self, field: str = "seed") -> int:
        return self.integer(field, 0, 2**63 - 1, "2^63 - 1")  # torch's and numpy's seeds (a demo adds a few to it)

    def threads(self, field: str = "threads") -> int:
        return self.integer(field, 1)  # torch refuses fewer than one

    def progress(self, field: str = "progress") -> None:
        v = getattr(self.cfg, field)
        if v not in (True, False, None) or not isinstance(v, (bool, type(None))):
            raise ValueError(f"{self.name(field)} must be True, False or None (a bar on a terminal), got {v!r}")

    def out(self, written: Sequence[str], field: str = "out") -> None:
        """The output directory: a directory (or one that can be made) in
        which ``written`` (file names) and ``checkpoints/`` can be written;
        checked here so that a wrong --out fails before the training, not
        after it."""
        v = getattr(self.cfg, field)
        if not isinstance(v, (str, os.PathLike)) or not str(v):
            raise ValueError(f"{self.name(field)} must be a directory path, got {v!r}")
        out = Path(v)
        where = f"{self.name(field)} {out}"
        if out.exists() and not out.is_dir():
            raise ValueError(f"{where}: exists and is not a directory")
        ckdir = out / "checkpoints"
        if ckdir.exists() and not ckdir.is_dir():
            raise ValueError(f"{where}: {ckdir} exists and is not a directory (the checkpoints go there)")
        for name in written:
            if (out / name).is_dir():
                raise ValueError(f"{where}: {out / name} is a directory (the demo writes a file of that name)")
        parent = out
        while not parent.exists():  # ends at "." or the root, which exist
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"{where}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{where}: {parent} is not writable")


def start(cfg: Any, overrides: dict[str, Any], old_checkpoints: str) -> Path:
    """Apply keyword ``overrides`` to the config (TypeError for an unknown
    one), check it (ValueError naming the keyword), and empty
    ``cfg.out/checkpoints`` of the files matching ``old_checkpoints`` (a rerun
    must not mix in an earlier run's steps); returns that directory."""
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown setting {k!r}")
        setattr(cfg, k, v)
    cfg.check(python=True)
    cfg.out = Path(cfg.out)
    ckdir = cfg.out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    for old in ckdir.glob(old_checkpoints):
        old.unlink()
    return ckdir


@dataclass
class DemoResult:
    """What a demo produced: ``summary`` (the printed text), ``numbers`` (a
    JSON-able dict), and the paths it wrote."""

    name: str
    summary: str
    numbers: dict[str, Any]
    figure: Path
    summary_path: Path
    json_path: Path
    checkpoints: Path
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def write_outputs(name: str, out: Path, summary: str, numbers: dict[str, Any], figure: Path,
                  checkpoints: Path, started: float) -> DemoResult:
    """Write summary.txt and summary.json next to the figure; return the result."""
    seconds = time.perf_counter() - started
    numbers = dict(numbers, seconds=round(seconds, 2))
    summary = summary.rstrip() + f"\nwall time {seconds:.1f} s; figure {figure}; numbers {out / 'summary.json'}\n"
    (out / "summary.txt").write_text(summary)
    (out / "summary.json").write_text(dumps(numbers, indent=2))
    return DemoResult(name, summary, jsonable(numbers), figure, out / "summary.txt", out / "summary.json",
                      checkpoints, seconds)


def training_bar(total: int, desc: str, progress: bool | None) -> Any:
    """The bar of a training loop (advance it by one per step): shown, hidden,
    or with ``progress`` None shown on a terminal only, by the rule of the
    library's own bars (:func:`tsalgebra.progress.progress_bar`), so that a
    log file does not fill with redrawn bars."""
    from ..progress import progress_bar

    return progress_bar(total, desc, "step", progress, long=True)


def colour_range(m: np.ndarray) -> tuple[float, float]:
    """The colour scale of a matrix of cosines, from its values: symmetric
    about 0 where a value is negative (the diverging map's white is then 0),
    else from 0 to the largest value."""
    finite = np.asarray(m, dtype=float)[np.isfinite(m)]
    if finite.size == 0:
        return -1.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo < 0:
        top = max(-lo, hi)
        return -top, top
    return 0.0, hi if hi > 0 else 1.0


def plot_cosines(m: np.ndarray, ax: Any, **kwargs: Any) -> None:
    """:func:`tsalgebra.plots.plot_matrix` with the colours scaled to ``m``
    (:func:`colour_range`)."""
    from ..plots import plot_matrix

    vmin, vmax = colour_range(m)
    plot_matrix(m, ax=ax, vmin=vmin, vmax=vmax, **kwargs)  # its cell values take their colours from the scale


def drop_empty_panels(fig: Any, axes: Sequence[Any], used: int) -> None:
    """Remove the panels of a grid past the first ``used`` (an empty frame
    says nothing)."""
    for ax in list(axes)[used:]:
        fig.delaxes(ax)


def grid(panels: int, most_columns: int = 5) -> tuple[int, int]:
    """(rows, columns) of a grid for ``panels`` panels: the fewest empty cells,
    then the squarest, with 3 to ``most_columns`` columns."""
    options = [(math.ceil(panels / c), c) for c in range(min(3, panels), max(3, most_columns) + 1)]
    return min(options, key=lambda rc: (rc[0] * rc[1] - panels, abs(rc[0] - rc[1]), rc[0]))


def demo_main(name: str, argv: Sequence[str] | None) -> int:
    """``python -m tsalgebra.demos.NAME``: the command ``tsalgebra demo NAME``
    with these arguments, so that both entry points parse, check and report
    errors alike (a bad setting: exit 2 naming its flag, never a traceback)."""
    import sys

    from ..cli import main

    return main(["demo", name, *(sys.argv[1:] if argv is None else argv)])
