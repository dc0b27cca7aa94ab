"""verify: exact verdicts only on exact numbers, every output on its own scale,
scale-safe float figures, degenerate measures, sampled verdicts that cannot
rest on too few or heavy-tailed samples, irrational exact weights, tol's
bound, bounded and safe formulas (the probe of /tmp/probe_verify)."""

from __future__ import annotations

import dataclasses
import time
from fractions import Fraction as Fr

import numpy as np
import pytest
import sympy

import tsalgebra as ts
from tsalgebra.verify import MIN_SAMPLES

x1, x2, x3, x4 = sympy.symbols("x1 x2 x3 x4")


def obj(*rows):
    return np.array(rows, dtype=object)


def _xy_exact():
    """x1 * x2 with exact (Fraction) weights."""
    return ts.Bilinear(obj([Fr(1), Fr(0)]), obj([Fr(0), Fr(1)]), obj([Fr(1)]))


# ------------------------------------------------------------ 1. exactness


@pytest.mark.parametrize("measure", [dict(cov=np.eye(2)), dict(cov=np.array([[1.0, 0.3], [0.3, 1.0]]))])
def test_a_float_covariance_makes_the_verdict_a_float_one(measure):
    """Failed before: "equal (exact arithmetic)", residual 0, for a circuit
    that differs by x1/1e9 (the float products were read as guessed rationals)."""
    circ = x1 * x2 + sympy.Rational(1, 10**9) * x1
    v = ts.verify(circ, _xy_exact(), **measure)
    assert not v.exact and v.verdict != "equal" and v.tolerance == 1e-9
    # |c - f|^2 / |f|^2 = 1e-18 E[x1^2] / E[x1^2 x2^2], below the float64 rounding of the figure (0 or 9e-16,
    # rounding): a float, within tol, not an exact 0
    assert isinstance(v.relative_residual, float) and 0 <= v.relative_residual < 1e-12
    assert v.verdict == "equal (within tolerance)"
    # exact=True: the floats as the rationals they store, the measure's included: exactly different
    e = ts.verify(circ, _xy_exact(), exact=True, **measure)
    assert e.exact and e.verdict == "different" and e.certificate == [-x1 / 10**9]
    assert e.relative_residual > 0 and e.relative_residual.is_Rational
    assert any("measure's float parameters" in n for n in e.notes)


def test_float_token_probabilities_make_the_verdict_a_float_one():
    tok = ts.Bilinear(obj([Fr(1), Fr(0), Fr(0), Fr(0)]), obj([Fr(0), Fr(0), Fr(1), Fr(0)]), obj([Fr(1)]))  # x1*x3
    circ = x1 * x3 + sympy.Rational(1, 10**9) * x1
    v = ts.verify(circ, tok, measure=ts.Tokens(2, 2, probs=np.array([0.5, 0.5])))
    assert not v.exact and v.verdict != "equal"
    assert ts.verify(circ, tok, measure=ts.Tokens(2, 2)).verdict == "different"  # uniform: exact numbers
    # exact=True with float probs (0.3 and 0.7 are not binary fractions): exact, up to scale
    s = ts.verify(3 * x1 * x3, tok, exact=True, measure=ts.Tokens(2, 2, probs=np.array([0.3, 0.7])))
    assert s.exact and s.verdict == "equal up to scale" and s.explained == 1 and s.scale == sympy.Rational(1, 3)


def test_a_mixed_model_is_not_exact():
    """Failed before: one Fraction weight among floats counted the model exact
    (and gave "equal (exact arithmetic)" for a circuit that differs)."""
    mixed = ts.Bilinear(obj([Fr(1), Fr(0)]), np.array([[0.0, 1.0]]), np.array([[1.0]]))
    assert not mixed.exact
    assert _xy_exact().exact
    v = ts.verify(x1 * x2 + sympy.Rational(1, 10**9) * x1, mixed)
    assert not v.exact and v.verdict != "equal"
    assert ts.from_sympy(sympy.Symbol("a") * x1**2, [x1]).exact  # symbolic weights stay exact


