"""Shared pieces of the demos: statistics, figures, results."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..jsonable import dumps, jsonable

__all__ = ["DemoResult", "cosine_matrix", "pearson", "upper", "torch_threads", "labelled_steps", "start",
           "write_outputs", "demo_main"]


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


def start(cfg: Any, overrides: dict[str, Any], old_checkpoints: str) -> Path:
    """Apply keyword ``overrides`` to the config (TypeError for an unknown
    one), check it, and empty ``cfg.out/checkpoints`` of the files matching
    ``old_checkpoints`` (a rerun must not mix in an earlier run's steps);
    returns that directory."""
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown setting {k!r}")
        setattr(cfg, k, v)
    cfg.out = Path(cfg.out)
    cfg.check()
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


def demo_main(module: str, doc: str | None, add_arguments: Any, config_from_args: Any, run: Any,
              argv: Sequence[str] | None) -> int:
    """``python -m tsalgebra.demos.NAME``: parse the demo's flags, run it,
    print its summary."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(run(config_from_args(parser.parse_args(argv))).summary, end="")
    return 0
