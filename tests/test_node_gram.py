"""The node-gram matrix route: every model evaluated once on the nodes of an
exact node sum (every token sequence; a Gauss-Hermite grid), against
independent twins: the logits of every sequence run through the models, and
another exact algorithm per pair."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tsalgebra as ts

from helpers import tiny_lm


def enumerated_cosines(models, vocab, n_ctx, probs=None, centered=False):
    """The weighted Gram of every model's outputs on every sequence, run through the models."""
    p = np.full((n_ctx, vocab), 1.0 / vocab) if probs is None else np.broadcast_to(probs, (n_ctx, vocab))
    seqs = np.array(list(itertools.product(range(vocab), repeat=n_ctx)))
    w = np.prod(p[np.arange(n_ctx), seqs], axis=1)
    F = np.stack([np.asarray(m(seqs)).reshape(len(seqs), -1) for m in models])  # (models, sequences, outputs)
    if centered:
        F = F - np.einsum("s,mso->mo", w, F)[:, None, :]
    G = np.einsum("s,aso,bso->ab", w, F, F)
    d = np.sqrt(np.diag(G))
    return G / np.outer(d, d)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("probs", [None, "skewed"])
def test_tokens_matrix_equals_every_sequence_run_through_the_models(centered, probs):
    models = [tiny_lm(s) for s in range(4)]
    p = None if probs is None else np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    measure = ts.Tokens(5, 3, probs=p)
    m = ts.similarity_matrix(models, measure=measure, centered=centered, progress=False)
    assert m.route == "node-gram" and m.exact and m.inner == "tokens"
    np.testing.assert_allclose(m.values, enumerated_cosines(models, 5, 3, p, centered), atol=1e-12)
    pairwise = ts.similarity_matrix(models, measure=measure, centered=centered, route="pairwise", progress=False)
    np.testing.assert_allclose(m.values, pairwise.values, atol=1e-12)
    np.testing.assert_allclose(m.norms, pairwise.norms, rtol=1e-10)


def test_cross_matrix_and_one_evaluation_per_model():
    a, b = [tiny_lm(s) for s in range(3)], [tiny_lm(s) for s in range(3, 5)]
    x = ts.cross_similarity_matrix(a, b, progress=False)
    assert x.route == "node-gram" and x.values.shape == (3, 2)
    full = enumerated_cosines(a + b, 5, 3)
    np.testing.assert_allclose(x.values, full[:3, 3:], atol=1e-12)
    # five models evaluated once each on 125 sequences: the planned forward flops are five models' worth
    cost = x.candidates["node-gram"]
    one = ts.plan_inner(a[0], a[0], measure=ts.Tokens(5, 3), algorithm="enumeration").flops / 2
    assert cost.flops == pytest.approx(5 * one + 2 * (3 * 2 + 5) * 125 * 15, rel=1e-9)


def test_gaussian_quadrature_grid_matches_another_exact_algorithm():
    rng = np.random.default_rng(0)

    def stack():
        return ts.Sequential(ts.Bilinear(rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), rng.normal(size=(3, 4))),
                             ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4))),
                             ts.Linear(rng.normal(size=(2, 2)), rng.normal(size=2)))

    models = [stack() for _ in range(4)]
    mean, cov = np.array([0.3, -0.2]), np.array([[1.0, 0.4], [0.4, 0.7]])
    for centered in (False, True):
        m = ts.similarity_matrix(models, mean=mean, cov=cov, centered=centered, progress=False)
        assert m.route == "node-gram" and m.exact
        for i, j in [(0, 1), (2, 3), (1, 3)]:
            twin = ts.similarity(models[i], models[j], mean=mean, cov=cov, centered=centered, algorithm="pairings")
            assert m.values[i, j] == pytest.approx(twin.value, abs=1e-10)


def test_too_little_memory_falls_back_to_pairs():
    models = [tiny_lm(s) for s in range(3)]
    # node-gram needs about 4.9e5 bytes; one pair's own plan (enumeration) 3.9e5, within the bound
    m = ts.similarity_matrix(models, max_memory=420_000, progress=False)
    assert m.route == "pairwise" and not m.candidates["node-gram"].fits
    np.testing.assert_allclose(m.values, enumerated_cosines(models, 5, 3), atol=1e-12)


def test_not_offered_where_the_exact_algorithm_is_not_a_node_sum():
    rng = np.random.default_rng(1)
    models = [ts.Bilinear(rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(2, 3))) for _ in range(3)]
    m = ts.similarity_matrix(models, progress=False)
    assert "node-gram" not in m.candidates
    closure = ts.similarity_matrix([tiny_lm(s) for s in range(2)], inner="gaussian", method="closure", progress=False)
    assert closure.route == "pairwise" and not closure.exact
