"""The sympy bridge: models to polynomials and polynomials to models.

:func:`to_sympy` materializes a model's padded coefficient tensor with the
ordinary planner and engine (exact when the weights are exact) and reads the
polynomials off it.  :func:`from_sympy` builds the symmetric padded tensor of
given polynomials as a :class:`Polynomial` model, which every function-level
inner product accepts.  Entries may be floats, exact rationals or sympy
expressions in other symbols, so inner products can be taken symbolically in
small dimensions.
"""

from __future__ import annotations

from fractions import Fraction
from itertools import product
from typing import Any, Sequence

import numpy as np
import sympy
from sympy.utilities.iterables import multiset_permutations

from .components import Component
from .engine import contract
from .expr import Network, Tensor

__all__ = ["Polynomial", "to_sympy", "from_sympy", "MAX_ENTRIES"]

MAX_ENTRIES = 2_000_000  # entries of a materialized padded tensor


def _to_sympy_number(v: Any) -> sympy.Expr:
    if isinstance(v, Fraction):
        return sympy.Rational(v.numerator, v.denominator)
    return sympy.sympify(v)


def default_symbols(d: int) -> tuple[sympy.Symbol, ...]:
    """x1, ..., xd."""
    return tuple(sympy.symbols(f"x1:{d + 1}")) if d > 1 else (sympy.Symbol("x1"),)


def _check_size(out: int, d: int, k: int, what: str) -> None:
    entries = (out + 1) * (d + 1) ** k
    if entries > MAX_ENTRIES:
        raise ValueError(
            f"{what}: the padded tensor has {entries:,} entries ((out+1) (d+1)^k with d={d}, k={k}), "
            f"above the limit of {MAX_ENTRIES:,}; symbolic expansion is for small models"
        )


def to_sympy(model: Component, symbols: Sequence[sympy.Symbol] | None = None) -> list[sympy.Expr]:
    """One expanded polynomial per output of ``model``, in ``symbols``
    (default x1..xd).  Coefficients are exact rationals when the weights are
    exact (Fractions / sympy numbers), floats otherwise.  Raises ValueError
    when the padded tensor is too large to materialize (see MAX_ENTRIES).
    """
    d, k = model.in_features, model.degree
    xs = tuple(symbols) if symbols is not None else default_symbols(d)
    if len(xs) != d:
        raise ValueError(f"{len(xs)} symbols for a model of input width {d}")
    _check_size(model.out_features, d, k, "to_sympy")
    T, _ = contract(model.expression)
    T = np.asarray(T)
    polys = []
    for o in range(1, T.shape[0]):
        terms: dict[tuple[int, ...], Any] = {}
        block = T[o]
        for idx in zip(*np.nonzero(block != 0)) if block.dtype != object else product(range(d + 1), repeat=k):
            c = block[idx]
            if c == 0:
                continue
            expo = [0] * d
            for i in idx:
                if i:
                    expo[i - 1] += 1
            key = tuple(expo)
            terms[key] = terms.get(key, 0) + c
        expr = sympy.Add(*[_to_sympy_number(c) * sympy.Mul(*[x**e for x, e in zip(xs, key)]) for key, c in terms.items()])
        polys.append(sympy.expand(expr))
    return polys


