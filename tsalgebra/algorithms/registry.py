"""One registry of inner-product algorithms and one rule for choosing among them.

An :class:`Algorithm` says which problems it takes (:meth:`~Algorithm.supports`
returns the reason it does not, or None), plans one from shapes with its cost
(:meth:`~Algorithm.plan`, which raises :class:`~tsalgebra.problem.CostError`
above a flop limit) and runs a plan (:meth:`~Algorithm.run`).  The algorithms
register themselves in :mod:`tsalgebra.algorithms`; a new one is a module
and a :func:`register` call.

The rule (:func:`choose`): an ``algorithm=`` named by the caller is planned
alone (ValueError with its reason when it does not apply, CostError over
the budget, MemoryBoundError when its plan's peak bytes exceed the memory
bound).  Otherwise every registered algorithm of the method asked for
(``"exact"`` for auto and exact: never an approximation or an estimate;
``"closure"``; ``"sampled"``) that supports the problem is planned, in
registry order, each with a limit of the budget (one per product: three for
an algorithm whose plan yields all three products of a similarity) and of
the cheapest plan so far (its flops per product); a plan whose peak bytes
exceed the memory bound (``max_memory``) is skipped as one over the budget
is, and the cheapest plan per product within both wins.  When none fits,
one CostError (a MemoryBoundError where some plan was within the budget but
over the memory bound, a NotApplicableError where no algorithm supports the
problem at all) states every algorithm's estimate or reason and the
alternatives: another inner product or method only where its plan fits the
memory bound (:func:`alternatives`); for a question of the weights (the
network or symmetric product) the other inner products include the models'
functional one (:func:`_others`).
"""

from __future__ import annotations

import math
import threading
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Iterator

import numpy as np

from ..measure import Measure
from ..problem import (FUNCTIONAL, Alternative, CostError, InnerProblem, InnerResult, MemoryBoundError,
                       NotApplicableError, Plan, RoundingError, bound_measure, format_count, resolve_inner, rounded_up)
from ..progress import planned
from ..heap import kept_heap

__all__ = ["Algorithm", "Triple", "alternatives", "choose", "register", "registered", "run", "solve", "unregister"]

Triple = tuple[InnerResult, "InnerResult | None", "InnerResult | None"]

# A plan's flops in exact arithmetic (Fractions, sympy numbers) are counted
# at this many float64 flops each, against the budget and in the reports: a
# numpy matrix product of Fractions runs at 0.9-1.3e6 operations per second
# on this machine, float64 contractions at about 1e9 (progress.RATES), so an
# exact plan of 4e9 operations (verify --exact of a one-layer language model
# at vocabulary 8) fitted the default budget and ran for hours.
EXACT_FLOP_COST = 1000.0
# The same for symbolic weights (sympy expressions in symbols), whose speed
# falls as the expressions grow: 1.2e5 operations per second for two layers
# of width 1, 2-9e4 for one layer of width 2-3, 690 for two of width 2 (22
# symbols; so a plan there can take 20 times its estimate).
SYMBOLIC_FLOP_COST = 1e5


def exact_flop_cost(problem: InnerProblem) -> float:
    """Float64 flops one exact operation of ``problem`` counts as (1 for float weights)."""
    return 1.0 if not problem.exact_numbers else SYMBOLIC_FLOP_COST if problem.symbolic_numbers else EXACT_FLOP_COST


def _plan_of(alg: "Algorithm", problem: InnerProblem, limit: float) -> Plan:
    """``alg.plan(problem, limit)``, an exact-number problem's operations
    counted at :data:`EXACT_FLOP_COST` float64 flops each."""
    cost = exact_flop_cost(problem)
    if cost == 1.0:
        return alg.plan(problem, limit)
    what = "symbolic" if problem.symbolic_numbers else "exact"
    try:
        plan = alg.plan(problem, limit / cost)
    except CostError as exc:
        if exc.flops == math.inf:
            raise
        raise CostError(f"in {what} operations, {exc.reason}; each counted as {cost:,.0f} float64 flops, "
                        f"{format_count(exc.flops * cost)} flops",
                        flops=exc.flops * cost, extrapolated=exc.extrapolated) from None
    return replace(plan, flops=plan.flops * cost, facts={**plan.facts, "flops_per_exact_operation": cost},
                   notes=plan.notes + (f"{what} arithmetic: each operation counted as {cost:,.0f} float64 flops in "
                                       "the plan's flops (its other counts are exact operations)",))


