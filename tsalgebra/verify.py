"""Is this circuit that component?  A verdict with its evidence.

All figures come from one function-level inner product (by default the
component's own measure: tokens for a model that reads token ids, else the
Gaussian):
with <f,f>, <c,c>, <f,c> for the component f and the circuit c,

- similarity        <f,c> / sqrt(<f,f><c,c>)
- relative residual ||f - c||^2 / ||f||^2
- explained         <f,c>^2 / (<f,f><c,c>): the share of ||f||^2 captured by
                    the best multiple of c, which is scale = <f,c> / <c,c>.

With exact numbers throughout (every weight of both sides and the measure's
parameters: ints, Fractions, sympy rationals or other exact sympy numbers)
the verdict is exact: "equal", "equal up to scale" or "different", the last
with the residual polynomial as a certificate.  Where any number is a float
it is a tolerance verdict in float64 and says so (a float is never read as a
guessed rational); ``exact=True`` takes every float, the measure's included,
as the binary rational it stores.  A tolerance verdict judges every output
against its own norm as well as the whole: one output wrong beside a large
one is "different".  Under a measure that does not reach every input (a
singular covariance, a token of probability 0) the verdict holds on its
support only, and a note says so.

The three products come from one computation (:func:`tsalgebra.inner.relative_products`, at the
component's scale):
with ``method="sampled"`` one set of Monte Carlo samples gives all three, so
their errors cancel in the figures (three independent estimates read a
circuit equal to the component as 0.994 similar, "different").  The report
carries how its numbers were obtained (method, algorithm, exact, approximate
or estimated) and, for estimates, the standard errors and 95 % intervals of
the figures; an estimated "equal" means equal within the tolerance plus the
95 % sampling error, and says so; where only the interval reaches within
the tolerance and the samples are heavy-tailed (their error bar itself
doubtful) the verdict is "doubtful", not "equal".

The intervals are normal-theory, and cover about 95 % only where the
per-sample products are light-tailed: measured against exact figures (three
pairs each of three kinds of bilinear stacks, 100 seeds a pair, 500 to
10,000 samples) they covered 91-97 % at depth 1, 85-96 % at depth 2 and
55-94 % at depth 3.  The standard errors are right on average (their root
mean square matched the estimates' spread over seeds), but heavy tails make
the sample variance usually too small, and smallest where the estimate is
furthest off (it missed the rare large samples); no formula over the same
samples repairs that.  Most such estimates carry a HEAVY TAILS note (at
depth 3 60-95 % of them, at depth 2 14-60 %), but not all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import sympy

from .algorithms.sampled import FEW_SAMPLES, Z95
from .circuits import EigenCircuit, top_eigen
from .attention import BilinearAttention
from .components import Component, exact_entry
from .inner import _not_positive, relative_products
from .measure import Gaussian, Measure, Tokens, support_note
from .messages import counted
from .problem import InnerResult
from .problem import CostError, function_level, function_level_refusal
from .symbolic import default_symbols, from_sympy, to_sympy

__all__ = ["Verification", "verify", "exactify", "MIN_SAMPLES", "MAX_TOL"]

# The fewest Monte Carlo samples a sampled verdict takes: below it the normal
# 95 % interval and the heavy-tail check mean nothing (2 samples gave "equal"
# for a residual estimated at 1.37 +- 1.96); the estimator's own FEW_SAMPLES.
MIN_SAMPLES = FEW_SAMPLES
# tol is a relative residual: 0 <= tol < MAX_TOL (at 1 the zero circuit passes
# as "equal"; tol=inf made every circuit equal).
MAX_TOL = 1.0
# Relative to the largest output's squared norm, the floor under an output's
# own norm when each output is judged against it: an output that is zero in
# the component (a dead channel) is judged against the largest output's
# round-off, not against 0.
OUTPUT_FLOOR = float(np.finfo(float).eps)
# An exact zero test of an irrational sympy number: the size of expression it
# simplifies at most (sympy's equals/simplify, whose time grows with it), and
# the digits of the numeric test that first rules out a nonzero value.
ZERO_TEST_OPS = 400
ZERO_TEST_DIGITS = 50


@dataclass(frozen=True)
class Verification:
    """The report of :func:`verify`.  The whole-model figures (similarity,
    relative_residual, explained, scale) are sympy numbers in exact mode and
    floats otherwise; per-output figures are float arrays over the
    component's outputs; ``faithfulness`` lists (k, similarity, residual) for
    eigen-circuits as k grows.

    How the numbers were obtained: ``exact`` is exact arithmetic (rationals);
    ``method`` ("exact", "closure" or "sampled") and ``algorithm`` (the
    registered algorithm(s)) of the inner products; ``accuracy`` "exact" (an
    exact algorithm, in exact arithmetic or float64), "approximate"
    (closure: no error bar) or "estimated" (Monte Carlo).  For estimates
    ``stderr`` and ``interval`` map "similarity", "relative_residual" and
    "explained" to the standard error (the delta method over the means'
    covariance) and the 95 % interval: the estimate +- 1.96 stderr, and for
    the explained share (the similarity squared) the similarity's interval
    squared, which holds the true share whenever that interval holds the
    true similarity; their coverage is as the module says (about 95 % for
    one layer, less on deep stacks, where a HEAVY TAILS note is likely);
    ``samples`` and ``seed`` say which samples (one set for all three
    products); ``per_output`` then also holds "similarity_stderr" and
    "relative_residual_stderr"."""

    verdict: str
    exact: bool
    inner: str
    similarity: Any
    relative_residual: Any
    explained: Any
    scale: Any
    per_output: dict[str, np.ndarray]
    certificate: Any = None
    tolerance: float | None = None
    faithfulness: tuple[tuple[int, float, float], ...] = field(default=())
    method: str = "exact"
    algorithm: str = ""
    accuracy: str = "exact"
    stderr: dict[str, float] | None = None
    interval: dict[str, tuple[float, float]] | None = None
    samples: int = 0
    seed: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def estimated(self) -> bool:
        """True for a Monte Carlo estimate (it carries ``stderr``)."""
        return self.stderr is not None

    def __repr__(self) -> str:
        how = "exact arithmetic" if self.exact else f"floating point, tolerance {self.tolerance:g}"
        computed = self.method + (f" ({self.accuracy})" if self.accuracy != "exact" else "")
        if self.algorithm and self.algorithm != self.method:
            computed += f", {self.algorithm}"
        if self.samples:
            computed += f", {self.samples:,} samples" + (f" (seed {self.seed})" if self.seed is not None else "")
        lines = [f"verdict: {self.verdict} ({how}, {self.inner} inner product, {computed})"]
        if self.stderr is not None:
            se, ci = self.stderr, self.interval or {}
            lines.append("  " + ", ".join(
                f"{name.replace('_', ' ')} {float(getattr(self, name)):.{digits}g} ± {se[name]:.2g} "
                f"(95 % [{ci[name][0]:.{digits}g}, {ci[name][1]:.{digits}g}])"
                for name, digits in (("similarity", 8), ("relative_residual", 4), ("explained", 6)))
                + f", best scale {float(self.scale):.6g}")
        else:
            lines.append(f"  similarity {_figure(self.similarity, 12)}, relative residual "
                         f"{_figure(self.relative_residual, 6)}, explained {_figure(self.explained, 6)}, "
                         f"best scale {_figure(self.scale, 6)}")
        if self.certificate is not None:
            cert = self.certificate_text()
            text = "[" + ", ".join(cert) + "]" if isinstance(self.certificate, list) else cert[0]
            lines.append(f"  certificate (component - circuit): {text}")
        if self.faithfulness:
            lines.append("  faithfulness as k grows: " + ", ".join(f"k={k}: {s:.4f}" for k, s, _ in self.faithfulness))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def certificate_text(self) -> list[str]:
        """The certificate's polynomials as text, one per output (:func:`bounded_text`)."""
        cert = self.certificate
        return [bounded_text(c) for c in (cert if isinstance(cert, list) else [cert])]

    def exact_figures(self) -> dict[str, str]:
        """The whole-model figures as text (:func:`bounded_text`: exactly as
        sympy writes them, a number too long to print rounded to 15 digits)."""
        return {k: bounded_text(getattr(self, k)) for k in ("similarity", "relative_residual", "explained", "scale")}


