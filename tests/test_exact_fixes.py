"""Exact values kept and printed: a from_sympy polynomial's exact
coefficients (``exact_tensor``) survive ``replace`` and a Sequential around it
(exactify), and a report whose exact figures run past Python's 4,300-digit
limit prints (repr, the verify command's "exact_figures") in a bounded form."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import sympy

import tsalgebra as ts
from tsalgebra.cli import main

x1, x2, x3 = sympy.symbols("x1 x2 x3")
# 0.1 is split among the 6 orderings of x1 x2 x3: its shares are no float64
WRITTEN = 0.1 * x1 * x2 * x3 + 3 * x2
EXACT = [sympy.Rational(Fraction(0.1).numerator, Fraction(0.1).denominator) * x1 * x2 * x3 + 3 * x2]


# ------------------------------------------- 1. exact_tensor kept by replace


def test_exact_coefficients_survive_replace_and_sequential():
    p = ts.from_sympy(WRITTEN, [x1, x2, x3])
    assert p.exact_tensor is not None
    renamed = p.replace(name="renamed")
    assert renamed.name == "renamed" and renamed.symbols == p.symbols
    assert renamed.exact_tensor is not None and np.array_equal(renamed.exact_tensor, p.exact_tensor)
    assert ts.to_sympy(ts.exactify(renamed), [x1, x2, x3]) == EXACT
    # the same floats (a dtype check) keep them; other values drop them
    assert p.replace(tensor=p.tensor.astype(np.float64)).exact_tensor is not None
    changed = p.replace(tensor=2 * p.tensor)
    assert changed.exact_tensor is None and changed.tensor.dtype == np.float64
    # inside a Sequential, exactify replaces the layer's tensor: the exact values are read
    seq = ts.Sequential(p)
    assert ts.to_sympy(ts.exactify(seq), [x1, x2, x3]) == EXACT
    assert ts.to_sympy(ts.exactify(ts.Sequential(renamed)), [x1, x2, x3]) == EXACT
    # saving stores floats only: refused or not, no crash beyond the layout's own TypeError
    for model in (renamed, seq):
        try:
            ts.save(model, "/nonexistent-dir-never-written/m.safetensors")
        except (TypeError, OSError, ValueError):
            pass


# ------------------------------------------ 2. exact figures past 4,300 digits


def _long_case() -> ts.Verification:
    """x1 against x1 + k x2 with k = 2t/(1-t^2), t = 10^-2200: 1 + k^2 is a
    square, so the figures stay rational, of about 4,400 and 8,800 digits."""
    t = sympy.Rational(1, 10**2200)
    k = 2 * t / (1 - t**2)
    comp = ts.from_sympy([x1], [x1, x2])
    return ts.verify(ts.from_sympy([x1 + k * x2], [x1, x2]), comp, exact=True)


def test_report_with_huge_exact_figures_prints():
    rep = _long_case()
    assert rep.verdict == "different" and rep.exact
    text = repr(rep)  # the certificate's coefficient has 4,401 digits: str() refused it
    assert len(text) < 2000 and "e-2200*x2" in text
    assert "relative residual 4.00000e-4400" in text  # not the float's 0
    figures = rep.exact_figures()
    assert all(len(v) < 200 for v in figures.values())
    assert figures["relative_residual"].startswith("4.00000000000000e-4400")
    # small exact figures print as before
    small = ts.verify(ts.from_sympy([x1 + x2 / 2], [x1, x2]), ts.from_sympy([x1], [x1, x2]), exact=True)
    assert small.exact_figures() == {k: str(getattr(small, k)) for k in
                                     ("similarity", "relative_residual", "explained", "scale")}
    assert f"similarity {float(small.similarity):.12g}," in repr(small)


def test_verify_command_prints_huge_exact_figures(tmp_path, capsys):
    ts.save(ts.Linear(np.array([[1.0, 0.0]])), tmp_path / "lin.safetensors")
    formula = tmp_path / "c.txt"
    formula.write_text("x1/(" + "*".join(["10^60"] * 74) + ")\n")  # scale 10^4440
    code = main(["verify", str(formula), str(tmp_path / "lin.safetensors"), "--exact", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    figures = json.loads(out)["exact_figures"]
    assert figures["scale"].startswith("1.00000000000000e+4440") and "4,441-digit" in figures["scale"]
    assert figures["similarity"] == "1" and figures["explained"] == "1"
