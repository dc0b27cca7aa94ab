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

import contextlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import numpy as np
import opt_einsum as oe

from . import messages
from . import pairings as P
from .expr import Network, Tensor
from .measure import Gaussian, Tokens, block_diagonal
from .planner import ContractionPlan, choose_optimizer, plan, plan_equation
from .problem import CostError, format_count
from .progress import advancer
from .threads import one_blas_thread

__all__ = ["Joins", "PairingPlan", "Tally", "orbit_sum", "plan_pairings", "run_pairings", "lift", "MAX_ORBITS",
           "MAX_PAIRINGS", "OUTER"]

MAX_PAIRINGS = 1_000_000  # pairings walked to find orbits (a Python-speed loop)
# Orbits planned at most: each orbit's contraction order is searched and run
# at Python speed, 1.5-2.6 ms apiece whatever its own flops (measured on a
# one-head attention model of d_model 3: 9,496 Gaussian orbits planned in
# 25 s; under the token measure 29,646 orbits of 2.7 KFLOP each, which no
# flop budget stopped, would have taken over a minute).
MAX_ORBITS = 10_000
# Up to this many orbits, each is counted by its greedy order (about a ms),
# then searched; above, each keeps its greedy order.
_SEARCH_ORBITS = 64
# Above _SEARCH_ORBITS, a refusal extrapolates at least this many orbits,
# drawn over every stratum (:func:`_visits`): about 50 ms of planning.  The
# first orbits of the list (mostly singletons) are the cheapest: extrapolated
# alone they put a 2-layer stack 22x low.
_MIN_SAMPLE = 32
# Up to _SEARCH_ORBITS, a refusal searches orbits (costliest first) until its
# upper bound is within this factor of its lower bound: 7 to 13 of 54 orbit
# searches on 2-layer bilinear stacks, and the bound 1.05 to 1.5 times the
# full count (the greedy counts alone were 10 to 680 times it).
_BOUND_SLACK = 2.0
OUTER = "outer"  # out_mask value: keep both output legs open (the matrix E[f_o g_o'])