# Exact numbers whose numerator or denominator has more digits than this are
# printed rounded (:func:`bounded_text`): Python refuses to print an int of
# over 4,300 digits, and such a figure is no reading matter.
PRINT_DIGITS = 1000
_PRINT_BITS = int(PRINT_DIGITS / math.log10(2))  # a bound on bit_length below which an int has <= PRINT_DIGITS digits


def _digit_count(n: int) -> int:
    """The decimal digits of int ``n``, without printing it."""
    n = abs(n)
    d = int(n.bit_length() * math.log10(2))
    return d + 1 if n >= 10**d else max(d, 1)


def _long_rationals(x: Any) -> list[Any]:
    """The sympy rationals in ``x`` with a numerator or denominator too long to print."""
    if isinstance(x, (int, Fraction)) and not isinstance(x, bool):
        x = sympy.Rational(x)
    if not isinstance(x, sympy.Basic):
        return []
    return [r for r in x.atoms(sympy.Rational)
            if max(abs(int(r.p)).bit_length(), int(r.q).bit_length()) > _PRINT_BITS
            and max(_digit_count(int(r.p)), _digit_count(int(r.q))) > PRINT_DIGITS]


def bounded_text(x: Any, digits: int = 15) -> str:
    """``str(x)`` for a figure or certificate polynomial, where every exact
    number in it is short; an exact number of over ``PRINT_DIGITS`` digits
    (in its numerator or denominator) is written rounded to ``digits``
    significant digits instead, saying how long its exact form is (str
    fails beyond 4,300 digits)."""
    long = _long_rationals(x)
    if not long:
        return str(x)
    x = sympy.sympify(x) if not isinstance(x, sympy.Basic) else x
    size = max(_digit_count(int(v)) for r in long for v in (r.p, r.q))
    if x.is_number:
        number = str(sympy.N(x, digits)).replace("E", "e")  # mpmath writes 1.0E+4440 at 15 digits
        return f"{number} (rounded; the exact form holds a {size:,}-digit integer)"
    return str(x.xreplace({r: sympy.Float(sympy.N(r, digits), digits) for r in long}))


def _figure(x: Any, digits: int) -> str:
    """A figure of the report to ``digits`` significant digits: as float64,
    or, where an exact figure is beyond float64 (its float infinite, or 0
    though the figure is not), as sympy rounds it."""
    try:
        v = float(x)
    except OverflowError:  # a Fraction beyond float64
        v = math.inf
    if isinstance(x, (int, Fraction)) and not isinstance(x, bool):
        x = sympy.Rational(x)
    if isinstance(x, sympy.Basic) and (not math.isfinite(v) or v == 0) and x.is_number and x.is_finite \
            and x.is_zero is not True:
        try:
            return str(sympy.N(x, digits))
        except (TypeError, ValueError):
            pass
    return f"{v:.{digits}g}"


def _exact_value(v: Any) -> Any:
    """``v`` as an exact number: a float (Python's, numpy's) as the Fraction
    it stores, a sympy Float, or the Floats inside a sympy expression, as the
    sympy Rational they store (never a guessed "nice" rational); exact
    numbers as they are."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return Fraction(float(v))
    if isinstance(v, sympy.Basic) and v.has(sympy.Float):
        return v.xreplace({x: sympy.Rational(x) for x in v.atoms(sympy.Float)})
    return v


def _fractions(a: np.ndarray) -> np.ndarray:
    if a.dtype != object:
        return np.vectorize(lambda v: Fraction(float(v)), otypes=[object])(a)
    return np.vectorize(_exact_value, otypes=[object])(a) if not _exact_numbers(a) else a


def exactify(model: Component) -> Component:
    """The same model with every float weight, and every float entry of an
    object array, replaced by the exact rational it stores (a binary
    fraction), so exact verdicts apply to float weights."""
    return model.map_weights(_fractions)


def _strict_entry(v: Any) -> bool:
    """An exact number or a symbolic entry without floats in it (a symbolic
    entry holding a float, 1.5*a, is exact to the model's arithmetic, not to
    a verdict)."""
    return exact_entry(v) and not (isinstance(v, sympy.Basic) and v.has(sympy.Float))


def _exact_numbers(a: np.ndarray | None) -> bool:
    """True when the array holds exact numbers only (None: nothing to hold)."""
    return a is None or (a.dtype == object and all(_strict_entry(v) for v in a.flat))


def _model_exact(model: Component) -> bool:
    """Every weight of ``model`` exact (a mixed model, float arrays beside
    exact ones or float entries in object arrays, is not), and no rotary
    embedding (:func:`_rotary`)."""
    return _rotary(model) is None and all(_exact_numbers(w) for w in model.weights())


def _rotary(model: Component) -> BilinearAttention | None:
    """The first attention layer that rotates by position: its cosines and
    sines are computed in float64, irrational numbers that no exact
    arithmetic holds (exact=True failed after its whole run)."""
    return next((layer for layer in model.layers if isinstance(layer, BilinearAttention)
                 and layer.rotary_base is not None), None)


def _symbolic(model: Component) -> list[str]:
    """The names of the symbols that weights of ``model`` hold (sympy
    expressions in symbols: only exact arithmetic can carry them)."""
    names: set[str] = set()
    for w in model.weights():
        if w.dtype == object:
            for v in w.flat:
                if isinstance(v, sympy.Basic) and v.free_symbols:
                    names.update(str(x) for x in v.free_symbols)
    return sorted(names)


def _float_model(model: Component, side: str) -> Component:
    """``model`` with every weight as float64 (a float verdict computes in
    float64 throughout); ValueError naming ``side`` where a weight is
    symbolic or beyond float64."""
    if all(w.dtype != object for w in model.weights()):
        return model
    names = _symbolic(model)
    if names:
        raise ValueError(f"the {side} has symbolic weights ({', '.join(names[:6])}) beside floats: a float verdict "
                         "cannot carry symbols; exact=True takes its floats as the rationals they store")
    try:
        with np.errstate(over="ignore"):
            out = model.map_weights(lambda w: np.asarray(w, dtype=float) if w.dtype == object else w)
    except OverflowError:
        out = None
    if out is None or not all(np.all(np.isfinite(w)) for w in out.weights()):
        raise ValueError(f"the {side} has an exact weight beyond float64 (as a float it is infinite): exact=True "
                         "compares it exactly, or rescale it")
    return out


# --------------------------------------------------------------- measures


def _law(inner: str, measure: Measure | None, kw: dict[str, Any]) -> Measure | None:
    """The measure the products average over, as given (None: the symmetric
    product, or N(0, I) or uniform tokens, whose numbers are exact)."""
    if measure is not None or inner != "gaussian":
        return measure
    if kw.get("mean") is None and kw.get("cov") is None:
        return None
    return Gaussian(kw.get("mean"), kw.get("cov"))


def _law_exact(law: Measure | None) -> bool:
    """Every parameter of the measure an exact number (N(0, I) and uniform tokens are)."""
    if law is None:
        return True
    if isinstance(law, Gaussian):
        return _exact_numbers(law.mean) and _exact_numbers(law.cov)
    if isinstance(law, Tokens):
        return _exact_numbers(law.probs)
    return False


def _law_as(law: Measure, exact: bool) -> Measure:
    """``law`` with its parameters as exact numbers (the rationals its floats
    store; token probabilities then renormalised exactly, each row by its
    exact sum) or as float64."""
    if isinstance(law, Gaussian):
        conv = (lambda a: None if a is None else _fractions(a)) if exact else (
            lambda a: None if a is None else np.asarray(a, dtype=float))
        try:
            return Gaussian(conv(law.mean), conv(law.cov), positions=law.positions, dim=law.dim)
        except ValueError as exc:
            if not exact:
                raise
            raise ValueError(f"exact=True takes the measure's floats as the rationals they store, and so taken "
                             f"{exc} (float round-off); give the measure exact numbers (Fractions), or exact=False"
                             ) from None
    if isinstance(law, Tokens):
        if law.probs is None:
            return law
        if not exact:
            return Tokens(law.vocab, law.n_ctx, np.asarray(law.probs, dtype=float))
        p = _fractions(np.asarray(law.probs))
        rows = p.reshape(-1, law.vocab)
        rows = np.array([[v / sum(row) for v in row] for row in rows], dtype=object).reshape(p.shape)
        return Tokens(law.vocab, law.n_ctx, rows)
    raise TypeError(f"verify cannot convert the parameters of {law!r}")


def _input_symbols(symbols: Sequence[Any] | None, width: int) -> tuple[sympy.Symbol, ...]:
    """The circuit's input symbols, checked: sympy Symbols, distinct, one per input."""
    if symbols is None:
        return tuple(default_symbols(width))
    if isinstance(symbols, (str, sympy.Basic)) or not isinstance(symbols, Sequence):
        raise TypeError(f"symbols must be a list of sympy Symbols, got {type(symbols).__name__} "
                        "(e.g. symbols=sympy.symbols('a b c'))")
    xs = tuple(symbols)
    for x in xs:
        if not isinstance(x, sympy.Symbol):
            raise TypeError(f"symbols must be sympy Symbols, got {type(x).__name__} {x!r} "
                            "(e.g. symbols=sympy.symbols('x1 x2'))")
    dup = sorted({str(x) for x in xs if xs.count(x) > 1})
    if dup:
        raise ValueError(f"symbols names {dup} more than once; one distinct symbol per input")
    if len(xs) != width:
        raise ValueError(f"symbols names {counted(len(xs), 'input')}, the component has {width}")
    return xs


