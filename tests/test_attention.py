"""Bilinear attention and transformers against direct implementations,
sympy, Monte Carlo and full pairing enumeration."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles as O
import tsalgebra as ts


def rope(v, p, base):
    """Rotate consecutive pairs of the last axis by p * base^(-2k/dh) (works on object arrays)."""
    out = v.copy()
    dh = v.shape[-1]
    for k in range(dh // 2):
        a = p * base ** (-2 * k / dh)
        c, s = np.cos(a), np.sin(a)
        x0, x1 = v[..., 2 * k].copy(), v[..., 2 * k + 1].copy()
        out[..., 2 * k], out[..., 2 * k + 1] = c * x0 - s * x1, s * x0 + c * x1
    return out


def attention_direct(att: ts.BilinearAttention, x: np.ndarray) -> np.ndarray:
    """Loops over batch, heads and positions; numpy object arrays allowed."""
    w = att.named_weights()
    B, n, d = x.shape
    zero = lambda k: (w[f"{k}_bias"] if w[f"{k}_bias"] is not None  # noqa: E731
                      else np.zeros(w[k].shape[:2], dtype=w[k].dtype))
    out = np.zeros((B, n, att.d_out), dtype=x.dtype)
    for bi in range(B):
        for h in range(att.heads):
            proj = {k: np.stack([w[k][h] @ x[bi, p] + zero(k)[h] for p in range(n)]) for k in ("q1", "k1", "q2", "k2", "v")}
            if att.rotary_base is not None:
                for k in ("q1", "k1", "q2", "k2"):
                    proj[k] = np.stack([rope(proj[k][p], p, att.rotary_base) for p in range(n)])
            for i in range(n):
                for j in range(n):
                    if att.causal and j > i:
                        continue
                    score = att.scale * (proj["q1"][i] @ proj["k1"][j]) * (proj["q2"][i] @ proj["k2"][j])
                    out[bi, i] = out[bi, i] + score * (w["o"][h] @ proj["v"][j])
        if att.o_bias is not None:
            out[bi] = out[bi] + att.o_bias
        if att.residual:
            out[bi] = out[bi] + x[bi]
    return out


def random_attention(rng, heads=2, dh=2, d=3, n_ctx=3, biases=True, quadratic=False, **flags):
    W = lambda *s: rng.normal(size=s) * 0.5  # noqa: E731
    q1, k1 = W(heads, dh, d), W(heads, dh, d)
    q2, k2 = (q1, k1) if quadratic else (W(heads, dh, d), W(heads, dh, d))
    extra = {}
    if biases:
        extra = dict(q1_bias=W(heads, dh), k1_bias=W(heads, dh), v_bias=W(heads, dh), o_bias=W(d))
        if quadratic:
            extra["q2_bias"], extra["k2_bias"] = extra["q1_bias"], extra["k1_bias"]
    return ts.BilinearAttention(q1, k1, q2, k2, W(heads, dh, d), W(heads, d, dh), n_ctx=n_ctx, **flags, **extra)


@pytest.mark.parametrize("flags", [{}, {"causal": True}, {"rotary_base": 100.0}, {"residual": True, "scale": 0.5},
                                   {"causal": True, "rotary_base": 10.0, "residual": True}])
def test_attention_matches_direct(flags):
    rng = np.random.default_rng(0)
    att = random_attention(rng, **flags)
    x = rng.normal(size=(4, 3, 3))
    np.testing.assert_allclose(att(x), attention_direct(att, x), rtol=1e-12, atol=1e-12)
    xt = torch.tensor(x)
    assert isinstance(att(xt), torch.Tensor)
    np.testing.assert_allclose(att(xt).numpy(), attention_direct(att, x), rtol=1e-12, atol=1e-12)
    assert att(x[0]).shape == (3, 3)


@pytest.mark.parametrize("flags", [{}, {"causal": True, "scale": 0.5}, {"rotary_base": 10.0, "residual": True}])
@pytest.mark.parametrize("quadratic", [False, True])
def test_position_by_position_forward_is_the_network(flags, quadratic):
    """The layer's own forward (position by position) against the
    evaluation of its flat tensor network, biases of every kind included;
    rational weights still evaluate through the network."""
    from tsalgebra.engine import evaluate

    rng = np.random.default_rng(3)
    att = random_attention(rng, heads=2, dh=3, d=4, n_ctx=5, quadratic=quadratic, **flags)
    x = rng.normal(size=(7, att.in_features))
    np.testing.assert_allclose(att.evaluate_flat(x), evaluate(att.expression, x)[:, 1:], rtol=1e-12, atol=1e-12)
    exact = ts.exactify(random_attention(rng, heads=1, dh=2, d=2, n_ctx=2, **flags))
    xs = rng.integers(-2, 3, size=(2, exact.in_features))
    assert exact.evaluate_flat(xs).tolist() == evaluate(exact.expression, xs)[:, 1:].tolist()


def test_transformer_matches_direct():
    rng = np.random.default_rng(1)
    n, V, d = 3, 5, 4
    embed = ts.Linear(rng.normal(size=(d, V)))
    att = random_attention(rng, d=d, n_ctx=None, residual=True, causal=True)
    mlp = ts.Bilinear(rng.normal(size=(6, d)) * 0.5, rng.normal(size=(6, d)) * 0.5, rng.normal(size=(d, 6)) * 0.5,
                      residual=True)
    unembed = ts.Linear(rng.normal(size=(V, d)), rng.normal(size=V))
    model = ts.Transformer(embed, [(att, mlp)], unembed, n_ctx=n)
    x = rng.normal(size=(2, n, V))
    h = x @ embed.weight.T
    h = attention_direct(att.at(n), h)
    h = ((h @ mlp.left.T) * (h @ mlp.right.T)) @ mlp.down.T + h
    want = h @ unembed.weight.T + unembed.bias
    np.testing.assert_allclose(model(x), want, rtol=1e-12)
    assert model.degree == 10


def _tiny(rng, quadratic=False, **flags):
    """One head, d_head 1, d 1, two positions: small enough for sympy."""
    return random_attention(rng, heads=1, dh=1, d=1, n_ctx=2, quadratic=quadratic, **flags)


@pytest.mark.parametrize("flags", [{}, {"causal": True, "residual": True, "rotary_base": 10.0}])
def test_exact_gaussian_matches_sympy(flags):
    rng = np.random.default_rng(2)
    a, b = _tiny(rng, **flags), _tiny(rng, **flags)
    x = sympy.symbols("x1 x2")
    seq = np.array([[[x[0]], [x[1]]]], dtype=object)
    polys = lambda m: [sympy.expand(v) for v in attention_direct(m, seq)[0].ravel()]  # noqa: E731
    want = float(O.sympy_gaussian_inner(polys(a), polys(b), x))
    for algorithm in ("pairings", "quadrature"):
        got = ts.inner(a, b, algorithm=algorithm)
        assert got.exact and abs(got.value - want) <= 1e-10 * abs(want)
    want_s = None
    # the symmetric product is function-level: it matches the sympy polynomials turned into a model
    poly_model = ts.from_sympy(polys(a), x, degree=5)
    assert abs(ts.inner(a, b, "symmetric").value - ts.inner(poly_model, b, "symmetric").value) < 1e-10 * (
        1 + abs(ts.inner(a, b, "symmetric").value))
    del want_s


def test_declared_symmetries_only_for_equal_factors():
    rng = np.random.default_rng(3)
    distinct = random_attention(rng)
    quad = random_attention(rng, quadratic=True)
    assert distinct.expression.symmetries == ()
    assert quad.expression.symmetries == ((2, 3, 0, 1, 4),)  # both factors exchanged at once
    # undeclared swaps (the reference's bug) change the answer; d_head = 2 so
    # that products of dot products do not commute by accident
    honest = {m: ts.inner(m, m, "symmetric").value for m in (distinct, quad)}
    for model, lie_perm in ((distinct, (2, 3, 0, 1, 4)), (quad, (2, 1, 0, 3, 4)), (quad, (0, 3, 2, 1, 4))):
        net = model.expression
        lie = ts.Network(net.tensors, net.inputs, net.outputs, (lie_perm,))
        assert abs(ts.inner(lie, lie, "symmetric").value - honest[model]) > 1e-6 * abs(honest[model])


def test_orbits_equal_full_enumeration():
    """Every declared symmetry is checked against the plain sum over all pairings."""
    rng = np.random.default_rng(4)
    quad_a = _tiny(rng, quadratic=True, causal=True, residual=True)
    quad_b = _tiny(rng, quadratic=True, rotary_base=10.0)
    plain = _tiny(rng, causal=True)
    wide = lambda **f: random_attention(rng, heads=2, dh=2, d=1, n_ctx=2, **f)  # noqa: E731  (d_head 2)
    wide_q, wide_p = wide(quadratic=True, rotary_base=10.0), wide(causal=True)
    cases = [("gaussian", quad_a, quad_a), ("symmetric", quad_a, quad_b), ("symmetric", quad_a, quad_a),
             ("symmetric", plain, plain), ("gaussian", plain, quad_b), ("symmetric", wide_q, wide_q),
             ("symmetric", wide_q, wide_p)]
    for kind, x, y in cases:
        alg = "pairings" if kind == "gaussian" else None
        grouped, full = ts.inner(x, y, kind, algorithm=alg), ts.inner(x, y, kind, orbits=False, algorithm=alg)
        assert grouped.orbits <= full.orbits == full.pairings
        assert abs(grouped.value - full.value) <= 1e-10 * max(1.0, abs(full.value))
    assert ts.inner(quad_a, quad_a, algorithm="pairings").orbits < 9496 / 3


def test_two_exact_algorithms_agree_with_mean_and_cov():
    rng = np.random.default_rng(5)
    a, b = _tiny(rng, causal=True, residual=True), _tiny(rng, rotary_base=10.0)
    mean, cov = np.array([0.4]), np.array([[0.7]])
    enum = ts.inner(a, b, mean=mean, cov=cov, algorithm="pairings", centered=True)
    quad = ts.inner(a, b, mean=mean, cov=cov, algorithm="quadrature", centered=True)
    assert enum.algorithm == "pairings" and quad.algorithm == "quadrature"
    np.testing.assert_allclose(enum.value, quad.value, rtol=1e-10)


def test_exact_gaussian_against_monte_carlo_with_mean_and_cov():
    rng = np.random.default_rng(5)
    d, n = 2, 2
    a = random_attention(rng, heads=2, dh=2, d=d, n_ctx=n, causal=True, residual=True)
    b = random_attention(rng, heads=2, dh=2, d=d, n_ctx=n, rotary_base=10.0)
    mean, A = np.array([0.3, -0.2]), rng.normal(size=(d, d))
    cov = A @ A.T / d + 0.3 * np.eye(d)
    exact = ts.inner(a, b, mean=mean, cov=cov).value
    z = rng.normal(size=(200_000, n, d)) @ np.linalg.cholesky(cov).T + mean
    prod = np.einsum("bio,bio->b", a(z), b(z))
    se = prod.std(ddof=1) / np.sqrt(len(prod))
    assert abs(prod.mean() - exact) < 4 * se and se < 0.1 * abs(exact)


def test_constant_channel_is_shared_across_positions():
    """A position-wise affine map on 2 positions: E[f.f] counts the bias once
    per position, not once per constant channel copy (the reference doubled it)."""
    layer = ts.position_wise(ts.Linear(np.array([[2.0]]), np.array([3.0])), 2)
    # f(x) = (2 x1 + 3, 2 x2 + 3): E|f|^2 = 2 (4 + 9) = 26 under N(0, I)
    assert ts.inner(layer, layer).value == pytest.approx(26.0, rel=1e-14)
    att = random_attention(np.random.default_rng(6), heads=1, dh=1, d=1, n_ctx=2, biases=False)
    zero_att = att.map_weights(lambda w: w * 0)
    shifted = ts.BilinearAttention(*(getattr(zero_att, k) for k in ("q1", "k1", "q2", "k2", "v", "o")), n_ctx=2,
                                   o_bias=np.array([1.5]))
    assert ts.inner(shifted, shifted).value == pytest.approx(2 * 1.5**2, rel=1e-14)


def test_exact_rational_attention():
    half = Fraction(1, 2)
    obj = lambda v: np.array(v, dtype=object).reshape(1, 1, 1)  # noqa: E731
    att = ts.BilinearAttention(obj(1), obj(half), obj(1), obj(half), obj(-2), obj(3), n_ctx=2, causal=True)
    r = ts.inner(att, att)
    assert isinstance(r.value, Fraction) and r.value > 0
    assert abs(float(r.value) - ts.inner(att.map_weights(lambda w: w.astype(float)),
                                         att.map_weights(lambda w: w.astype(float))).value) < 1e-12 * float(r.value)


def test_bad_attention_input():
    rng = np.random.default_rng(7)
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    with pytest.raises(ValueError, match="k1 has shape"):
        ts.BilinearAttention(W(2, 2, 3), W(2, 2, 4), W(2, 2, 3), W(2, 2, 3), W(2, 2, 3), W(2, 3, 2))
    with pytest.raises(ValueError, match="n_ctx"):
        ts.inner(*(ts.BilinearAttention(W(1, 1, 2), W(1, 1, 2), W(1, 1, 2), W(1, 1, 2), W(1, 1, 2), W(1, 2, 1)),) * 2)
    att = random_attention(rng)
    with pytest.raises(ValueError, match="sequences of shape"):
        att(np.zeros((2, 4, 3)))


# -------------------------------------------------------------- symmetries


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([{}, {"causal": True, "residual": True}, {"rotary_base": 10.0}]),
       st.booleans())
def test_attention_symmetries_leave_every_similarity_at_one(seed, flags, quadratic):
    from tsalgebra import symmetries as S
    from tsalgebra.baselines import weight_cosine

    rng = np.random.default_rng(seed)
    att = random_attention(rng, heads=2, dh=2, d=1, n_ctx=2, quadratic=quadratic, **flags)
    moved = S.random_symmetry(att, rng)(att)
    x = rng.normal(size=(4, 2, 1))
    np.testing.assert_allclose(moved(x), att(x), rtol=1e-10, atol=1e-12)
    for kind in ("gaussian", "symmetric"):
        assert ts.similarity(att, moved, kind).value == pytest.approx(1, abs=1e-10)
    assert weight_cosine(att, moved) < 1 - 1e-3
    other = random_attention(rng, heads=2, dh=2, d=1, n_ctx=2, **flags)
    s1 = ts.similarity(att, other, "symmetric").value
    s2 = ts.similarity(moved, S.random_symmetry(other, rng)(other), "symmetric").value
    assert s1 == pytest.approx(s2, abs=1e-9)


def test_each_attention_generator_preserves_the_function():
    from tsalgebra import symmetries as S

    rng = np.random.default_rng(8)
    att = random_attention(rng, heads=3, dh=2, d=2, n_ctx=3, causal=True)
    x = rng.normal(size=(3, 3, 2))
    A = rng.normal(size=(2, 2)) + 2 * np.eye(2)
    for g in (S.permute_heads(0, [2, 0, 1]), S.swap_query_key_factors(0), S.map_query_key(0, 1, 1, A),
              S.map_query_key(0, 2, 0, A), S.map_value_output(0, 2, A)):
        moved = g(att)
        assert not moved.same_weights(att)
        np.testing.assert_allclose(moved(x), att(x), rtol=1e-10, atol=1e-12)
    rot = random_attention(rng, n_ctx=3, rotary_base=10.0)
    with pytest.raises(ValueError, match="commute with the rotations"):
        S.map_query_key(0, 1, 0, A)(rot)


# ----------------------------------------------------------------- closure


def test_closure_through_attention():
    """The head (through the attention layer) is exact; only bilinear layers
    after it are closed as if Gaussian, and then the result says so."""
    rng = np.random.default_rng(9)
    a = random_attention(rng, heads=1, dh=2, d=1, n_ctx=2, residual=True, causal=True)
    b = random_attention(rng, heads=1, dh=2, d=1, n_ctx=2, rotary_base=10.0)
    mean, cov = np.array([0.3]), np.array([[0.8]])
    for kw in ({}, {"centered": True}, {"per_output": True}):
        closed = ts.inner(a, b, method="closure", mean=mean, cov=cov, **kw)
        exact = ts.inner(a, b, mean=mean, cov=cov, algorithm="quadrature", **kw)
        assert closed.exact and closed.method == "closure"
        np.testing.assert_allclose(closed.value, exact.value, rtol=1e-10)
    unembed = ts.position_wise(ts.Linear(rng.normal(size=(2, 1)), rng.normal(size=2)), 2)
    lin_a, lin_b = ts.Sequential(a, unembed), ts.Sequential(b, unembed)
    assert ts.inner(lin_a, lin_b, method="closure").exact  # a linear tail keeps closure exact
    np.testing.assert_allclose(ts.inner(lin_a, lin_b, method="closure").value, ts.inner(lin_a, lin_b).value,
                               rtol=1e-10)
    mlp = ts.position_wise(ts.Bilinear(rng.normal(size=(2, 1)), rng.normal(size=(2, 1)), rng.normal(size=(1, 2)),
                                       residual=True), 2)
    block_a, block_b = ts.Sequential(a, mlp), ts.Sequential(b, mlp)
    approx = ts.similarity(block_a, block_b, method="closure")
    assert not approx.exact and approx.notes and "approximate" in repr(approx)
    assert abs(approx.value - ts.similarity(block_a, block_b).value) > 1e-6
    deep = ts.inner(ts.Sequential(a, a), ts.Sequential(a, a), method="closure")  # closed through the second
    assert not deep.exact and any("1 attention" in n for n in deep.notes)  # (tests/test_closure_deep.py)


# ------------------------------------------------- attention moments (fast path)


def _enumerated_moments(x, y, mean, cov):
    """Padded E[x~ y~'] and E[x~] by summing pairing orbits with both outputs
    open: the generic mechanism, independent of the per-position features."""
    from tsalgebra.pairing_sum import OUTER, Joins, orbit_sum

    d = len(mean)
    n = x.in_features // d
    joins = Joins.gaussian(ts.Gaussian(np.tile(mean, n), np.kron(np.eye(n), cov)))  # the flat law, tiled by hand
    X, Y = x.network(symmetric=True), y.network(symmetric=True)
    return orbit_sum(X, Y, joins, OUTER, 1e13)[0], orbit_sum(X, None, joins, None, 1e13)[0]


@pytest.mark.parametrize("flags", [{}, {"causal": True}, {"rotary_base": 10.0, "scale": 0.7},
                                   {"causal": True, "rotary_base": 5.0, "residual": True}])
def test_attention_moments_equal_pairing_enumeration(flags):
    from tsalgebra.algorithms.hermite import attention_moments

    rng = np.random.default_rng(11)
    d = 2
    a = random_attention(rng, heads=2, dh=2, d=d, n_ctx=2, **flags)
    b = random_attention(rng, heads=1, dh=2, d=d, n_ctx=2, quadratic=True, **flags)
    mean, A = np.array([0.4, -0.3]), rng.normal(size=(d, d))
    cov = A @ A.T / d + 0.2 * np.eye(d)
    hm = attention_moments(a, b, ts.Gaussian(mean, cov), joint=True)
    for got, x, y in ((hm.ab, a, b), (hm.aa, a, a), (hm.bb, b, b)):
        want, want_mean = _enumerated_moments(x, y, mean, cov)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11 * np.abs(want).max())
    np.testing.assert_allclose(hm.mean_a, _enumerated_moments(a, a, mean, cov)[1], atol=1e-12)


def test_attention_moments_through_an_embedding_and_a_singular_covariance():
    """Position-wise Linear layers before the attention are read through; a
    rank-deficient input covariance whitens to fewer variables."""
    from tsalgebra.algorithms.hermite import attention_moments

    rng = np.random.default_rng(12)
    embed = ts.position_wise(ts.Linear(rng.normal(size=(3, 2)), rng.normal(size=3)), 2)
    a = ts.Sequential(embed, random_attention(rng, heads=1, dh=2, d=3, n_ctx=2, causal=True))
    b = ts.Sequential(embed, random_attention(rng, heads=2, dh=1, d=3, n_ctx=2, residual=True))
    mean, cov = np.array([0.2, 0.1]), np.array([[1.0, 1.0], [1.0, 1.0]])  # rank 1
    hm = attention_moments(a, b, ts.Gaussian(mean, cov))
    assert hm.whitened == 1
    want, want_mean = _enumerated_moments(a, b, mean, cov)
    np.testing.assert_allclose(hm.ab, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def test_attention_moments_route_and_its_refusals():
    rng = np.random.default_rng(13)
    small = lambda **f: random_attention(rng, heads=1, dh=2, d=2, n_ctx=2, **f)  # noqa: E731
    unembed = ts.position_wise(ts.Linear(rng.normal(size=(3, 2)), rng.normal(size=3)), 2)
    la, lb = ts.Sequential(small(causal=True), unembed), ts.Sequential(small(rotary_base=10.0), unembed)
    PER_POSITION = ("moments", "hermite")  # the two per-position algorithms; the cheaper runs
    fast = ts.inner(la, lb, centered=True, per_output=True)
    assert fast.algorithm in PER_POSITION and fast.exact
    slow = ts.inner(la, lb, centered=True, per_output=True, algorithm="pairings")
    np.testing.assert_allclose(fast.value, slow.value, rtol=1e-10)
    for algorithm in PER_POSITION:
        np.testing.assert_allclose(ts.inner(la, lb, centered=True, per_output=True, algorithm=algorithm).value,
                                   slow.value, rtol=1e-10)
    a, b = small(causal=True), small(rotary_base=10.0)
    # a measure that correlates positions is not the sequence measure: the generic route takes it
    cov = np.eye(4) + 0.3 * np.eye(4, k=2) + 0.3 * np.eye(4, k=-2)
    assert ts.inner(a, b, cov=cov).algorithm not in PER_POSITION
    with pytest.raises(ValueError, match="not independent and identical across positions"):
        ts.inner(a, b, cov=cov, algorithm="moments")
    with pytest.raises(ValueError, match="not positive semi-definite"):  # checked as on every route
        ts.inner(a, b, cov=np.array([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        ts.inner(a, b, mean=np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="gaussian inner product only"):
        ts.inner(a, b, "symmetric", algorithm="moments")
    mlp = ts.position_wise(ts.Bilinear(rng.normal(size=(2, 2)), rng.normal(size=(2, 2)), rng.normal(size=(2, 2))), 2)
    for algorithm in PER_POSITION:
        with pytest.raises(ValueError, match="only (position-wise )?Linear layers may follow"):
            ts.inner(ts.Sequential(a, mlp), ts.Sequential(b, mlp), algorithm=algorithm)
    with pytest.raises(ts.CostError, match="attention-moments"):
        ts.inner(a, b, budget=10)
    with pytest.raises(ValueError, match="positions of different widths"):  # 2 x 3 and 3 x 2 inputs
        ts.inner(random_attention(rng, heads=1, dh=1, d=3, n_ctx=2), random_attention(rng, heads=1, dh=1, d=2, n_ctx=3),
                 algorithm="moments")
    # a similarity takes all three products from one joint computation: same as three separate ones
    s = ts.similarity(la, lb)
    ab, aa, bb = (ts.inner(x, y).value for x, y in ((la, lb), (la, la), (lb, lb)))
    assert s.algorithm in PER_POSITION
    assert s.value == pytest.approx(ab / np.sqrt(aa * bb), rel=1e-12)


def test_attention_moments_against_monte_carlo_at_benchmark_width():
    """d_model 16, 3 positions, 2 heads of width 4 (the benchmark's shape)."""
    rng = np.random.default_rng(14)
    d, n = 16, 3
    w = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    make = lambda **f: ts.BilinearAttention(w(2, 4, d), w(2, 4, d), w(2, 4, d), w(2, 4, d), w(2, 4, d), w(2, d, 4),  # noqa: E731
                                            n_ctx=n, q1_bias=0.1 * w(2, 4), **f)
    a, b = make(causal=True), make(rotary_base=10.0, residual=True)
    mean, cov = 0.1 * rng.normal(size=d), np.diag(rng.uniform(0.5, 1.5, size=d))
    z = rng.normal(size=(40_000, n, d)) * np.sqrt(np.diag(cov)) + mean
    fa, fb = a(z), b(z)
    for x, y, fx, fy in ((a, a, fa, fa), (a, b, fa, fb)):
        exact = ts.inner(x, y, mean=mean, cov=cov)
        assert exact.algorithm == "moments"
        prod = np.einsum("bio,bio->b", fx, fy)
        se = prod.std(ddof=1) / np.sqrt(len(prod))
        assert abs(prod.mean() - exact.value) < 4 * se
    assert se < 0.1 * ts.inner(a, a, mean=mean, cov=cov).value  # the cross check has teeth