@dataclass(frozen=True, eq=False)
class Joins:
    """How input legs meet: pairs through ``matrix`` = F diag(w) F^T (``factor``
    F is None when the matrix is diagonal: then pairs are weighted by ``weights``
    alone), singletons through ``mean`` (None: singletons are not allowed, as in
    the symmetric product's bijections).  Made from shapes and a measure; the
    arrays are formed on first use (planning reads only ``width`` and ``rank``)."""

    kind: str  # "gaussian" (partial matchings), "symmetric" (bijections) or a token kind (groupings)
    width: int  # padded width of the legs
    rank: int | None  # columns of the factor; None: no factor
    exact: bool
    measure: Gaussian | Tokens | None = None

    @classmethod
    def identity(cls, width: int, exact: bool) -> "Joins":
        return cls("symmetric", width, None, exact)

    @classmethod
    def gaussian(cls, measure: Gaussian, exact: bool = False) -> "Joins":
        """Padded mean [1; m] and padded covariance [[0, 0], [0, C]] of the
        measure (one value per measure and exactness, so its arrays are formed
        once)."""
        per = _JOINS.setdefault(measure, {})
        if exact not in per:
            rank = None if measure.diagonal else measure.positions * len(measure.decomposition[1])
            per[exact] = cls("gaussian", measure.width + 1, rank, exact or measure.exact, measure)
        return per[exact]

    @classmethod
    def tokens(cls, measure: Tokens, exact: bool = False) -> "Joins":
        """The token measure's groupings: legs read the constant channel or a
        token's one-hot block (one value per measure and exactness)."""
        per = _JOINS.setdefault(measure, {})
        if exact not in per:
            kind = P.token_kind(measure.n_ctx or 1)
            per[exact] = cls(kind, measure.width + 1, None, exact or measure.exact, measure)
        return per[exact]

    @property
    def by_tokens(self) -> bool:
        """True for a token measure's groupings."""
        return self.kind.startswith("tokens")

    @property
    def vocab(self) -> int:
        return self.measure.vocab  # type: ignore[union-attr]

    def token_array(self, what: str, t: int = 0) -> np.ndarray:
        """e0 (the constant channel), the selection of token t's block, the
        identity over the vocabulary (a copy joining two indices of one token),
        or token t's distribution."""
        zero = (lambda shape: np.zeros(shape, dtype=object) if self.exact else np.zeros(shape))  # noqa: E731
        if what == "copy":
            eye = zero((self.vocab, self.vocab))
            eye[np.arange(self.vocab), np.arange(self.vocab)] = 1
            return eye
        if what == "e0":
            e = zero(self.width)
            e[0] = 1
            return e
        if what == "select":
            S = zero((self.width, self.vocab))
            S[1 + (t - 1) * self.vocab + np.arange(self.vocab), np.arange(self.vocab)] = 1
            return S
        return self.measure.token_probs(self.exact)[t - 1]  # type: ignore[union-attr]

    @property
    def key(self) -> tuple[Any, ...]:
        """Everything a planned contraction depends on."""
        return (self.kind, self.width, self.rank, self.exact)

    @cached_property
    def matrix(self) -> np.ndarray:
        if self.measure is None:
            return np.eye(self.width, dtype=int).astype(object) if self.exact else np.eye(self.width)
        return self.measure.padded_cov(self.exact)

    @cached_property
    def factor(self) -> np.ndarray | None:
        if self.rank is None:
            return None
        F, _ = self.measure.decomposition  # type: ignore[union-attr]
        F = F.astype(object) if self.exact else F.astype(float)
        out = np.zeros((self.width, self.rank), dtype=F.dtype)
        out[1:] = block_diagonal(F, self.measure.positions)  # type: ignore[union-attr]
        return out

    @cached_property
    def weights(self) -> np.ndarray | None:
        if self.measure is None:
            return None
        if self.rank is None:  # the padded diagonal [0; diag C per position], without forming C (width^2)
            m = self.measure
            diag = m.variances  # type: ignore[union-attr]
            diag = np.tile(diag.astype(object) if self.exact else diag.astype(float), m.positions)  # type: ignore[union-attr]
            return np.concatenate([np.zeros(1, dtype=diag.dtype), diag])
        w = self.measure.decomposition[1]
        return np.tile(w.astype(object) if self.exact else w.astype(float), self.measure.positions)

    @cached_property
    def mean(self) -> np.ndarray | None:
        return None if self.measure is None else self.measure.padded_mean(self.exact)


_JOINS: "weakref.WeakKeyDictionary[Gaussian, dict[bool, Joins]]" = weakref.WeakKeyDictionary()


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
    flops: float = 0
    pairings: int = 0
    orbits: int = 0

    def add(self, other: "Tally") -> None:
        self.contractions += other.contractions
        self.flops += other.flops
        self.pairings += other.pairings
        self.orbits += other.orbits