def _formula(expr: Any, k: int, xs: Sequence[sympy.Symbol]) -> sympy.Expr:
    """Output k of a formula circuit as a sympy expression.  A string is read
    as the command line reads a formula file's line (:func:`tsalgebra.formulas.parse_formulas`):
    numbers, the input names and + - * / ^ ** ( ) only, its size bounded
    before sympy sees it, never evaluated as Python; anything else must
    already be a sympy expression or a number (never converted through its
    text)."""
    if isinstance(expr, str):
        from .formulas import parse_formulas

        names = [str(x) for x in xs]
        try:
            found = parse_formulas(expr, names, f"circuit output {k}")
        except ValueError as exc:
            why = str(exc).replace("(see --symbols)", "(see symbols=)")
            for prefix in (f"circuit output {k}:1: ", f"circuit output {k}: "):
                why = why[len(prefix):] if why.startswith(prefix) else why
            shown = repr(expr) if len(expr) <= 60 else repr(expr[:60]) + "..."
            raise ValueError(f"circuit output {k}: cannot read {shown} as a formula: {why}") from None
        if len(found) != 1:
            raise ValueError(f"circuit output {k}: {len(found)} formulas in one string; give one string per output")
        # the parser's symbols are plain sympy.Symbol(name): the caller's (same names) are used
        return found[0].xreplace({sympy.Symbol(str(x)): x for x in xs})
    try:
        e = sympy.sympify(expr, strict=True)  # numbers and sympy objects only: no text is parsed (or evaluated)
    except (sympy.SympifyError, SyntaxError, TypeError) as exc:
        raise ValueError(f"circuit output {k}: cannot read {type(expr).__name__} {str(expr)[:60]!r} as a formula "
                         f"({str(exc)[:200]}); give a sympy expression, a number, or a string of numbers, the "
                         "input names and + - * / ^ ( )") from None
    if not isinstance(e, sympy.Expr):
        raise ValueError(f"circuit output {k}: {e} is not a formula but a {type(e).__name__}; give a polynomial")
    return e


def _bound_formula(e: sympy.Expr, xs: tuple[sympy.Symbol, ...], k: int) -> int:
    """The degree and the monomials of the expansion of output k, bounded
    before anything expands it (a short formula, (x1 + x2 + x3 + 1)**400,
    expanded for ever): the command line's bounds
    (:data:`tsalgebra.formulas.FORMULA_MAX_DEGREE`, ``FORMULA_MAX_TERMS``), read
    off the formula's tree.  Subtrees without inputs are constants; what is
    not a polynomial is left to :func:`_check_polynomial`.  Returns the
    degree as written (at least that of the expansion)."""
    from .formulas import FORMULA_MAX_DEGREE, FORMULA_MAX_TERMS

    inputs = set(xs)
    n = len(xs)

    def monomials(degree: int) -> float:
        return float(math.comb(n + degree, degree))

    def bounded(degree: int, terms: float) -> tuple[int, float]:
        if degree > FORMULA_MAX_DEGREE:
            written = f"{degree:,}" if degree <= _SHOWN_DEGREE else f"over {_SHOWN_DEGREE:,}"
            raise ValueError(f"circuit output {k}: refused: degree {written} exceeds {FORMULA_MAX_DEGREE} (the bound "
                             "on a circuit's formula, as the command line's)")
        terms = min(terms, monomials(degree))
        if terms > FORMULA_MAX_TERMS:
            raise ValueError(f"circuit output {k}: refused: its expansion may hold {terms:.3g} monomials (more than "
                             f"{FORMULA_MAX_TERMS:,}, the bound on a circuit's formula, as the command line's)")
        return degree, terms

    def walk(node: sympy.Basic) -> tuple[int, float]:
        if node in inputs:
            return 1, 1.0
        if not (node.free_symbols & inputs):
            return 0, 1.0
        if node.is_Add:
            parts = [walk(a) for a in node.args]
            return bounded(max(d for d, _ in parts), sum(t for _, t in parts))
        if node.is_Mul:
            degree, terms = 0, 1.0
            for a in node.args:
                d, t = walk(a)
                degree, terms = bounded(degree + d, terms * t)
            return degree, terms
        if node.is_Pow and node.exp.is_Integer and node.exp >= 0:
            d, t = walk(node.base)
            # the degree as written (x^400 is 'degree 400'), up to a size any message can show
            power = int(node.exp) if node.exp <= _SHOWN_DEGREE else _SHOWN_DEGREE + 1
            if d * power > FORMULA_MAX_DEGREE:
                bounded(d * power, 1.0)
            grown = math.inf if power * math.log(max(t, 1.0)) > 700 else t ** power
            return bounded(d * power, min(grown, monomials(d * power)))
        return 0, 1.0  # not a polynomial in the inputs: _check_polynomial says so

    return walk(e)[0]


