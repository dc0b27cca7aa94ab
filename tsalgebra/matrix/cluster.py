"""Similarity matrices in tiles: on a Dask cluster, and resumable from a store.

The upper triangle of an N x N matrix (or the whole N x M rectangle) is cut
into square tiles of ``size`` models a side (by default the largest giving
TILES_PER_WORKER tiles per worker whose two sides of prepared models fit the
memory bound of a worker: a quarter of its limit unless ``max_memory`` says).  Each tile is one call of the
single-machine machinery (:func:`tsalgebra.matrix.api.compute_tile`: the
routes are costed and the cheapest that fits runs, pairwise-gram,
materialize, node-gram or pairwise with any algorithm), on a worker of a
``dask.distributed`` cluster or in this process.  The models are scattered to
the cluster once (each tile's task refers to them), and each model's norm
comes from one tile only: the diagonal tiles of a symmetric matrix, the first
tile row and column of a rectangle (the pairwise route skips the self
products elsewhere).

Each tile returns its block on its own scale (the logs of its scale factors,
see :class:`~tsalgebra.matrix.job.Gram`), so tiles that took different
routes combine exactly: cos[a, b] = cross[a, b] U_a U_b / (|a| |b|), in
float64 logarithms.

With ``store=DIRECTORY`` every finished tile is written at once (one small
``.npz`` per tile, written to a temporary name and renamed: a tile file is
whole or absent) beside ``manifest.json``, which records the options, the
tile size and a SHA-256 digest of every model's weights and settings.  A
rerun with the same models and options reads the finished tiles and computes
only the missing ones; a store written for other models or options is
refused, naming the difference.  Each tile also records its rows and columns:
a tile file that cannot be read, or holds another position, is computed
again; a store that cannot be written is refused before any tile is
computed.  A worker that dies mid-tile loses that tile
only (the scheduler runs it again elsewhere); Ctrl-C on the client keeps
every tile already written.

The flop budget (``budget=``) is judged once, on the whole matrix, before any
tile runs (:func:`tsalgebra.matrix.api.judge_tiles`: every tile costed from
its models' shapes), so that a refusal states the whole cost and the budget it
suggests admits the run.  A client or scheduler with no worker is given
WORKERS_SECONDS for one to join, then refused naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import CancelledError
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import sympy

from ..arrays import is_torch, torch_to_numpy
from ..components import Component
from ..cosine import cosines
from ..messages import warn_at_caller
from ..progress import progress_bar
from .job import TileGram, Tiling
from .ops import parse_dtype
from .pairwise import JOINT_NOTE, heavy_note
from .results import SimilarityMatrix, StepTime, TileReport

__all__ = ["Tile", "tiles_of", "model_digest", "Store", "store_path", "tiled"]

# 2: tiles carry the identity of the manifest they were computed under; model and
# measure digests of their content; cosines of jointly estimated pairs.
# 3: tiles record their own rows and columns (a tile file copied to another
# position is not read there) and which estimates are heavy-tailed.
STORE_VERSION = 3
# Tiles per worker aimed at when the tile size is chosen: enough that a slow
# tile does not leave the others idle at the end, few enough that each tile
# still batches (the batched routes' cost per pair falls with the block).
TILES_PER_WORKER = 4
# A tile cancelled by the scheduler (its worker killed, its inputs dropped) is
# sent again, its models with it, at most this many times.
TILE_RETRIES = 2
# How long scheduler= may take to answer before the call fails naming it.
CONNECT_SECONDS = 10
# How long a client or scheduler with no worker is given for one to join
# before the call fails naming it (the tiles would wait for ever).
WORKERS_SECONDS = 30
# workers=: local processes beyond a few per CPU only share the CPUs and
# multiply the memory (the command line's --workers has the same bound).
WORKERS_PER_CPU = 4


@dataclass(frozen=True)
class Tile:
    """Rows [r0, r1) against columns [c0, c1); ``diagonal``: a symmetric tile
    on the diagonal (rows are columns); ``row_self`` / ``col_self``: whether
    it supplies the norms of its rows / columns."""

    r0: int
    r1: int
    c0: int
    c1: int
    diagonal: bool
    row_self: bool
    col_self: bool

    @property
    def key(self) -> str:
        return f"r{self.r0}-{self.r1}_c{self.c0}-{self.c1}"

    @property
    def pairs(self) -> int:
        n = self.r1 - self.r0
        return n * (n + 1) // 2 if self.diagonal else n * (self.c1 - self.c0)


def tiles_of(n: int, m: int | None, size: int) -> list[Tile]:
    """The tiles of an n x n symmetric matrix (``m`` None: the upper triangle)
    or an n x m rectangle, ``size`` models a side."""
    rows = [(s, min(s + size, n)) for s in range(0, n, size)]
    if m is None:
        return [Tile(r0, r1, c0, c1, i == j, i == j, i == j) for i, (r0, r1) in enumerate(rows)
                for j, (c0, c1) in enumerate(rows) if j >= i]
    cols = [(s, min(s + size, m)) for s in range(0, m, size)]
    return [Tile(r0, r1, c0, c1, False, j == 0, i == 0) for i, (r0, r1) in enumerate(rows)
            for j, (c0, c1) in enumerate(cols)]


def default_size(n: int, m: int | None, workers: int, most: int | None = None) -> int:
    """The largest tile side, at most ``most``, giving at least
    TILES_PER_WORKER tiles per worker."""
    want = TILES_PER_WORKER * max(1, workers)
    for size in range(min(max(n, m or 0), most or n + (m or 0)), 0, -1):
        k, l = math.ceil(n / size), math.ceil((m or n) / size)
        if (k * (k + 1) // 2 if m is None else k * l) >= want:
            return size
    return 1


# ------------------------------------------------------------ the store


def _feed(h: Any, value: Any) -> None:
    """Feed what ``value`` holds to the hash ``h``: arrays by dtype, shape and
    bytes (exact numbers by their repr), dataclasses (networks, measures) by
    their fields only, not values cached beside them, containers item by
    item, and plain values by repr.  Anything else is refused: a repr need not
    show the content (a network's names no weights), and a store keyed by it
    would hand one model's tiles to another."""
    if is_torch(value):
        value = torch_to_numpy(value)
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"array {a.dtype}{a.shape}".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"{type(value).__module__}.{type(value).__qualname__}(".encode())
        for f in dataclasses.fields(value):
            h.update(f.name.encode())
            _feed(h, getattr(value, f.name))
        h.update(b")")
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__}[{len(value)}]".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, Mapping):
        h.update(f"mapping[{len(value)}]".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _feed(h, value[k])
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes, Fraction, np.generic,
                                              sympy.Basic)):
        h.update(f"{type(value).__name__}:{value!r}".encode())
    else:
        raise TypeError(f"store= cannot identify a {type(value).__name__} by its content; compute this matrix "
                        "without store=")


