"""Tensor-based model components: Linear, Bilinear and Sequential.

Weights use torch's (out, in) layout and are stored as float64 numpy arrays
(numpy object arrays of Fractions or sympy numbers are kept as they are, for
exact arithmetic).  Every component is a polynomial in its input and is held as
a :class:`~tsalgebra.expr.Network` over the padded input x~ = [1; x]: biases
are column 0 of a weight matrix, and every width carries a constant channel 0
that stays 1.  A residual block folds into extra hidden units computing
x_i * 1, so the engine never meets a special case.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np

from .engine import _is_torch, evaluate
from .expr import Network, Tensor

__all__ = ["Component", "Linear", "Bilinear", "Sequential"]


def _as_array(value: Any, what: str, layer: str, rank: int) -> np.ndarray:
    """Validate and convert one weight to a numpy array of the given rank."""
    if _is_torch(value):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype != object:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{layer}: {what} has dtype {arr.dtype}, expected real numbers")
        arr = arr.astype(np.float64)
    if arr.ndim != rank:
        expect = "a 2-D (out, in) matrix" if rank == 2 else "a 1-D vector"
        raise ValueError(f"{layer}: {what} has rank {arr.ndim} (shape {arr.shape}), expected {expect}")
    if 0 in arr.shape:
        raise ValueError(f"{layer}: {what} is empty (shape {arr.shape})")
    if arr.dtype != object and not np.isfinite(arr).all():
        raise ValueError(f"{layer}: {what} contains NaN or Inf entries")
    return arr


def _bias(value: Any, size: int, what: str, layer: str) -> np.ndarray | None:
    if value is None:
        return None
    b = _as_array(value, what, layer, 1)
    if b.shape[0] != size:
        raise ValueError(f"{layer}: {what} has length {b.shape[0]}, expected {size}")
    return b


def _zeros(shape: tuple[int, ...], exact: bool) -> np.ndarray:
    return np.full(shape, 0, dtype=object) if exact else np.zeros(shape)


def _same_fields(x: Any, y: Any) -> bool:
    """Equal values field by field: arrays by shape and entries, dicts by
    key, names ignored."""
    if isinstance(x, dict) and isinstance(y, dict):
        keys = set(x) - {"name"}
        return keys == set(y) - {"name"} and all(_same_fields(x[k], y[k]) for k in keys)
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape
                and bool(np.all(x == y)))
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_same_fields(a, b) for a, b in zip(x, y))
    return bool(x == y)


class Component(ABC):
    """A polynomial map from R^in to R^out held as a tensor network."""

    in_features: int
    out_features: int

    @property
    @abstractmethod
    def degree(self) -> int:
        """Number of copies of x~ in the expression (the polynomial degree bound)."""

    @abstractmethod
    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        """The expression.  With ``symmetric=True`` every bilinear node is
        replaced by its symmetrization (same function, hidden width doubled),
        which makes the swap of its two inputs an exact symmetry that the
        network declares.  ``tag`` is appended to tensor and leg names.
        ``data=False``: shapes and declared symmetries only, for planning
        (a component whose tensors are large does not form them)."""

    @property
    def expression(self) -> Network:
        """The model's tensor network over x~ (see :meth:`network`)."""
        return self.network()

    @property
    def exact(self) -> bool:
        """True when the weights are exact numbers (object arrays)."""
        return any(w.dtype == object for w in self.weights())

    @abstractmethod
    def weights(self) -> list[np.ndarray]:
        """Every weight array (for hashing, equality and dtype checks)."""

    @abstractmethod
    def map_weights(self, fn: Callable[[np.ndarray], Any]) -> "Component":
        """The same architecture with ``fn`` applied to every weight array
        (e.g. to convert dtypes); the input is not modified."""

    @property
    def layers(self) -> tuple["Component", ...]:
        return (self,)

    def __call__(self, x: Any) -> Any:
        """Evaluate on a batch (n, in) or one sample (in,), by contracting the
        expression; numpy in gives numpy out, torch in gives torch out."""
        single = len(x.shape) == 1
        if single:
            x = x[None]
        if len(x.shape) != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self!r} takes inputs of shape (n, {self.in_features}), got {tuple(x.shape)}")
        out = evaluate(self.expression, x)[:, 1:]
        return out[0] if single else out

    def same_weights(self, other: "Component") -> bool:
        """True when ``other`` has the same structure and exactly equal weights
        (every field but the name: a left bias and an equal right bias differ)."""
        if type(self) is not type(other) or len(self.layers) != len(other.layers):
            return False
        return all(type(a) is type(b) and _same_fields(vars(a), vars(b)) for a, b in zip(self.layers, other.layers))


