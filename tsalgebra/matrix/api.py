"""The public API: :func:`similarity_matrix` and :func:`cross_similarity_matrix`.

Each call checks its arguments and prepares the models into a :class:`Job`,
costs the routes of :data:`REGISTRY` that apply, runs the chosen one, and
turns the :class:`Gram` it returns into cosines and norms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..algorithms.registry import alternatives
from ..arrays import is_torch
from ..components import Component
from ..cosine import cosines
from ..inner import LOG_FLOAT_MAX, LOG_FLOAT_TINY
from ..heap import kept_heap
from ..measure import Measure
from ..rescale import without_output_bias
from ..problem import (DEFAULT_BUDGET, FUNCTIONAL, Alternative, CostError, InnerProblem, MemoryBoundError, bound_measure,
                       check_arguments, check_degree, check_flags, check_sampling, checked_budget, checked_memory, default_measure_note, degree_of,
                       format_count, resolve_inner, rounded_up)
from . import materialize, node_gram, pairwise, pairwise_gram
from .job import Gram, Job, Route, TileGram, Tiling
from ..threads import blas_threads
from .ops import Clock, Ops, parse_dtype
from .prepare import Chain, Prepared, common_dims, prepare_models
from .results import RouteCost, SimilarityMatrix

__all__ = ["ROUTES", "similarity_matrix", "cross_similarity_matrix"]

ROUTES = ("auto", "materialize", "pairwise-gram", "node-gram", "pairwise")
# The routes, each a module following the Route protocol, in the order they
# are costed (auto takes the first of equal flops); REGISTRY finds them by name.
_ROUTE_MODULES: tuple[Route, ...] = (pairwise_gram, materialize, node_gram, pairwise)
REGISTRY: Mapping[str, Route] = MappingProxyType({r.NAME: r for r in _ROUTE_MODULES})


# ------------------------------------------------------------ one call


def _compute(rows_in: Any, cols_in: Any | None, inner: str | None, method: str, mean: Any, cov: Any, centered: bool,
             route: str, dtype: Any, device: Any, max_memory: int | None, progress: bool | None,
             options: dict[str, Any], tiling: Tiling | None = None) -> SimilarityMatrix:
    started = time.perf_counter()
    if tiling is not None and tiling.tile is not None and not tiling.active:  # as any option that does not apply
        raise ValueError("tile= applies to tiled matrices only (with store=, workers=, scheduler= or client=); "
                         "without them the matrix is computed whole")
    measure = given = options.pop("measure", None)
    rows, labels = _models(rows_in, "models" if cols_in is None else "models_a")
    cols, col_labels = (None, None) if cols_in is None else _models(cols_in, "models_b")
    if inner is None or inner in FUNCTIONAL:
        inner, measure = resolve_inner(inner, measure, *rows, *(cols or []))
    said = (default_measure_note(measure),) if given is None and measure is not None else ()
    flags = {"centered": centered, **options}  # ts.similarity's checks, before any route: every route agrees
    check_flags(flags)
    centered, options = flags.pop("centered"), flags
    options = _checked(inner, method, centered, route, options)
    max_memory = checked_memory(max_memory)
    said += _common_degree(rows + (cols or []), inner, options)
    law = _measure(rows + (cols or []), inner, mean, cov, measure)
    _numbers_only(rows, cols, law)
    _finite_weights(rows, cols)  # before any route (auto, named or tiled) is judged
    if centered:  # the same covariances without the output biases, whose size float64 would subtract
        dropped: dict[int, Any] = {}  # one copy per model: a model in both rows and columns stays one object
        rows = [dropped.setdefault(id(m), without_output_bias(m)) for m in rows]
        cols = None if cols is None else [dropped.setdefault(id(m), without_output_bias(m)) for m in cols]
    if tiling is not None and tiling.active:  # tiles on a cluster or into a store: the same routes per tile
        from .cluster import tiled

        _widths(rows + (cols or []))
        spec = TileSpec(inner, method, law, centered, route, dtype, device, max_memory, dict(options))
        result = tiled(rows, cols, labels, col_labels, spec, tiling, progress, started)
        return replace(result, notes=said + result.notes)
    job = _job(rows, cols, inner, method, law, centered, dtype, device, max_memory, progress, options, route)
    gram, chosen, costs, notes = _gram(job, route)
    return _result(job, gram, chosen, costs, said + notes, labels, col_labels, time.perf_counter() - started)


def _gram(job: Job, route: str, judged: bool = False) -> tuple[Gram, str, dict[str, RouteCost], tuple[str, ...]]:
    """Cost the routes that apply, choose one and run it (``judged``: the
    budget was judged on the whole matrix already, see :func:`judge_tiles`)."""
    costs, chosen, notes = _costed(job, route)
    if not judged:
        _within_budget(job, costs.get(chosen), job.options.get("budget", DEFAULT_BUDGET))
    clock = Clock(job.ops)
    if job.prepared is not None:
        clock.add("prepare", job.prepared.seconds, 0)  # folding and normalizing, on the host
    cost = costs[chosen] if chosen in costs else REGISTRY[chosen].layout(job)
    with kept_heap(cost.peak_bytes):
        gram = REGISTRY[chosen].run(job, cost, clock)
    if route == "auto" and gram.method == "exact" and not exact_in(gram) and str(gram.dtype) == "float64":
        # digits lost to rounding (centring cancels each output's mean, hidden units may cancel each other):
        # another route that fits and is within the budget may round less (materialize cancels them within
        # each model's tensor, pairwise-gram in the sum over each pair's products)
        budget = job.options.get("budget", DEFAULT_BUDGET)
        first = chosen
        for other in sorted((c for c in costs.values() if c.route != chosen and c.fits
                             and c.flops <= budget * _products(job)), key=lambda c: c.flops):
            with kept_heap(other.peak_bytes):
                again = REGISTRY[other.route].run(job, other, Clock(job.ops))
            if _digits(again) > _digits(gram):
                gram, chosen = again, other.route
            if exact_in(gram):
                break
        if chosen != first:
            notes += (f"the {first} route's rounding kept fewer digits of some model's self product than the {chosen} "
                      "route, which computed the matrix",)
    return gram, chosen, costs, notes


def _digits(gram: Gram) -> float:
    """The digits a route's rounding kept of the products it judged (all, where it judged none)."""
    return math.inf if gram.digits is None else gram.digits


