"""Expectations as weighted sums of two models evaluated on finitely many inputs.

Gauss-Hermite quadrature (exact for a Gaussian and polynomials of bounded
degree) and the enumeration of every token sequence (exact for a token
measure) both compute sum_k w_k f(x_k) . g(x_k): the models are evaluated
chunk by chunk with contraction plans made for the chunk's size from shapes
alone, so the flops planned are the flops run.  Monte Carlo
(:mod:`tsalgebra.algorithms.sampled`) evaluates the models with the same
:class:`Forward`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .arrays import is_torch
from .components import Component, PositionWise, Sequential
from .engine import evaluation_network, pad_input, to_backend
from .expr import Network
from .planner import ContractionPlan, plan as plan_network
from .problem import CENTRED_ROUNDING, InnerResult, Plan, _terms
from .progress import advancer

__all__ = ["CHUNK", "CentredSums", "Forward", "NodeSum", "chunk_sizes", "node_flops", "node_peak_bytes", "node_sum",
           "rounded_variances"]

CHUNK = 4096  # inputs evaluated at once

Terms = list[tuple[Any, Network]]


def _plans(terms: Terms, batch: int) -> list[ContractionPlan]:
    """The plan evaluating each term on ``batch`` inputs, a function of the
    shapes alone."""
    return [plan_network(evaluation_network(n, batch) if n.inputs else n, n.outputs if not n.inputs else None,
                         cache=False) for _, n in terms]


def chunk_sizes(points: int) -> list[int]:
    """Batch sizes of the evaluation: full chunks, then the rest."""
    full, rest = divmod(points, CHUNK)
    return [CHUNK] * full + ([rest] if rest else [])


def _layer_flops(model: Component, batch: int) -> float:
    """Planned flops of :meth:`Component.evaluate_flat` on ``batch`` inputs."""
    if isinstance(model, Sequential):
        return sum(_layer_flops(layer, batch) for layer in model.layers)
    if isinstance(model, PositionWise):
        return _layer_flops(model.layer, batch * model.n_ctx)
    direct = model.direct_flops(batch)
    return direct if direct is not None else float(_plans([(1, model.network(data=False))], batch)[0].flops)


def _layer_elements(model: Component, batch: int) -> float:
    """Elements :meth:`Component.evaluate_flat` holds at its peak on
    ``batch`` inputs: a layer's input, output and intermediates, the largest
    layer's."""
    if isinstance(model, Sequential):
        return max(_layer_elements(layer, batch) for layer in model.layers)
    if isinstance(model, PositionWise):
        return _layer_elements(model.layer, batch * model.n_ctx)
    own = model.direct_elements(batch)
    if own is None:  # a contraction's largest intermediate, beside the two it was formed from (left x, right x)
        own = 3.0 * _plans([(1, model.network(data=False))], batch)[0].largest_intermediate
    return batch * (model.in_features + model.out_features + 2) + own


def _contracted(model: Component) -> list[Component]:
    """The layers of ``model`` that :class:`Forward` evaluates by contracting
    their networks (:class:`_Contracted`): those with the base evaluator and
    no arithmetic of their own."""
    if isinstance(model, Sequential):
        return [x for layer in model.layers for x in _contracted(layer)]
    if isinstance(model, PositionWise):
        return _contracted(model.layer)
    own = type(model).evaluator is not Component.evaluator or model.direct_flops(1) is not None
    return [] if own or not model.network(data=False).inputs else [model]


class _Contracted:
    """A layer's network contracted in the order planned for the batch's
    shapes alone (:func:`_plans`, the order :func:`_layer_flops` and
    :func:`_layer_elements` count), planned uncached (one plan per batch
    shape, kept here): when the planner cached orders per topology, the
    first shapes seen in a process fixed the order for all (the batch-first
    order of a quadrature run, then run on an enumeration at hidden 8192,
    held 3.6 times the estimate).  The padded weights are built once."""

    def __init__(self, layer: Component) -> None:
        self.network = layer.network()
        self.degree = len(self.network.inputs)
        self.plans: dict[int, ContractionPlan] = {}

    def __call__(self, x: Any) -> Any:
        if not is_torch(x):
            x = np.asarray(x)
            if x.dtype != object and not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float64)  # as engine.evaluate: integer inputs in float64
        xt = pad_input(x)
        if len(x) not in self.plans:
            self.plans[len(x)] = _plans([(1, self.network)], len(x))[0]
        data = [to_backend(t.data, xt) for t in self.network.tensors]
        return self.plans[len(x)].execute(*data, *([xt] * self.degree))[:, 1:]


