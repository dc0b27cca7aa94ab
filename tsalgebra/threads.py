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
# From just before the limit is set until it is restored: an interrupt (Ctrl-C)
# between the two leaves it True, so the next computation keeps the count saved
# below instead of reading the 1 left behind as the original (BLAS stayed at one
# thread for the rest of the process).
_limited = False
_original = 1  # BLAS threads before the first of them set the limit


def blas_threads() -> int:
    """Threads of the BLAS library numpy calls (1 when none is found); while
    computations hold BLAS at one thread, the count they will restore."""
    with _LOCK:  # read under the lock: a computation starting meanwhile would show its 1
        return _original if _held or _limited else _current_threads()


def _current_threads() -> int:
    from threadpoolctl import ThreadpoolController

    return max((lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers), default=1)


def _set_blas(threads: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS at one thread, process wide, while any computation holds it: the
    first to enter saves and sets the limit, the last to leave restores it
    (a limit per call would let overlapping calls restore each other's 1)."""
    global _held, _limited, _original
    counted = False
    try:
        with _LOCK:
            if _held == 0:
                if not _limited:  # a clean state: this is the count to restore
                    _original = _current_threads()
                _limited = True
                _set_blas(1)
            _held += 1
            counted = True
        yield
    finally:
        with _LOCK:
            if counted:
                _held -= 1
            if _held == 0 and _limited:
                _set_blas(_original)
                _limited = False


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
