"""Worker threads beside BLAS: how many BLAS threads numpy has, and a pool of
worker threads that each run BLAS on one thread (for work made of many
independent products, each too small to use several BLAS threads well)."""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["blas_threads", "blas_worker_pool"]


def blas_threads() -> int:
    """Threads of the BLAS library numpy calls (1 when none is found)."""
    from threadpoolctl import ThreadpoolController

    return max((lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers), default=1)


def blas_worker_pool(stack: contextlib.ExitStack, workers: int) -> Any:
    """A pool of ``workers`` threads, with BLAS limited to one thread (process
    wide) until ``stack`` closes: held for a whole computation, since toggling
    the limit per task, or BLAS threads left spinning after a product, cost
    the workers their cores here."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
    return stack.enter_context(ThreadPoolExecutor(workers))
