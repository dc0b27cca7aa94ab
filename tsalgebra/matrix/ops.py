"""The execution machinery the routes share: an array facade over numpy and
torch (any device), worker threads with BLAS on one thread each, a clock of
time and planner flops per step; the progress bars come from
:mod:`tsalgebra.progress`."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..arrays import checked_device
from ..problem import available_memory
from .results import StepTime

_FALLBACK_MEMORY = 2 * 2**30  # a CUDA device whose free memory cannot be read
# The routes run in threads on numpy when forming one side's models, or all
# block pairs, take at least this many flops (about a millisecond of BLAS,
# what the thread pool and the BLAS limit cost).
THREADED_FLOPS = 10**8
# The materialize route's Gram of the flattened tensors (a short, very wide
# product, once per feature chunk) stays in the engine that formed them: on
# numpy, handing it to torch (MKL) was faster alone but slower after numpy's
# formation here (both libraries' thread pools then compete for the cores).
# Numpy takes it in row blocks (OpenBLAS's syrk on that shape ran at a third of
# its GEMM rate), torch in column chunks.
_GRAM_ROWS = 25
_GRAM_COLUMNS = 8192


# ------------------------------------------------------------ arrays


def parse_dtype(dtype: Any) -> str:
    """"float64" or "float32" from a numpy, torch or string spelling (None: float64)."""
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


class Ops:
    """The few array operations the routes need, on numpy or on torch (any device)."""

    def __init__(self, dtype: str, device: Any) -> None:
        self.dtype_name = dtype
        self.itemsize = 8 if dtype == "float64" else 4
        self.is_torch = device is not None
        if self.is_torch:
            import torch

            self.t = torch
            self.device = checked_device(device)
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
        cols = partition(X.shape[1], -(-X.shape[1] // parts))
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
        """The default memory bound in bytes: a quarter of the device's free memory."""
        if self.cuda:
            try:
                free, _ = self.t.cuda.mem_get_info(self.device)
                return int(free) // 4
            except Exception:  # pragma: no cover - depends on the device
                return _FALLBACK_MEMORY
        return available_memory() // 4


def _numpy_gram(X: np.ndarray, Y: np.ndarray, same: bool) -> np.ndarray:
    """X @ Y^T; when X is Y, the blocks of rows on and above the diagonal only."""
    if not same:
        return X @ Y.T
    G = np.empty((X.shape[0], X.shape[0]), dtype=X.dtype)
    for a0, a1 in partition(X.shape[0], _GRAM_ROWS):
        G[a0:a1, a0:] = X[a0:a1] @ X[a0:].T
        G[a1:, a0:a1] = G[a0:a1, a1:].T
    return G


# ------------------------------------------------------------ threads and clock


class Clock:
    """Accumulates wall time and planner flops per step name."""

    def __init__(self, ops: Ops) -> None:
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

    def absorb(self, other: Clock, share: float) -> None:
        """Add ``other``'s steps, its times times ``share`` (1/workers for a
        worker thread's clock: the steps then split the wall time the workers
        spent together)."""
        for k, s in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + share * s
            self.flops[k] = self.flops.get(k, 0) + other.flops[k]

    def steps(self) -> tuple[StepTime, ...]:
        return tuple(StepTime(k, self.flops[k], self.seconds[k]) for k in self.seconds)

    def add(self, name: str, seconds: float, flops: int) -> None:
        """A step timed elsewhere (the preparation, before the route is known)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.flops[name] = self.flops.get(name, 0) + int(flops)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())


def partition(n: int, c: int) -> list[tuple[int, int]]:
    """[0, n) in consecutive parts of at most about ``c`` (as many parts as
    blocks of ``c`` need, their sizes differing by at most one)."""
    c = max(1, min(c, n))
    k = -(-n // c)
    base, extra = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        size = base + (1 if j < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def run_tasks(tasks: Sequence[Callable[[Clock], Any]], clock: Clock, pool: Any, workers: int, bar: Any = None
              ) -> list[Any]:
    """The results of ``tasks`` (callables taking a Clock), in order: run one
    after another on ``clock``, or in the ``workers`` threads of ``pool`` with
    a clock each, absorbed into ``clock`` at 1/workers of their time (a step's
    time is then its share of the wall time the workers spent together).  At
    most two tasks per worker are queued at a time, so the bookkeeping does not
    grow with the number of tasks."""
    out: list[Any] = [None] * len(tasks)
    if pool is None:
        for k, task in enumerate(tasks):
            out[k] = task(clock)
            if bar is not None:
                bar.update(1)
        return out
    from concurrent.futures import FIRST_COMPLETED, wait

    todo = iter(enumerate(tasks))
    running: dict[Any, tuple[int, Clock]] = {}
    while True:
        for k, task in todo:
            clk = Clock(clock.ops)
            running[pool.submit(task, clk)] = (k, clk)
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

