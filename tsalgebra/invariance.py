"""Is a transformed model the same function?  :func:`check_invariance`.

Two witnesses, both reported:

- exact: the relative functional distance
  ||f - g||^2 / ||f||^2 = (<f,f> + <g,g> - 2 <f,g>) / <f,f>
  from the weights (Gaussian inner product by default; the symmetric one at
  the common degree when the Gaussian enumeration is too expensive; none when
  both are), per output channel as well;
- sampled: the worst |f(x) - g(x)| over random inputs, relative to the
  largest |f(x)| seen.

Float64 round-off is allowed for by measuring it: the outputs' change when
every weight moves by an ulp (the error a transform's rounding leaves), times
ROUNDOFF_FACTOR.  Only when f is below what the tolerances resolve above that
allowance (the zero function computed in float64) are the differences
measured against the allowance instead of f.  (A bound from |weights| on
|inputs| grew with the degree and hid a 50 % change of a deep model.)

An exact-arithmetic distance of 0 proves invariance; samples cannot
overturn it (they can only differ by round-off then).

When the function changed the report names the output channels that moved
and the layers whose weights differ from the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .components import Component
from .inner import inner as inner_product
from .measure import Measure
from .problem import DEFAULT_BUDGET, CostError, bound_measure, function_level

__all__ = ["InvarianceReport", "check_invariance"]


@dataclass(frozen=True)
class InvarianceReport:
    """The verdict of :func:`check_invariance` and the evidence for it.

    ``invariant`` is True when every available check passed: the exact
    relative distance is at most ``tol`` (if it could be computed) and the
    worst sampled difference is at most ``sample_tol``; or when the distance,
    computed in exact arithmetic, is exactly 0 (a proof; a note says so if
    the float samples differ).

    - ``method``: how the exact distance was obtained ("gaussian (exact)",
      "symmetric (exact, degree k)", with "; gaussian over budget" after a
      fallback) or "samples only"; ``notes`` say why a method was refused.
    - ``relative_distance``: ||f - g||^2 / ||f||^2 (a Fraction with exact
      weights; None when no exact method was feasible).
    - ``per_output_distance``: ||f_o - g_o||^2 / ||f||^2 per output channel
      (normalized by the whole model's norm, so the entries sum to
      ``relative_distance`` and round-off in a tiny channel is not flagged).
    - ``max_sample_difference``: max over samples and channels of
      |f(x) - g(x)| / max |f(x)| (over ROUNDOFF_FACTOR * ``output_roundoff``
      / ``sample_tol`` instead when max |f(x)| is below that, as for the zero
      function in float64; a note says so; likewise the float distance is
      then relative to the squared allowance over ``tol``);
      ``per_output_sample_difference`` per channel.
    - ``output_roundoff``: the float64 error of the outputs on the samples,
      measured (the largest change of either model's outputs when every
      weight moves by an ulp); the round-off allowance is ROUNDOFF_FACTOR
      times it.
    - ``changed_outputs``: channels (0-based) whose exact distance exceeds
      ``tol`` or whose sampled difference exceeds ``sample_tol``.
    - ``changed_layers``: positions in ``model.layers`` whose weights differ
      from the original's (not identical, or of another shape or kind);
      ``layer_changes`` says how, one line per changed layer.
    """

    invariant: bool
    method: str
    relative_distance: Any
    per_output_distance: tuple[Any, ...] | None
    max_sample_difference: float
    per_output_sample_difference: tuple[float, ...]
    changed_outputs: tuple[int, ...]
    changed_layers: tuple[int, ...]
    layer_changes: tuple[str, ...]
    tol: float
    sample_tol: float
    n_samples: int
    transform: str = ""
    notes: tuple[str, ...] = ()
    output_roundoff: float = 0.0

    @property
    def exact_available(self) -> bool:
        return self.relative_distance is not None

    def __repr__(self) -> str:
        verdict = "INVARIANT" if self.invariant else "NOT INVARIANT"
        lines = [f"InvarianceReport: {verdict} [{self.method}; {self.n_samples} samples]"]
        if self.transform:
            lines.append(f"  transform: {self.transform}")
        if self.relative_distance is not None:
            lines.append(f"  relative distance ||f-g||^2/||f||^2 = {_fmt(self.relative_distance)} (tol {self.tol:g})")
        else:
            lines.append("  relative distance: unavailable (no exact method within budget; see notes)")
        lines.append(f"  worst sampled output difference = {self.max_sample_difference:.3g} "
                     f"of the output scale (tol {self.sample_tol:g}; the outputs' float64 round-off, measured: "
                     f"{self.output_roundoff:.3g})")
        lines.append("  changed outputs: " + (", ".join(map(str, self.changed_outputs)) or "none"))
        lines.append("  layers with different weights: " + (", ".join(map(str, self.changed_layers)) or "none"))
        lines += [f"    {c}" for c in self.layer_changes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return str(v) if not isinstance(v, float) else f"{v:.3g}"


# ------------------------------------------------------------- exact part


def _exact_distance(f: Component, g: Component, inner: str, measure: Measure, budget: float
                    ) -> tuple[Any, tuple[Any, ...] | None, str, list[str], Any]:
    """(relative distance, per-output distances, method, notes, (||f||^2,
    ||g||^2, per-output ||f_o - g_o||^2)); the first two and the last are None
    when every exact method is over budget."""
    tries = ["gaussian", "symmetric"] if inner == "gaussian" else [inner]
    refused: list[str] = []
    for kind in tries:
        # one Bombieri degree for all three products: norms taken at each
        # model's own degree would not combine into a distance
        kw = {"measure": measure} if kind != "symmetric" else {"degree": max(f.degree, g.degree)}
        try:
            ff = inner_product(f, f, kind, per_output=True, budget=budget, **kw)
            gg = inner_product(g, g, kind, per_output=True, budget=budget, **kw)
            fg = inner_product(f, g, kind, per_output=True, budget=budget, **kw)
        except CostError as exc:
            refused.append(f"exact {kind} refused: {exc}")
            continue
        diff = ff.value + gg.value - 2 * fg.value
        total_f, total_d = ff.value.sum(), diff.sum()
        if total_f == 0:  # f is the zero function: any nonzero g is infinitely far
            zero = gg.value.sum() == 0
            rel = total_d * 0 if zero else float("inf")
            per = tuple(d * 0 if zero or d == 0 else float("inf") for d in diff)
        else:
            rel = total_d / total_f
            per = tuple(d / total_f for d in diff)
        if ff.value.dtype != object:
            rel, per = float(rel), tuple(float(p) for p in per)
        label = f"{kind} (exact" + (f", degree {ff.degree})" if kind == "symmetric" else ")")
        if kind != inner:
            label += f"; {inner} over budget"
        return rel, per, label, refused, (total_f, gg.value.sum(), diff)
    return None, None, "samples only", refused + ["exact check unavailable: the verdict rests on samples only"], None


# ----------------------------------------------------------- sampled part


def _outputs(model: Component, x: np.ndarray) -> np.ndarray:
    """(n, out) on flat samples (n, in): a sequence model's call would take (n, n_ctx, d)."""
    return np.asarray(model.evaluate_flat(x), dtype=float)


