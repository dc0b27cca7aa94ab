"""Is this circuit that component?  A verdict with its evidence.

All figures come from one function-level inner product (by default the
component's own measure: tokens for a model that reads token ids, else the
Gaussian):
with <f,f>, <c,c>, <f,c> for the component f and the circuit c,

- similarity        <f,c> / sqrt(<f,f><c,c>)
- relative residual ||f - c||^2 / ||f||^2
- explained         <f,c>^2 / (<f,f><c,c>): the share of ||f||^2 captured by
                    the best multiple of c, which is scale = <f,c> / <c,c>.

With exact weights (Fractions, sympy numbers) the verdict is exact: "equal",
"equal up to scale" or "different", the last with the residual polynomial as
a certificate.  In floating point it is a tolerance verdict and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import sympy

from .circuits import EigenCircuit, top_eigen
from .components import Component
from .inner import inner as inner_product
from .problem import function_level
from .symbolic import default_symbols, from_sympy, to_sympy

__all__ = ["Verification", "verify", "exactify"]


@dataclass(frozen=True)
class Verification:
    """The report of :func:`verify`.  The whole-model figures (similarity,
    relative_residual, explained, scale) are sympy numbers in exact mode and
    floats otherwise; per-output figures are float arrays over the
    component's outputs; ``faithfulness`` lists (k, similarity, residual) for
    eigen-circuits as k grows."""

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

    def __repr__(self) -> str:
        how = "exact arithmetic" if self.exact else f"floating point, tolerance {self.tolerance:g}"
        lines = [
            f"verdict: {self.verdict} ({how}, {self.inner} inner product)",
            f"  similarity {float(self.similarity):.12g}, relative residual {float(self.relative_residual):.6g}, "
            f"explained {float(self.explained):.6g}, best scale {float(self.scale):.6g}",
        ]
        if self.certificate is not None:
            lines.append(f"  certificate (component - circuit): {self.certificate}")
        if self.faithfulness:
            lines.append("  faithfulness as k grows: " + ", ".join(f"k={k}: {s:.4f}" for k, s, _ in self.faithfulness))
        return "\n".join(lines)


def _fractions(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == object else np.vectorize(lambda v: Fraction(float(v)), otypes=[object])(a)


def exactify(model: Component) -> Component:
    """The same model with every float weight replaced by the exact rational
    it stores (a binary fraction), so exact verdicts apply to float weights."""
    return model.map_weights(_fractions)


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
        raise ValueError(f"symbols names {len(xs)} inputs, the component has {width}")
    return xs


def _formula(expr: Any, k: int) -> sympy.Expr:
    """Output k of a formula circuit as a sympy expression."""
    try:
        e = sympy.sympify(expr)
    except (sympy.SympifyError, SyntaxError, TypeError) as exc:
        raise ValueError(f"circuit output {k}: cannot read {expr!r} as a formula ({exc})") from None
    if not isinstance(e, sympy.Expr):
        raise ValueError(f"circuit output {k}: {e} is not a formula but a {type(e).__name__}; give a polynomial")
    return e


def _check_polynomial(e: sympy.Expr, xs: tuple[sympy.Symbol, ...], k: int) -> None:
    """Output k, checked to be a polynomial in ``xs`` with finite real
    coefficients (anything else would fail deep in sympy or numpy, or turn
    into NaN)."""
    if e.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        raise ValueError(f"circuit output {k}: {e} has an infinite or undefined coefficient (a division by zero?)")
    if not e.is_polynomial(*xs):
        raise ValueError(f"circuit output {k}: {e} is not a polynomial in {', '.join(map(str, xs))} "
                         "(a circuit is a polynomial: no functions, roots or division by an input)")
    bad = [c for c in sympy.Poly(e, *xs).coeffs() if not (c.is_real and c.is_finite)] if xs else (
        [] if e.is_real and e.is_finite else [e])
    if bad:
        raise ValueError(f"circuit output {k}: the coefficient {bad[0]} of {e} is not a finite real number")


def _as_model(circuit: Any, component: Component, symbols: Sequence[sympy.Symbol] | None) -> Component:
    if isinstance(circuit, Component):
        return circuit
    if isinstance(circuit, (sympy.Basic, list, tuple, str)):
        xs = _input_symbols(symbols, component.in_features)
        exprs = [_formula(c, k) for k, c in enumerate(circuit if isinstance(circuit, (list, tuple)) else [circuit])]
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
        for k, e in enumerate(exprs):
            _check_polynomial(e, xs, k)
        if len(exprs) != component.out_features:
            raise ValueError(f"the circuit has {len(exprs)} outputs, the component {component.out_features}")
        return from_sympy(exprs, xs)
    raise TypeError(f"a circuit is a sympy formula, a list of formulas or a tsalgebra model, not {type(circuit).__name__}")


def _figures(ff: Any, cc: Any, fc: Any, exact: bool) -> tuple[Any, Any, Any, Any]:
    if exact:
        ff, cc, fc = (sympy.nsimplify(v) if isinstance(v, float) else sympy.sympify(
            sympy.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else v) for v in (ff, cc, fc))
        sim = sympy.simplify(fc / sympy.sqrt(ff * cc)) if ff and cc else sympy.nan
        return sim, (ff + cc - 2 * fc) / ff, (fc**2 / (ff * cc) if cc else 0), (fc / cc if cc else 0)
    ff, cc, fc = (np.asarray(v, dtype=float) for v in (ff, cc, fc))
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = fc / np.sqrt(ff * cc)
        residual = (ff + cc - 2 * fc) / ff
        explained = np.where(cc > 0, fc**2 / (ff * cc), 0.0)
        scale = np.where(cc > 0, fc / cc, 0.0)
    return sim, np.maximum(residual, 0.0), explained, scale


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
    default x1..xd; a tsalgebra model; or ``circuits.top_eigen(...)``) with
    ``component`` over all inputs.

    ``exact=None`` uses exact arithmetic when both sides have exact weights;
    ``exact=True`` converts float weights to the rationals they store
    (slow; small models); ``exact=False`` works in float64 with tolerance
    ``tol`` on the relative residual.  ``inner`` is "gaussian", "tokens" (extra
    keyword arguments such as measure, mean and cov pass through) or
    "symmetric"; None (default) the component's own measure, as in
    :func:`tsalgebra.similarity` (tokens for a model that reads token ids,
    else the Gaussian).
    """
    if not isinstance(component, Component):
        raise TypeError(f"component must be a tsalgebra model, got {type(component).__name__} "
                        "(load a checkpoint with tsalgebra.load)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    kw = dict(inner_kwargs)
    c = _as_model(circuit, component, symbols)
    inner, measure = function_level(inner, kw.get("measure"), kw.get("mean"), kw.get("cov"), "verify", component, c)
    if measure is not None:
        kw["measure"] = measure
    if c.in_features != component.in_features or c.out_features != component.out_features:
        raise ValueError(f"the circuit maps {c.in_features} -> {c.out_features}, "
                         f"the component {component.in_features} -> {component.out_features}")
    if exact is None:
        exact = component.exact and c.exact
    f = exactify(component) if exact and not component.exact else component
    c = exactify(c) if exact and not c.exact else c
    if not exact:
        f, c = (m.map_weights(lambda w: np.asarray(w, dtype=float)) if m.exact else m for m in (f, c))
    if inner == "symmetric":
        kw.setdefault("degree", max(f.degree, c.degree))
    ff = inner_product(f, f, inner, **kw).value
    if (ff == 0) if exact else (float(ff) <= 0):
        raise ValueError("the component has zero norm: nothing to explain")
    cc = inner_product(c, c, inner, **kw).value
    fc = inner_product(f, c, inner, **kw).value
    sim, residual, explained, scale = _figures(ff, cc, fc, exact)
    if not exact:  # the float figures of whole models are numbers, not 0-d arrays
        sim, residual, explained, scale = (float(v) for v in (sim, residual, explained, scale))
    pf, pc, pfc = (inner_product(x, y, inner, per_output=True, **kw).value for x, y in ((f, f), (c, c), (f, c)))
    po = dict(zip(("similarity", "relative_residual", "explained", "scale"),
                  (np.asarray(v, dtype=float) for v in _figures(pf.astype(float), pc.astype(float), pfc.astype(float), False))))
    certificate = None
    if exact:
        if residual == 0:
            verdict = "equal"
        elif explained == 1:
            verdict = "equal up to scale"
        else:
            verdict = "different"
            try:
                certificate = [sympy.expand(p - q) for p, q in zip(to_sympy(f, symbols), to_sympy(c, symbols))]
            except ValueError:
                certificate = None
    else:
        verdict = ("equal (within tolerance)" if residual <= tol
                   else "equal up to scale (within tolerance)" if 1 - explained <= tol else "different")
    curve: tuple[tuple[int, float, float], ...] = ()
    if isinstance(circuit, EigenCircuit):
        # measured against the component given (not the circuit's own source):
        # the curve's last point (k = d+1, all eigenvectors) is then the
        # full projection's figures against that component
        target = component.map_weights(lambda w: np.asarray(w, dtype=float)) if component.exact else component
        a_ = inner_product(target, target, inner, **kw).value
        rows = []
        for k in range(1, circuit.source.in_features + 2):
            cut = top_eigen(circuit.source, circuit.output, k)
            b_, ab_ = (inner_product(x, y, inner, **kw).value for x, y in ((cut, cut), (target, cut)))
            s_, r_, _, _ = _figures(a_, b_, ab_, False)
            rows.append((k, float(s_), float(r_)))
        curve = tuple(rows)
    return Verification(verdict, bool(exact), inner, sim, residual, explained, scale, po, certificate,
                        None if exact else tol, curve)
