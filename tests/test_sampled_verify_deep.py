"""A sampled verdict on a depth-3 bilinear stack whose squared norm the samples estimate below 0.

The control variate (the models truncated after their first layer, whose
products are exact) corrects each mean of squares by beta (c - E c); on the
heavy-tailed products of a depth-3 stack (degree 16 against the control's
degree 4) that correction can outweigh the mean, and in about 1-2 % of runs
at 500-1,000 samples <f, f> or <c, c> came out negative (with an error bar
that covers the true, positive value, or, as heavy tails make likely, too
small to).  verify then raised "the component has zero norm: nothing to
explain" (false: its exact norm is positive; a circuit equal to the
component was refused so), or "the circuit's norm ... or the circuit is
zero".  The refusal stands (no similarity or residual rests on a negative
squared norm), but it now says what happened, with the estimate's error bar,
as ts.similarity and ts.norm do; a model that is 0 on every sample is still
called zero.

Oracle: the sampled products themselves (tsalgebra.inner.relative_products
with the same samples: the estimate is negative; the exact products are
positive), and the estimator's own variance record.
"""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.algorithms.sampled import Estimate
from tsalgebra.inner import _not_positive, relative_products


def _deep(seed):
    """Three bilinear layers 2 -> 3 -> 2 (docs/circuits.md's deep model), and a second such stack."""
    rng = np.random.default_rng(seed)

    def stack():
        return ts.Sequential(*(ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
                               for _ in range(3)))

    return stack(), stack()


def _refusal(circuit, component, samples, seed):
    with pytest.raises(ValueError) as info:
        ts.verify(circuit, component, method="sampled", samples=samples, seed=seed)
    return str(info.value)


def test_a_component_whose_norm_is_estimated_below_0_is_not_called_zero():
    m, _ = _deep(64)
    ab, aa, bb = relative_products(m, m, "gaussian", method="sampled", samples=1000, seed=64)
    exact = float(relative_products(m, m, "gaussian", method="exact")[1].value)
    est, se = float(aa.value), float(aa.stderr)
    assert est < 0 < exact and aa.estimate.variance_saved < 1  # the case: the control variate added variance
    said = _refusal(m, m, 1000, 64)  # the circuit is the component itself
    assert "zero norm" not in said and "nothing to explain" not in said
    assert f"the component's squared norm <f, f> is {est:.4g} +- {se:.2g}, not positive" in said
    assert "control variate" in said and f"{1 / aa.estimate.variance_saved:.3g}" in said and "samples=" in said
    # a permuted twin (other weights, the same function) reads the same samples of <f, f>: the same refusal
    twin = ts.symmetries.permute_hidden(1, [2, 0, 1])(m)
    assert f"<f, f> is {est:.4g} +- {se:.2g}" in _refusal(twin, m, 1000, 64)


def test_a_circuit_whose_norm_is_estimated_below_0_is_not_called_zero():
    m, c = _deep(40)
    _, aa, bb = relative_products(m, c, "gaussian", method="sampled", samples=1000, seed=40)
    assert float(aa.value) > 0 > float(bb.value)
    assert float(relative_products(m, c, "gaussian", method="exact")[2].value) > 0
    said = _refusal(c, m, 1000, 40)
    assert f"the circuit's squared norm <c, c> is {float(bb.value):.4g} +- {float(bb.stderr):.2g}, not positive" in said
    assert "control variate" in said and "circuit is zero" not in said


def test_a_model_that_is_0_on_every_sample_is_still_zero():
    m, _ = _deep(0)
    zero = m.map_weights(lambda w: 0 * w)
    said = _refusal(m, zero, 300, 0)
    assert "the component has zero norm: nothing to explain" in said and "0 on every sample" in said
    said = _refusal(zero, m, 300, 0)
    assert "the circuit is 0 on every sample drawn" in said and "too few samples" not in said


def test_the_cause_below_0_is_named_only_where_a_control_variate_ran():
    """The factor is the estimator's own record (raw variance over the kept), not a constant."""
    base = ts.inner(*_deep(1), method="sampled", samples=100, seed=0)

    def said(value, saved):
        raw = None if saved == 1.0 else np.full((4, 4, 1), saved)  # 1.0: no control variate ran
        est = Estimate(np.array([[value]] * 4), np.ones((4, 4, 1)), 100, 0, raw, product=1)
        from dataclasses import replace
        return _not_positive(replace(base, value=value, stderr=1.0, estimate=est), "<a, a>")

    assert "control variate" not in said(-2.0, 1.0)  # no control variate: nothing to blame on it
    assert "its variance by 40 instead" in said(-2.0, 0.025) and "its variance by 8 instead" in said(-2.0, 0.125)
    assert "control variate's correction:" in said(-2.0, 3.0)  # it reduced the variance, and still went below 0
    assert said(0.5, 0.025) is None
