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