class _Joiner:
    """Builds the network of one pairing.  Owner tensors get variants: a
    singleton leg contracted with the mean, a paired leg multiplied by F (and,
    on one side of each pair, by the weights w), the output leg of side A
    multiplied by the output mask.  Joined legs are then identified, so every
    pairwise step stays a plain matrix product.  Planning builds the networks
    from shapes (:meth:`network`); running forms the variants' data, cached
    across pairings (:meth:`resolve`)."""

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
        self.variants: set[tuple[int, tuple[tuple[str, str], ...]]] = set()  # planned, for their flops
        self._variant_flops = 0  # of self.variants, kept as they are added (asked after each of thousands of orbits)

    def _variant_shape(self, key: tuple[int, tuple[tuple[str, str], ...]]) -> Tensor:
        """The variant's legs and shape, without data."""
        t = self.tensors[key[0]]
        legs, shape = list(t.legs), list(t.shape)
        for leg, role in key[1]:
            ax = legs.index(leg)
            if role in ("single", "const"):
                legs.pop(ax)
                shape.pop(ax)
            elif role in ("pair", "pairw") and self.joins.rank is not None:
                shape[ax] = self.joins.rank
            elif role.startswith("tok"):
                shape[ax] = self.joins.vocab
        return Tensor(t.name, tuple(legs), tuple(shape))

    def variant_flops(self) -> int:
        """Flops of forming every variant the planned networks use (each
        applied role is one pass over the owner's entries; selecting a
        token's block or the constant channel is a view)."""
        return self._variant_flops

    def _add_variant(self, key: tuple[int, tuple[tuple[str, str], ...]]) -> None:
        if key not in self.variants:
            self.variants.add(key)
            k, roles = key
            passes = sum(r not in ("raw", "const") and not r.startswith("tok") for _, r in roles)
            self._variant_flops += 2 * int(math.prod(self.tensors[k].shape)) * passes

    def _apply(self, data: Any, legs: list[str], leg: str, role: str, vector: Any) -> Any:
        ax = legs.index(leg)
        if role == "const":
            legs.pop(ax)
            return np.take(data, 0, axis=ax)
        if role.startswith("tok"):
            t, V = int(role[3:]), self.joins.vocab
            return np.take(data, np.arange(1 + (t - 1) * V, 1 + t * V), axis=ax)
        if role == "single":
            legs.pop(ax)
            return np.tensordot(data, vector, axes=([ax], [0]))
        if role in ("pair", "pairw") and self.joins.factor is not None:
            data = np.moveaxis(np.tensordot(data, self.joins.factor, axes=([ax], [0])), -1, ax)
        if role == "pairw" and self.joins.weights is not None or role == "mask":
            w = self.joins.weights if role == "pairw" else vector
            data = data * w.reshape((-1,) + (1,) * (data.ndim - ax - 1))
        return data

    def _variant(self, key: tuple[int, tuple[tuple[str, str], ...]], mask: Any) -> Tensor:
        t = self.tensors[key[0]]
        if key not in self.cache:
            data, legs = t.data, list(t.legs)
            for leg, role in key[1]:
                if role != "raw":
                    data = self._apply(data, legs, leg, role, mask if role == "mask" else self.joins.mean)
            self.cache[key] = Tensor.of(t.name, tuple(legs), data)
        return self.cache[key]

    def network(self, partner: tuple[int, ...], out_legs: tuple[str, ...],
                out_mask: Any) -> tuple[Network, list[tuple[Any, ...]]]:
        """The pairing's network, shapes only, and per tensor a reference to
        where its data comes from (:meth:`resolve` reads it for a call's
        weights).  ``out_legs``: (a_out, b_out) joined and summed through
        ``out_mask`` (a vector over output channels), shared and left open when
        ``out_mask`` is None, or both left open (a matrix) when it is
        :data:`OUTER`; a single leg stays open."""
        legs, roles, rename = self.legs, {}, {}
        extra: list[tuple[Tensor, tuple[Any, ...]]] = []
        if self.joins.by_tokens:
            self._token_roles(partner, roles, rename, extra)
        for i, j in enumerate(partner if not self.joins.by_tokens else ()):
            if j == i:
                roles[legs[i]] = "single"
            elif i < j:
                oi, oj = self.owner[legs[i]], self.owner[legs[j]]
                if oi is None or oj is None or oi == oj:  # rare: keep an explicit join matrix
                    roles[legs[i]] = roles[legs[j]] = "raw"
                    w = self.joins.width
                    extra.append((Tensor(f"#c{i}", (legs[i], legs[j]), (w, w)), ("matrix",)))
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
                    size = next(t.shape[t.legs.index(out_legs[0])] for t in self.tensors if out_legs[0] in t.legs)
                    extra.append((Tensor("#out", (out_legs[0],), (size,)), ("mask",)))
                else:
                    roles[out_legs[0]] = "mask"
                out = ()
        touched = {self.owner[l] for l, r in roles.items() if r != "raw"} - {None}
        entries: list[tuple[Tensor, tuple[Any, ...]]] = []
        for k, t in enumerate(self.tensors):
            if k in touched:
                key = (k, tuple(sorted((l, r) for l, r in roles.items() if l in t.legs)))
                self._add_variant(key)
                entries.append((self._variant_shape(key), ("variant", key)))
            else:
                entries.append((Tensor(t.name, t.legs, t.shape), ("tensor", k)))
        entries = [(t.relabel(rename), ref) for t, ref in entries] + extra
        return Network(tuple(t for t, _ in entries), (), out), [ref for _, ref in entries]

    def _token_roles(self, assignment: tuple[int, ...], roles: dict[str, str], rename: dict[str, str],
                     extra: list[tuple[Tensor, tuple[Any, ...]]]) -> None:
        """A token measure's grouping: leg i reads the constant channel
        (assignment 0) or token t (its block of the one-hot input); the legs
        of token t share one summed index, weighted once by its distribution.
        A tensor holds that index once: its further legs on the same token (a
        polynomial's one tensor P carries every input leg) take an index of
        their own, joined to the shared one by the identity over the
        vocabulary (x_v^2 = x_v on a one-hot block: the diagonal)."""
        w, V = self.joins.width, self.joins.vocab
        holds: set[tuple[int, int]] = set()  # (owner, token) whose leg already carries "#t{token}"
        for i, t in enumerate(assignment):
            leg, owned = self.legs[i], self.owner[self.legs[i]] is not None
            if t == 0:
                roles[leg] = "const" if owned else "raw"
                if not owned:
                    extra.append((Tensor(f"#e{i}", (leg,), (w,)), ("e0",)))
                continue
            index = f"#t{t}"
            if owned:
                roles[leg], rename[leg] = f"tok{t}", index
                if (self.owner[leg], t) in holds:
                    rename[leg] = f"#t{t}.{i}"
                    extra.append((Tensor(f"#d{i}", (rename[leg], index), (V, V)), ("copy",)))
                holds.add((self.owner[leg], t))
            else:
                roles[leg] = "raw"
                extra.append((Tensor(f"#s{i}", (leg, index), (w, V)), ("select", t)))
        for t in sorted(set(assignment) - {0}):
            extra.append((Tensor(f"#p{t}", (f"#t{t}",), (V,)), ("probs", t)))

    def resolve(self, ref: tuple[Any, ...], out_mask: Any) -> Any:
        """The array a reference of :meth:`network` points to, for this call's weights."""
        if ref[0] == "variant":
            return self._variant(ref[1], out_mask).data
        if ref[0] == "tensor":
            return self.tensors[ref[1]].data
        if ref[0] in ("e0", "select", "probs", "copy"):
            return self.joins.token_array(*ref)
        return {"matrix": self.joins.matrix, "mask": out_mask}[ref[0]]