def _costed(job: Job, route: str) -> tuple[dict[str, RouteCost], str, tuple[str, ...]]:
    """The costs of the routes that apply, the route chosen and notes on the choice."""
    costs = {name: r.layout(job) for name, r in REGISTRY.items() if r.COSTED and r.applies(job) is None}
    chosen, notes = _choose(route, job, costs)
    return costs, chosen, notes


@dataclass(frozen=True)
class TileSpec:
    """What every tile of a tiled matrix computes (the arguments of
    :func:`similarity_matrix`, checked, the measure bound)."""

    inner: str
    method: str
    measure: Measure | None
    centered: bool
    route: str
    dtype: Any
    device: Any
    max_memory: int | None
    options: Mapping[str, Any]


def compute_tile(rows: list[Any], cols: list[Any] | None, spec: TileSpec, selfs: bool) -> TileGram:
    """One tile: the rows' models against the columns' (``cols`` None: a
    symmetric tile of the rows), by the best single-machine route; ``selfs``
    False lets the pairwise route skip the self products (the norms come from
    other tiles).  Runs on a worker."""
    t0 = time.perf_counter()
    job = _tile_job(rows, cols, spec, selfs)
    gram, chosen, _, notes = _gram(job, spec.route, judged=True)  # judge_tiles judged the whole matrix's flops
    zeros = np.zeros(len(rows)), np.zeros(len(cols) if cols is not None else len(rows))
    return TileGram(np.asarray(gram.cross, dtype=float), np.asarray(gram.row_self, dtype=float),
                    np.asarray(gram.col_self, dtype=float),
                    zeros[0] if gram.row_log_scale is None else np.asarray(gram.row_log_scale, dtype=float),
                    zeros[1] if gram.col_log_scale is None else np.asarray(gram.col_log_scale, dtype=float),
                    chosen, int(gram.flops), exact_in(gram), gram.method, time.perf_counter() - t0,
                    gram.cosines, None if gram.stderr is None else np.asarray(gram.stderr, dtype=float),
                    None if gram.heavy is None else np.asarray(gram.heavy, dtype=bool), gram.algorithms,
                    gram.device, job.memory, tuple(notes))


def _tile_job(rows: list[Any], cols: list[Any] | None, spec: TileSpec, selfs: bool,
              shapes: dict[int, Any] | None = None) -> Job:
    """The job of one tile (``shapes``: in shapes only, see :func:`_job`)."""
    return _job(rows, cols, spec.inner, spec.method, spec.measure, spec.centered, spec.dtype, spec.device,
                spec.max_memory, False, dict(spec.options), spec.route, selfs, shapes)


def judge_tiles(rows: list[Any], cols: list[Any] | None, spec: TileSpec,
                tiles: Sequence[tuple[list[Any], list[Any] | None, bool]]) -> None:
    """The flop budget of a tiled matrix, judged on the whole matrix before
    any tile runs, as :func:`_within_budget` judges a matrix on one machine:
    the flops every tile's route plans (``tiles``: each tile's rows, columns
    or None, and whether it computes its self products; laid out from the
    models' shapes, nothing prepared) over the products of those tiles.
    Judged tile by tile, a refusal named one tile's cost, and the budget it
    suggested need not admit the next tile (nor the finished tiles of a
    cluster be kept); so the tiles do not judge it again.  A tile that goes
    pair by pair plans each product within the budget itself, as on one
    machine, and is not counted."""
    budget = spec.options.get("budget", DEFAULT_BUDGET)
    if math.isinf(budget) or spec.route in REGISTRY and not REGISTRY[spec.route].COSTED:
        return  # no bound, or every tile pair by pair
    shapes: dict[int, Any] = {}  # each model prepared in shapes once, for all its tiles
    flops, products, routes, job = 0, 0, set(), None
    for r, c, selfs in tiles:
        job = _tile_job(r, c, spec, selfs, shapes)
        costs, chosen, _ = _costed(job, spec.route)
        if chosen in costs:
            flops += costs[chosen].flops
            products += _products(job)
            routes.add(chosen)
    if job is None or not routes:
        return
    whole = replace(job, rows=rows, cols=cols, prepared=None)  # the alternatives are planned for one pair of it
    _within_budget(whole, RouteCost(", ".join(sorted(routes)), flops, 0, True, ""), budget, products,
                   f"the tiled matrix ({len(tiles)} tiles; routes {', '.join(sorted(routes))})")


