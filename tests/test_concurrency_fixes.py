"""Shared state under threads and interrupts: the process-wide BLAS limit,
the planner's random search, the algorithm registry (each test failed on
the code before its fix)."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.threads as T
from tsalgebra.algorithms import Algorithm, register, unregister
from tsalgebra.planner import plan_equation


@pytest.mark.parametrize("window", ["setting the limit", "restoring it"])
def test_an_interrupt_never_leaves_blas_at_one_thread(monkeypatch, window):
    """A Ctrl-C just after the limit was set (or while it was restored) left
    BLAS at one thread with nothing holding it; the next computation then
    read 1 as the count to restore, for the rest of the process."""
    original = T._current_threads()
    real = T._set_blas
    calls = []

    def interrupted(threads: int) -> None:
        real(threads)
        calls.append(threads)
        if (window == "setting the limit") == (threads == 1) and len(calls) <= 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_set_blas", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with T.one_blas_thread():
            pass
    with T.one_blas_thread():  # the next computation, whatever the interrupt left
        assert T._current_threads() == 1 and T.blas_threads() == original
    assert T._current_threads() == original and T.blas_threads() == original and T._held == 0


def _deep_network():
    r = np.random.default_rng(0)
    layers = [ts.Bilinear(r.normal(size=(20, 6)), r.normal(size=(20, 6)), r.normal(size=(6, 20))) for _ in range(2)]
    layers.append(ts.Bilinear(r.normal(size=(20, 6)), r.normal(size=(20, 6)), r.normal(size=(2, 20))))
    return ts.Sequential(*layers).network(symmetric=False)


def test_the_random_search_neither_reads_nor_moves_another_threads_random_stream():
    """opt_einsum's random-greedy search seeds and draws from the process's
    generator: beside a thread drawing from it, the order found (and its
    flops) changed, and that thread's seeded stream was reseeded under it."""
    equation, tensors = _deep_network().einsum(None)
    shapes = [t.shape for t in tensors]
    quiet = plan_equation(equation, shapes, optimizer="random-greedy-128", cache=False).flops
    stop, draws = threading.Event(), []

    def user() -> None:
        random.seed(12345)
        while not stop.is_set():
            draws.append(random.random())

    thread = threading.Thread(target=user)
    thread.start()
    try:
        found = {plan_equation(equation, shapes, optimizer="random-greedy-128", cache=False).flops for _ in range(3)}
    finally:
        stop.set()
        thread.join()
    assert found == {quiet}
    expect = random.Random(12345)
    assert draws and all(d == expect.random() for d in draws)


class _Never(Algorithm):
    name, title, measures = "never", "a plug-in that never applies", (ts.Gaussian,)

    def check(self, problem):
        return "it never applies"


def test_registering_while_another_thread_chooses():
    """register() rebuilt the registry in place while another thread's
    chooser iterated it: RuntimeError, dictionary changed size during
    iteration."""
    r = np.random.default_rng(1)
    a, b = (ts.Bilinear(r.normal(size=(3, 4)), r.normal(size=(3, 4)), r.normal(size=(2, 3))) for _ in range(2))
    want = ts.similarity(a, b).value
    stop, errors, done = threading.Event(), [], [0]

    def compute() -> None:
        while not stop.is_set():
            try:
                assert ts.similarity(a, b).value == want
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure of the other thread is the defect
                errors.append(repr(exc))
                return

    thread = threading.Thread(target=compute)
    thread.start()
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end and not errors:
            register(_Never(), before="pairings")
            unregister("never")
    finally:
        stop.set()
        thread.join()
    assert not errors and done[0] > 0