def model_digest(model: Any) -> str:
    """SHA-256 of a model's kind, settings and weights (a Component layer by
    layer; a Network or Sum by its tensors' legs and data)."""
    h = hashlib.sha256()
    if not isinstance(model, Component):
        _feed(h, model)
        return h.hexdigest()
    for layer in model.layers:
        h.update(type(layer).__name__.encode())
        _feed(h, layer.settings())
        _feed(h, layer.named_weights())
    return h.hexdigest()


# Options that bound what may run (a flop budget), not the values it computes:
# not part of a store's identity, so that a rerun with another budget (the
# command line passes its default) resumes the store.  An option given as
# None is its default, as if absent.
_NOT_IDENTITY = ("budget",)


def _options_record(spec: Any, size: int, symmetric: bool) -> dict[str, Any]:
    """The options a store is valid for, JSON-able (the measure by its label
    and a digest of its defining fields)."""
    measure = None
    if spec.measure is not None:
        h = hashlib.sha256()
        _feed(h, spec.measure)
        measure = {"label": spec.measure.label, "digest": h.hexdigest()}
    record = {"inner": spec.inner, "method": spec.method, "centered": spec.centered, "measure": measure,
              "dtype": parse_dtype(spec.dtype), "options": {k: repr(v) for k, v in sorted(spec.options.items())
                                                    if k not in _NOT_IDENTITY and v is not None},
              "tile": size, "symmetric": symmetric}
    if spec.method == "sampled":  # estimates' tiles keep heavy-tail flags: resumed only under the rule that set them
        from ..algorithms.sampled import HEAVY_TAIL_VARIANCE_ERROR

        record["heavy_tails"] = f"variance error over {HEAVY_TAIL_VARIANCE_ERROR}"
    return record


