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
