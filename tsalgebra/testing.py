"""Hypothesis strategies for tsalgebra models, for this project's tests and
for users' own test suites.

Models: :func:`stacks`, :func:`layers`, :func:`linear_layers`,
:func:`bilinear_layers`.  For a given model: :func:`symmetry_elements`
(random weight-space symmetries, built from the generators of
:mod:`tsalgebra.symmetries`) and :func:`perturbations` (random changes that
provably change the function), e.g.::

    @given(stacks(max_depth=2, max_width=3, max_degree=4).flatmap(
        lambda m: st.tuples(st.just(m), symmetry_elements(m))))
    def test_my_metric_is_invariant(pair):
        model, sym = pair
        assert my_metric(model, sym(model)) == pytest.approx(1, abs=1e-10)

Weights are drawn from a seeded normal generator rather than element by
element: hypothesis still shrinks widths, depths and flags (the structure of
a counterexample), and drawing stays fast at widths of 16 and more.

Requires the ``dev`` extra (hypothesis).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .components import Bilinear, Component, Linear, Sequential
from .symmetries import Symmetry, compose, random_generators

__all__ = ["linear_layers", "bilinear_layers", "layers", "stacks", "symmetry_elements", "perturbations"]

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
        room = max_degree is None or degree * 2 <= max_degree  # may this layer still be bilinear?
        allowed = kinds if room else ("linear",)
        layer = draw(layers(d, max_width=max_width, kinds=allowed, **kwargs))
        degree *= layer.degree
        out.append(layer)
        d = layer.out_features
    return Sequential(*out)


@st.composite
def symmetry_elements(draw, model: Component, full: bool | None = None, exact: bool | None = None) -> Symmetry:
    """A random element of ``model``'s weight-space symmetry group, as a
    :class:`~tsalgebra.symmetries.Symmetry` (apply it: ``sym(model)``).

    It composes one random instance of every generator that applies (see
    :func:`~tsalgebra.symmetries.random_generators`) when ``full`` is True, a
    drawn subset of them when False, either when None (hypothesis then shrinks
    a failure towards fewer generators).  ``exact`` (default: the model's)
    draws rational numbers so exact models stay exact.
    """
    gens = random_generators(model, np.random.default_rng(draw(_seeds)), exact=exact)
    use_all = draw(st.booleans()) if full is None else full
    if not use_all and gens:
        keep = draw(st.lists(st.booleans(), min_size=len(gens), max_size=len(gens)))
        gens = [g for g, k in zip(gens, keep) if k]
    return compose(*gens)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


def _floats(layer: Component) -> dict[str, np.ndarray | None]:
    """The layer's weights by name as new float64 arrays (absent biases: None)."""
    return {n: None if w is None else np.asarray(w, dtype=float).copy() for n, w in layer.named_weights().items()}


@st.composite
def perturbations(draw, model: Component, min_size: float = 1e-2, max_size: float = 1.0,
                  n_samples: int = 64) -> Component:
    """A model that provably computes a different function from ``model``
    (a negative control for invariance tests), of the same kind as ``model``.

    The change is made in the last layer, where it is never redundant: one
    entry of its down (Bilinear) or weight (Linear) matrix, one entry of its
    output bias, or (Bilinear) a new hidden unit with random factors and
    down weights.  Its size is drawn log-uniformly in [``min_size``,
    ``max_size``] as the RMS change of the outputs on ``n_samples`` standard
    normal inputs relative to the RMS of the original outputs (1 if those are
    all zero); the strategy rescales the change to that size and checks it on
    the samples before returning (``assume`` rejects a dead direction).
    Only the channels the change touches move: one channel for an entry or
    bias change.  Weights come back as float64.
    """
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    from hypothesis import assume

    rng = np.random.default_rng(draw(_seeds))
    layers_ = model.layers
    last = layers_[-1]
    x = rng.normal(size=(n_samples, model.in_features))
    z = x if len(layers_) == 1 else np.asarray(Sequential(*layers_[:-1])(x), dtype=float)
    fx = np.asarray(model(x), dtype=float)
    scale = _rms(fx) or 1.0
    size = float(np.exp(draw(st.floats(np.log(min_size), np.log(max_size))))) if min_size < max_size else min_size
    kinds = ("entry", "bias", "unit") if isinstance(last, Bilinear) else ("entry", "bias")
    kind = draw(st.sampled_from(kinds))
    w = _floats(last)
    out = last.out_features
    o = draw(st.integers(0, out - 1))
    sign = rng.choice([-1.0, 1.0])
    if kind == "unit":
        d = last.in_features
        l, r = rng.normal(size=d) / np.sqrt(d), rng.normal(size=d) / np.sqrt(d)
        lb = None if w["left_bias"] is None else rng.normal()
        rb = None if w["right_bias"] is None else rng.normal()
        u = (z @ l + (lb or 0.0)) * (z @ r + (rb or 0.0))
        v = rng.normal(size=out)
        change = _rms(np.outer(u, v))
        assume(change > 0)
        v *= size * scale / change
        w["left"], w["right"] = np.vstack([w["left"], l]), np.vstack([w["right"], r])
        w["down"] = np.hstack([w["down"], v[:, None]])
        if lb is not None:
            w["left_bias"] = np.append(w["left_bias"], lb)
        if rb is not None:
            w["right_bias"] = np.append(w["right_bias"], rb)
    else:
        if kind == "bias":
            j, direction, target = None, np.ones(n_samples), "bias" if isinstance(last, Linear) else "down_bias"
        elif isinstance(last, Linear):
            j = draw(st.integers(0, last.in_features - 1))
            direction, target = z[:, j], "weight"
        else:
            j = draw(st.integers(0, last.hidden - 1))
            lb = 0.0 if w["left_bias"] is None else w["left_bias"][j]
            rb = 0.0 if w["right_bias"] is None else w["right_bias"][j]
            direction, target = (z @ w["left"][j] + lb) * (z @ w["right"][j] + rb), "down"
        change = float(np.sqrt(np.sum(np.square(direction)) / (n_samples * out)))
        assume(change > 0)
        delta = sign * size * scale / change
        if j is None:
            w[target] = (np.zeros(out) if w[target] is None else w[target])
            w[target][o] += delta
        else:
            w[target][o, j] += delta
    new_last = last.replace(**w)
    layers_f = [layer.replace(**_floats(layer)) for layer in layers_[:-1]]
    perturbed = Sequential(*layers_f, new_last) if isinstance(model, Sequential) else new_last
    moved = _rms(np.asarray(perturbed(x), dtype=float) - fx) / scale
    assume(moved >= 0.5 * size)
    return perturbed
