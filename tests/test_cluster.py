"""Similarity matrices in tiles: on a dask LocalCluster of two worker
processes, and resumable from a store; equal to the serial matrix."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.matrix import cluster

from helpers import tiny_lm

distributed = pytest.importorskip("dask.distributed")
_ENVIRON_AT_IMPORT = dict(os.environ)


def bilinears(n, seed=0, d=5, h=6, o=3):
    rng = np.random.default_rng(seed)
    return [ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)),
                        left_bias=rng.normal(size=h)) for _ in range(n)]


def stacks(n, seed=1):
    rng = np.random.default_rng(seed)
    return [ts.Sequential(ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(3, 4))),
                          ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4))))
            for _ in range(n)]


@pytest.fixture(scope="module")
def client():
    # the nannies write their workers' environment (one BLAS thread, a malloc trim threshold) into this
    # process's os.environ, where every later test's subprocess inherited it: put back as cluster.workers= does
    before = dict(os.environ)
    changed = None
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as lc, distributed.Client(lc) as c:
            changed = cluster._restore_environ(before)
            yield c
    finally:
        cluster._restore_environ(before, changed)


def test_the_fixture_cluster_leaves_the_environment(client):
    """With the cluster up, the keys its nannies write are as before it."""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
                "__DASK_PARENT_PID"):
        assert os.environ.get(key) == _ENVIRON_AT_IMPORT.get(key), key


@pytest.mark.parametrize("case", ["one-layer", "stacks-network", "attention-tokens", "attention-gaussian"])
def test_cluster_equals_serial(client, case):
    models, kw = {
        "one-layer": (bilinears(7), dict(inner="symmetric")),
        "stacks-network": (stacks(6), dict(inner="network")),
        "attention-tokens": ([tiny_lm(s) for s in range(5)], {}),
        "attention-gaussian": ([tiny_lm(s).layers[1] for s in range(5)], dict(inner="gaussian")),
    }[case]
    serial = ts.similarity_matrix(models, progress=False, **kw)
    tiled = ts.similarity_matrix(models, client=client, tile=2, progress=False, **kw)
    np.testing.assert_allclose(tiled.values, serial.values, atol=1e-12)
    np.testing.assert_allclose(tiled.norms, serial.norms, rtol=1e-10)
    n_tiles = len(cluster.tiles_of(len(models), None, 2))
    assert tiled.tiles.total == tiled.tiles.computed == n_tiles and tiled.route.startswith("tiles:")
    assert tiled.exact == serial.exact and "client of" in tiled.tiles.where
    cross = ts.cross_similarity_matrix(models[:3], models[2:], client=client, tile=2, progress=False, **kw)
    np.testing.assert_allclose(cross.values, serial.values[:3, 2:], atol=1e-12)


def test_tiles_of_cover_every_pair_once():
    for n, m, size in [(7, None, 2), (7, None, 7), (5, 4, 2), (1, None, 3)]:
        seen = np.zeros((n, m or n), dtype=int)
        for t in cluster.tiles_of(n, m, size):
            block = seen[t.r0:t.r1, t.c0:t.c1]
            if t.diagonal:
                block[np.triu_indices(t.r1 - t.r0)] += 1
            else:
                block += 1
        want = np.triu(np.ones((n, n), dtype=int)) if m is None else np.ones((n, m), dtype=int)
        assert (seen == want).all()
    assert cluster.default_size(200, None, 2) == 66  # 4 tiles a side, 10 in all: at least four per worker
    assert cluster.default_size(200, None, 2, most=10) == 10  # a worker's memory holds 2 x 10 models


def test_a_cancelled_tile_is_sent_again(client):
    """The scheduler cancels a tile whose worker died with its inputs (seen
    under load: the killed-worker run below then raised FutureCancelledError);
    such a tile is sent again with its models, as the scheduler cancelling
    it here (twice) shows: the matrix as computed serially."""
    models = [tiny_lm(s) for s in range(6)]
    kw = dict(inner="gaussian", method="closure")
    serial = ts.similarity_matrix(models, progress=False, **kw)
    out: dict = {}

    def run():
        try:
            out["m"] = ts.similarity_matrix(models, client=client, tile=1, progress=False, **kw)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    cancelled, deadline = 0, time.time() + 60
    while cancelled < 2 and thread.is_alive() and time.time() < deadline:
        pending = [k for k, state in list(client.futures.items())
                   if "compute_tile" in str(k) and state.status == "pending"]
        if pending:
            client.cancel([distributed.Future(pending[0], client)])
            cancelled += 1
        time.sleep(0.02)
    thread.join(120)
    assert cancelled == 2 and not thread.is_alive() and "error" not in out, out.get("error")
    np.testing.assert_allclose(out["m"].values, serial.values, atol=1e-12)


def test_a_killed_worker_loses_only_its_tile(client, tmp_path):
    models = [tiny_lm(s) for s in range(9)]
    kw = dict(inner="gaussian", method="closure")  # pair by pair: slow enough to kill a worker mid-run
    serial = ts.similarity_matrix(models, progress=False, **kw)
    store = tmp_path / "store"
    out: dict = {}

    def run():
        try:
            out["m"] = ts.similarity_matrix(models, client=client, tile=1, store=store, progress=False, **kw)
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 60
    while not list(store.glob("tiles/*.npz")):  # the first tile is in: kill a worker
        assert time.time() < deadline, "no tile finished"
        time.sleep(0.02)
    pids = client.run(os.getpid)
    victim = next(iter(pids.values()))
    os.kill(victim, signal.SIGKILL)
    killed_at = len(list(store.glob("tiles/*.npz")))
    thread.join(120)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    assert killed_at < 45  # the worker died mid-run
    m = out["m"]
    assert m.tiles.computed == m.tiles.total == 45
    np.testing.assert_allclose(m.values, serial.values, atol=1e-12)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it
    assert victim not in client.run(os.getpid).values()


def test_resume_computes_only_the_missing_tiles(tmp_path):
    models = bilinears(9)
    serial = ts.similarity_matrix(models, progress=False)
    first = ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)
    assert first.tiles.computed == first.tiles.total == 15 and first.tiles.where == "this process"
    files = sorted((tmp_path / "tiles").glob("*.npz"))
    assert len(files) == 15 and (tmp_path / "manifest.json").exists()
    for f in files[::4]:  # as if the run had stopped before these
        f.unlink()
    again = ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)
    assert again.tiles.computed == 4 and again.tiles.from_store == 11
    np.testing.assert_allclose(again.values, serial.values, atol=1e-12)
    np.testing.assert_allclose(first.values, serial.values, atol=1e-12)


def test_an_interrupted_run_keeps_every_finished_tile(tmp_path, monkeypatch):
    models = bilinears(8)
    real = cluster.progress_bar

    class Interrupting:
        def __init__(self, *a, **k):
            self.bar, self.calls = real(*a, **k), 0

        def update(self, k):
            self.calls += 1
            if self.calls == 4:  # the fourth tile is written, then Ctrl-C
                raise KeyboardInterrupt
            self.bar.update(k)

        def __getattr__(self, name):
            return getattr(self.bar, name)

    monkeypatch.setattr(cluster, "progress_bar", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)
    assert len(list((tmp_path / "tiles").glob("*.npz"))) == 3
    monkeypatch.setattr(cluster, "progress_bar", real)
    done = ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)
    assert done.tiles.from_store == 3 and done.tiles.computed == done.tiles.total - 3
    np.testing.assert_allclose(done.values, ts.similarity_matrix(models, progress=False).values, atol=1e-12)


def test_a_store_of_other_models_or_options_is_refused(tmp_path):
    models = bilinears(5)
    ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)
    other = models[:2] + bilinears(1, seed=9) + models[3:]
    with pytest.raises(ValueError, match="other models .*model 2 differs"):
        ts.similarity_matrix(other, store=tmp_path, tile=2, progress=False)
    with pytest.raises(ValueError, match="other models"):
        ts.similarity_matrix(models[:4], store=tmp_path, tile=2, progress=False)
    with pytest.raises(ValueError, match="written with inner='gaussian', this call has inner='symmetric'"):
        ts.similarity_matrix(models, inner="symmetric", store=tmp_path, tile=2, progress=False)
    with pytest.raises(ValueError, match="written with tile=2"):
        ts.similarity_matrix(models, store=tmp_path, tile=3, progress=False)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)


def test_an_unreachable_scheduler_is_named(monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 1)
    with pytest.raises(OSError, match="cannot reach the dask scheduler at 'tcp://127.0.0.1:1' within 1 s"):
        ts.similarity_matrix(bilinears(3), scheduler="tcp://127.0.0.1:1", progress=False)


def test_bad_arguments(tmp_path):
    models = bilinears(3)
    with pytest.raises(ValueError, match="workers must be a positive"):
        ts.similarity_matrix(models, workers=0, progress=False)
    with pytest.raises(ValueError, match="tile must be a positive"):
        ts.similarity_matrix(models, store=tmp_path, tile=0, progress=False)
    with pytest.raises(ValueError, match="store= takes a directory"):
        ts.similarity_matrix(models, store="", progress=False)
    with pytest.raises(ValueError, match="one of client=, scheduler= and workers="):
        ts.similarity_matrix(models, workers=2, scheduler="tcp://127.0.0.1:1", progress=False)


def test_the_command_line_on_a_local_cluster(tmp_path, capsys):
    from tsalgebra.cli import main

    for k, m in enumerate(bilinears(5)):
        ts.save(m, tmp_path / f"step_{k}.safetensors")
    store = tmp_path / "store"
    args = ["matrix", str(tmp_path), "--out", str(tmp_path / "m.png"), "--store", str(store), "--tile", "2",
            "--no-progress", "--json"]
    assert main(args + ["--workers", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tiles"]["computed"] == 6 and rep["tiles"]["where"] == "local cluster of 2 workers"
    np.testing.assert_allclose(rep["values"], ts.similarity_matrix(ts.load(tmp_path), progress=False).values,
                               atol=1e-12)
    assert main(args) == 0  # resumed in this process: nothing left to compute
    assert json.loads(capsys.readouterr().out)["tiles"]["from_store"] == 6
    no_tile = [a for a in args if a not in ("--tile", "2")]
    assert main(no_tile) == 0  # without --tile: the store's tile size
    assert json.loads(capsys.readouterr().out)["tiles"] == dict(rep["tiles"], computed=0, from_store=6,
                                                               routes={}, where="this process",
                                                               worker_seconds=0.0)
    with pytest.raises(SystemExit) as e:  # argparse's own range check: a usage error
        main(args[:-1] + ["--workers", "0"])
    assert e.value.code == 2


def test_damaged_tiles_are_computed_again(tmp_path, capsys):
    models = bilinears(6)
    serial = ts.similarity_matrix(models, progress=False)
    ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)
    files = sorted((tmp_path / "tiles").glob("*.npz"))
    files[0].write_bytes(b"not a zip")  # torn or tampered
    with np.load(files[1]) as z:
        parts = dict(z)
    parts["cross"] = np.full_like(parts["cross"], np.nan)  # readable, not finite
    np.savez(files[1], **parts)
    with np.load(files[2]) as z:
        parts = dict(z)
    parts["cross"] = parts["cross"][:1]  # readable, the wrong shape
    np.savez(files[2], **parts)
    with pytest.warns(UserWarning, match="store tile"):  # and in the notes: the command line's note lines
        again = ts.similarity_matrix(models, store=tmp_path, tile=2, progress=False)
    said = [n for n in again.notes if n.startswith("store tile")]
    assert again.tiles.computed == 3 and len(said) == 3, again.notes
    assert "is unreadable (not a tile this store wrote" in said[0] and "not finite" in said[1] and "shape" in said[2]
    np.testing.assert_allclose(again.values, serial.values, atol=1e-12)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        ts.similarity_matrix(models, store=tmp_path / "file", progress=False)
