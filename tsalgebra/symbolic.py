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

    def __init__(self, tensor: Any, name: str = "Polynomial") -> None:
        T = np.asarray(tensor)
        if T.ndim < 2:
            raise ValueError(f"{name}: tensor needs an output axis and at least one input axis, got shape {T.shape}")
        if len(set(T.shape[1:])) != 1:
            raise ValueError(f"{name}: input axes differ in size: {T.shape}")
        self.name, self.tensor = name, T
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

    def __repr__(self) -> str:
        return f"{self.name}(degree {self._k}, {self.in_features} -> {self.out_features})"


def from_sympy(polys: Any, symbols: Sequence[sympy.Symbol], degree: int | None = None) -> Polynomial:
    """The polynomials (one sympy expression per output, or a single one) as a
    :class:`Polynomial` model over inputs ``symbols``, homogenized with
    x~_0 = 1 to degree ``degree`` (default: the largest total degree, at
    least 1).  Rational coefficients stay exact, floats become float64, and
    coefficients holding other symbols stay symbolic.
    """
    exprs = [polys] if isinstance(polys, sympy.Basic) or not isinstance(polys, (list, tuple)) else list(polys)
    xs = tuple(symbols)
    d = len(xs)
    if d == 0:
        raise ValueError("from_sympy needs at least one input symbol")
    ps = [sympy.Poly(sympy.sympify(e), *xs) for e in exprs]
    k = max([1] + [p.total_degree() for p in ps])
    if degree is not None:
        if degree < k:
            raise ValueError(f"degree={degree} is below the polynomials' degree {k}")
        k = degree
    _check_size(len(ps), d, k, "from_sympy")
    coeffs = [c for p in ps for c in p.coeffs()]
    numeric = all(c.is_number for c in coeffs)
    keep_objects = not numeric or all(c.is_Rational for c in coeffs)
    T = np.full((len(ps) + 1,) + (d + 1,) * k, 0, dtype=object)
    T[(0,) * (k + 1)] = 1
    for o, p in enumerate(ps, start=1):
        for expo, c in p.terms():
            idx = [0] * (k - sum(expo)) + [i + 1 for i, e in enumerate(expo) for _ in range(e)]
            perms = list(multiset_permutations(idx))
            share = c / len(perms)  # each ordering of the multiset gets an equal share: symmetric T
            for perm in perms:
                T[(o,) + tuple(perm)] = share
    if not keep_objects:
        T = T.astype(float)
    return Polynomial(T)
