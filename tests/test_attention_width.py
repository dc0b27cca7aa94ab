"""One attention layer at language-model width: the 'moments' algorithm
(Isserlis over Gram blocks) against its independent twins: the Hermite
algorithm and the pairing orbits where those run, Monte Carlo at width."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
from test_attention import random_attention


def lm(rng, V, d, H, dh, n, noise=None, **flags):
    """embedding (V -> d) -> attention -> unembedding (d -> V), position-wise;
    ``noise``: a generator adding 30 % noise to every weight."""
    def W(*s):
        w = rng.normal(size=s) / np.sqrt(s[-1])
        return w if noise is None else w + 0.3 * noise.normal(size=s) / np.sqrt(s[-1])

    embed = ts.Linear(W(d, V), 0.1 * W(d))
    att = ts.BilinearAttention(W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, d, dh),
                               q1_bias=W(H, dh), k1_bias=W(H, dh), q2_bias=W(H, dh), k2_bias=W(H, dh), **flags)
    unembed = ts.Linear(W(V, d), 0.1 * W(V))
    return ts.Transformer(embed, [(att, None)], unembed, n_ctx=n)


FLAGS = [{}, {"causal": True}, {"rotary_base": 10.0, "scale": 0.5}, {"causal": True, "rotary_base": 5.0, "residual": True}]


@pytest.mark.parametrize("flags", FLAGS)
def test_equal_to_the_hermite_algorithm(flags):
    rng = np.random.default_rng(1)
    d = 2
    a = random_attention(rng, heads=2, dh=2, d=d, n_ctx=3, **flags)
    b = random_attention(rng, heads=1, dh=2, d=d, n_ctx=3, quadratic=True, **flags)
    mean, A = np.array([0.4, -0.3]), rng.normal(size=(d, d))
    cov = A @ A.T / d + 0.2 * np.eye(d)
    for kw in ({}, {"centered": True}, {"per_output": True}, {"centered": True, "per_output": True}):
        new = ts.inner(a, b, mean=mean, cov=cov, algorithm="moments", **kw)
        old = ts.inner(a, b, mean=mean, cov=cov, algorithm="hermite", **kw)
        assert new.algorithm == "moments" and new.exact
        np.testing.assert_allclose(new.value, old.value, rtol=1e-10, atol=1e-12 * np.max(np.abs(old.value)))
    joint = ts.similarity(a, b, mean=mean, cov=cov, algorithm="moments")
    assert joint.value == pytest.approx(ts.similarity(a, b, mean=mean, cov=cov, algorithm="hermite").value, rel=1e-10)


def test_equal_to_the_pairing_orbits_through_embeddings():
    """Different embeddings from a vocabulary of 5 (the measure pushed through
    both), a position-wise unembedding, two positions."""
    rng = np.random.default_rng(2)
    a, b = (lm(rng, 5, 2, 1, 2, 2, causal=True, rotary_base=10.0, residual=True) for _ in range(2))
    for kw in ({}, {"centered": True}):
        new = ts.inner(a, b, algorithm="moments", **kw)
        slow = ts.inner(a, b, algorithm="pairings", **kw)
        assert new.value == pytest.approx(slow.value, rel=1e-10)


def test_vocabulary_wider_than_any_rank_limit():
    """Vocabulary 64, d_model 16, two models with their own embeddings: the
    joint per-position rank is 32, above the Hermite algorithm's 24; the
    moments algorithm is polynomial in every width and takes it."""
    rng = np.random.default_rng(3)
    a, b = (lm(rng, 64, 16, 2, 4, 4, causal=True, rotary_base=10000.0) for _ in range(2))
    p = ts.plan_similarity(a, b)
    assert p.products[0][1].algorithm == "moments" and p.products[0][1].facts["whitened"] == 32
    hermite = dict(p.products[0][1].refusals)["hermite"]
    assert "rank 32 exceeds 24" in hermite
    s = ts.similarity(a, b)
    assert s.algorithm == "moments" and s.exact and -1 <= s.value <= 1 and s.flops == p.flops


def test_against_monte_carlo_at_width():
    """Vocabulary 512, d_model 64, 4 heads of width 16, 4 positions, causal,
    rotary, query-key biases: within 4 standard errors of a sampled mean."""
    V, n = 512, 4
    flags = dict(causal=True, rotary_base=10000.0, residual=True, scale=0.35)
    a = lm(np.random.default_rng(4), V, 64, 4, 16, n, **flags)
    b = lm(np.random.default_rng(4), V, 64, 4, 16, n, noise=np.random.default_rng(5), **flags)  # a's weights, perturbed
    rng = np.random.default_rng(6)
    for x_model, y_model in ((a, a), (a, b)):
        exact = ts.inner(x_model, y_model)
        assert exact.algorithm == "moments"
        prod = np.concatenate([np.einsum("bio,bio->b", x_model(z), y_model(z))
                               for z in (rng.normal(size=(2000, n, V)) for _ in range(4))])
        se = prod.std(ddof=1) / np.sqrt(len(prod))
        assert abs(prod.mean() - exact.value) < 4 * se
        assert se < 0.1 * abs(exact.value)  # the check has power


def test_runs_in_pieces_within_the_planned_memory(monkeypatch):
    """A run limit small enough to cut every batch of position tuples into
    pieces gives the same similarity (and centred inner product), and the
    memory traced while it runs stays within the plan's estimate."""
    import tracemalloc

    import tsalgebra.algorithms.moments as moments

    rng = np.random.default_rng(6)
    a = lm(rng, 12, 6, 2, 3, 6, causal=True, rotary_base=10.0, residual=True)
    b = lm(rng, 12, 6, 2, 3, 6, causal=True, rotary_base=10.0, residual=True)
    whole = ts.similarity(a, b, algorithm="moments")
    centered = ts.inner(a, b, algorithm="moments", centered=True)
    monkeypatch.setattr(moments, "_RUN_ELEMENTS", 2_000)
    pieces = []
    real_pieces = moments.OutputMoments._pieces

    def counted(self, *args):
        out = real_pieces(self, *args)
        pieces.append(len(out))
        return out

    monkeypatch.setattr(moments.OutputMoments, "_pieces", counted)
    plan = ts.plan_similarity(a, b, algorithm="moments")
    tracemalloc.start()
    try:
        cut = ts.similarity(a, b, algorithm="moments")
        used = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(pieces) > 2
    assert cut.value == pytest.approx(whole.value, rel=1e-12)
    assert ts.inner(a, b, algorithm="moments", centered=True).value == pytest.approx(centered.value, rel=1e-12)
    assert used <= max(p.peak_bytes for p in plan.plans) + 2e6  # plus the interpreter's own bookkeeping