class Algorithm:
    """An inner-product algorithm.  Subclasses set the class attributes and
    implement :meth:`check` (problem-specific conditions), :meth:`plan` and
    :meth:`run`.

    ``name``: the registry key, the ``algorithm=`` spelling and the result's
    ``.algorithm``; ``title``: a phrase for reports; ``method``: "exact" or
    "closure" (the rung of the ladder it serves); ``inners``: the inner
    products it computes; ``measures``: the measure types it takes for the
    functional (gaussian) product; ``joint``: whether its plan of a
    similarity's problem yields <a,b>, <a,a> and <b,b> at once.
    """

    name: str = ""
    title: str = ""
    method: str = "exact"
    joint: bool = False  # its plan of a similarity yields all three products (and may spend three budgets)
    inners: tuple[str, ...] = ("gaussian",)
    measures: tuple[type[Measure], ...] = ()

    def supports(self, problem: InnerProblem) -> str | None:
        """None when this algorithm can compute ``problem``, else why not."""
        if problem.inner not in self.inners:
            return f"it computes the {' and '.join(self.inners)} inner product{'s' if len(self.inners) > 1 else ''} only"
        if problem.measure is not None and not isinstance(problem.measure, self.measures):
            return f"it does not take the measure {problem.measure.label}"
        return self.check(problem)

    def check(self, problem: InnerProblem) -> str | None:
        """Conditions beyond the inner product and the measure type."""
        return None

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        """The plan from shapes, with its cost; CostError (carrying the
        estimate) when it exceeds ``limit`` flops.  Never computes the value."""
        raise NotImplementedError

    def run(self, plan: Plan) -> Triple:
        """(<a, b>, <a, a>, <b, b>); the last two None unless ``plan.joint``."""
        raise NotImplementedError

    def nodes(self, problem: InnerProblem) -> "Iterator[tuple[np.ndarray, np.ndarray]] | None":
        """For an algorithm that is a weighted sum over finitely many inputs
        (:func:`tsalgebra.node_sums.node_sum`), those inputs and weights in
        chunks, the same for every model of ``problem``'s widths and at most
        its degrees; None for the others.  The ``node-gram`` matrix route
        evaluates each model on them once instead of once per pair."""
        return None

    def __repr__(self) -> str:
        return f"<algorithm {self.name!r}: {self.title}>"


# Replaced, never changed in place, so that a choice iterating it in one thread
# is not broken by register() in another (dictionary changed size during iteration).
_REGISTRY: dict[str, Algorithm] = {}
_WRITING = threading.Lock()


def register(algorithm: Algorithm, *, before: str | None = None) -> Algorithm:
    """Add ``algorithm`` (placed before the algorithm named ``before``, else
    last); its name must be new.  Returns it."""
    global _REGISTRY
    if algorithm.method not in ("exact", "closure", "sampled"):
        raise ValueError(f"method must be 'exact', 'closure' or 'sampled', got {algorithm.method!r}")
    with _WRITING:
        if not algorithm.name or algorithm.name in _REGISTRY:
            raise ValueError(f"an algorithm needs a new name, got {algorithm.name!r}")
        items = list(_REGISTRY.items())
        at = next((k for k, (name, _) in enumerate(items) if name == before), len(items))
        items.insert(at, (algorithm.name, algorithm))
        _REGISTRY = dict(items)  # a new dict: a choice iterating the old one in another thread goes on
    return algorithm


def unregister(name: str) -> None:
    """Remove the algorithm named ``name``."""
    global _REGISTRY
    with _WRITING:
        if name not in _REGISTRY:
            raise KeyError(name)
        _REGISTRY = {k: v for k, v in _REGISTRY.items() if k != name}


def registered() -> tuple[Algorithm, ...]:
    """The algorithms in the order the chooser plans them."""
    return tuple(_REGISTRY.values())


