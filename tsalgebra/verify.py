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

The three products come from one computation (:func:`tsalgebra.inner.joint_inner`):
with ``method="sampled"`` one set of Monte Carlo samples gives all three, so
their errors cancel in the figures (three independent estimates read a
circuit equal to the component as 0.994 similar, "different").  The report
carries how its numbers were obtained (method, algorithm, exact, approximate
or estimated) and, for estimates, the standard errors and 95 % intervals of
the figures; an estimated "equal" means equal within the tolerance plus the
95 % sampling error, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

import numpy as np
import sympy

from .algorithms.sampled import Z95
from .circuits import EigenCircuit, top_eigen
from .components import Component
from .inner import inner as inner_product
from .inner import joint_inner
from .messages import counted
from .problem import InnerResult
from .problem import function_level
from .symbolic import default_symbols, from_sympy, to_sympy

__all__ = ["Verification", "verify", "exactify"]


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
    "explained" to the standard error and the 95 % interval, ``samples`` and
    ``seed`` say which samples (one set for all three products); ``per_output``
    then also holds "similarity_stderr" and "relative_residual_stderr"."""

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
            lines.append(f"  similarity {float(self.similarity):.12g}, relative residual "
                         f"{float(self.relative_residual):.6g}, explained {float(self.explained):.6g}, "
                         f"best scale {float(self.scale):.6g}")
        if self.certificate is not None:
            lines.append(f"  certificate (component - circuit): {self.certificate}")
        if self.faithfulness:
            lines.append("  faithfulness as k grows: " + ", ".join(f"k={k}: {s:.4f}" for k, s, _ in self.faithfulness))
        lines += [f"  note: {n}" for n in self.notes]
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
        raise ValueError(f"symbols names {counted(len(xs), 'input')}, the component has {width}")
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
        given = list(circuit) if isinstance(circuit, (list, tuple)) else [circuit]
        for k, e in enumerate(exprs):
            _check_polynomial(e, xs, k, given[k])
        if len(exprs) != component.out_features:
            raise ValueError(f"the circuit has {counted(len(exprs), 'output')}, the component "
                             f"{component.out_features}")
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


# The float64 rounding of a figure computed from sample means, per log2(n) + 4
# of the pairwise sums (as the Monte Carlo cosine's own floor): on a circuit
# equal to the component the measured spread of the residual is 0, and its
# rounding is all the error left.
ROUNDING = 2 * float(np.finfo(float).eps)


def _products(f: Component, c: Component, inner: str, kw: dict[str, Any], per_output: bool
              ) -> tuple[InnerResult, InnerResult, InnerResult]:
    """(<f,f>, <c,c>, <f,c>) from one computation where the algorithm gives
    all three (closure; Monte Carlo: one set of samples), as
    :func:`tsalgebra.similarity` plans them; else the self-products beside it."""
    fc, ff, cc = joint_inner(f, c, inner, per_output=per_output, **kw)
    ff = ff if ff is not None else inner_product(f, f, inner, per_output=per_output, **kw)
    cc = cc if cc is not None else inner_product(c, c, inner, per_output=per_output, **kw)
    return ff, cc, fc


def _estimated_figures(ff: InnerResult, cc: InnerResult, fc: InnerResult
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """The figures of a joint Monte Carlo estimate, per channel, their
    standard errors, and notes.

    The estimate's means (<a,b>, <a,a>, <b,b>, |a - b|^2) are of the models at
    their canonical scales f = s_f f', c = s_c c' (the reported values are the
    means times those scales, so the scales are read back from them).  With
    rho = s_c / s_f the residual's numerator is, per sample,
    |f' - rho c'|^2 = D + 2 (1 - rho) ab + (rho^2 - 1) bb: for rho = 1 the
    measured |f' - c'|^2 itself, whose spread vanishes for a circuit equal to
    the component (the three products' spreads would cancel to round-off).
    Errors by the delta method over the means' covariance."""
    est = fc.estimate
    m, cov = np.asarray(est.means, dtype=float), np.asarray(est.cov, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_f2 = float(np.sum(ff.value)) / float(np.sum(m[1]))
        s_c2 = float(np.sum(cc.value)) / float(np.sum(m[2]))
        rho = np.sqrt(s_c2 / s_f2)
        cos, se_cos = est.cosine()
        # weights of the per-sample numerator over the means (without a measured
        # |a - b|^2 row: aa + rho^2 bb - 2 rho ab, the same value, its spread
        # found by cancellation)
        w = (np.array([2 * (1 - rho), 0.0, rho**2 - 1, 1.0]) if len(m) > 3
             else np.array([-2 * rho, 1.0, rho**2]))
        num, aa = w @ m, m[1]
        res = num / aa
        var_num = np.einsum("i,ijk,j->k", w, cov, w)
        cov_num_aa = np.einsum("i,ik->k", w, cov[:, 1])
        var_res = (var_num - 2 * res * cov_num_aa + res**2 * cov[1, 1]) / aa**2
        rounding = ROUNDING * (np.log2(max(est.samples, 2)) + 4) * (np.abs(w) @ np.abs(m)) / np.abs(aa)
    se_res = np.maximum(np.sqrt(np.maximum(var_res, 0.0)), rounding)
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
    figures = {"similarity": cos, "relative_residual": res, "explained": cos**2,
               "scale": np.atleast_1d(np.where(np.asarray(cc.value, dtype=float) > 0,
                                               np.asarray(fc.value, dtype=float) / np.asarray(cc.value, dtype=float),
                                               0.0))}
    errors = {"similarity": se_cos, "relative_residual": se_res, "explained": 2 * np.abs(cos) * se_cos}
    return figures, errors, notes


def _curve_point(ff: InnerResult, cc: InnerResult, fc: InnerResult) -> tuple[float, float]:
    """(similarity, relative residual) of one eigen-circuit, from a joint estimate where there is one."""
    if fc.estimate is not None:
        figures, _, _ = _estimated_figures(ff, cc, fc)
        return float(figures["similarity"][0]), float(figures["relative_residual"][0])
    s_, r_, _, _ = _figures(ff.value, cc.value, fc.value, False)
    return float(s_), float(r_)


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
    method = kw.get("method", "auto")
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
    if exact is None:
        exact = component.exact and c.exact
    f = exactify(component) if exact and not component.exact else component
    c = exactify(c) if exact and not c.exact else c
    if not exact:
        f, c = (m.map_weights(lambda w: np.asarray(w, dtype=float)) if m.exact else m for m in (f, c))
    if inner == "symmetric":
        kw.setdefault("degree", max(f.degree, c.degree))
    r_ff, r_cc, r_fc = _products(f, c, inner, kw, per_output=False)
    ff, cc, fc = r_ff.value, r_cc.value, r_fc.value
    if (ff == 0) if exact else (float(ff) <= 0):
        raise ValueError("the component has zero norm: nothing to explain"
                         + (f" (its Monte Carlo estimate is {float(ff):.3g})" if r_ff.estimated else ""))
    if r_fc.estimated and not float(cc) > 0:
        raise ValueError(f"the Monte Carlo estimate of the circuit's norm is {float(cc):.3g}, not positive: "
                         "too few samples (pass more samples=), or the circuit is zero")
    spent = (r_ff, r_cc, r_fc)
    accuracy = "estimated" if r_fc.estimated else "exact" if all(r.exact for r in spent) else "approximate"
    algorithm = "+".join(dict.fromkeys(r.algorithm for r in spent if r.algorithm))
    notes = list(dict.fromkeys(n for r in spent for n in r.notes))
    stderr = interval = None
    p_ff, p_cc, p_fc = _products(f, c, inner, kw, per_output=True)
    if accuracy == "estimated":
        whole, errors, more = _estimated_figures(r_ff, r_cc, r_fc)
        notes += more
        sim, residual, explained, scale = (float(whole[k][0]) for k in ("similarity", "relative_residual",
                                                                         "explained", "scale"))
        stderr = {k: float(v[0]) for k, v in errors.items()}
        interval = {k: (float(whole[k][0]) - Z95 * stderr[k], float(whole[k][0]) + Z95 * stderr[k]) for k in stderr}
        po_fig, po_err, _ = _estimated_figures(p_ff, p_cc, p_fc)
        po = {k: np.asarray(v, dtype=float) for k, v in po_fig.items()}
        po["similarity_stderr"] = np.asarray(po_err["similarity"], dtype=float)
        po["relative_residual_stderr"] = np.asarray(po_err["relative_residual"], dtype=float)
    else:
        sim, residual, explained, scale = _figures(ff, cc, fc, exact)
        if not exact:  # the float figures of whole models are numbers, not 0-d arrays
            sim, residual, explained, scale = (float(v) for v in (sim, residual, explained, scale))
        pf, pc, pfc = p_ff.value, p_cc.value, p_fc.value
        po = dict(zip(("similarity", "relative_residual", "explained", "scale"),
                      (np.asarray(v, dtype=float) for v in _figures(pf.astype(float), pc.astype(float),
                                                                     pfc.astype(float), False))))
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
    elif accuracy == "estimated":
        # equal only where the 95 % interval reaches within tol: the samples
        # cannot exclude equality; "different" where it lies beyond tol
        assert stderr is not None
        how = "within tolerance and the 95 % sampling error; estimated"
        if residual - Z95 * stderr["relative_residual"] <= tol:
            verdict = f"equal ({how})"
        elif (1 - explained) - Z95 * stderr["explained"] <= tol:
            verdict = f"equal up to scale ({how})"
        else:
            verdict = "different"
        if verdict != "different" and (residual if verdict.startswith("equal (") else 1 - explained) > tol:
            notes.append("the estimate itself is beyond tol; only its 95 % interval reaches within it, so the "
                         "samples do not exclude equality: more samples, or an exact method, to decide")
    else:
        suffix = "" if accuracy == "exact" else f"; {accuracy}: {r_fc.method}"
        verdict = (f"equal (within tolerance{suffix})" if residual <= tol
                   else f"equal up to scale (within tolerance{suffix})" if 1 - explained <= tol else "different")
        if accuracy == "approximate":
            notes.append(f"{r_fc.method} values are approximate, without an error bar: the verdict compares them "
                         "with tol as if they were exact")
    curve: tuple[tuple[int, float, float], ...] = ()
    if isinstance(circuit, EigenCircuit):
        # measured against the component given (not the circuit's own source):
        # the curve's last point (k = d+1, all eigenvectors) is then the
        # full projection's figures against that component; each point's
        # products jointly, as the verdict's
        target = component.map_weights(lambda w: np.asarray(w, dtype=float)) if component.exact else component
        rows = []
        for k in range(1, circuit.source.in_features + 2):
            cut = top_eigen(circuit.source, circuit.output, k)
            s_, r_ = _curve_point(*_products(target, cut, inner, kw, per_output=False))
            rows.append((k, s_, r_))
        curve = tuple(rows)
    return Verification(verdict, bool(exact), inner, sim, residual, explained, scale, po, certificate,
                        None if exact else tol, curve, method=r_fc.method, algorithm=algorithm, accuracy=accuracy,
                        stderr=stderr, interval=interval, samples=r_fc.samples if r_fc.estimated else 0,
                        seed=kw.get("seed") if r_fc.estimated else None, notes=tuple(notes))
