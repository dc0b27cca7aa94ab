"""The Monte Carlo heavy-tail flag says where the error bar is doubtful.

The flag was raised when one sample carried over 5 % of a product's spread:
at 2,000 samples that held for 199 of 200 seeds of one bilinear layer, whose
95 % intervals covered the exact cosine 94 % of the time, so it said
nothing.  It now judges the error of the error bar, the relative standard
error of a product's sample variance, sqrt((kurtosis - 1) / n): off where
the intervals cover as they claim, on where they do not (a stack of three
bilinear layers).
"""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.algorithms.sampled import HEAVY_TAIL_VARIANCE_ERROR, Z95, _Stream


def w(rng, *shape):
    return rng.normal(size=shape) / np.sqrt(shape[-1])


def stack(depth, seed=0, d=3):
    """Two random residual bilinear stacks of ``depth`` layers (width 3 -> 4
    -> 3) and a readout; one plain bilinear layer at depth 1."""
    rng = np.random.default_rng(seed)

    def model():
        layers = [ts.Bilinear(w(rng, 4, d), w(rng, 4, d), w(rng, d, 4), residual=depth > 1) for _ in range(depth)]
        return ts.Sequential(*layers, ts.Linear(w(rng, 2, d))) if depth > 1 else layers[0]

    return model(), model()


def test_one_bilinear_layer_is_rarely_flagged_and_its_intervals_cover():
    """40 seeds at 2,000 samples: the old flag was on in all 40; the
    intervals cover the exact cosine as they claim, so the flag stays off."""
    a, b = stack(1)
    exact = ts.similarity(a, b).value
    runs = [ts.similarity(a, b, method="sampled", samples=2000, seed=s) for s in range(40)]
    flagged = sum(r.estimate.heavy_tailed for r in runs)
    covered = sum(abs(r.value - exact) <= Z95 * r.stderr for r in runs)
    assert covered >= 35, f"only {covered} of 40 intervals cover the exact cosine"
    assert flagged <= 2, f"{flagged} of 40 light-tailed estimates flagged heavy-tailed"
    assert all("heavy tails" not in repr(r) and not any("HEAVY TAILS" in n for n in r.notes)
               for r in runs if not r.estimate.heavy_tailed)


def test_unnormalised_bilinear_layers_at_the_default_samples_are_not_flagged():
    """The command line's test checkpoints (3 -> 4 -> 2, standard normal
    weights): the old flag was on for 94 % of seeds at 10,000 samples."""
    rng = np.random.default_rng(0)
    a, b = (ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4)))
            for _ in range(2))
    flags = [ts.similarity(a, b, method="sampled", seed=s).estimate.heavy_tailed for s in range(8)]
    assert not any(flags)


def test_a_depth_3_stack_is_flagged_in_most_seeds_where_its_intervals_miss():
    """Three bilinear layers: a polynomial of degree 8 whose products' tails
    the samples rarely reach; the intervals of <a, b> cover the exact value
    far less than 95 % of the time, and the flag is on in most seeds."""
    a, b = stack(3)
    exact = ts.inner(a, b).value
    runs = [ts.inner(a, b, method="sampled", samples=2000, seed=s) for s in range(20)]
    flagged = sum(r.estimate.heavy_tailed for r in runs)
    covered = sum(abs(r.value - exact) <= Z95 * r.stderr for r in runs)
    assert covered <= 16, f"{covered} of 20 intervals cover: this case no longer shows a doubtful error bar"
    assert flagged == 20, f"only {flagged} of 20 heavy-tailed estimates flagged"  # by their degree (16), a priori
    r = runs[0]
    assert "heavy tails: the error bar is doubtful" in repr(r)
    note = next(n for n in r.notes if n.startswith("HEAVY TAILS"))
    assert "degree 16" in note and f"up to about {r.estimate.tail_ceiling:.3g} times itself" in note


def test_the_flag_is_the_variance_error_over_its_threshold_and_is_seeded():
    a, b = stack(2)
    r = ts.similarity(a, b, method="sampled", samples=1000, seed=3)
    est = r.estimate
    assert 0 < est.variance_error <= 1 and 0 < est.tail_share <= 1
    assert est.heavy_tailed == (est.variance_error > HEAVY_TAIL_VARIANCE_ERROR)
    again = ts.similarity(a, b, method="sampled", samples=1000, seed=3).estimate
    assert again.variance_error == est.variance_error and again.heavy_tailed == est.heavy_tailed


def test_the_variance_error_of_a_chi_square_product_is_sqrt_14_over_n():
    """Linear models on one Gaussian input: every product is a multiple of
    x^2, whose kurtosis is 15, so the variance's relative error is
    sqrt(14 / n): the flag falls with the samples as it should."""
    a, b = ts.Linear(np.array([[1.0]])), ts.Linear(np.array([[-2.0]]))
    for n in (1000, 10000):
        got = [ts.similarity(a, b, method="sampled", samples=n, seed=s).estimate.variance_error for s in range(4)]
        assert np.mean(got) == pytest.approx(np.sqrt(14 / n), rel=0.25)


def _streamed(batches):
    stream = _Stream(batches[0].mean(0), batches[0].mean(0))
    for s in batches:
        stream.add(s, s)
    return stream.variance_error()


def test_the_streamed_variance_error_is_the_sample_kurtosis_over_batches():
    """Against the kurtosis of all samples at once: any batches, any scale
    (the fourth powers of products near 1e100 stay finite), and a product
    without spread beyond float64's rounding is left out."""
    rng = np.random.default_rng(0)
    s = np.exp(rng.normal(size=(3000, 4, 2)) * np.array([0.5, 1.0, 1.5, 3.0])[:, None])  # lognormal products
    d = s[:, :3] - s[:, :3].mean(0)
    kurtosis = (d ** 4).mean(0) / (d ** 2).mean(0) ** 2
    want = np.sqrt((kurtosis.max() - 1) / len(s))  # the fourth product (not reported) is left out
    cuts = [0, 17, 700, 701, 2500, 3000]
    batches = [s[i:j] for i, j in zip(cuts, cuts[1:])]
    assert _streamed(batches) == pytest.approx(want, rel=1e-9)
    assert _streamed([1e100 * b for b in batches]) == pytest.approx(want, rel=1e-9)
    # one product made exact (its spread float64's noise about 5.0) and the others normal: sqrt(2 / n)
    flat = rng.normal(size=(3000, 4, 1))
    flat[:, 1] = 5.0 + 1e-15 * rng.standard_t(2, size=(3000, 1))
    assert _streamed([flat[:1000], flat[1000:]]) == pytest.approx(np.sqrt(2 / 3000), rel=0.15)