def test_object_arrays_of_floats_are_floats():
    """Failed before: exact, "different", residual -2.3e-16 (a sympy Float)
    for a circuit equal to the stored weights."""
    layer = ts.Bilinear(obj([0.1, 0.0]), obj([1.0, 0.0]), obj([1.0]))  # 0.1 x1^2, floats in object arrays
    assert not layer.exact
    q = Fr(0.1)
    stored = x1**2 * sympy.Rational(q.numerator, q.denominator)
    v = ts.verify(stored, layer)
    assert not v.exact and v.verdict == "equal (within tolerance)"
    assert isinstance(v.relative_residual, float) and v.relative_residual >= 0
    e = ts.verify(stored, layer, exact=True)
    assert e.exact and e.verdict == "equal" and e.relative_residual == 0
    assert ts.verify(x1**2 / 10, layer, exact=True).verdict == "equal up to scale"  # 1/10 is not 0.1's binary value


def test_an_exact_product_that_is_a_float_is_refused_not_guessed():
    from tsalgebra.verify import _figures

    with pytest.raises(ArithmeticError, match="float"):
        _figures(1.0000000000000002, Fr(1), Fr(1), True)


# ------------------------------------------------------------ 2. every output


def _two_scales():
    """(1e5 x1^2, x1 x2), float weights."""
    return ts.Bilinear(np.array([[1.0, 0], [1, 0]]), np.array([[1.0, 0], [0, 1]]), np.array([[1e5, 0], [0, 1]]))


@pytest.mark.parametrize("second", [0 * x1, -x1 * x2])
def test_a_wrong_small_output_is_different(second):
    """Failed before: "equal (within tolerance)" (whole-model residual 3e-11)."""
    v = ts.verify([1e5 * x1**2, second], _two_scales())
    assert v.verdict == "different"
    assert any("output 2" in n and "own norm" in n for n in v.notes)
    assert v.per_output["relative_residual"][1] >= 1


def test_outputs_on_their_own_scale_equal_and_up_to_scale():
    comp = _two_scales()
    assert ts.verify([1e5 * x1**2, x1 * x2], comp).verdict == "equal (within tolerance)"
    assert ts.verify([2e5 * x1**2, 2 * x1 * x2], comp).verdict == "equal up to scale (within tolerance)"
    assert ts.verify([2e5 * x1**2, x1 * x2], comp).verdict == "different"  # one output not at the common scale


def test_a_dead_output_is_judged_against_round_off():
    """Failed before: a dead component output and 1e-6 x1 in the circuit: "equal"."""
    dead = ts.Bilinear(np.array([[1.0, 0]]), np.array([[0.0, 1]]), np.array([[1.0], [0.0]]))  # (x1 x2, 0)
    assert ts.verify([x1 * x2, 0], dead).verdict == "equal (within tolerance)"
    assert ts.verify([x1 * x2, 1e-6 * x1], dead).verdict == "different"


def test_a_wrong_small_output_is_different_under_sampling():
    v = ts.verify([1e5 * x1**2, 0 * x1], _two_scales(), method="sampled", samples=500, seed=0)
    assert v.verdict == "different" and any("output 2" in n for n in v.notes)


# ------------------------------------------------------------ 3. overflow