def store_path(path: Any) -> Path:
    """``store=`` as a Path, refused by name when it cannot be a store: not
    a path, a file, under a file, or with a file where its tiles/ folder
    goes (checked before anything is computed)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"store= takes a directory path, got {path!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"store {path} is a file; store= takes a directory")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"store {path} is under {above}, a file; store= takes a directory")
    if (path / "tiles").exists() and not (path / "tiles").is_dir():
        raise ValueError(f"store {path}: its tiles folder {path / 'tiles'} is a file; store= takes a directory of "
                         "tiles (remove the file, or use a new directory)")
    return path


# What every refusal of an existing store says to do, spelled with store= so
# that the command line reads it as --store DIR, a usage error (exit 2) for
# any difference: of models, of options with or without a flag, of version.
_ELSEWHERE = "give store= a new directory"


def _said(key: str, then: Any, now: Any) -> tuple[str, str]:
    """Two differing values of the manifest's option ``key`` as a refusal
    names them: a measure by its label (with its digest where the labels
    agree), the others by their repr."""
    if key == "measure" and isinstance(then, dict) and isinstance(now, dict):
        same = then.get("label") == now.get("label")

        def one(m: dict[str, Any]) -> str:
            return repr(m.get("label")) + (f" (fields digest {str(m.get('digest'))[:12]}...)" if same else "")

        return one(then), one(now)
    return repr(then), repr(now)


class Store:
    """A directory of finished tiles (see the module docstring)."""

    def __init__(self, path: Any, options: dict[str, Any], rows: list[str], cols: list[str] | None) -> None:
        self.path = store_path(path)
        self.notes: list[str] = []  # the tiles found unusable (computed again): notes of the result
        self.manifest = {"version": STORE_VERSION, "options": options, "rows": rows, "cols": cols}
        # Every tile records this digest of the manifest and is read back only
        # under it: a tile left without its manifest (deleted, lost, copied in
        # from another store) cannot pass for this call's models and options.
        self.identity = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()
        file = self.path / "manifest.json"
        if not file.exists():
            try:
                (self.path / "tiles").mkdir(parents=True, exist_ok=True)
                # exclusively: two first calls on one new store, each finding no manifest, would both write
                # theirs, and the later one's options win though the other's tiles were computed under its own
                if self._write(file, json.dumps(self.manifest, indent=1).encode(), exclusive=True):
                    return
            except OSError as exc:
                raise ValueError(f"store {self.path} cannot be created ({exc.strerror or exc}); store= takes a "
                                 "directory this process can write") from None
        # an existing manifest, or one another call created first: its models and options must be these
        self._same(self._manifest_of(file))

    def writable(self) -> None:
        """Refuse, before a tile is computed, a store whose tiles cannot be
        written (read-only, full).  By writing a file: as root, permission
        bits (and os.access) say nothing of a read-only mount."""
        try:
            (self.path / "tiles").mkdir(exist_ok=True)  # removed since the store was made: made again
            fd, tmp = tempfile.mkstemp(dir=self.path / "tiles", prefix=".tmp-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise ValueError(f"store {self.path} cannot be written ({exc.strerror or exc}); store= takes a "
                             "directory this process can write (a complete store is read without writing)") from None

    def _manifest_of(self, file: Path) -> Any:
        """The JSON of an existing manifest; one that cannot be read (a
        directory, not JSON, truncated, not UTF-8) is refused as a store of
        another version is: the directory given is what to change, said with
        store= (the command line reads it as --store DIR, a usage error)."""
        try:
            old = json.loads(file.read_text(encoding="utf-8"))
            digests = lambda v: isinstance(v, list) and all(isinstance(d, str) for d in v)  # noqa: E731
            versioned = isinstance(old, dict) and "version" in old  # else: "no store version" (_same)
            if versioned and not isinstance(old.get("options"), dict):
                why = "its options are not an object"
            elif versioned and not (digests(old.get("rows")) and (old.get("cols") is None or digests(old.get("cols")))):
                why = "its rows or cols are not lists of model digests"  # edited: "'int' has no len()" was said
            else:
                return old
        except OSError as exc:
            why = exc.strerror or type(exc).__name__  # "Is a directory", "Permission denied"
        except UnicodeDecodeError:
            why = "not UTF-8 text"
        except ValueError as exc:  # json.JSONDecodeError: the position where it stops (truncated, not JSON)
            why = f"not JSON: {exc}"
        raise ValueError(f"store {self.path}: its manifest {file} is unreadable ({why}): it cannot say which "
                         "models and options the tiles beside it are of; give store= a new directory")

    def _same(self, old: Any) -> None:
        """Refuse a store written for other models or options, naming the
        difference: the options first (centered= also changes the models'
        digests, their output biases taken out), then the models."""
        new = self.manifest
        version = old.get("version") if isinstance(old, dict) else None
        if version != STORE_VERSION:
            # tiles of another layout cannot be resumed: as with other options, the directory is what to change
            # (said with store=, so the command line reads it as --store, a usage error)
            if isinstance(version, int):
                has = f"store version {version} ({'an older' if version < STORE_VERSION else 'a newer'} tsalgebra)"
            else:
                has = "no store version"
            raise ValueError(f"store {self.path} has {has}; this tsalgebra reads store version {STORE_VERSION} "
                             "only: give store= a new directory")
        was = old.get("options") if isinstance(old.get("options"), dict) else {}
        for k, v in new["options"].items():
            if k == "options":  # the keyword options (samples, seed...), one by one, as the call spells them
                a = was.get(k) if isinstance(was.get(k), dict) else {}
                for key in sorted(set(a) | set(v)):
                    if a.get(key) != v.get(key):
                        then = f"with {key}={a[key]}" if key in a else f"without {key}="
                        now = f"has {key}={v[key]}" if key in v else f"has no {key}="
                        raise ValueError(f"store {self.path} was written {then}, this call {now}; {_ELSEWHERE}, "
                                         "or the same options")
            elif was.get(k) != v:
                then, now = _said(k, was.get(k), v)
                raise ValueError(f"store {self.path} was written with {k}={then}, this call has {k}={now}; "
                                 f"{_ELSEWHERE}, or the same options")
        for side in ("rows", "cols"):
            a, b = old.get(side), new[side]
            if a != b:
                if a is None or b is None or len(a) != len(b):
                    what = f"{'no' if a is None else len(a)} models against {'no' if b is None else len(b)}"
                else:
                    k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                    what = f"model {k} differs (weights digest {a[k][:12]}... against {b[k][:12]}...)"
                raise ValueError(f"store {self.path} holds tiles of other models ({side}: {what}); {_ELSEWHERE}, "
                                 "or the models it was written for")

    @staticmethod
    def _write(file: Path, data: bytes, exclusive: bool = False) -> bool:
        """Atomically: a temporary file in the same directory, then renamed
        (``exclusive``: linked, and only where ``file`` does not exist: False
        then, the file left as it is)."""
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tmp-", suffix=file.suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if not exclusive:
                os.replace(tmp, file)
                return True
            try:
                os.link(tmp, file)  # whole or absent, and never over another's
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: renamed, as before (the race stays open there)
                os.replace(tmp, file)
            return True
        finally:
            with contextlib.suppress(OSError):  # gone where renamed
                os.unlink(tmp)

    def _file(self, tile: Tile) -> Path:
        return self.path / "tiles" / f"{tile.key}.npz"

    def read(self, tile: Tile) -> TileGram | None:
        """The stored tile, or None when it is absent, damaged or not written
        under this manifest for this position (then it is computed again: a
        stored number is used only if its tile was computed for these models,
        options, rows and columns, has the tile's shapes and is finite where
        the tile supplies it)."""
        file = self._file(tile)
        if file.is_dir():  # no tile can be written there: refused, not computed in vain
            raise ValueError(f"store {self.path}: {file} is a directory where a tile file belongs; remove it, or "
                             "give store= a new directory")
        if not file.exists():
            return None
        try:
            # the file opened here, closed here: numpy's own open stayed open where the zip was truncated
            with open(file, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if not isinstance(meta, dict):
                    raise _Unusable("its metadata is not a JSON object")
                if meta.get("store") != self.identity:
                    raise _Unusable("it was not computed under this manifest (other models or options)")
                if meta.get("rows") != [tile.r0, tile.r1] or meta.get("cols") != [tile.c0, tile.c1]:
                    raise _Unusable(f"it holds rows {meta.get('rows')} and columns {meta.get('cols')}, not this "
                                    "tile's (a tile file moved or copied)")
                g = TileGram(z["cross"], z["row_self"], z["col_self"], z["row_log_scale"], z["col_log_scale"],
                             str(meta["route"]), int(meta["flops"]), bool(meta["exact"]), str(meta["method"]),
                             float(meta["seconds"]), bool(meta["cosines"]),
                             z["stderr"] if "stderr" in z.files else None, z["heavy"] if "heavy" in z.files else None,
                             # what an older tile did not record: unknown
                             tuple(str(a) for a in meta.get("algorithms", ())), str(meta.get("device", "")),
                             int(meta.get("memory", 0)), _notes_of(meta.get("notes", [])))
            _check(tile, g)
            return g
        except _Unusable as exc:  # a tile file, but not one for this call's models, options and position
            self.notes.append(f"store tile {file.name} is unusable ({exc}): computed again")
            return None
        except Exception:  # noqa: BLE001 - whatever a damaged file raises (BadZipFile, EOFError, numpy's errors)
            # said in the store's words: the libraries' texts describe their own readers (numpy's suggests
            # allow_pickle=, which no tile needs and no untrusted file should be read with)
            why = "an empty file" if _size(file) == 0 else "not a tile this store wrote: truncated or corrupted"
            self.notes.append(f"store tile {file.name} is unreadable ({why}): computed again")
            return None

    def write(self, tile: Tile, g: TileGram) -> None:
        import io

        meta = json.dumps({"store": self.identity, "rows": [tile.r0, tile.r1], "cols": [tile.c0, tile.c1],
                           "route": g.route, "flops": g.flops, "exact": g.exact, "method": g.method,
                           "seconds": g.seconds, "cosines": g.cosines, "algorithms": list(g.algorithms),
                           "device": g.device, "memory": g.memory, "notes": list(g.notes)})
        buf = io.BytesIO()
        errors = {} if g.stderr is None else {"stderr": g.stderr, "heavy": g.heavy}
        np.savez(buf, cross=g.cross, row_self=g.row_self, col_self=g.col_self, row_log_scale=g.row_log_scale,
                 col_log_scale=g.col_log_scale, meta=np.array(meta), **errors)
        self._write(self._file(tile), buf.getvalue())


class _Unusable(ValueError):
    """Why a readable tile file is not used (said in the note as it is)."""


def _size(file: Path) -> int | None:
    try:
        return file.stat().st_size
    except OSError:
        return None


def _said_unusable(notes: Sequence[str]) -> None:
    """The store's unusable tiles as warnings too (at the caller: the command
    line's notes), as they are in the result's notes."""
    for note in notes:
        warn_at_caller(note)


def _notes_of(stored: Any) -> tuple[str, ...]:
    """A stored tile's notes (a list of strings; none in a tile of an older tsalgebra)."""
    if not isinstance(stored, list) or not all(isinstance(x, str) for x in stored):
        raise _Unusable("its notes are not a list of strings")
    return tuple(stored)


