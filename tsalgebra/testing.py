"""Hypothesis strategies for tsalgebra models, for this project's tests and
for users' own test suites.

Weights are drawn from a seeded normal generator rather than element by
element: hypothesis still shrinks widths, depths and flags (the structure of
a counterexample), and drawing stays fast at widths of 16 and more.

Requires the ``dev`` extra (hypothesis).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .components import Bilinear, Component, Linear, Sequential

__all__ = ["linear_layers", "bilinear_layers", "layers", "stacks"]

_seeds = st.integers(0, 2**32 - 1)


@st.composite
def linear_layers(draw, in_features: int, out_features: int | None = None, max_width: int = 16,
                  bias: bool | None = None) -> Linear:
    """A random Linear layer taking ``in_features`` inputs."""
    o = out_features if out_features is not None else draw(st.integers(1, max_width))
    rng = np.random.default_rng(draw(_seeds))
    with_bias = draw(st.booleans()) if bias is None else bias
    return Linear(rng.normal(size=(o, in_features)) / np.sqrt(in_features),
                  rng.normal(size=o) if with_bias else None)


@st.composite
def bilinear_layers(draw, in_features: int, out_features: int | None = None, max_width: int = 16,
                    biases: bool | None = None, residual: bool | None = None) -> Bilinear:
    """A random Bilinear layer taking ``in_features`` inputs; ``residual`` (if
    drawn) forces out == in."""
    res = draw(st.booleans()) if residual is None else residual
    o = in_features if res else (out_features if out_features is not None else draw(st.integers(1, max_width)))
    h = draw(st.integers(1, max_width))
    rng = np.random.default_rng(draw(_seeds))
    flags = [draw(st.booleans()) if biases is None else biases for _ in range(3)]
    s = 1 / np.sqrt(in_features)
    return Bilinear(
        rng.normal(size=(h, in_features)) * s,
        rng.normal(size=(h, in_features)) * s,
        rng.normal(size=(o, h)) / np.sqrt(h),
        left_bias=rng.normal(size=h) if flags[0] else None,
        right_bias=rng.normal(size=h) if flags[1] else None,
        down_bias=rng.normal(size=o) if flags[2] else None,
        residual=res,
    )


@st.composite
def layers(draw, in_features: int, max_width: int = 16, kinds: tuple[str, ...] = ("linear", "bilinear"),
           **kwargs) -> Component:
    """One random layer of a kind drawn from ``kinds``."""
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        return draw(linear_layers(in_features, max_width=max_width))
    return draw(bilinear_layers(in_features, max_width=max_width, **kwargs))


@st.composite
def stacks(draw, min_depth: int = 1, max_depth: int = 3, max_width: int = 16, in_features: int | None = None,
           kinds: tuple[str, ...] = ("linear", "bilinear"), max_degree: int | None = None, **kwargs) -> Sequential:
    """A random Sequential of ``min_depth``..``max_depth`` layers (widths 1..max_width,
    with and without biases and residuals unless fixed through ``kwargs``).
    ``max_degree`` bounds the product of layer degrees (bilinear layers beyond
    it become linear)."""
    depth = draw(st.integers(min_depth, max_depth))
    d = in_features if in_features is not None else draw(st.integers(1, max_width))
    out: list[Component] = []
    degree = 1
    for _ in range(depth):
        allowed = kinds if max_degree is None or degree * 2 <= max_degree else tuple(k for k in kinds if k == "linear") or ("linear",)
        layer = draw(layers(d, max_width=max_width, kinds=allowed, **kwargs))
        degree *= layer.degree
        out.append(layer)
        d = layer.out_features
    return Sequential(*out)
