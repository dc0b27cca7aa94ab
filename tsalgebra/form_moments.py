"""Gaussian moments of products of bilinear and linear factors of linear forms.

The expectation of a product of linear forms of a Gaussian is a sum over the
partial matchings of the forms (Isserlis: pairs joined by their covariance,
singletons fed their mean).  Here the forms come in *factors*: a bilinear
factor ``x' W y`` couples two vector-valued forms (legs) x and y through a
bond W, a linear factor is one vector-valued form whose index stays open.
A matching links legs; since every factor has at most two legs, each
connected component of factors is a path or a cycle, and its value depends on
that component alone.  So

    E[prod F] = sum over set partitions of the factors of prod over blocks kappa(block),

with kappa(block) (the joint cumulant) the sum over the paths and cycles
through exactly the block's factors.  Those are summed by dynamic
programming over (factors visited, exit leg), each step a matrix product
with a covariance block between two legs (a *Gram* block, small: a head's
width) and a bond: no matching is enumerated and nothing larger than the
answer is formed.  The attention algorithm (:mod:`tsalgebra.algorithms.moments`)
expresses the second moments of attention outputs this way.

Tensors carry a fixed axis layout ``(P, A, B, E, F, S, X)``: position tuples,
the heads of side a and of side b (each a factor belongs to one side; a
side's factors share its head), the open outputs of side a's and side b's
linear factors, a cycle's start leg, and the current exit leg; absent axes
have size 1 and broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable

import numpy as np

__all__ = ["Factor", "Leg", "moment"]

_P, _A, _B, _E, _F, _S, _X = range(7)


@dataclass(frozen=True)
class Leg:
    """A vector-valued linear form: its family (what the Gram and mean
    providers are asked about), the side whose head it carries (0: a, 1: b),
    and its slot (legs in different slots may be uncorrelated: the Gram
    provider answers None for them)."""

    family: str
    side: int
    slot: int = 0


@dataclass(frozen=True, eq=False)
class Factor:
    """``legs[0]' bond legs[1]`` (a bilinear factor; ``bond`` of shape
    (P or 1, heads or 1, dim legs[0], dim legs[1])), or ``legs[0]`` alone (a
    linear factor, ``bond`` None: its index becomes the side's open output)."""

    legs: tuple[Leg, ...]
    bond: np.ndarray | None = field(default=None, repr=False)

    @property
    def side(self) -> int:
        return self.legs[0].side

    @property
    def linear(self) -> bool:
        return len(self.legs) == 1


Gram = Callable[[Leg, Leg], "np.ndarray | None"]
Mean = Callable[[Leg], np.ndarray]


def _as7(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``x`` with its axes placed at ``axes`` of the 7-axis layout, size 1 elsewhere."""
    shape = [1] * 7
    for ax, n in zip(axes, x.shape):
        shape[ax] = n
    order = np.argsort(axes)
    return np.transpose(x, order).reshape(shape) if list(order) != list(range(len(axes))) else x.reshape(shape)


class _Engine:
    def __init__(self, factors: list[Factor], gram: Gram, mean: Mean) -> None:
        self.factors, self.gram_of, self.mean_of = factors, gram, mean
        self._gram: dict[tuple[Leg, Leg], Any] = {}
        self.flops = 0

    # ------------------------------------------------------ building blocks
    def link(self, x: Leg, y: Leg) -> np.ndarray | None:
        """The covariance of legs x and y as a 7-axis matrix on (S, X) =
        (x index, y index), heads on A/B; None when they are uncorrelated."""
        key = (x, y)
        if key not in self._gram:
            g = self.gram_of(x, y)
            if g is None:
                self._gram[key] = None
            elif x.side == y.side:  # (heads, dx, dy), one head for both
                self._gram[key] = _as7(g, (_A if x.side == 0 else _B, _S, _X))
            else:  # (heads of x, dx, heads of y, dy)
                ax = (_A, _S, _B, _X) if x.side == 0 else (_B, _S, _A, _X)
                self._gram[key] = _as7(g, ax)
        return self._gram[key]

    def bond(self, f: Factor, entry: int) -> np.ndarray:
        """The bond as a 7-axis matrix (entry leg index, exit leg index)."""
        W = f.bond if entry == 0 else np.swapaxes(f.bond, -1, -2)  # type: ignore[arg-type]
        return _as7(W, (_P, _A if f.side == 0 else _B, _S, _X))

    def mean(self, x: Leg) -> np.ndarray:
        """The leg's mean as a 7-axis vector on X."""
        return _as7(self.mean_of(x), (_A if x.side == 0 else _B, _X))

    def matmul(self, T: np.ndarray, M: np.ndarray) -> np.ndarray:
        batch = int(np.prod(np.broadcast_shapes(T.shape[:-2], M.shape[:-2])))
        self.flops += 2 * batch * T.shape[-2] * M.shape[-2] * M.shape[-1]
        return np.matmul(T, M)

    # ------------------------------------------------------------ cumulants
    def cumulants(self) -> dict[int, np.ndarray]:
        """kappa(block) for every block (a bitmask of factors) with a nonzero
        value: the sum of the paths and cycles through exactly its factors."""
        F = self.factors
        kappa: dict[int, np.ndarray] = {}

        def add(mask: int, value: np.ndarray) -> None:
            kappa[mask] = value if mask not in kappa else kappa[mask] + value

        # states: (mask, start, exit factor, exit leg) -> tensor; start is
        # ("lin", f), ("mean", f, leg) or ("cycle", f)
        frontier: dict[tuple[Any, ...], np.ndarray] = {}
        for k, f in enumerate(F):
            if f.linear:  # its leg is the exit: closing it as a singleton gives the mean
                dim = self.mean_of(f.legs[0]).shape[-1]
                frontier[(1 << k, ("lin", k), k, 0)] = self._open_identity(dim, f)
            else:
                for l in (0, 1):
                    m = self.matmul(self.mean(f.legs[l]), self.bond(f, l))  # (.., 1, exit)
                    frontier[(1 << k, ("mean", k, l), k, 1 - l)] = m
                frontier[(1 << k, ("cycle", k), k, 1)] = self.bond(f, 0)
        while frontier:
            grown: dict[tuple[Any, ...], np.ndarray] = {}
            for (mask, start, k, l), T in frontier.items():
                x = F[k].legs[l]
                self._close(mask, start, k, x, T, add)
                for g, f in enumerate(F):
                    if mask >> g & 1 or start[0] == "cycle" and g < start[1]:
                        continue
                    if start[0] == "cycle" and f.linear:
                        continue
                    for y_leg in range(len(f.legs)):
                        G = self.link(x, f.legs[y_leg])
                        if G is None:
                            continue
                        if f.linear:  # the path ends here, at a linear factor
                            if start[0] == "lin" and start[1] < g:  # counted once: from the smaller linear end
                                add(mask | 1 << g, self._to_open(self.matmul(T, G), f))
                            continue
                        U = self.matmul(self.matmul(T, G), self.bond(f, y_leg))
                        key = (mask | 1 << g, start, g, 1 - y_leg)
                        grown[key] = U if key not in grown else grown[key] + U
            frontier = grown
        return kappa

    def _close(self, mask: int, start: tuple[Any, ...], k: int, x: Leg, T: np.ndarray, add: Any) -> None:
        """Contributions of a state that ends at its exit leg x."""
        if start[0] == "cycle":
            s = self.factors[start[1]]
            G = self.link(x, s.legs[0])
            if G is not None:  # back to the start's entry leg: a trace over (start, exit)
                add(mask, (T * np.swapaxes(G, -1, -2)).sum(axis=(-1, -2), keepdims=True))
            return
        if start[0] == "lin" or start[1] < k or start[1] == k and start[2] == 0:
            # a singleton at the exit: counted once (from the linear end; else
            # from the smaller factor; a lone factor from its first leg)
            add(mask, (T * self.mean(x)).sum(axis=-1, keepdims=True))

    def _open_identity(self, dim: int, f: Factor) -> np.ndarray:
        eye = np.eye(dim)
        return _as7(eye, (_E if f.side == 0 else _F, _X))

    def _to_open(self, T: np.ndarray, f: Factor) -> np.ndarray:
        """The exit index of T becomes the open output of linear factor f."""
        axis = _E if f.side == 0 else _F
        return np.swapaxes(T, axis, _X)

    # --------------------------------------------------------- partitions
    def moment(self) -> np.ndarray:
        kappa = self.cumulants()
        n = len(self.factors)
        memo: dict[int, np.ndarray | None] = {0: np.ones((1,) * 7)}

        def total(mask: int) -> np.ndarray | None:
            if mask not in memo:
                low = mask & -mask  # the block holding the lowest factor
                rest = mask & ~low
                acc = None
                members = [b for b in range(n) if rest >> b & 1]
                for r in range(len(members) + 1):
                    for extra in combinations(members, r):
                        block = low | sum(1 << b for b in extra)
                        if block not in kappa:
                            continue
                        others = total(mask & ~block)
                        if others is None:
                            continue
                        term = kappa[block] * others
                        acc = term if acc is None else acc + term
                memo[mask] = acc
            return memo[mask]

        out = total((1 << n) - 1)
        return np.zeros((1,) * 7) if out is None else out


def moment(factors: list[Factor], gram: Gram, mean: Mean) -> tuple[np.ndarray, int]:
    """E[product of the factors] as a 7-axis tensor (P, A, B, E, F, 1, 1)
    (see the module docstring), and the flops of the matrix products.

    ``gram(x, y)``: the covariance of legs x and y, (heads, dx, dy) when they
    are on one side (the head shared), (heads of x, dx, heads of y, dy)
    across sides, None when they are uncorrelated; ``mean(x)``: (heads, dx)."""
    engine = _Engine(factors, gram, mean)
    value = engine.moment()
    return value, engine.flops
