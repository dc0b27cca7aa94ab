"""verify with method="sampled" / "closure": joint products, labels, honest verdicts.

Before, verify estimated <c,c>, <c,m> and <m,m> from three independent sets
of samples: a circuit equal to the component (a depth-3 stack with hidden
units permuted) came out "different", similarity 0.9945, and the report said
only "floating point, tolerance 1e-09", with no method, no standard error.

Oracles, independent of the code under test: the exact figures from explicit
Gaussian moment tensors (tests/oracles.py, on the models' plain weights), and
a twin built by permuting hidden units (the same function by construction,
checked on random inputs).
"""

from __future__ import annotations

import numpy as np
import pytest

import oracles as O
import tsalgebra as ts
from helpers import spec_of
from tsalgebra.algorithms.sampled import Z95


def _stack(seed, depth, d=2, h=3):
    rng = np.random.default_rng(seed)
    return ts.Sequential(*(ts.Bilinear(rng.normal(size=(h, d)) / np.sqrt(d), rng.normal(size=(h, d)) / np.sqrt(d),
                                       rng.normal(size=(d, h)) / np.sqrt(h), rng.normal(size=h) * 0.5,
                                       rng.normal(size=h) * 0.5, rng.normal(size=d) * 0.5) for _ in range(depth)))


def _permuted_twin(model, layer=1, perm=(2, 0, 1)):
    p = np.array(perm)
    lay = model.layers[layer]
    twin = lay.replace(left=lay.left[p], right=lay.right[p], down=lay.down[:, p], left_bias=lay.left_bias[p],
                       right_bias=lay.right_bias[p])
    return ts.Sequential(*model.layers[:layer], twin, *model.layers[layer + 1:])


def _oracle_figures(component, circuit):
    """(similarity, relative residual) from explicit Gaussian moment tensors."""
    f, c = spec_of(component), spec_of(circuit)
    ff, cc, fc = (O.gaussian_inner_bruteforce(a, b) for a, b in ((f, f), (c, c), (f, c)))
    return fc / np.sqrt(ff * cc), (ff + cc - 2 * fc) / ff


def test_a_permuted_deep_stack_is_equal_under_sampling():
    """Failed before: 'different', similarity 0.9945 (three independent sample sets)."""
    m = _stack(1, 3)
    twin = _permuted_twin(m)
    x = np.random.default_rng(0).normal(size=(50, 2))
    np.testing.assert_allclose(twin(x), m(x), rtol=1e-12, atol=1e-12)  # the same function
    for _ in range(3):  # no seed: each call draws its own, and reports it
        v = ts.verify(twin, m, exact=False, method="sampled", samples=5000)
        assert v.verdict.startswith("equal (") and "estimated" in v.verdict
        assert v.method == "sampled" and v.accuracy == "estimated" and v.estimated and not v.exact
        assert v.samples == 5000 and isinstance(v.seed, int)
        assert set(v.stderr) == set(v.interval) == {"similarity", "relative_residual", "explained"}
        lo, hi = v.interval["similarity"]
        assert lo <= 1 <= hi + 1e-12 and abs(v.similarity - 1) < 1e-9
        assert v.relative_residual < 1e-9
        text = repr(v)
        assert "sampled (estimated)" in text and "5,000 samples" in text and "±" in text and f"seed {v.seed}" in text
        # rerunning with the reported seed gives the same figures
        again = ts.verify(twin, m, exact=False, method="sampled", samples=5000, seed=v.seed)
        assert again.similarity == v.similarity and again.relative_residual == v.relative_residual


@pytest.mark.parametrize("name", ["unrelated", "near"])
def test_sampled_intervals_cover_the_exact_figures(name):
    """Over seeds, the 95 % intervals of similarity and residual cover the
    oracle's values about 95 % of the time (at least 16 of 20 here)."""
    m = _stack(1, 2)
    if name == "unrelated":
        c = _stack(2, 2)
    else:
        last = m.layers[-1]
        c = ts.Sequential(m.layers[0], last.replace(down=last.down * 1.05))
    sim, res = _oracle_figures(m, c)
    hits_s = hits_r = 0
    for seed in range(20):
        v = ts.verify(c, m, method="sampled", samples=2000, seed=seed)
        assert v.verdict == "different"
        hits_s += v.interval["similarity"][0] <= sim <= v.interval["similarity"][1]
        hits_r += v.interval["relative_residual"][0] <= res <= v.interval["relative_residual"][1]
        assert v.interval["relative_residual"][0] == pytest.approx(
            max(0.0, v.relative_residual - Z95 * v.stderr["relative_residual"]))  # a squared norm: at least 0
    assert hits_s >= 16 and hits_r >= 16, (hits_s, hits_r)