_SHOWN_DEGREE = 10**12


def _bound_tensor(degrees: Sequence[int], width: int) -> None:
    """The circuit's padded tensor, (outputs+1) (inputs+1)^k entries for the
    highest degree k as written, within :data:`tsalgebra.symbolic.MAX_ENTRIES`
    before anything expands the formulas (the bound from_sympy applies after
    expanding them: (x1 + x2 + x3 + 1)^60 took 10 s to be refused)."""
    from .symbolic import MAX_ENTRIES

    k = max([1, *degrees])
    entries = (len(degrees) + 1) * (width + 1) ** k
    if entries > MAX_ENTRIES:
        out = degrees.index(max(degrees))
        raise ValueError(f"circuit output {out}: refused: degree {k} (as written) over {counted(width, 'input')} and "
                         f"{counted(len(degrees), 'output')} is a padded tensor of {entries:.3g} entries ((outputs+1) "
                         f"(inputs+1)^degree), above the limit of {MAX_ENTRIES:,}; symbolic verification is for small "
                         "circuits")


def not_finite(e: sympy.Expr, given: Any = None) -> str | None:
    """Why the formula ``e`` is not finite, in words, or None; ``given``: the
    formula as its writer wrote it (a string), named instead of sympy's
    reading, where 3/0 reads as "zoo" (complex infinity) and 0/0 as "nan"."""
    said = repr(given) if isinstance(given, str) else None
    if e.has(sympy.zoo):
        return f"{said + ' ' if said else ''}divides by zero (an infinite or undefined coefficient)"
    if e.has(sympy.nan):
        return (f"{said or e} is undefined (0/0, or infinity minus infinity: an infinite or undefined "
                "coefficient)")
    if e.has(sympy.oo, -sympy.oo):
        return f"{said or e} has an infinite or undefined coefficient (infinity)"
    return None


def _check_polynomial(e: sympy.Expr, xs: tuple[sympy.Symbol, ...], k: int, given: Any = None) -> None:
    """Output k, checked to be a polynomial in ``xs`` with finite real
    coefficients (anything else would fail deep in sympy or numpy, or turn
    into NaN); ``given``: the formula as the caller wrote it."""
    why = not_finite(e, given)
    if why is not None:
        raise ValueError(f"circuit output {k}: {why}")
    if not e.is_polynomial(*xs):
        raise ValueError(f"circuit output {k}: {e} is not a polynomial in {', '.join(map(str, xs))} "
                         "(a circuit is a polynomial: no functions, roots or division by an input)")
    coeffs = sympy.Poly(e, *xs).coeffs() if xs else [e]
    bad = [c for c in coeffs if not (c.is_real and c.is_finite)]
    if bad:
        raise ValueError(f"circuit output {k}: the coefficient {bad[0]} of {e} is not a finite real number")


def _as_model(circuit: Any, component: Component, symbols: Sequence[sympy.Symbol] | None) -> Component:
    if isinstance(circuit, Component):
        return circuit
    if isinstance(circuit, (sympy.Basic, list, tuple, str)):
        xs = _input_symbols(symbols, component.in_features)
        exprs = [_formula(c, k, xs) for k, c in enumerate(circuit if isinstance(circuit, (list, tuple)) else [circuit])]
        stray = set().union(*(e.free_symbols for e in exprs)) - set(xs)
        if stray:
            # same names, other assumptions (sympy.symbols('x1', real=True)): different symbols to sympy
            alike = sorted(str(x) for x in stray if str(x) in {str(y) for y in xs})
            if alike:
                raise ValueError(f"the circuit's symbols {alike} carry assumptions (e.g. real=True) that the inputs "
                                 f"{list(map(str, xs))} lack, so sympy holds them distinct: declare them without "
                                 "assumptions, or pass the circuit's own symbols as symbols=[...] in input order")
            raise ValueError(f"the circuit uses symbols {sorted(map(str, stray))} that are not inputs {list(map(str, xs))}; "
                             "pass symbols=[...] in input order")
        if len(exprs) != component.out_features:  # before anything is expanded
            raise ValueError(f"the circuit has {counted(len(exprs), 'output')}, the component "
                             f"{component.out_features}")
        given = list(circuit) if isinstance(circuit, (list, tuple)) else [circuit]
        _bound_tensor([_bound_formula(e, xs, k) for k, e in enumerate(exprs)], len(xs))
        for k, e in enumerate(exprs):
            _check_polynomial(e, xs, k, given[k])
        return from_sympy(exprs, xs)
    raise TypeError(f"a circuit is a sympy formula, a list of formulas or a tsalgebra model, not {type(circuit).__name__}")


def _exact_number(v: Any) -> sympy.Expr:
    """A product of exact arithmetic as a sympy number; a float there would be
    a wrong exact figure (it used to become a guessed rational): refused."""
    if isinstance(v, Fraction):
        return sympy.Rational(v.numerator, v.denominator)
    if isinstance(v, (float, np.floating)) or (isinstance(v, sympy.Basic) and v.has(sympy.Float)):
        raise ArithmeticError(f"an exact product came out as a float ({v!r}): some number in it was not exact; "
                              "exact=False for a tolerance verdict")
    return sympy.sympify(v, strict=True) if not isinstance(v, sympy.Basic) else v


def _is_zero(x: Any, what: str) -> bool:
    """Whether the exact number ``x`` is 0, decided exactly: a rational at
    once; an irrational (sympy's sqrt(3 + 2 sqrt(2)) - 1 - sqrt(2)) by a
    numeric test that rules out what is plainly nonzero, then by sympy's
    simplification (``equals``), bounded in size (:data:`ZERO_TEST_OPS`).
    ArithmeticError naming ``what`` where it cannot be decided."""
    x = sympy.sympify(x)
    if x.is_Rational:
        return bool(x == 0)
    if x.is_zero is not None and not x.free_symbols:
        return bool(x.is_zero)
    if x.free_symbols:  # symbolic weights: zero as an expression in their symbols
        e = sympy.expand(x)
        if e == 0:
            return True
        if sympy.count_ops(e) > ZERO_TEST_OPS:
            raise ArithmeticError(f"cannot decide whether the {what} {str(e)[:80]} is zero within the bound of "
                                  f"{ZERO_TEST_OPS} operations")
        return bool(sympy.simplify(e) == 0)
    value = x.evalf(ZERO_TEST_DIGITS)
    if value.is_Number and abs(value) > sympy.Float(10) ** (10 - ZERO_TEST_DIGITS):
        return False
    if sympy.count_ops(x) > ZERO_TEST_OPS:
        raise ArithmeticError(f"cannot decide exactly whether the {what} (about {sympy.N(x, 3)}) is zero: an "
                              f"expression of more than {ZERO_TEST_OPS} operations; exact=False for a tolerance verdict")
    decided = x.equals(0)
    if decided is None:
        decided = sympy.simplify(sympy.sqrtdenest(sympy.radsimp(x))) == 0 or None
    if decided is None:
        raise ArithmeticError(f"cannot decide exactly whether the {what} (0 to {ZERO_TEST_DIGITS} digits) is zero: "
                              "sympy's simplification is inconclusive; exact=False for a tolerance verdict")
    return bool(decided)


