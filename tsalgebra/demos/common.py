"""Shared pieces of the demos: statistics, figures, results."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..jsonable import dumps, jsonable
from ..messages import out_of_memory
from ..problem import available_memory

__all__ = ["DemoResult", "Checks", "Size", "TRAINING_SIZES", "Written", "cosine_matrix", "pearson", "upper",
           "torch_threads", "labelled_steps", "start", "write_outputs", "demo_main", "colour_range", "plot_cosines",
           "drop_empty_panels", "grid", "training_bar", "memory_room", "disk_room", "gigabytes", "MANIFEST",
           "sizes_advice", "Diverged", "check_finite", "optimizer_step", "OutOfMemory", "advising_memory"]

MANIFEST = ".tsalgebra-demo"  # in OUT/checkpoints: the files a demo run wrote there (hidden: no loader reads it)


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

    def integer(self, field: str, least: int = 1, most: int | None = None, most_said: str | None = None,
                why: str = "") -> int:
        v = getattr(self.cfg, field)
        what = f"an integer >= {least}" + ("" if most is None else f" and <= {most_said or most}") + (
            f" ({why})" if why else "")
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

    def out(self, written: Sequence[str], field: str = "out", demo: str | None = None) -> None:
        """The output directory: a directory (or one that can be made) in
        which ``written`` (file names) and ``checkpoints/`` can be written;
        checked here so that a wrong --out fails before the training, not
        after it.  With ``demo``: its ``checkpoints/`` holds no checkpoint
        file but those an earlier run of that demo recorded writing
        (:class:`Written`), which a rerun replaces."""
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
        if demo is not None:
            foreign, owner = foreign_checkpoints(ckdir, demo)
            if foreign:
                shown = ", ".join(f.name for f in foreign[:4]) + (f" and {len(foreign) - 4} more"
                                                                  if len(foreign) > 4 else "")
                by = f"; written by the {owner} demo" if owner not in (None, demo) else ""
                raise ValueError(
                    f"{where}: {ckdir} holds {len(foreign)} checkpoint file{'s' if len(foreign) != 1 else ''} that "
                    f"no earlier run of this demo recorded writing ({shown}{by}): the demo removes only the "
                    f"checkpoints its runs recorded ({ckdir / MANIFEST}), and every number read from a folder that "
                    f"mixes others in (tsalgebra matrix {ckdir}) would mix them in; move them away, or choose "
                    f"another {self.name(field)}")

    def fits(self, need: Callable[[Any], int], room: int, sizes: Sequence["Size"], what: Callable[[Any], str],
             where: str) -> None:
        """Refuse (ValueError) where ``need(cfg)`` bytes exceed ``room``:
        naming the size setting that raises the estimate most above its
        default, the estimate, ``where`` the room is ("of memory available"),
        and for each size setting raised above its default (the one named
        first) the value nearest to the one asked for that fits, the others
        kept, within nine tenths of the room.  ``need`` and ``what`` read a
        config; ``sizes`` are the settings that may be changed."""
        cfg = self.cfg
        asked = need(cfg)
        if asked <= room:
            return
        default = type(cfg)()
        sizes = [s for s in sizes if self.python or not s.python_only]
        drops: dict[str, int] = {}
        for s in sizes:
            now, was = getattr(cfg, s.field), getattr(default, s.field)
            drops[s.field] = max(0, asked - need(replace(cfg, **{s.field: was}))) if (
                now > was if s.grows else now < was) else 0
        order = sorted(sizes, key=lambda s: -drops[s.field])  # stable: the list's order among equals
        # an alternative fits with a tenth of the room to spare: the room moves a little from run to run
        found = [(s, s.nearest_fit(cfg, need, int(room * 0.9))) for s in order]
        offered = [(s, v) for s, v in found if v is not None]
        named = order[0] if drops[order[0].field] > 0 else (offered[0][0] if offered else order[0])
        beside = set(named.beside)  # the settings that trade with the one named (--steps and --checkpoint-every)
        shown = [(s, v) for s, v in offered if s is named or drops[s.field] > 0 or s.field in beside] or offered[:1]
        shown.sort(key=lambda sv: sv[0] is not named)
        alternatives = "; ".join(f"{self.given(s.field, v)} ({s.why(s.grows)})" for s, v in shown)
        raise ValueError(f"{self.given(named.field)}: {what(cfg)} take about {gigabytes(asked)}, more than the "
                         f"{gigabytes(room)} {where}"
                         + (f". Alternatives: {alternatives}" if alternatives else
                            ": no one of the sizes alone fits it; lower several"))


    def fits_machine(self, demo: str, need: Callable[[Any], int], disk: Callable[[Any], int], sizes: Sequence["Size"],
                     held: Callable[[Any], str], files: Callable[[Any], int]) -> None:
        """:meth:`fits` against the memory available (``need`` bytes, ``held``
        saying what they hold), then against the disk that will hold ``--out``
        (``disk`` bytes in ``files(cfg)`` checkpoint files; the checkpoints an
        earlier run of ``demo`` wrote there count as free, a rerun removes them)."""
        self.fits(need, memory_room(), sizes, held, "of memory available")
        out = Path(self.cfg.out)
        room, where = disk_room(out, own_checkpoint_bytes(out / "checkpoints", demo))
        each = lambda cfg: gigabytes(disk(cfg) // files(cfg))  # noqa: E731
        self.fits(disk, room, sizes, lambda cfg: f"the {files(cfg):,} checkpoints ({each(cfg)} each)",
                  f"free on the disk of {where}")


def gigabytes(n: float) -> str:
    """Bytes as gigabytes, three digits, for any magnitude (a huge integer too)."""
    from ..problem import format_count

    if isinstance(n, int) and n.bit_length() > 1000:
        return f"{format_count(n // 10**9)} GB"
    return f"{n / 1e9:.3g} GB"


@dataclass(frozen=True)
class Size:
    """A size setting of a demo for :meth:`Checks.fits`: ``field``; whether
    the memory grows with it (``grows``; False: it shrinks, as with
    --checkpoint-every); the smallest and largest values the demo accepts for
    it given the others (``least``, ``most``: numbers or functions of the
    config); ``valid`` the nearest value the demo accepts at or below a value
    (at or above where it does not grow), None where there is none;
    ``python_only`` for a keyword of ``run(...)`` with no flag; ``said`` how
    its alternative was chosen; ``beside`` the settings whose alternatives
    are offered with this one's where it is named."""

    field: str
    grows: bool = True
    least: Any = 1
    most: Any = None
    valid: Callable[[Any, int], int | None] | None = None
    python_only: bool = False
    said: str = ""
    beside: tuple[str, ...] = ()

    def why(self, grows: bool) -> str:
        return self.said or ("the largest that fits" if grows else "the smallest that fits")

    def nearest_fit(self, cfg: Any, need: Callable[[Any], int], room: int) -> int | None:
        """The value nearest to ``cfg``'s (in the direction that lowers the
        memory) whose estimate fits ``room``, the other settings kept; None
        where none does."""
        value = lambda b: b(cfg) if callable(b) else b  # noqa: E731
        at = lambda v: need(replace(cfg, **{self.field: v}))  # noqa: E731
        now = int(getattr(cfg, self.field))
        if self.grows:
            lo, hi = int(value(self.least)), now  # fits(lo) is asked first; hi does not fit
            if lo >= hi or at(lo) > room:
                return None
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if at(mid) <= room else (lo, mid)
            v = lo if self.valid is None else self.valid(cfg, lo)
            return v if v is not None and v >= value(self.least) else None
        top = value(self.most)
        if top is None or top <= now or at(top) > room:
            return None
        lo, hi = now, int(top)  # lo does not fit, hi does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if at(mid) <= room else (mid, hi)
        v = hi if self.valid is None else self.valid(cfg, hi)
        return v if v is not None and v <= top else None


