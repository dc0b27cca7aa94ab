"""Layered models folded into chains of bilinear blocks on padded widths.

A model of Linear and Bilinear layers becomes blocks (L~, R~, D~): a Linear
layer before a bilinear one is folded into its L~ and R~, one after it into
its D~, so only bilinear layers count as depth.  A model without bilinear
layers is a single padded matrix W~.  The layer-wise algorithms (the network
product's Gram recursion, Gaussian closure) and the matrix engine work on
these chains; :func:`folded_shapes` gives their shapes without forming them,
for planning.
"""

from __future__ import annotations

import numpy as np

from .components import Bilinear, Component, Linear, PositionWise

__all__ = ["Block", "chain_flops", "fold", "folded_shapes", "padded_shapes"]

Block = tuple[np.ndarray, np.ndarray, np.ndarray]


def fold(model: Component, exact: bool = False) -> tuple[list[Block], np.ndarray | None]:
    """(bilinear blocks, trailing-free linear map).  With at least one bilinear
    layer the second item is None; otherwise it is the product of the padded
    linear maps.  Float64 maps, or with ``exact`` the layers' own numbers
    (object arrays of Fractions or sympy expressions where they hold them)."""
    blocks: list[Block] = []
    pending: np.ndarray | None = None  # product of linear maps not yet folded
    kind = object if exact else float
    for layer in model.layers:
        layer = layer.flat() if isinstance(layer, PositionWise) else layer
        if isinstance(layer, Linear):
            W = layer.padded().astype(kind)
            if blocks and pending is None:
                L, R, D = blocks[-1]
                blocks[-1] = (L, R, W @ D)
            else:
                pending = W if pending is None else W @ pending
        elif isinstance(layer, Bilinear):
            L, R, D = (m.astype(kind) for m in layer.padded())
            if pending is not None:
                L, R = L @ pending, R @ pending
                pending = None
            blocks.append((L, R, D))
        else:
            raise TypeError(f"layer-wise inner products need Linear/Bilinear layers, not {layer!r}")
    return blocks, (pending if not blocks else None)


def chain_flops(*shapes: tuple[int, ...]) -> int:
    """Flops of multiplying matrices of these shapes left to right."""
    rows, total = shapes[0][0], 0
    for s in shapes[1:]:
        total += 2 * rows * s[0] * s[1]
    return total


Shapes = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def folded_shapes(model: Component) -> tuple[list[Shapes], tuple[int, int] | None]:
    """The shapes of :func:`fold`'s blocks (and trailing linear map), from
    the layers' shapes alone; TypeError for layers fold does not take."""
    blocks: list[Shapes] = []
    pending: tuple[int, int] | None = None
    for layer in model.layers:
        kind, shapes = padded_shapes(layer)
        if kind == "linear":
            W = shapes[0]
            if blocks and pending is None:
                L, R, D = blocks[-1]
                blocks[-1] = (L, R, (W[0], D[1]))
            else:
                pending = W if pending is None else (W[0], pending[1])
        else:
            L, R, D = shapes
            if pending is not None:
                L, R, pending = (L[0], pending[1]), (R[0], pending[1]), None
            blocks.append((L, R, D))
    return blocks, (pending if not blocks else None)


def padded_shapes(layer: Component) -> tuple[str, tuple[tuple[int, int], ...]]:
    """("linear", (W~,)) or ("bilinear", (L~, R~, D~)): the padded shapes of
    a layer as one flat layer (a position-wise one included, not formed);
    TypeError for layers the layer-wise algorithms do not take."""
    if isinstance(layer, PositionWise):
        return layer.flat_padded_shapes()
    if isinstance(layer, Linear):
        return "linear", ((layer.out_features + 1, layer.in_features + 1),)
    if isinstance(layer, Bilinear):
        return "bilinear", layer.padded_shapes()
    raise TypeError(f"layer-wise inner products need Linear/Bilinear layers, not {layer!r}")