def _checked(inner: str, method: str, centered: bool, route: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options for ts.inner (degree, budget, orbits), after checking the arguments."""
    check_arguments(inner, method, centered)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if options.get("per_output"):
        raise TypeError("per_output is not available for similarity matrices; use ts.similarity per pair")
    # numpy numbers as Python's (a store identifies its options by their repr: np.int64(1) is seed=1)
    options = {k: v.item() if isinstance(v, (np.number, np.bool_)) else v for k, v in options.items()
               if k != "per_output"}
    unknown = set(options) - {"degree", "budget", "orbits", "samples", "seed", "rel_error"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    check_degree(inner, options)
    check_sampling(method, options)  # samples= without method='sampled' was silently ignored
    if "budget" in options:
        options["budget"] = checked_budget(options["budget"])
    return options


def _common_degree(models: list[Any], inner: str, options: dict[str, Any]) -> tuple[str, ...]:
    """Fix the symmetric product's degree once for the whole matrix (in
    ``options``), and a note when it lifts some models.  Every route and
    every tile then compares every pair at the set's largest degree: a degree
    chosen per tile or per pair would mix Bombieri weights of different k
    within one matrix (and make it depend on the tile size)."""
    if inner != "symmetric" or options.get("degree") is not None:
        return ()
    degrees = [degree_of(m) for m in models]
    options["degree"] = k = max(degrees)
    if min(degrees) == k:
        return ()
    return (f"symmetric product at the set's common degree {k}: models of lower degree are lifted to it in every "
            "pair (a single pair's similarity lifts only to that pair's larger degree; pass degree= to choose)",)


def _models(models: Any, what: str) -> tuple[list[Any], tuple[str, ...] | None]:
    """The models of one side as a list, and their names when given as a mapping."""
    if isinstance(models, Mapping):
        return list(models.values()), tuple(str(k) for k in models.keys())
    if isinstance(getattr(models, "names", None), tuple) and len(models.names) == len(models):  # ts.load(dir)
        return list(models), tuple(models.names)
    if isinstance(models, (Component,)) or not isinstance(models, Iterable):
        raise TypeError(f"{what}: expected a sequence (or a mapping name -> model) of models")
    out = list(models)
    if not out:
        raise ValueError(f"{what}: no models")
    return out, None


def _widths(models: Sequence[Any]) -> None:
    ins = {getattr(m, "in_features", None) for m in models}
    outs = {getattr(m, "out_features", None) for m in models}
    if len(ins) > 1:
        raise ValueError(f"input widths differ across the models: {sorted(map(str, ins))}")
    if len(outs) > 1:
        raise ValueError(f"output widths differ across the models: {sorted(map(str, outs))}")


def _measure(rows: list[Any], inner: str, mean: Any, cov: Any, measure: Measure | None) -> Measure | None:
    """The measure bound to the models' input; None for the inner products
    that have none."""
    if inner not in FUNCTIONAL:
        if measure is not None or mean is not None or cov is not None:
            raise ValueError(f"a measure (mean, cov) belongs to the functional inner products, not to {inner!r}")
        return None
    return bound_measure(rows[0], mean, cov, measure, *rows[1:])


def preparation_bytes(models: Sequence[Any]) -> int:
    """The bytes the batched routes' prepared copies of ``models`` take (about
    their weights' size: padded factors, normalized), from shapes alone."""
    padded = sum((w.shape[0] + 1) * (w.shape[1] + 1) for m in models if isinstance(m, Component)
                 for w in m.weights() if w.ndim == 2)  # each matrix with its constant row and column
    return 8 * padded


def _pair_fits(rows: list[Any], cols: list[Any] | None, inner: str, method: str, measure: Measure | None,
               centered: bool, options: Mapping[str, Any], max_memory: int | None) -> bool:
    """Whether the pairwise route's products fit their memory bound, judged
    by one pair planned from shapes (the models of a matrix share their
    architecture): a refusal suggests that route only where it would run."""
    from ..inner import plan_inner

    try:
        plan_inner(rows[0], (cols or rows)[-1], inner, method, measure=measure, centered=centered,
                   **dict(options, max_memory=max_memory))
    except MemoryBoundError:
        return False
    except (CostError, ValueError):  # refused for another reason, which the route says when it runs
        return True
    return True