# --steps and --checkpoint-every of a demo that trains for ``steps`` with a
# checkpoint every ``checkpoint_every`` (at least two): offered together
TRAINING_SIZES = (Size("steps", least=lambda cfg: 2 * cfg.checkpoint_every, beside=("checkpoint_every",)),
                  Size("checkpoint_every", grows=False, most=lambda cfg: cfg.steps // 2, beside=("steps",)))


def sizes_advice(sizes: Sequence[Size], python: bool = False, also: Sequence[str] = ()) -> str:
    """What lowers a demo's memory (after an allocation the machine refused),
    in the caller's spelling: a smaller value of each of ``sizes`` that grows
    it, and of ``also`` (settings its estimate does not weigh), a larger one
    of each that shrinks it: "a smaller --width or --steps, or a larger
    --checkpoint-every"."""
    c = Checks(None, python)
    shown = [s for s in sizes if python or not s.python_only]
    smaller = [c.name(s.field) for s in shown if s.grows] + [c.name(f) for f in also]
    larger = [c.name(s.field) for s in shown if not s.grows]
    either = lambda names: names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]  # noqa: E731
    return ", or ".join(f"a {word} {either(names)}" for word, names in (("smaller", smaller), ("larger", larger))
                        if names)


class OutOfMemory(MemoryError):
    """An allocation the machine refused during a demo's ``run(...)``, said
    with what lowers the run's memory in ``run``'s keywords; ``original`` is
    the allocation's own message (the command line adds its flags to it)."""

    def __init__(self, original: str, advice: str) -> None:
        self.original = original
        super().__init__(f"out of memory ({original}); try {advice}")


def advising_memory(advice: Callable[[bool], str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A demo's ``run`` whose refused allocations (numpy's MemoryError,
    torch's allocator's RuntimeError) raise :class:`OutOfMemory` with
    ``advice(True)``: the sizes to lower, as ``run`` spells them."""

    def decorate(run: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(run)
        def advised(*args: Any, **kwargs: Any) -> Any:
            try:
                return run(*args, **kwargs)
            except OutOfMemory:
                raise
            except (MemoryError, RuntimeError) as exc:
                original = out_of_memory(exc)
                if original is None:
                    raise
                raise OutOfMemory(original, advice(True)) from exc

        return advised

    return decorate


class Diverged(ValueError):
    """The training met a loss or a parameter that is not finite (``what``):
    a learning rate too large for it, said at the first step that showed it
    (of ``phase``, where the demo trains in phases).  The message spells the
    settings as ``run(...)`` does (``lr=``); :meth:`spelled` as the command
    line does (``--lr``)."""

    def __init__(self, cfg: Any, step: int, what: str, phase: str = "") -> None:
        self.cfg, self.step, self.what, self.phase = cfg, step, what, phase
        super().__init__(self.spelled(python=True))

    def spelled(self, python: bool) -> str:
        c, cfg = Checks(self.cfg, python), self.cfg
        default = type(cfg)()
        text = (f"the training diverged at step {self.step}{f' of the {self.phase} phase' if self.phase else ''} "
                f"with {c.given('lr')}: {self.what} is not finite; give a smaller {c.name('lr')}"
                + (f" (the default is {c.given('lr', default.lr)})" if cfg.lr > default.lr else ""))
        decay = getattr(cfg, "weight_decay", None)
        # a weight decay raised so far that the decay alone grows the weights (|1 - lr x decay| > 1) is named too
        if decay is not None and decay > default.weight_decay and cfg.lr * decay > 2:
            text += (f", or a smaller {c.name('weight_decay')} (AdamW multiplies the weights by 1 - "
                     f"{c.name('lr')} x {c.name('weight_decay')} at each step)")
        return text


def check_finite(cfg: Any, step: int, loss: Any = None, model: Any = None, phase: str = "") -> None:
    """Raise :class:`Diverged` where ``loss`` (a torch scalar) or a parameter
    of ``model`` (a torch module, at a checkpoint) is NaN or infinite: the
    training stops there, not after its last step with every later number
    NaN (the analysis failed then, naming no setting)."""
    import torch

    value = None if loss is None else loss.detach().item()  # (a float of a tensor with a gradient warns)
    if value is not None and not math.isfinite(value):
        raise Diverged(cfg, step, f"the loss ({value})", phase)
    if model is not None:
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise Diverged(cfg, step, f"the parameter {name}", phase)


def optimizer_step(opt: Any, cfg: Any, step: int, phase: str = "") -> None:
    """``opt.step()``, where an update beyond float32 is :class:`Diverged`
    too: torch refuses a step size it cannot hold ("value cannot be converted
    to type float without overflow": a learning rate above about 3e37)."""
    try:
        opt.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise Diverged(cfg, step, "the update (beyond float32)", phase) from None


def memory_room() -> int:
    """The bytes a demo may still allocate: :func:`available_memory` (the
    machine's or its container's free memory, or less where this process's
    ``ulimit -v`` or ``-d`` leaves less), read once torch is loaded (its
    libraries take address space too)."""
    import torch  # noqa: F401 - the demo's, counted against the limits

    return available_memory()


def disk_room(out: Path, freed: int = 0) -> tuple[int, Path]:
    """Free bytes on the disk that would hold ``out`` (its nearest existing
    folder), plus ``freed`` (what the demo removes first), and that folder."""
    import shutil

    parent = Path(out)
    while not parent.exists():
        parent = parent.parent
    try:
        return shutil.disk_usage(parent).free + freed, parent
    except OSError:  # pragma: no cover - a file system without statvfs
        return 2**62, parent


def _read_manifest(ckdir: Path) -> tuple[str | None, list[str]]:
    """(the demo, the file names) an earlier demo run recorded in ``ckdir``;
    (None, []) where there is no record or it is not one of ours."""
    try:
        lines = (ckdir / MANIFEST).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None, []
    if not lines or not lines[0].startswith("# tsalgebra demo "):
        return None, []
    words = lines[0][len("# tsalgebra demo "):].split()
    names = [n for n in lines[1:] if n and "/" not in n and "\\" not in n and n not in (".", "..")
             and not n.startswith(".")]
    return (words[0].rstrip(":") if words else None), names


def _checkpoint_files(ckdir: Path) -> list[Path]:
    """The files in ``ckdir`` that the loaders would read as checkpoints (by
    suffix, hidden ones excepted, as :func:`tsalgebra.io.checkpoint_paths`)."""
    from ..io import CHECKPOINT_SUFFIXES

    if not ckdir.is_dir():
        return []
    return sorted((f for f in ckdir.iterdir() if f.is_file() and f.suffix.lower() in CHECKPOINT_SUFFIXES
                   and not f.name.startswith(".")), key=lambda f: f.name)


def foreign_checkpoints(ckdir: Path, demo: str) -> tuple[list[Path], str | None]:
    """The checkpoint files in ``ckdir`` that no earlier run of ``demo``
    recorded writing (a user's, another demo's, or an unrecorded earlier
    run's), and the demo that recorded the folder (None: none did)."""
    owner, names = _read_manifest(ckdir)
    own = set(names) if owner == demo else set()
    return [f for f in _checkpoint_files(ckdir) if f.name not in own], owner


def own_checkpoint_bytes(ckdir: Path, demo: str) -> int:
    """The bytes of the checkpoints an earlier run of ``demo`` wrote in
    ``ckdir`` (a rerun removes them first)."""
    owner, names = _read_manifest(ckdir)
    total = 0
    for n in names if owner == demo else ():
        with contextlib.suppress(OSError):
            total += (ckdir / n).stat().st_size if (ckdir / n).is_file() else 0
    return total


class Written:
    """The checkpoints this demo run writes into ``ckdir``: each name is
    recorded in the folder's manifest before its file is written (so that an
    interrupted run's files are still known as the demo's), and ``paths``
    lists them in the order written: what the demo reads back, never the
    folder."""

    def __init__(self, ckdir: Path, demo: str) -> None:
        self.ckdir, self.demo = Path(ckdir), demo
        self.paths: list[Path] = []
        self._names: set[str] = set()
        (self.ckdir / MANIFEST).write_text(
            f"# tsalgebra demo {demo}: the checkpoint files this demo run wrote in this folder, one a line "
            "(its next run removes them, and no other file)\n")

    def path(self, name: str) -> Path:
        """The path to write checkpoint ``name`` to, recorded first."""
        if name not in self._names:
            with open(self.ckdir / MANIFEST, "a") as fh:
                fh.write(name + "\n")
            self._names.add(name)
            self.paths.append(self.ckdir / name)
        return self.ckdir / name


def start(cfg: Any, overrides: dict[str, Any], demo: str) -> Written:
    """Apply keyword ``overrides`` to the config (TypeError for an unknown
    one), check it (ValueError naming the keyword: a foreign checkpoint in
    ``cfg.out/checkpoints`` included), remove the checkpoints the previous
    run of ``demo`` recorded writing there (a rerun must not mix in an
    earlier run's steps) and no other file, and return the record of this
    run's checkpoints (:class:`Written`; its ``ckdir`` is the folder)."""
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown setting {k!r}")
        setattr(cfg, k, v)
    cfg.check(python=True)
    cfg.out = Path(cfg.out)
    ckdir = cfg.out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    owner, names = _read_manifest(ckdir)
    for name in names if owner == demo else ():
        old = ckdir / name
        if old.is_file() or old.is_symlink():
            old.unlink()
    return Written(ckdir, demo)


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