@dataclass(frozen=True, eq=False)
class PairingPlan:
    """What :func:`orbit_sum` contracts: the raw pairings, their orbits, and
    one contraction plan per orbit (planned from shapes; nothing contracted),
    compiled so that a run only feeds the weights."""

    kind: str
    input_legs: int
    pairings: int
    orbit_sizes: tuple[int, ...]
    plans: tuple[ContractionPlan, ...]
    variant_flops: int = 0
    refs: tuple[list[tuple[Any, ...]], ...] = field(default=(), repr=False)
    # how the plan was counted, to replay a refusal under a lower limit:
    # each orbit's greedy flops (search mode), or each orbit's stratum and
    # the variant flops after each orbit planned in :func:`_visits` order
    # (sampled mode)
    greedy_flops: tuple[int, ...] = field(default=(), repr=False)
    strata: tuple[int, ...] = field(default=(), repr=False)
    variant_trace: tuple[int, ...] = field(default=(), repr=False)

    @property
    def orbits(self) -> int:
        return len(self.orbit_sizes)

    @cached_property
    def compiled(self) -> tuple[Any, ...]:
        """Each orbit's contraction compiled (opt_einsum expressions), at the
        first run: a plan only costed (a refusal, ts.plan, an estimate) never
        pays it (a quarter of planning 9,496 orbits of a tiny attention pair)."""
        return tuple(oe.contract_expression(p.equation, *p.shapes, optimize=[tuple(q) for q in p.path] or [(0,)])
                     for p in self.plans)

    @property
    def flops(self) -> int:
        """Every orbit's own contraction, plus forming the owners' variants."""
        return sum(p.flops for p in self.plans) + self.variant_flops

    @property
    def largest_intermediate(self) -> int:
        return max(p.largest_intermediate for p in self.plans)

    @property
    def peak_elements(self) -> int:
        """Elements alive at once in the costliest orbit: its operands and its
        largest intermediate (an upper bound of what one contraction holds)."""
        return max(sum(int(np.prod(s)) for s in p.shapes) + p.largest_intermediate for p in self.plans)

    @property
    def costliest(self) -> ContractionPlan:
        return max(self.plans, key=lambda p: p.flops)