def _preparation_fits(models: list[Any], memory: int, pair_fits: Any, room: Any = None) -> None:
    """Refuse, before anything is copied, when the batched routes' prepared
    copies of the models (padded factors, about the size of their weights)
    would exceed the memory bound (``pair_fits()``: whether to suggest the
    pairwise route; ``room(need)``: for a route named, the bound that admits
    both the copies and that route's blocks, None where it is not known)."""
    need = preparation_bytes(models)
    if need > memory:
        n = len(models)
        pairwise = (Alternative("route", "pairwise", f"pair by pair, {n * (n + 1) // 2:,} similarities, two models "
                                                     "in memory at a time"),) if pair_fits() else ()
        bound, why = rounded_up(need), "room for the prepared models"
        both = room(need) if room is not None else None
        if both is not None and both > bound:  # the route's blocks need more: suggested alone, refused when taken
            bound, why = both, "room for the prepared models and the route's blocks"
        raise MemoryBoundError(f"preparing {n} models for the batched routes takes about {need:,} bytes, over "
                               f"max_memory={memory:,}", needed=need, alternatives=(
                                   Alternative("max_memory", bound, why), *pairwise))


def _admitting(job: Job, route: str, start: float) -> float:
    """The memory bound to suggest for ``route`` named: ``start`` rounded up,
    raised until the route's layout under that bound fits it.  A layout
    follows its bound (chunks near it), so the peak of the smallest blocks
    under a bound too small is no promise under a larger one: each
    suggestion is laid out as the run would lay it out."""
    bound = rounded_up(start)
    for _ in range(16):
        cost = REGISTRY[route].layout(replace(job, memory=int(bound)))
        if cost.fits and cost.peak_bytes <= bound:
            break
        bound = rounded_up(max(cost.peak_bytes, bound * 1.05))  # two digits: 5 % up moves the second
    return bound


def _in_shapes(rows: list[Any], cols: list[Any] | None, inner: str, method: str, centered: bool,
               measure: Measure | None, degree: Any, cache: dict[int, Any] | None = None) -> Prepared | None:
    """The models as :func:`prepare_models` gives them, in shapes only (every
    array a broadcast zero, no memory): what the routes lay out, for a
    refusal's suggestion, one model prepared at a time (``cache``: id of a
    model -> its chain in shapes, for calls with the same arguments).  None
    where no batched route covers them."""
    cache = {} if cache is None else cache

    def shaped(m: Any) -> Chain | None:
        one = prepare_models([m], None, inner, method, centered, measure, degree)
        if one is None:
            return None
        ch = one.rows[0]
        return replace(ch, blocks=tuple(tuple(np.broadcast_to(np.float64(0.0), x.shape) for x in blk)
                                        for blk in ch.blocks))

    def side(models: list[Any]) -> list[Chain] | None:
        out = []
        for m in models:
            if id(m) not in cache:
                cache[id(m)] = shaped(m)
            if cache[id(m)] is None:
                return None
            out.append(cache[id(m)])
        return out

    try:
        a = side(rows)
        b = None if cols is None else side(cols)
        if a is None or (cols is not None and b is None):
            return None
        return Prepared(a, b, common_dims(a, *([] if b is None else [b])), 0.0)
    except (TypeError, ValueError):  # the run says why
        return None