@pytest.mark.parametrize("s", [1e-100, 1e100])
def test_figures_do_not_overflow(s):
    """Failed before: similarity 0 (1e100) or inf (1e-100), and 2 x twin "different"."""
    rng = np.random.default_rng(0)
    base = ts.Bilinear(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    twin = ts.symmetries.permute_hidden(0, [2, 0, 1])(base)
    f, c = base.replace(down=base.down * s), twin.replace(down=twin.down * s)
    v = ts.verify(c, f)
    assert v.verdict == "equal (within tolerance)" and v.similarity == pytest.approx(1, abs=1e-12)
    assert v.explained == pytest.approx(1, abs=1e-12)
    w = ts.verify(c.replace(down=c.down * 2), f)
    assert w.verdict == "equal up to scale (within tolerance)" and w.scale == pytest.approx(0.5)


# ------------------------------------------------------------ 4. support


def test_a_singular_covariance_says_the_verdict_holds_on_its_support():
    layer = ts.Bilinear(obj([Fr(1), Fr(0)]), obj([Fr(1), Fr(0)]), obj([Fr(1)]))  # x1^2
    cov = obj([Fr(1), Fr(0)], [Fr(0), Fr(0)])
    v = ts.verify(x1**2 + 5 * x2 + 7 * x2**2, layer, cov=cov)
    assert v.verdict == "equal" and any("support only" in n and "rank 1 of 2" in n for n in v.notes)
    assert "support only" in repr(v)
    full = ts.verify(x1**2, layer, cov=obj([Fr(1), Fr(0)], [Fr(0), Fr(2)]))
    assert not any("support" in n for n in full.notes)


def test_a_token_of_probability_zero_is_named():
    tl = ts.Bilinear(obj([Fr(1), Fr(0)]), obj([Fr(1), Fr(0)]), obj([Fr(1)]))  # x1^2 == x1 on one-hot
    v = ts.verify(x1 + 100 * x2, tl, measure=ts.Tokens(2, 1, probs=obj(Fr(1), Fr(0))))
    assert v.verdict == "equal"
    assert any("support only" in n and "token 1" in n and "x2" in n for n in v.notes)
    assert not any("support" in n for n in ts.verify(x1, tl, measure=ts.Tokens(2, 1)).notes)


# ------------------------------------------------------------ 5. sampled


@pytest.mark.parametrize("samples", [2, MIN_SAMPLES - 1])
def test_too_few_samples_are_refused(samples):
    """Failed before: samples=2 gave "equal" for a residual estimated at 1.37 +- 1.96."""
    dead = ts.Bilinear(np.array([[1.0, 0]]), np.array([[0.0, 1]]), np.array([[1.0], [0.0]]))
    with pytest.raises(ValueError, match=f"samples={samples}.*at least {MIN_SAMPLES}"):
        ts.verify([x1 * x2 + x1, 0], dead, method="sampled", samples=samples, seed=0)


def _depth3():
    rng = np.random.default_rng(1)

    def lay(d=2, h=3):
        return ts.Bilinear(rng.normal(size=(h, d)) / np.sqrt(d), rng.normal(size=(h, d)) / np.sqrt(d),
                           rng.normal(size=(d, h)) / np.sqrt(h), rng.normal(size=h) * .5, rng.normal(size=h) * .5)

    m = ts.Sequential(lay(), lay(), lay())
    first = m.layers[0]
    return m, ts.Sequential(first.replace(left=first.left + 1e-2 * np.array([[1.0, 0], [0, 0], [0, 0]])), *m.layers[1:])


@pytest.mark.parametrize("seed", [19, 38])
def test_a_heavy_tailed_estimate_is_not_equal(seed):
    """The true residual is 2.3e-4 (tol 1e-9).  Failed before: "equal (...;
    estimated)" at these seeds, with a HEAVY TAILS note beside it."""
    m, c = _depth3()
    assert ts.verify(c, m).verdict == "different"
    v = ts.verify(c, m, method="sampled", samples=1000, seed=seed)
    assert not v.verdict.startswith("equal")
    assert v.verdict == "different" or v.verdict.startswith("doubtful (")


def test_the_doubtful_verdict_is_labelled():
    m, c = _depth3()
    v = ts.verify(c, m, method="sampled", samples=1000, seed=19)
    assert v.verdict.startswith("doubtful (") and "heavy-tailed" in v.verdict and "estimated" in v.verdict
    assert any(n.startswith("doubtful:") for n in v.notes) and any("HEAVY TAILS" in n for n in v.notes)


# ------------------------------------------------------------ 6. irrationals


def _with_zero_weight(z):
    I = sympy.Integer
    return ts.Bilinear(obj([I(1), I(0)], [z, I(0)]), obj([I(1), I(0)], [I(0), I(1)]), obj([I(1), I(1)]))


def test_an_irrational_weight_that_is_zero_is_simplified():
    """Failed before: "different", with the zero certificate
    -sqrt(2)*x1*x2 - x1*x2 + x1*x2*sqrt(2*sqrt(2) + 3)."""
    z = sympy.sqrt(3 + 2 * sympy.sqrt(2)) - 1 - sympy.sqrt(2)  # == 0
    v = ts.verify(x1**2, _with_zero_weight(z))
    assert v.exact and v.verdict == "equal" and v.relative_residual == 0 and v.certificate is None


def test_an_irrational_weight_that_is_not_zero_is_different():
    z = sympy.sqrt(3 + 2 * sympy.sqrt(2)) - 1 - sympy.sqrt(2) + sympy.sqrt(2) / 10**6
    v = ts.verify(x1**2, _with_zero_weight(z))
    assert v.exact and v.verdict == "different"
    (cert,) = v.certificate
    assert cert == sympy.sqrt(2) / 10**6 * x1 * x2  # simplified: sqrt(3 + 2 sqrt(2)) denested


# ------------------------------------------------------------ 7. tol


@pytest.mark.parametrize("tol", [float("inf"), 1.0, 1e400, float("nan"), -1e-9])
def test_tol_is_bounded(tol):
    """Failed before: tol=inf made every circuit, even 0, "equal"."""
    with pytest.raises(ValueError, match="tol"):
        ts.verify(0 * x1, _xy_exact(), tol=tol)


def test_a_large_tol_below_one_is_taken():
    assert ts.verify(x1 * x2, _xy_exact(), exact=False, tol=0.5).verdict == "equal (within tolerance)"


# ------------------------------------------------------------ 8. formulas


def _float_layer():
    rng = np.random.default_rng(0)
    return ts.Bilinear(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)), rng.normal(size=(1, 2)))