class Linear(Component):
    """y = weight @ x + bias, weight of shape (out, in)."""

    def __init__(self, weight: Any, bias: Any = None, *, name: str = "Linear") -> None:
        self.name = name
        self.weight = _as_array(weight, "weight", name, 2)
        self.out_features, self.in_features = self.weight.shape
        self.bias = _bias(bias, self.out_features, "bias", name)

    @property
    def degree(self) -> int:
        return 1

    def weights(self) -> list[np.ndarray]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def map_weights(self, fn: Callable[[np.ndarray], Any]) -> "Linear":
        return Linear(fn(self.weight), None if self.bias is None else fn(self.bias), name=self.name)

    def padded(self) -> np.ndarray:
        """W~ of shape (out+1, in+1): [[1, 0], [bias, weight]]."""
        o, d = self.weight.shape
        w = _zeros((o + 1, d + 1), self.exact)
        w[0, 0] = 1
        w[1:, 1:] = self.weight
        if self.bias is not None:
            w[1:, 0] = self.bias
        return w

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        w = Tensor.of(f"W{tag}", (f"o{tag}", f"i{tag}"), self.padded())
        net = Network((w,), (f"i{tag}",), (f"o{tag}",))
        return net if data else net.shapes_only()

    def __repr__(self) -> str:
        return f"{self.name}({self.in_features} -> {self.out_features}{', bias' if self.bias is not None else ''})"


class Bilinear(Component):
    """y = down @ ((left @ x + left_bias) * (right @ x + right_bias)) + down_bias,
    plus x when ``residual``.  left, right: (hidden, in); down: (out, hidden)."""

    def __init__(
        self,
        left: Any,
        right: Any,
        down: Any,
        left_bias: Any = None,
        right_bias: Any = None,
        down_bias: Any = None,
        residual: bool = False,
        *,
        name: str = "Bilinear",
    ) -> None:
        self.name = name
        self.left = _as_array(left, "left", name, 2)
        self.right = _as_array(right, "right", name, 2)
        self.down = _as_array(down, "down", name, 2)
        h, d = self.left.shape
        if self.right.shape != (h, d):
            raise ValueError(f"{name}: right has shape {self.right.shape} but left has {self.left.shape}")
        if self.down.shape[1] != h:
            raise ValueError(f"{name}: down has {self.down.shape[1]} columns but left/right have {h} hidden rows")
        self.in_features, self.hidden, self.out_features = d, h, self.down.shape[0]
        self.left_bias = _bias(left_bias, h, "left_bias", name)
        self.right_bias = _bias(right_bias, h, "right_bias", name)
        self.down_bias = _bias(down_bias, self.out_features, "down_bias", name)
        self.residual = bool(residual)
        if self.residual and self.out_features != d:
            raise ValueError(f"{name}: residual needs out == in, got out {self.out_features}, in {d}")

    @property
    def degree(self) -> int:
        return 2

    def weights(self) -> list[np.ndarray]:
        ws = [self.left, self.right, self.down]
        return ws + [b for b in (self.left_bias, self.right_bias, self.down_bias) if b is not None]

    def map_weights(self, fn: Callable[[np.ndarray], Any]) -> "Bilinear":
        opt = lambda w: None if w is None else fn(w)  # noqa: E731
        return Bilinear(fn(self.left), fn(self.right), fn(self.down), opt(self.left_bias), opt(self.right_bias),
                        opt(self.down_bias), residual=self.residual, name=self.name)

    def padded_shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The shapes of (L~, R~, D~) in ``padded``."""
        h, d = self.left.shape
        units = 1 + h + (d if self.residual else 0)
        return (units, d + 1), (units, d + 1), (self.out_features + 1, units)

    def padded(self, out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               scales: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(L~, R~, D~) with B~[o,i,j] = sum_u D~[o,u] L~[u,i] R~[u,j] on x~.

        Hidden unit 0 computes 1 * 1 and carries the down bias and the
        constant output channel; units 1..h are the layer's own, their biases
        in column 0; with a residual, d more units compute x_i * 1.  Written
        into ``out`` when given: three zero-filled float arrays of the shapes
        ``padded_shapes`` gives (a caller can lay many models into one
        allocation); new arrays otherwise.  ``scales`` (float weights only):
        factors of L~, R~, D~ applied as they are written (one pass instead of
        two for a caller that normalizes them).
        """
        h, d = self.left.shape
        extra = d if self.residual else 0
        if out is None:
            L, R, D = (_zeros(shape, self.exact) for shape in self.padded_shapes())
        else:
            L, R, D = out
            if tuple(x.shape for x in out) != self.padded_shapes():
                raise ValueError(f"{self.name}: out has shapes {[x.shape for x in out]}, "
                                 f"padded needs {self.padded_shapes()}")
        if scales is not None and self.exact:
            raise ValueError(f"{self.name}: scales apply to float weights, not exact ones")
        sL, sR, sD = (1, 1, 1) if scales is None else (float(s) for s in scales)

        def put(dst: np.ndarray, src: np.ndarray, s: Any) -> None:
            if s == 1:
                dst[...] = src
            else:
                np.multiply(src, s, out=dst)
        L[0, 0], R[0, 0], D[0, 0] = sL, sR, sD
        if self.down_bias is not None:
            put(D[1:, 0], self.down_bias, sD)
        put(L[1 : h + 1, 1:], self.left, sL)
        put(R[1 : h + 1, 1:], self.right, sR)
        put(D[1:, 1 : h + 1], self.down, sD)
        if self.left_bias is not None:
            put(L[1 : h + 1, 0], self.left_bias, sL)
        if self.right_bias is not None:
            put(R[1 : h + 1, 0], self.right_bias, sR)
        for i in range(extra):
            L[h + 1 + i, 1 + i] = sL
            R[h + 1 + i, 0] = sR
            D[1 + i, h + 1 + i] = sD
        return L, R, D

    def padded_norms(self) -> tuple[float, float, float]:
        """Frobenius norms of (L~, R~, D~) from the weights, without forming
        them (float weights; inf or nan where a weight is not finite)."""
        extra = self.left.shape[1] if self.residual else 0

        def norm(*ws: np.ndarray | None) -> float:
            # einsum, not np.dot: a BLAS dot of this size wakes OpenBLAS's
            # other threads, which then spin for ~0.1 s; the batched engine
            # calls this just before its own threads start, and lost a core
            with np.errstate(over="ignore"):  # inf is the answer then
                sq = 1.0 + extra + sum(float(np.einsum("i,i->", w.ravel(), w.ravel())) for w in ws if w is not None)
            return float(np.sqrt(sq))

        return (norm(self.left, self.left_bias), norm(self.right, self.right_bias),
                norm(self.down, self.down_bias))

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        L, R, D = self.padded()
        if symmetric:
            # (B + B^swap) / 2 as one CP form of twice the width
            half = D / 2 if D.dtype != object else D * __import__("fractions").Fraction(1, 2)
            L, R, D = np.concatenate([L, R]), np.concatenate([R, L]), np.concatenate([half, half], axis=1)
        h, o, i0, i1 = f"h{tag}", f"o{tag}", f"i{tag}a", f"i{tag}b"
        tensors = (
            Tensor.of(f"D{tag}", (o, h), D),
            Tensor.of(f"L{tag}", (h, i0), L),
            Tensor.of(f"R{tag}", (h, i1), R),
        )
        declared = symmetric or bool(np.all(L == R))
        net = Network(tensors, (i0, i1), (o,), ((1, 0),) if declared else ())
        return net if data else net.shapes_only()

    def __repr__(self) -> str:
        flags = [f for f, on in (("residual", self.residual), ("biases", any(
            b is not None for b in (self.left_bias, self.right_bias, self.down_bias)))) if on]
        return f"{self.name}({self.in_features} -> {self.hidden} -> {self.out_features}{''.join(', ' + f for f in flags)})"