def test_a_small_real_change_is_different_under_sampling_and_closure():
    m = _stack(1, 3)
    last = m.layers[2]
    near = ts.Sequential(m.layers[0], m.layers[1], last.replace(down=last.down * 1.001))
    v = ts.verify(near, m, method="sampled", samples=5000, seed=0)
    assert v.verdict == "different"
    assert v.interval["relative_residual"][0] > v.tolerance  # the whole interval lies beyond tol
    cl = ts.verify(near, m, method="closure")
    assert cl.verdict == "different" and cl.accuracy == "approximate" and cl.stderr is None


def test_closure_verdicts_say_approximate():
    m = _stack(1, 3)
    v = ts.verify(_permuted_twin(m), m, method="closure")
    assert v.method == "closure" and v.accuracy == "approximate" and not v.estimated
    assert v.verdict == "equal (within tolerance; approximate: closure)"
    assert "closure (approximate)" in repr(v) and any("approximate" in n for n in v.notes)


def test_exact_algorithms_are_labelled():
    m = _stack(1, 2)
    v = ts.verify(_permuted_twin(m), m)
    assert v.method == "exact" and v.accuracy == "exact" and v.algorithm and v.stderr is None and v.samples == 0
    assert v.verdict == "equal (within tolerance)"
    sim, res = _oracle_figures(m, _stack(2, 2))
    w = ts.verify(_stack(2, 2), m)
    assert w.similarity == pytest.approx(sim, rel=1e-9) and w.relative_residual == pytest.approx(res, rel=1e-9)


def test_an_estimate_cannot_be_an_exact_verdict():
    m = _stack(1, 2)
    with pytest.raises(ValueError, match="exact=True needs an exact method"):
        ts.verify(m, m, exact=True, method="sampled")
    exact_weights = m.map_weights(lambda w: np.vectorize(lambda v: __import__("fractions").Fraction(float(v)),
                                                         otypes=[object])(w))
    v = ts.verify(exact_weights, exact_weights, method="sampled", samples=500, seed=1)  # exact=None: float
    assert not v.exact and v.accuracy == "estimated" and v.verdict.startswith("equal (")


def test_per_output_estimates_share_the_samples_and_carry_errors():
    m = _stack(1, 3)
    v = ts.verify(_permuted_twin(m), m, method="sampled", samples=2000, seed=3)
    for key in ("similarity_stderr", "relative_residual_stderr"):
        assert v.per_output[key].shape == (m.out_features,)
    np.testing.assert_allclose(v.per_output["similarity"], 1.0, atol=1e-9)
    assert np.all(v.per_output["relative_residual"] < 1e-9)


def test_the_faithfulness_curve_is_estimated_jointly():
    """The last point (every eigenvector: the component itself) has similarity
    1 with joint samples; three separate estimates, each with its own
    samples, did not give 1."""
    rng = np.random.default_rng(0)
    layer = ts.Bilinear(rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.normal(size=(3, 6)),
                        left_bias=rng.normal(size=6))
    v = ts.verify(ts.circuits.top_eigen(layer, output=1, k=2), ts.circuits.project(layer, 1),
                  method="sampled", samples=2000)  # no seed: one is drawn for every product
    assert v.faithfulness[-1][1] == pytest.approx(1, abs=1e-9)
    assert v.faithfulness[-1][2] == pytest.approx(0, abs=1e-9)


def test_a_formula_over_the_degree_bound_is_refused_at_its_written_degree():
    """(x1 + x2 + 1)^400 was 'degree 65 exceeds 64' (the exponent capped
    before the message)."""
    import sympy

    x1, x2 = sympy.symbols("x1 x2")
    layer = ts.Bilinear(np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 1)))
    with pytest.raises(ValueError, match="degree 400 exceeds 64"):
        ts.verify((x1 + x2 + 1) ** 400, layer)
    with pytest.raises(ValueError, match="degree over 1,000,000,000,000 exceeds 64"):
        ts.verify((x1 + x2) ** (10**30), layer)
