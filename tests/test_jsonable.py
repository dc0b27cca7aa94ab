"""The one JSON converter: every kind of number tsalgebra hands out, as strict JSON."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import sympy

from helpers import strict_json
from tsalgebra.jsonable import EXACT_INT_LIMIT, dumps, jsonable


def test_large_integers_never_become_long_digit_strings():
    assert jsonable(EXACT_INT_LIMIT) == EXACT_INT_LIMIT and isinstance(jsonable(EXACT_INT_LIMIT), int)
    big = 3**400  # 191 digits: a count of pairings can be this large
    assert jsonable(big) == float(big) and isinstance(jsonable(big), float)
    assert len(dumps(big)) < 30
    huge = -(7**1000)  # beyond the float range
    out = jsonable(huge)
    assert out["sign"] == -1 and out["log10"] == pytest.approx(1000 * math.log10(7), rel=1e-12)
    assert strict_json(dumps({"n": huge}))["n"]["log10"] == pytest.approx(845.098, abs=1e-3)
    assert jsonable(np.int64(-5)) == -5 and isinstance(jsonable(np.uint8(7)), int)
    assert jsonable(sympy.Integer(3**400)) == float(3**400)


def test_non_finite_floats_become_null():
    values = [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf"), sympy.nan, sympy.oo, -sympy.oo,
              sympy.zoo]
    assert jsonable(values) == [None] * len(values)
    assert strict_json(dumps(np.array([1.0, np.nan, -np.inf]))) == [1.0, None, None]


def test_fractions_and_sympy_numbers():
    assert jsonable(Fraction(1, 3)) == pytest.approx(1 / 3, rel=1e-16)
    assert jsonable(Fraction(10**400, 3))["log10"] == pytest.approx(400 - math.log10(3), rel=1e-12)
    assert jsonable(Fraction(1, 10**400)) == 0.0  # below the float range: zero, as float() rounds it
    assert jsonable(sympy.Rational(-2, 7)) == pytest.approx(-2 / 7, rel=1e-16)
    assert jsonable(4 * sympy.sqrt(65) / 65) == pytest.approx(4 / math.sqrt(65), rel=1e-15)
    assert jsonable(sympy.Float("0.25")) == 0.25
    assert jsonable(2 * sympy.I) == "2*I"  # not real: its text
    assert jsonable(sympy.Symbol("x") + 1) == "x + 1"  # not a number: its text


def test_numpy_arrays_scalars_and_containers():
    assert jsonable(np.array(2.5)) == 2.5  # a 0-d array is a number, not a list
    assert jsonable(np.arange(4).reshape(2, 2)) == [[0, 1], [2, 3]]
    assert jsonable(np.array([Fraction(1, 2), 3], dtype=object)) == [0.5, 3]
    assert jsonable(np.bool_(True)) is True and jsonable(np.float16(0.5)) == 0.5
    assert jsonable({1: (np.float32(1.5), [Path("/a/b"), None, "s"])}) == {"1": [1.5, ["/a/b", None, "s"]]}
    assert jsonable(np.complex128(1 + 2j)) == "(1+2j)"
    payload = {"values": np.eye(2), "count": 5**300, "ratio": Fraction(2, 3), "where": Path("x.png"),
               "bad": np.nan, "exact": sympy.Rational(1, 4)}
    assert strict_json(dumps(payload, indent=2)) == {"values": [[1.0, 0.0], [0.0, 1.0]], "count": float(5**300),
                                               "ratio": pytest.approx(2 / 3), "where": "x.png", "bad": None,
                                               "exact": 0.25}
