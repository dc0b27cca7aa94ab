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

Every path and cycle is counted once: a path with one linear end from its
other end, so that the open index appears only at its last step (states
carry no output axis); a path between two linear factors from the smaller
one; a path between two singletons from the smaller of its end factors (a
lone factor from its first leg); a cycle from its smallest factor, entered
through that factor's first leg.

Tensors carry a fixed axis layout ``(P, A, B, E, F, S, X)``: position tuples,
the heads of side a and of side b (each factor belongs to one side; a side's
factors share its head), the open outputs of side a's and side b's linear
factors (at most one each), a cycle's start leg, and the current exit leg;
absent axes have size 1 and broadcast.  With ``paired`` the two sides' heads
share axis A: the providers then answer for a list of head pairs (one entry
per pair on A, B of size 1), which lets a caller run only the pairs it needs
(one model against itself: the pairs A <= B).  The same dynamic programme runs on
shapes alone (:func:`moment` with ``dry=True``) to count the flops and the
largest tensor before anything is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable

import math

import numpy as np

__all__ = ["Factor", "Leg", "MomentCost", "moment"]

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
    bond: Any = field(default=None, repr=False)

    @property
    def side(self) -> int:
        return self.legs[0].side

    @property
    def linear(self) -> bool:
        return len(self.legs) == 1


@dataclass(frozen=True)
class MomentCost:
    """Flops of the matrix products, the elements of the largest tensor, and
    (dry runs) the most elements the programme's tensors hold at once."""

    flops: int
    largest: int
    peak: int = 0


