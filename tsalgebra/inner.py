"""Inner products, norms and similarities of tensor-based models: the public API.

Three inner products (see docs/inner-products.md):

- ``"gaussian"``: E over x ~ measure (default N(0, I)) of f(x) . g(x);
- ``"symmetric"``: Frobenius product of the symmetrized padded coefficient
  tensors at a common degree k (the Bombieri product);
- ``"network"``: the recursive per-layer product (a property of the
  factorization, not only of the function, at depth >= 2).

Each call builds one :class:`~tsalgebra.problem.InnerProblem` and hands it to
the algorithm registry (:mod:`tsalgebra.algorithms`), whose one rule picks
the algorithm; :func:`plan_inner` and :func:`plan_similarity` return what
would run, planned from shapes, without computing.  The constant output
channel is always excluded.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Iterator

import numpy as np
import sympy

from .algorithms import choose, describe, run, solve
from .algorithms.sampled import Z95, control_note
from .cosine import cosines
from .measure import Measure
from .rescale import canonical, without_output_bias
from .progress import labelled
from .problem import (DEAD_CHANNELS, DEAD_ESTIMATED, DEFAULT_BUDGET, FUNCTIONAL, CostError, InnerProblem,
                      InnerResult, MemoryBoundError, NotApplicableError, Plan, checked_memory, default_max_memory,
                      degree_of, format_count, resolve_inner)

__all__ = ["InnerResult", "CostError", "SimilarityPlan", "inner", "norm", "plan_inner", "plan_similarity",
           "similarity", "DEFAULT_BUDGET"]

LOG_FLOAT_MAX = float(np.log(np.finfo(float).max))
LOG_FLOAT_TINY = float(np.log(np.finfo(float).tiny))  # below it a product would silently become 0 or subnormal

_OPTIONS = ("centered", "per_output", "degree", "budget", "max_memory", "orbits", "algorithm", "samples", "rel_error",
            "seed", "device", "progress")


@contextlib.contextmanager
def _overflow_named() -> Iterator[None]:
    """numpy's overflow and invalid-value warnings of the computation inside
    held back: where they made a product non-finite, the FloatingPointError
    raised names the cause, and printed beside it they only repeat it;
    otherwise (finite numbers after an overflow, another error) they are
    issued after all, once per kind."""
    seen: list[str] = []
    named = False
    try:
        with np.errstate(over="call", invalid="call", call=lambda kind, _flag: seen.append(kind)):
            yield
    except FloatingPointError:
        named = True
        raise
    finally:
        if not named:
            for kind in dict.fromkeys(seen):
                warnings.warn(f"{kind} encountered in the inner products", RuntimeWarning, stacklevel=4)


def _problem(a: Any, b: Any, inner_product: str | None, method: str, mean: Any, cov: Any, measure: Measure | None,
             options: dict[str, Any], joint: bool = False) -> InnerProblem:
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    return InnerProblem.of(a, b, inner_product, method, mean, cov, measure, joint=joint, **options)


@_overflow_named()
def inner(
    a: Any,
    b: Any,
    inner: str | None = None,
    method: str = "auto",
    mean: Any = None,
    cov: Any = None,
    *,
    measure: Measure | None = None,
    centered: bool = False,
    per_output: bool = False,
    degree: int | None = None,
    budget: float = DEFAULT_BUDGET,
    max_memory: int | None = None,
    orbits: bool = True,
    algorithm: str | None = None,
    samples: int | None = None,
    rel_error: float | None = None,
    seed: int | None = None,
    device: Any = None,
    progress: bool | None = None,
) -> InnerResult:
    """<a, b> under the chosen inner product, summed over output channels
    (constant channel excluded), or one value per channel with ``per_output``.

    ``inner``: None (the functional product E[f . g] under ``measure``:
    "gaussian" for a :class:`~tsalgebra.measure.Gaussian`, "tokens" for
    :class:`~tsalgebra.measure.Tokens`; without a measure, the model's own
    default (a token embedding's vocabulary), else N(0, I)), "gaussian",
    "tokens", "symmetric" or "network".  ``mean``/``cov`` are shorthand for
    ``measure=Gaussian(mean, cov)``; for sequence models a per-position mean
    (d,) and covariance (d, d) are tiled over independent positions.

    ``method``: "exact", "closure" (Gaussian moment propagation; approximate
    beyond the first nonlinear layer, gaussian only), "sampled" (a Monte
    Carlo estimate for every model under either measure: ``samples`` inputs
    (default 10,000), or as many as reach the relative standard error
    ``rel_error`` within the budget; ``seed``; ``device`` a torch device to
    run the models on; the result carries ``stderr`` and a 95 % ``interval``)
    or "auto" (the cheapest
    exact algorithm whose planned flops fit ``budget``, flops per inner
    product (a similarity computed jointly may take three), and whose planned
    peak fits ``max_memory`` bytes (default half the memory available when
    called), else :class:`CostError` (:class:`MemoryBoundError` where only
    the memory bound refused) naming every estimate and the alternatives;
    never an approximation).  ``algorithm`` names one registered algorithm instead:
    "pairings" (orbit enumeration, exponential in the number of input
    copies), "quadrature" (Gauss-Hermite nodes, exponential in the input
    rank), "moments" (per-position attention moments), "gram" (the network
    product) or "closure"; ValueError naming the reason where it does not
    apply.  ``degree`` fixes the common degree of the symmetric product
    (default: the larger model degree).  ``orbits=False`` sums every pairing
    one by one (slow; a check on the declared symmetries, which orbit
    grouping trusts).  ``progress``: a bar on stderr over the planned flops
    while the computation runs: True, False, or None (shown on a terminal
    when the plan is estimated at a second or more at its algorithm's
    measured rate, :data:`tsalgebra.progress.RATES`).
    """
    options = dict(centered=centered, per_output=per_output, degree=degree, budget=budget, max_memory=max_memory,
                   orbits=orbits, algorithm=algorithm, samples=samples, rel_error=rel_error, seed=seed, device=device,
                   progress=progress)
    (a, la), (b, lb) = _canonical_pair(a, b, centered)
    ab = solve(_problem(a, b, inner, method, mean, cov, measure, options))[0]
    return _scales_said(_scaled(ab, la + lb, "<a, b>"), la, lb)


@_overflow_named()
def joint_inner(a: Any, b: Any, inner: str | None = None, method: str = "auto", mean: Any = None, cov: Any = None,
                *, measure: Measure | None = None, **options: Any) -> tuple[InnerResult, InnerResult | None,
                                                                            InnerResult | None]:
    """<a, b> planned as :func:`similarity` plans it, with the options of
    :func:`inner`: an algorithm whose one computation also yields <a, a> and
    <b, b> may spend three budgets, and then they come back too (else None).
    The similarity matrix's pairwise route computes each pair with it, so it
    grants a pair what :func:`similarity` grants it."""
    (a, la), (b, lb) = _canonical_pair(a, b, bool(options.get("centered")))
    ab, aa, bb = solve(_problem(a, b, inner, method, mean, cov, measure, options, joint=a is not b))
    # one computation: a Monte Carlo estimate there is the pair's, <a, a> and <b, b> among its products
    return (_scales_said(_scaled(ab, la + lb, "<a, b>"), la, lb),
            None if aa is None else _scales_said(_scaled(aa, 2 * la, "<a, a>"), la, lb),
            None if bb is None else _scales_said(_scaled(bb, 2 * lb, "<b, b>"), la, lb))


@_overflow_named()
def relative_products(a: Any, b: Any, inner: str | None = None, method: str = "auto", mean: Any = None,
                      cov: Any = None, *, measure: Measure | None = None, **options: Any
                      ) -> tuple[InnerResult, InnerResult, InnerResult]:
    """(<a, b>, <a, a>, <b, b>) as :func:`joint_inner` plans them (the self
    products by themselves where its computation does not give them), all
    divided by e^{2 log_scale(a)}, the square of a's canonical scale: the
    ratios :func:`tsalgebra.verify` reads (a similarity, a residual, a
    scale), which float64 holds where the products themselves overflow
    (weights of 1e160)."""
    centered = bool(options.get("centered"))
    (ca, la), (cb, lb) = _canonical_pair(a, b, centered)
    ab, aa, bb = solve(_problem(ca, cb, inner, method, mean, cov, measure, options, joint=a is not b))
    aa = aa if aa is not None else solve(_problem(ca, ca, inner, method, mean, cov, measure, options))[0]
    bb = bb if bb is not None else solve(_problem(cb, cb, inner, method, mean, cov, measure, options))[0]
    try:
        return _scaled(ab, lb - la, "<a, b>"), _scaled(aa, 0.0, "<a, a>"), _scaled(bb, 2 * (lb - la), "<b, b>")
    except (OverflowError, FloatingPointError) as exc:  # the ratio of the scales, not the weights' size
        raise type(exc)(f"b is about 10^{(lb - la) / np.log(10):.0f} times a (their canonical scales): <b, b> / "
                        f"<a, a> is beyond float64's range, although their cosine is not") from None


def _canonical_pair(a: Any, b: Any, centered: bool) -> tuple[tuple[Any, float], tuple[Any, float]]:
    """Both models at their canonical scale (:func:`tsalgebra.rescale.canonical`),
    for centred products without their output biases (the same covariance,
    and float64 keeps its digits), a model compared with itself kept one
    object."""
    ca = canonical(without_output_bias(a) if centered else a)
    return ca, (ca if b is a else canonical(without_output_bias(b) if centered else b))


def _scales_said(r: InnerResult, la: float, lb: float) -> InnerResult:
    """``r`` with its Monte Carlo statistics (of the canonical models) told
    the models' canonical scales, which give them back in the models' units."""
    return r if r.estimate is None else replace(r, estimate=replace(r.estimate, log_scales=(la, lb)))


def _scaled(r: InnerResult, log_scale: float, what: str) -> InnerResult:
    """A product of the canonical models times e^{log_scale}: the product of
    the models as given; OverflowError when float64 cannot hold it (a cosine
    is unaffected), FloatingPointError for any other non-finite value."""
    value = r.value
    if isinstance(value, np.ndarray) and value.dtype == object or isinstance(value, (sympy.Basic, Fraction)):
        # exact numbers (sympy's, Fractions; a float model beside an exact one makes them sympy Floats): finite,
        # and scaled in sympy, whose exponents do not overflow; an exact model is never rescaled itself
        if log_scale == 0.0:
            return r
        return replace(r, value=value * sympy.exp(sympy.Float(log_scale, 17)))
    if isinstance(value, (float, np.ndarray)) and not np.all(np.isfinite(value)):
        raise FloatingPointError(f"{what} is not finite ({value}) although the models were rescaled: a weight too "
                                 "large or too small for float64 in a layer tsalgebra cannot rescale")
    if log_scale == 0.0 or not isinstance(value, (float, np.ndarray)):
        return r
    with np.errstate(divide="ignore"):
        exponent = np.log(np.abs(value)) + log_scale
    if np.any(exponent > LOG_FLOAT_MAX):
        raise OverflowError(f"{what} = e^{float(np.max(exponent)):.0f} (10^{float(np.max(exponent)) / np.log(10):.0f})"
                            " overflows float64: the models' weights are that large; their similarity (a cosine) is "
                            "unaffected")
    if np.any((exponent < LOG_FLOAT_TINY) & (np.asarray(value) != 0)):
        raise FloatingPointError(f"{what} = 10^{float(np.min(exponent)) / np.log(10):.0f} underflows float64: the "
                                 "models' weights are that small; their similarity (a cosine) is unaffected")
    factor = np.exp(log_scale)  # finite: |value| e^{log_scale} is
    out = value * factor if np.isfinite(factor) else np.sign(value) * np.exp(exponent)
    fields: dict[str, Any] = {"value": out if r.per_output else float(out)}
    if r.stderr is not None:
        se = np.asarray(r.stderr) * np.exp(log_scale)
        fields.update(stderr=se if r.per_output else float(se), interval=tuple(v * np.exp(log_scale) for v in r.interval))
    return replace(r, **fields)


def plan_inner(a: Any, b: Any, inner: str | None = None, method: str = "auto", mean: Any = None, cov: Any = None,
               *, measure: Measure | None = None, **options: Any) -> Plan:
    """The plan :func:`inner` with the same arguments would run: the
    algorithm, its flops, peak bytes and contractions, and why the other
    algorithms were not taken; planned from shapes, nothing contracted.
    Raises :class:`CostError` as :func:`inner` would."""
    return choose(_problem(a, b, inner, method, mean, cov, measure, options))


@_overflow_named()
def norm(a: Any, inner: str | None = None, method: str = "auto", mean: Any = None, cov: Any = None,
         **options: Any) -> InnerResult:
    """sqrt(<a, a>) with the metadata of :func:`inner`."""
    measure = options.pop("measure", None)
    a, la = canonical(a)
    r = solve(_problem(a, a, inner, method, mean, cov, measure, options))[0]
    _scaled(r, 0.0, "<a, a>")  # finite, or an error naming the cause
    if not r.per_output and not isinstance(r.value, float):
        return replace(r, value=sympy.sqrt(_to_sympy(r.value)), quantity="norm")
    if r.per_output and np.asarray(r.value).dtype == object:  # exact per output: each channel's root kept exact
        return replace(r, value=np.array([sympy.sqrt(_to_sympy(v)) for v in r.value], dtype=object), quantity="norm")
    v = np.sqrt(np.maximum(np.asarray(r.value, dtype=float), 0.0))
    v = v if r.per_output else float(v)
    if r.stderr is None:
        return _scaled(replace(r, value=v, quantity="norm"), la, "the norm")
    why = None if r.per_output else _not_positive(r, "<a, a>")
    if why is not None and r.value != 0:  # an estimate below 0 has no square root (a zero model has norm 0)
        raise ValueError(why)
    with np.errstate(divide="ignore", invalid="ignore"):  # the delta method for a square root (0 without spread)
        se = np.where(np.asarray(r.stderr) == 0, 0.0, np.asarray(r.stderr) / (2 * np.asarray(v)))
    se = se if r.per_output else float(se)
    r = replace(r, value=v, quantity="norm", stderr=se, interval=(v - Z95 * se, v + Z95 * se))
    return _scaled(r, la, "the norm")


def _to_sympy(v: Any) -> Any:
    return sympy.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else sympy.sympify(v)


def _common_degree(a: Any, b: Any, inner_product: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """All three products of a symmetric similarity at the common degree: a
    norm at a model's own degree would mix Bombieri weights of different k."""
    if inner_product != "symmetric" or options.get("degree") is not None:
        return options
    return dict(options, degree=max(degree_of(a), degree_of(b)))


def _cosine(ab: InnerResult, aa: InnerResult, bb: InnerResult) -> Any:
    """<a, b> / sqrt(<a, a> <b, b>): exact (sympy) for exact values, else a
    float or per-output vector (:func:`tsalgebra.cosine.cosines`)."""
    if not ab.per_output and not isinstance(ab.value, float):  # exact or symbolic: keep it so
        x, y, z = (_to_sympy(r.value) for r in (ab, aa, bb))
        if y == 0 or z == 0:
            raise ValueError(f"model {'a' if y == 0 else 'b'} has zero norm under the {ab.inner} inner product; "
                             "the similarity is undefined")
        return sympy.simplify(x / (sympy.sqrt(y) * sympy.sqrt(z)))
    if ab.per_output and np.asarray(ab.value).dtype == object:  # exact per output: each channel kept so
        out = []
        for x, y, z in zip(*(np.asarray(r.value, dtype=object) for r in (ab, aa, bb))):
            x, y, z = (_to_sympy(v) for v in (x, y, z))
            out.append(sympy.nan if y == 0 or z == 0 else sympy.simplify(x / (sympy.sqrt(y) * sympy.sqrt(z))))
        return np.array(out, dtype=object)  # (a dead channel NaN, said as the float route says it)
    cos = cosines(ab.value, aa.value, bb.value, ab.inner, dead_channels=ab.per_output)
    return cos if ab.per_output else float(cos)


def _similarity_plans(a: Any, b: Any, inner: str | None, method: str, mean: Any, cov: Any, measure: Measure | None,
                      options: dict[str, Any]) -> list[tuple[str, "Plan | CostError"]]:
    """The plan of <a,b> (joint: one computation gives all three products)
    and, where it is not joint, of <a,a> and <b,b>; a product refused carries
    its CostError instead."""
    options = _one_bound(options)
    try:
        products: list[tuple[str, Plan | CostError]] = [
            ("<a,b>", choose(_problem(a, b, inner, method, mean, cov, measure, options, a is not b)))]
    except CostError as exc:
        products = [("<a,b>", exc)]
    if a is b or (isinstance(products[0][1], Plan) and products[0][1].joint):
        return products
    return products + _self_plans(a, b, inner, method, mean, cov, measure, options)


def _self_plans(a: Any, b: Any, inner: str | None, method: str, mean: Any, cov: Any, measure: Measure | None,
                options: dict[str, Any]) -> list[tuple[str, "Plan | CostError"]]:
    """The plans of <a,a> and <b,b> (or their CostErrors), under the pair's
    measure (a model's own default would judge a hand-written circuit on
    one-hot tokens by the Gaussian)."""
    how, law = resolve_inner(inner, measure, a, b) if inner is None or inner in FUNCTIONAL else (inner, measure)
    products: list[tuple[str, Plan | CostError]] = []
    for label, x in (("<a,a>", a), ("<b,b>", b)):
        try:
            products.append((label, choose(_problem(x, x, how, method, mean, cov, law, options, False))))
        except CostError as exc:
            products.append((label, exc))
    return products


def _one_bound(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the memory bound read once (the default: half the
    memory available now), so that every product of one call has the same."""
    return dict(options, max_memory=checked_memory(options.get("max_memory")) or default_max_memory())


def _refusal_of(refused: list[tuple[str, CostError]]) -> CostError:
    """One refusal for the products of a similarity refused: their reasons,
    their alternatives, each budget and memory bound the larger of theirs
    (the one that admits them all); a NotApplicableError where one is (no
    bound answers the pair then), else a MemoryBoundError where one is."""
    if [label for label, _ in refused] == ["<a,b>"]:
        return refused[0][1]
    first = refused[0][1]
    merged: dict[Any, Any] = {}  # in the order first given
    for _, e in refused:
        for a in e.alternatives:
            key = a.option if a.option in ("budget", "max_memory") else (a.option, repr(a.value))
            if key not in merged or a.value > merged[key].value:
                merged[key] = a
    # another question (inner=, method=) is asked of all three products: only what every refusal offers
    # (each offers what plans within its bound), else what fits <a,a> alone was suggested for the pair
    offered = [{(a.option, repr(a.value)) for a in e.alternatives} for _, e in refused]
    merged = {k: a for k, a in merged.items() if isinstance(k, str) or all(k in o for o in offered)}
    others = ", ".join(f"{label} ({format_count(e.needed)} bytes at the smallest)" if isinstance(e, MemoryBoundError)
                       else f"{label} ({format_count(e.flops)} flops at the cheapest)" if e.flops < math.inf else label
                       for label, e in refused[1:])
    worst = max((e for _, e in refused), key=lambda e: e.flops)
    fields = dict(flops=worst.flops, extrapolated=worst.extrapolated, alternatives=tuple(merged.values()))
    reason = f"{refused[0][0]}: {first.reason}" + (f"; refused too: {others}" if others else "")
    if any(isinstance(e, NotApplicableError) for _, e in refused):
        return NotApplicableError(reason, alternatives=fields["alternatives"])
    memory = [e for _, e in refused if isinstance(e, MemoryBoundError)]
    if memory:
        return MemoryBoundError(reason, needed=max(e.needed for e in memory), **fields)
    return CostError(reason, **fields)


@_overflow_named()
def similarity(a: Any, b: Any, inner: str | None = None, method: str = "auto", mean: Any = None, cov: Any = None,
               **options: Any) -> InnerResult:
    """The cosine <a, b> / sqrt(<a, a> <b, b>), with the metadata of :func:`inner`
    and the summed cost of the three inner products (one computation where an
    algorithm yields all three jointly).  Options as in :func:`inner`.

    A model of zero norm raises ValueError (the cosine is undefined); with
    ``per_output`` a dead output channel gives NaN and a warning.
    """
    measure = options.pop("measure", None)
    options = _common_degree(a, b, inner, options)
    # a cosine is blind to the scales; float64 is not (an estimate keeps them, to give its products back)
    (a, la), (b, lb) = _canonical_pair(a, b, bool(options.get("centered")))
    products = _similarity_plans(a, b, inner, method, mean, cov, measure, options)
    refused = [(label, p) for label, p in products if isinstance(p, CostError)]
    if refused:  # before anything runs
        raise _refusal_of(refused)
    plans = [p for _, p in products]
    with labelled(products[0][0]):  # each product's bar says which it is
        ab, aa, bb = run(plans[0])
    for r, what in ((ab, "<a, b>"), (aa, "<a, a>"), (bb, "<b, b>")):
        if r is not None:
            _scaled(r, 0.0, what)
    if ab.estimate is not None:  # a Monte Carlo estimate: its cosine's error from the same samples
        return _scales_said(_said_dead(_estimated_similarity(ab, None, None) if a is b else
                                       _estimated_similarity(ab, aa, bb)), la, lb)
    spent = [ab]  # a joint computation (closure, attention moments) yields all three at its own cost
    if a is b:
        aa = bb = ab
    elif aa is None or bb is None:
        # planned with <a,b> unless its plan was joint and the run passed it over for one that is not
        selves = products[1:] or _self_plans(a, b, inner, method, mean, cov, measure, _one_bound(options))
        refused = [(label, p) for label, p in selves if isinstance(p, CostError)]
        if refused:
            raise _refusal_of(refused)
        runs = []
        for (label, p), what in zip(selves, ("<a, a>", "<b, b>")):
            with labelled(label):
                runs.append(_scaled(run(p)[0], 0.0, what))
        aa, bb = runs
        spent += [aa, bb]
        ab = _cross_again(plans, ab, runs)
        spent[0] = ab
    judged = [ab, aa, bb]  # a joint run's self products too: one of them may have lost digits (not exact)
    mixed = () if aa.algorithm == bb.algorithm == ab.algorithm else (  # the label names <a, b>'s algorithm only
        f"the products by different algorithms: <a, b> by {ab.algorithm}, <a, a> by {aa.algorithm}, <b, b> by "
        f"{bb.algorithm}",)
    return _said_dead(replace(
        ab,
        value=_cosine(ab, aa, bb),
        quantity="similarity",
        exact=all(r.exact for r in judged),
        contractions=sum(r.contractions for r in spent),
        flops=sum(r.flops for r in spent),
        pairings=sum(r.pairings for r in spent),
        orbits=sum(r.orbits for r in spent),
        notes=tuple(dict.fromkeys(n for r in judged for n in r.notes)) + mixed,
        passed_over=tuple(dict.fromkeys(n for r in judged for n in r.passed_over)),
        digits=min((r.digits for r in judged if r.digits is not None), default=None),
    ))


def _cross_again(plans: list[Plan], ab: InnerResult, selves: list[InnerResult]) -> InnerResult:
    """<a, b> again where the algorithm that computed it was passed over for
    a self product (its run lost that variance's digits to rounding: a
    centred product with means far above the spread, :func:`registry.run`):
    the cross product carries the same rounding, judged against those
    variances.  By the next algorithm of the automatic choice; where none
    plans, <a, b> stays and the result says it is not exact."""
    passed = {name for r in selves for name in r.passed_over}
    if ab.algorithm not in passed or plans[0].problem.algorithm is not None:
        return ab
    why = f"{ab.algorithm} lost the digits of a variance to rounding, and <a, b> shares its rounding"
    try:
        instead = choose(plans[0].problem.replace(excluded=tuple(sorted(passed))))
    except (CostError, ValueError):
        return replace(ab, exact=False, notes=ab.notes + (f"{why}: no other algorithm plans it (not exact)",))
    with labelled("<a,b>"):
        again = _scaled(run(instead)[0], 0.0, "<a, b>")
    return replace(again, notes=again.notes + (f"{ab.algorithm} was passed over: {why}",),
                   passed_over=tuple(sorted(passed)) + again.passed_over)


def _said_dead(r: InnerResult) -> InnerResult:
    """``r`` with its dead output channels (NaN: a self-product not
    positive; non-finite products were refused before the cosine) said by a
    warning and in its notes too (a filtered warning left a bare nan)."""
    if not (r.per_output and np.isnan(np.asarray(r.value, dtype=float)).any()):
        return r
    note = DEAD_ESTIMATED if r.estimated else DEAD_CHANNELS
    warnings.warn(note, RuntimeWarning, stacklevel=4)  # _said_dead, similarity, its decorator, the caller
    return replace(r, notes=r.notes + (note,))


def _not_positive(r: InnerResult, what: str) -> str | None:
    """Why the Monte Carlo estimate ``r`` of a self-product (a mean of
    squares, which the control variate can push below 0) cannot be a norm,
    or None.  An estimate of exactly 0 with no spread is a zero model.
    Below 0, the control variate is named as the cause (nothing else takes
    a mean of squares there), with the factor by which it multiplied the
    variance where it added to it (on a depth-3 bilinear stack, 3 to 100
    times, with no HEAVY TAILS flag)."""
    value, se = np.asarray(r.value, dtype=float), np.asarray(r.stderr, dtype=float)
    if np.all(value > 0):
        return None
    if np.all((value == 0) & (se == 0)):
        return f"{what} is 0 on every sample: a zero model, whose similarity is undefined"
    tails = " (its samples are heavy-tailed)" if r.estimate is not None and r.estimate.heavy_tailed else ""
    ran = r.estimate is not None and r.estimate.raw_cov is not None
    saved = r.estimate.variance_saved if ran else 1.0  # type: ignore[union-attr]
    cause = ""
    if np.min(value) < 0 and ran:
        cause = ("; a mean of squares, taken below 0 by the control variate's correction"
                 + (f", which multiplied its variance by {1 / saved:.3g} instead of reducing it" if saved < 1 else ""))
    return (f"the Monte Carlo estimate of {what} is {np.min(value):.4g} +- {np.max(se):.2g}, not positive{tails}"
            f"{cause}: too few samples for this model; pass more samples= (or rel_error=), or ask for an exact value")


def _estimated_similarity(ab: InnerResult, aa: InnerResult | None, bb: InnerResult | None) -> InnerResult:
    """The cosine of a joint Monte Carlo estimate: the ratio of the three
    sample means, its standard error by the delta method over their
    covariance (:meth:`~tsalgebra.algorithms.sampled.Estimate.cosine`).  An
    estimate beyond +-1 within 4 times the error of its three means is
    reported as +-1, saying so; beyond that, or with a self-product estimated
    at or below 0, the samples cannot answer and the error says why."""
    if aa is None or bb is None:  # a against itself: the cosine is one, whatever was sampled
        one = np.ones_like(np.asarray(ab.value, dtype=float)) if ab.per_output else 1.0
        zero = one * 0.0
        return replace(ab, value=one, quantity="similarity", stderr=zero, interval=(one, one))
    notes = ("cosine: ratio of the sample means, standard error by the delta method",)
    est = ab.estimate
    own = ab.notes
    if est.raw_cov is not None:  # the control variate's effect on the value returned, the cosine, not on <a, b>
        own = tuple(n for n in own if n != control_note("<a, b>", est.saved(0)))
        notes += (control_note("the cosine", est.cosine_saved()),)
    if not ab.per_output:
        for r, what in ((aa, "<a, a>"), (bb, "<b, b>")):
            why = _not_positive(r, what)
            if why is not None:
                raise ValueError(why)
    cos, se = ab.estimate.cosine()  # per channel
    dead = ~((np.asarray(aa.value) > 0) & (np.asarray(bb.value) > 0))
    if dead.any():  # per output only (a single channel was refused above); said by the caller
        cos = np.where(dead, np.nan, cos)
    excess = np.abs(cos) - 1.0
    # Near +-1 the delta method's error vanishes (the three means move
    # together), so the room beyond 1 is judged by the means' own relative
    # errors added up, the error of the ratio were they independent.
    means, spread = ab.estimate.means, np.sqrt(np.maximum(np.diagonal(ab.estimate.cov).T, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.abs(cos) * (spread[0] / np.abs(means[0]) + 0.5 * spread[1] / means[1] + 0.5 * spread[2] / means[2])
    if np.any(excess > 4 * np.maximum(se, room)):
        raise ArithmeticError(f"the Monte Carlo cosine is {float(np.nanmax(np.abs(cos))):.6g} in absolute value, beyond "
                              "1 by more than 4 times the error of its three means: too few samples for this model; "
                              "pass more samples= (or rel_error=), or ask for an exact value")
    if np.any(excess > 0):
        worst = float(np.nanmax(excess))
        notes += (f"the estimate exceeded 1 in absolute value by {worst:.2g} (within the error of its three means): "
                  "reported as +-1",)
        cos = np.clip(cos, -1.0, 1.0)
    value, se = (cos, se) if ab.per_output else (float(cos[0]), float(se[0]))
    return replace(ab, value=value, quantity="similarity", stderr=se, interval=(value - Z95 * se, value + Z95 * se),
                   notes=own + notes)


@dataclass(frozen=True)
class SimilarityPlan:
    """What :func:`similarity` would run: per product (<a,b>, and <a,a>,
    <b,b> unless the first plan is joint) its :class:`Plan` or the
    :class:`CostError` refusing it; totals over the plans; the budget and
    the memory bound (bytes) they were planned within."""

    products: tuple[tuple[str, "Plan | CostError"], ...]
    budget: float
    others: tuple[tuple[str, "SimilarityPlan | str"], ...] = ()  # when refused: closure, sampled (or why not)
    max_memory: int | None = None

    @property
    def peak_bytes(self) -> float:
        """The largest peak of the plans (they run one after another)."""
        return max((p.peak_bytes for p in self.plans), default=0.0)

    @property
    def plans(self) -> list[Plan]:
        return [p for _, p in self.products if isinstance(p, Plan)]

    @property
    def refused(self) -> bool:
        return any(isinstance(p, CostError) for _, p in self.products)

    @property
    def flops(self) -> float:
        return float(sum(p.flops for p in self.plans))

    @property
    def contractions(self) -> int:
        return sum(p.contractions for p in self.plans)

    def describe(self) -> dict[str, Any]:
        """A JSON-able report (what ``tsalgebra plan --json`` prints)."""
        items = []
        for label, p in self.products:
            if isinstance(p, CostError):
                items.append({"product": label, "refused": p.reason, "estimated_flops": p.flops,
                              **({"needed_bytes": p.needed} if isinstance(p, MemoryBoundError) else {}),
                              "alternatives": [{"option": a.option, "value": a.value, "why": a.why}
                                               for a in p.alternatives]})
            else:
                items.append({"product": label, **describe(p)})
        return {"products": items, "total_flops": self.flops, "total_contractions": self.contractions,
                "peak_bytes": self.peak_bytes, "budget": self.budget, "max_memory": self.max_memory,
                "within_budget": not self.refused,  # every plan within its limits (flops and memory)
                "algorithms": sorted({p.algorithm for p in self.plans}),
                **({"other_methods": {m: o if isinstance(o, str) else o.describe() for m, o in self.others}}
                   if self.others else {})}

    def __repr__(self) -> str:
        lines = []
        for label, p in self.products:
            if isinstance(p, CostError):
                lines.append(f"{label}: refused: {p.reason}")
            else:
                lines.append(f"{label}: {p.algorithm}{' (joint: all three products)' if p.joint else ''}, "
                             f"{format_count(p.flops)} flops, {p.contractions} contractions, peak "
                             f"{format_count(p.peak_bytes)} bytes{accuracy_of(p)}")
        for method, other in self.others:
            lines.append(f"method={method!r}: {other.summary() if isinstance(other, SimilarityPlan) else other}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: refused (why), or the cost of what would run."""
        if self.refused:
            return "refused: " + "; ".join(p.reason for _, p in self.products if isinstance(p, CostError))
        p = self.plans[0]
        peak = f"peak {self.peak_bytes / 1e6:.3g} MB"  # as the plan of each product says it
        if p.method == "sampled":
            return (f"{format_count(p.facts['per_sample_flops'])} flops per sample ({format_count(self.flops)} for "
                    f"{p.facts['samples']:,} samples), {peak}, an estimate with a standard error")
        return f"{format_count(self.flops)} flops, {peak}{'' if all(q.exact for q in self.plans) else ', approximate'}"


def accuracy_of(plan: Plan) -> str:
    """How a plan's number would be obtained, as the plans' summaries say it
    ("" for exact, ", approximate", ", estimated (... flops per sample)")."""
    if plan.method == "sampled":
        return f", estimated ({format_count(plan.facts['per_sample_flops'])} flops per sample)"
    return "" if plan.exact else ", approximate"


def plan_similarity(a: Any, b: Any, inner: str | None = None, method: str = "auto", mean: Any = None,
                    cov: Any = None, **options: Any) -> SimilarityPlan:
    """What :func:`similarity` with the same arguments would run, planned from
    shapes (nothing contracted): the plan of <a,b> (joint when one
    computation gives all three products) and, where it is not joint, of
    <a,a> and <b,b>; a product no algorithm takes within the budget carries
    its CostError instead, and then ``others`` plans the approximate and
    estimated rungs (closure, sampled) or says why they do not apply."""
    measure = options.pop("measure", None)
    options = _one_bound(_common_degree(a, b, inner, options))
    products = _similarity_plans(a, b, inner, method, mean, cov, measure, options)
    budget, memory = float(options.get("budget", DEFAULT_BUDGET)), options["max_memory"]
    if not any(isinstance(p, CostError) for _, p in products) or method not in ("auto", "exact"):
        return SimilarityPlan(tuple(products), budget, max_memory=memory)
    others: list[tuple[str, SimilarityPlan | str]] = []  # the other rungs of the ladder, for the refusal
    for other in ("closure", "sampled"):
        try:
            others.append((other, plan_similarity(a, b, inner, other, mean, cov, measure=measure, **options)))
        except ValueError as exc:  # closure under tokens, ...
            others.append((other, f"does not apply: {exc}"))
    return SimilarityPlan(tuple(products), budget, tuple(others), memory)