def _job(rows: list[Any], cols: list[Any] | None, inner: str, method: str, measure: Measure | None, centered: bool,
         dtype: Any, device: Any, max_memory: int | None, progress: bool | None, options: dict[str, Any],
         route_named: str = "auto", selfs: bool = True, shapes: dict[int, Any] | None = None) -> Job:
    """The job: the engine, the memory bound, and the models prepared
    (``shapes`` given: in shapes only, to be costed, not run; see
    :func:`_in_shapes`)."""
    _widths(rows + (cols or []))
    dname = parse_dtype(dtype)
    if device is None and any(is_torch(w) for m in rows + (cols or []) if isinstance(m, Component) for w in m.weights()):
        device = "cpu"  # pragma: no cover - components store numpy weights
    force_numpy = isinstance(device, str) and device == "numpy"
    if force_numpy:
        device = None
    ops = Ops(dname, device)
    memory = checked_memory(max_memory) or ops.default_memory()
    unprepared = None

    def engine(prepared: Prepared | None) -> tuple[Ops, int]:
        """The engine and worker threads for the models as prepared."""
        threads = blas_threads() if prepared is not None and not ops.is_torch else 1
        if device is None and not force_numpy and prepared is not None and prepared.dims.depth > 1 and threads < 2:
            # stacks on one thread: torch on the CPU, whose fused elementwise
            # kernels took half numpy's time for the Hadamard cores here; with
            # more BLAS threads numpy's worker threads won (see ops.run_tasks)
            return Ops(dname, "cpu"), threads
        return ops, threads

    def room(need: int) -> float | None:
        """For a route named: the bound that admits the prepared copies and
        its blocks, laid out as the run would lay them out."""
        shapes = _in_shapes(rows, cols, inner, method, centered, measure, options.get("degree"))
        ops_used, threads = engine(shapes)
        job = Job(rows, cols, inner, method, centered, MappingProxyType(options), progress, measure, shapes, ops_used,
                  need, threads, selfs, None, checked_memory(max_memory))
        route = REGISTRY.get(route_named)
        if route is None or not route.COSTED:
            return None
        why = route.applies(job)
        if why is not None:  # what the run refuses under any bound (_choose): no bound to suggest
            raise ValueError(f"route={route_named!r} is not available here: {why}; use route='pairwise'")
        return _admitting(job, route_named, need)

    try:
        if route_named != "pairwise":
            _preparation_fits(rows + (cols or []), memory, lambda: _pair_fits(
                rows, cols, inner, method, measure, centered, options, checked_memory(max_memory)),
                room if route_named != "auto" else None)
    except MemoryBoundError as exc:
        if route_named != "auto":  # a route asked for by name must fit
            raise
        unprepared = f"{exc.reason}: each pair with ts.inner"  # auto falls back, pair by pair
    if unprepared:
        prepared = None
    elif shapes is not None:
        prepared = _in_shapes(rows, cols, inner, method, centered, measure, options.get("degree"), shapes)
    else:
        prepared = prepare_models(rows, cols, inner, method, centered, measure, options.get("degree"))
    ops_used, threads = engine(prepared)
    return Job(rows, cols, inner, method, centered, MappingProxyType(options), progress, measure, prepared, ops_used,
               memory, threads, selfs, unprepared, checked_memory(max_memory))


def _products(job: Job) -> int:
    """The inner products of a job: its pairs and its models' norms."""
    n, m = len(job.rows), len(job.cols) if job.cols is not None else 0
    return n * (n + 1) // 2 if job.cols is None else n * m + n + m


def _within_budget(job: Job, cost: RouteCost | None, budget: float, products: int | None = None,
                   what: str | None = None) -> None:
    """The flop budget of the pairwise API, per inner product: a batched
    route is refused when its planned flops exceed it times the products
    (``products``: the job's unless given; ``what`` plans them: the route
    unless given)."""
    if cost is None:
        return  # the pairwise route plans (and refuses) every product itself
    products = products or _products(job)
    if cost.flops > budget * products:
        per = cost.flops / products
        a, b = job.rows[0], (job.cols or job.rows)[-1]  # the other methods that would answer, as ts.similarity's refusal names them
        problem = InnerProblem.of(a, b, job.inner, job.method, measure=job.measure, centered=job.centered,
                                  **dict(job.options, max_memory=job.pair_memory))
        # another method runs pair by pair under the matrix's bound (pairwise route): suggest it only where
        # its plan fits that bound, else the suggestion is refused for memory when taken
        others = tuple(alt for alt in alternatives(problem, []) if alt.option == "method" and _method_fits(
            job, alt.value))
        raise CostError(f"{what or f'the {cost.route} route'} plans {cost.flops:.3g} flops ({per:.3g} per inner "
                        f"product), over the budget of {budget:.3g} per product", flops=cost.flops,
                        alternatives=(Alternative("budget", rounded_up(per), "the planned cost"),) + others)


def _method_fits(job: Job, method: str) -> bool:
    """Whether ``method`` (an alternative to the one asked) plans one pair
    within the bound the pairwise route gives each product; the budget is
    not judged here (the refusal suggests budget= separately, and the
    registry's alternatives name a method whatever its cost)."""
    return _pair_fits(job.rows, job.cols, job.inner, method, job.measure, job.centered,
                      dict(job.options, budget=math.inf), job.pair_memory)


def _choose(route: str, job: Job, costs: Mapping[str, RouteCost]) -> tuple[str, tuple[str, ...]]:
    """The route to run, and notes on the choice.  ``costs``: the costed
    routes that apply.  Auto takes the fewest flops among those that fit,
    else the smallest of them, else the fallback (a route that is not
    costed); a route asked for by name must apply and fit."""
    if route == "auto":
        fitting = [c for c in costs.values() if c.fits]
        if fitting:
            return min(fitting, key=lambda c: c.flops).route, ()
        if costs:  # none fits: pair by pair (two models in memory), never over the bound
            smallest = min(costs.values(), key=lambda c: c.peak_bytes)
            return "pairwise", (f"no batched route fits max_memory={job.memory} bytes (the smallest, "
                                f"{smallest.route}, needs {smallest.peak_bytes}): each pair with ts.inner",)
        fallback = next(name for name, r in REGISTRY.items() if not r.COSTED and r.applies(job) is None)
        return fallback, (job.unprepared or "no batched route covers these models/arguments: each pair with ts.inner",)
    why = REGISTRY[route].applies(job)
    if why is not None:
        raise ValueError(f"route={route!r} is not available here: {why}; use route='pairwise'")
    if route in costs and not costs[route].fits:
        need, fitting = costs[route].peak_bytes, [c.route for c in costs.values() if c.fits]
        pairs = _pair_fits(job.rows, job.cols, job.inner, job.method, job.measure, job.centered, job.options,
                           job.pair_memory)  # only routes that would run are suggested
        auto = ((Alternative("route", "auto", f"the cheapest route that fits ({', '.join(fitting)})"),) if fitting
                else (Alternative("route", "auto", "pair by pair, no batched route fitting"),) if pairs else ())
        pairwise = (Alternative("route", "pairwise", "pair by pair, each product within the bound"),) if pairs else ()
        # route='...' as the library spells the argument (the command line reads it as --route ...)
        raise MemoryBoundError(
            f"route={route!r} needs about {format_count(need)} bytes at its smallest blocks, over the memory bound "
            f"of {format_count(job.memory)} bytes", needed=need, flops=costs[route].flops, alternatives=(
                Alternative("max_memory", _admitting(job, route, need), f"room for the {route} route's blocks"),
                *auto, *pairwise))
    return route, ()