class Polynomial(Component):
    """A model given by its symmetric padded coefficient tensor T of shape
    (out+1, d+1, ..., d+1) (k input axes): f~(x) = T . x~ ... x~ with channel 0
    the constant.  Built by :func:`from_sympy`; T must be symmetric in its
    input axes, which makes every input swap a declared symmetry.

    Fields: weight ``tensor``; no settings."""

    weight_fields = ("tensor",)

    def __init__(self, tensor: Any, name: str = "Polynomial", *, exact_tensor: Any = None,
                 symbols: Sequence[sympy.Symbol] | None = None) -> None:
        T = np.asarray(tensor)
        if T.ndim < 2:
            raise ValueError(f"{name}: tensor needs an output axis and at least one input axis, got shape {T.shape}")
        if len(set(T.shape[1:])) != 1:
            raise ValueError(f"{name}: input axes differ in size: {T.shape}")
        E = None if exact_tensor is None else np.asarray(exact_tensor, dtype=object)
        if E is not None and E.shape != T.shape:
            raise ValueError(f"{name}: exact_tensor has shape {E.shape}, the tensor {T.shape}")
        self.name, self.tensor = name, T
        # the exact values (Fractions) of a float tensor's entries, where
        # from_sympy knows them (float coefficients split among the orderings
        # of their monomial do not round to float64 exactly): a weight map
        # that gives exact numbers (exactify) reads these, not the rounded floats
        self.exact_tensor = E if T.dtype != object else None
        self.symbols = tuple(symbols) if symbols is not None else None  # the inputs' names, for messages
        self.in_features, self.out_features = T.shape[1] - 1, T.shape[0] - 1
        self._k = T.ndim - 1

    @property
    def degree(self) -> int:
        return self._k

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        legs = tuple(f"i{tag}_{j}" for j in range(self._k))
        t = Tensor.of(f"P{tag}", (f"o{tag}",) + legs, self.tensor)
        swaps = [tuple(j + 1 if i == j else j if i == j + 1 else i for i in range(self._k)) for j in range(self._k - 1)]
        net = Network((t,), legs, (f"o{tag}",), swaps)
        return net if data else net.shapes_only()

    def map_weights(self, fn: Any) -> "Polynomial":
        """:meth:`Component.map_weights`; a map that gives exact numbers (an
        object array, as :func:`tsalgebra.exactify`) reads the exact values of
        float coefficients where they are known (``exact_tensor``), and a map
        to float64 that overflows raises ValueError naming the coefficient."""
        try:
            new = np.asarray(fn(self.tensor))
        except OverflowError:
            where = _beyond_float64(self.tensor)
            if where is None:
                raise
            raise ValueError(self._beyond_message(where)) from None
        exact_tensor = None
        if self.exact_tensor is not None:
            if new.dtype == object:
                new = np.asarray(fn(self.exact_tensor))
            elif new.shape == self.tensor.shape and np.array_equal(new, self.tensor):
                exact_tensor = self.exact_tensor  # the same values (e.g. a dtype check): still known exactly
        if np.issubdtype(new.dtype, np.floating) and not np.all(np.isfinite(new)):
            where = _beyond_float64(self.tensor)  # a finite coefficient the map turned into inf
            if where is not None:
                raise ValueError(self._beyond_message(where))
        return Polynomial(new, self.name, exact_tensor=exact_tensor, symbols=self.symbols)

    def replace(self, **changes: Any) -> "Polynomial":
        """:meth:`Component.replace`, carrying ``symbols`` and the exact
        values of the float coefficients (``exact_tensor``; both may be given
        as changes too).  The exact values survive a change of the name, and
        of the tensor to the same values: the same floats (a dtype check), or
        those floats as exact numbers (:func:`tsalgebra.exactify` of a
        :class:`~tsalgebra.Sequential` holding this polynomial replaces its
        tensor so), which then reads the exact values, as :meth:`map_weights`
        does; a tensor of other values drops them."""
        exact_tensor = changes.pop("exact_tensor", _UNCHANGED)
        symbols = changes.pop("symbols", self.symbols)
        built = super().replace(**changes)  # validated by the constructor; unknown names raise
        tensor = built.tensor
        if exact_tensor is _UNCHANGED:
            exact_tensor = None
            if self.exact_tensor is not None and tensor.shape == self.tensor.shape:
                if "tensor" not in changes or (tensor.dtype != object and np.array_equal(tensor, self.tensor)):
                    exact_tensor = self.exact_tensor
                elif tensor.dtype == object and _same_values(tensor, self.tensor):
                    tensor = self.exact_tensor.copy()
        return Polynomial(tensor, built.name, exact_tensor=exact_tensor, symbols=symbols)

    def _beyond_message(self, idx: tuple[int, ...]) -> str:
        """Entry ``idx`` of the tensor (one ordering of a monomial's share) is
        beyond float64: said as the coefficient of that monomial."""
        o, legs = idx[0], idx[1:]
        xs = self.symbols or default_symbols(self.in_features)
        share = _to_sympy_number(self.tensor[idx])
        orderings = len(list(multiset_permutations(list(legs))))
        monomial = sympy.Mul(*[xs[i - 1] for i in legs if i])
        return _beyond_text(o - 1, share * orderings, monomial, exact_hint=True)

    def __repr__(self) -> str:
        return f"{self.name}(degree {self._k}, {self.in_features} -> {self.out_features})"


FLOAT64_MAX = float(np.finfo(float).max)
_UNCHANGED = object()  # Polynomial.replace: no exact_tensor given


def _same_values(exact: np.ndarray, floats: np.ndarray) -> bool:
    """True when the object array ``exact`` holds exactly the values of the
    float array ``floats``, entry by entry (compared as exact rationals)."""
    for v, f in zip(exact.flat, floats.flat):
        try:
            if Fraction(v) != Fraction(float(f)):
                return False
        except (TypeError, ValueError, OverflowError):
            return False
    return True


def _short(c: Any) -> str:
    """A coefficient for a message: as written where short, else to 6 digits."""
    text = str(c)
    return text if len(text) <= 40 else str(sympy.N(c, 6))


