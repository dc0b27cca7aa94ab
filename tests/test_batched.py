"""Similarity matrices (tsalgebra.matrix) against the pairwise API.

ts.inner / ts.similarity are the independent slow twin here: every batched
route must reproduce them to round-off (1e-10 on cosines and relative on
norms, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tsalgebra as ts
from tsalgebra.matrix import SimilarityMatrix, cross_similarity_matrix, similarity_matrix
from tsalgebra.matrix import api, ops, prepare
from tsalgebra.threads import blas_worker_pool
from tsalgebra.matrix import materialize as MAT
from tsalgebra.matrix import pairwise_gram as PG

TOL = 1e-10
# The CUDA engine is checked wherever a GPU is present; CI has none and skips it.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def bilinear(rng, d, h, o, residual=False, biases=True, scale=1.0):
    return ts.Bilinear(
        scale * rng.normal(size=(h, d)), scale * rng.normal(size=(h, d)), scale * rng.normal(size=(o, h)),
        scale * rng.normal(size=h) if biases else None, scale * rng.normal(size=h) if biases else None,
        scale * rng.normal(size=o) if biases else None, residual=residual,
    )


def one_layer_models(seed=0, d=4, o=4):
    """Mixed hidden widths, a residual block, no biases, Linear layers folded in."""
    rng = np.random.default_rng(seed)
    return [
        bilinear(rng, d, 3, o),
        bilinear(rng, d, 5, o),
        bilinear(rng, d, 2, o, residual=(d == o)),
        bilinear(rng, d, 1, o, biases=False),
        ts.Sequential(ts.Linear(rng.normal(size=(3, d)), rng.normal(size=3)), bilinear(rng, 3, 3, 5),
                      ts.Linear(rng.normal(size=(o, 5)))),
    ]


def stacks(seed=0, d=3, o=2):
    rng = np.random.default_rng(seed)
    return [
        ts.Sequential(bilinear(rng, d, 4, 5), bilinear(rng, 5, 3, 4), bilinear(rng, 4, 2, o)),
        ts.Sequential(bilinear(rng, d, 2, 6), bilinear(rng, 6, 5, 4), bilinear(rng, 4, 3, o)),
        ts.Sequential(bilinear(rng, d, 3, d, residual=True), bilinear(rng, d, 2, 3), bilinear(rng, 3, 4, o)),
        ts.Sequential(bilinear(rng, d, 1, 2), bilinear(rng, 2, 2, 2), bilinear(rng, 2, 2, o)),
    ]


def threads_at_any_size(monkeypatch):
    """Both batched routes take worker threads (where numpy has several BLAS
    threads) however little work there is."""
    for route in (MAT, PG):
        monkeypatch.setattr(route, "THREADED_FLOPS", 0)


def pairwise(rows, cols, inner, **kw):
    return np.array([[ts.similarity(a, b, inner=inner, **kw).value for b in cols] for a in rows])


def norms(models, inner, **kw):
    return np.array([ts.norm(m, inner=inner, **kw).value for m in models])


def rel(x, y):
    return float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / np.abs(np.asarray(y))))


@pytest.fixture(scope="module")
def models():
    return one_layer_models()


# ------------------------------------------------------------ equality


@pytest.mark.parametrize("device", [None, CUDA])
@pytest.mark.parametrize("inner", ["symmetric", "gaussian", "network"])
@pytest.mark.parametrize("route", ["materialize", "pairwise-gram", "pairwise", "auto"])
def test_matches_pairwise_api(models, inner, route, device):
    r = similarity_matrix(models, inner=inner, route=route, device=device, progress=False)
    assert isinstance(r, SimilarityMatrix) and r.values.shape == (5, 5) and r.values.dtype == np.float64
    assert r.route == (route if route != "auto" else r.route) and r.route != "auto"
    assert r.inner == inner and r.method == "exact" and r.exact and r.symmetric
    assert np.max(np.abs(r.values - pairwise(models, models, inner))) < TOL
    assert rel(r.norms, norms(models, inner)) < TOL
    assert r.col_norms is r.norms


@pytest.mark.parametrize("kw", [dict(centered=True), dict(mean="m", cov="C"), dict(mean="m", cov="C", centered=True),
                                dict(mean="m"), dict(cov="singular")])
@pytest.mark.parametrize("route", ["materialize", "pairwise-gram"])
@pytest.mark.parametrize("device", [None, CUDA])
def test_gaussian_measures(models, kw, route, device):
    rng = np.random.default_rng(5)
    A = rng.normal(size=(4, 4))
    vals = {"m": rng.normal(size=4), "C": A @ A.T / 4 + 0.2 * np.eye(4), "singular": A[:, :2] @ A[:, :2].T}
    kw = {k: vals.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    r = similarity_matrix(models, inner="gaussian", route=route, device=device, progress=False, **kw)
    assert np.max(np.abs(r.values - pairwise(models, models, "gaussian", **kw))) < TOL
    assert rel(r.norms, norms(models, "gaussian", **kw)) < TOL
    assert r.centered == kw.get("centered", False)
    assert r.measure == ("N(0, I)" if set(kw) <= {"centered"} else "N(mean, cov)")


@pytest.mark.parametrize("inner", ["symmetric", "gaussian", "network"])
@pytest.mark.parametrize("route", ["materialize", "pairwise-gram", "pairwise"])
@pytest.mark.parametrize("device", [None, CUDA])
def test_cross_matrix(models, inner, route, device):
    cols = one_layer_models(seed=1)[:3] + [models[0]]
    r = cross_similarity_matrix(models, cols, inner=inner, route=route, device=device, progress=False)
    assert r.values.shape == (5, 4) and not r.symmetric
    assert np.max(np.abs(r.values - pairwise(models, cols, inner))) < TOL
    assert rel(r.norms, norms(models, inner)) < TOL and rel(r.col_norms, norms(cols, inner)) < TOL
    assert abs(r.values[0, 3] - 1.0) < TOL  # the same model in both lists


def test_diagonal_symmetry_and_one_model(models):
    r = similarity_matrix(models, progress=False)
    assert np.all(np.diag(r.values) == 1.0)
    assert np.array_equal(r.values, r.values.T)
    assert np.all(np.abs(r.values) <= 1.0)
    one = similarity_matrix(models[:1], progress=False)
    assert one.values.shape == (1, 1) and one.values[0, 0] == 1.0


def test_mixed_hidden_widths_are_zero_padded():
    rng = np.random.default_rng(3)
    ms = [bilinear(rng, 5, h, 3) for h in (1, 2, 7, 16)]
    want = pairwise(ms, ms, "symmetric")
    for route in ("materialize", "pairwise-gram"):
        assert np.max(np.abs(similarity_matrix(ms, inner="symmetric", route=route, progress=False).values - want)) < TOL


# ------------------------------------------------------------ stacks


@pytest.mark.parametrize("device", [None, "numpy", CUDA])
def test_network_stacks(device):
    ms = stacks()
    r = similarity_matrix(ms, inner="network", device=device, progress=False)
    assert r.route == "pairwise-gram" and list(r.candidates) == ["pairwise-gram"]
    assert np.max(np.abs(r.values - pairwise(ms, ms, "network"))) < TOL
    assert rel(r.norms, norms(ms, "network")) < TOL
    cols = stacks(seed=2)[:2]
    rc = cross_similarity_matrix(ms, cols, inner="network", device=device, progress=False)
    assert np.max(np.abs(rc.values - pairwise(ms, cols, "network"))) < TOL
    # blocks of one or two models, both orders of the layer products
    small = similarity_matrix(ms, inner="network", device=device, max_memory=30_000, progress=False)
    assert "1 block" not in small.candidates["pairwise-gram"].blocking
    assert np.max(np.abs(small.values - r.values)) < TOL


def test_network_stack_orders_chosen_by_cost():
    rng = np.random.default_rng(4)
    wide = [ts.Sequential(bilinear(rng, 3, 2, 8), bilinear(rng, 8, 2, 9), bilinear(rng, 9, 3, 2)) for _ in range(3)]
    narrow = [ts.Sequential(bilinear(rng, 3, 8, 2), bilinear(rng, 2, 9, 2), bilinear(rng, 2, 7, 2)) for _ in range(3)]
    assert PG._fused(prepare.common_dims(prepare.to_chains(wide, "network", False, None))) == [False, True, True]
    assert PG._fused(prepare.common_dims(prepare.to_chains(narrow, "network", False, None))) == [False, False, False]
    for ms in (wide, narrow):
        r = similarity_matrix(ms, inner="network", progress=False)
        assert np.max(np.abs(r.values - pairwise(ms, ms, "network"))) < TOL


def test_network_needs_equal_depths():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same layer structure"):
        similarity_matrix([bilinear(rng, 3, 2, 3), ts.Sequential(bilinear(rng, 3, 2, 3), bilinear(rng, 3, 2, 3))],
                          inner="network", progress=False)


def test_fallback_depth2_gaussian():
    rng = np.random.default_rng(6)
    ms = [ts.Sequential(bilinear(rng, 2, 2, 2), bilinear(rng, 2, 2, 1)) for _ in range(3)]
    for route in ("auto", "pairwise"):  # auto: each model once on the quadrature grid (input rank 2)
        r = similarity_matrix(ms, inner="gaussian", route=route, progress=False)
        assert r.route == ("node-gram" if route == "auto" else "pairwise") and set(r.candidates) == {"node-gram"}
        assert r.exact and r.method == "exact"
        assert np.max(np.abs(r.values - pairwise(ms, ms, "gaussian"))) < TOL
        assert rel(r.norms, norms(ms, "gaussian")) < TOL
    with pytest.raises(ValueError, match="not available"):
        similarity_matrix(ms, inner="gaussian", route="materialize", progress=False)
    closure = similarity_matrix(ms, inner="gaussian", method="closure", progress=False)
    assert closure.route == "pairwise" and not closure.exact and closure.method == "closure"


def test_fallback_polynomial_and_degree():
    T = np.zeros((2, 3, 3))
    T[1] = [[1.0, 0.5, 0.0], [0.5, 2.0, 1.0], [0.0, 1.0, -1.0]]
    rng = np.random.default_rng(7)
    ms = [ts.Polynomial(T), bilinear(rng, 2, 2, 1)]
    r = similarity_matrix(ms, inner="symmetric", progress=False)
    assert r.route == "pairwise"
    assert np.max(np.abs(r.values - pairwise(ms, ms, "symmetric"))) < TOL
    lifted = similarity_matrix(ms[1:] * 2, inner="symmetric", degree=3, progress=False)
    assert lifted.route == "pairwise"


# ------------------------------------------------------------ routes and memory


def test_auto_takes_the_cheaper_route():
    rng = np.random.default_rng(8)
    mat = similarity_matrix([bilinear(rng, 16, 64, 2) for _ in range(4)], inner="symmetric", progress=False)
    pg = similarity_matrix([bilinear(rng, 64, 4, 2) for _ in range(4)], inner="symmetric", progress=False)
    assert mat.route == "materialize" and pg.route == "pairwise-gram"
    for r in (mat, pg):
        assert set(r.candidates) == {"materialize", "pairwise-gram"}
        assert r.flops == r.candidates[r.route].flops > 0
        assert min(c.flops for c in r.candidates.values()) == r.flops
        assert all(isinstance(p, ts.ContractionPlan) for _, p in r.candidates[r.route].plans)
    # the counts follow the closed forms: ~8 h^2 d per pair against ~2 o h d^2 per model
    assert pg.candidates["pairwise-gram"].flops < pg.candidates["materialize"].flops
    assert mat.candidates["materialize"].flops * 10 < mat.candidates["pairwise-gram"].flops


@pytest.mark.parametrize("route", ["materialize", "pairwise-gram"])
@pytest.mark.parametrize("device", [None, CUDA])
@pytest.mark.parametrize("threads", [1, 3])
def test_memory_bound_chunks(models, route, device, threads, monkeypatch):
    """Every max_memory that fits gives blocks within it (worker threads'
    temporaries counted) and the pairwise values."""
    if threads > 1:
        if device is not None:
            pytest.skip("worker threads are the numpy engine's")
        monkeypatch.setattr(api, "blas_threads", lambda: threads)
        threads_at_any_size(monkeypatch)
    want = pairwise(models, models, "gaussian")
    cols = models[2:]
    blockings = set()
    for memory in range(api.preparation_bytes(models), 40_000, 100):  # below it, the preparation is refused
        try:
            r = similarity_matrix(models, route=route, max_memory=memory, device=device, progress=False)
        except MemoryError:
            if threads > 1:  # fewer workers, or one, where that fits
                monkeypatch.setattr(api, "blas_threads", lambda: 1)
                with pytest.raises(MemoryError):
                    similarity_matrix(models, route=route, max_memory=memory, device=device, progress=False)
                monkeypatch.setattr(api, "blas_threads", lambda: threads)
            continue
        try:  # the cross matrix prepares its columns apart: it may need more
            rc = cross_similarity_matrix(models, cols, route=route, max_memory=memory, device=device, progress=False)
        except MemoryError:
            rc = None
        blockings.add(r.candidates[route].blocking)
        assert r.max_memory == memory and r.candidates[route].fits
        assert r.candidates[route].peak_bytes <= memory
        assert np.max(np.abs(r.values - want)) < TOL
        assert rc is None or np.max(np.abs(rc.values - want[:, 2:])) < TOL
    if threads > 1:  # layouts in threads were among them (the sweep's small bounds fit few workers)
        assert any(" threads" in b for b in blockings)
    elif route == "materialize":  # output chunks, model blocks, and all at once were all exercised
        assert any("model blocks of up to 1" in b for b in blockings)
        assert any("4 output chunks" in b for b in blockings)
        assert any("1 output chunk" in b for b in blockings)
    else:  # blocks stacked once and kept, and (at less memory) stacked per block pair
        assert any("of up to 1 x 1" in b for b in blockings) and len(blockings) >= 2
        assert any("stacked once" in b for b in blockings) and any("stacked once" not in b for b in blockings)


def test_traced_memory_within_bound(monkeypatch):
    """What the numpy routes allocate (tracemalloc, which sees numpy's arrays)
    stays within max_memory, beside the prepared models and 256 KiB of Python
    objects, on one thread and in worker threads."""
    import tracemalloc

    rng = np.random.default_rng(5)
    ones = [bilinear(rng, 40, 10, 4) for _ in range(48)]
    deep = [ts.Sequential(bilinear(rng, 8, 6, 8), bilinear(rng, 8, 6, 8), bilinear(rng, 8, 6, 3)) for _ in range(48)]
    threads_at_any_size(monkeypatch)
    for threads in (1, 3):
        monkeypatch.setattr(api, "blas_threads", lambda: threads)
        for ms, inner, routes in ((ones, "symmetric", ("materialize", "pairwise-gram")),
                                  (deep, "network", ("pairwise-gram",))):
            chains = prepare.to_chains(ms, inner, False, None)
            prepared = sum(x.nbytes for ch in chains for blk in ch.blocks for x in blk)
            del chains
            for route in routes:
                for memory in (2**20, 2**21, 2**22, 2**23):
                    tracemalloc.start()
                    try:
                        r = similarity_matrix(ms, inner=inner, route=route, max_memory=memory, device="numpy",
                                              progress=False)
                        peak = tracemalloc.get_traced_memory()[1]
                    finally:
                        tracemalloc.stop()
                    assert peak <= memory + prepared + 2**18, (threads, inner, route, memory, peak)
                    assert r.candidates[route].peak_bytes <= memory


def test_memory_too_small(models):
    with pytest.raises(MemoryError):
        similarity_matrix(models, route="materialize", max_memory=1_000, progress=False)
    with pytest.raises(MemoryError, match="max_memory="):  # not even the prepared models fit: a named route refuses
        similarity_matrix(models, route="pairwise-gram", max_memory=100, progress=False)
    # auto: pair by pair where the prepared models do not fit, but here not even one pair's plan does
    # (3.2e3 bytes at its peak, 5e3 for the costliest norm): refused, naming the bound that would do them all
    with pytest.raises(MemoryError, match=r"max_memory=5e\+03.*") as refused:
        similarity_matrix(models, max_memory=100, progress=False)
    assert "the norm of model 2" in str(refused.value) and "more products refused" in str(refused.value)
    assert similarity_matrix(models, max_memory=5e3, route="pairwise", progress=False).values.shape == (5, 5)


def test_default_memory_bound(models):
    r = similarity_matrix(models, progress=False)
    assert 2**20 < r.max_memory


# ------------------------------------------------------------ dtype, device, scale


@pytest.mark.parametrize("dtype", [np.float32, "float32", torch.float32])
def test_float32(models, dtype):
    want = pairwise(models, models, "gaussian")
    for route in ("materialize", "pairwise-gram"):
        r = similarity_matrix(models, dtype=dtype, route=route, progress=False)
        assert r.values.dtype == np.float32 and r.dtype == "float32"
        assert np.max(np.abs(r.values - want)) < 1e-4
        assert rel(r.norms, norms(models, "gaussian")) < 1e-4


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_torch_device(models, device):
    for route in ("materialize", "pairwise-gram"):
        r = similarity_matrix(models, device=device, route=route, progress=False)
        assert r.device.startswith(device) and isinstance(r.values, np.ndarray)
        assert np.max(np.abs(r.values - pairwise(models, models, "gaussian"))) < TOL
    r = similarity_matrix(models, device=torch.device(device), dtype=torch.float32, progress=False)
    assert r.values.dtype == np.float32
    assert np.max(np.abs(r.values - pairwise(models, models, "gaussian"))) < 1e-4


@pytest.mark.parametrize("device", [None, CUDA])
def test_large_magnitudes_float32(models, device):
    """Weights times 1e12: <f, f> ~ 1e72 overflows float32 (and squares of it float64)."""
    big = [m.map_weights(lambda w: w * 1e12) for m in models]
    for inner in ("gaussian", "symmetric"):
        want = pairwise(big, big, inner)
        for route in ("materialize", "pairwise-gram"):
            r = similarity_matrix(big, inner=inner, dtype="float32", route=route, device=device, progress=False)
            assert np.isfinite(r.values).all() and np.max(np.abs(r.values - want)) < 1e-4
            assert rel(r.norms, norms(big, inner)) < 1e-4 and np.all(r.norms > 1e30)
    deep = [m.map_weights(lambda w: w * 1e6) for m in stacks()]
    K = np.array([[ts.inner(a, b, inner="network").value for b in deep] for a in deep])  # up to ~1e250
    s = np.sqrt(np.diag(K))
    want = K / s[:, None] / s[None, :]  # (ts.similarity forms <a,a><b,b> first, which overflows here)
    r = similarity_matrix(deep, inner="network", dtype="float32", device=device, progress=False)
    assert np.isfinite(r.values).all() and np.max(np.abs(r.values - want)) < 1e-4
    assert rel(r.norms, s) < 1e-4 and np.all(s > 1e100)


@pytest.mark.parametrize("device", [None, CUDA])
def test_vocabulary_scale_outputs_float32(device):
    """50,000 outputs: the naive float32 Frobenius product of the padded tensors overflows."""
    rng = np.random.default_rng(9)
    o, d, h = 50_000, 6, 3
    ms = [bilinear(rng, d, h, o, scale=1e6) for _ in range(3)]
    S = []
    for m in ms:  # dense symmetric padded tensors, outputs 1..o (float64: an independent check)
        L, R, D = m.padded()
        T = np.einsum("ou,ui,uj->oij", D[1:], L, R)
        S.append(((T + T.transpose(0, 2, 1)) / 2).reshape(-1))
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.dot(S[0].astype(np.float32), S[0].astype(np.float32)))
    G = np.array([[x @ y for y in S] for x in S])
    want = G / np.sqrt(np.outer(np.diag(G), np.diag(G)))
    for route in ("materialize", "pairwise-gram"):
        r64 = similarity_matrix(ms, inner="symmetric", route=route, device=device, progress=False)
        assert np.max(np.abs(r64.values - want)) < TOL and rel(r64.norms, np.sqrt(np.diag(G))) < TOL
        r = similarity_matrix(ms, inner="symmetric", dtype="float32", route=route, device=device, progress=False)
        assert np.isfinite(r.values).all() and np.max(np.abs(r.values - want)) < 1e-4
        assert rel(r.norms, np.sqrt(np.diag(G))) < 1e-4


# ------------------------------------------------------------ progress, plot, errors


def test_progress_false_prints_nothing(models, capfd):
    similarity_matrix(models, progress=False)
    similarity_matrix(models, route="pairwise", progress=False)
    cross_similarity_matrix(models, models, route="pairwise-gram", progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_progress_true_shows_a_bar(models, capfd):
    similarity_matrix(models, route="pairwise", progress=True)
    assert "similarity matrix" in capfd.readouterr().err


def test_result_and_plot(tmp_path, models):
    named = {f"m{i}": m for i, m in enumerate(models)}
    r = similarity_matrix(named, progress=False)
    assert r.labels == tuple(named) and r.shape == (5, 5)
    assert "SimilarityMatrix(5 x 5" in repr(r) and r.route in repr(r)
    assert np.asarray(r).shape == (5, 5)
    assert {s.name for s in r.steps} and r.dominant_step() is not None and r.seconds > 0
    path = tmp_path / "sim.png"
    fig = r.plot(path)
    assert path.exists() and path.stat().st_size > 0 and fig.axes
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    assert r.plot(ax=ax, labels=list("abcde")) is ax.figure
    with pytest.raises(ValueError, match="labels"):
        r.plot(labels=["x"])


def test_plot_draws_through_the_one_renderer(models):
    """SimilarityMatrix.plot is plots.plot_matrix on its values and labels (the
    same pixels), for a cross matrix with row and column names; more than 25
    labels are thinned, and a wrong number of them is refused."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tsalgebra.plots import plot_matrix

    def pixels(draw):
        fig = Figure(figsize=(4, 3))
        canvas = FigureCanvasAgg(fig)
        draw(fig.add_subplot())
        canvas.draw()
        return np.asarray(canvas.buffer_rgba()).copy()

    rows = {f"r{i}": m for i, m in enumerate(models)}
    cols = {f"c{i}": m for i, m in enumerate(one_layer_models(seed=1)[:3])}
    r = cross_similarity_matrix(rows, cols, inner="symmetric", progress=False)
    via_result = pixels(lambda ax: r.plot(ax=ax, title="t"))
    direct = pixels(lambda ax: plot_matrix(r.values, ax=ax, labels=list(rows), col_labels=list(cols), title="t"))
    unlabelled = pixels(lambda ax: plot_matrix(r.values, ax=ax, title="t"))
    assert np.array_equal(via_result, direct) and not np.array_equal(via_result, unlabelled)
    many = np.eye(30)
    fig = plot_matrix(many, labels=[str(k) for k in range(30)], col_labels=[str(k) for k in range(30)])
    assert 1 < len(fig.axes[0].get_yticks()) <= 25 and len(fig.axes[0].get_xticks()) <= 25
    with pytest.raises(ValueError, match="labels"):
        plot_matrix(r.values, col_labels=["x"] * 5)


def test_routes_share_one_interface(models):
    """Every route is listed under its name, and driven through applies,
    layout and run alone gives a Gram whose cosines are the pairwise API's;
    only the fallback is not costed.  (node-gram computes functional
    products only: tests/test_node_gram.py drives it.)"""
    assert set(api.ROUTES) == {"auto", *api.REGISTRY}
    job = api._job(models, None, "symmetric", "auto", None, False, None, None, None, False, {})
    want = pairwise(models, models, "symmetric")
    for name, route in api.REGISTRY.items():
        assert route.NAME == name
        if name == "node-gram":
            assert "functional" in route.applies(job)
            continue
        assert route.applies(job) is None
        cost = route.layout(job)
        assert cost.route == name and cost.fits and (cost.flops > 0) == route.COSTED
        gram = route.run(job, cost, ops.Clock(job.ops))
        assert gram.cross.shape == (5, 5) and gram.row_self.shape == gram.col_self.shape == (5,)
        cos = api._cosines(gram.cross, gram.row_self, gram.col_self, "symmetric", gram.dtype, True)
        assert np.max(np.abs(cos - want)) < TOL
    assert [name for name, route in api.REGISTRY.items() if not route.COSTED] == ["pairwise"]


def test_errors(models):
    rng = np.random.default_rng(10)
    zero = ts.Bilinear(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((4, 2)))
    for route in ("materialize", "pairwise-gram", "pairwise"):
        with pytest.raises(ValueError, match="zero norm"):
            similarity_matrix(models[:2] + [zero], route=route, progress=False)
    with pytest.raises(ValueError, match="output widths"):
        similarity_matrix([models[0], bilinear(rng, 4, 2, 3)], progress=False)
    with pytest.raises(ValueError, match="route"):
        similarity_matrix(models, route="fastest", progress=False)
    with pytest.raises(ValueError, match="materialize"):
        similarity_matrix(stacks(), inner="network", route="materialize", progress=False)
    with pytest.raises(TypeError):
        similarity_matrix(models, per_output=True, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        similarity_matrix(models, dtype="float16", progress=False)
    with pytest.raises(ValueError, match="centered"):
        similarity_matrix(models, inner="symmetric", centered=True, progress=False)
    with pytest.raises(ValueError, match="no models"):
        similarity_matrix([], progress=False)


def test_pairwise_symmetric_matrix_uses_one_common_degree():
    W = np.random.default_rng(0).normal(size=(2, 3))
    lin = ts.Linear(W)
    same = ts.Bilinear(W, np.zeros((2, 3)), np.eye(2), right_bias=np.ones(2))  # the same function
    m = ts.similarity_matrix([lin, same], inner="symmetric", progress=False)
    np.testing.assert_allclose(m.values, np.ones((2, 2)), atol=1e-12)


@pytest.mark.parametrize("n, leaf", [(1, 32), (5, 2), (9, 3), (257, 32)])
def test_packed_layout(n, leaf):
    """The packed layout covers each upper-triangle entry of an n x n matrix
    once (whole diagonal blocks: each lower entry of them once more), and its
    weighted dot product is the Frobenius product of symmetric matrices."""
    blocks = MAT._packed_blocks(n, leaf)
    assert all(r1 - r0 <= leaf for r0, r1, c0, c1 in blocks if r0 == c0)
    flat, weight = MAT._packing(blocks, n)
    i, j = np.divmod(flat, n)
    covered = np.zeros((n, n), int)
    np.add.at(covered, (np.minimum(i, j), np.maximum(i, j)), 1)
    whole = np.zeros((n, n), bool)
    for r0, r1, c0, c1 in blocks:
        if r0 == c0:
            whole[r0:r1, r0:r1] = True
    expect = np.triu(np.where(whole, 2, 1)) - np.diag(np.where(np.diag(whole), 1, 0))
    np.testing.assert_array_equal(covered, expect)
    rng = np.random.default_rng(n)
    A, C = rng.normal(size=(2, n, n))
    A, C = A + A.T, C + C.T
    x, y = A.ravel()[flat] * weight, C.ravel()[flat] * weight
    assert abs(x @ y - np.sum(A * C)) < 1e-10 * n * n


@pytest.mark.parametrize("kind", ["packed", "triangle"])
@pytest.mark.parametrize("device", [None, "cpu", CUDA])
@pytest.mark.parametrize("sub", [2, 3])
def test_both_formations_of_the_materialize_route(models, monkeypatch, kind, device, sub):
    """Each way of writing the symmetric tensors (numpy's and torch's packing,
    the CP triangle), ``sub`` outputs per product (3 leaves a short last
    product at 4 outputs), against the pairwise API, the planner's choice
    overridden."""
    # blocks of two rows: the packed layout then has rectangles and whole diagonal blocks at n = 5
    monkeypatch.setattr(MAT, "_formation", lambda n, *_: MAT._Formation(
        kind, n, sub, tuple(ops.partition(n, 2)) if kind == "triangle" else MAT._packed_blocks(n, 2)))
    for inner in ("symmetric", "gaussian"):
        r = similarity_matrix(models, inner=inner, route="materialize", device=device, progress=False)
        assert f"{kind} formation" in r.candidates["materialize"].blocking
        assert np.max(np.abs(r.values - pairwise(models, models, inner))) < TOL


@pytest.mark.parametrize("per_product", [2, 3])
def test_packed_formation_batched_over_models(models, monkeypatch, per_product):
    """torch's packed formation with several models per batched product (as on
    a GPU): mixed hidden widths zero-padded within a batch, 3 of 5 models
    leaving a short last batch; sym and cross matrices against the pairwise API."""
    monkeypatch.setattr(MAT, "_formation", lambda n, *_: MAT._Formation(
        "packed", n, 2, MAT._packed_blocks(n, 2), models=per_product))
    cols = one_layer_models(seed=1)[:3]
    for inner in ("symmetric", "gaussian"):
        r = similarity_matrix(models, inner=inner, route="materialize", device="cpu", progress=False)
        assert np.max(np.abs(r.values - pairwise(models, models, inner))) < TOL
        rc = cross_similarity_matrix(models, cols, inner=inner, route="materialize", device="cpu", progress=False)
        assert np.max(np.abs(rc.values - pairwise(models, cols, inner))) < TOL


def test_formation_layout_is_shared_by_both_sides(monkeypatch):
    """A cross matrix whose sides have different hidden widths: the triangle
    formation's outputs per product are sized for the wider side, so both
    sides' rows list the features in the same order."""
    rng = np.random.default_rng(5)
    narrow = [bilinear(rng, 4, 2, 4) for _ in range(3)]
    wide = [bilinear(rng, 4, 16, 4) for _ in range(2)]
    n = 5
    # temporaries for one output of the wide side fit, two do not; the narrow side alone would take all four
    monkeypatch.setattr(MAT, "_FORM_CACHE", MAT._formation_temp("triangle", n, 1, 16, 8) + 8)
    form = MAT._formation(n, 16, 4, 5, 8, False)
    assert form.sub == 1 and MAT._formation(n, 2, 4, 5, 8, False).sub == 4
    monkeypatch.setattr(MAT, "_formation", lambda n, *_: MAT._Formation(
        "triangle", n, form.sub, tuple(ops.partition(n, 2))))
    r = cross_similarity_matrix(narrow, wide, inner="symmetric", route="materialize", progress=False)
    assert np.max(np.abs(r.values - pairwise(narrow, wide, "symmetric"))) < TOL


def test_feature_chunks(monkeypatch):
    """The materialize route's buffer holds one chunk of features at a time:
    row blocks of all outputs when each row block fits (the triangle's
    products keep all outputs), ranges of outputs otherwise (the products
    shrink to the chunk instead of the chunk growing past the target).  Every
    (output, row block) lands in exactly one chunk, and the matrices equal
    the pairwise API's at every layout, on both engines and for cross
    matrices."""
    rng = np.random.default_rng(6)
    ms = [bilinear(rng, 20, h, 4) for h in (3, 6, 2, 5)]  # n = 21: three row blocks of the triangle
    cols = [bilinear(rng, 20, 4, 4) for _ in range(2)]
    chains = prepare.to_chains(ms, "symmetric", False, None)
    dims = prepare.common_dims(chains)
    form_all = MAT._layout(chains, None, dims, 8, 10**9, 10**9, False).layout.form
    assert form_all.kind == "triangle" and len(form_all.blocks) == 3 and form_all.sub == 4
    seen = {}
    for target in range(2_000, 80_000, 500):
        cost = MAT._layout(chains, None, dims, 8, 10**9, target, False)
        c, chunks, form = cost.layout.models, cost.layout.chunks, cost.layout.form
        assert c == len(chains) and form.kind == "triangle"
        cells = [(o, g) for o0, o1, g0, g1 in chunks for o in range(o0, o1) for g in range(g0, g1)]
        assert sorted(cells) == [(o, g) for o in range(4) for g in range(len(form.blocks))]
        assert form.sub <= max(o1 - o0 for o0, o1, _, _ in chunks)
        kind = ("rows" if chunks[0][3] - chunks[0][2] < len(form.blocks) else
                "outputs" if len(chunks) > 1 else "one")
        assert ("chunks of row blocks" in cost.blocking) == (kind == "rows")
        if kind != "rows" or form.sub == 4:  # row blocks with all outputs per product
            seen.setdefault(kind, target)
    assert set(seen) == {"rows", "outputs", "one"}
    want = pairwise(ms, ms, "symmetric")
    want_cross = pairwise(ms, cols, "symmetric")
    for kind, target in seen.items():
        monkeypatch.setattr(MAT, "_WORKING_SET", target)
        for device in (None, "cpu"):
            r = similarity_matrix(ms, inner="symmetric", route="materialize", device=device, progress=False)
            assert ("chunks of row blocks" in r.candidates["materialize"].blocking) == (kind == "rows")
            assert np.max(np.abs(r.values - want)) < TOL
            rc = cross_similarity_matrix(ms, cols, inner="symmetric", route="materialize", device=device,
                                         progress=False)
            assert np.max(np.abs(rc.values - want_cross)) < TOL


def test_threaded_materialize(monkeypatch):
    """On numpy the materialize route forms models and takes the Gram in
    worker threads, each with one BLAS thread: the same matrices as one
    thread (to round-off) and as the pairwise API, for both formations, sym
    and cross, with groups of unequal size; the BLAS thread count is restored
    afterwards."""
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(7)
    ms = [bilinear(rng, 20, h, 4) for h in (3, 6, 2, 5, 4)]
    cols = [bilinear(rng, 20, 4, 4) for _ in range(2)]
    serial = {}
    for kind in ("triangle", "packed"):
        if kind == "packed":
            monkeypatch.setattr(MAT, "_formation",
                                lambda n, *_: MAT._Formation("packed", n, 2, MAT._packed_blocks(n, 4)))
        for threads in (1, 3):
            monkeypatch.setattr(api, "blas_threads", lambda: threads)
            threads_at_any_size(monkeypatch)
            before = [lib["num_threads"] for lib in threadpool_info()]
            r = similarity_matrix(ms, inner="symmetric", route="materialize", progress=False)
            rc = cross_similarity_matrix(ms, cols, inner="symmetric", route="materialize", progress=False)
            assert [lib["num_threads"] for lib in threadpool_info()] == before
            blocking = r.candidates["materialize"].blocking
            assert blocking.startswith(kind) and ("in 3 threads" in blocking) == (threads == 3)
            assert np.max(np.abs(r.values - pairwise(ms, ms, "symmetric"))) < TOL
            assert np.max(np.abs(rc.values - pairwise(ms, cols, "symmetric"))) < TOL
            if threads == 1:
                serial[kind] = (r.values, rc.values, r.norms)
            else:
                for got, want in zip((r.values, rc.values, r.norms), serial[kind]):
                    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_threaded_pairwise_gram(monkeypatch):
    """On numpy the pairwise-gram route takes the blocks' self terms and the
    block pairs in worker threads: the same matrices as one thread (to
    round-off) and as the pairwise API, for one layer and stacks, sym and
    cross, blocks kept or stacked per pair; the steps' times (each worker's at
    1/workers) fit in the call's; the BLAS thread count is restored, also
    after a worker fails; stacks default to numpy with threads, torch without."""
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(11)
    groups = {
        "symmetric": ([bilinear(rng, 6, h, 3) for h in (3, 6, 2, 5, 4, 3, 2)], [bilinear(rng, 6, 4, 3) for _ in range(3)]),
        "network": (stacks(seed=1) + stacks(seed=2), stacks(seed=3)[:3]),
    }
    threads_at_any_size(monkeypatch)
    monkeypatch.setattr(PG, "_MIN_BLOCK_ROWS", 1)  # several blocks per side
    before = [lib["num_threads"] for lib in threadpool_info()]
    seen = set()
    for inner, (ms, cols) in groups.items():
        want, want_cross = pairwise(ms, ms, inner), pairwise(ms, cols, inner)
        for target in (1, *(2**k for k in range(12, 22, 2)), 10**9):  # blocks kept or stacked per pair
            monkeypatch.setattr(PG, "_WORKING_SET", target)
            serial = None
            for threads in (1, 3):
                monkeypatch.setattr(api, "blas_threads", lambda: threads)
                kw = dict(inner=inner, route="pairwise-gram", device="numpy", progress=False)
                r, rc = similarity_matrix(ms, **kw), cross_similarity_matrix(ms, cols, **kw)
                assert [lib["num_threads"] for lib in threadpool_info()] == before
                for res in (r, rc):
                    blocking = res.candidates["pairwise-gram"].blocking
                    nblocks = int(blocking.split()[0])
                    threaded = threads == 3 and nblocks > 1
                    assert blocking.endswith(f"in {min(3, nblocks)} threads") == threaded, blocking
                    if threaded:
                        seen.add((inner, res.symmetric, "each stacked once" in blocking))
                    assert sum(s.seconds for s in res.steps) <= res.seconds
                assert np.max(np.abs(r.values - want)) < TOL
                assert np.max(np.abs(rc.values - want_cross)) < TOL
                got = (r.values, rc.values, r.norms, rc.col_norms)
                if serial is None:
                    serial = got
                else:
                    for g, w in zip(got, serial):
                        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)
            assert similarity_matrix(groups["network"][0], inner="network", progress=False).device == "numpy"
        r32 = similarity_matrix(ms, inner=inner, route="pairwise-gram", device="numpy", dtype="float32", progress=False)
        assert r32.values.dtype == np.float32 and np.max(np.abs(r32.values - want)) < 1e-4
    assert seen == {(inner, sym, kept) for inner in groups for sym in (True, False) for kept in (True, False)}
    monkeypatch.setattr(api, "blas_threads", lambda: 1)
    assert similarity_matrix(groups["network"][0], inner="network", progress=False).device == "cpu"

    def fail(*args, **kwargs):
        raise RuntimeError("block failed")

    monkeypatch.setattr(api, "blas_threads", lambda: 3)
    monkeypatch.setattr(PG, "_block", fail)
    with pytest.raises(RuntimeError, match="block failed"):
        similarity_matrix(groups["symmetric"][0], inner="symmetric", route="pairwise-gram", device="numpy",
                          progress=False)
    assert [lib["num_threads"] for lib in threadpool_info()] == before


def test_tasks_in_threads_share_the_clock():
    """run_tasks returns the tasks' results in order; in a pool each task's
    clock counts at 1/workers of its seconds and all of its flops."""
    import contextlib

    def job(k):
        def run(clk):
            clk.seconds["step"] = clk.seconds.get("step", 0.0) + 1.0  # as a lap of one second would
            clk.flops["step"] = clk.flops.get("step", 0) + 5
            return k * k
        return run

    for workers in (1, 2, 3):
        clock = ops.Clock(ops.Ops("float64", None))
        with contextlib.ExitStack() as stack:
            pool = blas_worker_pool(stack, workers) if workers > 1 else None
            assert ops.run_tasks([job(k) for k in range(6)], clock, pool, workers) == [k * k for k in range(6)]
        assert clock.seconds == {"step": pytest.approx(6.0 / workers)} and clock.flops == {"step": 30}


def test_a_failed_computation_drops_its_queued_runs():
    """Left by an exception, the worker pool waits only for the runs under
    way: the rest of what was queued (a computation queues all its runs at
    once) never starts, and BLAS gets its threads back."""
    import contextlib
    import threading
    import time

    from threadpoolctl import threadpool_info

    before = [lib["num_threads"] for lib in threadpool_info()]
    started, gate = [], threading.Event()

    def run(k):
        started.append(k)
        gate.wait(5)
        time.sleep(0.001)

    with pytest.raises(KeyboardInterrupt):
        with contextlib.ExitStack() as stack:
            pool = blas_worker_pool(stack, 2)
            futures = [pool.submit(run, k) for k in range(50)]
            while len(started) < 2:  # both workers busy, 48 runs queued
                time.sleep(0.001)
            gate.set()
            raise KeyboardInterrupt
    assert len(started) < 50 and sum(f.cancelled() for f in futures) > 0
    assert [lib["num_threads"] for lib in threadpool_info()] == before


def test_models_are_left_unchanged():
    """The routes scale copies of the weights in place, never the models'."""
    ms = one_layer_models() + [stacks()[0]]
    before = [[w.copy() for w in m.weights()] if isinstance(m, ts.Bilinear) else
              [w.copy() for layer in m.layers for w in layer.weights()] for m in ms]
    for inner, group in (("symmetric", ms[:5]), ("gaussian", ms[:5]), ("network", [ms[5]] + stacks()[1:])):
        similarity_matrix(group, inner=inner, progress=False)
    after = [[w for w in m.weights()] if isinstance(m, ts.Bilinear) else
             [w for layer in m.layers for w in layer.weights()] for m in ms]
    for b, a in zip(before, after):
        for x, y in zip(b, a):
            np.testing.assert_array_equal(x, y)


def test_padded_into_given_arrays():
    rng = np.random.default_rng(3)
    for layer in (bilinear(rng, 3, 2, 3, residual=True), bilinear(rng, 4, 2, 3, biases=False)):
        out = tuple(np.zeros(shape) for shape in layer.padded_shapes())
        got = layer.padded(out=out)
        assert all(g is o for g, o in zip(got, out))
        for g, want in zip(got, layer.padded()):
            np.testing.assert_array_equal(g, want)
        with pytest.raises(ValueError, match="padded needs"):
            layer.padded(out=(out[0], out[1], np.zeros((1, 1))))


def test_padded_scales_and_norms():
    """``padded(scales=...)`` equals the padded factors times the scales, and
    ``padded_norms`` their Frobenius norms (residual, biases and none)."""
    rng = np.random.default_rng(4)
    for layer in (bilinear(rng, 3, 2, 3, residual=True), bilinear(rng, 4, 2, 3, biases=False), bilinear(rng, 5, 4, 2)):
        plain = layer.padded()
        np.testing.assert_allclose(layer.padded_norms(), [np.linalg.norm(x) for x in plain], rtol=1e-14)
        for got, want, s in zip(layer.padded(scales=(0.5, 3.0, -2.0)), plain, (0.5, 3.0, -2.0)):
            np.testing.assert_allclose(got, want * s, rtol=1e-15)
    huge = bilinear(rng, 3, 2, 3, scale=1e200)  # finite weights whose squares overflow: _prepare checks the entries
    assert not all(np.isfinite(huge.padded_norms())) and all(np.isfinite(x).all() for x in huge.padded())
    from fractions import Fraction

    exact = ts.Bilinear(*(np.array(w, dtype=object) for w in ([[Fraction(1, 2)]], [[Fraction(1)]], [[Fraction(3)]])))
    assert exact.exact
    with pytest.raises(ValueError, match="float weights"):
        exact.padded(scales=(1, 1, 1))