# ------------------------------------------------------------ the result


def _result(job: Job, gram: Gram, route: str, costs: Mapping[str, RouteCost], notes: tuple[str, ...],
            labels: tuple[str, ...] | None, col_labels: tuple[str, ...] | None, seconds: float) -> SimilarityMatrix:
    sym = job.symmetric
    if gram.cosines:  # the route's own cosines (a joint estimate per pair); the self products give the norms
        cos = _cosines(gram.cross, np.ones(gram.cross.shape[0]), np.ones(gram.cross.shape[1]), job.inner,
                       gram.dtype, sym)
        notes += (pairwise.JOINT_NOTE,) + (() if gram.heavy is None else pairwise.heavy_note(gram.heavy, sym))
    else:
        try:
            cos = _cosines(gram.cross, gram.row_self, gram.col_self, job.inner, gram.dtype, sym)
        except (ValueError, ArithmeticError) as e:
            if gram.method != "exact" or gram.exact:
                raise
            # materialize cancels within each model's tensor (it judges centring only), pairwise-gram in each
            # pair's sum
            hint = "route='materialize' rounds less" if route == pairwise_gram.NAME else ""
            if isinstance(e, ValueError):  # a zero norm
                raise ValueError(f"{e} (its self product is within the {route} route's {gram.dtype} rounding of the "
                                 "terms it sums, so taken as 0: "
                                 + (hint or f"the model is constant to {gram.dtype}") + ")") from None
            # |cosine| above 1: the rounding, not a product that is not positive definite
            raise ArithmeticError(f"{str(e).split(':')[0]}: the {route} route's {gram.dtype} rounding left "
                                  f"{gram.digits:.1f} digits of some model's self product"
                                  + (f"; {hint}" if hint else "")) from None
    log_norms = log_norms_of(gram.row_self, gram.row_log_scale)
    col_log_norms = log_norms if sym else log_norms_of(gram.col_self, gram.col_log_scale)
    norms, col_norms, said = norms_of(log_norms, col_log_norms, sym)
    if gram.method == "exact" and str(gram.dtype) != "float64":
        said += (FLOAT32_NOTE,)
        if gram.digits is not None and gram.digits < FLOAT32_DIGITS:  # far fewer than float32's own
            said += (f"float32's rounding left about {max(gram.digits, 0.0):.0f} digits of some model's self product "
                     "(the terms it sums far above their sum); float64 keeps more",)
    elif not gram.exact and gram.method == "exact":
        said += (DIGITS_NOTE,)
    elif job.ops.dtype_name != str(gram.dtype):  # a route that computes in float64 only (node-gram, pairwise)
        said += (f"dtype {job.ops.dtype_name} does not apply to the {route} route: computed in {gram.dtype}",)
    if any(isinstance(m, Component) and m.exact for m in job.rows + (job.cols or [])):
        said += (EXACT_WEIGHTS_NOTE,)
    return SimilarityMatrix(
        values=cos, route=route, flops=int(gram.flops), inner=job.inner, method=gram.method, exact=exact_in(gram),
        norms=norms, col_norms=col_norms, symmetric=sym,
        centered=job.centered, measure=job.measure.label if job.measure is not None else "", dtype=gram.dtype, device=gram.device, max_memory=job.memory,
        candidates=dict(costs), steps=gram.steps, seconds=seconds, labels=labels,
        col_labels=labels if sym else col_labels, notes=notes + said, stderr=gram.stderr, heavy_tailed=gram.heavy,
        log_norms=log_norms, col_log_norms=col_log_norms, algorithms=gram.algorithms,
    )


# an exact algorithm's value whose float64 rounding the algorithm judged (Plan.rounded_result)
DIGITS_NOTE = ("not exact: the floating-point rounding of an exact algorithm left fewer than 8 digits of some model's "
               "self product, or none (taken as 0): the terms it sums far above their sum (an output mean that "
               "centring removes, hidden units that cancel)")