def _check(t: Tile, g: TileGram) -> None:
    """ValueError unless ``g`` has ``t``'s shapes and finite values where ``t`` supplies them."""
    n, m = t.r1 - t.r0, (t.r1 - t.r0) if t.diagonal else t.c1 - t.c0
    shapes = {"cross": (g.cross.shape, (n, m)), "row_self": (g.row_self.shape, (n,)),
              "col_self": (g.col_self.shape, (m,)), "row_log_scale": (g.row_log_scale.shape, (n,)),
              "col_log_scale": (g.col_log_scale.shape, (m,))}
    if g.cosines and g.stderr is None and "sampled" in g.method.split("/"):
        raise _Unusable("its estimated cosines have no standard errors")
    if g.stderr is not None:
        if g.heavy is None or g.heavy.dtype != bool:
            raise _Unusable("its estimated cosines have no heavy-tail flags")
        shapes["stderr"] = (g.stderr.shape, (n, m))
        shapes["heavy"] = (g.heavy.shape, (n, m))
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise _Unusable(f"{name} has shape {tuple(got)}, the tile needs {want}")
    needed = [g.cross, g.row_log_scale, g.col_log_scale] + ([g.row_self] if t.row_self else []) + (
        [g.col_self] if t.col_self and not t.diagonal else [])
    if not all(np.isfinite(np.asarray(a, dtype=float)).all() for a in needed):
        raise _Unusable("a value is not finite")


