"""verify's arguments: options that would change the question are refused
by name (each test fails before its fix)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import sympy

import tsalgebra as ts

X1 = sympy.Symbol("x1")
COMPONENT = ts.Linear(np.array([[Fraction(1), 0, 0, 0]], dtype=object))  # f(x) = x1, exactly


def test_a_constant_offset_is_never_equal():
    """centered=True passed through to the inner products: x1 + 5 was 'equal'
    to x1 in exact arithmetic, nothing said."""
    assert ts.verify(X1 + 5, COMPONENT).verdict == "different"
    for kw in ({"centered": True}, {"measure": ts.Tokens(2, 2), "centered": True}):
        with pytest.raises(ValueError, match="centered= is not an option of verify.*constants included"):
            ts.verify(X1 + 5, COMPONENT, **kw)


def test_per_output_and_a_non_boolean_exact_are_named():
    with pytest.raises(ValueError, match="per_output= is not an option of verify"):  # was an internal TypeError
        ts.verify(X1, COMPONENT, measure=ts.Tokens(2, 2), per_output=True)
    for bad in ("yes", 1):  # taken as True
        with pytest.raises(TypeError, match="exact must be True, False or None"):
            ts.verify(X1, COMPONENT, None, bad)
    assert ts.verify(X1, COMPONENT, None, np.bool_(True)).verdict == "equal"


@pytest.mark.parametrize("factor,power", [(1e200, "10^-600"), (1e-200, "10^600")])
def test_a_scale_beyond_float64_is_said_as_the_ratio(factor, power):
    """A component 1e600 times the circuit was said as the circuit's weights
    being 'that small' (10^-599 underflows), and the converse 'that large'."""
    rng = np.random.default_rng(0)
    circuit = ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3)))
    component = circuit.map_weights(lambda w: w * factor)  # three weight matrices: 1e600
    with pytest.raises((OverflowError, FloatingPointError)) as err:
        ts.verify(circuit, component)
    said = str(err.value)
    assert f"the circuit is about {power} times the component" in said and "weights are that" not in said, said