def _named(name: str) -> Algorithm:
    if name not in _REGISTRY:
        raise ValueError(f"algorithm must be one of {tuple(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def _method(problem: InnerProblem) -> str:
    """The rung of the ladder asked for: auto means exact (never an
    approximation or an estimate unless asked)."""
    return problem.method if problem.method in ("closure", "sampled") else "exact"


def _limit(problem: InnerProblem) -> str:
    joint = problem.shares(True) > 1
    return f"{format_count(problem.budget)} flops per inner product" + (
        " (three for a plan that yields all three products of the similarity)" if joint else "")


# The other questions a refusal suggests (another inner product, another
# method): the change, what it answers, and its name in a sentence.
_OTHERS = (({"inner": "network"}, "the layer-wise product, a property of the factorization",
            "the network inner product"),
           ({"method": "closure"}, "Gaussian closure, approximate beyond the first layer", "Gaussian closure"),
           ({"method": "sampled"}, "a Monte Carlo estimate with standard errors", "the Monte Carlo estimate"))


def _others(problem: InnerProblem) -> list[tuple[dict[str, Any], str, str]]:
    """The other questions for ``problem``: :data:`_OTHERS`, and for a
    question of the weights (the network or symmetric product) the models'
    functional one after the network product: under their token measure
    where they read tokens, else under the standard Gaussian (what
    ``inner=None`` asks of them).  A refusal no budget answers (the network
    product of attention layers) then still names a question that has an
    answer, where one does.  A symmetric product asked at a degree above
    the models' own is offered at their own first (lifting adds input legs,
    and the pairings grow factorially with them)."""
    lower: list[tuple[dict[str, Any], str, str]] = []
    if problem.inner == "symmetric" and problem.degree is not None and problem.degree > max(problem.degrees):
        own_degree = max(problem.degrees)
        lower = [({"degree": own_degree}, "the models' own degree, not lifted", f"degree {own_degree}")]
    own = _own_measure(problem)
    if own is None:
        return lower + list(_OTHERS)
    inner, measure = own
    what = (f"the functional product under the models' token measure, {measure.label}" if inner == "tokens" else
            f"the functional product under {measure.label}")
    name = "the token inner product" if inner == "tokens" else "the Gaussian inner product"
    return [*lower, _OTHERS[0], ({"inner": inner}, f"{what}, a property of the function", name), *_OTHERS[1:]]


def _own_measure(problem: InnerProblem) -> tuple[str, Any] | None:
    """(inner, measure bound to the models' input) of the models' own
    functional question, as ``inner=None`` resolves it; None where
    ``problem`` asks a functional product already or that question cannot
    be asked of these models (a token measure too wide to build, models
    that read different tokens)."""
    if problem.inner in FUNCTIONAL:
        return None
    try:
        inner, measure = resolve_inner(None, None, problem.a, problem.b)
        return inner, bound_measure(problem.a, None, None, measure, problem.b)
    except (ValueError, TypeError):
        return None


def alternatives(problem: InnerProblem, estimates: list[tuple[float, bool]],
                 needed: float | None = None) -> tuple[Alternative, ...]:
    """Other questions some registered algorithm would answer: a larger
    memory bound, a larger budget, another inner product, another method.
    ``estimates``: (flops per product, extrapolated) of the algorithms
    refused over the budget; the budget suggested is the smallest of them,
    labelled when it is an extrapolation (it may fall short, but a full count
    of a costlier algorithm would ask for far more than needed).  ``needed``:
    the peak bytes of the smallest plan refused over the memory bound.

    Another inner product or method is suggested only where the question so
    changed has a plan within the problem's memory bound (:func:`_need`; its
    flops are not judged: the budget is suggested on its own).  When none
    has, the message says what the least demanding of them needs (in the
    first suggestion's text): a max_memory is suggested only for the
    question asked, as a bound that fits only another question is refused
    when taken alone."""
    return _suggestions(problem, estimates, needed)[0]


def _suggestions(problem: InnerProblem, estimates: list[tuple[float, bool]],
                 needed: float | None = None) -> tuple[tuple[Alternative, ...], str]:
    """:func:`alternatives`, and the note on the other questions where none
    fits the bound ("" otherwise), folded into the first suggestion's text
    (returned for a caller that has none to carry it)."""
    fitting: list[Alternative] = []
    least: tuple[float, str] | None = None  # (bytes, name) of the other question needing the least
    for change, why, name in _others(problem):
        other = _changed(problem, change)
        if other is None:
            continue
        need = _need(other)
        if need is None or need <= problem.memory:  # None: not judged (a refusal made inside a check)
            fitting.append(Alternative(*next(iter(change.items())), why))
        elif need < math.inf and (least is None or need < least[0]):
            least = (need, name)
    least = None if fitting else least
    out = []
    if needed is not None and needed < math.inf:
        out.append(Alternative("max_memory", rounded_up(needed), "the smallest plan's peak" + (
            f"; of the other questions, {least[1]} needs the least: {format_count(least[0])}" if least else "")))
    finite = [e for e in estimates if e[0] < math.inf]
    if finite:
        per_product, extrapolated = min(finite)
        why = "about the cheapest estimate (extrapolated): it may take more" if extrapolated else \
            "the cheapest estimate"
        if least is not None and not out:  # refused over the budget alone: the others stated, not suggested
            why += (f"; no other question fits the bound: {least[1]}, the least of them, needs "
                    f"{format_count(least[0])} bytes")
        out.append(Alternative("budget", rounded_up(per_product), why))
    note = "" if least is None else (f"; no other question fits {_bound(problem)}: {least[1]}, the least "
                                     f"of them, needs {format_count(least[0])} bytes")
    return tuple(out + fitting), note


def _changed(problem: InnerProblem, change: dict[str, Any]) -> InnerProblem | None:
    """``problem`` asked with ``change`` (another inner product or method);
    None where that asks nothing new or no registered algorithm supports it."""
    other = problem.replace(**change, algorithm=None)
    if other.inner == "network":
        other = other.replace(measure=None, centered=False, method="auto")
    elif other.inner != problem.inner:  # the models' functional question (_others): their measure, bound
        own = _own_measure(problem)
        if own is None or own[0] != other.inner:
            return None
        other = other.replace(measure=own[1], degree=None, method="auto")
    if other.method == "sampled" and other.inner not in ("gaussian", "tokens"):
        return None
    if all(getattr(other, k) == getattr(problem, k) for k in change) or not _supporting(other):
        return None
    return other


def _supporting(problem: InnerProblem) -> list[Algorithm]:
    return [alg for alg in _REGISTRY.values() if alg.method == _method(problem) and alg.supports(problem) is None]


# Checking an alternative is part of a refusal, so it is kept small.  Inside
# a check (_CHECKING set) a nested choose() is refused unplanned: no nested
# checks, and no sub-plans.  The one algorithm that plans others is Monte
# Carlo, for its control variate (the truncated models' exact products),
# whose models only add to its peak: the plan without it is a lower bound,
# and one over the bound without it is over with it (a depth-4 bilinear
# stack of width 8 needs 2.5e5 bytes at the smallest batch, 3.2e5 with it).
# Planned with it, the budget lifted, its exact planning dominated: 37 s
# cold for an attention block under a correlated Gaussian whose exact
# refusal takes 0.05 s (its first layer's pairings walked to the end), and a
# MemoryError at a stack of input width 32 (quadrature's 3^32 nodes listed).
_CHECKING: ContextVar[bool] = ContextVar("tsalgebra_checking_an_alternative", default=False)
# choose() calls open: a refusal inside another's planning (Monte Carlo's
# control variate, the automatic choice a named algorithm's refusal names)
# is caught by its caller and never shown, so its alternatives are not checked.
_DEPTH: ContextVar[int] = ContextVar("tsalgebra_choose_depth", default=0)


def _need(other: InnerProblem) -> float | None:
    """The peak bytes the question ``other`` needs: its plan's with the
    budget lifted (where it asks for a similarity, <a, b>, and the plan is
    not joint, the largest of it and the self-products' plans, which run one
    after another), else the smallest plan's refused over the memory bound;
    inf where it has no plan at any bound; None where not judged (a refusal
    inside a check or inside another plan, whose alternatives are not shown)."""
    if _CHECKING.get() or _DEPTH.get() > 1:
        return None
    token = _CHECKING.set(True)
    try:
        lifted = other.replace(budget=math.inf)
        need, joint = _peak_of(lifted)
        if need < math.inf and lifted.shares(True) > 1 and not joint:
            need = max([need] + [_peak_of(lifted.self_problem(side))[0] for side in ("a", "b")])
    finally:
        _CHECKING.reset(token)
    return need


def _peak_of(problem: InnerProblem) -> tuple[float, bool]:
    """(peak bytes, joint): of the plan chosen; else of the smallest plan
    refused over the memory bound, joint where every algorithm that could
    plan it is; (inf, True) where no plan is possible."""
    try:
        plan = _choose(problem)
    except MemoryBoundError as exc:
        return exc.needed, all(alg.joint for alg in _supporting(problem))
    except (CostError, ValueError, MemoryError, OverflowError):  # no plan at any bound (or one too large to list)
        return math.inf, True
    return plan.peak_bytes, plan.joint


def _peak(plan: Plan) -> str:
    return f"needs about {format_count(plan.peak_bytes)} bytes at its peak ({format_count(plan.flops)} flops)"


def _bound(problem: InnerProblem) -> str:
    return f"the memory bound of {format_count(problem.memory)} bytes"


def _fitting(problem: InnerProblem, alg: Algorithm) -> tuple[Alternative, ...]:
    """The algorithm the automatic choice would take instead of ``alg``
    (refused over the memory bound), as an alternative; () if none fits."""
    try:
        plan = choose(problem.replace(algorithm=None, method=alg.method if alg.method != "exact" else problem.method))
    except (CostError, ValueError):
        return ()
    return (Alternative("algorithm", plan.algorithm, f"{format_count(plan.flops)} flops, "
                                                     f"{format_count(plan.peak_bytes)} bytes at its peak"),)


def choose(problem: InnerProblem) -> Plan:
    """The plan that :func:`run` executes for ``problem`` (see the module
    docstring for the rule).  Raises ValueError when a named algorithm does
    not apply, CostError when nothing fits the budget, MemoryBoundError (a
    CostError) when what fits the budget exceeds the memory bound."""
    if _CHECKING.get():  # a sub-plan of an alternative being checked (see _CHECKING)
        raise CostError(f"{problem.describe()}: not planned while a refusal checks its alternatives")
    token = _DEPTH.set(_DEPTH.get() + 1)
    try:
        return _choose(problem)
    finally:
        _DEPTH.reset(token)


def _choose(problem: InnerProblem) -> Plan:
    """:func:`choose` itself (a check of an alternative plans with it)."""
    if problem.algorithm is not None:
        alg = _named(problem.algorithm)
        why = alg.supports(problem)
        if why is not None:
            raise ValueError(f"algorithm={alg.name!r} does not apply: {why}")
        if alg.method != _method(problem) and problem.method != "auto":
            raise ValueError(f"algorithm={alg.name!r} is a {alg.method} algorithm; method={problem.method!r} asks "
                             f"for another")
        share = problem.shares(alg.joint)
        named = problem.replace(algorithm=alg.name)
        try:
            plan = _plan_of(alg, problem, problem.budget * share)
        except CostError as exc:
            if exc.flops == math.inf:  # a fixed limit of the algorithm (pairings to walk): no budget lifts it
                others, note = _suggestions(named, [])
                raise NotApplicableError(f"{problem.describe()}: {alg.name} does not apply within its fixed "
                                         f"limits: {exc.reason}" + ("" if others else note),
                                         alternatives=_fitting(problem, alg) + others) from None
            raise CostError(f"{problem.describe()}: {alg.name}: {exc.reason}; the budget is "
                            f"{_limit(problem)}", flops=exc.flops, extrapolated=exc.extrapolated,
                            alternatives=alternatives(named, [(exc.flops / share, exc.extrapolated)])) from None
        if plan.peak_bytes > problem.memory:
            others = alternatives(named, [], plan.peak_bytes)  # max_memory first, then the algorithm that fits
            raise MemoryBoundError(f"{problem.describe()}: {alg.name} {_peak(plan)}, over {_bound(problem)}",
                                   needed=plan.peak_bytes, flops=plan.flops,
                                   alternatives=others[:1] + _fitting(problem, alg) + others[1:])
        return replace(plan, method=alg.method)
    best: Plan | None = None
    best_each = math.inf  # the best plan's flops per product answered: a joint plan's over three
    refusals: list[tuple[str, str]] = []
    limited = False  # some algorithm refused over a fixed limit of its own
    estimates: list[tuple[float, bool]] = []  # (flops per product, extrapolated) over the budget
    needs: list[tuple[float, float]] = []  # (peak bytes, flops per product) within the budget, over the memory bound
    for alg in _REGISTRY.values():
        if alg.method != _method(problem) or alg.name in problem.excluded:
            continue
        why = alg.supports(problem)
        if why is not None:
            if problem.inner in alg.inners:  # the others are not candidates worth naming
                refusals.append((alg.name, f"does not apply: {why}"))
            continue
        share = problem.shares(alg.joint)
        try:
            plan = _plan_of(alg, problem, share * min(problem.budget, best_each))
        except CostError as exc:
            if exc.flops == math.inf:  # over a fixed limit of the algorithm (pairings to walk): no budget lifts it
                refusals.append((alg.name, exc.reason))
                limited = True
            elif exc.flops / share > problem.budget or best is None:
                refusals.append((alg.name, exc.reason))
                estimates.append((exc.flops / share, exc.extrapolated))
            else:
                refusals.append((alg.name, f"costlier than {best.algorithm} ({exc.reason})"))
            continue
        if plan.peak_bytes > problem.memory:  # skipped as a plan over the budget is (planned from shapes: nothing held)
            refusals.append((alg.name, f"{_peak(plan)}, over the memory bound"))
            needs.append((plan.peak_bytes, plan.flops / share))
            continue
        if best is not None:
            refusals.append((best.algorithm, f"costlier than {plan.algorithm} ({format_count(best.flops)} flops)"))
        best, best_each = plan, plan.flops / problem.shares(plan.joint)
    if best is None:
        what = "; ".join(f"{name}: {why}" for name, why in refusals) or "none is registered"
        bounds = ([f"the budget of {_limit(problem)}"] if estimates else []) + ([_bound(problem)] if needs else [])
        why = (f"every {_method(problem)} algorithm would exceed {' or '.join(bounds)} or does not apply" if bounds
               else f"no {_method(problem)} algorithm applies" + (" within its fixed limits" if limited else ""))
        cheapest = min(estimates + [(f, False) for _, f in needs], default=(math.inf, False))
        reason = f"{problem.describe()} refused: {why} ({what})"
        if needs:
            needed = min(needs)[0]
            # a plan within the budget exists: a larger budget would only buy a costlier algorithm
            raise MemoryBoundError(reason, needed=needed, flops=cheapest[0], extrapolated=cheapest[1],
                                   alternatives=alternatives(problem, [], needed))
        if not bounds:  # every algorithm declined the question itself: no budget answers it
            others, note = _suggestions(problem, [])
            raise NotApplicableError(reason + ("" if others else note), alternatives=others)
        raise CostError(reason, flops=cheapest[0], extrapolated=cheapest[1],
                        alternatives=alternatives(problem, estimates))
    return replace(best, method=_method(problem), refusals=tuple(r for r in refusals if r[0] != best.algorithm))


def run(plan: Plan) -> Triple:
    """Execute a plan of :func:`choose`, with a bar over its flops while it
    runs (:mod:`tsalgebra.progress`, as the problem's ``progress`` asks).
    A run of the automatic choice whose rounding lost digits of an answer
    planned exact (a centred variance: results not exact, or none,
    RoundingError) hands the problem to the next algorithm that plans within
    the bounds, its results saying so, unless that one keeps fewer digits
    (``InnerResult.digits``); where none does, the results stand as they are
    (or the error is raised).  A named algorithm's run is what it is."""
    algorithm = _named(plan.algorithm)
    try:
        with planned(plan.flops, algorithm.title, plan.problem.progress), kept_heap(plan.peak_bytes):
            out = algorithm.run(plan)
    except RoundingError as exc:
        lost: RoundingError | None = exc
        out = None
    else:
        lost = None
        if not plan.exact or plan.problem.algorithm is not None or all(r is None or r.exact for r in out):
            return out
    if plan.problem.algorithm is None:
        try:
            instead = choose(plan.problem.replace(excluded=plan.problem.excluded + (plan.algorithm,)))
        except (CostError, ValueError):
            instead = None
        if instead is not None and instead.exact:
            try:
                other = run(instead)
            except RoundingError:  # it kept no digit: the first run's, if any, stand
                other = None
            if other is not None and (out is None or _digits(other) > _digits(out)):
                own = plan.problem.notes + plan.notes
                said = [n for r in out or () if r is not None for n in r.notes if n not in own]
                why = str(lost) if lost is not None else "; ".join(said)
                note = f"{plan.algorithm} was passed over ({why})"
                return tuple(None if r is None else replace(r, notes=r.notes + (note,),  # type: ignore[return-value]
                                                            passed_over=(plan.algorithm,) + r.passed_over)
                             for r in other)
    if lost is not None:
        raise lost
    return out  # type: ignore[return-value]


def _digits(results: Triple) -> float:
    """The fewest digits any of a run's results kept (inf: all exact)."""
    return min((math.inf if r.exact else r.digits or 0.0 for r in results if r is not None), default=math.inf)


def solve(problem: InnerProblem) -> Triple:
    """Choose, then run: (<a, b>, <a, a> or None, <b, b> or None)."""
    return run(choose(problem))


def describe(plan: Plan) -> dict[str, Any]:
    """A JSON-able account of a plan: algorithm, cost and the others' reasons."""
    return {"algorithm": plan.algorithm, "title": _named(plan.algorithm).title, "exact": plan.exact,
            "joint": plan.joint, "flops": float(plan.flops), "peak_bytes": float(plan.peak_bytes),
            "contractions": plan.contractions, **dict(plan.facts), "notes": list(plan.notes),
            "not_chosen": [{"algorithm": n, "reason": r} for n, r in plan.refusals]}
