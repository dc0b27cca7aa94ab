"""workers= starts a local dask cluster whose nannies, in this process, write
their workers' environment (one BLAS thread, ...) into os.environ: the
caller's environment is as before once the cluster is up and after it closes,
and the workers, restarted ones too, still get theirs."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.matrix import cluster

distributed = pytest.importorskip("dask.distributed")

# what distributed.nanny.pre-spawn-environ (and the nanny's hash seed) give the workers
KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "PYTHONHASHSEED")


def _worker_env():
    return {k: os.environ.get(k) for k in KEYS}


def _changed(before, after):
    return {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}


def test_local_cluster_leaves_environ(monkeypatch):
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's own value: kept here, and dask gives it the workers
    rng = np.random.default_rng(0)
    models = [ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
              for _ in range(3)]
    serial = ts.similarity_matrix(models, progress=False)  # first use's imports (threadpoolctl sets a variable)
    seen = {}
    real = cluster._client

    @contextlib.contextmanager
    def spy(tiling):
        with real(tiling) as (client, where, n):
            seen["up"] = dict(os.environ)
            seen["workers"] = list(client.run(_worker_env).values())
            client.restart()  # the nannies spawn the workers again, writing os.environ again
            seen["restarted"] = list(client.run(_worker_env).values())
            yield client, where, n

    monkeypatch.setattr(cluster, "_client", spy)
    before = dict(os.environ)
    tiled = ts.similarity_matrix(models, workers=1, tile=2, progress=False)
    assert _changed(before, os.environ) == {}
    assert _changed(before, seen["up"]) == {}
    np.testing.assert_allclose(tiled.values, serial.values, atol=1e-12)
    for env in seen["workers"] + seen["restarted"]:
        assert env["OMP_NUM_THREADS"] == "4"
        assert env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
        assert env["MALLOC_TRIM_THRESHOLD_"] is not None and env["PYTHONHASHSEED"] is not None
