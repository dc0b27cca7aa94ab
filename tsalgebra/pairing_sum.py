"""The one mechanism behind the exact inner products: contract two networks
summed over pairings of their input legs.

A pairing joins some input legs in pairs and feeds the others (singletons)
a vector.  The pair join is a symmetric matrix J (the padded covariance, or
the identity for the symmetric product), factored once as J = F diag(w) F^T,
so that a pair costs nothing in the contraction: each leg's owning tensor is
multiplied by F once per call, the two legs are identified, and the weights
w ride on the shared index as a vector (a hyperedge).  A singleton leg is
contracted with the mean vector once per call, in its owner.  What remains
per pairing is a contraction of the two models' factors alone.

Pairings are grouped into orbits under the declared symmetries of the two
networks (and their exchange when they are equal); one planned contraction
per orbit, weighted by the orbit size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import opt_einsum as oe

from . import pairings as P
from .expr import Network, Tensor
from .planner import ContractionPlan, plan

__all__ = ["CostError", "Joins", "PairingPlan", "orbit_sum", "plan_pairings", "lift", "MAX_PAIRINGS"]

MAX_PAIRINGS = 1_000_000  # pairings walked to find orbits (a Python-speed loop)
_SEARCH_ORBITS = 64  # above this many orbits, plan each with the greedy optimizer
OUTER = "outer"  # out_mask value: keep both output legs open (the matrix E[f_o g_o'])


class CostError(ValueError):
    """A computation whose estimated cost exceeds the budget; nothing was allocated."""


@dataclass(frozen=True)
class Joins:
    """How input legs meet: pairs through ``matrix`` = F diag(w) F^T
    (``factor`` F is None for the identity, ``weights`` w None for ones),
    singletons through ``mean`` (None: singletons are not allowed, as in the
    symmetric product's bijections)."""

    kind: str  # "gaussian" (partial matchings) or "symmetric" (bijections)
    matrix: np.ndarray
    factor: np.ndarray | None
    weights: np.ndarray | None
    mean: np.ndarray | None

    @classmethod
    def identity(cls, width: int, exact: bool) -> "Joins":
        eye = np.eye(width, dtype=int).astype(object) if exact else np.eye(width)
        return cls("symmetric", eye, None, None, None)

    @classmethod
    def gaussian(cls, mean: np.ndarray, cov: np.ndarray) -> "Joins":
        """Padded mean [1; m] and padded covariance [[0, 0], [0, C]]."""
        off_diagonal = cov.copy()
        np.fill_diagonal(off_diagonal, 0)
        if not off_diagonal.any():  # diagonal: no factor needed
            return cls("gaussian", cov, None, np.diag(cov).copy(), mean)
        F, w = _factor(cov)
        return cls("gaussian", cov, F, w, mean)


def _factor(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C = F diag(w) F^T with exact LDL^T for object arrays, eigh for floats
    (zero directions dropped)."""
    if C.dtype != object:
        lam, V = np.linalg.eigh(C)
        keep = lam > 1e-14 * max(1.0, float(np.abs(lam).max()))
        return V[:, keep], lam[keep]
    A = C.copy()
    cols, ws = [], []
    for k in range(A.shape[0]):
        pivot = A[k, k]
        if pivot == 0:
            if any(A[i, k] != 0 for i in range(A.shape[0])):
                raise ValueError("cov is not positive semi-definite")
            continue
        col = A[:, k] / pivot
        cols.append(col)
        ws.append(pivot)
        A = A - pivot * np.outer(col, col)
    return np.array(cols, dtype=object).T.reshape(C.shape[0], len(cols)), np.array(ws, dtype=object)


def lift(net: Network, k: int, exact: bool) -> Network:
    """Raise a network to degree k with extra input legs fed the constant e0
    (x~_0 = 1, so the function is unchanged).  The new legs are interchangeable."""
    extra = k - net.degree
    if extra <= 0:
        return net
    if not net.inputs:
        raise ValueError("cannot lift a constant network without knowing the input width")
    e0 = np.zeros(net.sizes[net.inputs[0]], dtype=object if exact else float)
    e0[0] = 1
    new = tuple(Tensor.of(f"#e{j}", (f"#l{j}",), e0) for j in range(extra))
    n0 = net.degree
    syms = [tuple(p) + tuple(range(n0, k)) for p in net.symmetries]
    for j in range(n0, k - 1):
        syms.append(tuple(j + 1 if i == j else j if i == j + 1 else i for i in range(k)))
    return Network(net.tensors + new, net.inputs + tuple(t.legs[0] for t in new), net.outputs, syms)


def same_network(a: Network, b: Network) -> bool:
    """Identical wiring and equal data: exchanging the two sides is then a
    symmetry of every pairing term."""
    if a is b:
        return True
    if a.einsum()[0] != b.einsum()[0] or a.symmetries != b.symmetries:
        return False
    return all(
        x.shape == y.shape and x.data is not None and y.data is not None
        and bool(np.all(np.asarray(x.data) == np.asarray(y.data)))
        for x, y in zip(a.tensors, b.tensors)
    )


@dataclass
class Tally:
    contractions: int = 0
    flops: int = 0
    pairings: int = 0
    orbits: int = 0

    def add(self, other: "Tally") -> None:
        self.contractions += other.contractions
        self.flops += other.flops
        self.pairings += other.pairings
        self.orbits += other.orbits


class _Joiner:
    """Builds the network of one pairing.  Owner tensors get variants, cached
    across pairings: a singleton leg contracted with the mean, a paired leg
    multiplied by F (and, on one side of each pair, by the weights w), the
    output leg of side A multiplied by the output mask.  Joined legs are then
    identified, so every pairwise step stays a plain matrix product."""

    def __init__(self, legs: tuple[str, ...], tensors: list[Tensor], joins: Joins, out_leg: str | None) -> None:
        self.legs, self.tensors, self.joins = legs, tensors, joins
        owners: dict[str, list[int]] = {l: [] for l in legs + ((out_leg,) if out_leg else ())}
        for t_idx, t in enumerate(tensors):
            for l in t.legs:
                if l in owners:
                    owners[l].append(t_idx)
        self.owner = {l: (ix[0] if len(ix) == 1 else None) for l, ix in owners.items()}
        self.out_leg = out_leg
        self.cache: dict[tuple[int, tuple[tuple[str, str], ...]], Tensor] = {}
        self.flops = 0

    def _apply(self, data: Any, legs: list[str], leg: str, role: str, vector: Any) -> Any:
        ax = legs.index(leg)
        if role == "single":
            legs.pop(ax)
            return np.tensordot(data, vector, axes=([ax], [0]))
        if role in ("pair", "pairw") and self.joins.factor is not None:
            data = np.moveaxis(np.tensordot(data, self.joins.factor, axes=([ax], [0])), -1, ax)
        if role == "pairw" and self.joins.weights is not None or role == "mask":
            w = self.joins.weights if role == "pairw" else vector
            data = data * w.reshape((-1,) + (1,) * (data.ndim - ax - 1))
        return data

    def variant(self, t_idx: int, roles: dict[str, str], mask: Any = None) -> Tensor:
        t = self.tensors[t_idx]
        return self.variant_by_key((t_idx, tuple(sorted((l, r) for l, r in roles.items() if l in t.legs))), mask)

    def variant_by_key(self, key: tuple[int, tuple[tuple[str, str], ...]], mask: Any = None) -> Tensor:
        t = self.tensors[key[0]]
        if key not in self.cache:
            data, legs = t.data, list(t.legs)
            for leg, role in key[1]:
                if role != "raw":
                    data = self._apply(data, legs, leg, role, mask if role == "mask" else self.joins.mean)
                    self.flops += 2 * int(np.prod(t.shape))
            self.cache[key] = Tensor.of(t.name, tuple(legs), data)
        return self.cache[key]

    def network(self, partner: tuple[int, ...], out_legs: tuple[str, ...],
                out_mask: np.ndarray | None) -> tuple[Network, list[tuple[Any, ...]]]:
        """The pairing's network and, per tensor, a reference to where its data
        comes from (so a compiled contraction can be rerun on new weights).
        ``out_legs``: (a_out, b_out) joined and summed through ``out_mask`` (a
        vector over output channels), shared and left open when ``out_mask`` is
        None, or both left open (a matrix) when it is :data:`OUTER`;
        a single leg stays open."""
        legs, roles, rename = self.legs, {}, {}
        extra: list[tuple[Tensor, tuple[Any, ...]]] = []
        for i, j in enumerate(partner):
            if j == i:
                roles[legs[i]] = "single"
            elif i < j:
                oi, oj = self.owner[legs[i]], self.owner[legs[j]]
                if oi is None or oj is None or oi == oj:  # rare: keep an explicit join matrix
                    roles[legs[i]] = roles[legs[j]] = "raw"
                    m = self.joins.matrix
                    extra.append((Tensor(f"#c{i}", (legs[i], legs[j]), m.shape, m), ("matrix",)))
                    continue
                roles[legs[i]], roles[legs[j]] = "pairw", "pair"
                rename[legs[j]] = legs[i]
        out: tuple[str, ...] = out_legs
        if len(out_legs) == 2 and isinstance(out_mask, str):  # OUTER: both outputs stay open
            pass
        elif len(out_legs) == 2:
            rename[out_legs[1]] = out_legs[0]
            out = (out_legs[0],)
            if out_mask is not None:
                if self.owner[out_legs[0]] is None:
                    extra.append((Tensor.of("#out", (out_legs[0],), out_mask), ("mask",)))
                else:
                    roles[out_legs[0]] = "mask"
                out = ()
        touched = {self.owner[l] for l, r in roles.items() if r != "raw"} - {None}
        entries: list[tuple[Tensor, tuple[Any, ...]]] = []
        for k, t in enumerate(self.tensors):
            if k in touched:
                key = (k, tuple(sorted((l, r) for l, r in roles.items() if l in t.legs)))
                entries.append((self.variant_by_key(key, out_mask), ("variant", key)))
            else:
                entries.append((t, ("tensor", k)))
        entries = [(t.relabel(rename), ref) for t, ref in entries] + extra
        return Network(tuple(t for t, _ in entries), (), out), [ref for _, ref in entries]

    def resolve(self, ref: tuple[Any, ...], out_mask: Any) -> Any:
        """The array a reference of :meth:`network` points to, for this call's weights."""
        if ref[0] == "variant":
            return self.variant_by_key(ref[1], out_mask).data
        if ref[0] == "tensor":
            return self.tensors[ref[1]].data
        return {"matrix": self.joins.matrix, "mask": out_mask}[ref[0]]


# Compiled orbit contractions, keyed by everything but the weights: a warm call
# (same architectures, new or same weights) reruns them without planning.
_RECIPES: "OrderedDict[Any, list[tuple[int, Any, list[tuple[Any, ...]], ContractionPlan]]]" = OrderedDict()
_RECIPES_MAX = 64


def _recipe_key(tensors: list[Tensor], legs: tuple[str, ...], out_legs: tuple[str, ...], joins: Joins,
                masked: Any, gens: tuple[tuple[int, ...], ...]) -> Any:
    shape = lambda a: None if a is None else tuple(np.shape(a))  # noqa: E731
    return (tuple((t.name, t.legs, t.shape) for t in tensors), legs, out_legs, joins.kind, shape(joins.factor),
            shape(joins.weights), shape(joins.mean), masked, gens)


@dataclass(frozen=True)
class PairingPlan:
    """What :func:`orbit_sum` contracts: the raw pairings, their orbits, and
    one contraction plan per orbit (planned from shapes; nothing contracted)."""

    kind: str
    input_legs: int
    pairings: int
    orbit_sizes: tuple[int, ...]
    plans: tuple[ContractionPlan, ...]

    @property
    def orbits(self) -> int:
        return len(self.orbit_sizes)

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.plans)

    @property
    def largest_intermediate(self) -> int:
        return max(p.largest_intermediate for p in self.plans)

    @property
    def costliest(self) -> ContractionPlan:
        return max(self.plans, key=lambda p: p.flops)


def _recipe(A: Network, B: Network | None, joins: Joins, out_mask: np.ndarray | None, budget: float,
            use_orbits: bool) -> tuple[_Joiner, list[tuple[int, Any, list[tuple[Any, ...]], ContractionPlan]], int, int]:
    """(joiner for this call's weights, compiled orbit contractions, raw pairings, input legs).
    Raises :class:`CostError` before planning when the pairings are too many
    to walk or the estimated flops exceed ``budget``."""
    ka = A.degree
    n = ka + (B.degree if B is not None else 0)
    raw = P.count_pairings(joins.kind, n)
    if raw > MAX_PAIRINGS:
        raise CostError(
            f"exact {joins.kind} enumeration over {n} input legs has {raw:,} pairings (limit {MAX_PAIRINGS:,}); "
            "use inner='network', or method='closure' (approximate, gaussian only), or a smaller input width "
            "(Gauss-Hermite quadrature is exact when d is small)"
        )
    A = A.fresh("a.")
    gens = [tuple(p) + tuple(range(ka, n)) for p in A.symmetries]
    tensors, legs, out_legs = list(A.tensors), A.inputs, A.outputs
    if B is not None:
        B = B.fresh("b.")
        gens += [tuple(range(ka)) + tuple(ka + q for q in p) for p in B.symmetries]
        # exchanging the sides transposes an OUTER result: not a symmetry there
        if ka == B.degree and not isinstance(out_mask, str) and same_network(A, B):
            gens.append(tuple(range(ka, n)) + tuple(range(ka)))
        tensors += list(B.tensors)
        legs, out_legs = legs + B.inputs, out_legs + B.outputs
    gens_used = tuple(gens) if use_orbits else ()
    orbits = P.orbits(joins.kind, n, gens_used)
    joiner = _Joiner(legs, tensors, joins, out_legs[0] if B is not None else None)
    mode = out_mask if isinstance(out_mask, str) else out_mask is not None
    key = _recipe_key(tensors, legs, out_legs, joins, mode, gens_used)
    recipe = _RECIPES.get(key)
    estimate = (sum(p.flops for _, _, _, p in recipe) if recipe is not None
                else len(orbits) * plan(joiner.network(orbits[0][0], out_legs, out_mask)[0]).flops)
    if estimate > budget:
        raise CostError(
            f"exact {joins.kind} inner product: {len(orbits):,} orbit contractions, about {estimate:.3g} flops, "
            f"exceed the budget of {budget:.3g}; raise budget=..., or use inner='network', "
            "or method='closure' (approximate, gaussian only)"
        )
    if recipe is None:
        recipe = []
        # thousands of orbit networks: an exhaustive search for each would cost
        # more than the contractions it saves, so many orbits take greedy orders
        optimizer = "greedy" if len(orbits) > _SEARCH_ORBITS else None
        for partner, size in orbits:
            net, refs = joiner.network(partner, out_legs, out_mask)
            p = plan(net, optimizer=optimizer)
            expr = oe.contract_expression(p.equation, *p.shapes, optimize=[tuple(q) for q in p.path] or [(0,)])
            recipe.append((size, expr, refs, p))
        _RECIPES[key] = recipe
        if len(_RECIPES) > _RECIPES_MAX:
            _RECIPES.popitem(last=False)
    else:
        _RECIPES.move_to_end(key)
    return joiner, recipe, raw, n


def plan_pairings(A: Network, B: Network | None, joins: Joins, out_mask: np.ndarray | None,
                  budget: float = float("inf"), use_orbits: bool = True) -> PairingPlan:
    """The plan of :func:`orbit_sum` with the same arguments (and the same
    CostError), without contracting; the compiled orbits are kept for it."""
    _, recipe, raw, n = _recipe(A, B, joins, out_mask, budget, use_orbits)
    return PairingPlan(joins.kind, n, raw, tuple(size for size, _, _, _ in recipe), tuple(p for _, _, _, p in recipe))


def orbit_sum(A: Network, B: Network | None, joins: Joins, out_mask: np.ndarray | None,
              budget: float, use_orbits: bool = True) -> tuple[Any, Tally]:
    """Sum over every pairing of the input legs of A (and B) of the joined
    contraction, once per orbit and weighted by the orbit size.

    With B, the outputs are summed through ``out_mask`` (a 0/1 vector over
    channels), kept as one value per channel if it is None, or as the full
    matrix over pairs of channels if it is :data:`OUTER`; without B the
    result is A's expectation, one value per output channel.  Raises
    :class:`CostError` before contracting anything when the pairings are too
    many to walk or the orbit contractions exceed ``budget`` flops.
    """
    joiner, recipe, raw, _ = _recipe(A, B, joins, out_mask, budget, use_orbits)
    exact = any(getattr(t.data, "dtype", None) == object for t in joiner.tensors) or joins.matrix.dtype == object
    backend = "object" if exact else "numpy"
    total: Any = 0
    tally = Tally(pairings=raw, orbits=len(recipe))
    for size, expr, refs, p in recipe:
        value = expr(*(joiner.resolve(r, out_mask) for r in refs), backend=backend)
        total = total + size * value
        tally.contractions += 1
        tally.flops += p.flops
    tally.flops += joiner.flops
    return total, tally
