"""kept_heap: glibc's top pad raised while computations run, restored after."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra import heap


class _Recorder:
    """Stands in for glibc's mallopt: records the pads set."""

    def __init__(self) -> None:
        self.pads: list[int] = []

    def __call__(self, param: int, value: int) -> int:
        assert param == heap._M_TOP_PAD
        self.pads.append(value)
        return 1


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(heap, "_MALLOPT", rec)
    return rec


def test_nested_pads_take_the_largest_and_restore_the_default(recorder: _Recorder) -> None:
    with heap.kept_heap(2**26):
        with heap.kept_heap(2**24):
            assert recorder.pads[-1] == 2**26  # the smaller request does not shrink the larger one's pad
        assert recorder.pads[-1] == 2**26
        with heap.kept_heap(2**28):
            assert recorder.pads[-1] == 2**28
        assert recorder.pads[-1] == 2**26
    assert recorder.pads[-1] == heap._DEFAULT_PAD
    with heap.kept_heap(10):  # never below the process's own pad
        assert recorder.pads[-1] == heap._DEFAULT_PAD
    with heap.kept_heap(1e30):  # mallopt takes a C int
        assert recorder.pads[-1] == 2**31 - 1


def test_an_exception_or_interrupt_restores_the_pad(recorder: _Recorder) -> None:
    for error in (ValueError, KeyboardInterrupt):
        with pytest.raises(error):
            with heap.kept_heap(2**27):
                raise error()
        assert recorder.pads[-1] == heap._DEFAULT_PAD
        assert heap._held == []


def test_overlapping_threads_restore_only_when_the_last_leaves(recorder: _Recorder) -> None:
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with heap.kept_heap(2**25):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with heap.kept_heap(2**27):
        t.start()
        assert inside.wait(10)
    assert recorder.pads[-1] == 2**25  # the other computation still runs: its pad stays
    release.set()
    t.join(10)
    assert recorder.pads[-1] == heap._DEFAULT_PAD


def test_environment_pad_is_the_one_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "1048576")
    assert heap._default_pad() == 2**20
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.top_pad=0x400000")
    assert heap._default_pad() == 2**22  # the tunable wins over the older variable, as in glibc
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.top_pad=lots")
    assert heap._default_pad() == 2**20
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    assert heap._default_pad() == heap._GLIBC_TOP_PAD


def _bilinear(rng: np.random.Generator, d: int = 5) -> ts.Bilinear:
    return ts.Bilinear(rng.normal(size=(d + 1, d)), rng.normal(size=(d + 1, d)), rng.normal(size=(3, d + 1)))


def test_a_planned_computation_keeps_its_estimated_peak(recorder: _Recorder) -> None:
    rng = np.random.default_rng(0)
    a, b = _bilinear(rng, 60), _bilinear(rng, 60)
    plans = ts.plan_similarity(a, b).plans
    assert max(p.peak_bytes for p in plans) > heap._DEFAULT_PAD  # large enough for its pad to show
    ts.similarity(a, b)
    assert recorder.pads[0::2] == [max(int(p.peak_bytes), heap._DEFAULT_PAD) for p in plans]
    assert set(recorder.pads[1::2]) == {heap._DEFAULT_PAD} and len(recorder.pads) == 2 * len(plans)
    recorder.pads.clear()
    ts.similarity_matrix([a, b, _bilinear(rng, 60)])
    assert len(recorder.pads) >= 2 and recorder.pads[-1] == heap._DEFAULT_PAD
    assert max(recorder.pads) > heap._DEFAULT_PAD


@pytest.mark.skipif(heap._MALLOPT is None, reason="glibc's malloc only")
def test_freed_pages_are_kept_only_while_held() -> None:
    """The slow twin of the claim: arrays made and dropped again and again
    fault their pages in every time, except inside kept_heap."""
    script = textwrap.dedent("""
        import resource, numpy as np
        from tsalgebra.heap import kept_heap
        def faults(n=20):
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(n):
                arrays = [np.ones(2**19) for _ in range(6)]  # 24 MiB, freed together: the heap's top is trimmed
                del arrays
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
        faults()
        plain = faults()
        with kept_heap(2**26):
            faults(1)
            kept = faults()
        print(plain, kept, faults())
    """)
    # glibc's defaults: an environment with MALLOC_TRIM_THRESHOLD_ (a dask LocalCluster started directly writes
    # it for its workers) fixes the mmap threshold: arrays of 4 MiB are then mapped afresh, pad or not
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    plain, kept, after = (int(v) for v in out.stdout.split())
    assert plain > 20_000  # 480 MiB allocated: most of its pages faulted in again
    assert kept < plain / 10
    assert after > plain / 2  # the process's own setting is back
