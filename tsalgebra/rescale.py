"""Models at a canonical scale, so that float64 neither overflows nor underflows.

A cosine is blind to a model's scale and to its rescaling symmetries; float64
is not: weights scaled by 1e52 overflow the fourth moments of one bilinear
layer, and a hidden unit rescaled by 1e80 (left x 1e80, down / 1e80: the same
function) loses every digit in the sums that mix it with its neighbours.
:func:`canonical` returns the same function as f = exp(log_scale) f', where
in f' every layer is balanced and of unit scale:

- each hidden unit's (or head's) input maps have unit norm, the product of
  their norms moved into its output map (a rescaling symmetry: exact);
- each non-residual layer's output map has rows of unit norm on average
  (root mean square), its scale carried into
  the next layer's input columns (the constant channel is not scaled); a
  residual layer keeps its input's scale (its skip fixes it);
- the last layer's scale is ``log_scale`` (a natural logarithm, so that
  scales beyond float64 are held).

Every product is formed in the log domain, so no intermediate overflows.
Functional, symmetric and network inner products all scale as
<f, g> = exp(la + lb) <f', g'>, and a cosine not at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .attention import BilinearAttention
from .components import Bilinear, Component, Linear, PositionWise, Sequential

__all__ = ["canonical", "without_output_bias"]


def _log_norms(rows: list[np.ndarray | None], scale: list[float]) -> np.ndarray:
    """log || [r_1 * e^{s_1}, r_2 * e^{s_2}, ...] || over the last axes of
    each block (one norm per leading index), without forming e^{s}."""
    terms = []
    for r, s in zip(rows, scale):
        if r is None:
            continue
        axes = tuple(range(1, r.ndim))
        big = np.max(np.abs(r), axis=axes) if axes else np.abs(r)  # divided out first: 1e200 squared overflows
        safe = np.where(big > 0, big, 1.0)
        scaled = r / (safe.reshape(safe.shape + (1,) * len(axes)))
        sq = np.sum(scaled * scaled, axis=axes) if axes else scaled * scaled
        with np.errstate(divide="ignore"):
            terms.append(np.where(big > 0, np.log(safe) + np.log(np.maximum(sq, 1e-300)) / 2, -np.inf) + s)
    return np.logaddexp.reduce(np.stack(terms), axis=0)


def _log_norm(x: np.ndarray) -> float:
    """log ||x|| (Frobenius) without overflow, -inf for all zeros: one pass
    for the largest entry and one product of x / top with itself (no
    logarithm of every entry: at an embedding's width that took 60 ms)."""
    top = max(float(np.max(x)), -float(np.min(x)))
    if top == 0.0:
        return -np.inf
    y = x.ravel() / top
    return float(np.log(top) + 0.5 * np.log(np.dot(y, y)))


def _log_rms(parts: list[tuple[np.ndarray | None, Any]], rows: int) -> float:
    """log of the root-mean-square row norm of the blocks side by side, each
    array x times e^{f} (f broadcast against x), without forming e^{f}: the
    output scale that leaves the average output channel at unit norm. 0.0 for
    an all-zero map."""
    logs = []  # twice the log norm of each block
    with np.errstate(divide="ignore", invalid="ignore"):  # an infinite entry: a NaN here, 0.0 below
        for x, f in parts:
            if x is None or not x.size:
                continue
            if np.ndim(f) == 0:  # one scale for the block
                logs.append(2 * (_log_norm(x) + f))
            else:
                every = (np.log(np.abs(x)) + f).ravel()
                top = np.max(every)
                logs.append(2 * top + np.log(np.sum(np.exp(2 * (every - top)))) if np.isfinite(top) else -np.inf)
        total = np.logaddexp.reduce(logs) if logs else -np.inf
    if not np.isfinite(total):
        return 0.0
    return float(0.5 * total - 0.5 * np.log(rows))


_EXP_SAFE = 700.0  # |f| below which e^f is a normal float64 (e^709.78 overflows, e^-708.4 is subnormal)


def _times(x: np.ndarray | None, log_factor: Any, axis: int = 0) -> np.ndarray | None:
    """x * e^{log_factor} along ``axis`` (finite where the result is)."""
    if x is None:
        return None
    f = np.where(np.isfinite(log_factor), log_factor, -np.inf)
    if np.ndim(f):
        shape = [1] * x.ndim
        shape[axis] = -1
        f = np.reshape(f, shape)
    if np.all(np.abs(f[np.isfinite(f)]) < _EXP_SAFE):
        return x * np.exp(f)
    # e^f alone overflows (or underflows) where x e^f need not: a subnormal weight
    # brought to unit scale is 5e-324 * e^744; taken as two halves
    return x * np.exp(f / 2) * np.exp(f - f / 2)


def _bilinear(layer: Bilinear, c_in: float) -> tuple[Bilinear, float]:
    """Balance the hidden units of ``layer`` reading an input held at scale
    e^{c_in}; returns the layer and its output scale."""
    ln_l = _log_norms([layer.left_bias, layer.left], [0.0, c_in])
    ln_r = _log_norms([layer.right_bias, layer.right], [0.0, c_in])
    unit = ln_l + ln_r  # each hidden unit's product scale, moved into down
    left, right = _times(layer.left, c_in - ln_l), _times(layer.right, c_in - ln_r)
    left_bias, right_bias = _times(layer.left_bias, -ln_l), _times(layer.right_bias, -ln_r)
    if layer.residual:
        c_out = c_in
    else:
        c_out = _log_rms([(layer.down, unit[None, :]), (layer.down_bias, 0.0)], layer.down.shape[0])
    down = _times(layer.down, unit - c_out, axis=1)
    down_bias = _times(layer.down_bias, -c_out)
    return layer.replace(left=left, right=right, down=down, left_bias=left_bias, right_bias=right_bias,
                         down_bias=down_bias), c_out  # type: ignore[return-value]


def _linear(layer: Linear, c_in: float) -> tuple[Linear, float]:
    c_out = _log_rms([(layer.weight, c_in), (layer.bias, 0.0)], layer.weight.shape[0])
    w = {"weight": _times(layer.weight, c_in - c_out)}
    if layer.bias is not None:
        w["bias"] = _times(layer.bias, -c_out)
    return layer.replace(**w), c_out  # type: ignore[return-value]


def _attention(layer: BilinearAttention, c_in: float) -> tuple[BilinearAttention, float]:
    """Per head: each projection block (with its bias) of unit norm, the
    product of the five norms moved into the head's output map; v and o
    balanced per value dimension (rotary leaves values alone)."""
    w = layer.named_weights()
    head_scale = np.zeros(layer.heads)
    for k in ("q1", "k1", "q2", "k2", "v"):
        M, b = w[k], w[f"{k}_bias"]
        ln = _log_norms([b, M], [0.0, c_in])  # per head
        head_scale = head_scale + ln
        w[k] = _times(M, c_in - ln)
        w[f"{k}_bias"] = _times(b, -ln)
    o = w["o"]  # (heads, d_out, dv)
    if layer.residual:
        c_out = c_in
    else:
        c_out = _log_rms([(o, head_scale[:, None, None]), (w["o_bias"], 0.0)], o.shape[1])
    w["o"] = _times(o, head_scale - c_out)
    w["o_bias"] = _times(w["o_bias"], -c_out)
    return layer.replace(**w), c_out  # type: ignore[return-value]


def _layer(layer: Component, c_in: float) -> tuple[Component, float] | None:
    if isinstance(layer, PositionWise):
        inner = _layer(layer.layer, c_in)
        return None if inner is None else (PositionWise(inner[0], layer.n_ctx, name=layer.name), inner[1])
    if isinstance(layer, Bilinear):
        return _bilinear(layer, c_in)
    if isinstance(layer, Linear):
        return _linear(layer, c_in)
    if isinstance(layer, BilinearAttention):
        return _attention(layer, c_in)
    return None


def canonical(model: Any) -> tuple[Any, float]:
    """(f', log_scale) with f = exp(log_scale) f' (see the module docstring);
    ``model`` itself and 0.0 for models it does not rescale (exact weights,
    bare networks, layers of other kinds)."""
    if not isinstance(model, Component) or model.exact:
        return model, 0.0
    if any(w.dtype == object for w in model.weights()):  # a mixed model (exact beside float weights): float64
        try:
            model = model.map_weights(lambda w: np.asarray(w, dtype=float) if w.dtype == object else w)
        except (TypeError, ValueError, OverflowError):  # symbols, or beyond float64: left as it is
            return model, 0.0
    layers, c = [], 0.0
    for layer in model.layers:
        done = _layer(layer, c)
        if done is None:
            return model, 0.0
        layers.append(done[0])
        c = done[1]
    if len(layers) == 1 and not isinstance(model, Sequential):
        return layers[0], c
    return Sequential(*layers), c


def without_output_bias(model: Any) -> Any:
    """``model`` less the bias its last layer adds to every output (a Linear's
    bias, a Bilinear's down bias, an attention's output bias, position-wise
    or not), for centred products: a covariance is blind to a constant added
    to the outputs, and float64 is not (the means subtracted are of the
    constant's size: an output bias of 1e7 took 9 of 16 digits).  ``model``
    itself when it has no such bias or is not built of layers."""
    if isinstance(model, Sequential):
        last = without_output_bias(model.layers[-1])
        return model if last is model.layers[-1] else Sequential(*model.layers[:-1], last)
    if isinstance(model, PositionWise):
        inner = without_output_bias(model.layer)
        return model if inner is model.layer else PositionWise(inner, model.n_ctx, name=model.name)
    field = {Linear: "bias", Bilinear: "down_bias", BilinearAttention: "o_bias"}
    for kind, name in field.items():
        if isinstance(model, kind) and getattr(model, name) is not None:
            return model.replace(**{name: None})
    return model