@pytest.mark.parametrize("flags", [{"rotary_base": 7.0}, {"causal": True, "residual": True}])
def test_self_products_run_on_head_pairs(flags):
    """<a, a> runs only the head pairs A <= B where its key positions
    coincide and the key tuples j < j' where they differ (the rest are its
    mirror images): equal to the Hermite algorithm, and to the same product
    against a copy of a, which runs every head pair and every tuple."""
    rng = np.random.default_rng(5)
    a = random_attention(rng, heads=3, dh=2, d=2, n_ctx=4, **flags)
    twin = random_attention(np.random.default_rng(5), heads=3, dh=2, d=2, n_ctx=4, **flags)
    mean, cov = np.array([0.3, -0.2]), np.array([[1.0, 0.3], [0.3, 0.7]])
    for kw in ({}, {"centered": True}, {"per_output": True}):
        mirrored = ts.inner(a, a, mean=mean, cov=cov, algorithm="moments", **kw)
        full = ts.inner(a, twin, mean=mean, cov=cov, algorithm="moments", **kw)
        slow = ts.inner(a, a, mean=mean, cov=cov, algorithm="hermite", **kw)
        scale = np.max(np.abs(slow.value))
        np.testing.assert_allclose(mirrored.value, slow.value, rtol=1e-10, atol=1e-12 * scale)
        np.testing.assert_allclose(mirrored.value, full.value, rtol=1e-12, atol=1e-14 * scale)
        assert mirrored.flops < 0.8 * full.flops