# ------------------------------------------------------------ the cluster


@contextlib.contextmanager
def _client(tiling: Tiling) -> Iterator[tuple[Any, str, int]]:
    """(dask client or None, where, workers) for the call's tiling."""
    if tiling.client is None and tiling.scheduler is None and tiling.workers is None:
        yield None, "this process", 1
        return
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ImportError("client=, scheduler= and workers= need dask.distributed: pip install "
                          "'tsalgebra[distributed]'") from None
    if sum(v is not None for v in (tiling.client, tiling.scheduler, tiling.workers)) > 1:
        raise ValueError("give one of client=, scheduler= and workers=")
    if tiling.client is not None:
        if not isinstance(tiling.client, Client):
            raise TypeError(f"client= takes a dask.distributed.Client, got {type(tiling.client).__name__} "
                            f"{tiling.client!r:.60}")
        if tiling.client.status in ("closing", "closed") or tiling.client.scheduler is None:
            raise ValueError(f"client= is {tiling.client.status}: give an open dask.distributed.Client")
        where = f"client of {tiling.client.scheduler.address}"
        yield tiling.client, where, _workers_of(tiling.client, where)
    elif tiling.scheduler is not None:
        try:
            client = Client(tiling.scheduler, timeout=CONNECT_SECONDS)
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            raise OSError(f"cannot reach the dask scheduler at {tiling.scheduler!r} within {CONNECT_SECONDS} s: "
                          f"{exc}") from None
        with client:
            where = f"scheduler {tiling.scheduler}"
            yield client, where, _workers_of(client, where)
    else:
        n, most = tiling.workers, WORKERS_PER_CPU * (os.cpu_count() or 1)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"workers must be a positive number of worker processes, got {n!r}")
        if n > most:
            raise ValueError(f"workers={n} is more than {most} local worker processes ({WORKERS_PER_CPU} per CPU of "
                             f"this machine's {os.cpu_count() or 1}); for a larger cluster start one and give "
                             "scheduler= its address")
        n = int(n)
        # The nannies run in this process and, before spawning each worker, write the workers' environment (one
        # BLAS thread, dask's malloc trim and hash seed: distributed.nanny.pre-spawn-environ) into its os.environ,
        # where every later subprocess of the caller would inherit it.  A spawned worker has its own copy (a nanny
        # restarting one writes it again first), so the keys the start changed are put back once the cluster is
        # up, and again on leaving.
        before = dict(os.environ)
        changed: set[str] | None = None
        try:
            # one thread per worker process: each tile's BLAS has the process to itself
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                    Client(cluster) as client:
                changed = _restore_environ(before)
                print(f"tsalgebra: local dask cluster of {n} workers, dashboard {client.dashboard_link}",
                      file=sys.stderr)
                yield client, f"local cluster of {n} workers", n
        finally:
            _restore_environ(before, changed)


