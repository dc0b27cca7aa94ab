"""Gaussian closure through several attention layers (tsalgebra.algorithms.closure).

Every check is against an independent twin: the attention step under a
correlated, non-centred Gaussian against pairing orbits summed with both
outputs open (its input produced exactly by a Linear layer from N(0, I)) and
against the Hermite moments; whole models against exact algorithms on
equivalent models, where the closed layers are linear or their inputs
Gaussian (closure is then exact in value, though it cannot know it)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.algorithms.closure import _input_state, _split, attention_closure, attention_closure_cost
from tsalgebra.algorithms.hermite import attention_moments
from tsalgebra.pairing_sum import OUTER, Joins, orbit_sum


def random_attention(rng, heads=2, dh=2, d=2, n_ctx=3, quadratic=False, **flags):
    W = lambda *s: rng.normal(size=s) * 0.5  # noqa: E731
    q1, k1 = W(heads, dh, d), W(heads, dh, d)
    q2, k2 = (q1, k1) if quadratic else (W(heads, dh, d), W(heads, dh, d))
    biases = dict(q1_bias=W(heads, dh), k1_bias=W(heads, dh), v_bias=W(heads, dh), o_bias=W(d))
    if quadratic:
        biases["q2_bias"], biases["k2_bias"] = biases["q1_bias"], biases["k1_bias"]
    return ts.BilinearAttention(q1, k1, q2, k2, W(heads, dh, d), W(heads, d, dh), n_ctx=n_ctx, **flags, **biases)


def padded(W, b):
    T = np.zeros((W.shape[0] + 1, W.shape[1] + 1))
    T[0, 0], T[1:, 0], T[1:, 1:] = 1.0, b, W
    return T


def enumerated(x, y):
    """Padded E[x~ y~'], E[x~], E[y~] under N(0, I) by pairing orbits with both outputs open."""
    joins = Joins.gaussian(ts.Gaussian(np.zeros(x.in_features), np.eye(x.in_features)))
    X, Y = x.network(symmetric=True), y.network(symmetric=True)
    return (orbit_sum(X, Y, joins, OUTER, 1e13)[0], orbit_sum(X, None, joins, None, 1e13)[0],
            orbit_sum(Y, None, joins, None, 1e13)[0])


def flat(layer, x):
    """A sequence layer on flat inputs (batch, n d) -> (batch, n d_out)."""
    return np.asarray(layer(x.reshape(len(x), layer.n_ctx, -1))).reshape(len(x), -1)


def quadrature(models, k, nodes=6):
    """Padded joint E[y~ y~'] and E[y~] of the models' outputs under u ~ N(0, I_k):
    Gauss-Hermite on the tensor grid, exact for degrees up to 2 nodes - 1."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    grid = np.stack(np.meshgrid(*[z] * k, indexing="ij"), -1).reshape(-1, k)
    weight = np.prod(np.stack(np.meshgrid(*[w] * k, indexing="ij"), -1).reshape(-1, k), axis=1)
    Y = np.concatenate([np.concatenate([np.ones((len(grid), 1)), m(grid)], axis=1) for m in models], axis=1)
    return Y.T @ (weight[:, None] * Y), weight @ Y


# ------------------------------------- one attention step under a general Gaussian


@pytest.mark.parametrize("flags", [{"causal": True, "rotary_base": 10.0, "residual": True, "scale": 0.7},
                                   {"quadratic": True}, {}])
def test_attention_step_under_a_correlated_gaussian(flags):
    """The output moments of two attention layers whose inputs are correlated
    across positions and across the models, with non-zero means: exactly
    Gaussian inputs (Linear maps of one N(0, I)), so the step must be exact
    (against quadrature of the layers' own evaluation)."""
    rng = np.random.default_rng(3)
    n, d = 3, 2
    k = n * d
    att_a = random_attention(rng, n_ctx=n, d=d, **flags)
    att_b = random_attention(rng, heads=1, n_ctx=n, d=d, causal=True, rotary_base=100.0)
    Wa, Wb = rng.normal(size=(k, k)) * 0.6, rng.normal(size=(k, k)) * 0.6
    ba, bb = rng.normal(size=k) * 0.5, rng.normal(size=k) * 0.5
    M_want, mu_want = quadrature([lambda u: flat(att_a, u @ Wa.T + ba), lambda u: flat(att_b, u @ Wb.T + bb)], k)
    T = np.concatenate([padded(Wa, ba), padded(Wb, bb)])  # [x~_a; x~_b] = T u~, u ~ N(0, I)
    w = k + 1
    mu, M = attention_closure((att_a, att_b), T[:, 0].copy(), T @ T.T, (w, w))
    scale = np.abs(M).max()
    np.testing.assert_allclose(mu, mu_want, atol=1e-11 * scale)
    np.testing.assert_allclose(M, M_want, atol=1e-11 * scale)
    # only the blocks of one position with itself, the others NaN
    mu_d, M_d = attention_closure((att_a, att_b), T[:, 0].copy(), T @ T.T, (w, w), diagonal=True)
    pos = np.r_[0, 1 + np.arange(k) // d, 0, 1 + np.arange(k) // d]  # 0: the constant channel
    same = (pos[:, None] == pos[None, :]) | (pos[:, None] == 0) | (pos[None, :] == 0)
    np.testing.assert_allclose(mu_d, mu, atol=1e-12 * scale)
    np.testing.assert_allclose(M_d[same], M[same], atol=1e-12 * scale)
    assert np.isnan(M_d[~same]).all()
    # one model with itself: the mirrored half of the work gives the same moments
    Ta = padded(Wa, ba)
    _, M_s = attention_closure((att_a, att_a), np.r_[Ta[:, 0], Ta[:, 0]], np.tile(Ta @ Ta.T, (2, 2)), (w, w),
                               same=True)
    np.testing.assert_allclose(M_s, np.tile(M[:w, :w], (2, 2)), atol=1e-12 * scale)


def test_attention_step_against_pairing_orbits():
    """The same against the generic mechanism: pairing orbits of the Linear
    map and attention, both outputs left open (a small case: they are slow)."""
    rng = np.random.default_rng(4)
    n, d = 2, 2
    k = n * d
    att_a = random_attention(rng, heads=1, n_ctx=n, d=d)
    att_b = random_attention(rng, heads=1, n_ctx=n, d=d, causal=True, scale=0.5)
    Wa, Wb = rng.normal(size=(k, k)) * 0.6, rng.normal(size=(k, k)) * 0.6
    ba, bb = rng.normal(size=k) * 0.5, rng.normal(size=k) * 0.5
    xa, xb = ts.Sequential(ts.Linear(Wa, ba), att_a), ts.Sequential(ts.Linear(Wb, bb), att_b)
    M_ab, mean_a, mean_b = enumerated(xa, xb)
    T = np.concatenate([padded(Wa, ba), padded(Wb, bb)])
    mu, M = attention_closure((att_a, att_b), T[:, 0].copy(), T @ T.T, (k + 1, k + 1))
    scale = np.abs(M).max()
    np.testing.assert_allclose(mu, np.r_[mean_a, mean_b], atol=1e-12 * scale)
    np.testing.assert_allclose(M[: k + 1, k + 1 :], M_ab, atol=1e-12 * scale)


def test_attention_step_with_independent_positions_against_hermite():
    """Independent positions (the first attention layer after an embedding):
    the pruned step equals the full one and the Hermite moments."""
    rng = np.random.default_rng(5)
    n, d, vocab = 3, 2, 5
    E = [ts.position_wise(ts.Linear(rng.normal(size=(d, vocab)), rng.normal(size=d) * 0.3), n) for _ in range(2)]
    atts = (random_attention(rng, n_ctx=n, d=d, causal=True, rotary_base=10.0, residual=True),
            random_attention(rng, heads=1, n_ctx=n, d=d, scale=0.5))
    a, b = ts.Sequential(E[0], atts[0]), ts.Sequential(E[1], atts[1])
    measure = ts.Gaussian(rng.normal(size=vocab) * 0.2, np.diag(rng.uniform(0.5, 1.5, size=vocab)))
    problem = ts.InnerProblem.of(a, b, measure=measure)
    (ha, _), (hb, _) = _split(a), _split(b)
    mu, M = _input_state(problem, ha, hb, independent=True)
    widths = (n * d + 1, n * d + 1)
    pruned = attention_closure(atts, mu, M, widths, independent=True)
    full = attention_closure(atts, mu, M, widths)
    hm = attention_moments(a, b, problem.measure.per_position(n), joint=True)
    w = n * d + 1
    for got in (pruned, full):
        np.testing.assert_allclose(got[0], np.r_[hm.mean_a, hm.mean_b], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[1][:w, w:], hm.ab, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got[1][:w, :w], hm.aa, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got[1][w:, w:], hm.bb, rtol=1e-10, atol=1e-10)
    assert attention_closure_cost(atts, widths, True)[0] < attention_closure_cost(atts, widths)[0]


# ------------------------------------------------------ whole models, closed


def constant_score(att, rng):
    """``att`` with its query and key maps zero (biases kept): every score is
    a constant, so the layer is linear in its input (it still mixes positions)."""
    z, bias = np.zeros_like(att.q1), lambda: rng.normal(size=att.q1.shape[:2])  # noqa: E731
    return att.replace(q1=z, k1=z, q2=z, k2=z, q2_bias=bias(), k2_bias=bias())


def as_linear(layer):
    """The flat Linear layer equal to a layer that is linear in its input, read off its values."""
    k = layer.in_features
    values = flat(layer, np.vstack([np.zeros(k), np.eye(k)]))
    return ts.Linear((values[1:] - values[0]).T, values[0])


def test_closure_through_a_linear_second_attention_is_exact_in_value():
    """A second attention layer whose scores are constant is a linear map of
    its (non-Gaussian) input: closure through it equals the exact value of the
    model with that map written as a Linear layer, for <a,b>, <a,a>, <b,b>,
    centred and per output; a model without it waits (the identity)."""
    rng = np.random.default_rng(7)
    n, d = 3, 2
    first = [random_attention(rng, n_ctx=n, d=d, causal=True, rotary_base=10.0, residual=True),
             random_attention(rng, heads=1, n_ctx=n, d=d)]
    second = [constant_score(random_attention(rng, n_ctx=n, d=d, causal=True, rotary_base=10.0, residual=True), rng),
              constant_score(random_attention(rng, heads=1, n_ctx=n, d=d, scale=0.3), rng)]
    unembed = ts.position_wise(ts.Linear(rng.normal(size=(3, d)), rng.normal(size=3)), n)
    closed = [ts.Sequential(f, s, unembed) for f, s in zip(first, second)]
    exact = [ts.Sequential(f, as_linear(s), unembed) for f, s in zip(first, second)]
    mean, cov = rng.normal(size=d) * 0.3, np.array([[1.0, 0.3], [0.3, 0.7]])
    for kw in ({}, {"centered": True}, {"per_output": True}):
        got = ts.inner(closed[0], closed[1], method="closure", mean=mean, cov=cov, **kw)
        want = ts.inner(exact[0], exact[1], mean=mean, cov=cov, **kw)
        assert not got.exact and got.method == "closure"
        np.testing.assert_allclose(got.value, want.value, rtol=1e-9)
    sim = ts.similarity(closed[0], closed[1], method="closure", mean=mean, cov=cov)
    np.testing.assert_allclose(sim.value, ts.similarity(exact[0], exact[1], mean=mean, cov=cov).value, rtol=1e-9)
    # b has one attention layer only: it waits while a's second one is closed
    waiting = ts.Sequential(first[1], unembed)
    got = ts.similarity(closed[0], waiting, method="closure", mean=mean, cov=cov)
    np.testing.assert_allclose(got.value, ts.similarity(exact[0], waiting, mean=mean, cov=cov).value, rtol=1e-9)


def test_closure_is_exact_when_the_first_output_is_gaussian():
    """A first attention layer with zero output maps and a residual passes a
    shifted copy of its Gaussian input on: closing the second layer is then
    exact, equal to the one-layer model on the shifted input (exact algorithms)."""
    rng = np.random.default_rng(11)
    n, d = 2, 2
    shift = rng.normal(size=d) * 0.4
    first = [random_attention(rng, n_ctx=n, d=d, residual=True, causal=True).replace(o_bias=shift)
             for _ in range(2)]
    first = [f.replace(o=np.zeros_like(f.o)) for f in first]
    second = [random_attention(rng, n_ctx=n, d=d, causal=True, rotary_base=10.0, residual=True, scale=0.6),
              random_attention(rng, heads=1, n_ctx=n, d=d, quadratic=True)]
    unembed = ts.position_wise(ts.Linear(rng.normal(size=(2, d)), rng.normal(size=2)), n)
    moved = ts.position_wise(ts.Linear(np.eye(d), shift), n)
    closed = [ts.Sequential(f, s, unembed) for f, s in zip(first, second)]
    exact = [ts.Sequential(moved, s, unembed) for s in second]
    for kw in ({}, {"centered": True}):
        got = ts.inner(closed[0], closed[1], method="closure", **kw)
        want = ts.inner(exact[0], exact[1], **kw)
        np.testing.assert_allclose(got.value, want.value, rtol=1e-9)
        assert not got.exact
    np.testing.assert_allclose(ts.similarity(closed[0], closed[1], method="closure").value,
                               ts.similarity(exact[0], exact[1]).value, rtol=1e-9)


def test_closure_of_two_layers_is_the_gaussian_expectation_of_the_second():
    """What closure means at depth two: <a, b> equals the expectation of the
    second layers' product under the Gaussian with the first layers' exact
    joint mean and covariance (Monte Carlo of that definition, 200,000
    samples, within 4 standard errors), though not the exact value."""
    rng = np.random.default_rng(29)
    n, d = 2, 2
    k = n * d
    make = lambda: ts.Sequential(  # noqa: E731
        random_attention(rng, heads=1, n_ctx=n, d=d, causal=True, residual=True, scale=0.3),
        random_attention(rng, heads=1, n_ctx=n, d=d, causal=True, residual=True, scale=0.3),
        ts.position_wise(ts.Linear(rng.normal(size=(2, d))), n))
    a, b = make(), make()
    closed = ts.inner(a, b, method="closure").value
    T = np.concatenate([padded(np.eye(k), np.zeros(k))] * 2)  # both read one x ~ N(0, I)
    mu, M = attention_closure((a.layers[0], b.layers[0]), T[:, 0].copy(), T @ T.T, (k + 1, k + 1))
    keep = np.r_[1 : k + 1, k + 2 : 2 * k + 2]  # the constant channels dropped
    cov = M[np.ix_(keep, keep)] - np.outer(mu[keep], mu[keep])
    z = np.random.default_rng(1).multivariate_normal(mu[keep], cov, size=200_000)
    ya, yb = (m.layers[2](flat(m.layers[1], x)) for m, x in ((a, z[:, :k]), (b, z[:, k:])))
    prod = np.sum(np.asarray(ya) * np.asarray(yb), axis=1)
    assert abs(closed - prod.mean()) < 4 * prod.std() / np.sqrt(len(prod))


def test_one_attention_layer_stays_exact():
    """One attention layer and linear maps around it: the step on the exactly
    Gaussian input is the exact first stage (any width), result exact."""
    rng = np.random.default_rng(13)
    n, d, vocab = 3, 2, 4
    embed = ts.position_wise(ts.Linear(rng.normal(size=(d, vocab))), n)
    unembed = ts.position_wise(ts.Linear(rng.normal(size=(vocab, d)), rng.normal(size=vocab)), n)
    a, b = (ts.Sequential(embed, random_attention(rng, n_ctx=n, d=d, causal=True, rotary_base=10.0, residual=True),
                          unembed) for _ in range(2))
    for kw in ({}, {"centered": True}, {"per_output": True}):
        got = ts.inner(a, b, method="closure", **kw)
        assert got.exact and not got.notes
        np.testing.assert_allclose(got.value, ts.inner(a, b, **kw).value, rtol=1e-10)


def test_first_stage_under_correlated_positions_is_exact():
    """A measure whose positions are correlated (and flat Linear maps before
    the attention): the first stage reads the flat law, exactly (quadrature)."""
    rng = np.random.default_rng(23)
    n, d = 2, 2
    k = n * d
    X = rng.normal(size=(k, k))
    mean, cov = rng.normal(size=k) * 0.3, X @ X.T / k + 0.1 * np.eye(k)
    a = ts.Sequential(ts.Linear(rng.normal(size=(k, k)), rng.normal(size=k)),
                      random_attention(rng, n_ctx=n, d=d, causal=True, rotary_base=10.0, residual=True))
    b = random_attention(rng, heads=1, n_ctx=n, d=d)
    for kw in ({}, {"centered": True}):
        got = ts.inner(a, b, method="closure", mean=mean, cov=cov, **kw)
        assert got.exact
        np.testing.assert_allclose(got.value, ts.inner(a, b, mean=mean, cov=cov, algorithm="quadrature", **kw).value,
                                   rtol=1e-10)


# ------------------------------------------------------------------- flags


def test_flags_and_notes_for_deep_models():
    rng = np.random.default_rng(17)
    n, d = 2, 2
    att = lambda: random_attention(rng, heads=1, n_ctx=n, d=d, causal=True)  # noqa: E731
    mlp = ts.position_wise(ts.Bilinear(rng.normal(size=(3, d)), rng.normal(size=(3, d)), rng.normal(size=(d, 3)),
                                       residual=True), n)
    two = ts.Sequential(att(), att())
    plan = ts.plan_inner(two, two, method="closure")
    assert plan.facts["approximate_layers"] == 1 and not plan.exact
    assert plan.notes[0] == ("Gaussian closure over 1 layer(s) (1 attention, 0 bilinear) after an exact first stage: "
                             "approximate") and "orders of magnitude" in plan.notes[1] and len(plan.notes) == 2
    got = ts.similarity(two, ts.Sequential(att(), att()), method="closure")
    assert not got.exact and got.method == "closure" and got.notes == plan.notes and np.isfinite(got.value)
    block = ts.Sequential(att(), mlp, att(), mlp, att())
    plan = ts.plan_inner(block, block, method="closure")
    assert plan.facts["approximate_layers"] == 4 and "(2 attention, 2 bilinear)" in plan.notes[0]
    value = ts.inner(block, block, method="closure").value
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="one number of positions"):
        ts.inner(ts.Sequential(att(), random_attention(rng, heads=1, n_ctx=4, d=1)),
                 ts.Sequential(att(), random_attention(rng, heads=1, n_ctx=4, d=1)), algorithm="closure")


def test_planning_at_language_model_width_allocates_little():
    """The reference's scale (vocabulary 4096, d_model 128, 8 heads of 16, 4
    positions, two attention layers) is planned from shapes: costs within the
    default budget, nothing of the joint state's size allocated."""
    rng = np.random.default_rng(19)
    V, d, H, dh, n = 4096, 128, 8, 16, 4

    def att():
        W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
        return ts.BilinearAttention(W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, d, dh),
                                    causal=True, rotary_base=10000.0, scale=0.35, residual=True, n_ctx=n,
                                    q1_bias=W(H, dh), k1_bias=W(H, dh), q2_bias=W(H, dh), k2_bias=W(H, dh))

    embed = ts.position_wise(ts.Embedding(rng.normal(size=(d, V))), n)
    unembed = ts.position_wise(ts.Linear(rng.normal(size=(V, d)) / np.sqrt(d)), n)
    a, b = (ts.Sequential(embed, att(), att(), unembed) for _ in range(2))
    tracemalloc.start()
    plan = ts.plan_similarity(a, b, measure=ts.Gaussian(), method="closure")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    (only,) = plan.plans
    assert only.joint and not only.exact and only.facts["approximate_layers"] == 1
    assert only.flops < 3e11 and only.peak_bytes < 4e9
    assert peak < 64 * 2**20