def _evaluator(layer: Component) -> Any:
    """:meth:`Component.evaluator` of ``layer``, its contracted layers in the planned order."""
    if isinstance(layer, Sequential):
        steps = [_evaluator(x) for x in layer.layers]

        def chain(x: Any) -> Any:
            for step in steps:
                x = step(x)
            return x

        return chain
    if isinstance(layer, PositionWise):
        inner, n, width = _evaluator(layer.layer), layer.n_ctx, layer.layer.in_features
        return lambda x: inner(x.reshape(x.shape[0] * n, width)).reshape(x.shape[0], layer.out_features)
    return _Contracted(layer) if _contracted(layer) else layer.evaluator()


class Forward:
    """A model evaluated on batches of inputs (n, width) -> outputs (n, out),
    constant channel dropped: a layered component layer by layer (each
    layer's own expression is far smaller than the composed one), a network
    or sum term by term; the flops are planned from shapes."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layered = isinstance(model, Component)
        self._terms: Terms | None = None
        self._plans: dict[int, list[ContractionPlan]] = {}
        self._steps: list[Any] | None = None  # each layer's evaluator, built once per run

    def _layer_steps(self) -> list[Any]:
        if self._steps is None:
            self._steps = [_evaluator(layer) for layer in self.model.layers]
        return self._steps

    def terms(self) -> Terms:
        if self._terms is None:
            self._terms = _terms(self.model, data=not self.layered)
        return self._terms

    def flops(self, batch: int) -> float:
        if self.layered:
            return _layer_flops(self.model, batch)
        return float(sum(p.flops for p in _plans(_terms(self.model, data=False), batch)))

    def peak_elements(self, batch: int) -> float:
        """Elements held at once evaluating ``batch`` inputs: the largest
        layer's activations (:meth:`activation_elements`) and the weights
        the evaluators hold (:meth:`held_elements`)."""
        return self.activation_elements(batch) + self.held_elements()

    def activation_elements(self, batch: int) -> float:
        """Elements of the evaluation of ``batch`` inputs: inputs, outputs and intermediates."""
        if self.layered:
            return _layer_elements(self.model, batch)
        # term by term: the largest intermediate, and the sum of the terms' outputs beside it
        return 2.0 * max(p.largest_intermediate for p in _plans(_terms(self.model, data=False), batch))

    def held_elements(self) -> float:
        """Elements this object holds from its first evaluation to its last:
        the padded weights of the layers contracted as networks, copies
        built once per run (a layer evaluated by its own arithmetic builds
        what it needs per batch, counted in its activations)."""
        if not self.layered:
            return 0.0
        return sum(float(np.prod(t.shape)) for layer in _contracted(self.model)
                   for t in layer.network(data=False).tensors)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.layered:
            for step in self._layer_steps():
                x = step(x)
            return x if is_torch(x) else np.asarray(x, dtype=float)  # torch stays on its device
        if len(x) not in self._plans:
            self._plans[len(x)] = _plans(self.terms(), len(x))
        return _evaluate(self.terms(), self._plans[len(x)], x)


def node_flops(fa: Forward, fb: Forward, points: int, limit: float = float("inf")) -> float:
    """Planned flops of evaluating both models on ``points`` inputs (the
    first chunk's plan extrapolated, an exact count once it is within
    ``limit``)."""
    chunk = min(points, CHUNK)
    per_chunk = fa.flops(chunk) + fb.flops(chunk)
    flops = float(per_chunk) * (points / chunk)
    full, rest = divmod(points, chunk)
    if flops <= limit and rest:  # counted, not listed: a limit of inf let 3^32 points build a list of chunks
        flops = float(per_chunk) * full + fa.flops(rest) + fb.flops(rest)
    return flops


def node_peak_bytes(fa: Forward, fb: Forward, batch: int, width: int, out: int, grid: int = 0) -> float:
    """Bytes :func:`node_sum` holds at its peak on chunks of ``batch`` inputs
    of padded ``width`` (``out`` padded outputs): the chunk with ``grid``
    elements per input of its making (a quadrature grid's rows), the larger
    of the models' forward passes (their layers' hidden activations: 332 MB
    at hidden 65536 where the chunk and outputs alone are 2 MB; one model is
    evaluated after the other) beside both models' padded weights, and the
    products of the outputs (centred: shifted copies of both)."""
    activations = max(fa.activation_elements(batch), fb.activation_elements(batch))
    return 8.0 * (batch * (width + grid + 6 * out) + activations + fa.held_elements() + fb.held_elements())


def _evaluate(terms: Terms, plans: list[ContractionPlan], x: np.ndarray) -> np.ndarray:
    xt = pad_input(x)
    out: Any = 0
    for (c, n), p in zip(terms, plans):
        data = [np.asarray(t.data, dtype=float) for t in n.tensors]
        if n.inputs:
            value = p.execute(*data, *([xt] * n.degree))
        else:  # a constant term: once, for every input
            const = p.execute(*data)
            value = np.broadcast_to(const, (len(x),) + const.shape)
        out = out + float(c) * value[:, 1:]
    return out


class CentredSums:
    """A weighted co-moment sum_k w_k (f_k - m_f)(g_k - m_g) accumulated chunk
    by chunk (the pairwise update of Chan, Golub and LeVeque): each chunk is
    centred on its own weighted means, then merged with the running sums
    through the difference of the means.  Stable whatever constant the
    outputs carry and in whatever order the inputs come (E[f g] - E f E g
    lost every digit to a large bias; sums about one input's outputs put a
    quadrature grid's far corner at the origin).  ``product(df, dg)`` is how
    two mean vectors multiply (per channel, or a Gram of models)."""

    def __init__(self, product: Any) -> None:
        self.product = product
        self.weight: Any = 0
        self.mean_f: Any = 0
        self.mean_g: Any = 0
        self.total: Any = 0

    def add(self, weight: Any, mean_f: Any, mean_g: Any, comoment: Any) -> None:
        """Merge a chunk: its weight, its weighted means and its co-moment
        about them."""
        if weight == 0:
            return
        merged = self.weight + weight
        df, dg = mean_f - self.mean_f, mean_g - self.mean_g
        self.total = self.total + comoment + self.product(df, dg) * (self.weight * weight / merged)
        self.mean_f, self.mean_g = self.mean_f + df * (weight / merged), self.mean_g + dg * (weight / merged)
        self.weight = merged


# A forward rounds each output at about 2^-53 of the constant (the mean) it
# carries, so a variance sd^2 summed from such outputs is off by about
# 2 sd 2^-53 |mean|: at an output constant 1e3 to 1e11 times the spread of an
# attention LM's, by at most 0.4 times that.  Its rounding is taken as
# 2 sd CENTRED_ROUNDING |mean| (20-fold room), and a variance that keeps no
# digit of it (sd below 20 CENTRED_ROUNDING |mean|) is 0: the model is
# constant to float64 (one constant on every token sequence gave 7.8e-33
# beside its mean of 1, sd 0.8 2^-53, and a cosine of 1e-17 'exact').
FORWARD_ROUNDING = 20 * CENTRED_ROUNDING


def rounded_variances(variances: np.ndarray, means: np.ndarray,
                      per_output: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the variances, their float64 rounding, whether each was taken as 0)
    of centred self products over the outputs (the last axis) whose means
    are ``means``: 0 within FORWARD_ROUNDING of the means (per output, or
    over the last axis summed), else rounded at 2 sd CENTRED_ROUNDING |mean|.
    An output taken as 0 from a variance that was not 0 is ``zeroed``."""
    means = np.abs(means)
    floor = (FORWARD_ROUNDING * means) ** 2
    below = variances <= floor
    if not per_output:
        below = np.broadcast_to((variances.sum(-1) <= floor.sum(-1))[..., None], np.shape(variances))
    kept = np.where(below, 0.0, variances)
    return kept, 2 * np.sqrt(np.maximum(kept, 0.0)) * CENTRED_ROUNDING * means, below & (variances != 0)


@dataclass(frozen=True)
class NodeSum:
    """A sum over nodes (:func:`node_sum`) and how far float64 took it:
    ``rounding`` (the float64 rounding of a centred self product, per
    output or summed; 0 where not judged: a cross product, an uncentred one,
    an output taken as 0) and ``zeroed`` (where a variance was taken as 0,
    the largest of those outputs' means over their spread; else None)."""

    value: Any
    rounding: Any = 0.0
    zeroed: float | None = None

    def result(self, plan: Plan) -> InnerResult:
        """``plan``'s result: a variance that the rounding leaves with fewer
        than CENTRED_DIGITS digits is not exact, and one taken as 0 (the
        model constant to float64) is not exact either, unless it was 0;
        each says so."""
        said = f"the centred product by {plan.algorithm} sums outputs whose mean is about"
        result = plan.rounded_result(
            self.value, self.rounding, lambda size, rest: f"{said} {size / (2 * CENTRED_ROUNDING * rest):.2g} times "
            "their spread", self.rounding, "the model is constant to float64 on these inputs")
        if self.zeroed is None:
            return result
        note = (f"{said} {self.zeroed:.2g} times their spread: their variance is within the float64 rounding of the "
                "mean and taken as 0, the model constant to float64 (not exact)")
        return dataclasses.replace(result, exact=False, notes=result.notes + (note,), digits=0.0)


def node_sum(fa: Forward, fb: Forward, chunks: Iterable[tuple[np.ndarray, np.ndarray]], centered: bool,
             per_output: bool, self_product: bool = False) -> NodeSum:
    """sum_k w_k f(x_k) . g(x_k) (the weights summing to 1; ``centered``:
    the covariance, :class:`CentredSums`), summed over channels unless
    ``per_output``; ``chunks`` yields (inputs (m, width), weights (m,)) of
    at most :data:`CHUNK` rows.  A centred ``self_product``'s variance
    within the rounding of its mean (FORWARD_ROUNDING) is 0: the model is
    constant to float64 (per output, or as a whole); above it, its rounding
    is ``2 sd CENTRED_ROUNDING |mean|`` per output (see :class:`NodeSum`)."""
    acc_fg: Any = 0
    sums = CentredSums(lambda df, dg: df * dg)
    origin: Any = None
    spread: Any = None  # a self product's outputs' range over the nodes drawn: 0 where an output is constant
    tick = advancer()  # the running plan's bar, when one shows
    for x, w in chunks:
        f, g = fa(x), fb(x)
        if tick is not None:
            tick(fa.flops(len(x)) + fb.flops(len(x)))
        if centered:
            weight = w.sum()
            if weight != 0:
                if origin is None:  # the first chunk's means, taken out of every output: the means merged below
                    origin = ((w[:, None] * f).sum(axis=0) / weight, (w[:, None] * g).sum(axis=0) / weight)
                f, g = f - origin[0], g - origin[1]  # are then of the outputs' spread, not of their constant
                if self_product:
                    drawn = f[w != 0]
                    lo, hi = drawn.min(axis=0), drawn.max(axis=0)
                    spread = (lo, hi) if spread is None else (np.minimum(spread[0], lo), np.maximum(spread[1], hi))
                mf, mg = (w[:, None] * f).sum(axis=0) / weight, (w[:, None] * g).sum(axis=0) / weight
                sums.add(weight, mf, mg, (w[:, None] * (f - mf) * (g - mg)).sum(axis=0))
        else:
            acc_fg = acc_fg + (w[:, None] * f * g).sum(axis=0)
    value = sums.total if centered else acc_fg
    rounding: Any = np.zeros(np.shape(value))
    zeroed = None
    if centered and self_product and origin is not None:
        mean = origin[0] + sums.mean_f
        # an output the same on every node drawn has variance 0 exactly, whatever the sums' rounding made of it
        value = np.where(spread[0] == spread[1], 0.0, value)
        kept, rounding, below = rounded_variances(value, mean, per_output)
        if np.any(below):  # rounding taken as 0, not an exact 0
            with np.errstate(divide="ignore"):
                zeroed = float(np.max(np.abs(mean[below]) / np.sqrt(np.maximum(value[below], 0.0))))
        value = kept
    if per_output:
        return NodeSum(value, rounding, zeroed)
    return NodeSum(float(np.sum(value)), float(np.sum(rounding)), zeroed)
