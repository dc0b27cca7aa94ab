"""Basis-dependent baselines, kept for contrast with the tensor similarities.

:func:`weight_cosine` is the flattened-weight cosine that the literature uses
as a naive baseline.  It is NOT invariant under weight-space symmetries
(permuting, rescaling or changing the basis of hidden units moves it while
the function stays the same); see docs/symmetries.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .components import Bilinear, Component

__all__ = ["flat_weights", "weight_cosine"]


def _canonical_pair(a: Component, b: Component) -> tuple[list[Component], list[Component]]:
    """Unfold a residual layer when the other model's layer at that position is
    not residual, so that a residual model and its unfolded copy line up."""
    la, lb = list(a.layers), list(b.layers)
    for k, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, Bilinear) and isinstance(y, Bilinear) and x.residual != y.residual:
            la[k], lb[k] = x.unfolded(), y.unfolded()
    return la, lb


def _flat(layers: Sequence[Component]) -> np.ndarray:
    """The layers' weight fields in their declared order, concatenated as one
    float64 vector; an absent bias as the zeros it stands for."""
    parts = []
    for layer in layers:
        shapes = layer.bias_shapes()
        parts += [np.asarray(np.zeros(shapes[k]) if w is None else w, dtype=float).ravel()
                  for k, w in layer.named_weights().items()]
    return np.concatenate(parts)


def _describe(layer: Component) -> tuple:
    return (type(layer).__name__, layer.in_features, getattr(layer, "hidden", None), layer.out_features,
            getattr(layer, "residual", False))


def flat_weights(model: Component) -> np.ndarray:
    """Every weight of ``model`` concatenated in layer order, each layer's in
    the order of its ``named_weights`` (Linear: weight, bias; Bilinear: left,
    right, down, left bias, right bias, down bias; BilinearAttention: q1, k1,
    q2, k2, v, o, then their biases), as float64; absent biases are zeros."""
    return _flat(model.layers)


def weight_cosine(a: Component, b: Component) -> float:
    """Cosine of the concatenated raw weights of two models of identical
    architecture (same layer kinds and widths, position by position).

    Absent biases count as zeros; a residual Bilinear facing a non-residual
    one is compared in its unfolded form (:meth:`~tsalgebra.Bilinear.unfolded`).
    Raises ValueError naming the first mismatching layer when the
    architectures differ, and when either model's weights are all zero.
    Basis-dependent: not invariant under weight-space symmetries.
    """
    la, lb = _canonical_pair(a, b)
    if len(la) != len(lb):
        raise ValueError(f"weight_cosine needs identical architectures: {len(la)} layers against {len(lb)}")
    for k, (x, y) in enumerate(zip(la, lb)):
        if _describe(x) != _describe(y):
            raise ValueError(f"weight_cosine needs identical architectures: layer {k} is {x!r} in one model "
                             f"and {y!r} in the other")
    va, vb = _flat(la), _flat(lb)
    for v, side in ((va, "a"), (vb, "b")):  # weights changed in place after construction are not checked there
        if not np.isfinite(v).all():
            raise ValueError(f"weight_cosine: model {side} has NaN or Inf weights")
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    if na == 0 or nb == 0:
        raise ValueError("weight_cosine: a model with all-zero weights has no direction")
    return float(np.clip(va @ vb / (na * nb), -1.0, 1.0))