def _restore_environ(before: Mapping[str, str], keys: set[str] | None = None) -> set[str]:
    """Put ``keys`` of os.environ (None: every key) back as in ``before``,
    absent where they were absent; the keys that differed."""
    keys = set(before) | set(os.environ) if keys is None else keys
    differ = {k for k in keys if os.environ.get(k) != before.get(k)}
    for k in differ:
        if k in before:
            os.environ[k] = before[k]
        else:
            os.environ.pop(k, None)
    return differ


def _workers_of(client: Any, where: str) -> int:
    """The workers of a client's cluster, waiting up to WORKERS_SECONDS for
    the first to join: with none, the tiles would wait for ever."""
    n = len(client.scheduler_info().get("workers", {}))
    if n == 0:
        try:
            client.wait_for_workers(1, timeout=WORKERS_SECONDS)
        except TimeoutError:  # dask's WorkerStartTimeoutError is one
            raise TimeoutError(f"the {where} has no workers: none joined within {WORKERS_SECONDS} s; start "
                               "workers for it, or give workers= for a local cluster") from None
        n = len(client.scheduler_info().get("workers", {}))
    return n


def _stored_size(store: Any) -> int | None:
    """The tile size of an existing store (a rerun without ``tile=`` resumes
    it, whatever the workers now), None when there is none to read."""
    try:
        size = json.loads((Path(store) / "manifest.json").read_text())["options"]["tile"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _worker_memory(client: Any) -> int | None:
    """The smallest memory limit of the cluster's workers (bytes), if they have one."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info().get("workers", {}).values()]
    limits = [x for x in limits if x > 0]
    return min(limits) if limits else None


def tiled(rows: list[Any], cols: list[Any] | None, labels: Sequence[str] | None, col_labels: Sequence[str] | None,
          spec: Any, tiling: Tiling, progress: bool | None, started: float) -> SimilarityMatrix:
    """The matrix of :func:`tsalgebra.similarity_matrix` (``cols`` None) or
    :func:`tsalgebra.cross_similarity_matrix`, in tiles (module docstring)."""
    from dataclasses import replace

    from .api import compute_tile, judge_tiles, preparation_bytes

    n, m = len(rows), None if cols is None else len(cols)
    if tiling.store is not None:
        store_path(tiling.store)  # a path that cannot be a store: said before a cluster starts
    if tiling.tile is not None and (isinstance(tiling.tile, bool) or not isinstance(tiling.tile, (int, np.integer))
                                    or tiling.tile < 1):
        raise ValueError(f"tile must be a positive number of models, got {tiling.tile!r}")
    if tiling.tile is not None:
        tiling = replace(tiling, tile=int(tiling.tile))  # a numpy integer as Python's (the manifest records it)
    with _client(tiling) as (client, where, workers):
        memory = _worker_memory(client) if client is not None else None
        if memory is not None and spec.max_memory is None:  # the routes' blocks within a quarter of a worker's
            spec = replace(spec, max_memory=memory // 4)       # limit, as on one machine
        # a tile's two sides of prepared models (about their weights' size) within its memory bound
        bound = spec.max_memory or memory
        per_model = max(preparation_bytes([x]) for x in rows + (cols or []))
        most = None if bound is None else max(1, int(bound // max(1, 2 * per_model)))
        size = tiling.tile or _stored_size(tiling.store) or default_size(n, m, workers, most)
        tiles = tiles_of(n, m, size)
        store = None
        if tiling.store is not None:
            store = Store(tiling.store, _options_record(spec, size, cols is None), [model_digest(x) for x in rows],
                          None if cols is None else [model_digest(x) for x in cols])
        done: dict[Tile, TileGram] = {}
        if store is not None:
            for t in tiles:
                g = store.read(t)
                if g is not None:
                    done[t] = g
        todo = [t for t in tiles if t not in done]
        if store is not None and todo:  # before any is computed (a complete store is only read)
            store.writable()
        if todo:  # the budget on the whole matrix's cost, before any tile runs (a complete store is only read)
            judge_tiles(rows, cols, spec, [_parts(rows, cols, t) for t in tiles])
        from_store = len(done)
        bar = progress_bar(len(tiles), f"similarity matrix ({len(tiles)} tiles of {size}, {where})", "tile", progress,
                           len(todo) > 1)
        bar.update(from_store)
        bar.set_postfix(pairs=sum(t.pairs for t in done))

        def finish(t: Tile, g: TileGram) -> None:
            try:
                _check(t, g)
            except ValueError as exc:
                raise ArithmeticError(f"tile {t.key} ({g.route}) came back unusable: {exc}") from None
            if store is not None:
                store.write(t, g)  # before anything else: an interruption keeps it
            done[t] = g
            bar.update(1)
            bar.set_postfix(pairs=sum(x.pairs for x in done))

        try:
            if client is None:
                for t in todo:
                    finish(t, _run_tile(compute_tile, rows, cols, t, spec))
            elif todo:
                from dask.distributed import as_completed

                # each model sent once and held by two workers, so that a worker's death loses no model
                # (scattered data has no recipe to recompute it); the tasks refer to the copies
                # (keys unique to this call: content-hashed keys of an earlier call may be in release)
                scattered_rows = client.scatter(rows, hash=False)
                scattered_cols = None if cols is None else client.scatter(cols, hash=False)
                if workers > 1:
                    client.replicate(scattered_rows + (scattered_cols or []), n=2)

                def submit(t: Tile, r: list[Any], c: list[Any] | None) -> Any:
                    return client.submit(compute_tile, r, c, spec, t.row_self or t.col_self, pure=False)

                columns = scattered_rows if cols is None else scattered_cols
                futures = {submit(t, scattered_rows[t.r0:t.r1], None if t.diagonal else columns[t.c0:t.c1]): t
                           for t in todo}
                retried: dict[Tile, int] = {}
                pending = as_completed(list(futures))
                try:
                    for f in pending:
                        t = futures.pop(f)
                        try:
                            g = f.result()
                        except CancelledError:
                            # a killed worker's tile whose inputs the scheduler dropped with it (seen under
                            # load, the copies replicated or not): its models sent again, the tile again
                            if retried.get(t, 0) >= TILE_RETRIES:
                                raise
                            retried[t] = retried.get(t, 0) + 1
                            r, c, _ = _parts(rows, cols, t)
                            again = submit(t, client.scatter(r, hash=False),
                                           None if c is None else client.scatter(c, hash=False))
                            futures[again] = t
                            pending.add(again)
                            continue
                        finish(t, g)
                except BaseException:
                    client.cancel(list(futures))
                    raise
        finally:
            bar.close()
    unusable = () if store is None else tuple(dict.fromkeys(store.notes))
    _said_unusable(unusable)
    return _assemble(rows, cols, tiles, done, spec, labels, col_labels, size, todo, from_store, where,
                     None if store is None else str(store.path), started, unusable)


def _parts(rows: list[Any], cols: list[Any] | None, t: Tile) -> tuple[list[Any], list[Any] | None, bool]:
    """A tile's rows, its columns (None: a diagonal tile, its rows) and whether it computes its self products."""
    return rows[t.r0:t.r1], None if t.diagonal else (rows if cols is None else cols)[t.c0:t.c1], t.row_self or t.col_self


def _run_tile(compute: Any, rows: list[Any], cols: list[Any] | None, t: Tile, spec: Any) -> TileGram:
    r, c, selfs = _parts(rows, cols, t)
    return compute(r, c, spec, selfs)


def _assemble(rows: list[Any], cols: list[Any] | None, tiles: list[Tile], done: dict[Tile, TileGram], spec: Any,
              labels: Sequence[str] | None, col_labels: Sequence[str] | None, size: int, computed: list[Tile],
              from_store: int, where: str, store: str | None, started: float,
              unusable: tuple[str, ...] = ()) -> SimilarityMatrix:
    """Cosines from the tiles, each on its own scale (module docstring)."""
    from .api import DIGITS_NOTE, FLOAT32_NOTE, norms_of

    sym = cols is None
    n, m = len(rows), len(rows) if sym else len(cols)  # type: ignore[arg-type]
    log_norm_r, log_norm_c = np.full(n, np.nan), np.full(m, np.nan)
    for t, g in done.items():
        if t.row_self:
            log_norm_r[t.r0:t.r1] = _log_norms(g.row_self, g.row_log_scale, "row model" if not sym else "model", t.r0)
        if t.col_self and not sym:
            log_norm_c[t.c0:t.c1] = _log_norms(g.col_self, g.col_log_scale, "column model", t.c0)
    if sym:
        log_norm_c = log_norm_r
    unit = np.zeros((n, m))
    estimated = any(g.stderr is not None for g in done.values())
    se = np.zeros((n, m)) if estimated else None  # the estimated cosines' standard errors
    heavy = np.zeros((n, m), dtype=bool) if estimated else None  # and which are heavy-tailed
    for t, g in done.items():
        rl = g.row_log_scale[:, None] - log_norm_r[t.r0:t.r1, None]
        if t.diagonal:
            cl = g.row_log_scale[None, :] - log_norm_r[None, t.r0:t.r1]
        else:
            cl = g.col_log_scale[None, :] - log_norm_c[None, t.c0:t.c1]
        if g.cosines:  # the tile's own cosines (a joint estimate per pair: see Gram)
            block = g.cross
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                block = g.cross * np.exp(rl + cl)
        unit[t.r0:t.r1, t.c0:t.c1] = block
        if se is not None and g.stderr is not None:
            se[t.r0:t.r1, t.c0:t.c1] = g.stderr
            heavy[t.r0:t.r1, t.c0:t.c1] = g.heavy  # type: ignore[index]
        if sym:
            unit[t.c0:t.c1, t.r0:t.r1] = block.T
            if se is not None and g.stderr is not None:
                se[t.c0:t.c1, t.r0:t.r1] = g.stderr.T
                heavy[t.c0:t.c1, t.r0:t.r1] = g.heavy.T  # type: ignore[index, union-attr]
    dtype = parse_dtype(spec.dtype)
    cos = cosines(unit, np.ones((n, 1)), np.ones((1, m)), spec.inner, tol=1e-8 if dtype == "float64" else 1e-3,
                  sides=("row model", "column model"))
    if sym:
        cos = (cos + cos.T) / 2
        np.fill_diagonal(cos, 1.0)
        if se is not None:
            np.fill_diagonal(se, 0.0)
    cos = cos.astype(dtype)
    grams = list(done.values())
    routes = Counter(done[t].route for t in computed)
    exact = all(g.exact for g in grams)
    methods = sorted({g.method for g in grams})
    flops = sum(g.flops for g in grams)
    worker_seconds = sum(done[t].seconds for t in computed)
    report = TileReport(size, len(tiles), len(computed), from_store, dict(routes), where, store, worker_seconds)
    norms_r, norms_c, said = norms_of(log_norm_r, log_norm_c, sym)
    # what the tiles ran on and within (tiles stored by an older tsalgebra did not say: the call's arguments)
    devices = sorted({g.device for g in grams if g.device})
    memory = max((g.memory for g in grams), default=0) or int(spec.max_memory or 0)
    return SimilarityMatrix(
        values=cos, route="tiles:" + "+".join(sorted({g.route for g in grams})), flops=int(flops), inner=spec.inner,
        method="/".join(methods), exact=exact, norms=norms_r, col_norms=norms_c, symmetric=sym,
        centered=spec.centered, measure=spec.measure.label if spec.measure is not None else "", dtype=dtype,
        device="/".join(devices) or str(spec.device or "numpy"), max_memory=memory,
        steps=(StepTime("tiles", int(flops), worker_seconds),),
        seconds=time.perf_counter() - started, labels=tuple(labels) if labels else None,
        col_labels=(tuple(labels) if labels else None) if sym else (tuple(col_labels) if col_labels else None),
        notes=(f"{len(tiles)} tiles of {size} models a side ({len(computed)} computed, {from_store} from the store) "
               f"on {where}",) + ((JOINT_NOTE,) if any(g.cosines for g in grams) else ())
        + ((FLOAT32_NOTE,) if str(dtype) == "float32" and "exact" in methods else ())
        + ((DIGITS_NOTE,) if not exact and methods == ["exact"] and str(dtype) == "float64" else ())
        + unusable + _tile_notes(tiles, done) + (() if heavy is None else heavy_note(heavy, sym)) + said,
        tiles=report,
        stderr=se, heavy_tailed=heavy,
        log_norms=log_norm_r, col_log_norms=log_norm_c,
        algorithms=tuple(sorted({a for g in grams for a in g.algorithms})))


def _tile_notes(tiles: list[Tile], done: dict[Tile, TileGram]) -> tuple[str, ...]:
    """The tiles' own notes (on their routes' choice: a tile that went pair
    by pair says so), each once, in the order of the tiles that first said
    it (tiles stored by an older tsalgebra have none)."""
    return tuple(dict.fromkeys(note for t in tiles if t in done for note in done[t].notes))


def _log_norms(selfs: np.ndarray, log_scale: np.ndarray, side: str, offset: int) -> np.ndarray:
    bad = np.flatnonzero(~(np.asarray(selfs) > 0))
    if bad.size:
        raise ValueError(f"{side} {offset + int(bad[0])} has zero norm; the similarity is undefined")
    return 0.5 * np.log(selfs) + log_scale