class Sequential(Component):
    """Layers applied in order; nested Sequentials are flattened."""

    def __init__(self, *layers: Component) -> None:
        flat: list[Component] = []
        for k, layer in enumerate(layers):
            if not isinstance(layer, Component):
                raise TypeError(f"Sequential: layer {k} is {type(layer).__name__}, not a tsalgebra component")
            flat.extend(layer.layers)
        if not flat:
            raise ValueError("Sequential: needs at least one layer")
        for k in range(1, len(flat)):
            a, b = flat[k - 1], flat[k]
            if a.out_features != b.in_features:
                raise ValueError(
                    f"Sequential: layer {k} ({b!r}) takes {b.in_features} inputs "
                    f"but layer {k - 1} ({a!r}) gives {a.out_features}"
                )
        self._layers = tuple(flat)
        self.in_features, self.out_features = flat[0].in_features, flat[-1].out_features

    @property
    def layers(self) -> tuple[Component, ...]:
        return self._layers

    @property
    def degree(self) -> int:
        return int(np.prod([layer.degree for layer in self._layers]))

    def weights(self) -> list[np.ndarray]:
        return [w for layer in self._layers for w in layer.weights()]

    def map_weights(self, fn: Callable[[np.ndarray], Any]) -> "Sequential":
        return Sequential(*(layer.map_weights(fn) for layer in self._layers))

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        net = self._layers[0].network(symmetric, f"{tag}1", data)
        for k, layer in enumerate(self._layers[1:], start=2):
            net = layer.network(symmetric, f"{tag}{k}", data).substitute(net)
        return net

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(repr(l) for l in self._layers) + ")"
