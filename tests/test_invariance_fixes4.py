"""check_invariance beside verify: weights far from unit scale, the
measure's support, its rng argument (each test fails before its fix)."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts


def _layer():
    rng = np.random.default_rng(0)
    return ts.Bilinear(rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), rng.normal(size=(2, 3)))


@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("measure", [ts.Tokens(3, 2), ts.Gaussian()], ids=["tokens", "gaussian"])
def test_the_distance_is_a_ratio_at_any_scale(scale, measure):
    """Products of weights of 1e200 overflow (10^802), their ratio does not:
    an OverflowError (an underflow at 1e-200) where verify and similarity
    answered."""
    a = _layer()
    big = a.replace(left=a.left * scale)
    perm = ts.symmetries.permute_hidden(0, [2, 0, 1])
    report = ts.check_invariance(big, perm, measure=measure)
    assert report.invariant and abs(report.relative_distance) < 1e-12
    moved = ts.check_invariance(big, big.replace(down=big.down * np.array([[1.0], [1.001]])), measure=measure)
    unit = ts.check_invariance(a, a.replace(down=a.down * np.array([[1.0], [1.001]])), measure=measure)
    assert not moved.invariant and moved.relative_distance == pytest.approx(unit.relative_distance, rel=1e-6)


def test_a_token_never_drawn_is_said():
    """verify says its verdict holds on the measure's support only; the same
    zero distance from check_invariance said nothing."""
    e = np.eye(4)
    square = ts.Bilinear(e[[0]], e[[0]], np.array([[1.0]]))  # x1^2
    other = ts.Linear(e[[0]] + 100 * e[[1]])  # x1 + 100 x2: equal wherever x2 = 0
    r = ts.check_invariance(square, other, measure=ts.Tokens(2, 2, probs=np.array([1.0, 0.0])))
    assert r.invariant and any("support only" in n and "token 1" in n for n in r.notes), r.notes


@pytest.mark.parametrize("rng", ["seed", -1, 1.5, True])
def test_rng_is_checked_by_name(rng):
    model = ts.Linear(np.array([[1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(TypeError, match="rng must be a numpy Generator"):  # numpy's SeedSequence said it
        ts.check_invariance(model, model, measure=ts.Tokens(2, 2), rng=rng)
    assert ts.check_invariance(model, model, measure=ts.Tokens(2, 2), rng=np.int64(3)).invariant


def test_a_small_output_is_judged_on_its_own_scale():
    """An output 1e8 times smaller than another flipped sign: distance 4e-16
    of the whole model, INVARIANT even in exact arithmetic (verify: different)."""
    from fractions import Fraction as F

    o = lambda rows: np.array(rows, dtype=object)  # noqa: E731
    L, R = o([[F(1), F(0)], [F(1), F(0)]]), o([[F(1), F(0)], [F(0), F(1)]])
    f = ts.Bilinear(L, R, o([[F(10**8), F(0)], [F(0), F(1)]]))  # (1e8 x1^2, x1 x2)
    g = ts.Bilinear(L, R, o([[F(10**8), F(0)], [F(0), F(-1)]]))  # (1e8 x1^2, -x1 x2)
    floats = [m.map_weights(lambda w: np.asarray(w, dtype=float)) for m in (f, g)]
    for a, b in ((f, g), floats):
        r = ts.check_invariance(a, b)
        assert not r.invariant and r.changed_outputs == (1,), r
        assert ts.check_invariance(a, a).invariant


def test_a_transform_that_edits_the_model_in_place_is_compared_with_the_original():
    """It compared the edited model with itself: INVARIANT at distance 0."""
    model = _layer()
    x = np.random.default_rng(1).normal(size=(4, 6))
    before = model(x)

    def transform(m):
        m.down[0, 0] += 1.0  # changes the function, in place
        return m

    r = ts.check_invariance(model, transform)
    assert not r.invariant and r.relative_distance > 1e-3 and not np.allclose(model(x), before)


@pytest.mark.parametrize("rng", ["x", 1.5, -1])
def test_random_symmetry_names_rng(rng):
    with pytest.raises(TypeError, match="rng must be a numpy Generator"):  # numpy's SeedSequence said it
        ts.random_symmetry(_layer(), rng)
