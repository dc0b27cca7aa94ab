"""Worker threads beside BLAS: how many BLAS threads numpy has, and a pool of
worker threads that each run BLAS on one thread (for work made of many
independent products, each too small to use several BLAS threads well)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

__all__ = ["blas_threads", "blas_worker_pool", "one_blas_thread"]


_LOCK = threading.Lock()
_held = 0  # computations inside the one-thread limit now
_limiter: Any = None
_original = 1  # BLAS threads before the first of them set the limit


def blas_threads() -> int:
    """Threads of the BLAS library numpy calls (1 when none is found); while
    computations hold BLAS at one thread, the count they will restore."""
    with _LOCK:
        if _held:
            return _original
    return _current_threads()


def _current_threads() -> int:
    from threadpoolctl import ThreadpoolController

    return max((lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers), default=1)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS at one thread, process wide, while any computation holds it: the
    first to enter saves and sets the limit, the last to leave restores it
    (a limit per call would let overlapping calls restore each other's 1)."""
    global _held, _limiter, _original
    from threadpoolctl import threadpool_limits

    with _LOCK:
        if _held == 0:
            _original = _current_threads()
            _limiter = threadpool_limits(limits=1, user_api="blas")
        _held += 1
    try:
        yield
    finally:
        with _LOCK:
            _held -= 1
            if _held == 0:
                _limiter.restore_original_limits()
                _limiter = None


def blas_worker_pool(stack: contextlib.ExitStack, workers: int) -> Any:
    """A pool of ``workers`` threads, with BLAS limited to one thread (process
    wide) until ``stack`` closes: held for a whole computation, since toggling
    the limit per task, or BLAS threads left spinning after a product, cost
    the workers their cores here."""
    stack.enter_context(one_blas_thread())
    return stack.enter_context(_pool(workers))


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A thread pool that, left by an exception (an interrupt, a failed run),
    drops the tasks still queued and waits only for those under way: a
    computation queues all its runs at once, and an interrupt should not wait
    for every one of them."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