# Planned orbit contractions, keyed by everything but the weights: a warm call
# (same architectures, new or same weights) reruns them without planning.
_PLANS: "OrderedDict[Any, PairingPlan]" = OrderedDict()
_PLANS_MAX = 64
# Refusals by (plan key, limit): the verdict of a refusal, which no plan is
# kept for, replayed.  The chooser plans every algorithm on every call: the
# refusal of a language model's 9,496 orbits took 0.25 s of a 1.0 s similarity
# each time (its orbits' strata and 32 greedy plans).
_REFUSALS: "OrderedDict[Any, tuple[Any, ...]]" = OrderedDict()
# Both tables are shared by the threads that plan at once (a Dask worker's,
# a thread pool's): a lookup's move_to_end after another thread evicted the
# key raised KeyError.
_TABLES_LOCK = threading.Lock()


def _looked_up(table: "OrderedDict[Any, Any]", key: Any) -> Any:
    """``table[key]`` marked recently used, or None."""
    with _TABLES_LOCK:
        found = table.get(key)
        if found is not None:
            table.move_to_end(key)
        return found


def _kept(table: "OrderedDict[Any, Any]", key: Any, value: Any) -> None:
    """``table[key] = value``, the least recently used dropped beyond _PLANS_MAX."""
    with _TABLES_LOCK:
        table[key] = value
        table.move_to_end(key)
        if len(table) > _PLANS_MAX:
            table.popitem(last=False)


def _side_by_side(A: Network, B: Network | None, out_mask: Any, use_orbits: bool, same: bool | None = None
                  ) -> tuple[list[Tensor], tuple[str, ...], tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """(tensors, input legs, output legs, symmetry generators) of A beside B.
    ``same``: whether A and B are one network with equal weights (None: read
    it off their data)."""
    ka = A.degree
    n = ka + (B.degree if B is not None else 0)
    A = A.fresh("a.")
    gens = [tuple(p) + tuple(range(ka, n)) for p in A.symmetries]
    tensors, legs, out_legs = list(A.tensors), A.inputs, A.outputs
    if B is not None:
        B = B.fresh("b.")
        gens += [tuple(range(ka)) + tuple(ka + q for q in p) for p in B.symmetries]
        # exchanging the sides transposes an OUTER result: not a symmetry there
        if ka == B.degree and not isinstance(out_mask, str) and (same_network(A, B) if same is None else same):
            gens.append(tuple(range(ka, n)) + tuple(range(ka)))
        tensors += list(B.tensors)
        legs, out_legs = legs + B.inputs, out_legs + B.outputs
    return tensors, legs, out_legs, (tuple(gens) if use_orbits else ())


def _spread(n: int) -> list[int]:
    """0..n-1 in bit-reversed (van der Corput) order: every prefix is spread
    over the whole list (neighbours in the list are alike)."""
    bits = max(1, (n - 1).bit_length())
    return [r for r in (int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)) if r < n]