# The round-off allowance: this many times the float64 error of the outputs
# as measured on the samples (see _roundoff).  That error is measured, not
# bounded, so the factor leaves room for a transform whose weights carry a
# few ulps of error each (a rescaling and its inverse, a well-conditioned
# change of basis) without growing with the degree: a bound from |weights|
# on |inputs| grew with it (1e11 times the real error for a 2-layer
# attention model) and hid a 50 % change of the outputs.
ROUNDOFF_FACTOR = 2.0**10
ROUNDOFF_DRAWS = 3


def _perturbed(model: Component, rng: np.random.Generator) -> Component:
    """``model`` in float64 with every weight moved by a random relative
    error of up to one ulp (what rounding a transformed weight does)."""
    eps = np.finfo(float).eps

    def jitter(w: Any) -> np.ndarray:
        w = np.asarray(w, dtype=float)
        return w * (1.0 + eps * rng.uniform(-1.0, 1.0, size=w.shape))

    return model.map_weights(jitter)


def _roundoff(model: Component, x: np.ndarray, fx: np.ndarray) -> float:
    """The float64 error of ``model``'s outputs on ``x``, measured: the
    largest change of the outputs when every weight moves by an ulp
    (ROUNDOFF_DRAWS draws, a fixed seed).  It follows the cancellations the
    computation really has (a change of the weights by round-off moves the
    outputs by this much, and so does the rounding of each layer's sums, which
    is the same size relative to the activations actually computed), where a
    bound on the expanded terms grows with the degree."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(ROUNDOFF_DRAWS):
        moved = _outputs(_perturbed(model, rng), x)
        with np.errstate(invalid="ignore", over="ignore"):
            worst = max(worst, float(np.nanmax(np.abs(moved - fx), initial=0.0)))
    return worst


# ----------------------------------------------------------- layer part


def _fields(layer: Component) -> dict[str, Any]:
    """What makes the layer's function: its weights and settings (not its name)."""
    return {**layer.named_weights(), **layer.settings()}


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a != b
    if a is None and b is None:
        return False
    if a is None or b is None:
        other = b if a is None else a
        return bool(np.any(np.asarray(other) != 0))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape != b.shape or not bool(np.all(a == b))