# float32 keeps 6 to 7 digits of ordinary models' self products by the routes' own judgement
# (rounding_unit's 2^-21 against terms a few times their sum); below this a note says how few
FLOAT32_DIGITS = 4
EXACT_WEIGHTS_NOTE = ("some models' weights are exact numbers (Fractions, sympy): the matrix's entries are floating "
                      "point, its products of exact algorithms rounded; ts.similarity of a pair keeps exact numbers")
FLOAT32_NOTE = ("computed in float32 (about 7 significant digits): an exact algorithm, not an exact value; "
                "dtype float64 (the default) for exact values")


def exact_in(gram: Gram) -> bool:
    """Whether the products are exact values: an exact algorithm computed in
    float64 (float32 keeps about 7 digits, which no exact label should hide)."""
    return bool(gram.exact) and str(gram.dtype) == "float64"


def _cosines(K: np.ndarray, sA: np.ndarray, sB: np.ndarray, inner: str, dtype: str, sym: bool) -> np.ndarray:
    """K / sqrt(sA sB^T) in ``dtype`` (:func:`tsalgebra.cosine.cosines`, with
    the round-off tolerance of the dtype), symmetrized for a symmetric matrix."""
    cos = cosines(K, np.asarray(sA)[:, None], np.asarray(sB)[None, :], inner,
                  tol=1e-8 if dtype == "float64" else 1e-3, sides=("row model", "column model"))
    if sym:
        cos = (cos + cos.T) / 2
        np.fill_diagonal(cos, 1.0)
    return cos.astype(dtype)


def log_norms_of(s: np.ndarray, logU: np.ndarray | None) -> np.ndarray:
    """log sqrt(s U^2) per model (U = exp(logU); -inf for a norm of 0), in
    float64 logarithms, which hold any norm."""
    with np.errstate(divide="ignore"):
        log = 0.5 * np.log(np.maximum(np.asarray(s, dtype=float), 0.0))
    return log if logU is None else log + np.asarray(logU, dtype=float)