def _searched_refusal(greedy: tuple[int, ...], variant: int, limit: float,
                      searched: Callable[[int], int]) -> tuple[float, float, int] | None:
    """Search mode (few orbits, every one counted first by its greedy order):
    orbits are searched costliest first (by that count).  The searched
    orbits and the variants are a lower bound L of the cost; with the
    others at their greedy counts, an upper bound U (a search keeps the
    greedy order unless it finds a cheaper one).  Refused, with (U, L,
    orbits searched), once L exceeds ``limit`` and U is within
    ``_BOUND_SLACK`` of L; None: within the limit.  ``searched(i)``: orbit
    i's flops (searched cold, read from a cached plan warm)."""
    done, rest = 0, sum(greedy)
    for k, i in enumerate(sorted(range(len(greedy)), key=lambda i: (-greedy[i], i))):
        done += searched(i)
        rest -= greedy[i]
        low, high = done + variant, done + rest + variant
        if low > limit and high <= _BOUND_SLACK * low:
            return float(high), float(low), k + 1
    return None


def _stratum(partner: tuple[int, ...], ka: int, tokens: bool) -> tuple[int, ...]:
    """A cheap class of a pairing whose orbits tend to cost alike: singletons
    and pairs across the two sides (a token grouping: legs on the constant
    channel, tokens read by both sides, tokens read)."""
    if tokens:
        a, b = set(partner[:ka]) - {0}, set(partner[ka:]) - {0}
        return (sum(t == 0 for t in partner), len(a & b), len(a | b))
    return (sum(j == i for i, j in enumerate(partner)), sum(j >= ka for j in partner[:ka]))


def _visits(strata: tuple[int, ...]) -> list[int]:
    """The order the sampled mode plans orbits in: round robin over the
    strata (by first appearance), each stratum's orbits in :func:`_spread`
    order, so that every prefix past the first round samples every stratum
    over its whole extent."""
    members: dict[int, list[int]] = {}
    for i, s in enumerate(strata):
        members.setdefault(s, []).append(i)
    queues = [[m[j] for j in _spread(len(m))] for m in members.values()]
    return [q[r] for r in range(max(map(len, queues), default=0)) for q in queues if r < len(q)]


def _sampled_refusal(strata: tuple[int, ...], limit: float,
                     visit: Callable[[int, int], tuple[int, int]]) -> tuple[float, float, int] | None:
    """Sampled mode (many orbits, greedy orders): orbits are planned in
    :func:`_visits` order (``strata``: each orbit's stratum id); once every
    stratum and at least ``_MIN_SAMPLE`` orbits are planned and they exceed
    ``limit`` with the variants formed so far, (estimate, flops planned,
    orbits planned): each stratum's mean scaled to its size, a stratified
    extrapolation.  ``visit(k, i)``: orbit i's flops and the variant flops
    after the k-th visit."""
    size: dict[int, int] = {}
    for s in strata:
        size[s] = size.get(s, 0) + 1
    total: dict[int, int] = {}
    seen: dict[int, int] = {}
    running = 0
    for k, i in enumerate(_visits(strata)):
        flops, variant = visit(k, i)
        s = strata[i]
        total[s], seen[s] = total.get(s, 0) + flops, seen.get(s, 0) + 1
        running += flops
        if len(seen) == len(size) and k + 1 >= min(len(strata), _MIN_SAMPLE) and running + variant > limit:
            estimate = sum(total[s] * size[s] / seen[s] for s in size) if k + 1 < len(strata) else running
            return estimate + variant, float(running + variant), k + 1
    return None