def compare_layers(original: Component, other: Component) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Positions of the layers of ``other`` that differ from ``original``'s, and
    one line per such layer saying how (kind, shape, or which weights).  An
    absent bias counts as a zero vector."""
    la, lb = original.layers, other.layers
    changed: list[int] = []
    how: list[str] = []
    for k in range(max(len(la), len(lb))):
        if k >= len(la) or k >= len(lb):
            changed.append(k)
            how.append(f"layer {k}: only in the {'transformed' if k >= len(la) else 'original'} model")
            continue
        a, b = la[k], lb[k]
        if type(a) is not type(b):
            changed.append(k)
            how.append(f"layer {k}: {a!r} became {b!r}")
            continue
        if (a.in_features, a.out_features, getattr(a, "hidden", None)) != (b.in_features, b.out_features,
                                                                              getattr(b, "hidden", None)):
            changed.append(k)
            how.append(f"layer {k}: shape changed, {a!r} became {b!r}")
            continue
        wa, wb = _fields(a), _fields(b)
        names = [n for n in wa if _differs(wa[n], wb[n])]
        if names:
            changed.append(k)
            how.append(f"layer {k} ({a!r}): changed {', '.join(names)}")
    return tuple(changed), tuple(how)


# ------------------------------------------------------------ public API


def check_invariance(
    model: Component,
    transform: Callable[[Component], Component] | Component,
    *,
    inner: str | None = None,
    mean: Any = None,
    cov: Any = None,
    measure: Measure | None = None,
    tol: float = 1e-9,
    sample_tol: float = 1e-8,
    n_samples: int = 256,
    rng: np.random.Generator | int | None = None,
    budget: float = DEFAULT_BUDGET,
) -> InvarianceReport:
    """Does ``transform`` leave the function of ``model`` unchanged?

    ``transform``: a :class:`~tsalgebra.symmetries.Symmetry`, any callable
    model -> model, or an already-transformed model.  ``inner``: "gaussian"
    (x ~ ``measure``, default N(0, I); ``mean``/``cov`` are shorthand for
    ``Gaussian(mean, cov)``), "tokens" (x a sequence of tokens drawn from
    ``measure``, a :class:`~tsalgebra.Tokens`: the same function on every
    token sequence) or "symmetric"; None (default) the model's own measure,
    as in :func:`tsalgebra.similarity`.  All are function-level: a zero
    Gaussian or symmetric distance means the same polynomial, a zero token
    distance the same outputs on every token sequence.  When the exact
    Gaussian computation is over budget the symmetric product (at the common
    degree) is tried, and when an exact product is out of reach, the verdict
    rests on the ``n_samples`` inputs drawn from the measure (``rng``: a
    Generator or a seed; None means seed 0, so reports are reproducible) and
    says so.  (Under tokens the symmetric product is not tried: two models
    may agree on every token sequence and differ as polynomials.)

    ``invariant`` requires the exact relative distance <= ``tol`` (when
    available) and the worst sampled difference, relative to max |f(x)|, <=
    ``sample_tol``.  Input and output widths must agree.  ``budget``: flops
    allowed to each exact inner product (see :func:`tsalgebra.inner`).
    """
    if not isinstance(model, Component):
        raise TypeError(f"model must be a tsalgebra component, got {type(model).__name__}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"check_invariance: n_samples must be a positive integer, got {n_samples!r}")
    for name, value in (("tol", tol), ("sample_tol", sample_tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0:
            raise ValueError(f"check_invariance: {name} must be a number >= 0, got {value!r}")
    if isinstance(transform, Component):
        other, label = transform, "a given model"
    elif callable(transform):
        other = transform(model)
        label = repr(transform) if hasattr(transform, "description") else getattr(transform, "__name__", repr(transform))
        if not isinstance(other, Component):
            raise TypeError(f"the transform returned {type(other).__name__}, not a tsalgebra model")
    else:
        raise TypeError(f"transform must be a callable or a model, got {type(transform).__name__}")
    if (other.in_features, other.out_features) != (model.in_features, model.out_features):
        raise ValueError(f"the transformed model maps {other.in_features} -> {other.out_features}, the original "
                         f"{model.in_features} -> {model.out_features}: it cannot compute the same function")
    # the pair's measure, in either order (a model given as the transform may be the one reading tokens)
    inner, measure = function_level(inner, measure, mean, cov, "check_invariance", model, other)

    law = bound_measure(model, mean, cov, measure, other)
    rel, per, method, notes, norms = _exact_distance(model, other, inner, law, budget)

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
    x = law.sample(n_samples, rng)
    fx, gx = _outputs(model, x), _outputs(other, x)
    # the round-off allowance, in output units: a multiple of the float64
    # error measured on these samples, for whichever model computes worse
    roundoff = max(_roundoff(model, x, fx), _roundoff(other, x, gx))
    floor = ROUNDOFF_FACTOR * roundoff
    top_f = float(np.abs(fx).max())
    # Differences are relative to max |f(x)|, or, when that is below what
    # sample_tol can resolve above round-off (a model computing the zero
    # function in float64), to floor / sample_tol: a difference then passes
    # only when it is within the round-off allowance itself.
    scale = max(top_f, floor / sample_tol if sample_tol > 0 else 0.0) or float(np.abs(gx).max()) or 1.0
    if floor > 0 and scale > top_f:
        notes.append(f"max |f(x)| = {top_f:.3g} is below the round-off allowance over sample_tol ({scale:.3g}; the "
                     f"allowance is {ROUNDOFF_FACTOR:g} times {roundoff:.3g}, the most either model's "
                     "outputs moved when its weights moved by an ulp): sampled differences are relative to "
                     f"{scale:.3g}, so that only a difference above that allowance counts")
    elif floor > sample_tol * top_f:  # sample_tol = 0: every difference counts, round-off too
        notes.append(f"float64 resolves sampled differences only down to {floor / top_f:.3g} of the output scale "
                     f"(the outputs move by up to {roundoff:.3g} when the weights move by an ulp), "
                     f"above sample_tol {sample_tol:g}")
    if isinstance(rel, float) and norms is not None:
        # The float distance, relative to ||f||^2 -- unless ||f||^2 is below
        # what tol can resolve above round-off (the zero function in float64):
        # then relative to floor^2 / tol (floor^2: the squared difference the
        # round-off allowance admits at every input), so that the distance
        # passes only within that allowance.  Never a size of the terms: it
        # grows with the degree and hid real changes.
        ff, gg, diff = (np.asarray(v, dtype=float) for v in norms)
        resolvable = floor**2 / tol if tol > 0 else 0.0
        if float(ff) < resolvable:
            rel, per = float(diff.sum()) / resolvable, tuple(float(d) / resolvable for d in diff)
            notes.append(f"||f||^2 = {float(ff):.3g} (||g||^2 = {float(gg):.3g}) is at float64 round-off level: the "
                         f"distance is relative to {resolvable:.3g}, the squared round-off allowance "
                         f"({floor:.3g})^2 over tol, so that only a distance above that allowance counts")
    per_sample = tuple(float(v) for v in (np.abs(fx - gx).max(axis=0) / scale))
    worst = max(per_sample)

    exact_ok = rel is None or rel <= tol
    samples_ok = worst <= sample_tol
    # an exact-arithmetic distance of 0 proves the same polynomial (or the same
    # outputs on every token sequence): float samples cannot overturn it
    proof = rel is not None and not isinstance(rel, float) and rel == 0
    if proof and not samples_ok:
        notes.append(f"the samples differ by up to {worst:.3g} of the output scale, which can only be float "
                     "round-off: the exact distance is 0 in exact arithmetic, and that decides")
    elif rel is not None and exact_ok != samples_ok:
        notes.append("the exact distance and the samples disagree: "
                     + ("a change below tol (tol bounds a squared relative distance)" if exact_ok
                        else "sampled differences below sample_tol despite an exact distance above tol"))
    moved = set() if proof else {o for o, d in enumerate(per_sample) if d > sample_tol}
    if rel is not None:
        moved |= {o for o, d in enumerate(per) if d > tol}
    changed_out = tuple(sorted(moved))
    changed_layers, how = compare_layers(model, other)
    return InvarianceReport(
        invariant=bool(proof or (exact_ok and samples_ok)),
        method=method,
        relative_distance=rel,
        per_output_distance=per,
        max_sample_difference=worst,
        per_output_sample_difference=per_sample,
        changed_outputs=changed_out,
        changed_layers=changed_layers,
        layer_changes=how,
        tol=tol,
        sample_tol=sample_tol,
        n_samples=n_samples,
        transform=label,
        notes=tuple(notes),
        output_roundoff=roundoff,
    )