@pytest.mark.parametrize("circuit", [(x1 + x2 + x3 + 1) ** 400, "(x1 + x2 + x3 + 1)**400", "2**(10**9) * x1",
                                     x1 ** (10**9), (x1 + x2 + x3 + 1) ** 30 * (x1 + x2 + x3 + 1) ** 30])
def test_unbounded_formulas_are_refused_at_once(circuit):
    """Failed before: the first did not return (sympy.Poly expanded it)."""
    t = time.perf_counter()
    with pytest.raises(ValueError, match="circuit output 0: .*refused"):
        ts.verify(circuit, _float_layer())
    assert time.perf_counter() - t < 2


def test_string_formulas_are_never_evaluated(tmp_path):
    """Failed before: the string went to sympy.sympify, which eval()s it: the file was written."""
    target = tmp_path / "written"
    with pytest.raises(ValueError, match="only numbers"):
        ts.verify(f"__import__('pathlib').Path({str(target)!r}).write_text('x') * 0 + x1", _float_layer())
    assert not target.exists()
    for bad in ("x1.real", "exp(x1)", "y * x1"):
        with pytest.raises(ValueError, match="circuit output 0"):
            ts.verify(bad, _float_layer())

    class Text:
        def __str__(self):
            return f"__import__('pathlib').Path({str(target)!r}).write_text('x') * 0 + x1"

    with pytest.raises((TypeError, ValueError)):
        ts.verify([Text()], _float_layer())
    assert not target.exists()


def test_string_formulas_still_read():
    layer = _xy_exact()
    assert ts.verify("x1*x2", layer).verdict == "equal"
    assert ts.verify(["x1 * x2 + 0*x1^2"], layer).verdict == "equal"
    a, b = sympy.symbols("a b")
    assert ts.verify("a*b", layer, symbols=[a, b]).verdict == "equal"


def test_a_mixed_model_has_a_float_similarity():
    """A model with one exact weight among floats is a float model to ts.inner
    and ts.similarity too (np.log of a Fraction raised once such a model
    stopped counting as exact)."""
    mixed = ts.Bilinear(obj([Fr(1), Fr(0)]), np.array([[0.0, 1.0]]), np.array([[1.0]]))
    floats = ts.Bilinear(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([[1.0]]))
    assert ts.similarity(mixed, floats).value == pytest.approx(1.0, abs=1e-12)


def test_a_doubtful_verdict_is_not_a_pass_on_the_command_line(tmp_path, monkeypatch, capsys):
    """Failed before: the command line exited 1 only for "different", so a
    doubtful estimate exited 0 like a pass."""
    import sys

    from tsalgebra.cli import main

    V = sys.modules["tsalgebra.verify"]  # the module (ts.verify is its function)

    model = ts.Bilinear(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([[1.0]]))
    path = tmp_path / "c.safetensors"
    ts.save(model, path)
    (tmp_path / "c.txt").write_text("x1*x2\n")
    real = V.verify

    def doubtful(*args, **kw):
        rep = real(*args, **kw)
        return dataclasses.replace(rep, verdict="doubtful (heavy-tailed samples; estimated)")

    assert main(["verify", str(tmp_path / "c.txt"), str(path), "--symbols", "x1 x2"]) == 0
    monkeypatch.setattr(V, "verify", doubtful)
    assert main(["verify", str(tmp_path / "c.txt"), str(path), "--symbols", "x1 x2"]) == 1