def _refusal(kind: str, orbits: int, raw: int, got: tuple[float, float, int], searched: bool) -> CostError:
    estimate, low, counted = got
    what = f"exact {kind} enumeration: {orbits:,} orbit contractions of {raw:,} pairings"
    if estimate == low and (searched or counted == orbits):  # nothing left uncounted
        return CostError(f"{what}, {format_count(estimate)} flops", flops=estimate)
    if searched:  # an upper bound: the budget it suggests does not fall short
        return CostError(f"{what}, between {format_count(low)} and {format_count(estimate)} flops (the "
                         f"{messages.counted(counted, 'costliest orbit')} searched, the others counted by their "
                         "greedy orders)", flops=estimate)
    return CostError(f"{what}, about {format_count(estimate)} flops (extrapolated stratum by stratum from "
                     f"{counted:,} of {orbits:,} orbits, which alone take {format_count(low)})", flops=estimate,
                     extrapolated=True)


def _replay(pp: PairingPlan, limit: float) -> CostError:
    """The refusal that planning ``pp`` cold under ``limit`` raises: the same
    verdict recomputed from the cached plan, so that what was planned
    before never changes an estimate."""
    if pp.greedy_flops:
        got = _searched_refusal(pp.greedy_flops, pp.variant_flops, limit, lambda i: pp.plans[i].flops)
    else:
        got = _sampled_refusal(pp.strata, limit, lambda k, i: (pp.plans[i].flops, pp.variant_trace[k]))
    assert got is not None, "a cached plan over the limit is refused by its own verdict"
    return _refusal(pp.kind, pp.orbits, pp.pairings, got, bool(pp.greedy_flops))


def plan_pairings(A: Network, B: Network | None, joins: Joins, out_mask: Any, limit: float = math.inf,
                  use_orbits: bool = True, same: bool | None = None) -> PairingPlan:
    """The plan of :func:`orbit_sum` with the same arguments, from shapes
    (A and B may be :meth:`~tsalgebra.expr.Network.shapes_only`).

    Every orbit is planned with its own contraction order and its flops
    counted.  Raises :class:`CostError` (with the estimate) when the
    pairings are too many to walk, or before every orbit is planned once
    the cost is known to exceed ``limit`` (see :func:`_searched_refusal`,
    up to ``_SEARCH_ORBITS`` orbits: a lower and an upper bound; and
    :func:`_sampled_refusal`, beyond: a stratified extrapolation of orbits
    spread over the list, not of the first ones, which are the cheapest).  The
    verdict is a function of the shapes and ``limit`` alone: a plan cached
    by an earlier call replays it (:func:`_replay`), and every search runs
    on uncached, hash-independent orders (:mod:`tsalgebra.planner`).
    ``same`` declares A and B one network with equal weights (the exchange
    of the two sides is then a symmetry); None reads it off their data."""
    n = A.degree + (B.degree if B is not None else 0)
    raw = P.count_pairings(joins.kind, n)
    if raw > MAX_PAIRINGS:
        count = f"{raw:,}" if raw < 10**15 else format_count(raw)  # digits while they can be read
        raise CostError(f"exact {joins.kind} enumeration over {n} input legs has {count} pairings "
                        f"(more than {MAX_PAIRINGS:,} to walk)")
    tensors, legs, out_legs, gens = _side_by_side(A, B, out_mask, use_orbits, same)
    mode = out_mask if isinstance(out_mask, str) else out_mask is not None
    key = (tuple((t.name, t.legs, t.shape) for t in tensors), legs, out_legs, joins.key, mode, gens)
    found = _looked_up(_PLANS, key)
    if found is not None:
        if found.flops > limit:
            raise _replay(found, limit)
        return found
    refused = _looked_up(_REFUSALS, (key, limit))
    if refused is not None:
        raise _refusal(*refused)
    orbits = P.orbits(joins.kind, n, gens)
    N = len(orbits)
    if N > MAX_ORBITS:  # tiny orbits: their flops never reach a budget, their planning takes minutes
        raise CostError(f"exact {joins.kind} enumeration: {N:,} orbit contractions of {raw:,} pairings "
                        f"(more than {MAX_ORBITS:,} to plan and run at Python speed)")
    joiner = _Joiner(legs, tensors, joins, out_legs[0] if B is not None else None)
    plans: list[ContractionPlan | None] = [None] * N
    refs: list[Any] = [None] * N

    def greedy(i: int) -> ContractionPlan:
        net, refs[i] = joiner.network(orbits[i][0], out_legs, out_mask)
        plans[i] = plan(net, optimizer="greedy", cache=False)  # cache=False: nothing that ran before counts
        return plans[i]

    counts: tuple[int, ...] = ()
    strata: tuple[int, ...] = ()
    trace: list[int] = []
    if N <= _SEARCH_ORBITS:
        counts = tuple(greedy(i).flops for i in range(N))

        def search(i: int) -> int:
            g = plans[i]
            chosen = choose_optimizer(len(g.shapes), g.flops)
            if chosen != "greedy":
                s = plan_equation(g.equation, g.shapes, optimizer=chosen, cache=False)
                plans[i] = s if s.flops <= g.flops else g  # never above the greedy count (an upper bound)
            return plans[i].flops

        got = _searched_refusal(counts, joiner.variant_flops(), limit, search)
    else:
        def visit(k: int, i: int) -> tuple[int, int]:
            flops = greedy(i).flops
            trace.append(joiner.variant_flops())
            return flops, trace[-1]

        strata_of: dict[tuple[int, ...], int] = {}
        strata = tuple(strata_of.setdefault(_stratum(q, A.degree, joins.by_tokens), len(strata_of)) for q, _ in orbits)
        got = _sampled_refusal(strata, limit, visit)
    if got is not None:
        verdict = (joins.kind, N, raw, got, N <= _SEARCH_ORBITS)
        _kept(_REFUSALS, (key, limit), verdict)
        raise _refusal(*verdict)
    done = tuple(p for p in plans if p is not None)
    assert len(done) == N
    found = PairingPlan(joins.kind, n, raw, tuple(size for _, size in orbits), done, joiner.variant_flops(),
                        tuple(refs), counts, strata, tuple(trace))
    _kept(_PLANS, key, found)
    return found


