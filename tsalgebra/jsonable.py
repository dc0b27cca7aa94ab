"""Values as strict JSON: the one converter behind every ``--json`` output and
every summary file the demos write.

:func:`jsonable` turns numpy arrays and scalars, Fractions, sympy numbers,
Paths and nested containers into JSON types; :func:`dumps` writes the result,
refusing NaN and Infinity (which strict JSON has no words for).  Numbers:

- an integer of magnitude up to 2^53 stays an integer; a larger one (a count
  of pairings can have hundreds of digits) becomes the nearest float, and
  one beyond the float range becomes ``{"log10": log10|v|, "sign": 1 or -1}``;
  a Fraction or sympy rational is carried the same way, as its float value;
- a NaN or infinite float, or a sympy nan or infinity, becomes null;
- any other real sympy number becomes its float value, a non-real one its text.

Anything else becomes its ``str``.  sympy is never imported here: a value can
only be a sympy number when sympy is already loaded.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from fractions import Fraction
from pathlib import PurePath
from typing import Any

import numpy as np

__all__ = ["jsonable", "dumps", "EXACT_INT_LIMIT"]

EXACT_INT_LIMIT = 2**53  # beyond it a float no longer holds every integer, and many JSON readers round


def _beyond_floats(numerator: int, denominator: int = 1) -> dict[str, float]:
    """numerator / denominator, too large for a float, by its decimal logarithm."""
    log10 = math.log10(abs(numerator)) - math.log10(denominator)
    return {"log10": log10, "sign": 1 if numerator > 0 else -1}


def _integer(v: int) -> int | float | dict[str, float]:
    if abs(v) <= EXACT_INT_LIMIT:
        return v
    try:
        return float(v)
    except OverflowError:
        return _beyond_floats(v)


def _rational(v: Fraction) -> float | dict[str, float]:
    try:
        return float(v)
    except OverflowError:
        return _beyond_floats(v.numerator, v.denominator)


def _real(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _sympy_number(v: Any) -> Any:
    """A sympy object as JSON, or ``NotImplemented`` when ``v`` is not a sympy number."""
    sympy = sys.modules.get("sympy")
    if sympy is None or not isinstance(v, sympy.Basic) or not v.is_number:
        return NotImplemented
    if v.is_Integer:
        return _integer(int(v))
    if v.is_Rational:
        return _rational(Fraction(int(v.p), int(v.q)))
    if v.is_extended_real is False:  # a complex number: complex infinity is not finite, the rest keep their text
        return None if v is sympy.zoo else str(v)
    try:  # nan and +-oo come back as non-finite floats, hence null
        return _real(float(v))
    except (TypeError, ValueError):  # not decidably real: its text keeps what it is
        return str(v)


def jsonable(value: Any) -> Any:
    """``value`` as JSON types (dict with str keys, list, str, int, float,
    bool, None), following the rules of the module docstring."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return _integer(int(value))
    if isinstance(value, (float, np.floating)):
        return _real(float(value))
    if isinstance(value, Fraction):
        return _rational(value)
    if isinstance(value, np.ndarray):  # a 0-d array is a scalar: tolist() gives the number itself
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    number = _sympy_number(value)
    return str(value) if number is NotImplemented else number


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps(jsonable(value))`` as strict JSON (no NaN or Infinity);
    ``kwargs`` pass to ``json.dumps`` (e.g. ``indent=2``)."""
    return json.dumps(jsonable(value), allow_nan=False, **kwargs)
