"""What tsalgebra refuses, and never returns silently wrong (issue classes of
docs/refusals.md): each class stated as a property over bad inputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import tsalgebra as ts


def bilinear(seed, d=64, h=32, o=10):
    rng = np.random.default_rng(seed)
    return ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)))


# ------------------------------------------------------------ concurrency


def test_overlapping_matrix_calls_leave_blas_threads_as_they_were():
    """Two similarity matrices computed at once (started at a barrier): the
    one-thread BLAS limit of their worker pools is held by a count, so the
    last to leave restores the original, and both results are right."""
    from tsalgebra.threads import _current_threads, blas_threads

    before = _current_threads()
    models = [bilinear(s) for s in range(24)]
    serial = np.asarray(ts.similarity_matrix(models, progress=False).values)
    barrier = threading.Barrier(2)
    out: list = [None, None]
    threads_seen: list[int] = []

    def work(k):
        barrier.wait()
        out[k] = np.asarray(ts.similarity_matrix(models, progress=False).values)
        threads_seen.append(blas_threads())

    workers = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert _current_threads() == before and blas_threads() == before
    assert threads_seen == [before, before]  # a call inside another's limit sees the count to restore
    for m in out:
        np.testing.assert_allclose(m, serial, atol=1e-12)
