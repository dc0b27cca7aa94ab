"""Is a transformed model the same function?  :func:`check_invariance`.

Two witnesses, both reported:

- exact: the relative functional distance
  ||f - g||^2 / ||f||^2 = (<f,f> + <g,g> - 2 <f,g>) / <f,f>
  from the weights (Gaussian inner product by default; the symmetric one at
  the common degree when the Gaussian enumeration is too expensive; none when
  both are), per output channel as well;
- sampled: the worst |f(x) - g(x)| over random inputs, relative to the
  largest |f(x)| seen.

Float64 round-off is allowed for by measuring it, for each witness:

- samples: the outputs' change when every weight moves by an ulp (the error
  a transform's rounding leaves), times ROUNDOFF_FACTOR;
- distance: the change of the computed distance itself when every weight of
  both models moves by an ulp, times DISTANCE_ROUNDOFF_FACTOR.  The inner
  products of ill-conditioned weights (a value map of condition 1e8 and its
  inverse) cancel far more than the outputs do: a genuine symmetry's
  distance came out at 1e-5 .. 1e-1 (1e3 at condition 1e10), of either
  sign, while its outputs agreed to 1e-10 .. 1e-8.

Only when f is zero to float64 precision (its outputs within its own
round-off allowance) are the differences measured against the allowance
instead of f.  (A bound from |weights| on |inputs| grew with the degree and
hid a 50 % change of a deep model.)

An exact-arithmetic distance of 0 proves invariance; samples cannot
overturn it (they can only differ by round-off then).

When the function changed the report names the output channels that moved
and the layers whose weights differ from the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .arrays import generator
from .components import Component
from .inner import relative_products
from .measure import Measure, support_note
from .problem import DEFAULT_BUDGET, CostError, bound_measure, function_level
from .rescale import canonical

__all__ = ["InvarianceReport", "check_invariance"]


@dataclass(frozen=True)
class InvarianceReport:
    """The verdict of :func:`check_invariance` and the evidence for it.

    ``invariant`` is True when every available check passed: the exact
    relative distance is at most ``tol`` or within its measured round-off
    allowance ``distance_allowance`` (if it could be computed), and the worst
    sampled difference is at most ``sample_tol`` or within the outputs'
    round-off allowance ``sample_allowance``; or when the distance, computed
    in exact arithmetic, is exactly 0 (a proof; a note says so if the float
    samples differ).

    - ``method``: how the exact distance was obtained ("gaussian (exact)",
      "symmetric (exact, degree k)", with "; gaussian over budget" after a
      fallback) or "samples only"; ``notes`` say why a method was refused.
    - ``relative_distance``: ||f - g||^2 / ||f||^2 as computed (a Fraction
      with exact weights; None when no exact method was feasible).  In
      float64 it may be far from 0, even negative, for a genuine symmetry of
      ill-conditioned weights: ``distance_allowance`` says how far round-off
      takes it.
    - ``per_output_distance``: ||f_o - g_o||^2 / ||f||^2 per output channel
      (normalized by the whole model's norm, so the entries sum to
      ``relative_distance`` and round-off in a tiny channel is not flagged).
    - ``distance_roundoff``: the float64 error of the computed distance,
      measured (the largest change of it when every weight of both models
      moves by an ulp); None where not measured (exact weights, or every
      distance already within ``tol``).  ``distance_allowance`` is
      DISTANCE_ROUNDOFF_FACTOR times it (0.0 when not measured).
    - ``max_sample_difference``: max over samples and channels of
      |f(x) - g(x)| / max |f(x)|; ``per_output_sample_difference`` per
      channel.  When f is zero to float64 precision (max |f(x)| within its
      own round-off allowance) they are relative to the allowance over
      ``sample_tol`` instead, and the float distance to the squared
      allowance over ``tol``; a note says so.
    - ``output_roundoff``: the float64 error of the outputs on the samples,
      measured (the largest change of either model's outputs when every
      weight moves by an ulp); ``sample_allowance`` is ROUNDOFF_FACTOR times
      it, on the scale of ``max_sample_difference`` (0.0 when ``sample_tol``
      is 0: then every difference counts).
    - ``changed_outputs``: channels (0-based) whose exact distance exceeds
      both ``tol`` and its allowance, or whose sampled difference exceeds
      both ``sample_tol`` and its allowance.
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
    sample_allowance: float = 0.0
    distance_roundoff: float | None = None
    distance_allowance: float = 0.0

    @property
    def exact_available(self) -> bool:
        return self.relative_distance is not None

    def __repr__(self) -> str:
        verdict = "INVARIANT" if self.invariant else "NOT INVARIANT"
        lines = [f"InvarianceReport: {verdict} [{self.method}; {self.n_samples} samples]"]
        if self.transform:
            lines.append(f"  transform: {self.transform}")
        if self.relative_distance is not None:
            allowance = (f"; its float64 round-off, measured: {self.distance_roundoff:.3g}, allowance "
                         f"{self.distance_allowance:.3g}" if self.distance_roundoff is not None else "")
            lines.append(f"  relative distance ||f-g||^2/||f||^2 = {_fmt(self.relative_distance)} (tol {self.tol:g}"
                         f"{allowance})")
        else:
            lines.append("  relative distance: unavailable (no exact method within budget; see notes)")
        lines.append(f"  worst sampled output difference = {self.max_sample_difference:.3g} "
                     f"of the output scale (tol {self.sample_tol:g}; the outputs' float64 round-off, measured: "
                     f"{self.output_roundoff:.3g}, allowance {self.sample_allowance:.3g} of the output scale)")
        lines.append("  changed outputs: " + (", ".join(map(str, self.changed_outputs)) or "none"))
        lines.append("  layers with different weights: " + (", ".join(map(str, self.changed_layers)) or "none"))
        lines += [f"    {c}" for c in self.layer_changes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return str(v) if not isinstance(v, float) else f"{v:.3g}"


# -------------------------------------------------------------- arguments


def _type_name(value: Any) -> str:
    """The full name of ``value``'s type: torch's Linear and tsalgebra's share
    the short one ("got Linear" told a torch user nothing)."""
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _is_torch(value: Any) -> bool:
    return any(c.__module__.split(".")[0] == "torch" for c in type(value).__mro__)


def _not_a_model(value: Any, lead: str) -> TypeError:
    """The error for an argument that is not a tsalgebra model, by its type's
    full name, with the conversion for a torch module."""
    hint = "; convert a torch module first: ts.from_torch(module)" if _is_torch(value) else ""
    return TypeError(f"{lead}, got {_type_name(value)}, which is not a tsalgebra model{hint}")


# ------------------------------------------------------------- exact part


def _products(f: Component, g: Component, kind: str, measure: Measure, budget: float) -> tuple[Any, Any, Any, int]:
    """(<f_o,f_o>, <g_o,g_o>, ||f_o - g_o||^2 per output channel, degree)
    under ``kind``, each divided by the square of f's canonical scale (the
    distance is their ratio, which float64 holds where the products of
    weights of 1e200 overflow: :func:`_unit`); CostError when over budget."""
    # one Bombieri degree for all three products: norms taken at each
    # model's own degree would not combine into a distance
    kw = {"measure": measure} if kind != "symmetric" else {"degree": max(f.degree, g.degree)}
    fg, ff, gg = relative_products(f, g, kind, per_output=True, budget=budget, **kw)
    return ff.value, gg.value, ff.value + gg.value - 2 * fg.value, ff.degree


def _unit(f: Component) -> float:
    """f's canonical scale (the unit of :func:`_products`), a float where it
    is one (0.0: beyond float64, which only a zero allowance meets)."""
    with np.errstate(over="ignore"):
        return float(np.exp(canonical(f)[1]))


def _exact_distance(f: Component, g: Component, inner: str, measure: Measure, budget: float
                    ) -> tuple[Any, tuple[Any, ...] | None, str, list[str], Any]:
    """(relative distance, per-output distances, method, notes, (||f||^2,
    ||g||^2, per-output ||f_o - g_o||^2, the inner product used)); the first
    two and the last are None when every exact method is over budget."""
    tries = ["gaussian", "symmetric"] if inner == "gaussian" else [inner]
    refused: list[str] = []
    for kind in tries:
        try:
            ff, gg, diff, degree = _products(f, g, kind, measure, budget)
        except CostError as exc:
            refused.append(f"exact {kind} refused: {exc}")
            continue
        total_f, total_d = ff.sum(), diff.sum()
        if total_f == 0:  # f is the zero function: any nonzero g is infinitely far
            zero = gg.sum() == 0
            rel = total_d * 0 if zero else float("inf")
            per = tuple(d * 0 if zero or d == 0 else float("inf") for d in diff)
        else:
            rel = total_d / total_f
            per = tuple(d / total_f for d in diff)
        if ff.dtype != object:
            rel, per = float(rel), tuple(float(p) for p in per)
        label = f"{kind} (exact" + (f", degree {degree})" if kind == "symmetric" else ")")
        if kind != inner:
            label += f"; {inner} over budget"
        return rel, per, label, refused, (total_f, gg.sum(), diff, kind, ff)
    return None, None, "samples only", refused + ["exact check unavailable: the verdict rests on samples only"], None


def _own_distances(norms: Any, tol: float) -> tuple[list[Any], list[float]]:
    """Each output's distance ||f_o - g_o||^2 / ||f_o||^2 on its own scale,
    and its limit before the round-off is measured (tol; unbounded for an
    output of f that is zero, which the whole model's distance judges)."""
    if norms is None:
        return [], []
    _, _, diff, _, ff = norms
    own = [d / f if f != 0 else 0 for d, f in zip(diff, ff)]
    return own, [tol if f != 0 else np.inf for f in ff]


# The distance's round-off allowance: this many times its measured float64
# error (see _distance_roundoff).  Measured over 96 genuine map_value_output /
# map_query_key transforms (condition 1e6 .. 1e12, 4-wide heads, 12 seeds
# each): the computed distance was at most 6.5 times the measured error
# (median 0.5); 64 leaves a factor 10 over that.  It is a squared distance:
# 64 is a factor 8 on the amplitude.
DISTANCE_ROUNDOFF_FACTOR = 64.0
# Where every distance above tol is this many times beyond DISTANCE_ROUNDOFF_FACTOR
# times the first draw's error, further draws cannot change a verdict (the
# distance was at most 6.5 times one draw's error above): they are skipped.
_CLEAR_MARGIN = 1e3


def _distance_roundoff(f: Component, g: Component, kind: str, measure: Measure, budget: float, diff: np.ndarray,
                       denominator: float, values: list[float], tol: float) -> tuple[float, np.ndarray] | None:
    """The float64 error of the computed distance, measured: the largest
    change of ||f - g||^2 (total and per output channel, over
    ``denominator`` like the distance) when every weight of both models moves
    by a random ulp, over up to ROUNDOFF_DRAWS draws (a fixed seed).

    Like the outputs' round-off (_roundoff), it follows the cancellations the
    computation really has: the inner products of a value map of condition
    1e8 and its inverse cancel to 1e-5 .. 1e-1 of ||f||^2, those of a wire
    change of the same condition to 1e-14.  After one draw, if every
    |distance| in ``values`` above ``tol`` is _CLEAR_MARGIN times beyond the
    allowance, the verdict is settled and no more draws are made.  None when
    the perturbed products are refused (over budget)."""
    rng = np.random.default_rng(1)
    diff = np.asarray(diff, dtype=float)
    total, per = 0.0, np.zeros_like(diff)
    for draw in range(ROUNDOFF_DRAWS):
        try:
            _, _, moved, _ = _products(_perturbed(f, rng), _perturbed(g, rng), kind, measure, budget)
        except CostError:
            return None
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            change = np.abs(np.asarray(moved, dtype=float) - diff) / denominator
            total = max(total, abs(float(np.sum(moved)) - float(np.sum(diff))) / denominator)
        per = np.fmax(per, change)
        allowance = DISTANCE_ROUNDOFF_FACTOR * np.append(per, total)
        if draw == 0 and all(abs(v) <= tol or abs(v) > _CLEAR_MARGIN * a for v, a in zip(values, allowance)):
            break
    return total, per


# ----------------------------------------------------------- sampled part


def _outputs(model: Component, x: np.ndarray) -> np.ndarray:
    """(n, out) on flat samples (n, in): a sequence model's call would take (n, n_ctx, d)."""
    return np.asarray(model.evaluate_flat(x), dtype=float)


# The sampled outputs' round-off allowance: this many times the float64
# error of the outputs as measured on the samples (see _roundoff).  That
# error is measured, not bounded (a bound from |weights| on |inputs| grew
# with the degree, 1e11 times the real error for a 2-layer attention model,
# and hid a 50 % change of the outputs); the factor covers what the measure
# does not see: a transform's own error beyond an ulp per weight, mostly an
# inverse X of its matrix A with a left residual |X A - I| above eps cond(A)
# (np.linalg.inv's: up to 14 .. 65 eps cond(A) for 4 x 4 matrices in 1 in
# 400).  Measured over 1350 genuine map_value_output, map_query_key and
# change_wire_basis transforms (condition 1e8 .. 1e12): the worst sampled
# difference was at most 160 times the measured round-off (median 0.6, 99th
# percentile 38; at most 5 with an inverse of small left residual).  It was
# 2^10, which let a 0.1 % change of one output pass after a wire change of
# condition 1e10 (its round-off 2.6e-7 of the outputs).
ROUNDOFF_FACTOR = 2.0**8
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

    ``invariant`` requires the exact relative distance <= ``tol`` or within
    its measured float64 round-off allowance (when available), each
    output's on its own scale too (as :func:`tsalgebra.verify` judges
    outputs), and the worst
    sampled difference, relative to max |f(x)|, <= ``sample_tol`` or within
    the outputs' measured round-off allowance (see
    :class:`InvarianceReport`; ``tol`` or ``sample_tol`` 0: no allowance,
    every difference counts).  Input and output widths must agree.
    ``budget``: flops allowed to each exact inner product (see
    :func:`tsalgebra.inner`).
    """
    if not isinstance(model, Component):
        raise _not_a_model(model, "check_invariance: model must be a tsalgebra model (a Component)")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"check_invariance: n_samples must be a positive integer, got {n_samples!r}")
    for name, value in (("tol", tol), ("sample_tol", sample_tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0:
            raise ValueError(f"check_invariance: {name} must be a number >= 0, got {value!r}")
    if isinstance(transform, Component):
        other, label = transform, "a given model"
    elif _is_torch(transform):  # callable, but it would be called on a tsalgebra model
        raise _not_a_model(transform, "check_invariance: transform must be a callable model -> model or a tsalgebra "
                                      "model (a Component)")
    elif callable(transform):
        # the original kept apart: a transform that edits the weights in place compared the changed model
        # with itself (INVARIANT at distance 0); a model's arrays are shared, not frozen
        original = model.map_weights(lambda w: w.copy() if isinstance(w, np.ndarray) else w)
        other = transform(model)
        model = original
        label = repr(transform) if hasattr(transform, "description") else getattr(transform, "__name__", repr(transform))
        if not isinstance(other, Component):
            raise _not_a_model(other, "check_invariance: the transform must return a tsalgebra model (a Component)")
    else:
        raise TypeError(f"check_invariance: transform must be a callable or a model, got {_type_name(transform)}")
    if (other.in_features, other.out_features) != (model.in_features, model.out_features):
        raise ValueError(f"the transformed model maps {other.in_features} -> {other.out_features}, the original "
                         f"{model.in_features} -> {model.out_features}: it cannot compute the same function")
    # the pair's measure, in either order (a model given as the transform may be the one reading tokens)
    inner, measure = function_level(inner, measure, mean, cov, "check_invariance", model, other)

    law = bound_measure(model, mean, cov, measure, other)
    rng = generator(rng, default=0)  # None: seed 0, so that reports are reproducible
    rel, per, method, notes, norms = _exact_distance(model, other, inner, law, budget)
    support = support_note(law, model.in_features)
    if support is not None:  # a zero distance says nothing off the support (a token never drawn)
        notes.append(support)

    x = law.sample(n_samples, rng)
    fx, gx = _outputs(model, x), _outputs(other, x)
    # the round-off allowance, in output units: a multiple of the float64
    # error measured on these samples, for whichever model computes worse
    own = _roundoff(model, x, fx)
    roundoff = max(own, _roundoff(other, x, gx))
    floor = ROUNDOFF_FACTOR * roundoff
    top_f = float(np.abs(fx).max())
    # f is zero to float64 precision when its outputs are within its own
    # round-off allowance (the zero function computed in float64): then
    # differences are relative to floor / sample_tol, so that one passes
    # only within the allowance itself.  Otherwise they are relative to
    # max |f(x)| and pass within max(sample_tol, the allowance): the other
    # model's round-off (an ill-conditioned transform's) is an allowance,
    # never a scale (as a scale it let a 10 % change pass at condition 1e12).
    zero_f = top_f <= ROUNDOFF_FACTOR * own
    if zero_f and sample_tol > 0:
        scale = max(top_f, floor / sample_tol) or float(np.abs(gx).max()) or 1.0
        notes.append(f"max |f(x)| = {top_f:.3g} is within f's own round-off allowance ({ROUNDOFF_FACTOR:g} times "
                     f"{own:.3g}, the most its outputs moved when its weights moved by an ulp): sampled differences "
                     f"are relative to {scale:.3g}, the allowance ({floor:.3g}) over sample_tol, so that only a "
                     "difference above that allowance counts")
    else:
        scale = top_f or float(np.abs(gx).max()) or 1.0
    sample_allowance = floor / scale if sample_tol > 0 else 0.0  # sample_tol = 0: every difference counts
    if sample_allowance > sample_tol:
        notes.append(f"float64 resolves sampled differences only down to {sample_allowance:.3g} of the output "
                     f"scale ({ROUNDOFF_FACTOR:g} times {roundoff:.3g}, the most either model's outputs moved "
                     f"when its weights moved by an ulp), above sample_tol {sample_tol:g}: differences below it "
                     "count as round-off")
    elif sample_tol == 0 and floor > 0:
        notes.append(f"float64 resolves sampled differences only down to {floor / scale:.3g} of the output scale "
                     f"(the outputs move by up to {roundoff:.3g} when the weights move by an ulp), above "
                     f"sample_tol {sample_tol:g}")
    per_sample = tuple(float(v) for v in (np.abs(fx - gx).max(axis=0) / scale))
    worst = max(per_sample)
    sample_limit = max(sample_tol, sample_allowance)

    distance_roundoff, distance_allowance = None, 0.0
    per_limit: tuple[float, ...] = ()
    own, own_limit = _own_distances(norms, tol)
    if isinstance(rel, float) and norms is not None:
        ff, gg, diff, kind, _ = norms
        ff, gg, diff = float(ff), float(gg), np.asarray(diff, dtype=float)
        denominator = ff
        # The float distance, relative to ||f||^2 -- unless f is zero to
        # float64 precision and ||f||^2 is below what tol can resolve above
        # round-off: then relative to floor^2 / tol (floor^2: the squared
        # difference the round-off allowance admits at every input), so that
        # the distance passes only within that allowance.  Never a size of
        # the terms: it grows with the degree and hid real changes.
        unit = _unit(model)  # the products' unit (f's canonical scale), the allowance's in output units
        resolvable = (floor / unit) ** 2 / tol if tol > 0 and 0 < unit < np.inf else 0.0
        if zero_f and ff < resolvable:
            denominator = resolvable
            rel, per = float(diff.sum()) / resolvable, tuple(float(d) / resolvable for d in diff)
            notes.append(f"||f||^2 = {ff * unit * unit:.3g} (||g||^2 = {gg * unit * unit:.3g}) is at float64 "
                         f"round-off level: the distance is relative to {resolvable * unit * unit:.3g}, the squared "
                         f"round-off allowance ({floor:.3g})^2 over tol, so that only a distance above that allowance "
                         "counts")
        values = [*per, rel]
        # tol = 0: every difference counts, round-off too (as for sample_tol);
        # an infinite distance (f zero, g not) is no round-off
        unresolved = tol > 0 and any(not abs(v) <= tol for v in values + own)
        measured = (_distance_roundoff(model, other, kind, law, budget, diff, denominator, values, tol)
                    if unresolved and denominator > 0 and np.isfinite(values).all() else None)
        if measured is not None:
            distance_roundoff = measured[0]
            distance_allowance = DISTANCE_ROUNDOFF_FACTOR * distance_roundoff
            per_limit = tuple(max(tol, DISTANCE_ROUNDOFF_FACTOR * float(d)) for d in measured[1])
            own_limit = [max(tol, DISTANCE_ROUNDOFF_FACTOR * float(d) * denominator / float(f)) if f > 0 else np.inf
                         for d, f in zip(measured[1], np.asarray(norms[4], dtype=float))]
            if distance_allowance > tol:
                notes.append(f"float64 resolves the distance only down to {distance_allowance:.3g} "
                             f"({DISTANCE_ROUNDOFF_FACTOR:g} times {distance_roundoff:.3g}, the most it moved when "
                             f"the weights of both models moved by an ulp), above tol {tol:g}: a distance below it "
                             "counts as round-off" + ("; the verdict rests on the samples where the distance "
                                                      "cannot resolve a change" if sample_tol > 0 else ""))
            if rel < -distance_allowance:
                notes.append(f"the computed distance {rel:.3g} is negative beyond its measured round-off allowance: "
                             "float64 cannot resolve it here; it does not count against invariance")
        elif unresolved and np.isfinite(values).all():
            notes.append("the distance's float64 round-off could not be measured (over budget): it is compared "
                         "with tol alone")
    distance_limit = max(tol, distance_allowance)

    # each output on its own scale too (as verify judges them): the whole model's norm hid a sign flip of an
    # output 1e8 times smaller than another, even at an exact nonzero distance
    flipped = {o for o, (d, lim) in enumerate(zip(own, own_limit)) if not abs(d) <= lim and d > 0}
    exact_ok = (rel is None or rel <= distance_limit) and not flipped
    samples_ok = worst <= sample_limit
    # an exact-arithmetic distance of 0 proves the same polynomial (or the same
    # outputs on every token sequence): float samples cannot overturn it
    proof = rel is not None and not isinstance(rel, float) and rel == 0
    if proof and not samples_ok:
        notes.append(f"the samples differ by up to {worst:.3g} of the output scale, which can only be float "
                     "round-off: the exact distance is 0 in exact arithmetic, and that decides")
    elif rel is not None and exact_ok != samples_ok:
        notes.append("the exact distance and the samples disagree: "
                     + ("a change below tol or below the distance's round-off allowance (tol bounds a squared "
                        "relative distance)" if exact_ok
                        else "sampled differences within sample_tol or their round-off allowance despite an exact "
                             "distance above tol and its allowance"))
    moved = set() if proof else {o for o, d in enumerate(per_sample) if d > sample_limit}
    if rel is not None:
        limits = per_limit or (distance_limit,) * len(per)
        moved |= {o for o, (d, lim) in enumerate(zip(per, limits)) if d > lim} | flipped
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
        sample_allowance=sample_allowance,
        distance_roundoff=distance_roundoff,
        distance_allowance=distance_allowance,
    )
