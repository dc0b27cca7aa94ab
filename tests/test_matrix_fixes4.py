"""Matrix fixes, fourth round: norms beyond float64's range are NaN with a
note (their logs kept), on every route; a dask client with no workers is
refused after a bounded wait, a closed one at once; a tiled matrix's flop
budget is judged on the whole matrix before any tile runs; symbolic weights
are refused up front (exact ones give floats); a new store's manifest is
created exclusively; workers= is bounded as the command line bounds it;
numpy integers pass as Python's; the result names the algorithms of its
products, and a tiled one its tiles' memory bound and device."""

from __future__ import annotations

import json
import math
import os
import threading
import warnings

import numpy as np
import pytest
import sympy

import tsalgebra as ts
from helpers import tile_counter
from tsalgebra.matrix import cluster
from tsalgebra.problem import CostError
from tsalgebra.symbolic import from_sympy


def bils(n, seed=0, d=3, h=4, o=2):
    rng = np.random.default_rng(seed)
    return [ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)),
                        left_bias=rng.normal(size=h)) for _ in range(n)]


def scaled(m, s):
    """``m`` with every factor times ``s``: its norm times s^3, its cosines unchanged."""
    return m.replace(left=m.left * s, right=m.right * s, down=m.down * s, left_bias=m.left_bias * s)


# ------------------------------------------------------------ 1. norms beyond float64


@pytest.mark.parametrize("s, cause", [(1e200, "overflows"), (1e-200, "underflows")])
def test_norm_beyond_float64_is_nan_with_a_note_on_every_route(tmp_path, s, cause):
    ms = bils(3)
    ref = ts.similarity_matrix(ms, inner="gaussian", progress=False)
    ms[1] = scaled(ms[1], s)
    with pytest.raises((OverflowError, FloatingPointError), match=cause):  # as ts.norm says it
        ts.norm(ms[1], inner="gaussian")
    runs = [{}, {"route": "pairwise"}, {"store": tmp_path / "st", "tile": 1}]
    for kw in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numpy RuntimeWarning leaks
            m = ts.similarity_matrix(ms, inner="gaussian", progress=False, **kw)
        np.testing.assert_allclose(m.values, ref.values, atol=1e-12)  # the cosines are unaffected
        assert np.isnan(m.norms[1]) and m.col_norms is m.norms, kw
        np.testing.assert_allclose(m.norms[[0, 2]], ref.norms[[0, 2]], rtol=1e-12)
        assert m.log_norms[1] == pytest.approx(math.log(ref.norms[1]) + 3 * math.log(s), rel=1e-9)
        note = [n for n in m.notes if "norm of model 1" in n]
        assert note and cause in note[0] and "NaN (null in JSON) in norms" in note[0], (kw, m.notes)


def test_column_norm_beyond_float64_named_on_its_side(tmp_path):
    ms = bils(3)
    cols = [scaled(ms[0], 1e200), ms[1]]
    for kw in ({}, {"store": tmp_path / "st", "tile": 1}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m = ts.cross_similarity_matrix(ms, cols, inner="gaussian", progress=False, **kw)
        assert np.isfinite(m.norms).all() and np.isnan(m.col_norms[0]) and np.isfinite(m.col_norms[1])
        assert any("column model 0" in n and "col_log_norms" in n for n in m.notes), m.notes
        np.testing.assert_allclose(np.exp(m.log_norms), m.norms, rtol=1e-12)


# ------------------------------------------------------------ 2, 5. dask clients


def _run_bounded(fn, seconds=10.0):
    """fn() in a thread: its exception, or a failure if it is still running after ``seconds``."""
    out = {}

    def go():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            out["exc"] = exc

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), "still waiting for workers"
    return out.get("exc")


def test_client_without_workers_is_refused_after_a_bounded_wait(monkeypatch):
    distributed = pytest.importorskip("dask.distributed")
    monkeypatch.setattr(cluster, "WORKERS_SECONDS", 0.2)
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as lc, \
            distributed.Client(lc) as c:
        exc = _run_bounded(lambda: ts.similarity_matrix(bils(2), inner="gaussian", client=c, tile=1, progress=False))
        assert isinstance(exc, TimeoutError) and "no workers" in str(exc) and c.scheduler.address in str(exc)


def test_closed_client_said_so():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as lc:
        c = distributed.Client(lc)
        c.close()
        with pytest.raises(ValueError, match="client= is closed"):  # not an AttributeError from inside
            ts.similarity_matrix(bils(2), inner="gaussian", client=c, tile=1, progress=False)


# ------------------------------------------------------------ 3. the budget of a tiled matrix


