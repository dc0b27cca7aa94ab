"""Similarity matrices against pairwise ts.similarity where they went wrong:
Monte Carlo pairs, store identity (networks, a lost manifest, a reused
measure, the budget), mixed degrees in tiles, weights near 1e200, the memory
fallback of route="auto", argument messages, float32 centred products."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.problem import DEFAULT_BUDGET, MemoryBoundError

TOL = 1e-10


def pairwise(rows, cols, **kw):
    return np.array([[float(ts.similarity(a, b, **kw).value) for b in cols] for a in rows])


def bilinear(rng, d=3, h=4, o=2, scale=1.0, **kw):
    return ts.Bilinear(scale * rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)), **kw)


def test_sampled_cosines_are_joint_estimates_per_pair(tmp_path):
    """Each pair's three products from the same samples, as ts.similarity:
    without a seed, separately sampled products gave |cosine| > 1 errors."""
    rng = np.random.default_rng(14)
    L, R, D = rng.normal(size=(3, 3)), rng.normal(size=(3, 3)), rng.normal(size=(2, 3))
    first = ts.Bilinear(rng.normal(size=(3, 3)), rng.normal(size=(3, 3)), rng.normal(size=(3, 3)))
    ms = [ts.Sequential(first, ts.Bilinear(L + 0.1 * rng.normal(size=L.shape), R, D)) for _ in range(3)]
    exact = pairwise(ms, ms)  # cosines 0.86 to 0.99
    for _ in range(3):  # the ratio of separate estimates exceeded 1 (an error) or was off by 0.4
        m = ts.similarity_matrix(ms, method="sampled", samples=2000, progress=False)
        assert np.max(np.abs(m.values - exact)) < 0.25  # about 10 standard errors
    assert m.estimated and not m.exact and "(estimated" in repr(m)
    assert any("same samples" in n for n in m.notes)
    ms = [bilinear(rng) for _ in range(3)]  # seeded: the very numbers of ts.similarity, and their errors
    kw = dict(method="sampled", samples=500, seed=3)
    want = pairwise(ms, ms, **kw)
    errors = np.array([[float(ts.similarity(a, b, **kw).stderr) if a is not b else 0.0 for b in ms] for a in ms])
    assert np.all(errors[~np.eye(3, dtype=bool)] > 0)
    for tiling in ({}, dict(store=tmp_path, tile=1), dict(store=tmp_path, tile=1)):  # computed, then from the store
        m = ts.similarity_matrix(ms, progress=False, **kw, **tiling)
        np.testing.assert_allclose(m.values, want, atol=1e-12)
        np.testing.assert_allclose(m.stderr, errors, atol=1e-15)  # a matrix of estimates had no errors
        np.testing.assert_allclose(m.interval[1] - m.values, 1.959963984540054 * errors, atol=1e-15)
        assert m.estimated and any("same samples" in n for n in m.notes)
    c = ts.cross_similarity_matrix(ms[:2], ms[1:], progress=False, **kw)
    np.testing.assert_allclose(c.values, want[:2, 1:], atol=1e-12)
    np.testing.assert_allclose(c.stderr, errors[:2, 1:], atol=1e-14)  # a model against itself: its rounding
    assert ts.similarity_matrix(ms, progress=False).stderr is None  # exact: no errors


def test_a_store_tells_networks_apart_by_their_weights(tmp_path):
    rng = np.random.default_rng(3)
    A = [bilinear(rng).network() for _ in range(4)]
    B = [bilinear(rng).network() for _ in range(4)]
    first = ts.similarity_matrix(A, store=tmp_path, tile=2, progress=False)
    np.testing.assert_allclose(first.values, pairwise(A, A), atol=TOL)
    with pytest.raises(ValueError, match="other models .*model 0 differs"):
        ts.similarity_matrix(B, store=tmp_path, tile=2, progress=False)
    again = ts.similarity_matrix(A, store=tmp_path, tile=2, progress=False)
    assert again.tiles.from_store == again.tiles.total


def test_tiles_without_their_manifest_are_not_reused_for_other_models(tmp_path):
    rng = np.random.default_rng(11)
    A = [bilinear(rng) for _ in range(4)]
    B = [bilinear(rng) for _ in range(4)]
    ts.similarity_matrix(A, store=tmp_path, tile=2, progress=False)
    (tmp_path / "manifest.json").unlink()
    mb = ts.similarity_matrix(B, store=tmp_path, tile=2, progress=False)
    assert mb.tiles.from_store == 0
    np.testing.assert_allclose(mb.values, pairwise(B, B), atol=TOL)
    (tmp_path / "manifest.json").unlink()  # lost again; the tiles are B's: reused for B
    again = ts.similarity_matrix(B, store=tmp_path, tile=2, progress=False)
    assert again.tiles.from_store == again.tiles.total
    np.testing.assert_allclose(again.values, pairwise(B, B), atol=TOL)


def test_mixed_degrees_take_the_sets_common_degree_in_every_tile(tmp_path):
    rng = np.random.default_rng(4)
    lin = [ts.Linear(rng.normal(size=(2, 3)), rng.normal(size=2)) for _ in range(2)]
    bi = [bilinear(rng, left_bias=rng.normal(size=4), right_bias=rng.normal(size=4), down_bias=rng.normal(size=2))
          for _ in range(2)]
    ms = lin + bi
    want = pairwise(ms, ms, inner="symmetric", degree=2)  # every model lifted to the set's degree
    serial = ts.similarity_matrix(ms, inner="symmetric", progress=False)
    np.testing.assert_allclose(serial.values, want, atol=TOL)
    assert any("common degree 2" in n for n in serial.notes)
    for tile in (1, 2, 3):
        t = ts.similarity_matrix(ms, inner="symmetric", tile=tile, store=tmp_path / str(tile), progress=False)
        np.testing.assert_allclose(t.values, want, atol=TOL)
        assert any("common degree 2" in n for n in t.notes)
    c = ts.cross_similarity_matrix(lin, bi, inner="symmetric", tile=1, store=tmp_path / "cross", progress=False)
    np.testing.assert_allclose(c.values, want[:2, 2:], atol=TOL)


@pytest.mark.parametrize("inner", ["symmetric", "gaussian"])
@pytest.mark.parametrize("route", ["auto", "materialize", "pairwise-gram"])
def test_weights_near_1e200_are_normalized_without_overflow(inner, route):
    rng = np.random.default_rng(5)
    ms = [bilinear(rng), bilinear(rng, scale=1e200), bilinear(rng)]
    m = ts.similarity_matrix(ms, inner=inner, route=route, progress=False)
    np.testing.assert_allclose(m.values, pairwise(ms, ms, inner=inner), atol=TOL)
    norms = [float(ts.norm(x, inner=inner).value) for x in ms]
    np.testing.assert_allclose(m.norms, norms, rtol=TOL)
    A, B = [bilinear(rng), bilinear(rng)], [bilinear(rng, scale=1e200), bilinear(rng)]
    c = ts.cross_similarity_matrix(A, B, inner=inner, route=route, progress=False)
    np.testing.assert_allclose(c.values, pairwise(A, B, inner=inner), atol=TOL)


@pytest.mark.parametrize("scale", [1e-160, 1e-200])
def test_tiny_weights_are_no_false_zero_norm(scale):
    """Weights near 1e-160 beside the padded form's constant 1: their
    products underflowed (off by 6e-4 at 1e-160, a false zero norm at 1e-200)."""
    rng = np.random.default_rng(6)
    ms = [bilinear(rng), bilinear(rng, scale=scale), bilinear(rng)]
    for route in ("materialize", "pairwise-gram"):
        m = ts.similarity_matrix(ms, inner="symmetric", route=route, progress=False)
        np.testing.assert_allclose(m.values, pairwise(ms, ms, inner="symmetric"), atol=TOL)


def test_a_reused_measure_object_resumes_its_store(tmp_path):
    rng = np.random.default_rng(2)
    ms = [bilinear(rng) for _ in range(4)]
    law = ts.Gaussian(mean=np.ones(3), cov=2 * np.eye(3))
    ts.similarity_matrix(ms, measure=law, store=tmp_path, tile=2, progress=False)
    m = ts.similarity_matrix(ms, measure=law, store=tmp_path, tile=2, progress=False)  # its caches filled now
    assert m.tiles.from_store == m.tiles.total
    np.testing.assert_allclose(m.values, pairwise(ms, ms, measure=law), atol=TOL)
    with pytest.raises(ValueError, match="written with measure="):
        ts.similarity_matrix(ms, measure=ts.Gaussian(mean=2 * np.ones(3)), store=tmp_path, tile=2, progress=False)


def test_the_budget_is_not_part_of_a_stores_identity(tmp_path):
    """The command line passes its default budget; Python passes none."""
    rng = np.random.default_rng(10)
    ms = [bilinear(rng) for _ in range(4)]
    ts.similarity_matrix(ms, store=tmp_path, tile=2, progress=False)
    for budget in (DEFAULT_BUDGET, 1e12):
        m = ts.similarity_matrix(ms, store=tmp_path, budget=budget, progress=False)
        assert m.tiles.from_store == m.tiles.total
    np.testing.assert_allclose(m.values, pairwise(ms, ms), atol=TOL)
    with pytest.raises(ValueError, match="written without orbits=, this call has orbits=False"):  # an option that changes the values
        ts.similarity_matrix(ms, store=tmp_path, orbits=False, progress=False)


def test_auto_falls_back_pair_by_pair_when_the_prepared_models_do_not_fit():
    rng = np.random.default_rng(12)
    ms = [bilinear(rng) for _ in range(12)]  # preparing them takes 5,280 bytes; one pair's plan 2,560
    for mm in (3000, 5000):
        r = ts.similarity_matrix(ms, max_memory=mm, progress=False)
        assert r.route == "pairwise" and "preparing 12 models" in r.notes[0]
        np.testing.assert_allclose(r.values, pairwise(ms, ms), atol=TOL)
    with pytest.raises(MemoryBoundError, match="max_memory=1,000"):
        ts.similarity_matrix(ms[:5], route="materialize", max_memory=1000, progress=False)
    with pytest.raises(MemoryBoundError, match=r"max_memory=2\.6e\+03"):  # not even one pair: refused, not run
        ts.similarity_matrix(ms, max_memory=1000, progress=False)


@pytest.mark.parametrize("value", ["1GB", float("nan"), 0.5, 0, -1, True, float("inf")])
def test_a_bad_max_memory_is_named(value, tmp_path):
    ms = [bilinear(np.random.default_rng(k)) for k in range(3)]
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        ts.similarity_matrix(ms, max_memory=value, progress=False)
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        ts.similarity_matrix(ms, max_memory=value, tile=2, store=tmp_path, progress=False)


def test_a_client_that_is_not_a_dask_client_is_named():
    ms = [bilinear(np.random.default_rng(k)) for k in range(3)]
    pytest.importorskip("dask.distributed")
    with pytest.raises(TypeError, match="client= takes a dask.distributed.Client, got str"):
        ts.similarity_matrix(ms, client="abc", progress=False)


def test_float32_centred_keeps_its_digits_with_large_output_means():
    rng = np.random.default_rng(7)
    d, h, o = 6, 4, 16
    ms = [ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)),
                      down_bias=1000.0 * np.ones(o)) for _ in range(4)]
    want = pairwise(ms, ms, inner="gaussian", centered=True)
    m = ts.similarity_matrix(ms, inner="gaussian", centered=True, dtype="float32", progress=False)
    assert m.dtype == "float32" and np.max(np.abs(m.values - want)) < 1e-5
    with pytest.raises(ValueError, match="float32 the centred product loses digits"):
        ts.similarity_matrix(ms, inner="gaussian", centered=True, dtype="float32", route="pairwise-gram",
                             progress=False)


def test_a_batched_route_over_budget_names_the_other_methods():
    """A batched route's refusal offered only a larger budget; like
    ts.similarity's it names the methods that would answer, and they do."""
    rng = np.random.default_rng(5)
    ms = [bilinear(rng) for _ in range(3)]
    with pytest.raises(ts.CostError, match="route plans") as err:
        ts.similarity_matrix(ms, budget=100, progress=False)
    offered = {(a.option, a.value) for a in err.value.alternatives}
    assert {("method", "closure"), ("method", "sampled")} <= offered and "--method sampled" in err.value.explain(cli=True)
    m = ts.similarity_matrix(ms, method="sampled", samples=200, seed=1, progress=False)
    assert m.estimated and m.stderr is not None