def _beyond_text(output: int, coefficient: Any, monomial: Any, exact_hint: bool) -> str:
    term = "the constant term" if monomial == 1 else f"{monomial}"
    hint = ("rescale the formula, or verify in exact arithmetic (exact=True)" if exact_hint else
            "rescale the formula, or write its coefficients as exact integers or fractions (no float literals) "
            "and verify in exact arithmetic (exact=True)")
    return (f"output {output}: the coefficient {_short(coefficient)} of {term} in the formula is beyond float64 "
            f"(magnitude over {FLOAT64_MAX:.3g}): {hint}")


def _beyond_float64(T: np.ndarray) -> tuple[int, ...] | None:
    """The first index of a finite number in ``T`` that float64 cannot hold, or None."""
    for idx in np.ndindex(T.shape):
        v = T[idx]
        try:
            f = float(v)
        except OverflowError:
            return idx
        except (TypeError, ValueError):
            continue
        if not np.isfinite(f):
            try:
                finite = bool(_to_sympy_number(v).is_finite)
            except (TypeError, ValueError, sympy.SympifyError):
                finite = False
            if finite:
                return idx
    return None


def _exact_value(c: sympy.Expr) -> Fraction:
    """A numeric coefficient as an exact Fraction: a rational as it is, a
    float (sympy Float, any precision) as the exact binary rational of its
    value, any other number (sqrt(2), pi) as the float64 it rounds to."""
    if c.is_Rational:
        return Fraction(int(c.p), int(c.q))
    if c.is_Float:
        r = sympy.Rational(c)
        return Fraction(int(r.p), int(r.q))
    return Fraction(float(c))  # OverflowError/ValueError for a value beyond float64: said by the caller


def from_sympy(polys: Any, symbols: Sequence[sympy.Symbol], degree: int | None = None) -> Polynomial:
    """The polynomials (one sympy expression per output, or a single one) as a
    :class:`Polynomial` model over inputs ``symbols``, homogenized with
    x~_0 = 1 to degree ``degree`` (default: the largest total degree, at
    least 1).  Rational coefficients stay exact, floats become float64, and
    coefficients holding other symbols stay symbolic.  With floats the exact
    coefficients are kept beside the float64 tensor (``exact_tensor``: each
    float the exact rational of its value, split among a monomial's
    orderings without rounding), so :func:`tsalgebra.exactify` and exact
    verdicts judge the polynomial as written.  A coefficient that float64
    cannot hold raises ValueError naming it.
    """
    exprs = [polys] if isinstance(polys, sympy.Basic) or not isinstance(polys, (list, tuple)) else list(polys)
    xs = tuple(symbols)
    d = len(xs)
    if d == 0:
        raise ValueError("from_sympy needs at least one input symbol")
    raw = [sympy.sympify(e) for e in exprs]
    ps = [sympy.Poly(e, *xs) for e in raw]
    coeffs = [c for p in ps for c in p.coeffs()]
    numeric = all(c.is_number for c in coeffs)
    floats = [{f: sympy.Rational(f) for f in e.atoms(sympy.Float) if f.is_finite} for e in raw]
    keep_objects = not numeric or (all(c.is_Rational for c in coeffs) and not any(floats))
    if not keep_objects:
        # float64 storage; the coefficients exactly as written (each float the
        # exact rational of its value, expanded without rounding), kept beside
        # it: a float's share of a monomial's orderings (c/6 of x1 x2 x3) is
        # no float64, and exact verdicts must judge the polynomial written
        ps = [sympy.Poly(e.xreplace(r), *xs) if r else p for e, p, r in zip(raw, ps, floats)]
    k = max([1] + [p.total_degree() for p in ps])
    if degree is not None:
        if degree < k:
            raise ValueError(f"degree={degree} is below the polynomials' degree {k}")
        k = degree
    _check_size(len(ps), d, k, "from_sympy")
    T = np.full((len(ps) + 1,) + (d + 1,) * k, 0, dtype=object)
    T[(0,) * (k + 1)] = 1
    for o, p in enumerate(ps, start=1):
        for expo, c in p.terms():
            idx = [0] * (k - sum(expo)) + [i + 1 for i, e in enumerate(expo) for _ in range(e)]
            perms = list(multiset_permutations(idx))
            if keep_objects:
                share = c / len(perms)  # each ordering of the multiset gets an equal share: symmetric T
            else:
                try:
                    share = _exact_value(c) / len(perms)  # exact: no rounding in the split
                    float(share)
                except (OverflowError, ValueError):
                    monomial = sympy.Mul(*[x**e for x, e in zip(xs, expo)])
                    raise ValueError(_beyond_text(o - 1, c, monomial, exact_hint=False)) from None
            for perm in perms:
                T[(o,) + tuple(perm)] = share
    if keep_objects:
        return Polynomial(T, symbols=xs)
    E = T.copy()
    E[(0,) * (k + 1)] = Fraction(1)
    E[E == 0] = Fraction(0)
    return Polynomial(np.vectorize(float, otypes=[float])(T), exact_tensor=E, symbols=xs)
