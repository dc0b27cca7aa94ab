"""check_invariance on deep models: a real change is never hidden by the round-off allowance.

The allowance used to come from the model evaluated with |weights| on
|inputs|, a bound that grows with the degree (1e11 times the real float64
error for two attention layers): a 2-layer attention language model with its
logits scaled by 1.5 was reported invariant, relative distance 1.7e-24.  Now
the distance is relative to ||f||^2 and the allowance is the float64 error
measured by moving every weight by an ulp.

Oracles, independent of the inner-product code: the distance by enumeration
of every token sequence (the models evaluated on each one-hot input), the
logits scaled by 1.5 (g = 1.5 f, so ||f - g||^2 / ||f||^2 = 1/4 and
|f - g| / |f| = 1/2 at every input), and the float64 error of the outputs
from evaluating the models in exact rational arithmetic.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.components import Embedding, PositionWise
from tsalgebra.invariance import ROUNDOFF_FACTOR, _roundoff
from tsalgebra.symmetries import random_symmetry, rescale_hidden
from tsalgebra.verify import exactify

EPS = float(np.finfo(float).eps)


def _attention(rng, d, n):
    w = lambda: rng.normal(size=(1, 2, d)) / np.sqrt(d)  # noqa: E731
    return ts.BilinearAttention(w(), w(), w(), w(), w(), rng.normal(size=(1, d, 2)) / np.sqrt(2), causal=True,
                                scale=0.5, residual=True, n_ctx=n, q1_bias=rng.normal(size=(1, 2)) * 0.3,
                                k1_bias=rng.normal(size=(1, 2)) * 0.3, v_bias=rng.normal(size=(1, 2)) * 0.3,
                                o_bias=rng.normal(size=d) * 0.3)


def lm(seed, V, n, d):
    """Embedding, two residual bilinear attentions (scale 0.5), unembedding: degree 9 in the one-hot input."""
    rng = np.random.default_rng(seed)
    return ts.Sequential(PositionWise(Embedding(rng.normal(size=(d, V))), n), _attention(rng, d, n),
                         _attention(rng, d, n), PositionWise(ts.Linear(rng.normal(size=(V, d)) / np.sqrt(d)), n))


def logits_scaled(model, factor):
    last = model.layers[-1]
    return ts.Sequential(*model.layers[:-1], PositionWise(last.layer.replace(weight=last.layer.weight * factor),
                                                          last.n_ctx))


def enumerated_distance(f, g, V, n):
    """||f - g||^2 / ||f||^2 under uniform tokens: the mean over every sequence, by evaluation."""
    xs = np.zeros((V**n, n * V))
    for row, seq in enumerate(itertools.product(range(V), repeat=n)):
        xs[row, np.arange(n) * V + np.array(seq)] = 1.0
    fx, gx = f.evaluate_flat(xs), g.evaluate_flat(xs)
    return float(np.sum((fx - gx) ** 2) / np.sum(fx**2))


def test_scaled_logits_of_a_deep_attention_model_are_a_change_under_tokens():
    """Failed before: invariant=True, relative distance 8e-30, worst sampled difference 4e-14."""
    V, n, d = 6, 4, 6
    f = lm(1, V, n, d)
    g = logits_scaled(f, 1.5)
    oracle = enumerated_distance(f, g, V, n)
    assert oracle == pytest.approx(0.25, rel=1e-12)
    r = ts.check_invariance(f, g)
    assert r.method.startswith("tokens (exact")
    assert not r.invariant
    assert r.relative_distance == pytest.approx(oracle, rel=1e-9)
    assert r.max_sample_difference == pytest.approx(0.5, rel=1e-9)
    assert r.changed_outputs == tuple(range(f.out_features))
    # a change of 1e-6 in the logits is seen by the samples (below tol on the squared distance)
    small = ts.check_invariance(f, logits_scaled(f, 1 + 1e-6))
    assert not small.invariant and small.max_sample_difference == pytest.approx(1e-6, rel=1e-3)
    assert small.relative_distance == pytest.approx(enumerated_distance(f, logits_scaled(f, 1 + 1e-6), V, n),
                                                    rel=1e-3, abs=1e-15)


def test_an_unrelated_deep_model_is_far_by_the_enumerated_distance():
    """Failed before: the distance was 'relative to the squared size of the terms' (6.5e-24)."""
    V, n, d = 6, 4, 6
    f, g = lm(1, V, n, d), lm(2, V, n, d)
    r = ts.check_invariance(f, g)
    assert not r.invariant
    assert r.relative_distance == pytest.approx(enumerated_distance(f, g, V, n), rel=1e-8)
    assert not any("size of the terms" in note for note in r.notes)


def test_scaled_logits_are_a_change_on_samples_only():
    """Gaussian inputs, no exact method within budget: the verdict rests on samples.
    Failed before: invariant=True (the differences were divided by a term size of 3e29)."""
    f = lm(1, 8, 3, 4)
    r = ts.check_invariance(f, logits_scaled(f, 1.5), measure=ts.Gaussian())
    assert r.method == "samples only" and r.relative_distance is None
    assert not r.invariant
    assert r.max_sample_difference == pytest.approx(0.5, rel=1e-9)  # |f - 1.5 f| / |f| at every input


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetries_of_the_deep_attention_model_stay_invariant(seed):
    f = lm(1, 6, 4, 6)
    r = ts.check_invariance(f, random_symmetry(f, seed))
    assert r.invariant and abs(r.relative_distance) < 1e-12 and r.max_sample_difference < 1e-12


def _stack(seed, depth, d=3, h=4):
    rng = np.random.default_rng(seed)
    return ts.Sequential(*(ts.Bilinear(rng.normal(size=(h, d)) / np.sqrt(d), rng.normal(size=(h, d)) / np.sqrt(d),
                                       rng.normal(size=(d, h)) / np.sqrt(h), rng.normal(size=h) * 0.5,
                                       rng.normal(size=h) * 0.5, rng.normal(size=d) * 0.5) for _ in range(depth)))


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_large_rescalings_of_deep_stacks_stay_invariant_and_changes_do_not(depth):
    f = _stack(1, depth)
    for factor in (1e-3, 1e3, 1e6):
        r = ts.check_invariance(f, rescale_hidden(depth - 1, [factor, -factor, 1 / factor, 2.0], 1 / factor))
        assert r.invariant, (factor, r)
    last = f.layers[-1]
    moved = ts.Sequential(*f.layers[:-1], last.replace(down=last.down * (1 + 1e-5)))
    r = ts.check_invariance(f, moved)
    assert not r.invariant and r.max_sample_difference > 1e-7


def errors(f, x):
    """(the real float64 error of f on x, against exact rational evaluation;
    the round-off measured; the largest |f(x)|)."""
    fx = f.evaluate_flat(x)
    exact = exactify(f).evaluate_flat(np.vectorize(Fraction, otypes=[object])(x))
    real = float(np.max(np.abs((exact - fx.astype(object)).astype(float))))
    return real, _roundoff(f, x, fx), float(np.abs(fx).max())


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_the_measured_round_off_tracks_the_real_float64_error(depth):
    """The allowance covers the real error of the outputs (exact rational
    evaluation) and is not orders of magnitude above it at any depth (the
    |weights|-on-|inputs| bound was 1e11 times too large at degree 9)."""
    f = _stack(1, depth)
    real, measured, top = errors(f, np.random.default_rng(0).normal(size=(64, 3)))
    assert real <= ROUNDOFF_FACTOR * measured
    assert measured <= 100 * max(real, EPS * top)


def test_the_measured_round_off_of_the_attention_model_tracks_its_real_error():
    f = lm(1, 6, 4, 6)
    real, measured, top = errors(f, ts.Tokens(6, 4).sample(16, np.random.default_rng(0)))
    assert real <= ROUNDOFF_FACTOR * measured
    assert measured <= 1000 * max(real, EPS * top)
    report = ts.check_invariance(f, f)
    assert report.invariant and 0 < report.output_roundoff < 1e-9 * top
    assert "round-off, measured" in repr(report)