def _scaled_ratios(*values: Any) -> tuple[Any, ...]:
    """The values over the largest magnitude among them (per output for
    arrays): figures formed from these ratios neither overflow nor underflow
    where the products themselves are finite (<f,f> near 1e154 squared to inf,
    and 1e-200 to 0)."""
    arrs = [np.asarray(v, dtype=float) for v in values]
    top = np.max(np.abs(np.stack(arrs)), axis=0)
    top = np.where(top > 0, top, 1.0)
    return tuple(a / top for a in arrs)


def _figures(ff: Any, cc: Any, fc: Any, exact: bool) -> tuple[Any, Any, Any, Any]:
    if exact:
        ff, cc, fc = (_exact_number(v) for v in (ff, cc, fc))
        sim = sympy.simplify(fc / sympy.sqrt(ff * cc)) if ff != 0 and cc != 0 else sympy.nan
        return sim, (ff + cc - 2 * fc) / ff, (fc**2 / (ff * cc) if cc != 0 else 0), (fc / cc if cc != 0 else 0)
    ff, cc, fc = (np.asarray(v, dtype=float) for v in (ff, cc, fc))
    a, b, ab = _scaled_ratios(ff, cc, fc)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sim = ab / (np.sqrt(a) * np.sqrt(b))
        residual = ((a + b) - 2 * ab) / a
        explained = np.where(cc > 0, sim * sim, 0.0)
        scale = np.where(cc > 0, fc / cc, 0.0)
    return sim, np.maximum(residual, 0.0), explained, scale


def _misfits(pf: np.ndarray, pc: np.ndarray, pfc: np.ndarray, scale: float, tol: float) -> list[tuple[int, float]]:
    """The outputs k whose own residual ||f_k - scale c_k||^2 exceeds tol
    times their own squared norm ||f_k||^2, that norm floored at
    :data:`OUTPUT_FLOOR` times the largest output's (a dead output is judged
    against round-off, not 0): (k, that relative residual) each."""
    pf, pc, pfc = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (pf, pc, pfc))
    a, b, ab = _scaled_ratios(pf, pc, pfc)  # per output: finite where the products are
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        num = a - 2 * scale * ab + scale * scale * b  # ||f_k - s c_k||^2 over the output's largest product
        top = np.max(np.abs(np.stack([pf, pc, pfc])), axis=0)
        own = np.maximum(pf, OUTPUT_FLOOR * float(np.max(pf)))  # the floored squared norm
        rel = num / (own / np.where(top > 0, top, 1.0))
    rel = np.where(own > 0, rel, np.where(num > 0, np.inf, 0.0))
    return [(k, float(r)) for k, r in enumerate(rel) if not r <= tol]


def _misfit_note(misfits: list[tuple[int, float]], tol: float, kind: str) -> str:
    shown = ", ".join(f"output {k + 1}: {r:.3g}" for k, r in misfits[:6]) + (" ..." if len(misfits) > 6 else "")
    return (f"not {kind}: the whole-model figure is within tol, but {counted(len(misfits), 'output')} "
            f"{'is' if len(misfits) == 1 else 'are'} not within tol ({tol:g}) of {'its' if len(misfits) == 1 else 'their'} "
            f"own norm ({shown}, relative residual against the output's own squared norm); each output is judged "
            "on its own scale")


# A float64 relative residual (or unexplained share) this small can be
# rounding alone: each product sums many float64 terms, and the residual
# <f,f> - 2<f,c> + <c,c> cancels them.  A tol below it can call a circuit
# equal to the component "different" (a note says so, and that exact=True
# decides in exact arithmetic).
FLOAT_ROUNDING = 1e-12


# The float64 rounding of a figure computed from sample means, per log2(n) + 4
# of the pairwise sums (as the Monte Carlo cosine's own floor): on a circuit
# equal to the component the measured spread of the residual is 0, and its
# rounding is all the error left.
ROUNDING = 2 * float(np.finfo(float).eps)


def _products(f: Component, c: Component, inner: str, kw: dict[str, Any], per_output: bool
              ) -> tuple[InnerResult, InnerResult, InnerResult]:
    """(<f,f>, <c,c>, <f,c>) from one computation where the algorithm gives
    all three (closure; Monte Carlo: one set of samples), as
    :func:`tsalgebra.similarity` plans them; else the self-products beside it.
    All three divided by the square of f's scale (every figure is a ratio
    of them): weights of 1e160 overflowed the products, not the figures."""
    try:
        fc, ff, cc = relative_products(f, c, inner, per_output=per_output, **kw)
    except CostError as exc:  # its alternatives as verify takes them
        raise function_level_refusal(exc) from None
    except (OverflowError, FloatingPointError) as exc:
        said = str(exc).replace("b is about", "the circuit is about").replace("times a", "times the component")
        raise type(exc)(said.replace("<b, b> / <a, a>", "the ratio of their norms")
                        + ": they differ by that factor, which float64 cannot express") from None
    return ff, cc, fc


