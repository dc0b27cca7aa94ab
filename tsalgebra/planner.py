"""Contraction planning: choose a pairwise order for a tensor network.

Path search is done by opt_einsum and is the expensive part, so plans are
cached by the einsum equation (canonical symbols) *and* the operand shapes: a
second network with the same wiring and sizes (other data: the many
same-shape models of a similarity matrix, a model evaluated batch after
batch) reuses the plan without a search.  Other sizes are searched afresh:
an order found for one set of sizes and recounted for another is not the
order a fresh process finds (a depth-2 bilinear stack at (16, 64, 8),
planned after the same stack at (2, 3, 2), counted 1.03e8 flops for the
2.87e7 found cold), and the standard is that an estimate is the same cold
as warm.  So a plan is a function of the equation and the shapes alone,
whatever the cache holds.  Execution of a plan lives in
:meth:`ContractionPlan.execute` and needs no further search.

Orders are the same in every process: the search runs on integer index
labels (opt_einsum breaks ties by iterating sets of labels, and string
hashes change with PYTHONHASHSEED), and the random optimizer seeds each of
its trials.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import opt_einsum as oe

from .arrays import is_torch
from .expr import Network

__all__ = ["ContractionStep", "ContractionPlan", "plan", "plan_equation", "plan_cache"]

# Exhaustive search is affordable up to this many operands; beyond, greedy with
# random restarts (opt_einsum's advice: 'optimal' explodes past ~8, 'dp' past ~16).
_OPTIMAL_MAX = 6
_DP_MAX = 16
# A slow search only pays when the contraction itself is costly: below this many
# flops (about a millisecond of work) the greedy order, found in about a
# millisecond, is kept.  Sums over thousands of small pairing networks rely on it.
SEARCH_WORTH_FLOPS = 1e6


def choose_optimizer(n_operands: int, greedy_flops: float | None = None) -> str:
    """The opt_einsum optimizer for a network of ``n_operands`` tensors whose
    greedy order costs ``greedy_flops``: exhaustive ('optimal', 'dp') for small
    networks, 'random-greedy-128' beyond, 'greedy' when search cannot pay."""
    if n_operands <= _OPTIMAL_MAX:
        return "optimal"
    if greedy_flops is not None and greedy_flops < SEARCH_WORTH_FLOPS:
        return "greedy"
    if n_operands <= _DP_MAX:
        return "dp"
    return "random-greedy-128"


@dataclass(frozen=True)
class ContractionStep:
    """One pairwise contraction: ``operands`` index the current operand list
    (contracted operands are removed, the result appended, as in opt_einsum)."""

    operands: tuple[int, ...]
    einsum: str


@dataclass(frozen=True)
class ContractionPlan:
    """A contraction order for one equation at fixed shapes.

    ``flops`` is opt_einsum's operation count and ``largest_intermediate`` the
    element count of the biggest tensor formed on the way.
    """

    equation: str
    shapes: tuple[tuple[int, ...], ...]
    path: tuple[tuple[int, ...], ...]
    steps: tuple[ContractionStep, ...]
    flops: int
    largest_intermediate: int
    optimizer: str

    def execute(self, *operands: Any, backend: str | None = None) -> Any:
        """Contract ``operands`` (numpy, numpy object or torch arrays) in this order.

        The backend is read from the operands unless given; torch operands may
        live on any device.  Shapes must be those the plan was made for.
        """
        got = tuple(tuple(int(s) for s in op.shape) for op in operands)
        if got != self.shapes:
            raise ValueError(f"plan made for shapes {self.shapes}, called with {got}")
        backend = backend or backend_of(operands)
        if len(operands) == 1:  # nothing to pair; einsum still traces / transposes
            return oe.contract(self.equation, operands[0], backend=backend)
        return oe.contract(self.equation, *operands, optimize=[tuple(p) for p in self.path], backend=backend)

    def summary(self) -> str:
        lines = [
            f"equation {self.equation}",
            f"  optimizer {self.optimizer}, {len(self.steps)} pairwise steps, "
            f"{self.flops:.3g} flops, largest intermediate {self.largest_intermediate} elements",
        ]
        lines += [f"  {s.operands}: {s.einsum}" for s in self.steps]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "equation": self.equation,
                "shapes": [list(s) for s in self.shapes],
                "path": [list(p) for p in self.path],
                "steps": [{"operands": list(s.operands), "einsum": s.einsum} for s in self.steps],
                "flops": self.flops,
                "largest_intermediate": self.largest_intermediate,
                "optimizer": self.optimizer,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "ContractionPlan":
        d = json.loads(text)
        return cls(
            d["equation"],
            tuple(tuple(s) for s in d["shapes"]),
            tuple(tuple(p) for p in d["path"]),
            tuple(ContractionStep(tuple(s["operands"]), s["einsum"]) for s in d["steps"]),
            int(d["flops"]),
            int(d["largest_intermediate"]),
            d["optimizer"],
        )


def backend_of(operands: Sequence[Any]) -> str:
    """'torch' for torch tensors, 'object' for numpy object arrays, else 'numpy'."""
    torch_operands = [is_torch(op) for op in operands]
    if any(torch_operands):
        if not all(torch_operands):
            raise TypeError("cannot mix torch tensors with other arrays in one contraction")
        return "torch"
    if any(getattr(op, "dtype", None) == object for op in operands):
        return "object"
    return "numpy"


class PlanCache:
    """Plans keyed by (equation, operand shapes), the least recently used
    dropped beyond ``maxsize``; counts hits and misses.

    The key holds everything a plan is a function of (the search runs on the
    equation and the shapes alone, see :func:`_search`), so a hit returns
    exactly the plan a miss would make, and neither what was planned before
    nor an eviction changes any plan."""

    def __init__(self, maxsize: int = 256) -> None:
        self._plans: OrderedDict[tuple[str, tuple[tuple[int, ...], ...]], ContractionPlan] = OrderedDict()
        self._lock = threading.Lock()
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0

    def get(self, equation: str, shapes: tuple[tuple[int, ...], ...]) -> ContractionPlan | None:
        with self._lock:
            found = self._plans.get((equation, shapes))
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._plans.move_to_end((equation, shapes))
            return found

    def put(self, plan: ContractionPlan) -> None:
        with self._lock:
            self._plans[(plan.equation, plan.shapes)] = plan
            self._plans.move_to_end((plan.equation, plan.shapes))
            while len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._plans)

    def info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._plans)}


# An entry is one plan (its steps' einsum strings dominate): measured 1.2 KB
# for one bilinear layer, 7-10 KB for a depth-3 stack (21-29 operands), 68-91
# KB for depth 6 (189-253 operands).  256 entries hold a few MB for the usual
# networks (about 25 MB if all were depth 6), and more entries than distinct
# (equation, shapes) pairs a similarity matrix or a pair's planning makes
# (18 for a matrix of 8 two-layer stacks).  The bound matters for callers
# that plan many sizes (evaluating at every batch size of a data set): before
# sizes were in the key the cache grew by topologies alone.
plan_cache = PlanCache()


# RandomGreedy seeds its generator per trial: one search at a time (two would
# interleave their draws on the generator _search lends it).
_RANDOM_LOCK = threading.Lock()


def _search(equation: str, shapes: tuple[tuple[int, ...], ...], optimizer: Any) -> list[tuple[int, ...]]:
    """The path ``optimizer`` (an opt_einsum name or PathOptimizer) finds, a
    function of the equation and the shapes alone.  opt_einsum's searches
    iterate sets and dicts of index labels and break ties by that order; with
    the einsum's characters as labels the order (and so the path, and its
    cost: 3.0e10 to 1.1e11 flops for one orbit sum) followed the process's
    string hash seed.  Integers hash to themselves: relabelled by first
    appearance, every process searches the same problem the same way."""
    lhs, rhs = equation.split("->")
    label: dict[str, int] = {}
    inputs = [frozenset(label.setdefault(c, len(label)) for c in term) for term in lhs.split(",")]
    output = frozenset(label.setdefault(c, len(label)) for c in rhs)
    sizes: dict[int, int] = {}
    for term, shape in zip(lhs.split(","), shapes):
        for c, d in zip(term, shape):
            sizes[label[c]] = max(sizes.get(label[c], 1), d)  # a broadcast 1 takes the other size, as opt_einsum
    if len(inputs) <= 2:  # nothing to search (as contract_path)
        return [tuple(range(len(inputs)))]
    fn = optimizer if isinstance(optimizer, oe.paths.PathOptimizer) else oe.paths.get_path_fn(optimizer)
    if optimizer in ("greedy", "optimal", "dp"):  # no random draws
        return [tuple(p) for p in fn(inputs, output, sizes, None)]
    with _RANDOM_LOCK:
        # opt_einsum draws from the process's generator (its trials' random.seed and random.choices, bound
        # at its import, and its cost jitter's random.gauss): another thread drawing meanwhile changed the
        # order found (and its flops), and each trial's seed reset that thread's stream.  A generator of our
        # own for the search's duration: the same draws as the process's seeded alike.
        own = random.Random()
        drawn, jitter = oe.path_random, oe.paths
        kept = drawn.random_seed, drawn.random_choices, jitter.random
        drawn.random_seed, drawn.random_choices, jitter.random = own.seed, own.choices, own
        try:
            return [tuple(p) for p in fn(inputs, output, sizes, None)]
        finally:
            drawn.random_seed, drawn.random_choices, jitter.random = kept


def _walk(equation: str, shapes: tuple[tuple[int, ...], ...],
          path: Sequence[Sequence[int]]) -> tuple[int, int, tuple[ContractionStep, ...]]:
    """(flops, largest intermediate, steps) of ``path``: what opt_einsum's
    contract_path reports for it (the same counts, checked in the tests),
    without its parsing, BLAS checks and shape bookkeeping, which took 0.55
    ms of the 2 ms each of a pairing sum's thousands of orbits spends in
    planning."""
    lhs, rhs = equation.split("->")
    names = lhs.split(",")
    sizes: dict[str, int] = {}
    for n, (term, shape) in enumerate(zip(names, shapes)):
        if len(term) != len(shape):
            raise ValueError(f"operand {n} of {equation!r} has shape {shape}, not {len(term)} dimensions")
        for c, d in zip(term, shape):
            if sizes.get(c, 1) == 1:
                sizes[c] = d
            elif d not in (1, sizes[c]):  # a broadcast 1 takes the other size, as opt_einsum
                raise ValueError(f"index {c!r} of {equation!r} has sizes {sizes[c]} and {d}")
    sets = [frozenset(term) for term in names]
    output = frozenset(rhs)
    flops, formed, steps = 0, [], []
    for k, step in enumerate(path):
        at = tuple(sorted(step, reverse=True))  # popped right to left, as opt_einsum
        picked = [names.pop(i) for i in at]
        union = frozenset().union(*(sets.pop(i) for i in at))
        kept = union & output.union(*sets)
        flops += math.prod(sizes[c] for c in union) * (max(1, len(at) - 1) + (kept != union))
        formed.append(math.prod(sizes[c] for c in kept))
        joined = "".join(picked)
        result = rhs if k == len(path) - 1 else "".join(sorted(kept, key=joined.find))
        names.append(result)
        sets.append(kept)
        steps.append(ContractionStep(at, ",".join(picked) + "->" + result))
    return flops, max(formed, default=1), tuple(steps)


def plan_equation(equation: str, shapes: Sequence[Sequence[int]], optimizer: str | None = None,
                  cache: bool = True) -> ContractionPlan:
    """Plan ``equation`` for operands of ``shapes``.

    The plan (order, optimizer, flops, largest intermediate) is a function of
    the equation, the shapes and ``optimizer`` alone: the path search of
    :func:`choose_optimizer` (or ``optimizer``), reused from the cache only
    for the same equation and shapes, so cost estimates are the same in a
    fresh process and a warm one.  ``cache=False`` neither reads nor writes
    the cache (the same plan, for one-off networks that would only crowd
    it); a named ``optimizer`` is never cached.
    """
    shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
    use_cache = optimizer is None and cache
    if use_cache:
        found = plan_cache.get(equation, shapes)
        if found is not None:
            return found
    n = len(shapes)
    if optimizer is not None or n <= _OPTIMAL_MAX:
        chosen = optimizer or "optimal"
        path = _search(equation, shapes, chosen)
        flops, largest, steps = _walk(equation, shapes, path)
    else:
        path = _search(equation, shapes, "greedy")
        flops, largest, steps = _walk(equation, shapes, path)
        chosen = choose_optimizer(n, flops)
        if chosen != "greedy":
            found = _search(equation, shapes, chosen)
            counted = _walk(equation, shapes, found)
            if counted[0] <= flops:  # a random search can end above greedy
                path, (flops, largest, steps) = found, counted
            else:
                chosen = "greedy"
    made = ContractionPlan(equation, shapes, tuple(tuple(p) for p in path), steps if n > 1 else (), flops, largest,
                           chosen)
    if use_cache:
        plan_cache.put(made)
    return made


def plan(network: Network, output: Sequence[str] | None = None, optimizer: str | None = None,
         cache: bool = True) -> ContractionPlan:
    """Plan the contraction of ``network``, keeping ``output`` legs open
    (default: outputs, then inputs).  Tensors without data are fine: only
    shapes matter.  See :func:`plan_equation` for caching."""
    equation, tensors = network.einsum(output)
    return plan_equation(equation, [t.shape for t in tensors], optimizer, cache)
