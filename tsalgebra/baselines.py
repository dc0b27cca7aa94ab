"""Basis-dependent baselines, kept for contrast with the tensor similarities.

:func:`weight_cosine` is the flattened-weight cosine that the literature uses
as a naive baseline.  It is NOT invariant under weight-space symmetries
(permuting, rescaling or changing the basis of hidden units moves it while
the function stays the same); see docs/symmetries.md.
"""

from __future__ import annotations

import numpy as np

from .attention import BilinearAttention
from .components import Bilinear, Component, Linear
from .symmetries import unfold_residual

__all__ = ["flat_weights", "weight_cosine"]


def _canonical_pair(a: Component, b: Component) -> tuple[Component, Component]:
    """Unfold a residual layer when the other model's layer at that position is
    not residual, so that a residual model and its unfolded copy line up."""
    la, lb = list(a.layers), list(b.layers)
    for k, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, Bilinear) and isinstance(y, Bilinear) and x.residual != y.residual:
            la[k], lb[k] = unfold_residual(x), unfold_residual(y)
    return la, lb  # type: ignore[return-value]


def _layer_vector(layer: Component) -> list[np.ndarray]:
    if isinstance(layer, Linear):
        parts = [layer.weight, layer.bias if layer.bias is not None else np.zeros(layer.out_features)]
    elif isinstance(layer, Bilinear):
        h, o = layer.hidden, layer.out_features
        parts = [layer.left, layer.right, layer.down,
                 layer.left_bias if layer.left_bias is not None else np.zeros(h),
                 layer.right_bias if layer.right_bias is not None else np.zeros(h),
                 layer.down_bias if layer.down_bias is not None else np.zeros(o)]
    elif isinstance(layer, BilinearAttention):
        w, b = layer.weights_, layer.biases
        parts = [w[k] for k in ("q1", "k1", "q2", "k2", "v", "o")]
        parts += [b.get(k, np.zeros(w[k].shape[:2])) for k in ("q1", "k1", "q2", "k2", "v")]
        parts.append(layer.o_bias if layer.o_bias is not None else np.zeros(layer.d_out))
    else:
        raise TypeError(f"weight_cosine: no flat weights for {layer!r}")
    return [np.asarray(p, dtype=float).ravel() for p in parts]


def _describe(layer: Component) -> tuple:
    return (type(layer).__name__, layer.in_features, getattr(layer, "hidden", None), layer.out_features,
            getattr(layer, "residual", False))


def flat_weights(model: Component) -> np.ndarray:
    """Every weight of ``model`` concatenated in layer order (Linear: weight,
    bias; Bilinear: left, right, down, left bias, right bias, down bias), as
    float64; absent biases are zero vectors."""
    return np.concatenate([p for layer in model.layers for p in _layer_vector(layer)])


def weight_cosine(a: Component, b: Component) -> float:
    """Cosine of the concatenated raw weights of two models of identical
    architecture (same layer kinds and widths, position by position).

    Absent biases count as zeros; a residual Bilinear facing a non-residual
    one is compared in its unfolded form (:func:`~tsalgebra.symmetries.unfold_residual`).
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
    va = np.concatenate([p for layer in la for p in _layer_vector(layer)])
    vb = np.concatenate([p for layer in lb for p in _layer_vector(layer)])
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    if na == 0 or nb == 0:
        raise ValueError("weight_cosine: a model with all-zero weights has no direction")
    return float(np.clip(va @ vb / (na * nb), -1.0, 1.0))
