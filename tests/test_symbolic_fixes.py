"""Fixes from the circuit-verification probe: float coefficients and the
attention scale taken exactly under exact arithmetic, top_eigen's input
checks, the verify command's formula files, --symbols and --tol, and a
circuit coefficient beyond float64 named as such."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import sympy

import tsalgebra as ts
from helpers import exit_code
from tsalgebra.io import save

x1, x2, x3 = sympy.symbols("x1 x2 x3")


def _rational(v: float) -> sympy.Rational:
    q = Fraction(v)
    return sympy.Rational(q.numerator, q.denominator)


# ------------------------------------------------ 1. float coefficients exact


def test_float_coefficients_split_without_rounding():
    """from_sympy split each float coefficient into float64 shares c/6 (1/6 is
    no binary fraction): exactify read the rounded shares, so even 1.0 was not
    1 and exact=True judged x1*x2*x3 + x1**3 'different' from itself."""
    written = 1.0 * x1 * x2 * x3 + 1.0 * x1**3
    floats = ts.from_sympy(written, [x1, x2, x3])
    assert not floats.exact and floats.tensor.dtype == np.float64  # float mode as before
    assert ts.to_sympy(ts.exactify(floats), [x1, x2, x3]) == [x1 * x2 * x3 + x1**3]
    comp = ts.from_sympy(x1 * x2 * x3 + x1**3, [x1, x2, x3])
    v = ts.verify(written, comp, exact=True)
    assert v.verdict == "equal" and v.relative_residual == 0 and v.certificate is None


def test_float_coefficient_is_the_exact_rational_of_its_value():
    """0.1 is the binary rational the float stores (not 1/10, not a rounded
    sixth), a sympy Float of higher precision its own exact value (not 1)."""
    got = ts.to_sympy(ts.exactify(ts.from_sympy(0.1 * x1 * x2 * x3 + 3 * x2, [x1, x2, x3])), [x1, x2, x3])
    assert got == [_rational(0.1) * x1 * x2 * x3 + 3 * x2]
    fine = sympy.Float("1.0000000000000000001", 30)
    got = ts.to_sympy(ts.exactify(ts.from_sympy(fine * x1 * x2, [x1, x2])), [x1, x2])
    assert got == [sympy.Rational(fine) * x1 * x2] and sympy.Rational(fine) != 1


# ------------------------------------------------ 2. attention scale exact


@pytest.mark.parametrize("scale", [1 / np.sqrt(2), 0.1, np.float32(0.3)])
def test_attention_scale_is_the_float_it_stores_in_exact_arithmetic(scale):
    """score_mask took Fraction(scale).limit_denominator() (470832/665857 for
    1/sqrt(2)), another number than the float exactify promises."""
    one = lambda *s: np.ones(s)  # noqa: E731
    attn = ts.BilinearAttention(one(1, 1, 1), one(1, 1, 1), one(1, 1, 1), one(1, 1, 1), one(1, 1, 1),
                                one(1, 1, 1), scale=scale, residual=True, n_ctx=2)
    mask = ts.exactify(attn).score_mask()
    assert mask.dtype == object
    scales = [v for v in mask[:-1].ravel() if v != 0]
    assert scales and all(type(v) is Fraction and v == Fraction(float(scale)) for v in scales)


# ------------------------------------------------ 3. top_eigen input checks


def _layer():
    return ts.Bilinear(np.array([[1.0, 2.0], [0.5, -1.0]]), np.array([[1.0, -1.0], [2.0, 1.0]]),
                       np.array([[1.0, 0.5], [-1.0, 2.0]]))


def test_top_eigen_refuses_a_k_that_is_no_integer():
    with pytest.raises(TypeError, match="k must be an integer.*2.5"):
        ts.circuits.top_eigen(_layer(), 0, 2.5)
    with pytest.raises(TypeError, match="k must be an integer"):
        ts.circuits.top_eigen(_layer(), 0, True)
    assert ts.circuits.top_eigen(_layer(), 0, np.int64(2)).k == 2


def test_top_eigen_refuses_a_bool_output_and_a_direction_not_finite():
    with pytest.raises(TypeError, match="output .*bool"):
        ts.circuits.top_eigen(_layer(), True, 1)
    with pytest.raises(TypeError, match="output .*bool"):
        ts.circuits.project(_layer(), np.bool_(False))
    for bad in ([np.nan, 1.0], [1.0, np.inf]):
        with pytest.raises(ValueError, match="output direction .*not finite"):
            ts.circuits.top_eigen(_layer(), bad, 1)
    assert ts.circuits.top_eigen(_layer(), [1.0, 0.0], 3).k == 3  # a finite direction as before


# ------------------------------------------------ 4. the verify command


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    d = tmp_path_factory.mktemp("sym")
    save(ts.Bilinear(np.array([[1.0, 1.0]]), np.array([[1.0, -1.0]]), np.array([[1.0]]), down_bias=np.array([3.0])),
         d / "square.safetensors")
    return d


def test_verify_reads_a_formula_file_with_a_byte_order_mark(square, capsys):
    bom = square / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfx1^2 - x2^2 + 3\r\n")
    code, out, err = exit_code(capsys, "verify", bom, square / "square.safetensors")
    assert code == 0 and "equal" in out, err


@pytest.mark.parametrize("names, why", [("α β", "not a name"), ("x1 lambda", "Python keyword"),
                                        ("True,x2", "Python keyword"), ("x1 1x", "not a name"),
                                        ("Integer x2", "reserved")])
def test_verify_checks_symbol_names_up_front(square, capsys, names, why):
    """Names the formula reader cannot take were accepted, then failed on a
    formula line (or in sympy) with no word of --symbols."""
    formulas = square / "f.txt"
    formulas.write_text("x1^2 - x2^2 + 3\n")
    code, out, err = exit_code(capsys, "verify", formulas, square / "missing.safetensors", "--symbols", names)
    assert code == 2 and out == "" and "--symbols" in err and why in err, err  # before the models are read


@pytest.mark.parametrize("tol", ["inf", "1e400", "nan", "1", "-1e-3"])
def test_verify_tol_is_a_finite_number_in_0_1(square, capsys, tol):
    formulas = square / "g.txt"
    formulas.write_text("x1^2 - x2^2 + 3\n")
    code, out, err = exit_code(capsys, "verify", formulas, square / "square.safetensors", "--tol", tol)
    assert code == 2 and "--tol" in err, err


def test_verify_tol_bound_is_the_librarys():
    from tsalgebra.cli import TOL_BELOW
    from tsalgebra.verify import MAX_TOL

    assert TOL_BELOW == MAX_TOL


def test_verify_tol_below_one_is_taken(square, capsys):
    formulas = square / "h.txt"
    formulas.write_text("x1^2 - x2^2 + 3\n")
    code, out, err = exit_code(capsys, "verify", formulas, square / "square.safetensors", "--tol", "0.5")
    assert code == 0 and "equal" in out, err


# ------------------------------------------------ 5. a coefficient beyond float64


def test_a_circuit_coefficient_beyond_float64_is_named():
    """Was: 'a weight too large or too small for float64 in a layer
    tsalgebra cannot rescale', from the inner product."""
    comp = ts.Bilinear(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]), np.array([[1.0]]))  # x1^2
    x = sympy.symbols("x1 x2")
    for circuit in (sympy.Float("1e400") * x[0] + x[0] ** 2, sympy.Integer(10) ** 400 * x[0] + x[0] ** 2):
        with pytest.raises(ValueError, match=r"output 0: the coefficient 1\.0+e\+400 of x1 .*beyond float64") as e:
            ts.verify(circuit, comp)
        assert "layer" not in str(e.value)
    with pytest.raises(ValueError, match="the coefficient .* of a in the formula is beyond float64"):
        ts.from_sympy(sympy.Float("1e400") * sympy.Symbol("a"), [sympy.Symbol("a")])


def test_verify_command_names_the_line_of_a_coefficient_beyond_float64(square, capsys):
    for text in ("1e308*1e308*x1 + x1^2", "(10^60)^64*x1 + x1^2"):
        huge = square / "huge.txt"
        huge.write_text(f"# a comment\n{text}\n")
        code, out, err = exit_code(capsys, "verify", huge, square / "square.safetensors")
        assert code == 1 and out == ""
        assert f"{huge}:2: the coefficient" in err and "beyond float64" in err and "layer" not in err, err
