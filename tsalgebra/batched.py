"""Similarity matrices of many models at once.

:func:`similarity_matrix` (N x N) and :func:`cross_similarity_matrix` (N x M)
compute every model's norm once and every pair's inner product in batch,
from stacked weights, with batched matrix products.  The whole computation
is one tensor network with a model leg per side, e.g. for one bilinear layer

    'ahi,ahj,aoh,bki,bkj,bok->ab'   (L, R, D of model a; L, R, D of model b)

and two of its contraction orders are executed as *routes* (plus the
pairwise fallback):

- ``"pairwise-gram"``: the cross Grams La Lb^T, Ra Rb^T, La Rb^T, Ra Lb^T and
  Da^T Db of every pair, as one big matrix product per block of models, then
  the Hadamard core of section 3.2 of the design note (for stacks: the Gram
  recursion of section 3.3 batched over pairs, G of shape (a, w_a, b, w_b)).
  About 8 h^2 d + 2 h^2 o flops per pair.
- ``"materialize"`` (one bilinear layer): each model's symmetric padded
  coefficient tensor S[o, i, j] is formed once (about 2 o h d^2 flops per
  model), only its upper triangle kept (in blocks; entries off the diagonal
  blocks times sqrt 2), and the matrix is one Gram of those rows (about o d^2
  per pair).  Wins by a wide margin when h^2 > o d.  Two formations (see
  :class:`_Formation`): a GEMM per output, then the blocks of T + T^T (large
  h), or the upper block triangle straight from the symmetric CP form (small
  h); the planner picks by cost.
- symmetric matrices use the symmetry: pairwise-gram computes the blocks
  i <= j only (numpy multiplies a diagonal block by syrk), materialize one
  Gram of one set of rows.

The flops of each route are counted by the planner
(:func:`tsalgebra.planner.plan_equation`, one plan per einsum step) for the
block sizes that fit the memory bound ``max_memory``; ``route="auto"`` takes
the cheaper route that fits, and the result says which route ran and what
each candidate would have cost.  Anything the batched routes do not cover
(deeper models under the gaussian or symmetric product, Polynomial models,
exact/symbolic weights that do not convert to floats, ``method="closure"``,
another ``degree``) takes route ``"pairwise"``: each norm once with
:func:`tsalgebra.inner` and each pair with it, behind a progress bar.

Inner products in batch, on padded factors L~, R~ (H, d+1), D~ (o+1, H), outputs
1..o:

- symmetric: <a, b>_S = sum_{o,i,j} S_a[o,i,j] S_b[o,i,j],
  S[o,i,j] = sum_h D[o,h] (L[h,i] R[h,j] + R[h,i] L[h,j]) / 2;
- network: the Gram recursion (equal to the symmetric one at depth 1);
- gaussian, x ~ N(m, C): the input is rewritten x = m + F z with C = F F^T,
  z ~ N(0, I), so L~ and R~ become L~ P, R~ P with P = [[1, 0], [m, F]].  For
  z ~ N(0, I) and f_o = c + b.z + z'Az (c = S[o,0,0], b = 2 S[o,0,1:],
  A = S[o,1:,1:]),  E[f_o g_o] = 2 tr(A_f A_g) + b_f.b_g + (c_f + tr A_f)(c_g + tr A_g),
  which is the Frobenius product of S' = sqrt(2) S + m' e0 e0^T with
  m' = (1 - sqrt 2) c + tr A (centred: m' = -sqrt(2) c, dropping the mean
  product).  S' is again a symmetric CP tensor: D' = [sqrt(2) D, m'],
  L' = [L; e0], R' = [R; e0].  So every batched inner product is a Frobenius
  product of symmetric CP tensors, or the Gram recursion.

Engines: with ``device=None`` the inputs and the result are numpy and the
routes compute in numpy, where large ones run one worker thread per BLAS
thread, each with a single BLAS thread (materialize: groups of models and of
features; pairwise-gram: block pairs in turn); stacks on a single BLAS thread
compute in torch on the CPU.  ``device="numpy"`` forces numpy throughout.  A
torch device (``"cpu"``, ``"cuda"``...) computes everything in torch there.

Scale: each factor is divided by its Frobenius norm before anything is
formed, and in stacks each intermediate Gram G[a, b] by sqrt(|G[a,a]| |G[b,b]|);
the cosine is invariant to both, the norms are rebuilt in float64 logarithms.
So float32 and vocabulary-scale outputs do not overflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .components import Bilinear, Component
from .inner import inner as _pair_inner
from .planner import ContractionPlan, plan_equation
from .folding import fold

__all__ = ["SimilarityMatrix", "RouteCost", "StepTime", "similarity_matrix", "cross_similarity_matrix", "ROUTES"]

ROUTES = ("auto", "materialize", "pairwise-gram", "pairwise")
_INNERS = ("gaussian", "symmetric", "network")
_METHODS = ("auto", "exact", "closure")
_SQRT2 = math.sqrt(2.0)
_FALLBACK_MEMORY = 2 * 2**30
# A progress bar is offered (progress=None: shown on a terminal) above this much work.
_LONG_FLOPS = 2e10
_LONG_PAIRS = 50
# Blocks of the pairwise-gram route: at least this many stacked rows per block
# (smaller matrix products lose BLAS efficiency) and at most this many blocks
# per side when memory does not force more (more blocks skip more of the
# symmetric matrix's lower triangle, at smaller products).
_MIN_BLOCK_ROWS = 1024
_MAX_SYM_BLOCKS = 8
# On CPUs the blocks are also kept near these sizes when memory allows more:
# buffers of pairwise-gram blocks that small are recycled by the allocator,
# while fresh large ones cost page faults (on the VMs measured, touching new
# memory took up to ~2 ms per MiB), and the products are already large enough
# for full BLAS speed.  The materialize route's buffer of flattened tensors is
# allocated once per call and reused by every feature chunk: its huge-page
# faults took 0.03-0.7 s of kernel time per call here at 263-290 MB (all ten
# outputs of 100 models at d = 256), 0.00-0.04 s at 145 MB (five); where the
# chunks are ranges of outputs, the formation's products are cut to the
# chunk's outputs rather than the chunk grown to a product's.
_PG_WORKING_SET = 64 * 2**20
_MAT_WORKING_SET = 160 * 2**20
# The materialize route forms each model's tensors a few outputs at a time, so
# that the scaled operand and the product stay near this size.
_FORM_CACHE = 8 * 2**20
# Formation of the materialize route (see _Formation): rows per product of the
# triangle formation, and the flop-equivalent of one pass over one entry
# (measured here: symmetrizing and packing a 257 x 257 output, two passes, took
# about as long as 100 GEMM flops per entry).
_TRI_ROWS = 256
_PASS_FLOPS = 50
# Diagonal blocks of the packed layout (see _packed_blocks) have at most this
# many rows: larger ones add Gram features, smaller ones more calls (a 257 x 257
# output took 49 us at 32, 63 us at 16, against 94 us for a gather of the
# triangle here).
_PACK_LEAF = 32
# The routes run in threads on numpy (see _run_materialize, _run_jobs) when
# forming one side's models, or all block pairs, take at least this many flops
# (about a millisecond of BLAS, what the thread pool and the BLAS limit cost).
_THREADED_FLOPS = 10**8
# The materialize route's Gram of the flattened tensors (a short, very wide
# product, once per feature chunk) stays in the engine that formed them: on
# numpy, handing it to torch (MKL) was faster alone but slower after numpy's
# formation here (both libraries' thread pools then compete for the cores).
# Numpy takes it in row blocks (OpenBLAS's syrk on that shape ran at a third of
# its GEMM rate), torch in column chunks.
_GRAM_ROWS = 25
_GRAM_COLUMNS = 8192


# ------------------------------------------------------------ results


@dataclass(frozen=True)
class RouteCost:
    """A candidate route: planner flops for the block sizes that fit the memory
    bound, the estimated peak bytes of its blocks, and how it is blocked."""

    route: str
    flops: int
    peak_bytes: int
    fits: bool
    blocking: str
    plans: tuple[tuple[str, ContractionPlan], ...] = ()

    def __repr__(self) -> str:
        fit = "" if self.fits else ", does not fit"
        return f"RouteCost({self.route}: {self.flops:.3g} flops, {self.peak_bytes / 2**20:.1f} MiB peak, {self.blocking}{fit})"


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
    route would have cost; ``exact`` is False only for approximations (closure).
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

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def dominant_step(self) -> StepTime | None:
        """The step that took the most time (None for the pairwise route)."""
        return max(self.steps, key=lambda s: s.seconds) if self.steps else None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.values, dtype=dtype)

    def __repr__(self) -> str:
        n, m = self.values.shape
        flags = [self.inner, self.method + ("" if self.exact else " (approximate)"), f"route {self.route}"]
        if self.centered:
            flags.append("centred")
        if self.measure:
            flags.append(self.measure)
        flags.append(f"{self.dtype} on {self.device}")
        return (f"SimilarityMatrix({n} x {m}{', symmetric' if self.symmetric else ''}; {', '.join(flags)}; "
                f"{self.flops:.3g} flops in {self.seconds:.3g} s)")

    def plot(self, path: str | os.PathLike | None = None, ax: Any = None, labels: Sequence[str] | None = None,
             col_labels: Sequence[str] | None = None, title: str | None = None, annotate: bool | None = None) -> Any:
        """A heatmap of the cosines (colour scale fixed to [-1, 1]); returns the figure.

        Draws into ``ax`` when given; otherwise on a new figure made without
        pyplot (Agg canvas), saved to ``path`` when given.  ``labels`` name the
        rows (and the columns of a symmetric matrix); by default the labels the
        models were given under, if any.  ``annotate`` writes the values in the
        cells (default: for matrices up to 12 x 12).
        """
        from matplotlib.figure import Figure

        vals = np.asarray(self.values, dtype=float)
        n, m = vals.shape
        rows = list(labels) if labels is not None else (list(self.labels) if self.labels else None)
        if col_labels is not None:
            cols = list(col_labels)
        elif self.symmetric:
            cols = rows
        else:
            cols = list(self.col_labels) if self.col_labels else None
        if ax is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            size = min(12.0, 3.0 + 0.25 * max(n, m))
            fig = Figure(figsize=(size * 1.15, size))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1, 1)
        else:
            fig = ax.figure
        im = ax.imshow(vals, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine")
        for setter, names, count in ((ax.set_yticks, rows, n), (ax.set_xticks, cols, m)):
            if names is not None:
                if len(names) != count:
                    raise ValueError(f"{len(names)} labels for {count} models")
                setter(range(count), labels=[str(x) for x in names])
        if cols is not None:
            for lab in ax.get_xticklabels():
                lab.set_rotation(90)
        if annotate is None:
            annotate = max(n, m) <= 12
        if annotate:
            for i in range(n):
                for j in range(m):
                    ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(vals[i, j]) > 0.6 else "black")
        ax.set_title(title or f"{self.inner} similarity ({self.route})")
        if path is not None:
            fig.savefig(path, bbox_inches="tight")
        return fig


# ------------------------------------------------------------ backends


def _parse_dtype(dtype: Any) -> str:
    if dtype is None:
        return "float64"
    if type(dtype).__module__.split(".")[0] == "torch":
        name = str(dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    name = name.lower()
    name = {"double": "float64", "float": "float32", "single": "float32", "f8": "float64", "f4": "float32",
            "<f8": "float64", "<f4": "float32", "d": "float64", "f": "float32"}.get(name, name)
    if name not in ("float64", "float32"):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    return name


class _Ops:
    """The few array operations the routes need, on numpy or on torch (any device)."""

    def __init__(self, dtype: str, device: Any) -> None:
        self.dtype_name = dtype
        self.itemsize = 8 if dtype == "float64" else 4
        self.is_torch = device is not None
        if self.is_torch:
            import torch

            self.t = torch
            self.device = torch.device(device)
            self.dtype = getattr(torch, dtype)
            self.cuda = self.device.type == "cuda"
            self.name = str(self.device)
        else:
            self.device = None
            self.dtype = np.dtype(dtype)
            self.cuda = False
            self.name = "numpy"

    def put(self, a: np.ndarray) -> Any:
        if self.is_torch:
            return self.t.as_tensor(np.ascontiguousarray(a), dtype=self.dtype, device=self.device)
        return np.ascontiguousarray(a, dtype=self.dtype)

    def get(self, x: Any) -> np.ndarray:
        if self.is_torch:
            return x.detach().to("cpu").numpy()
        return np.asarray(x)

    def perm(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.permute(*axes) if self.is_torch else x.transpose(axes)

    def mT(self, x: Any) -> Any:
        return x.transpose(-1, -2) if self.is_torch else x.swapaxes(-1, -2)

    def contig(self, x: Any) -> Any:
        return x.contiguous() if self.is_torch else np.ascontiguousarray(x)

    def put_index(self, idx: np.ndarray) -> Any:
        if self.is_torch:
            return self.t.as_tensor(idx, dtype=self.t.int64, device=self.device)
        return np.asarray(idx, dtype=np.intp)

    def empty(self, size: int) -> Any:
        if self.is_torch:
            return self.t.empty(size, dtype=self.dtype, device=self.device)
        return np.empty(size, dtype=self.dtype)

    def einsum(self, eq: str, *ops: Any) -> Any:
        return self.t.einsum(eq, *ops) if self.is_torch else np.einsum(eq, *ops)

    def row_sq(self, X: Any) -> np.ndarray:
        """Squared norms of the rows of a 2-D array (no temporary of X's size)."""
        if self.is_torch:
            return self.get(self.t.linalg.vector_norm(X, dim=1) ** 2).astype(float)
        return np.einsum("ij,ij->i", X, X).astype(float)

    def wide_gram(self, X: Any, Y: Any, pool: Any = None, parts: int = 1) -> Any:
        """X @ Y^T for short, very wide X and Y.  On torch CPUs summed over
        column chunks of _GRAM_COLUMNS (measured 20 % faster than one call on
        100 x 330,000 operands here); on numpy, X @ X^T by row blocks of
        _GRAM_ROWS, the blocks on and above the diagonal only, and with a
        ``pool``, ``parts`` column groups in its threads, summed."""
        if self.cuda:
            return X @ self.mT(Y)
        if self.is_torch:
            G = self.t.zeros((X.shape[0], Y.shape[0]), dtype=X.dtype, device=X.device)
            for c in range(0, X.shape[1], _GRAM_COLUMNS):
                G += X[:, c : c + _GRAM_COLUMNS] @ Y[:, c : c + _GRAM_COLUMNS].T
            return G
        if pool is None or parts < 2:
            return _numpy_gram(X, Y, X is Y)
        cols = _partition(X.shape[1], -(-X.shape[1] // parts))
        return sum(f.result() for f in [pool.submit(_numpy_gram, X[:, a:b], Y[:, a:b], X is Y) for a, b in cols])

    def core(self, Z: Any, p: int, q: int) -> Any:
        """LL * RR + LR * RL from the quadrants of Z = [L; R] G [L; R]^T
        (2-D, L rows first: p of them, L columns first: q of them)."""
        out = Z[:p, :q] * Z[p:, q:]
        out += Z[:p, q:] * Z[p:, :q]
        return out

    def core_batched(self, Z: Any, H: int) -> Any:
        """The same with the hidden axes last: Z of shape (..., 2H, 2H)."""
        LL, RR, LR, RL = Z[..., :H, :H], Z[..., H:, H:], Z[..., :H, H:], Z[..., H:, :H]
        if self.is_torch:
            return (LL * RR).addcmul_(LR, RL)
        out = LL * RR
        out += LR * RL
        return out

    def sync(self) -> None:
        if self.cuda:
            self.t.cuda.synchronize(self.device)

    def default_memory(self) -> int:
        if self.cuda:
            try:
                free, _ = self.t.cuda.mem_get_info(self.device)
                return int(free) // 4
            except Exception:  # pragma: no cover - depends on the device
                return _FALLBACK_MEMORY
        return _available_ram() // 4


def _numpy_gram(X: np.ndarray, Y: np.ndarray, same: bool) -> np.ndarray:
    if not same:
        return X @ Y.T
    G = np.empty((X.shape[0], X.shape[0]), dtype=X.dtype)
    for a0, a1 in _partition(X.shape[0], _GRAM_ROWS):
        G[a0:a1, a0:] = X[a0:a1] @ X[a0:].T
        G[a1:, a0:a1] = G[a0:a1, a1:].T
    return G


def _blas_threads() -> int:
    """Threads of the BLAS library numpy calls (1 when none is found)."""
    from threadpoolctl import ThreadpoolController

    return max((lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers), default=1)


def _available_ram() -> int:
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * _FALLBACK_MEMORY


class _Clock:
    """Accumulates wall time and planner flops per step name."""

    def __init__(self, ops: _Ops) -> None:
        self.ops = ops
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self._t = 0.0

    def start(self) -> None:
        self.ops.sync()
        self._t = time.perf_counter()

    def lap(self, name: str, flops: float) -> None:
        self.ops.sync()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self.flops[name] = self.flops.get(name, 0) + int(flops)
        self._t = now

    def absorb(self, other: _Clock, share: float) -> None:
        """Add ``other``'s steps, its times times ``share`` (1/workers for a
        worker thread's clock: the steps then split the wall time the workers
        spent together)."""
        for k, s in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + share * s
            self.flops[k] = self.flops.get(k, 0) + other.flops[k]

    def steps(self) -> tuple[StepTime, ...]:
        return tuple(StepTime(k, self.flops[k], self.seconds[k]) for k in self.seconds)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


def _progress(total: int, desc: str, unit: str, show: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=(None if show is None else not show),
                file=sys.stderr, leave=False, dynamic_ncols=True)


# ------------------------------------------------------ planner costs


class _Costs:
    """Planner flop counts of the einsum steps, memoized by shapes."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, tuple[tuple[int, ...], ...]], ContractionPlan] = {}

    def plan(self, eq: str, *shapes: tuple[int, ...]) -> ContractionPlan:
        key = (eq, tuple(tuple(int(s) for s in sh) for sh in shapes))
        p = self._memo.get(key)
        if p is None:
            p = self._memo[key] = plan_equation(eq, key[1])
        return p

    def flops(self, eq: str, *shapes: tuple[int, ...]) -> int:
        return self.plan(eq, *shapes).flops


_COSTS = _Costs()


# ------------------------------------------------------ model preparation


@dataclass
class _Chain:
    """A model as normalized bilinear blocks (L, R, D) on padded widths; the
    last D without the constant channel.  ``log_scales[l]`` is
    log(|L~| |R~| |D~|) of the layer (Frobenius norms divided out)."""

    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    log_scales: np.ndarray


def _measure_factor(d: int, mean: Any, cov: Any) -> tuple[np.ndarray | None, str]:
    """P with x~ = P z~ for x ~ N(mean, cov), z ~ N(0, I_r); None for N(0, I)."""
    if mean is None and cov is None:
        return None, "N(0, I)"

    def arr(v: Any) -> np.ndarray:
        if type(v).__module__.split(".")[0] == "torch":
            v = v.detach().cpu().numpy()
        return np.asarray(v, dtype=float)

    m = np.zeros(d) if mean is None else arr(mean)
    if m.shape != (d,):
        raise ValueError(f"mean has shape {m.shape}, expected ({d},) for input width {d}")
    if cov is None:
        F = np.eye(d)
    else:
        C = arr(cov)
        if C.shape != (d, d):
            raise ValueError(f"cov has shape {C.shape}, expected ({d}, {d}) for input width {d}")
        if not (np.isfinite(m).all() and np.isfinite(C).all()):
            raise ValueError("mean or cov contains NaN or Inf")
        scale = max(1.0, float(np.abs(C).max()))
        if not np.allclose(C, C.T, rtol=0, atol=1e-12 * scale):
            raise ValueError("cov is not symmetric")
        lam, V = np.linalg.eigh((C + C.T) / 2)
        if lam.size and lam.min() < -1e-10 * scale:
            raise ValueError("cov is not positive semi-definite")
        keep = lam > 1e-14 * max(float(lam.max(initial=0.0)), 1e-300)
        F = V[:, keep] * np.sqrt(lam[keep])
    if not np.isfinite(m).all():
        raise ValueError("mean contains NaN or Inf")
    P = np.zeros((d + 1, F.shape[1] + 1))
    P[0, 0] = 1.0
    P[1:, 0] = m
    P[1:, 1:] = F
    return P, "N(mean, cov)"


def _unit(x: np.ndarray) -> tuple[np.ndarray, float]:
    """x scaled to about unit Frobenius norm, in place (``x`` is a fresh array
    of _prepare's: a second copy of every model cost as much as the first, both
    in page faults on new memory), and the log of the factor taken out.  A
    norm within [1/2, 2] is left as it is (the scale only keeps magnitudes
    near 1; the log is exact either way), which saves a pass over blocks that
    _prepare scaled as it wrote them."""
    s = math.sqrt(float(np.einsum("ij,ij->", x, x)))  # no BLAS (see Bilinear.padded_norms)
    if s == 0.0 or not math.isfinite(s) or 0.5 <= s <= 2.0:
        return x, 0.0
    x /= s
    return x, math.log(s)


def _prepare(models: Sequence[Any], inner: str, centered: bool, P: np.ndarray | None) -> list[_Chain] | None:
    """The models as normalized chains, or None when a batched route does not
    cover them (the caller then takes the pairwise route)."""
    chains = []
    # Plain float layers are padded into one allocation: one page fault per
    # huge page instead of one per 4 KiB page of every model's own arrays
    # (at (d, h) = (256, 512) that halved this function's time here), and
    # scaled to unit norm as they are written (norms from the weights).  L~ is
    # stored transposed, as the materialize route's formation reads it.  (Two
    # to sixteen threads writing the models were slower, here and on a 16-core
    # GPU host: the page faults of the fresh memory did not run in parallel.)
    plain = [m for m in models if isinstance(m, Bilinear) and not m.exact]
    arena = np.zeros(sum(math.prod(s) for m in plain for s in m.padded_shapes()))
    used = 0
    for m in models:
        if not isinstance(m, Component):
            return None
        pre = np.zeros(3)  # logs of the factors taken out as the blocks were written
        try:
            if isinstance(m, Bilinear) and not m.exact:
                out = []
                for k, shape in enumerate(m.padded_shapes()):
                    part = arena[used : used + math.prod(shape)]
                    out.append(part.reshape(shape[::-1]).T if k == 0 else part.reshape(shape))
                    used += math.prod(shape)
                norms = m.padded_norms()  # all finite: so is every entry (their squares sum to a finite number)
                finite = all(math.isfinite(s) and s > 0 for s in norms)
                if finite:
                    pre = np.log(norms)
                blocks = [m.padded(out=tuple(out), scales=tuple(1 / s for s in norms) if finite else None)]
            else:
                finite = False
                blocks, _ = fold(m)
            blocks = [tuple(np.asarray(x, dtype=float) for x in blk) for blk in blocks]
        except (TypeError, ValueError):
            return None
        if not blocks:
            return None  # a linear model: degree 1, lifting rules live in ts.inner
        if inner != "network" and len(blocks) != 1:
            return None
        if not finite and not all(np.isfinite(x).all() for blk in blocks for x in blk):
            return None
        L, R, D = blocks[-1]
        blocks[-1] = (L, R, D[1:])
        if inner == "gaussian" and P is not None:
            L, R, D = blocks[0]
            blocks[0] = (L @ P, R @ P, D)
        norm_blocks, logs = [], []
        for L, R, D in blocks:
            if finite and P is None:  # padded at unit norm: only D lost a row since
                (L, a), (R, b), (D, c) = (L, 0.0), (R, 0.0), _unit(D)
            else:
                (L, a), (R, b), (D, c) = _unit(L), _unit(R), _unit(D)
            norm_blocks.append((L, R, D))
            logs.append(a + b + c + (pre.sum() if not logs else 0.0))
        if inner == "gaussian":
            L, R, D = norm_blocks[0]
            const = L[:, 0] * R[:, 0]
            if centered:
                mprime = -_SQRT2 * (D @ const)
            else:
                mprime = D @ ((1.0 - _SQRT2) * const + np.einsum("hi,hi->h", L[:, 1:], R[:, 1:]))
            e0 = np.zeros((1, L.shape[1]))
            e0[0, 0] = 1.0
            norm_blocks[0] = (np.vstack([L, e0]), np.vstack([R, e0]), np.hstack([_SQRT2 * D, mprime[:, None]]))
        chains.append(_Chain(norm_blocks, np.asarray(logs)))
    return chains


@dataclass
class _Dims:
    """Common padded sizes of a set of chains: input width n; per layer the
    hidden width H and the output width w (the last: o, channel 0 excluded)."""

    n: int
    H: list[int]
    w: list[int]

    @property
    def depth(self) -> int:
        return len(self.H)

    def w_in(self, layer: int) -> int:
        return self.n if layer == 0 else self.w[layer - 1]


def _dims(*groups: list[_Chain]) -> _Dims:
    chains = [c for g in groups for c in g]
    depth = {len(c.blocks) for c in chains}
    if len(depth) != 1:
        raise ValueError(
            "the network inner product needs the same layer structure: the models have "
            f"{sorted(depth)} bilinear layers (Linear layers fold into their neighbours)"
        )
    ns = {c.blocks[0][0].shape[1] for c in chains}
    if len(ns) != 1:  # pragma: no cover - guarded by the in_features check
        raise ValueError(f"input widths differ: {sorted(ns)}")
    L = depth.pop()
    H = [max(c.blocks[l][0].shape[0] for c in chains) for l in range(L)]
    w = [max(c.blocks[l][2].shape[0] for c in chains) for l in range(L)]
    return _Dims(ns.pop(), H, w)


def _stack(chains: Sequence[_Chain], dims: _Dims, ops: _Ops, fused: Sequence[bool] = ()
           ) -> tuple[list[Any], list[Any], list[Any]]:
    """Per layer: X = [L; R] of shape (c, 2H, w_in) and D / sqrt(2) of shape
    (c, w, H), zero-padded (padding leaves every function unchanged); and for
    the layers l >= 1 propagated in the fused order, P = X_l D_{l-1} / sqrt(2)
    of shape (c, 2H_l, H_{l-1}) (else None)."""
    Xs, Ds = [], []
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        X = np.zeros((len(chains), 2 * H, wi))
        D = np.zeros((len(chains), wo, H))
        for k, ch in enumerate(chains):
            Lm, Rm, Dm = ch.blocks[l]
            h, i = Lm.shape
            X[k, :h, :i] = Lm
            X[k, H : H + h, :i] = Rm
            D[k, : Dm.shape[0], :h] = Dm / _SQRT2
        Xs.append(ops.put(X))
        Ds.append(ops.put(D))
    Ps = [None] + [Xs[l] @ Ds[l - 1] if (l < len(fused) and fused[l]) else None for l in range(1, dims.depth)]
    return Xs, Ds, Ps


# ---------------------------------------------------- pairwise-gram route


def _partition(n: int, c: int) -> list[tuple[int, int]]:
    c = max(1, min(c, n))
    k = -(-n // c)
    base, extra = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        size = base + (1 if j < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def _pg_fused(dims: _Dims) -> list[bool]:
    key = (dims.n, tuple(dims.H), tuple(dims.w))
    if key not in _FUSED_MEMO:
        _FUSED_MEMO[key] = _pg_fused_uncached(dims)
    return _FUSED_MEMO[key]


_FUSED_MEMO: dict[tuple[Any, ...], list[bool]] = {}


def _pg_fused_uncached(dims: _Dims) -> list[bool]:
    """Per layer l >= 1, the planner's choice between the two orders of the
    chain X_a D_a core D_b^T X_b^T: fused (P_a = X_a D_a once per model, then
    P_a core P_b^T per pair) or through G = D_a core D_b^T (better when the
    intermediate width w is below the hidden width)."""
    out = [False]
    for l in range(1, dims.depth):
        H, Hp, w = dims.H[l], dims.H[l - 1], dims.w[l - 1]
        via_g = (_COSTS.flops("oh,hk->ok", (w, Hp), (Hp, Hp)) + _COSTS.flops("ok,pk->op", (w, Hp), (w, Hp))
                 + _COSTS.flops("xi,ij->xj", (2 * H, w), (w, w)) + _COSTS.flops("xj,yj->xy", (2 * H, w), (2 * H, w)))
        fused = _COSTS.flops("xh,hk->xk", (2 * H, Hp), (Hp, Hp)) + _COSTS.flops("xk,yk->xy", (2 * H, Hp), (2 * H, Hp))
        out.append(fused < via_g)
    return out


def _pg_pair_elements(dims: _Dims) -> int:
    """Elements held per pair of models at the peak of one block."""
    fused = _pg_fused(dims)
    worst = 0
    for l in range(dims.depth):
        H, wi = dims.H[l], dims.w_in(l)
        e = 4 * H * H + 3 * H * H  # Z, core and one temporary
        if l > 0:
            Hp = dims.H[l - 1]
            e += Hp * Hp + (4 * H * Hp if fused[l] else 2 * wi * Hp + 2 * wi * wi + 4 * H * wi)
        if l == dims.depth - 1:
            e += H * H  # Da^T Db
        worst = max(worst, e)
    return worst


def _pg_phase_flops(cI: int, cJ: int, dims: _Dims, same: bool, numpy_syrk: bool) -> list[dict[str, int]]:
    """Planner flops of one block of pairs (cI x cJ models): per layer, per phase
    ("in": the cross Gram (layer 1) or the propagation to Z = [L; R] G [L; R]^T
    (later layers); "core": the Hadamard core and its rescaling; "out": Da^T Db
    and "reduce": the final sum (last layer))."""
    half = 0.5 if (same and numpy_syrk) else 1.0  # numpy multiplies X @ X.T by syrk (one triangle)
    fused = _pg_fused(dims)
    layers = []
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        ph: dict[str, int] = {}
        if l == 0:
            ph["in"] = int(half * _COSTS.flops("xi,yi->xy", (cI * 2 * H, wi), (cJ * 2 * H, wi)))
        elif fused[l]:
            Hp = dims.H[l - 1]
            ph["in"] = (_COSTS.flops("axh,ahbk->axbk", (cI, 2 * H, Hp), (cI, Hp, cJ, Hp))
                        + _COSTS.flops("axbk,byk->axby", (cI, 2 * H, cJ, Hp), (cJ, 2 * H, Hp)))
        else:
            Hp = dims.H[l - 1]
            ph["in"] = (_COSTS.flops("aoh,ahbk->aobk", (cI, wi, Hp), (cI, Hp, cJ, Hp))
                        + _COSTS.flops("aobk,bpk->aobp", (cI, wi, cJ, Hp), (cJ, wi, Hp)) + cI * cJ * wi * wi
                        + _COSTS.flops("axi,aibj->axbj", (cI, 2 * H, wi), (cI, wi, cJ, wi))
                        + _COSTS.flops("axbj,byj->axby", (cI, 2 * H, cJ, wi), (cJ, 2 * H, wi)))
        ph["core"] = 3 * cI * cJ * H * H  # LL*RR + LR*RL
        if l == dims.depth - 1:
            ph["out"] = int(half * _COSTS.flops("ox,oy->xy", (wo, cI * H), (wo, cJ * H)))
            ph["reduce"] = _COSTS.flops("ahbk,ahbk->ab", (cI, H, cJ, H), (cI, H, cJ, H))
        elif fused[l + 1]:
            ph["core"] += cI * cJ * H * H  # rescaling
        layers.append(ph)
    return layers


def _pg_block_flops(cI: int, cJ: int, dims: _Dims, same: bool, numpy_syrk: bool) -> int:
    return sum(sum(ph.values()) for ph in _pg_phase_flops(cI, cJ, dims, same, numpy_syrk))


def _count_blocks(parts_a: list[tuple[int, int]], parts_b: list[tuple[int, int]], sym: bool
                  ) -> dict[tuple[int, int, bool], int]:
    """How many blocks of each (rows, columns, diagonal) size a blocking has."""
    counts: dict[tuple[int, int, bool], int] = {}
    for i, (a0, a1) in enumerate(parts_a):
        for j, (b0, b1) in enumerate(parts_b):
            if sym and j < i:
                continue
            key = (a1 - a0, b1 - b0, sym and i == j)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _pg_diag_flops(c: int, dims: _Dims) -> int:
    f = 0
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        if l > 0:
            f += _COSTS.flops("mxi,mij->mxj", (c, 2 * H, wi), (c, wi, wi))
        f += _COSTS.flops("mxj,myj->mxy", (c, 2 * H, wi), (c, 2 * H, wi)) + 3 * c * H * H
        if l == dims.depth - 1:
            f += _COSTS.flops("moh,mok->mhk", (c, wo, H), (c, wo, H)) + 2 * c * H * H
        else:
            f += _COSTS.flops("moh,mhk->mok", (c, wo, H), (c, H, H)) + _COSTS.flops("mok,mpk->mop", (c, wo, H), (c, wo, H))
    return f


def _pg_plans(dims: _Dims, cI: int, cJ: int) -> tuple[tuple[str, ContractionPlan], ...]:
    H, n, o = dims.H[0], dims.n, dims.w[-1]
    plans = [("cross-gram", _COSTS.plan("xi,yi->xy", (cI * 2 * H, n), (cJ * 2 * H, n)))]
    Hl = dims.H[-1]
    plans.append(("down-gram", _COSTS.plan("ox,oy->xy", (o, cI * Hl), (o, cJ * Hl))))
    plans.append(("hadamard", _COSTS.plan("ahbk,ahbk->ab", (cI, Hl, cJ, Hl), (cI, Hl, cJ, Hl))))
    return tuple(plans)


def _pg_layout(NA: int, NB: int, sym: bool, dims: _Dims, itemsize: int, budget: int, numpy_syrk: bool,
               target: int, threads: int = 1) -> tuple[RouteCost, int, bool, int]:
    """(cost, models per block, whether each block is stacked once per call,
    worker threads).  Blocks are stacked once and kept when all of them fit
    within ``target`` beside the largest block's work (on a GPU: the host-side
    stacking and the transfer per block pair otherwise took ten times the
    products' time); otherwise each block pair stacks its two blocks.  Up to
    ``threads`` workers (numpy) take block pairs in turn when the blocks cost
    at least _THREADED_FLOPS, each holding one block pair's work within the
    target (``budget`` bounds all of them together)."""
    per_pair = _pg_pair_elements(dims) * itemsize
    per_model = sum(2 * dims.H[l] * dims.w_in(l) + dims.w[l] * dims.H[l] for l in range(dims.depth)) * itemsize

    def layout(workers: int) -> tuple[RouteCost, int, bool, int]:
        need = lambda c: c * c * per_pair + 2 * c * per_model  # noqa: E731  one worker's

        def largest(limit: int) -> int:
            lo, hi = 1, max(NA, NB)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if need(mid) <= limit else (lo, mid - 1)
            return lo

        c_mem = largest(budget // workers)
        fits = workers * need(c_mem) <= budget
        c = min(c_mem, largest(min(budget // workers, target)))
        if sym:
            # prefer a few blocks per side: blocks below the diagonal are skipped
            rows = 2 * dims.H[0]
            want = max(1, min(_MAX_SYM_BLOCKS, (NA * rows) // _MIN_BLOCK_ROWS))
            c = min(c, -(-NA // want))
        parts_a = _partition(NA, c)
        parts_b = parts_a if sym else _partition(NB, c)
        flops = sum(k * _pg_block_flops(cI, cJ, dims, same, numpy_syrk)
                    for (cI, cJ, same), k in _count_blocks(parts_a, parts_b, sym).items())
        if dims.depth > 1 or not sym:
            flops += _pg_diag_flops(NA, dims) + (0 if sym else _pg_diag_flops(NB, dims))
        cmax, cmax_b = max(b - a for a, b in parts_a), max(b - a for a, b in parts_b)
        work = workers * cmax * cmax_b * per_pair
        stacked = (NA + (0 if sym else NB)) * per_model
        nblocks = len(parts_a) * (len(parts_a) + 1) // 2 if sym else len(parts_a) * len(parts_b)
        keep = nblocks > 1 and work + stacked <= min(budget, workers * target)
        peak = work + (stacked if keep else workers * 2 * cmax * per_model)
        blocking = (f"{nblocks} block{'s' if nblocks != 1 else ''} of up to {cmax} x {cmax_b} models"
                    + (", each stacked once" if keep else "") + (f", in {workers} threads" if workers > 1 else ""))
        return (RouteCost("pairwise-gram", int(flops), int(peak), bool(fits), blocking,
                          _pg_plans(dims, cmax, cmax_b)), c, keep, workers)

    serial = layout(1)
    if threads < 2 or serial[0].flops < _THREADED_FLOPS:
        return serial
    parts = _partition(NA, serial[1])
    nblocks = sum(_count_blocks(parts, parts if sym else _partition(NB, serial[1]), sym).values())
    for workers in range(min(threads, nblocks), 1, -1):  # as many as fit the budget
        threaded = layout(workers)
        if threaded[0].fits:
            return threaded
    return serial


def _pg_diag(ops: _Ops, Xs: list[Any], Ds: list[Any], dims: _Dims) -> tuple[np.ndarray, np.ndarray]:
    """Self terms of a block of models: (K^[a, a], r[layer, a]) with r the
    rescaling 1/sqrt(|G[a,a]|_F) of each intermediate Gram (1 at the last layer)."""
    c = Xs[0].shape[0]
    rs = np.ones((dims.depth, c))
    G = None
    K = None
    for l in range(dims.depth):
        H = dims.H[l]
        X = Xs[l]
        Y = X if G is None else X @ G
        Z = Y @ ops.mT(X)
        core = ops.core_batched(Z, H)
        D = Ds[l]
        if l == dims.depth - 1:
            DD = ops.mT(D) @ D
            K = ops.get((core * DD).sum(dim=(1, 2)) if ops.is_torch else (core * DD).sum(axis=(1, 2)))
        else:
            G = D @ core @ ops.mT(D)
            fro = np.sqrt(ops.row_sq(G.reshape(G.shape[0], -1)))
            r = np.where(fro > 0, 1.0 / np.sqrt(np.where(fro > 0, fro, 1.0)), 1.0)
            rs[l] = r
            rr = ops.put(r * r)
            G = G * rr[:, None, None]
    return np.asarray(K, dtype=float), rs


def _right_product(ops: _Ops, QB: Any, Y: Any, cI: int, cJ: int, x: int) -> Any:
    """Z[b, a, x, y] = sum_k Y[a, x, b, k] QB[b, y, k] as a (b, a, x, y) view.

    Computed as QB[b] @ Y[:, :, b, :]^T, batched over b, on a strided view of
    Y: no copy of Y, and the wide product (y rows, a*x columns) ran 30-40 %
    faster here than the tall one after a transposing copy."""
    k = QB.shape[-1]
    Yv = ops.perm(Y.reshape(cI * x, cJ, k), (1, 0, 2))  # (b, a*x, k), a view
    Zt = QB @ ops.mT(Yv)  # (b, y, a*x)
    return ops.perm(Zt.reshape(cJ, QB.shape[1], cI, x), (0, 2, 3, 1))


def _pg_block(ops: _Ops, A: tuple[list[Any], list[Any], list[Any]], B: tuple[list[Any], list[Any], list[Any]],
              rA: np.ndarray, rB: np.ndarray, dims: _Dims, same: bool, clock: _Clock, numpy_syrk: bool) -> Any:
    """K^[a, b] for a block of pairs (all a in A, all b in B); A and B as made by _stack."""
    XA, DA, PA = A
    XB, DB, PB = B
    cI, cJ = XA[0].shape[0], XB[0].shape[0]
    phases = _pg_phase_flops(cI, cJ, dims, same, numpy_syrk)
    fused = _pg_fused(dims)
    core = None
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        ph = phases[l]
        clock.start()
        if l == 0:
            # rows (L or R, model, hidden): the four cross Grams are the quadrants
            XAf = ops.contig(ops.perm(XA[0].reshape(cI, 2, H, wi), (1, 0, 2, 3))).reshape(2 * cI * H, wi)
            XBf = XAf if same else ops.contig(ops.perm(XB[0].reshape(cJ, 2, H, wi), (1, 0, 2, 3))).reshape(2 * cJ * H, wi)
            Z = XAf @ ops.mT(XBf)
            clock.lap("cross-gram", ph["in"])
            core = ops.core(Z, cI * H, cJ * H).reshape(cI, H, cJ, H)  # (a, h, b, k)
            del Z, XAf, XBf
        else:
            Hp = dims.H[l - 1]
            if fused[l]:  # Z = P_a core P_b^T
                Y = PA[l] @ core.reshape(cI, Hp, cJ * Hp)  # (a, x, b*k)
                del core
                Z = _right_product(ops, PB[l], Y, cI, cJ, 2 * H)
            else:  # G = D_a core D_b^T (rescaled), then Z = X_a G X_b^T
                U = (DA[l - 1] @ core.reshape(cI, Hp, cJ * Hp)).reshape(cI, wi, cJ, Hp)  # (a, o, b, k)
                del core
                U = ops.contig(ops.perm(U, (2, 0, 1, 3))).reshape(cJ, cI * wi, Hp)
                G = (U @ ops.mT(DB[l - 1])).reshape(cJ, cI, wi, wi)  # (b, a, o, p)
                del U
                G = ops.contig(ops.perm(G, (1, 2, 0, 3)))  # (a, o, b, p)
                G *= ops.put(np.outer(rA[l - 1], rB[l - 1]))[:, None, :, None]
                Y = XA[l] @ G.reshape(cI, wi, cJ * wi)  # (a, x, b*j)
                del G
                Z = _right_product(ops, XB[l], Y, cI, cJ, 2 * H)
            del Y
            clock.lap("propagate", ph["in"])
            if l == dims.depth - 1:
                core = ops.core_batched(Z, H)  # (b, a, h, k): reduced as it is
            else:  # in Z's memory order (b, k, a, h); the next layer reads it as an (a, h, b*k) view
                core = ops.perm(ops.core_batched(Z, H), (1, 2, 0, 3))
            del Z
        if l < dims.depth - 1 and fused[l + 1]:
            core *= ops.put(np.outer(rA[l], rB[l]))[:, None, :, None]
        clock.lap("hadamard", ph["core"])
        if l == dims.depth - 1:
            DAt = ops.contig(ops.perm(DA[l], (0, 2, 1))).reshape(cI * H, wo)
            DBt = DAt if same else ops.contig(ops.perm(DB[l], (0, 2, 1))).reshape(cJ * H, wo)
            DD = (DAt @ ops.mT(DBt)).reshape(cI, H, cJ, H)
            clock.lap("down-gram", ph["out"])
            K = ops.einsum("ahbk,ahbk->ab" if l == 0 else "bahk,ahbk->ab", core, DD)
            clock.lap("hadamard", ph["reduce"])
            return K
    raise AssertionError("unreachable")  # pragma: no cover


def _log_scale(chains: Sequence[_Chain], rs: np.ndarray) -> np.ndarray:
    """log U per model: true <a, b> = K^[a, b] U_a U_b (see module docstring)."""
    logs = np.array([c.log_scales for c in chains], dtype=float).T  # (depth, N)
    logU = np.zeros(len(chains))
    with np.errstate(divide="ignore"):
        for l in range(logs.shape[0]):
            logU = 2 * logU + logs[l] - np.log(rs[l])
    return logU


def _run_pairwise_gram(A: list[_Chain], B: list[_Chain] | None, dims: _Dims, ops: _Ops, c: int, keep: bool,
                       clock: _Clock, show: bool | None, workers: int = 1
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(K^ (NA, NB), K^ diagonal of A, of B, log U of A, of B); ``keep``: stack
    each block once and keep it for all its block pairs; ``workers`` > 1
    (numpy): the blocks' self terms and the block pairs in that many threads,
    each with one BLAS thread (see _run_jobs)."""
    sym = B is None
    numpy_syrk = not ops.is_torch
    parts_a = _partition(len(A), c)
    parts_b = parts_a if sym else _partition(len(B), c)
    need_diag = dims.depth > 1 or not sym
    fused = _pg_fused(dims)
    kept: dict[tuple[str, int], Any] = {}

    def stacked(side: str, part: int, clk: _Clock, with_p: bool = True) -> Any:
        """The stacked block ``part`` of side "a" or "b" (kept when ``keep``)."""
        if (side, part) in kept:
            return kept[(side, part)]
        chains, (p0, p1) = (A, parts_a[part]) if side == "a" else (B, parts_b[part])
        clk.start()
        S = _stack(chains[p0:p1], dims, ops, fused if with_p else ())
        clk.lap("stack", 0)
        return S

    def diag(side: str, part: int, clk: _Clock) -> tuple[np.ndarray, np.ndarray]:
        Xs, Ds, _ = stacked(side, part, clk, with_p=False)
        clk.start()
        k, r = _pg_diag(ops, Xs, Ds, dims)
        a0, a1 = (parts_a if side == "a" else parts_b)[part]
        clk.lap("self-terms", _pg_diag_flops(a1 - a0, dims))
        return k, r

    K = np.zeros((len(A), len(A) if sym else len(B)))

    def block(i: int, j: int, clk: _Clock) -> None:
        (a0, a1), (b0, b1) = parts_a[i], parts_b[j]
        same = sym and i == j
        SA = stacked("a", i, clk)
        SB = SA if same else stacked("a" if sym else "b", j, clk)
        blk = ops.get(_pg_block(ops, SA, SB, rA[:, a0:a1], rB[:, b0:b1], dims, same, clk, numpy_syrk)).astype(float)
        K[a0:a1, b0:b1] = blk  # disjoint blocks: the workers write K in place
        if sym and not same:
            K[b0:b1, a0:a1] = blk.T

    pairs = [(i, j) for i in range(len(parts_a)) for j in range(len(parts_b)) if not (sym and j < i)]
    with contextlib.ExitStack() as stack:
        pool = _blas_worker_pool(stack, workers) if workers > 1 and not ops.is_torch else None
        if keep:
            for side in ("a",) if sym else ("a", "b"):
                for part in range(len(parts_a if side == "a" else parts_b)):
                    kept[(side, part)] = stacked(side, part, clock)
        if need_diag:
            def side_diag(side: str) -> tuple[np.ndarray, np.ndarray]:
                parts = parts_a if side == "a" else parts_b
                out = _run_jobs([lambda clk, p=p: diag(side, p, clk) for p in range(len(parts))], clock, pool, workers)
                return np.concatenate([k for k, _ in out]), np.concatenate([r for _, r in out], axis=1)

            kA, rA = side_diag("a")
            kB, rB = (kA, rA) if sym else side_diag("b")
        else:
            rA = rB = np.ones((dims.depth, len(A)))
            kA = kB = None
        bar = _progress(len(pairs), "similarity matrix (pairwise-gram)", "block", show)
        try:
            _run_jobs([lambda clk, i=i, j=j: block(i, j, clk) for i, j in pairs], clock, pool, workers, bar)
        finally:
            bar.close()
    if sym:
        kA = kB = np.diag(K).copy()
    return K, kA, kB, _log_scale(A, rA), _log_scale(B if B is not None else A, rB)


def _run_jobs(jobs: Sequence[Any], clock: _Clock, pool: Any, workers: int, bar: Any = None) -> list[Any]:
    """The results of ``jobs`` (callables taking a _Clock), in order: run one
    after another on ``clock``, or in the ``workers`` threads of ``pool`` with
    a clock each, absorbed into ``clock`` at 1/workers of their time (a step's
    time is then its share of the wall time the workers spent together).  At
    most two jobs per worker are queued at a time, so the bookkeeping does not
    grow with the number of jobs."""
    out: list[Any] = [None] * len(jobs)
    if pool is None:
        for k, job in enumerate(jobs):
            out[k] = job(clock)
            if bar is not None:
                bar.update(1)
        return out
    from concurrent.futures import FIRST_COMPLETED, wait

    todo = iter(enumerate(jobs))
    running: dict[Any, tuple[int, _Clock]] = {}
    while True:
        for k, job in todo:
            clk = _Clock(clock.ops)
            running[pool.submit(job, clk)] = (k, clk)
            if len(running) >= 2 * workers:
                break
        if not running:
            return out
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for f in done:
            k, clk = running.pop(f)
            out[k] = f.result()  # a failure is raised here
            clock.absorb(clk, 1 / workers)
            if bar is not None:
                bar.update(1)


# ------------------------------------------------------ materialize route


def _packed_blocks(n: int, leaf: int) -> tuple[tuple[int, int, int, int], ...]:
    """The packed layout of a symmetric n x n matrix: blocks (r0, r1, c0, c1)
    in feature order, row-major within each.  Halving [a, b) recursively: the
    off-diagonal rectangle [a, m) x [m, b), then both halves, down to diagonal
    blocks of at most ``leaf`` rows kept whole (r0 == c0).  Each block is one
    contiguous add of T and T^T (no gather), at about 11 % more features than
    the triangle at n = 257."""
    out: list[tuple[int, int, int, int]] = []

    def split(a: int, b: int) -> None:
        if b - a <= leaf:
            out.append((a, b, a, b))
            return
        m = (a + b) // 2
        out.append((a, m, m, b))
        split(a, m)
        split(m, b)

    split(0, n)
    return tuple(out)


def _packing(blocks: Sequence[tuple[int, ...]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into an n x n matrix of the packed layout's features and the
    weights (1 in the whole diagonal blocks, sqrt 2 in the rectangles) that make
    the packed dot product equal the Frobenius product of symmetric matrices."""
    idx, w = [], []
    for r0, r1, c0, c1 in blocks:
        idx.append((np.arange(r0, r1)[:, None] * n + np.arange(c0, c1)[None, :]).ravel())
        w.append(np.full((r1 - r0) * (c1 - c0), 1.0 if r0 == c0 else _SQRT2))
    return np.concatenate(idx), np.concatenate(w)


@dataclass(frozen=True)
class _Formation:
    """How the materialize route writes a model's symmetric tensors as rows.

    "packed": T = (D o L~)^T R~ per output (a GEMM with inner size H), then
    the blocks of T + T^T that _packed_blocks lists (rectangles times sqrt 2;
    one pass over the features on numpy, two over n^2 entries on torch).
    "triangle": the rows of the upper block triangle of S straight from the
    symmetric CP form, S[o, I, i0:] = 1/2 [D o L~, D o R~][:, I] [R~; L~][:, i0:]
    for row blocks I = [i0, i1) (columns beyond the block times sqrt 2):
    about (1 + rb/n) times the GEMM flops with inner size 2H, but no passes.
    Its features can be chunked by row blocks as well as by outputs (see
    _feature_chunks).  ``sub`` outputs go into one product (their rows
    stacked); it is part of the layout, so both sides of a cross matrix share
    it.  The planner takes the formation with fewer flops, counting a pass
    over an entry as _PASS_FLOPS (an add of T and T^T as two).  On a GPU:
    "packed", with ``models`` models per batched product (a few launches per
    output chunk, where launches, not flops, set the time).  On numpy,
    ``workers`` threads form disjoint groups of models and take the Gram over
    disjoint groups of features, each with one BLAS thread (see
    _run_materialize)."""

    kind: str
    n: int
    sub: int
    blocks: tuple[tuple[int, ...], ...] = ()  # row blocks (i0, i1) (triangle), _packed_blocks (packed)
    models: int = 1
    workers: int = 1

    def features(self, g0: int = 0, g1: int | None = None) -> int:
        """Features per output of row blocks g0:g1 (triangle) or of the whole layout."""
        if self.kind == "packed":
            return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self.blocks)
        return sum((i1 - i0) * (self.n - i0) for i0, i1 in self.blocks[g0:g1])

    @property
    def per_output(self) -> int:
        """Features per output."""
        return self.features()

    def flops(self, k: int, H: int, g0: int = 0, g1: int | None = None) -> int:
        """Planner flops of forming ``k`` outputs (row blocks g0:g1 of the
        triangle) of one model of hidden width H."""
        n = self.n
        if self.kind == "packed":
            return k * (n * H + _COSTS.flops("ih,hj->ij", (n, H), (H, n)) + 2 * self.per_output)
        return sum(k * (i1 - i0) * 2 * H + _COSTS.flops("xh,hj->xj", (k * (i1 - i0), 2 * H), (2 * H, n - i0))
                   for i0, i1 in self.blocks[g0:g1])

    def temp(self, k: int, H: int, itemsize: int) -> int:
        """Bytes of the temporaries of forming ``k`` outputs of one model."""
        return _formation_temp(self.kind, self.n, k, H, itemsize)


def _formation_temp(kind: str, n: int, k: int, H: int, itemsize: int) -> int:
    if kind == "packed":  # the scaled operand, the product, and its symmetrization (both engines)
        return (k * n * H + 3 * k * n * n) * itemsize
    return (k * n * 2 * H + 6 * H * n) * itemsize  # the scaled operand (at most all rows), [L; R] and [R; L] * sqrt 2


def _formation(n: int, H: int, o: int, models: int, itemsize: int, cuda: bool, max_sub: int | None = None
               ) -> _Formation:
    """The cheaper formation for one output of one model: forming flops, passes
    (packed), and its share of the Gram over ``models`` rows.  On a CPU each
    product takes as many outputs as keep its temporaries near _FORM_CACHE
    (all of them on a GPU), at most ``max_sub``; the triangle's row blocks give
    its products about _TRI_ROWS rows."""
    forms = []
    for kind in ("packed",) if cuda else ("triangle", "packed"):
        if cuda:
            sub = o
        else:
            fixed = _formation_temp(kind, n, 0, H, itemsize)
            per_output = max(1, _formation_temp(kind, n, 1, H, itemsize) - fixed)
            sub = int(max(1, min(o, (_FORM_CACHE - fixed) // per_output)))
        sub = min(sub, max_sub or sub)
        rb = min(n, max(8, min(-(-_TRI_ROWS // sub), -(-n // 8))))
        forms.append(_Formation(kind, n, sub, tuple(_partition(n, rb)) if kind == "triangle"
                                else _packed_blocks(n, _PACK_LEAF)))
    cost = {f: f.flops(1, H) + 2 * models * f.per_output + (_PASS_FLOPS * 2 * f.per_output if f.kind == "packed" else 0)
            for f in forms}
    return min(cost, key=cost.get)


def _feature_chunks(form: _Formation, o: int, oc: int, oc_max: int | None = None
                    ) -> tuple[tuple[int, int, int, int], ...]:
    """The chunks (o0, o1, g0, g1) of the features a model block's buffer holds
    in turn: outputs o0:o1 of the formation's blocks g0:g1, about ``oc``
    outputs' worth each (at most ``oc_max``'s).  The triangle's are row blocks
    of all outputs when every row block fits ``oc``: its products then take
    all outputs' rows (up to ``sub``), which ran at ~85 against ~68 GFLOP/s
    for five outputs per product here (100 models at (256, 64, 10));
    otherwise ranges of outputs."""
    nb = len(form.blocks)
    by_output = tuple((o0, o1, 0, nb) for o0, o1 in _partition(o, oc))
    sizes = np.array([o * form.features(g, g + 1) for g in range(nb)])
    if form.kind != "triangle" or oc >= o or sizes.max() > oc * form.per_output:
        return by_output
    # as few chunks as the target allows, balanced (their size is a target
    # for the working set, not a bound): cut where the running sum is nearest
    # to an equal share
    cs = np.cumsum(sizes)
    for m in range(-(-int(cs[-1]) // (oc * form.per_output)), nb + 1):
        cuts = sorted({0, nb, *(int(np.argmin(np.abs(cs - cs[-1] * j / m))) + 1 for j in range(1, m))})
        if max(cs[b - 1] - (cs[a - 1] if a else 0) for a, b in zip(cuts, cuts[1:])) <= (oc_max or oc) * form.per_output:
            break
    return tuple((0, o, g0, g1) for g0, g1 in zip(cuts, cuts[1:]))


def _describe_chunks(chunks: Sequence[tuple[int, int, int, int]], form: _Formation) -> str:
    if chunks[0][3] - chunks[0][2] < len(form.blocks):
        sizes = "+".join(str(g1 - g0) for _, _, g0, g1 in chunks)
        return f"{len(chunks)} chunks of row blocks ({sizes} of {len(form.blocks)}) of all {chunks[0][1]} outputs"
    most = max(o1 - o0 for o0, o1, _, _ in chunks)
    return f"{len(chunks)} output chunk{'s' if len(chunks) != 1 else ''} of up to {most}"


def _form_flops(form: _Formation, chunk: tuple[int, int, int, int], widths: Sequence[int]) -> int:
    """Planner flops of forming ``chunk`` for models of these hidden widths."""
    o0, o1, g0, g1 = chunk
    return sum(form.flops(o1 - o0, H, g0, g1) * count for H, count in Counter(widths).items())


def _mat_gram_flops(cI: int, cJ: int, F: int) -> int:
    return _COSTS.flops("xf,yf->xy", (cI, F), (cJ, F))  # a full GEMM (see _Ops.wide_gram)


def _mat_layout(A: list[_Chain], B: list[_Chain] | None, dims: _Dims, itemsize: int, budget: int,
                target: int, cuda: bool, threads: int = 1
                ) -> tuple[RouteCost, int, tuple[tuple[int, int, int, int], ...], _Formation]:
    """(cost, model block size, feature chunks (see _feature_chunks), formation).
    All models of a side in one block when one output of theirs fits
    ``budget`` (a chunk then near ``target``, and a product of the formation
    no larger than a chunk); otherwise blocks of models, re-forming a block's
    tensors for every block it meets.  Up to ``threads`` workers on numpy,
    their formation temporaries within a quarter of the target."""
    sym = B is None
    NA, NB = len(A), (len(A) if sym else len(B))
    n, o = dims.n, dims.w[-1]
    Hmax = max(dims.H[0], 1)
    kbytes = 8 * NA * NB + 16 * n * n  # the accumulated matrix, packing indices and weights
    cap = NA if sym else NA + NB

    def sized(max_sub: int | None) -> tuple[_Formation, int, int, int]:
        """The formation, its temporaries, bytes of one output of one model, and
        the outputs per chunk near the target."""
        form = _formation(n, Hmax, o, NA + (0 if sym else NB), itemsize, cuda, max_sub)
        temp, row = form.temp(form.sub, Hmax, itemsize), form.per_output * itemsize
        if cuda:  # a model's factors, stacked on the device for the batched products
            temp += (2 * n + form.sub) * Hmax * itemsize
        elif form.flops(o, Hmax) * max(NA, NB) >= _THREADED_FLOPS:
            form = replace(form, workers=int(max(1, min(threads, max(NA, NB), min(budget, target) // (4 * temp)))))
            temp *= form.workers
        return form, temp, row, (min(budget, target) - kbytes - temp) // (cap * row)

    form, temp, row, oc_target = sized(None)
    # chunks of row blocks take all outputs, so the products keep their size;
    # chunks of outputs cut the products to theirs
    rows = oc_target >= 1 and _feature_chunks(form, o, oc_target)[0][1] == o
    if oc_target < form.sub and not rows:
        form, temp, row, oc_target = sized(max(1, oc_target))
    q = form.sub
    avail = budget - kbytes - temp
    oc_budget = avail // (cap * row) if avail > 0 else 0
    if oc_budget >= 1:
        oc = int(max(1, min(o, oc_budget, oc_target if rows else max(q, oc_target))))
        c, fits = max(NA, NB), True
    else:
        oc = 1
        c = int(max(1, avail // (2 * row))) if avail > 0 else 1
        fits = avail >= 2 * row
    parts_a = _partition(NA, c)
    parts_b = parts_a if sym else _partition(NB, c)
    chunks = _feature_chunks(form, o, oc, oc_budget if oc_budget >= 1 else None)
    HA = [ch.blocks[0][0].shape[0] for ch in A]
    HB = HA if sym else [ch.blocks[0][0].shape[0] for ch in B]
    flops = 0
    for chunk in chunks:
        o0, o1, g0, g1 = chunk
        for i, (a0, a1) in enumerate(parts_a):
            flops += _form_flops(form, chunk, HA[a0:a1])
            for j, (b0, b1) in enumerate(parts_b):
                if sym and j < i:
                    continue
                if not (sym and i == j):
                    flops += _form_flops(form, chunk, HB[b0:b1])
                flops += _mat_gram_flops(a1 - a0, b1 - b0, (o1 - o0) * form.features(g0, g1))
    cmax = max(b - a for a, b in parts_a + parts_b)
    chunk_bytes = max((o1 - o0) * form.features(g0, g1) for o0, o1, g0, g1 in chunks) * itemsize
    if len(parts_a) == 1 and len(parts_b) == 1:
        peak = cap * chunk_bytes + temp + kbytes
    else:
        peak = 2 * cmax * chunk_bytes + temp + kbytes
    if cuda:  # as many models per product as the spare memory holds
        form = replace(form, models=int(max(1, min(cmax, 1 + (budget - peak) // temp))))
        peak += (form.models - 1) * temp
    blocking = (f"{form.kind} formation" + (f" of {form.models} models per product" if cuda else "")
                + (f" in {form.workers} threads" if form.workers > 1 else "")
                + f", {_describe_chunks(chunks, form)}, model blocks of up to {cmax}")
    F = chunk_bytes // itemsize
    plans = (("form", _COSTS.plan("oh,hi,hj->oij", (q, Hmax), (Hmax, n), (Hmax, n))),
             ("gram", _COSTS.plan("xf,yf->xy", (cmax, F), (cmax, F))))
    return RouteCost("materialize", int(flops), int(peak), bool(fits), blocking, plans), c, chunks, form


def _form(ops: _Ops, chains: Sequence[_Chain], chunk: tuple[int, int, int, int], form: _Formation, buf: Any,
          pack: tuple[Any, Any] | None, clock: _Clock, pool: Any = None) -> Any:
    """Rows of the symmetric tensors S[m, o0:o1] (row blocks g0:g1 of the
    triangle) for ``chunk`` = (o0, o1, g0, g1), as ``form`` lays them out
    (weighted so that row dot products are Frobenius products), written into
    the front of the flat buffer ``buf``; groups of models in the threads of
    ``pool`` when given."""
    o0, o1, g0, g1 = chunk
    F = (o1 - o0) * form.features(g0, g1)
    X = buf[: len(chains) * F].reshape(len(chains), F)
    flops = _form_flops(form, chunk, [ch.blocks[0][0].shape[0] for ch in chains])  # before the clock starts
    clock.start()
    if form.kind == "packed" and ops.is_torch:
        _form_batched(ops, chains, o0, o1, form, X, pack)
    elif pool is not None:
        groups = _partition(len(chains), -(-len(chains) // form.workers))
        for done in [pool.submit(_form_rows, ops, chains[a:b], chunk, form, X[a:b]) for a, b in groups]:
            done.result()
    else:
        _form_rows(ops, chains, chunk, form, X)
    clock.lap("form", flops)
    return X


def _form_rows(ops: _Ops, chains: Sequence[_Chain], chunk: tuple[int, int, int, int], form: _Formation, X: Any
               ) -> None:
    """_form's rows of ``chains``, one model at a time, into the rows of X."""
    o0, o1, g0, g1 = chunk
    k = o1 - o0
    n, P, q = form.n, form.per_output, form.sub
    if form.kind == "packed" and not ops.is_torch:
        sizes = [(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in form.blocks]
        blocks = list(zip(form.blocks, np.cumsum([0] + sizes[:-1]).tolist()))
        # one set of temporaries for all models (fresh ones per model cost page faults)
        scaled_buf = np.empty(q * n * max(ch.blocks[0][0].shape[0] for ch in chains))
        T = np.empty((q, n, n))
    for m, ch in enumerate(chains):
        L, R, D = ch.blocks[0]
        H = L.shape[0]
        if form.kind == "packed":
            # q outputs per product, into buffers reused across the model's
            # outputs (they stay in cache); then one add of T and T^T per block
            # of the layout for all q outputs, sqrt 2 folded into the scaled
            # operand and taken back out of the whole diagonal blocks
            Lt, Rb = ops.put(L.T), ops.put(R)
            Dh = D[o0:o1] / _SQRT2
            scaled = scaled_buf[: q * n * H].reshape(q, n, H)
            rows = X[m].reshape(k, P)
            for s0 in range(0, k, q):
                s1 = min(k, s0 + q)
                t = T[: s1 - s0]
                np.multiply(Lt[None], Dh[s0:s1, None, :], out=scaled[: s1 - s0])
                np.matmul(scaled[: s1 - s0].reshape(-1, H), Rb, out=t.reshape(-1, n))
                for (r0, r1, c0, c1), off in blocks:
                    out = rows[s0:s1, off : off + (r1 - r0) * (c1 - c0)].reshape(s1 - s0, r1 - r0, c1 - c0)
                    np.add(t[:, r0:r1, c0:c1], t[:, c0:c1, r0:r1].transpose(0, 2, 1), out=out)
                    if r0 == c0:
                        out *= 1 / _SQRT2
        else:
            # rows (i, output) of a product, from row st of the chunk's first
            # block on; the right operand is a transposed view, every row
            # times sqrt 2 until its block's turn: that block's diagonal
            # square holds both S[i, j] and S[j, i], and no later block reads it
            st, en = form.blocks[g0][0], form.blocks[g1 - 1][1]
            LRt = ops.put(np.concatenate([L[:, st:en].T, R[:, st:en].T], axis=1))  # (en - st, 2H)
            Dc = ops.put(0.5 * np.concatenate([D[o0:o1], D[o0:o1]], axis=1))  # (k, 2H)
            off = 0
            for s0 in range(0, k, q):
                s1 = min(k, s0 + q)
                RLt = ops.put(np.concatenate([R[:, st:].T, L[:, st:].T], axis=1))  # (n - st, 2H), fresh
                RLt *= _SQRT2
                for i0, i1 in form.blocks[g0:g1]:
                    j0, j1 = i0 - st, i1 - st
                    size = (s1 - s0) * (j1 - j0) * (n - i0)
                    RLt[j0:j1] *= 1 / _SQRT2
                    # the block's scaled rows (in cache; one operand for all rows ran slower)
                    A = (LRt[j0:j1, None, :] * Dc[None, s0:s1, :]).reshape(-1, 2 * H)
                    out = X[m, off : off + size].reshape((s1 - s0) * (j1 - j0), n - i0)
                    (ops.t if ops.is_torch else np).matmul(A, RLt[j0:].T, out=out)
                    off += size


def _form_batched(ops: _Ops, chains: Sequence[_Chain], o0: int, o1: int, form: _Formation, X: Any,
                  pack: tuple[Any, Any]) -> None:
    """The packed formation in torch, ``form.models`` models per batched
    product (their factors zero-padded to the widest hidden width among them),
    then T + T^T and the layout's entries gathered and weighted."""
    t, flat, weight = ops.t, *pack
    k, n, P, q = o1 - o0, form.n, form.per_output, form.sub
    for b0 in range(0, len(chains), form.models):
        batch = chains[b0 : b0 + form.models]
        M, H = len(batch), max(ch.blocks[0][0].shape[0] for ch in batch)
        Lt = t.zeros((M, n, H), dtype=ops.dtype, device=ops.device)
        Rb = t.zeros((M, H, n), dtype=ops.dtype, device=ops.device)
        Dh = t.zeros((M, k, H), dtype=ops.dtype, device=ops.device)
        for j, ch in enumerate(batch):
            L, R, D = ch.blocks[0]
            h = L.shape[0]
            Lt[j, :, :h] = t.from_numpy(np.ascontiguousarray(L.T))
            Rb[j, :h] = t.from_numpy(R)
            Dh[j, :, :h] = t.from_numpy(0.5 * D[o0:o1])
        rows = X[b0 : b0 + M].view(M, k, P)
        for s0 in range(0, k, q):
            s1 = min(k, s0 + q)
            A = (Dh[:, s0:s1, None, :] * Lt[:, None]).reshape(M, (s1 - s0) * n, H)
            T = (A @ Rb).reshape(M, s1 - s0, n, n)
            S = (T + ops.mT(T)).reshape(M * (s1 - s0), n * n)
            rows[:, s0:s1] = t.index_select(S, 1, flat).view(M, s1 - s0, P) * weight


def _run_materialize(A: list[_Chain], B: list[_Chain] | None, dims: _Dims, ops: _Ops, c: int,
                     chunks: Sequence[tuple[int, int, int, int]], form: _Formation, clock: _Clock, show: bool | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K^ (NA, NB), K^ diagonal of A, of B), summed over the feature chunks."""
    sym = B is None
    Bs = A if sym else B
    n = dims.n
    F = max((o1 - o0) * form.features(g0, g1) for o0, o1, g0, g1 in chunks)
    pack = None
    if form.kind == "packed" and ops.is_torch:
        flat, weight = _packing(form.blocks, n)
        pack = (ops.put_index(flat), ops.put(weight))
    parts_a = _partition(len(A), c)
    parts_b = parts_a if sym else _partition(len(B), c)
    NB = len(Bs)
    single = len(parts_a) == 1 and len(parts_b) == 1
    cmax = max(b - a for a, b in parts_a + parts_b)
    bufA = ops.empty((len(A) if single else cmax) * F)
    bufB = None if (sym and single) else ops.empty((NB if single else cmax) * F)
    K = np.zeros((len(A), NB))
    nA = np.zeros(len(A))
    nB = np.zeros(NB)
    per_chunk = len(parts_a) * (len(parts_a) + 1) // 2 if sym else len(parts_a) * len(parts_b)
    bar = _progress(len(chunks) * per_chunk, "similarity matrix (materialize)", "block", show)
    with contextlib.ExitStack() as stack:
        pool = None
        if form.workers > 1 and not ops.is_torch:
            pool = _blas_worker_pool(stack, form.workers)
            # the buffers' first touch in one thread: the workers' page faults
            # on fresh memory contended (formation 208 -> 185 ms after a 16 ms
            # fill, 100 models at (256, 64, 10) here)
            clock.start()
            for buf in (bufA, bufB):
                if buf is not None:
                    buf.fill(0.0)
            clock.lap("allocate", 0)
        try:
            for chunk in chunks:
                for i, (a0, a1) in enumerate(parts_a):
                    XA = _form(ops, A[a0:a1], chunk, form, bufA, pack, clock, pool)
                    if not sym:
                        nA[a0:a1] += ops.row_sq(XA)
                    for j, (b0, b1) in enumerate(parts_b):
                        if sym and j < i:
                            continue
                        same = sym and i == j
                        XB = XA if same else _form(ops, Bs[b0:b1], chunk, form, bufB, pack, clock, pool)
                        if not sym and i == 0:
                            nB[b0:b1] += ops.row_sq(XB)
                        clock.start()
                        blk = ops.get(ops.wide_gram(XA, XB, pool, form.workers)).astype(float)
                        K[a0:a1, b0:b1] += blk
                        if sym and not same:
                            K[b0:b1, a0:a1] += blk.T
                        clock.lap("gram", _mat_gram_flops(a1 - a0, b1 - b0, XA.shape[1]))
                        bar.update(1)
        finally:
            bar.close()
    if sym:
        nA = nB = np.diag(K).copy()
    return K, nA, nB


def _blas_worker_pool(stack: contextlib.ExitStack, workers: int) -> Any:
    """A pool of ``workers`` threads, with BLAS limited to one thread (process
    wide) until ``stack`` closes: held for a whole route, since toggling the
    limit per chunk, or BLAS threads left spinning after a product, cost the
    workers their cores here."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
    return stack.enter_context(ThreadPoolExecutor(workers))


# ------------------------------------------------------------ pairwise route


def _as_float(v: Any) -> float:
    try:
        return float(v)
    except TypeError:
        import sympy

        return float(sympy.N(v))


def _run_pairwise(A: Sequence[Any], B: Sequence[Any] | None, inner: str, method: str, mean: Any, cov: Any,
                  centered: bool, kwargs: dict[str, Any], show: bool | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, str, int]:
    """Cosines with ts.inner: each norm once, then the pairs."""
    sym = B is None
    Bs = A if sym else B
    if inner == "symmetric" and kwargs.get("degree") is None:  # one common degree, as ts.similarity does
        from .problem import InnerProblem

        kwargs = dict(kwargs, degree=max(max(InnerProblem(m, m).degrees) for m in list(A) + list(Bs)))
    n_pairs = len(A) * (len(A) - 1) // 2 if sym else len(A) * len(Bs)
    n_self = len(A) + (0 if sym else len(Bs))
    show_now = show if show is not None else (None if n_pairs + n_self > _LONG_PAIRS else False)
    bar = _progress(n_pairs + n_self, f"similarity matrix (pairwise {inner})", "inner", show_now)
    results = []

    def ip(a: Any, b: Any) -> float:
        r = _pair_inner(a, b, inner, method, mean, cov, centered=centered, **kwargs)
        results.append(r)
        bar.update(1)
        return _as_float(r.value)

    try:
        sA = np.array([ip(m, m) for m in A])
        sB = sA if sym else np.array([ip(m, m) for m in Bs])
        K = np.zeros((len(A), len(Bs)))
        for i, a in enumerate(A):
            for j, b in enumerate(Bs):
                if sym and j <= i:
                    continue
                K[i, j] = sA[i] if a is b else ip(a, b)
                if sym:
                    K[j, i] = K[i, j]
        if sym:
            K[np.diag_indices(len(A))] = sA
    finally:
        bar.close()
    exact = all(r.exact for r in results)
    methods = sorted({r.method for r in results}) or ["exact"]
    return K, sA, sB, exact, "/".join(methods), sum(r.flops for r in results)


# ------------------------------------------------------------ public API


def _models(models: Any, what: str) -> tuple[list[Any], tuple[str, ...] | None]:
    if isinstance(models, Mapping):
        return list(models.values()), tuple(str(k) for k in models.keys())
    if isinstance(models, (Component,)) or not isinstance(models, Iterable):
        raise TypeError(f"{what}: expected a sequence (or a mapping name -> model) of models")
    out = list(models)
    if not out:
        raise ValueError(f"{what}: no models")
    return out, None


def _widths(models: Sequence[Any]) -> None:
    ins = {getattr(m, "in_features", None) for m in models}
    outs = {getattr(m, "out_features", None) for m in models}
    if len(ins) > 1:
        raise ValueError(f"input widths differ across the models: {sorted(map(str, ins))}")
    if len(outs) > 1:
        raise ValueError(f"output widths differ across the models: {sorted(map(str, outs))}")


def _cosines(K: np.ndarray, sA: np.ndarray, sB: np.ndarray, inner: str, dtype: str, sym: bool) -> np.ndarray:
    for s, side in ((sA, "row"), (sB, "column")):
        bad = np.flatnonzero(~(s > 0))
        if bad.size:
            raise ValueError(f"{side} model {int(bad[0])} has zero norm under the {inner} inner product; "
                             "the similarity is undefined")
    cos = K / np.sqrt(np.outer(sA, sB))
    tol = 1e-8 if dtype == "float64" else 1e-3
    excess = float(np.nanmax(np.abs(cos))) - 1.0
    if excess > tol:
        raise ArithmeticError(f"|cosine| exceeds 1 by {excess:.3g}: the inner product is not positive definite here")
    cos = np.clip(cos, -1.0, 1.0)
    if sym:
        cos = (cos + cos.T) / 2
        np.fill_diagonal(cos, 1.0)
    return cos.astype(dtype)


def _norms(s: np.ndarray, logU: np.ndarray | None) -> np.ndarray:
    s = np.maximum(np.asarray(s, dtype=float), 0.0)
    if logU is None:
        return np.sqrt(s)
    with np.errstate(over="ignore", divide="ignore"):
        return np.exp(0.5 * np.log(s) + logU)


def _compute(A_in: Any, B_in: Any | None, inner: str, method: str, mean: Any, cov: Any, centered: bool, route: str,
             dtype: Any, device: Any, max_memory: int | None, progress: bool | None,
             kwargs: dict[str, Any]) -> SimilarityMatrix:
    t_start = time.perf_counter()
    if inner not in _INNERS:
        raise ValueError(f"inner must be one of {_INNERS}, got {inner!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "closure" and inner != "gaussian":
        raise ValueError("method='closure' is a Gaussian moment method; use it with inner='gaussian'")
    if centered and inner != "gaussian":
        raise ValueError("centered=True is defined for the gaussian inner product only")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if kwargs.get("per_output"):
        raise TypeError("per_output is not available for similarity matrices; use ts.similarity per pair")
    kwargs = {k: v for k, v in kwargs.items() if k != "per_output"}
    unknown = set(kwargs) - {"degree", "budget", "orbits"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    sym = B_in is None
    A, labels = _models(A_in, "models" if sym else "models_a")
    B, col_labels = (None, None) if sym else _models(B_in, "models_b")
    _widths(A + (B or []))
    dname = _parse_dtype(dtype)
    if device is None and any(type(w).__module__.split(".")[0] == "torch"
                              for m in A + (B or []) if isinstance(m, Component) for w in m.weights()):
        device = "cpu"  # pragma: no cover - components store numpy weights
    force_numpy = isinstance(device, str) and device == "numpy"
    if force_numpy:
        device = None
    ops = _Ops(dname, device)
    budget = int(max_memory) if max_memory is not None else ops.default_memory()
    if budget <= 0:
        raise ValueError(f"max_memory must be positive, got {max_memory}")

    d = next((m.in_features for m in A if hasattr(m, "in_features")), None)
    batched_ok = method != "closure" and (kwargs.get("degree") in (None, 2) or inner != "symmetric")
    chains_A = chains_B = None
    measure = ""
    if inner == "gaussian":
        P, measure = _measure_factor(d, mean, cov) if d is not None else (None, "N(0, I)")
    else:
        P = None
    t_prepare = time.perf_counter()
    if batched_ok:
        chains_A = _prepare(A, inner, centered, P)
        chains_B = None if sym else _prepare(B, inner, centered, P)
        if chains_A is None or (not sym and chains_B is None):
            chains_A = chains_B = None
    dims = None if chains_A is None else _dims(chains_A, *([] if sym else [chains_B]))
    t_prepare = time.perf_counter() - t_prepare
    threads = _blas_threads() if dims is not None and not ops.is_torch else 1
    if device is None and not force_numpy and dims is not None and dims.depth > 1 and threads < 2:
        # stacks on one thread: torch on the CPU, whose fused elementwise
        # kernels took half numpy's time for the Hadamard cores here; with
        # more BLAS threads numpy's worker threads won (see _run_jobs)
        ops = _Ops(dname, "cpu")

    candidates: dict[str, RouteCost] = {}
    notes: list[str] = []
    if dims is not None:
        target = budget if ops.cuda else min(budget, _PG_WORKING_SET * (4 if ops.is_torch else 1))
        pg_cost, c_pg, keep_pg, workers_pg = _pg_layout(len(chains_A), len(A) if sym else len(chains_B), sym, dims,
                                                        ops.itemsize, budget, not ops.is_torch, target, threads)
        candidates["pairwise-gram"] = pg_cost
        if dims.depth == 1:
            mat_cost, c_mat, chunks_mat, form_mat = _mat_layout(
                chains_A, chains_B, dims, ops.itemsize, budget, budget if ops.cuda else min(budget, _MAT_WORKING_SET),
                ops.cuda, threads)
            candidates["materialize"] = mat_cost
    if route == "auto":
        fitting = [c for c in candidates.values() if c.fits]
        if fitting:
            chosen = min(fitting, key=lambda c: c.flops).route
        elif candidates:
            chosen = min(candidates.values(), key=lambda c: c.peak_bytes).route
            notes.append(f"no batched route fits max_memory={budget} bytes; took the smallest")
        else:
            chosen = "pairwise"
    else:
        chosen = route
        if chosen != "pairwise" and chosen not in candidates:
            if dims is not None:
                why = "materialize needs models of exactly one bilinear layer"
            elif inner == "network":
                why = "the network product is batched for Linear/Bilinear stacks with bilinear layers"
            else:
                why = ("the gaussian and symmetric products are batched for models that fold to one bilinear "
                       "layer, with the default degree and an exact method")
            raise ValueError(f"route={route!r} is not available here: {why}; use route='pairwise'")
        if chosen in candidates and not candidates[chosen].fits:
            raise MemoryError(f"route {chosen!r} needs about {candidates[chosen].peak_bytes} bytes at its smallest "
                              f"blocks; max_memory is {budget}")
    if chosen == "pairwise" and dims is None and route == "auto":
        notes.append("no batched route covers these models/arguments: each pair with ts.inner")

    est = candidates[chosen].flops if chosen in candidates else 0
    show = progress if progress is not None else (None if est > _LONG_FLOPS else False)
    clock = _Clock(ops)
    clock.seconds["prepare"], clock.flops["prepare"] = t_prepare, 0  # folding and normalizing, on the host
    exact, meth = True, "exact"
    if chosen == "pairwise":
        K, sA, sB, exact, meth, flops = _run_pairwise(A, B, inner, method, mean, cov, centered, kwargs, progress)
        cos = _cosines(K, sA, sB, inner, "float64", sym)
        normsA = _norms(sA, None)
        normsB = normsA if sym else _norms(sB, None)
        steps: tuple[StepTime, ...] = ()
    else:
        if chosen == "materialize":
            K, sA, sB = _run_materialize(chains_A, chains_B, dims, ops, c_mat, chunks_mat, form_mat, clock, show)
            logA = np.array([c.log_scales.sum() for c in chains_A])
            logB = logA if sym else np.array([c.log_scales.sum() for c in chains_B])
        else:
            K, sA, sB, logA, logB = _run_pairwise_gram(chains_A, chains_B, dims, ops, c_pg, keep_pg, clock, show,
                                                       workers_pg)
        cos = _cosines(K, sA, sB, inner, dname, sym)
        normsA, normsB = _norms(sA, logA), (None if sym else _norms(sB, logB))
        if sym:
            normsB = normsA
        flops = clock.total_flops
        steps = clock.steps()
    return SimilarityMatrix(
        values=cos, route=chosen, flops=int(flops), inner=inner, method=meth, exact=exact, norms=normsA,
        col_norms=normsB, symmetric=sym, centered=centered, measure=measure if inner == "gaussian" else "",
        dtype=dname if chosen != "pairwise" else "float64", device=ops.name if chosen != "pairwise" else "numpy",
        max_memory=budget, candidates=candidates, steps=steps, seconds=time.perf_counter() - t_start,
        labels=labels, col_labels=labels if sym else col_labels, notes=tuple(notes),
    )


def similarity_matrix(
    models: Sequence[Any] | Mapping[str, Any],
    inner: str = "gaussian",
    method: str = "auto",
    mean: Any = None,
    cov: Any = None,
    *,
    centered: bool = False,
    route: str = "auto",
    dtype: Any = None,
    device: Any = None,
    max_memory: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> SimilarityMatrix:
    """The N x N matrix of cosines <a, b> / sqrt(<a, a> <b, b>) between ``models``.

    ``inner``, ``method``, ``mean``, ``cov``, ``centered`` (and ``degree``,
    ``budget``, ``orbits`` for the pairwise route) mean what they mean in
    :func:`tsalgebra.similarity`.  ``route``: "auto" (the cheaper batched route
    within ``max_memory``; "pairwise" where none applies), "materialize",
    "pairwise-gram" or "pairwise".  ``dtype``: float64 (default) or float32
    (numpy, torch or string spelling).  ``device``: a torch device ("cpu",
    "cuda", "cuda:1"...) to compute with torch there; None computes with numpy
    (in threads when large; stacks on a single BLAS thread in torch on the CPU),
    "numpy" with numpy only.
    ``max_memory``: bytes for the route's blocks (default a quarter of the
    available memory of the device).  ``progress``: True / False, or None for
    a tqdm bar on a terminal when the work is long.  ``models`` may be a mapping
    name -> model; the names label the plot.
    """
    return _compute(models, None, inner, method, mean, cov, centered, route, dtype, device, max_memory, progress,
                    kwargs)


def cross_similarity_matrix(
    models_a: Sequence[Any] | Mapping[str, Any],
    models_b: Sequence[Any] | Mapping[str, Any],
    inner: str = "gaussian",
    method: str = "auto",
    mean: Any = None,
    cov: Any = None,
    *,
    centered: bool = False,
    route: str = "auto",
    dtype: Any = None,
    device: Any = None,
    max_memory: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> SimilarityMatrix:
    """The N x M matrix of cosines between ``models_a`` (rows) and ``models_b``
    (columns); arguments as in :func:`similarity_matrix`."""
    return _compute(models_a, models_b, inner, method, mean, cov, centered, route, dtype, device, max_memory,
                    progress, kwargs)