def _scales(ff: InnerResult, cc: InnerResult, fc: InnerResult) -> tuple[float, float]:
    """(s_f^2, s_c^2): the squared canonical scales of a joint Monte Carlo
    estimate's models, read back from the reported values (the means times
    them)."""
    m = np.asarray(fc.estimate.means, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (float(np.sum(ff.value)) / float(np.sum(m[1])), float(np.sum(cc.value)) / float(np.sum(m[2])))


def _estimated_residual(est: Any, r: float, floor: float | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel, the relative residual |f' - r c'|^2 / |f'|^2 of a joint
    Monte Carlo estimate of the canonical models f', c' (r: the multiple of
    c' compared, s c_scale / f_scale for the multiple s of c) and its
    standard error by the delta method over the means' covariance; with
    ``floor``, each channel's |f'|^2 floored at that share of the largest
    (a dead output judged against round-off, not 0).

    Per sample the numerator is D + 2 (1 - r) ab + (r^2 - 1) bb: for r = 1
    the measured |f' - c'|^2 itself, whose spread vanishes for a circuit equal
    to the component (the three products' spreads would cancel to round-off);
    without a measured D: aa + r^2 bb - 2 r ab.  Third: the float64
    rounding of the estimate alone (the standard error's floor)."""
    m, cov = np.asarray(est.means, dtype=float), np.asarray(est.cov, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = np.array([2 * (1 - r), 0.0, r**2 - 1, 1.0]) if len(m) > 3 else np.array([-2 * r, 1.0, r**2])
        # the weights' scale k divided out, and the residual, its error and rounding multiplied by it at the
        # end: for a circuit 1e100 times the component, r^2 in the variance squared to 1e400 (inf - inf: NaN)
        k = float(np.max(np.abs(w)))
        w = w / k
        num, aa = w @ m, m[1]
        own = aa >= 0 if floor is None else aa >= floor * float(np.max(aa))
        den = np.where(own, aa, 0.0 if floor is None else floor * float(np.max(aa)))
        res = num / den
        var_num = np.einsum("i,ijk,j->k", w, cov, w)
        cov_num_aa = np.einsum("i,ik->k", w, cov[:, 1])
        var_res = (var_num - np.where(own, 2 * res * cov_num_aa - res**2 * cov[1, 1], 0.0)) / den**2
        rounding = ROUNDING * (np.log2(max(est.samples, 2)) + 4) * (np.abs(w) @ np.abs(m)) / np.abs(den)
        se = np.maximum(np.sqrt(np.maximum(var_res, 0.0)), rounding)
    if floor is not None:  # a dead channel of both sides: 0 over 0, nothing wrong in it
        dead = (den == 0) & (num == 0)
        res, se, rounding = np.where(dead, 0.0, res), np.where(dead, 0.0, se), np.where(dead, 0.0, rounding)
    return res * k, se * k, rounding * k


def _estimated_figures(ff: InnerResult, cc: InnerResult, fc: InnerResult
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """The figures of a joint Monte Carlo estimate, per channel, their
    standard errors, and notes.

    The estimate's means (<a,b>, <a,a>, <b,b>, |a - b|^2) are of the models at
    their canonical scales f = s_f f', c = s_c c' (the reported values are the
    means times those scales, so the scales are read back from them).  With
    rho = s_c / s_f the residual is |f' - rho c'|^2 / |f'|^2
    (:func:`_estimated_residual`)."""
    est = fc.estimate
    s_f2, s_c2 = _scales(ff, cc, fc)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = float(np.sqrt(s_c2 / s_f2))
    cos, se_cos = est.cosine()
    res, se_res, _ = _estimated_residual(est, rho)
    notes: list[str] = []
    if np.any(np.abs(cos) > 1):
        over = float(np.nanmax(np.abs(cos)))
        if np.any(np.abs(cos) - 1 > 4 * se_cos):
            raise ArithmeticError(f"the Monte Carlo similarity is {over:.6g} in absolute value, beyond 1 by more than 4 "
                                  "standard errors: too few samples for these models; pass more samples=")
        notes.append(f"the similarity estimate exceeded 1 in absolute value by {over - 1:.2g} (within its error): "
                     "reported as +-1")
        cos = np.clip(cos, -1.0, 1.0)
    if np.any(res < 0):  # a squared norm: an estimate below 0 is sampling error around 0
        res = np.maximum(res, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # a dead circuit channel: scale 0
        scale = np.atleast_1d(np.where(np.asarray(cc.value, dtype=float) > 0,
                                       np.asarray(fc.value, dtype=float) / np.asarray(cc.value, dtype=float), 0.0))
    figures = {"similarity": cos, "relative_residual": res, "explained": cos**2, "scale": scale}
    errors = {"similarity": se_cos, "relative_residual": se_res, "explained": 2 * np.abs(cos) * se_cos}
    return figures, errors, notes


def _squared(lo: float, hi: float) -> tuple[float, float]:
    """The 95 % interval of the explained share, similarity^2: the image of
    the similarity's interval [lo, hi] (within [-1, 1]) under squaring, so
    it holds the true share whenever that interval holds the true
    similarity.  The linearised share +- 1.96 * 2 |similarity| stderr
    missed where the similarity is near 0: with normal errors it covered
    86-89 % of the time for a similarity 1-2.5 standard errors from 0
    (its estimate crosses 0, where the square's slope vanishes)."""
    lo, hi = max(lo, -1.0), min(hi, 1.0)
    return (0.0 if lo <= 0.0 <= hi else min(lo * lo, hi * hi)), max(lo * lo, hi * hi)


def _estimated_misfits(ff: InnerResult, cc: InnerResult, fc: InnerResult, scale: float, tol: float
                       ) -> tuple[list[tuple[int, float, float]], bool]:
    """From a joint per-output Monte Carlo estimate: the outputs whose own
    residual against ``scale`` times the circuit (each output's squared norm
    floored as :func:`_misfits` floors it) lies beyond tol by more than its
    95 % sampling error, as (k, estimate, standard error); and whether every
    output's estimate itself is within tol (not only its interval; allowing
    for the estimate's own float64 rounding, which no sample count removes)."""
    s_f2, s_c2 = _scales(ff, cc, fc)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = float(scale * np.sqrt(s_c2 / s_f2))
    res, se, rounding = _estimated_residual(fc.estimate, r, OUTPUT_FLOOR)
    res = np.maximum(np.nan_to_num(res, nan=np.inf), 0.0)
    bad = [(k, float(v), float(e)) for k, (v, e) in enumerate(zip(res, se)) if not v - Z95 * e <= tol]
    return bad, bool(np.all(res - Z95 * rounding <= tol))


def _curve_point(ff: InnerResult, cc: InnerResult, fc: InnerResult) -> tuple[float, float]:
    """(similarity, relative residual) of one eigen-circuit, from a joint estimate where there is one."""
    if fc.estimate is not None:
        figures, _, _ = _estimated_figures(ff, cc, fc)
        return float(figures["similarity"][0]), float(figures["relative_residual"][0])
    s_, r_, _, _ = _figures(ff.value, cc.value, fc.value, False)
    return float(s_), float(r_)


def _check_tol(tol: Any) -> float:
    if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.integer, np.floating)) or not (
            0 <= tol < MAX_TOL):
        raise ValueError(f"tol must be a number with 0 <= tol < {MAX_TOL:g} (a relative residual: at 1 even the zero "
                         f"circuit would pass), got tol={tol!r}")
    return float(tol)


def _check_samples(kw: dict[str, Any]) -> None:
    samples = kw.get("samples")
    if samples is not None and not isinstance(samples, (bool, np.bool_)) and isinstance(samples, (int, np.integer)) \
            and 0 <= samples < MIN_SAMPLES:
        raise ValueError(f"samples={samples}: a sampled verdict needs at least {MIN_SAMPLES} samples (MIN_SAMPLES): "
                         "fewer cannot estimate the variance behind its 95 % interval")


def verify(
    circuit: Any,
    component: Component,
    inner: str | None = None,
    exact: bool | None = None,
    *,
    symbols: Sequence[sympy.Symbol] | None = None,
    tol: float = 1e-9,
    **inner_kwargs: Any,
) -> Verification:
    """Compare ``circuit`` (a sympy formula or list of formulas in ``symbols``,
    default x1..xd, or strings of numbers, input names and + - * / ^ ( ),
    each bounded in degree and size as the command line's; a tsalgebra
    model; or ``circuits.top_eigen(...)``) with ``component`` over all
    inputs.

    ``exact=None`` uses exact arithmetic when every number involved is exact:
    every weight of both sides and the measure's parameters (mean, cov,
    token probabilities); else float64.  ``exact=True`` converts every float,
    the measure's included, to the rational it stores (slow; small models);
    ``exact=False`` works in float64 with tolerance ``tol`` (0 <= tol < 1)
    on the relative residual of the whole model and of every output against
    its own norm.  ``inner`` is "gaussian", "tokens" (extra keyword
    arguments such as measure, mean and cov pass through) or "symmetric";
    None (default) the component's own measure, as in
    :func:`tsalgebra.similarity` (tokens for a model that reads token ids,
    else the Gaussian).  ``method="sampled"`` takes at least
    :data:`MIN_SAMPLES` samples.
    """
    if not isinstance(component, Component):
        raise TypeError(f"component must be a tsalgebra model, got {type(component).__name__} "
                        "(load a checkpoint with tsalgebra.load)")
    tol = _check_tol(tol)
    if exact is not None and not isinstance(exact, (bool, np.bool_)):
        raise TypeError(f"exact must be True, False or None, got {exact!r}")
    kw = dict(inner_kwargs)
    if "centered" in kw:  # a centred residual is blind to a constant: x1 + 5 was 'equal' to x1, exactly
        raise ValueError("centered= is not an option of verify: it decides whether the circuit is the component, "
                         "constants included (ts.similarity(..., centered=True) compares them up to a constant)")
    if "per_output" in kw:
        raise ValueError("per_output= is not an option of verify: it reports every output already "
                         "(Verification.per_output)")
    method = kw.get("method", "auto")
    if method == "sampled":
        _check_samples(kw)
    c = _as_model(circuit, component, symbols)
    inner, measure = function_level(inner, kw.get("measure"), kw.get("mean"), kw.get("cov"), "verify", component, c)
    if measure is not None:
        kw["measure"] = measure
    if c.in_features != component.in_features or c.out_features != component.out_features:
        raise ValueError(f"the circuit maps {c.in_features} -> {c.out_features}, "
                         f"the component {component.in_features} -> {component.out_features}")
    if method in ("sampled", "closure"):
        # an estimate or an approximation is a float64 figure: no exact verdict can rest on it
        if exact:
            raise ValueError(f"exact=True needs an exact method; method={method!r} gives "
                             f"{'an estimate' if method == 'sampled' else 'an approximation'}")
        exact = False
        if method == "sampled" and kw.get("seed") is None:
            # one seed for the whole-model and per-output estimates (the same
            # samples), drawn here and reported so that the verdict can be rerun
            kw["seed"] = int(np.random.default_rng().integers(2**63))
    law = _law(inner, measure, kw) if inner != "symmetric" else None
    if exact is None:  # exact only where every number is: both sides' weights and the measure's
        exact = _model_exact(component) and _model_exact(c) and _law_exact(law)
    notes: list[str] = []
    if exact:
        for model, side in ((component, "component"), (c, "circuit")):
            if (rotating := _rotary(model)) is not None:
                raise ValueError(f"exact=True cannot hold the {side}'s rotary embedding ({rotating.name}, rotary_base="
                                 f"{rotating.rotary_base:g}): its rotations by position are cosines and sines, "
                                 "irrational, computed in float64; exact=False gives a tolerance verdict")
        f = component if _model_exact(component) else exactify(component)
        c = c if _model_exact(c) else exactify(c)
        if law is not None and not _law_exact(law):
            law = _law_as(law, exact=True)
            notes.append("exact arithmetic on the measure's float parameters as the rationals they store"
                         + (" (token probabilities renormalised to sum to exactly 1)" if isinstance(law, Tokens) else ""))
    else:
        f, c = _float_model(component, "component"), _float_model(c, "circuit")
        if law is not None and _law_has_objects(law):
            law = _law_as(law, exact=False)
    if law is not None and law is not measure:
        kw.pop("mean", None)
        kw.pop("cov", None)
        kw["measure"] = law
    names = [str(x) for x in (symbols if symbols is not None else default_symbols(component.in_features))]
    support = support_note(law, component.in_features, names)
    if inner == "symmetric":
        kw.setdefault("degree", max(f.degree, c.degree))
    r_ff, r_cc, r_fc = _products(f, c, inner, kw, per_output=False)
    ff, cc, fc = r_ff.value, r_cc.value, r_fc.value
    if r_fc.estimated:
        # a squared norm estimated below 0 (the control variate's correction on heavy-tailed samples: 1-2 %
        # of depth-3 bilinear stacks at 500-1,000 samples) is no zero model: the samples cannot give it
        for r, what in ((r_ff, "the component's squared norm <f, f>"), (r_cc, "the circuit's squared norm <c, c>")):
            if not (float(r.value) == 0 and float(r.stderr) == 0):
                why = _not_positive(r, what)
                if why is not None:
                    raise ValueError(why)
    if (ff == 0) if exact else (float(ff) <= 0):
        raise ValueError("the component has zero norm: nothing to explain"
                         + (" (0 on every sample drawn)" if r_ff.estimated else ""))
    if r_fc.estimated and not float(cc) > 0:
        raise ValueError("the circuit is 0 on every sample drawn (a zero circuit, or one nonzero only where no sample "
                         "fell): the samples give no figures against it; an exact method, or more samples=")
    if r_fc.estimated and r_fc.samples < MIN_SAMPLES:
        raise ValueError(f"the estimate drew {r_fc.samples} samples: a sampled verdict needs at least {MIN_SAMPLES} "
                         "(MIN_SAMPLES); pass samples=")
    spent = (r_ff, r_cc, r_fc)
    accuracy = "estimated" if r_fc.estimated else "exact" if all(r.exact for r in spent) else "approximate"
    algorithm = "+".join(dict.fromkeys(r.algorithm for r in spent if r.algorithm))
    notes += list(dict.fromkeys(n for r in spent for n in r.notes))
    stderr = interval = None
    p_ff, p_cc, p_fc = _products(f, c, inner, kw, per_output=True)
    if accuracy == "estimated":
        whole, errors, more = _estimated_figures(r_ff, r_cc, r_fc)
        notes += more
        sim, residual, explained, scale = (float(whole[k][0]) for k in ("similarity", "relative_residual",
                                                                         "explained", "scale"))
        stderr = {k: float(v[0]) for k, v in errors.items()}
        interval = {k: (float(whole[k][0]) - Z95 * stderr[k], float(whole[k][0]) + Z95 * stderr[k]) for k in stderr}
        # each within the figure's range: a similarity in [-1, 1], a residual (a squared norm) at least 0
        lo, hi = interval["similarity"]
        interval["similarity"] = (max(lo, -1.0), min(hi, 1.0))
        interval["relative_residual"] = (max(interval["relative_residual"][0], 0.0), interval["relative_residual"][1])
        interval["explained"] = _squared(*interval["similarity"])
        po_fig, po_err, _ = _estimated_figures(p_ff, p_cc, p_fc)
        po = {k: np.asarray(v, dtype=float) for k, v in po_fig.items()}
        po["similarity_stderr"] = np.asarray(po_err["similarity"], dtype=float)
        po["relative_residual_stderr"] = np.asarray(po_err["relative_residual"], dtype=float)
    else:
        sim, residual, explained, scale = _figures(ff, cc, fc, exact)
        if not exact:  # the float figures of whole models are numbers, not 0-d arrays
            sim, residual, explained, scale = (float(v) for v in (sim, residual, explained, scale))
            if not all(np.isfinite(v) for v in ((sim, residual, explained, scale) if float(cc) > 0 else (residual,))):
                raise ArithmeticError(f"the figures are not finite (similarity {sim}, relative residual {residual}) "
                                      f"from the products <f,f> = {float(ff):.3g}, <c,c> = {float(cc):.3g}, "
                                      f"<f,c> = {float(fc):.3g}: float64 cannot hold them")
        po = dict(zip(("similarity", "relative_residual", "explained", "scale"),
                      (np.asarray(v, dtype=float) for v in _figures(*_floats(p_ff, p_cc, p_fc), False))))
    certificate = None
    if exact:
        if _is_zero(residual, "relative residual"):
            verdict = "equal"
            sim, residual, explained, scale = sympy.Integer(1), sympy.Integer(0), sympy.Integer(1), sympy.Integer(1)
        elif cc != 0 and _is_zero(explained - 1, "unexplained share"):
            verdict = "equal up to scale"
            explained = sympy.Integer(1)
            sim = sympy.sign(scale) if scale.is_number else sim
        else:
            verdict = "different"
            try:
                certificate = _certificate(f, c, symbols)
            except ValueError:
                certificate = None
    elif accuracy == "estimated":
        # equal only where the 95 % interval reaches within tol, for the whole
        # model and every output on its own scale: the samples cannot exclude
        # equality; "different" where it lies beyond tol.  Where only the
        # interval reaches (the estimate itself is beyond tol) and the samples
        # are heavy-tailed, the interval is itself doubtful: "doubtful"
        assert stderr is not None
        how = "within tolerance and the 95 % sampling error; estimated"
        heavy = any(getattr(r.estimate, "heavy_tailed", False) for r in (r_fc, p_fc))
        # the estimate's own float64 rounding (no sample count removes it): within it, the estimate is within tol
        _, _, rounding = _estimated_residual(r_fc.estimate, float(np.sqrt(_scales(r_ff, r_cc, r_fc)[1]
                                                                          / _scales(r_ff, r_cc, r_fc)[0])))
        slack = Z95 * float(rounding[0])
        candidates = []
        if residual - Z95 * stderr["relative_residual"] <= tol:
            candidates.append(("equal", 1.0, residual - slack <= tol))
        if 1 - interval["explained"][1] <= tol:
            candidates.append(("equal up to scale", scale, 1 - explained - slack <= tol))
        verdict, misfit_notes = "different", []
        doubtful = None
        for kind, s, point in candidates:
            bad, outputs_point = _estimated_misfits(p_ff, p_cc, p_fc, s, tol)
            if bad:
                misfit_notes.append(_misfit_note([(k, v) for k, v, _ in bad], tol, kind)
                                    + " (beyond tol by more than the 95 % sampling error)")
                continue
            if not (point and outputs_point) and heavy:
                doubtful = doubtful or kind
                continue
            verdict = f"{kind} ({how})"
            if not (point and outputs_point):
                notes.append("the estimate itself is beyond tol; only its 95 % interval reaches within it, so the "
                             "samples do not exclude equality: more samples, or an exact method, to decide")
            break
        if verdict == "different" and doubtful is not None:
            verdict = (f"doubtful ({doubtful} within tolerance only by the 95 % sampling error, and the samples are "
                       "heavy-tailed: that error is itself doubtful; estimated)")
            notes.append("doubtful: the estimate is beyond tol and only its 95 % interval reaches within it, while "
                         "heavy tails make that interval unreliable (on depth-3 bilinear stacks the intervals "
                         "covered the true figures 55-94 % of the time): more samples, or an exact or closure "
                         "method, to decide")
        elif verdict == "different":
            notes += misfit_notes[:1]
    else:
        suffix = "" if accuracy == "exact" else f"; {accuracy}: {r_fc.method}"
        pf, pc, pfc = _floats(p_ff, p_cc, p_fc)
        verdict = "different"
        for kind, ok, s in (("equal", residual <= tol, 1.0), ("equal up to scale", 1 - explained <= tol, scale)):
            if not ok:
                continue
            bad = _misfits(pf, pc, pfc, s, tol)
            if bad:
                if not any(n.startswith("not equal") for n in notes):
                    notes.append(_misfit_note(bad, tol, kind))
                continue
            verdict = f"{kind} (within tolerance{suffix})"
            break
        if verdict == "different" and accuracy == "exact" and tol < FLOAT_ROUNDING:
            near = [figure for figure, s in ((residual, 1.0), (1 - explained, scale))
                    if figure <= FLOAT_ROUNDING and not _misfits(pf, pc, pfc, s, FLOAT_ROUNDING)]
            if near:
                notes.append(f"tol={tol:g} is below the float64 rounding of these figures (about {FLOAT_ROUNDING:g}): "
                             f"the relative residual {residual:.3g} (unexplained share {1 - explained:.3g}) can be "
                             "rounding alone, so a circuit equal to the component may be called different; exact=True "
                             "(--exact on the command line) decides in exact arithmetic")
        if accuracy == "approximate":
            notes.append(f"{r_fc.method} values are approximate, without an error bar: the verdict compares them "
                         "with tol as if they were exact")
    if support is not None:
        notes.append(support)
    curve: tuple[tuple[int, float, float], ...] = ()
    if isinstance(circuit, EigenCircuit):
        # measured against the component given (not the circuit's own source):
        # the curve's last point (k = d+1, all eigenvectors) is then the
        # full projection's figures against that component; each point's
        # products jointly, as the verdict's
        target = _float_model(component, "component")
        rows = []
        for k in range(1, circuit.source.in_features + 2):
            cut = top_eigen(circuit.source, circuit.output, k)
            s_, r_ = _curve_point(*_products(target, cut, inner, kw, per_output=False))
            rows.append((k, s_, r_))
        curve = tuple(rows)
    return Verification(verdict, bool(exact), inner, sim, residual, explained, scale, po, certificate,
                        None if exact else tol, curve, method=r_fc.method, algorithm=algorithm, accuracy=accuracy,
                        stderr=stderr, interval=interval, samples=r_fc.samples if r_fc.estimated else 0,
                        seed=kw.get("seed") if r_fc.estimated else None, notes=tuple(dict.fromkeys(notes)))


def _floats(*products: InnerResult) -> list[np.ndarray]:
    """The per-output products' values as float64 (NaN where a value is
    symbolic), exact ones first divided by one power of two common to all,
    so that float64 holds them: every figure is a ratio of them, and exact
    products of weights of 1e160 (10^640) overflowed float()."""
    def rational(x: Any) -> Any:
        return sympy.Rational(x) if isinstance(x, (int, Fraction)) and not isinstance(x, bool) else x

    arrays = [np.atleast_1d(np.asarray(r.value)) for r in products]
    rationals = [rational(x) for a in arrays if a.dtype == object for x in a.flat]
    sizes = [x.p.bit_length() - x.q.bit_length() for x in rationals if isinstance(x, sympy.Rational) and x != 0]
    shift = max(sizes) if sizes and not -900 < max(sizes) < 900 else 0  # 2^shift divided out, exactly
    out = []
    for a in arrays:
        if a.dtype != object:
            out.append(a.astype(float))
            continue
        f = np.full(a.shape, np.nan)
        for i, x in enumerate(a.flat):
            x = rational(x)
            try:
                f.flat[i] = float(x / sympy.Integer(2) ** shift if shift and isinstance(x, sympy.Rational) else x)
            except (TypeError, ValueError):
                pass
        out.append(f)
    return out


def _law_has_objects(law: Measure) -> bool:
    if isinstance(law, Gaussian):
        return any(a is not None and a.dtype == object for a in (law.mean, law.cov))
    if isinstance(law, Tokens):
        return law.probs is not None and law.probs.dtype == object
    return False


def _certificate(f: Component, c: Component, symbols: Sequence[sympy.Symbol] | None) -> list[sympy.Expr]:
    """The residual polynomials f - c, each coefficient that is not a rational
    simplified (an irrational that is 0 dropped: a certificate shows only
    what differs)."""
    polys = [sympy.expand(p - q) for p, q in zip(to_sympy(f, symbols), to_sympy(c, symbols))]
    xs = tuple(symbols) if symbols is not None else default_symbols(f.in_features)
    out = []
    for p in polys:
        terms = sympy.Poly(p, *xs).terms() if p != 0 else []
        if any(not cf.is_Rational for _, cf in terms):
            p = sympy.Add(*[sympy.Mul(_simplified(cf), *(x**e for x, e in zip(xs, expo))) for expo, cf in terms
                            if not _is_zero(cf, "certificate coefficient")])
        out.append(p)
    return out


def _simplified(x: sympy.Expr) -> sympy.Expr:
    """An irrational coefficient denested and simplified (for the reader: the
    value is the same), within the size bound of the zero test."""
    if x.is_Rational or sympy.count_ops(x) > ZERO_TEST_OPS:
        return x
    return sympy.simplify(sympy.sqrtdenest(x))