class _Ledger:
    """Elements held by the dry run's live tensors, and their peak: the dry
    run keeps and drops its shapes where the real run keeps and drops its
    arrays (the same code holds them), so this is the real run's footprint."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def take(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)


class _Shape:
    """An array reduced to its shape (the dry run's values); counted in a
    ledger while it lives, unless it stands for a view."""

    __slots__ = ("shape", "ledger", "size")

    def __init__(self, shape: tuple[int, ...], ledger: _Ledger | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.ledger, self.size = ledger, math.prod(self.shape)
        if ledger is not None:
            ledger.take(self.size)

    def __del__(self) -> None:
        if self.ledger is not None:
            self.ledger.live -= self.size


class _Ops:
    """The array operations of the programme, on numpy arrays or, dry, on
    shapes; counts flops and the largest tensor either way."""

    def __init__(self, dry: bool) -> None:
        self.dry, self.flops, self.largest = dry, 0, 0
        self.ledger = _Ledger()

    def _new(self, shape: tuple[int, ...]) -> _Shape:
        return _Shape(shape, self.ledger)

    def _seen(self, shape: tuple[int, ...]) -> None:
        self.largest = max(self.largest, math.prod(shape))

    def as7(self, x: Any, axes: tuple[int, ...]) -> Any:
        """``x`` with its axes placed at ``axes`` of the layout, size 1 elsewhere."""
        shape = [1] * 7
        for ax, n in zip(axes, x.shape):
            shape[ax] = n
        if self.dry:
            return self._new(tuple(shape))
        order = np.argsort(axes)
        return np.transpose(x, order).reshape(shape)

    def kept(self, x: Any) -> Any:
        """``x`` laid out contiguously, for an operand the programme reuses:
        a strided one is copied again at every product that reads it."""
        return x if self.dry or x is None else np.ascontiguousarray(x)

    def eye(self, dim: int, axes: tuple[int, int]) -> Any:
        return self.as7(_Shape((dim, dim)) if self.dry else np.eye(dim), axes)

    def matmul(self, T: Any, M: Any) -> Any:
        batch = tuple(max(s, t) for s, t in zip(T.shape[:-2], M.shape[:-2]))  # both have 7 axes
        self.flops += 2 * math.prod(batch) * T.shape[-2] * M.shape[-2] * M.shape[-1]
        shape = tuple(batch) + (T.shape[-2], M.shape[-1])
        self._seen(shape)
        return self._new(shape) if self.dry else _folded_matmul(T, M, batch)

    def mul(self, T: Any, U: Any) -> Any:
        shape = tuple(max(s, t) for s, t in zip(T.shape, U.shape))
        self._seen(shape)
        return self._new(shape) if self.dry else T * U

    def add(self, T: Any, U: Any) -> Any:
        return self._new(tuple(max(s, t) for s, t in zip(T.shape, U.shape))) if self.dry else T + U

    def accumulate(self, acc: Any, term: Any) -> Any:
        """acc + term, written into ``acc`` when it has the sum's shape: only
        for an ``acc`` that the programme made and holds nowhere else (a
        product's result), so the sums over partitions and paths allocate
        no new tensor per term."""
        if tuple(max(s, t) for s, t in zip(acc.shape, term.shape)) != tuple(acc.shape):
            return self.add(acc, term)
        if not self.dry:
            np.add(acc, term, out=acc)
        return acc

    def sum(self, T: Any, axes: tuple[int, ...]) -> Any:
        if self.dry:
            return self._new(tuple(1 if k in axes else s for k, s in enumerate(T.shape)))
        return T.sum(axis=axes, keepdims=True)

    def swap(self, T: Any, a: int, b: int) -> Any:
        if self.dry:
            s = list(T.shape)
            s[a], s[b] = s[b], s[a]
            return _Shape(tuple(s))
        return np.swapaxes(T, a, b)

    def ones(self) -> Any:
        return _Shape((1,) * 7) if self.dry else np.ones((1,) * 7)


def _folded_matmul(T: np.ndarray, M: np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """T @ M with the trailing batch axes along which M is constant folded
    into the rows of T (a view where T is contiguous), the others left to
    matmul's broadcasting: one product per remaining batch entry, each of a
    block of rows (numpy's broadcast matmul over every batch axis multiplies
    single rows, far below the machine's rate; regrouping the axes by
    transposition instead copies an operand at every product, which cost
    more than it saved here)."""
    k0 = 5
    while k0 > 0 and M.shape[k0 - 1] == 1:
        k0 -= 1
    rows = T.shape[k0:6]
    out = np.matmul(T.reshape(T.shape[:k0] + (math.prod(rows), T.shape[6])), M.reshape(M.shape[:k0] + M.shape[5:]))
    return out.reshape(batch[:k0] + rows + (M.shape[6],))


Gram = Callable[[Leg, Leg], Any]
Mean = Callable[[Leg], Any]


class _Engine:
    def __init__(self, factors: list[Factor], gram: Gram, mean: Mean, dry: bool, paired: bool = False) -> None:
        self.factors, self.gram_of, self.mean_of = factors, gram, mean
        self.ops = _Ops(dry)
        self.heads = (_A, _A if paired else _B)  # each side's head axis
        self.paired = paired
        self._links: dict[tuple[Leg, Leg], Any] = {}
        self._steps: dict[tuple[Any, ...], Any] = {}

    # ------------------------------------------------------ building blocks
    def link(self, x: Leg, y: Leg) -> Any:
        """The covariance of legs x and y as a matrix on (S, X) = (x index,
        y index), heads on A/B; None when they are uncorrelated."""
        if (x, y) not in self._links:
            g = self.gram_of(x, y)
            if g is not None:
                if x.side == y.side or self.paired:  # (heads, dx, dy), one head (or head pair) for both
                    axes: tuple[int, ...] = (self.heads[x.side], _S, _X)
                else:  # (heads of x, dx, heads of y, dy)
                    axes = (_A, _S, _B, _X) if x.side == 0 else (_B, _S, _A, _X)
                g = self.ops.kept(self.ops.as7(g, axes if len(g.shape) == len(axes) else (_P,) + axes))  # optionally per tuple
            self._links[(x, y)] = g
        return self._links[(x, y)]

    def step(self, x: Leg, g: int, entry: int) -> Any:
        """Covariance of exit leg x with factor g's leg ``entry``, times g's
        bond from that leg: one matrix per step of a path, formed once."""
        key = (x, g, entry)
        if key not in self._steps:
            G = self.link(x, self.factors[g].legs[entry])
            self._steps[key] = None if G is None else self.ops.kept(self.ops.matmul(G, self.bond(self.factors[g], entry)))
        return self._steps[key]

    def bond(self, f: Factor, entry: int) -> Any:
        """The bond as a matrix (entry leg index, exit leg index)."""
        W = self.ops.as7(f.bond, (_P, self.heads[f.side], _S, _X))
        return W if entry == 0 else self.ops.swap(W, _S, _X)

    def mean(self, x: Leg) -> Any:
        """The leg's mean as a row vector on X."""
        m = self.mean_of(x)
        axes = (self.heads[x.side], _X)
        return self.ops.as7(m, axes if len(m.shape) == 2 else (_P,) + axes)  # optionally per tuple

    def to_open(self, T: Any, f: Factor) -> Any:
        """The exit index of T becomes the open output of linear factor f."""
        return self.ops.swap(T, _E if f.side == 0 else _F, _X)

    # ------------------------------------------------------------ cumulants
    def cumulants(self) -> dict[int, Any]:
        """kappa(block) for every block (a bitmask of factors) with a nonzero
        value: the sum of the paths and cycles through exactly its factors."""
        F, ops = self.factors, self.ops
        kappa: dict[int, Any] = {}

        def add(mask: int, value: Any) -> None:
            kappa[mask] = value if mask not in kappa else ops.add(kappa[mask], value)

        # states (factors visited, start, exit factor, exit leg) -> tensor,
        # the start being ("lin", f), ("mean", f, leg) or ("cycle", f)
        frontier: dict[tuple[Any, ...], Any] = {}
        last_linear = max((k for k, f in enumerate(F) if f.linear), default=-1)
        for k, f in enumerate(F):
            if f.linear:
                add(1 << k, self.to_open(self.mean(f.legs[0]), f))  # its leg a singleton
                if k < last_linear:  # a path towards a later linear factor starts here
                    dim = self.mean_of(f.legs[0]).shape[-1]
                    frontier[(1 << k, ("lin", k), k, 0)] = ops.eye(dim, (_E if f.side == 0 else _F, _X))
            else:
                for l in (0, 1):
                    frontier[(1 << k, ("mean", k, l), k, 1 - l)] = ops.matmul(self.mean(f.legs[l]), self.bond(f, l))
                frontier[(1 << k, ("cycle", k), k, 1)] = self.bond(f, 0)
        while frontier:
            grown: dict[tuple[Any, ...], Any] = {}
            for (mask, start, k, l), T in frontier.items():
                x = F[k].legs[l]
                self._close(mask, start, k, x, T, add)
                for g, f in enumerate(F):
                    if mask >> g & 1 or start[0] == "cycle" and (g < start[1] or f.linear):
                        continue
                    for y_leg in range(len(f.legs)):
                        if f.linear:  # the path ends here, at a linear factor
                            G = self.link(x, f.legs[y_leg])
                            if G is not None and (start[0] == "mean" or start[1] < g):
                                add(mask | 1 << g, self.to_open(ops.matmul(T, G), f))
                            continue
                        GW = self.step(x, g, y_leg)
                        if GW is None:
                            continue
                        U = ops.matmul(T, GW)
                        key = (mask | 1 << g, start, g, 1 - y_leg)
                        grown[key] = U if key not in grown else ops.accumulate(grown[key], U)
            frontier = grown
        return kappa

    def _close(self, mask: int, start: tuple[Any, ...], k: int, x: Leg, T: Any, add: Any) -> None:
        """Contributions of a state that ends at its exit leg x."""
        ops = self.ops
        if start[0] == "cycle":
            G = self.link(x, self.factors[start[1]].legs[0])
            if G is not None:  # back to the start's first leg: a trace over (start, exit)
                add(mask, ops.sum(ops.mul(T, ops.swap(G, _S, _X)), (_S, _X)))
        elif start[0] == "mean" and (start[1] < k or start[1] == k and start[2] == 0):
            add(mask, ops.sum(ops.mul(T, self.mean(x)), (_X,)))  # a singleton at the exit

    # --------------------------------------------------------- partitions
    def moment(self) -> Any:
        kappa = self.cumulants()
        memo: dict[int, Any] = {0: self.ops.ones()}
        out = self._total((1 << len(self.factors)) - 1, kappa, memo)
        return out if out is not None else (_Shape((1,) * 7) if self.ops.dry else np.zeros((1,) * 7))

    def _total(self, mask: int, kappa: dict[int, Any], memo: dict[int, Any]) -> Any:
        """Sum over the set partitions of ``mask`` (None: every term vanishes).
        A method, not a closure: a recursive closure is a reference cycle,
        which would keep every tensor of ``memo`` and ``kappa`` until the
        garbage collector ran."""
        if mask not in memo:
            ops = self.ops
            low = mask & -mask  # the block holding the lowest factor
            members = [b for b in range(len(self.factors)) if (mask & ~low) >> b & 1]
            acc = None
            for r in range(len(members) + 1):
                for extra in combinations(members, r):
                    block = low | sum(1 << b for b in extra)
                    others = self._total(mask & ~block, kappa, memo) if block in kappa else None
                    if others is not None:
                        term = ops.mul(kappa[block], others)
                        acc = term if acc is None else ops.accumulate(acc, term)
            memo[mask] = acc
        return memo[mask]


def moment(factors: list[Factor], gram: Gram, mean: Mean, dry: bool = False,
           paired: bool = False) -> tuple[Any, MomentCost]:
    """E[product of the factors] as a tensor (P, A, B, E, F, 1, 1) (see the
    module docstring), and the cost of computing it; ``paired``: (P, pairs,
    1, E, F, 1, 1), the providers answering per head pair.

    ``gram(x, y)``: the covariance of legs x and y, (heads, dx, dy) when they
    are on one side (the head shared), (heads of x, dx, heads of y, dy)
    across sides (paired: (pairs, dx, dy) either way), None when they are
    uncorrelated; ``mean(x)``: (heads, dx) (paired: (pairs, dx)); a bond's
    heads axis 1 or, paired, the pairs'.
    Either may carry a leading axis of the position tuples (P or 1), for
    legs whose law differs from tuple to tuple (correlated positions).
    With ``dry`` the providers and bonds may answer anything with a
    ``.shape``: the same programme runs on shapes, returns the result's shape
    and its cost, and computes nothing."""
    engine = _Engine(factors, gram, mean, dry, paired)
    value = engine.moment()
    return value, MomentCost(engine.ops.flops, engine.ops.largest, engine.ops.ledger.peak)