def test_tiled_budget_judged_on_the_whole_matrix_before_any_tile(tmp_path, monkeypatch):
    ms = bils(5)
    ms[4] = bils(1, seed=9, h=30)[0]  # one wider model: its tiles cost more per product
    calls = tile_counter(monkeypatch)
    with pytest.raises(CostError) as info:
        ts.similarity_matrix(ms, inner="gaussian", progress=False, store=tmp_path / "a", tile=2, budget=10)
    assert not calls  # refused before any tile ran
    msg = str(info.value)
    assert "tiled matrix (6 tiles" in msg and f"{info.value.flops:.3g} flops" in msg
    options = {a.option for a in info.value.alternatives}
    assert {"budget", "method"} <= options, msg  # the other methods offered, as on one machine
    budget = next(a.value for a in info.value.alternatives if a.option == "budget")
    m = ts.similarity_matrix(ms, inner="gaussian", progress=False, store=tmp_path / "b", tile=2, budget=budget)
    assert m.tiles.computed == 6  # the budget suggested admits the whole run
    np.testing.assert_allclose(m.values, ts.similarity_matrix(ms, inner="gaussian", progress=False).values,
                               atol=1e-12)


# ------------------------------------------------------------ 4. symbolic and exact weights


def test_symbolic_weights_refused_up_front_exact_ones_computed(tmp_path, monkeypatch):
    x, y, a = sympy.symbols("x y a")
    calls = tile_counter(monkeypatch)
    sym = [from_sympy([x * y + 1], [x, y]), from_sympy([x**2 + a * y], [x, y])]
    for kw in ({}, {"store": tmp_path / "st", "tile": 1}):
        with pytest.raises(TypeError, match=r"model 1 has symbolic weights \(in a\).*ts.similarity"):
            ts.similarity_matrix(sym, inner="symmetric", progress=False, **kw)
    with pytest.raises(TypeError, match="column model 0 has symbolic"):
        ts.cross_similarity_matrix(sym[:1], sym[1:], inner="symmetric", progress=False)
    assert not calls
    exact = [from_sympy([x**2 + sympy.Rational(1, 2) * y], [x, y]), from_sympy([x * y + x**2 - 3], [x, y]),
             from_sympy([y**2 - x], [x, y])]
    m = ts.similarity_matrix(exact, inner="symmetric", progress=False)
    want = [[float(ts.similarity(p, q, inner="symmetric").value) for q in exact] for p in exact]
    np.testing.assert_allclose(m.values, want, atol=1e-14)


# ------------------------------------------------------------ 6. the manifest of a new store


def test_two_first_calls_on_a_new_store_cannot_both_claim_it(tmp_path, monkeypatch):
    """Both find no manifest (the window widened by a slow temporary file):
    one creates it, the other is refused naming the difference."""
    real = cluster.tempfile.mkstemp

    def slow(*a, **k):
        threading.Event().wait(0.2)
        return real(*a, **k)

    monkeypatch.setattr(cluster.tempfile, "mkstemp", slow)
    path, out = tmp_path / "st", {}

    def claim(inner):
        try:
            cluster.Store(path, {"inner": inner}, ["m0"], None)
            out[inner] = "ok"
        except ValueError as exc:
            out[inner] = str(exc)

    threads = [threading.Thread(target=claim, args=(k,)) for k in ("gaussian", "symmetric")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(v == "ok" for v in out.values()) == [False, True], out
    winner = next(k for k, v in out.items() if v == "ok")
    loser = next(k for k, v in out.items() if v != "ok")
    assert "was written with inner=" in out[loser]
    assert json.loads((path / "manifest.json").read_text())["options"]["inner"] == winner
    cluster.Store(path, {"inner": winner}, ["m0"], None)  # the winner's rerun resumes it
    assert not [p for p in path.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------ 7, 8. arguments


def test_workers_bounded_as_the_command_line_bounds_them(monkeypatch):
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 1)
    with pytest.raises(ValueError, match=r"workers=5 is more than 4 local worker processes .*scheduler="):
        ts.similarity_matrix(bils(2), inner="gaussian", workers=5, progress=False)


def test_numpy_integers_pass_as_python_integers(tmp_path):
    ms = bils(3)
    kw = dict(inner="gaussian", method="sampled", samples=50, progress=False)
    first = ts.similarity_matrix(ms, store=tmp_path, tile=2, seed=1, **kw)
    again = ts.similarity_matrix(ms, store=tmp_path, tile=np.int64(2), seed=np.int64(1), **kw)
    assert again.tiles.from_store == again.tiles.total and again.tiles.computed == 0
    np.testing.assert_array_equal(again.values, first.values)
    assert json.loads((tmp_path / "manifest.json").read_text())["options"]["tile"] == 2


# ------------------------------------------------------------ 9. what computed the cells


def test_algorithms_recorded_and_tiles_report_their_bound(tmp_path):
    ms = bils(3)
    pair = ts.inner(ms[0], ms[1], inner="gaussian").algorithm
    m = ts.similarity_matrix(ms, inner="gaussian", route="pairwise", progress=False)
    assert pair in m.algorithms and pair in repr(m)
    assert ts.similarity_matrix(ms, inner="gaussian", route="materialize", progress=False).algorithms == ()
    tiled = ts.similarity_matrix(ms, inner="gaussian", route="pairwise", progress=False, store=tmp_path, tile=2)
    assert tiled.algorithms == m.algorithms
    assert tiled.max_memory > 0 and tiled.device == m.device  # the bound its tiles were laid out within
    resumed = ts.similarity_matrix(ms, inner="gaussian", route="pairwise", progress=False, store=tmp_path, tile=2)
    assert resumed.tiles.computed == 0 and resumed.algorithms == m.algorithms