# An orbit sum is many small products: two BLAS threads gain little on them
# and, when another process holds one of two cores, each product waits for the
# descheduled thread (the grokking demo's token matrix, 231 sums of 1.2e8
# flops: 3.3 s on one thread either way, 3.5-3.8 s on two when quiet, 9-12 s
# beside one busy process, 30-100 s beside a test run).  Setting the limit
# costs 0.7 ms, so sums below this many flops (a few ms of work) keep it as it is.
ONE_THREAD_FLOPS = 1e7


def run_pairings(pp: PairingPlan, A: Network, B: Network | None, joins: Joins, out_mask: Any) -> tuple[Any, Tally]:
    """Execute a plan of :func:`plan_pairings` on the weights of A (and B)."""
    tensors, legs, out_legs, _ = _side_by_side(A, B, out_mask, False)
    joiner = _Joiner(legs, tensors, joins, out_legs[0] if B is not None else None)
    exact = any(getattr(t.data, "dtype", None) == object for t in tensors) or joins.exact
    backend = "object" if exact else "numpy"
    total: Any = 0
    tick = advancer()  # the running plan's bar, when one shows
    with one_blas_thread() if pp.flops >= ONE_THREAD_FLOPS and not exact else contextlib.nullcontext():
        for size, expr, refs, plan in zip(pp.orbit_sizes, pp.compiled, pp.refs, pp.plans):
            total = total + size * expr(*(joiner.resolve(r, out_mask) for r in refs), backend=backend)
            if tick is not None:
                tick(plan.flops)
    return total, Tally(len(pp.plans), pp.flops, pp.pairings, pp.orbits)


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
    same = B is not None and same_network(A, B)
    pp = plan_pairings(A.shapes_only(), None if B is None else B.shapes_only(), joins, out_mask, budget, use_orbits,
                       same)
    return run_pairings(pp, A, B, joins, out_mask)