def norms_of(log_norms: np.ndarray, col_log_norms: np.ndarray,
             sym: bool) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The norms of the rows and columns from their logs, and a note per
    side whose norms float64 cannot hold.  Those are NaN: ts.norm refuses
    them, and an inf or a 0 would read as a norm (a 0 beside finite cosines,
    which a zero norm would have refused); their cosines are unaffected."""
    sides = [("model" if sym else "row model", "norms", "log_norms", log_norms)] + (
        [] if sym else [("column model", "col_norms", "col_log_norms", col_log_norms)])
    out: list[np.ndarray] = []
    notes: tuple[str, ...] = ()
    for side, attr, log_attr, log in sides:
        outside = (log > LOG_FLOAT_MAX) | (np.isfinite(log) & (log < LOG_FLOAT_TINY))  # -inf: a norm of 0
        out.append(np.exp(np.where(outside, np.nan, log)))
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            big = log[k] > 0
            more = int(outside.sum()) - 1
            notes += (f"the norm of {side} {k}, 10^{log[k] / math.log(10):.0f}, {'overflows' if big else 'underflows'} "
                      f"float64 (its weights are that {'large' if big else 'small'})"
                      + (f" (and {more} more {side}s' norms beyond float64)" if more else "")
                      + f": NaN (null in JSON) in {attr}, its natural log in {log_attr}; the cosines are unaffected",)
    return out[0], out[0] if sym else out[1], notes


def _numbers_only(rows: list[Any], cols: list[Any] | None, law: Measure | None) -> None:
    """Refuse symbolic weights (sympy expressions in free symbols) before
    anything is computed: a matrix holds floats, and a symbolic product has
    none (exact numbers are taken as floats, as every route takes them)."""
    sides = [("model" if cols is None else "row model", rows)] + ([] if cols is None else [("column model", cols)])
    for side, models in sides:
        for k, m in enumerate(models):
            free = _free_symbols(m.weights() if isinstance(m, Component) else [])
            if free:
                raise TypeError(f"{side} {k} has symbolic weights (in {free}): a similarity matrix holds numbers; "
                                "use ts.similarity per pair for a symbolic cosine, or substitute numbers for the "
                                "symbols")
    free = _free_symbols([getattr(law, "mean", None), getattr(law, "cov", None)])
    if free:
        raise TypeError(f"the measure is symbolic (in {free}): a similarity matrix holds numbers; use "
                        "ts.similarity per pair, or substitute numbers for the symbols")


def _finite_weights(rows: list[Any], cols: list[Any] | None) -> None:
    """Refuse a weight with a NaN or Inf entry (written into a model's
    writable arrays after its constructor checked them), naming the model and
    the weight, before any route is judged: a route named would otherwise
    refuse the models as ones it does not cover, and auto found it only where
    the pairwise route rebuilt the layer."""
    from ..components import _check_exact_entries

    sides = [("model" if cols is None else "row model", rows)] + ([] if cols is None else [("column model", cols)])
    for side, models in sides:
        for k, m in enumerate(models):
            if not isinstance(m, Component):
                continue
            layers = m.layers
            for j, layer in enumerate(layers):
                name = layer.name if len(layers) == 1 else f"layer {j} ({layer.name})"
                for what, w in layer.named_weights().items():
                    if not isinstance(w, np.ndarray):
                        continue
                    try:
                        if w.dtype == object:
                            _check_exact_entries(w, what, name)
                        elif not np.isfinite(w).all():
                            raise ValueError(f"{name}: {what} contains NaN or Inf entries")
                    except (TypeError, ValueError) as exc:
                        raise type(exc)(f"{side} {k}: {exc}") from None


def _free_symbols(arrays: Sequence[Any]) -> str:
    """The free symbols of the entries of exact (object) arrays, named, '' if none."""
    free = {str(x) for a in arrays if isinstance(a, np.ndarray) and a.dtype == object for v in a.flat
            for x in getattr(v, "free_symbols", ())}
    return ", ".join(sorted(free))


# ------------------------------------------------------------ public functions


def similarity_matrix(
    models: Sequence[Any] | Mapping[str, Any],
    inner: str | None = None,
    method: str = "auto",
    mean: Any = None,
    cov: Any = None,
    *,
    measure: Measure | None = None,
    centered: bool = False,
    route: str = "auto",
    dtype: Any = None,
    device: Any = None,
    max_memory: int | None = None,
    progress: bool | None = None,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    store: Any = None,
    tile: int | None = None,
    **kwargs: Any,
) -> SimilarityMatrix:
    """The N x N matrix of cosines <a, b> / sqrt(<a, a> <b, b>) between ``models``.

    ``inner``, ``method``, ``measure`` (or its shorthand ``mean``/``cov``),
    ``centered`` (and ``degree``, ``budget``, ``orbits`` for the pairwise
    route) mean what they mean in :func:`tsalgebra.similarity`: the pairwise
    route plans each pair as ts.similarity plans it, so it grants a pair what
    ts.similarity grants (an algorithm whose one computation yields all three
    products of the pair may spend three budgets).  ``route``: "auto" (the cheaper batched route
    within ``max_memory``; "pairwise" where none applies), "materialize",
    "pairwise-gram" or "pairwise".  ``dtype``: float64 (default) or float32
    (numpy, torch or string spelling).  ``device``: a torch device ("cpu",
    "cuda", "cuda:1"...) to compute with torch there; None computes with numpy
    (in threads when large; stacks on a single BLAS thread in torch on the CPU),
    "numpy" with numpy only.
    ``max_memory``: bytes for the route's blocks, and for each product of the
    pairwise route, planned within it as ts.similarity plans a pair (default a
    quarter of the available memory of the device; a single ts.similarity's
    default is half); a route named that does not fit raises
    :class:`~tsalgebra.problem.MemoryBoundError` with the alternatives.  ``progress``: True / False, or None for
    a tqdm bar on a terminal when the work is long.  ``models`` may be a mapping
    name -> model; the names label the plot.

    Beyond one machine (:mod:`tsalgebra.matrix.cluster`; ``pip install
    tsalgebra[distributed]``): ``client`` (a ``dask.distributed.Client``),
    ``scheduler`` ("tcp://host:8786") or ``workers`` (a local cluster of that
    many worker processes, started and closed by the call) computes the upper
    triangle in tiles of ``tile`` models a side (default: from the number of
    workers), each by the best route above, on the workers.  ``store`` (a
    directory) keeps every finished tile; a rerun with the same models and
    options computes only the missing ones (alone, it tiles in this process).
    The flop budget is judged on the whole matrix (every tile's planned
    flops) before any tile runs.  The result's ``tiles`` says how.
    """
    return _compute(models, None, inner, method, mean, cov, centered, route, dtype, device, max_memory, progress,
                    dict(kwargs, measure=measure), Tiling(client, scheduler, workers, store, tile))


def cross_similarity_matrix(
    models_a: Sequence[Any] | Mapping[str, Any],
    models_b: Sequence[Any] | Mapping[str, Any],
    inner: str | None = None,
    method: str = "auto",
    mean: Any = None,
    cov: Any = None,
    *,
    measure: Measure | None = None,
    centered: bool = False,
    route: str = "auto",
    dtype: Any = None,
    device: Any = None,
    max_memory: int | None = None,
    progress: bool | None = None,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    store: Any = None,
    tile: int | None = None,
    **kwargs: Any,
) -> SimilarityMatrix:
    """The N x M matrix of cosines between ``models_a`` (rows) and ``models_b``
    (columns); arguments as in :func:`similarity_matrix` (the whole rectangle
    in tiles on a cluster or into a store)."""
    return _compute(models_a, models_b, inner, method, mean, cov, centered, route, dtype, device, max_memory,
                    progress, dict(kwargs, measure=measure), Tiling(client, scheduler, workers, store, tile))
