"""Memory estimates against measured allocation, and refusals that come back at once.

A plan's ``peak_bytes`` (a matrix route's ``RouteCost.peak_bytes``) is
stated before anything large is allocated; here each is checked against the
peak that tracemalloc measures while the plan runs (numpy registers its
array allocations with tracemalloc; every algorithm checked runs on numpy).
The sizes make the hidden-width intermediates dominate: the estimates that
counted only the state or the inputs stated 0.1 % to 10 % of these peaks.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.algorithms.closure as closure
import tsalgebra.algorithms.gram as gram
from tsalgebra.algorithms.closure import _AttentionStep, closure_steps
from helpers import observed_peak

SLACK = 8 * 2**20  # the interpreter's own allocations while a plan runs (caches, lazily imported modules)


def assert_within(stated: float, run) -> None:
    observed = observed_peak(run)
    assert observed <= 2 * stated + SLACK, f"observed {observed / 1e6:.1f} MB, stated {stated / 1e6:.1f} MB"


def bilinear(rng, d, h, o, residual=False):
    return ts.Bilinear(rng.normal(size=(h, d)) / np.sqrt(d), rng.normal(size=(h, d)) / np.sqrt(d),
                       rng.normal(size=(o, h)) / np.sqrt(h), residual=residual)


def attention(rng, d, dh, heads, n_ctx):
    w = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    return ts.BilinearAttention(w(heads, dh, d), w(heads, dh, d), w(heads, dh, d), w(heads, dh, d),
                                w(heads, dh, d), w(heads, d, dh), causal=True, n_ctx=n_ctx)


def check_plan(a, b, **kw) -> None:
    plan = ts.plan_inner(a, b, **kw)
    assert_within(plan.peak_bytes, lambda: ts.inner(a, b, progress=False, **kw))


# ------------------------------------------------------------------ estimates


def test_closure_stack_counts_the_hidden_products():
    # joint hidden width 2 x 1025: the step's hidden x hidden products (the old estimate: the state alone)
    rng = np.random.default_rng(0)
    a, b = (ts.Sequential(bilinear(rng, 16, 1024, 16), bilinear(rng, 16, 1024, 16)) for _ in range(2))
    check_plan(a, b, method="closure")


def test_closure_transformer_counts_the_mlp_products():
    # position-wise MLPs of hidden 128 over 4 positions, closed between attention layers
    rng = np.random.default_rng(1)

    def model():
        blocks = [(attention(rng, 16, 4, 2, 4), bilinear(rng, 16, 128, 16, residual=True)) for _ in range(2)]
        return ts.Transformer(None, blocks, None, 4)

    check_plan(model(), model(), method="closure")


def test_gram_counts_the_hidden_products():
    rng = np.random.default_rng(2)
    a, b = (ts.Sequential(bilinear(rng, 16, 2048, 16), bilinear(rng, 16, 2048, 16)) for _ in range(2))
    check_plan(a, b, inner="network")


def test_enumeration_counts_the_forward_pass():
    rng = np.random.default_rng(3)
    a, b = (bilinear(rng, 8 * 3, 8192, 4) for _ in range(2))
    check_plan(a, b, measure=ts.Tokens(8, 3), algorithm="enumeration")


def test_quadrature_counts_the_forward_pass():
    rng = np.random.default_rng(4)
    a, b = (bilinear(rng, 32, 8192, 8) for _ in range(2))  # D~ L~ formed first: (9, 8193, 33), whatever the nodes
    F = rng.normal(size=(32, 4))
    check_plan(a, b, measure=ts.Gaussian(np.zeros(32), F @ F.T), algorithm="quadrature")


def test_node_gram_counts_the_forward_pass():
    rng = np.random.default_rng(5)
    models = [bilinear(rng, 8 * 3, 8192, 8) for _ in range(3)]  # enumeration: the exact algorithm of a pair
    done = []
    observed = observed_peak(lambda: done.append(ts.similarity_matrix(models, measure=ts.Tokens(8, 3),
                                                                      route="node-gram", progress=False)))
    stated = done[0].candidates["node-gram"].peak_bytes  # from the shapes, before the route ran
    assert observed <= 2 * stated + SLACK, f"observed {observed / 1e6:.1f} MB, stated {stated / 1e6:.1f} MB"


# --------------------------------------------------------- blocked arithmetic


def direct_steps(ba, bb, mu, M):
    """The closure step as first written: the whole hidden x hidden products."""
    for t in range(max(len(ba), len(bb))):
        wait = lambda blocks: closure._linear_block(np.eye(blocks[-1][2].shape[0]))  # noqa: E731
        L, R, D = (closure._block_diag(x, y) for x, y in zip(ba[t] if t < len(ba) else wait(ba),
                                                                  bb[t] if t < len(bb) else wait(bb)))
        LMR, LML, RMR = L @ M @ R.T, L @ M @ L.T, R @ M @ R.T
        pair, mean_prod = np.diag(LMR), (L @ mu) * (R @ mu)
        Q = np.outer(pair, pair) + LML * RMR + LMR * LMR.T - 2 * np.outer(mean_prod, mean_prod)
        mu, M = D @ pair, D @ Q @ D.T
    return mu, M


@pytest.mark.parametrize("tile", [1024, 7, 10, 60])
def test_closure_steps_by_tiles_match_the_whole_products(monkeypatch, tile):
    monkeypatch.setattr(closure, "_TILE", tile)
    rng = np.random.default_rng(6)
    block = lambda h, d, o: (rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)))  # noqa: E731
    ba, bb = [block(37, 6, 5), block(11, 5, 4)], [block(23, 6, 7)]
    X = rng.normal(size=(12, 30))
    M, mu = X @ X.T / 30, rng.normal(size=12)
    got, want = closure_steps(ba, bb, mu, M)[:2], direct_steps(ba, bb, mu, M)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * np.abs(w).max())


@pytest.mark.parametrize("rows", [2**21, 1, 7, 100])
def test_gram_by_row_blocks_matches_the_whole_products(monkeypatch, rows):
    rng = np.random.default_rng(7)
    a = ts.Sequential(ts.Linear(rng.normal(size=(6, 5))), bilinear(rng, 6, 40, 7), bilinear(rng, 7, 30, 7, True),
                      ts.Linear(rng.normal(size=(3, 7))))
    b = ts.Sequential(bilinear(rng, 5, 25, 4), bilinear(rng, 4, 50, 7), bilinear(rng, 7, 8, 3))
    want = gram.network_gram(a, b)  # one block at these widths
    monkeypatch.setattr(gram, "_ROWS_ELEMENTS", rows)
    np.testing.assert_allclose(gram.network_gram(a, b), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


# ---------------------------------------------------- the attention step's cost


def enumerated_counts(step, models, terms):
    """Tuples by pattern as the run materialises them (one query position at a time)."""
    counts = {}
    for i in range(step.n):
        t, _ = step.tuples(models, terms, i)
        if len(t):
            keys, group = step._patterns(t)
            for g, key in enumerate(keys):
                counts[key.tobytes()] = counts.get(key.tobytes(), 0) + int((group == g).sum())
    return counts


@pytest.mark.parametrize("n", [1, 2, 5])
def test_attention_step_counts_match_the_enumerated_tuples(n):
    rng = np.random.default_rng(8)
    causal, full = (ts.BilinearAttention(*(rng.normal(size=s) for s in [(2, 2, 4)] * 5 + [(2, 4, 2)]),
                                         causal=c, n_ctx=n) for c in (True, False))
    for which, independent, same, diagonal, scrambled in itertools.product(
            ("both", "a", "b"), (False, True), (False, True), (False, True), (False, True)):
        if same and which != "both":
            continue
        layers = {"both": (causal, causal if same else full), "a": (causal, None), "b": (None, full)}[which]
        step = _AttentionStep(layers, (4 * n + 1,) * 2, independent, same, diagonal, dry=True)
        if scrambled:  # any set of live pairs, not only causal or full ones
            for m in step.models:
                if m.attn is not None:
                    m.live_matrix = (rng.random((n, n)) < 0.5).astype(float)
                    m.live = np.argwhere(m.live_matrix)
        for models, terms, columns in step.kinds():
            counted = {key: c for key, (c, sample) in step.counts(models, terms, columns).items()}
            assert counted == enumerated_counts(step, models, terms), (which, independent, same, diagonal, terms)
            for key, (_, sample) in step.counts(models, terms, columns).items():
                if independent:  # the sample stands for its pattern
                    assert step._patterns(sample)[0][0].tobytes() == key


def test_closure_refusal_does_not_enumerate_positions():
    # 48 positions: the tuples enumerated one query position at a time took about 10 s to refuse
    rng = np.random.default_rng(9)

    def model():
        blocks = [(attention(rng, 8, 2, 1, 48), bilinear(rng, 8, 8, 8, residual=True)) for _ in range(2)]
        return ts.Transformer(None, blocks, None, 48)

    a, b = model(), model()
    with pytest.raises(ts.CostError) as refused:
        ts.plan_inner(a, b, method="closure", budget=1e6)
    assert refused.value.flops > 1e6
