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
from typing import Any, Callable, ClassVar, Union

import numpy as np

from .arrays import exact_float64, is_torch, torch_to_numpy
from .engine import evaluate
from .expr import Network, Tensor

__all__ = ["Component", "Embedding", "Linear", "Bilinear", "PositionWise", "Sequential"]

_RANKS = {1: "a 1-D vector", 2: "a 2-D (out, in) matrix"}


def as_weight(value: Any, what: str, layer: str, rank: int) -> np.ndarray:
    """One weight validated and converted for the constructor of ``layer``: a
    numpy array of the given rank, nonempty and finite, float64 (object arrays
    of exact numbers keep their numbers), always a copy.  Errors name
    ``layer`` and ``what``."""
    if is_torch(value):
        try:
            value = torch_to_numpy(value)
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # a 'meta' tensor has no data
            raise TypeError(f"{layer}: {what} is a torch tensor without readable values "
                            f"(device {getattr(value, 'device', '?')}): {exc}") from None
    if isinstance(value, np.ma.MaskedArray):  # np.asarray would read the hidden values under the mask
        raise TypeError(f"{layer}: {what} is a masked array; fill its masked entries first (e.g. .filled(0))")
    arr = np.asarray(value)
    if arr.dtype == object:
        _check_exact_entries(arr, what, layer)
        arr = arr.copy()  # the layer's own, as float weights are (a later change to the caller's array must not reach it)
    else:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{layer}: {what} has dtype {arr.dtype}, expected real numbers")
        try:
            arr = exact_float64(arr)
        except TypeError as exc:
            raise TypeError(f"{layer}: {what}: {exc}") from None
    if arr.ndim != rank:
        expect = _RANKS.get(rank, f"a {rank}-D array")
        raise ValueError(f"{layer}: {what} has rank {arr.ndim} (shape {arr.shape}), expected {expect}")
    if 0 in arr.shape:
        raise ValueError(f"{layer}: {what} is empty (shape {arr.shape})")
    if arr.dtype != object and not np.isfinite(arr).all():
        raise ValueError(f"{layer}: {what} contains NaN or Inf entries")
    return arr


def _check_exact_entries(arr: np.ndarray, what: str, layer: str) -> None:
    """An object array holds finite numbers only (ints, Fractions, finite
    floats, sympy numbers or symbols), never strings, None, NaN or Inf."""
    import numbers

    for value in arr.flat:
        sympy_value = type(value).__module__.split(".")[0] == "sympy"  # sympy's oo and nan are numbers.Number too
        if sympy_value or isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Number, np.number)):
            if sympy_value:
                if value.has(*_sympy_infinities()):  # .has of one tuple matched nothing: zoo passed as exact, nan out
                    raise ValueError(f"{layer}: {what} contains an infinite or undefined entry")
                if getattr(value, "is_real", None) is False:  # sympy.I: a weight is real (a symbol may be either)
                    raise ValueError(f"{layer}: {what} contains a non-real entry ({value})")
                continue
            raise TypeError(f"{layer}: {what} holds {type(value).__name__} entries ({value!r}); expected numbers")
        if isinstance(value, (complex, np.complexfloating)):  # as a complex dtype is: else a complex 'exact' cosine
            raise TypeError(f"{layer}: {what} holds complex entries ({value!r}); expected real numbers")
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            raise ValueError(f"{layer}: {what} contains NaN or Inf entries")


def _sympy_infinities() -> Any:
    import sympy

    return (sympy.nan, sympy.zoo, sympy.oo, -sympy.oo)


def as_bias(value: Any, shape: tuple[int, ...], what: str, layer: str) -> np.ndarray | None:
    """An optional bias validated like :func:`as_weight` and checked against
    the ``shape`` the layer's other weights give it; None stays None (absent)."""
    if value is None:
        return None
    b = as_weight(value, what, layer, len(shape))
    if b.shape != shape:
        found = f"length {b.shape[0]}, expected {shape[0]}" if len(shape) == 1 else f"shape {b.shape}, expected {shape}"
        raise ValueError(f"{layer}: {what} has {found}")
    return b


def zeros(shape: int | tuple[int, ...], exact: bool) -> np.ndarray:
    """Zeros for weights of either kind: an object array of int 0 (exact), else float64."""
    return np.full(shape, 0, dtype=object) if exact else np.zeros(shape)


def all_exact(*arrays: np.ndarray | None) -> bool:
    """True when every given array (None: skipped) holds exact numbers, an
    object array: arithmetic on weights stays exact only then, and is float64
    as soon as one operand is float."""
    return all(a.dtype == object for a in arrays if a is not None)


def exact_entry(value: Any) -> bool:
    """True for an exact number (an int, a Fraction, a sympy rational or
    another sympy number without floats: sqrt(2)) or a symbolic entry (a
    sympy expression in symbols, which only exact arithmetic can carry); False
    for a float (Python's, numpy's, a sympy Float, or a number holding one)."""
    import numbers

    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (numbers.Rational, np.integer)):  # int, Fraction (numbers.Rational), numpy ints
        return True
    if type(value).__module__.split(".")[0] == "sympy":
        if getattr(value, "is_Float", False):
            return False
        if getattr(value, "free_symbols", None):
            return True  # symbolic: carried exactly whatever numbers it holds
        import sympy

        return not value.has(sympy.Float)
    return False


def exact_entries(a: np.ndarray) -> bool:
    """True when every entry of the object array ``a`` is exact (:func:`exact_entry`)."""
    return all(exact_entry(v) for v in a.flat)


def cast(a: np.ndarray | None, exact: bool) -> np.ndarray | None:
    """``a`` for arithmetic of the kind :func:`all_exact` chose: an exact
    array as it is, else a float64 copy; None stays None."""
    if a is None:
        return None
    return a if (exact and a.dtype == object) else a.astype(np.float64)


class Component(ABC):
    """A polynomial map from R^in to R^out held as a tensor network.

    A layer kind declares its constructor's fields once, in two class
    attributes that name them in a fixed order: ``weight_fields`` (arrays;
    biases may be absent, None) and ``setting_fields`` (the other arguments
    that shape the function: flags, sizes).  Each field is both a
    constructor keyword and an attribute, as is ``name`` (a label, no part of
    the function), so :meth:`named_weights`, :meth:`settings`,
    :meth:`weights`, :meth:`map_weights`, :meth:`replace` and
    :meth:`same_weights` need no per-kind code.
    """

    in_features: int
    out_features: int
    name: str
    weight_fields: ClassVar[tuple[str, ...]] = ()
    setting_fields: ClassVar[tuple[str, ...]] = ()

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

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every bias field, present or absent (an absent bias
        means zeros of this shape), in ``weight_fields`` order; none here: a
        kind with optional biases overrides this."""
        return {}

    @property
    def expression(self) -> Network:
        """The model's tensor network over x~ (see :meth:`network`)."""
        return self.network()

    @property
    def exact(self) -> bool:
        """True when every weight is exact: an object array whose entries are
        all exact numbers (ints, Fractions, sympy rationals or other exact
        sympy numbers) or symbolic expressions (see :func:`exact_entries`).
        A model that mixes exact weights with float ones (a float64 array, or
        a float entry in an object array) is not exact: its arithmetic is
        float64, as :func:`all_exact` rules for arithmetic on weights."""
        return all(w.dtype == object and exact_entries(w) for w in self.weights())

    def named_weights(self) -> dict[str, np.ndarray | None]:
        """Every weight field by name in ``weight_fields`` order, an absent
        bias as None (the dict is new; the arrays are the layer's own)."""
        return {k: getattr(self, k) for k in self.weight_fields}

    def settings(self) -> dict[str, Any]:
        """The constructor's other arguments that shape the function, by name
        (``setting_fields`` order), as the constructor takes them; not the name."""
        return {k: getattr(self, k) for k in self.setting_fields}

    def weights(self) -> list[np.ndarray]:
        """Every present weight array, in ``named_weights`` order (for
        hashing, equality and dtype checks)."""
        return [w for w in self.named_weights().values() if w is not None]

    def replace(self, **changes: Any) -> "Component":
        """A copy with the named fields (weights, settings or ``name``)
        replaced, built and validated by the constructor: a bad shape raises
        naming the layer.
        The copy is of the class that declares the fields (a subclass whose
        constructor takes other arguments comes back as that layer kind).
        Unknown field names raise TypeError."""
        fields = {**self.named_weights(), **self.settings(), "name": self.name}
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise TypeError(f"{self!r}: no fields {unknown} to replace; its fields are {list(fields)}")
        kind = next(c for c in type(self).__mro__ if "weight_fields" in vars(c))
        return kind(**{**fields, **changes})

    def map_weights(self, fn: Callable[[np.ndarray], Any]) -> "Component":
        """The same architecture with ``fn`` applied to every present weight
        array (e.g. to convert dtypes); the input is not modified."""
        return self.replace(**{k: fn(w) for k, w in self.named_weights().items() if w is not None})

    @property
    def layers(self) -> tuple["Component", ...]:
        return (self,)

    @property
    def token_input(self) -> tuple[int, int] | None:
        """(vocabulary, tokens) when the model reads tokens through an
        :class:`Embedding` (its input: that many one-hot vectors), else None."""
        first = self.layers[0]
        if isinstance(first, PositionWise) and isinstance(first.layer, Embedding):
            return first.layer.vocab, first.n_ctx
        if isinstance(first, Embedding):
            return first.vocab, 1
        return None

    @property
    def per_position_output(self) -> bool:
        """Whether the outputs are one vector per position (the last layer is
        position-wise, or attention): token ids in then give (batch, tokens,
        d_out) out, shaped as the torch module's."""
        return False

    @property
    def default_measure(self) -> Any:
        """The natural input measure of a model that reads tokens: independent
        uniform tokens over its vocabulary (a :class:`~tsalgebra.measure.Tokens`);
        None for models of real vectors."""
        tokens = self.token_input
        if tokens is None:
            return None
        from .measure import Tokens

        return Tokens(*tokens)

    def one_hot(self, ids: Any) -> Any:
        """Token ids (batch, tokens) or (tokens,) as the one-hot input (batch,
        tokens * vocab) of a model that reads tokens; other inputs as they are."""
        tokens = self.token_input
        kind = getattr(ids, "dtype", None)
        integer = kind is not None and (np.issubdtype(kind, np.integer) if not is_torch(ids) else
                                        not ids.is_floating_point() and not ids.is_complex())
        if tokens is None or not integer:
            return ids
        vocab, n = tokens
        arr = torch_to_numpy(ids) if is_torch(ids) else np.asarray(ids)
        single = arr.ndim == 1
        arr = arr[None] if single else arr
        if arr.ndim != 2 or arr.shape[1] != n:
            raise ValueError(f"{self!r} reads {n} token ids per sample, got ids of shape {tuple(arr.shape)}")
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            raise ValueError(f"{self!r}: token ids must lie in [0, {vocab}), got {arr.min()}..{arr.max()}")
        out = np.zeros((arr.shape[0], n * vocab))
        out[np.arange(arr.shape[0])[:, None], np.arange(n) * vocab + arr] = 1.0
        out = out[0] if single else out
        if is_torch(ids):
            import torch

            return torch.as_tensor(out)
        return out

    def __call__(self, x: Any) -> Any:
        """Evaluate on a batch (n, in) or one sample (in,), by contracting the
        expression; numpy in gives numpy out, torch in gives torch out.  A
        model that reads tokens also takes integer ids (batch, tokens)."""
        if isinstance(x, (list, tuple)):
            x = np.asarray(x)
        if not hasattr(x, "shape"):
            raise TypeError(f"{self!r} takes a numpy array or torch tensor of inputs, got {type(x).__name__}")
        ids, x = x, self.one_hot(x)
        tokens = x is not ids  # token ids in: a vector per token out where the outputs are per position
        single = len(x.shape) == 1
        if single:
            x = x[None]
        if len(x.shape) != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self!r} takes inputs of shape (n, {self.in_features}), got {tuple(x.shape)}")
        out = self.evaluate_flat(x)
        if tokens and self.per_position_output:
            n = self.token_input[1]  # type: ignore[index]
            out = out.reshape(out.shape[0], n, out.shape[1] // n)  # (an empty batch too)
        return out[0] if single else out

    def evaluate_flat(self, x: Any) -> Any:
        """The outputs (n, out_features) of a validated batch (n, in_features)."""
        return evaluate(self.expression, x)[:, 1:]

    def evaluator(self) -> Callable[[Any], Any]:
        """:meth:`evaluate_flat` with what it needs built once (the layer's
        network), for evaluating many batches."""
        expression = self.expression
        return lambda x: evaluate(expression, x)[:, 1:]

    def direct_flops(self, batch: int) -> float | None:
        """Flops of :meth:`evaluate_flat` on ``batch`` inputs where it does not
        contract the layer's network (None: it does, and the network's plan
        counts them)."""
        return None

    def direct_elements(self, batch: int) -> float | None:
        """Elements :meth:`evaluate_flat` holds at once besides its input and
        output, where it does not contract the layer's network (None: it does,
        and the network's plan gives its largest intermediate)."""
        return None

    def same_weights(self, other: "Component") -> bool:
        """True when ``other`` has the same structure (layer kinds and
        settings; names may differ) and exactly equal weights, field by field
        (a bias present on one side only is a difference)."""
        if type(self) is not type(other) or len(self.layers) != len(other.layers):
            return False
        for a, b in zip(self.layers, other.layers):
            if type(a) is not type(b):
                return False
            if a.settings() != b.settings():
                return False
            for x, y in zip(a.named_weights().values(), b.named_weights().values()):
                if (x is None) != (y is None) or x is not None and (x.shape != y.shape or not bool(np.all(x == y))):
                    return False
        return True


class Linear(Component):
    """y = weight @ x + bias, weight of shape (out, in).

    Fields: weights ``weight``, ``bias`` (absent: None); no settings."""

    weight_fields = ("weight", "bias")
    input_maps: ClassVar[tuple[tuple[str, str], ...]] = (("weight", "bias"),)  # (map, bias) pairs reading x
    output_map: ClassVar[tuple[str, str]] = ("weight", "bias")  # the (map, bias) pair writing y

    def __init__(self, weight: Any, bias: Any = None, *, name: str = "Linear") -> None:
        self.name = name
        self.weight = as_weight(weight, "weight", name, 2)
        self.out_features, self.in_features = self.weight.shape
        self.bias = as_bias(bias, self.bias_shapes()["bias"], "bias", name)

    @property
    def degree(self) -> int:
        return 1

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"bias": (self.out_features,)}

    def with_residual(self) -> "Linear":
        """The layer computing x + self(x) (out == in): weight + I."""
        if self.out_features != self.in_features:
            raise ValueError(f"{self.name}: a residual needs out == in, got {self.in_features} -> {self.out_features}")
        eye = np.eye(self.in_features, dtype=int).astype(object if self.exact else np.float64)
        return self.replace(weight=self.weight + eye)  # type: ignore[return-value]

    def padded(self) -> np.ndarray:
        """W~ of shape (out+1, in+1): [[1, 0], [bias, weight]]."""
        o, d = self.weight.shape
        w = zeros((o + 1, d + 1), self.exact)
        w[0, 0] = 1
        w[1:, 1:] = self.weight
        if self.bias is not None:
            w[1:, 0] = self.bias
        return w

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        return _linear_expression(self.padded() if data else (self.out_features + 1, self.in_features + 1), tag)

    def __repr__(self) -> str:
        return f"{self.name}({self.in_features} -> {self.out_features}{', bias' if self.bias is not None else ''})"


class Bilinear(Component):
    """y = down @ ((left @ x + left_bias) * (right @ x + right_bias)) + down_bias,
    plus x when ``residual``.  left, right: (hidden, in); down: (out, hidden).

    Fields: weights ``left``, ``right``, ``down``, ``left_bias``,
    ``right_bias``, ``down_bias`` (absent biases: None); setting
    ``residual``."""

    weight_fields = ("left", "right", "down", "left_bias", "right_bias", "down_bias")
    setting_fields = ("residual",)
    input_maps: ClassVar[tuple[tuple[str, str], ...]] = (("left", "left_bias"), ("right", "right_bias"))
    output_map: ClassVar[tuple[str, str]] = ("down", "down_bias")

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
        self.left = as_weight(left, "left", name, 2)
        self.right = as_weight(right, "right", name, 2)
        self.down = as_weight(down, "down", name, 2)
        h, d = self.left.shape
        if self.right.shape != (h, d):
            raise ValueError(f"{name}: right has shape {self.right.shape} but left has {self.left.shape}")
        if self.down.shape[1] != h:
            raise ValueError(f"{name}: down has {self.down.shape[1]} columns but left/right have {h} hidden rows")
        self.in_features, self.hidden, self.out_features = d, h, self.down.shape[0]
        shapes = self.bias_shapes()
        self.left_bias = as_bias(left_bias, shapes["left_bias"], "left_bias", name)
        self.right_bias = as_bias(right_bias, shapes["right_bias"], "right_bias", name)
        self.down_bias = as_bias(down_bias, shapes["down_bias"], "down_bias", name)
        self.residual = bool(residual)
        if self.residual and self.out_features != d:
            raise ValueError(f"{name}: residual needs out == in, got out {self.out_features}, in {d}")

    @property
    def degree(self) -> int:
        return 2

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"left_bias": (self.hidden,), "right_bias": (self.hidden,), "down_bias": (self.out_features,)}

    def unfolded(self) -> "Bilinear":
        """The same function without the residual flag: the skip ``+ x``
        becomes d extra hidden units computing x_i * 1 (left rows e_i with
        left bias 0, right rows 0 with right bias 1, down columns e_i), read
        off :meth:`padded`, which already folds the residual this way; so the
        padded factorization is unchanged.  A non-residual layer is returned
        as is.  Exact weights stay exact; an absent left or down bias stays
        absent (the right bias carries the units' 1s)."""
        if not self.residual:
            return self
        L, R, D = self.padded()
        return self.replace(left=L[1:, 1:], right=R[1:, 1:], down=D[1:, 1:],  # type: ignore[return-value]
                            left_bias=None if self.left_bias is None else L[1:, 0], right_bias=R[1:, 0],
                            residual=False)

    def with_residual(self) -> "Bilinear":
        """The layer computing x + self(x) (out == in) as one Bilinear: the
        residual flag, after :meth:`unfolded` makes a skip the layer already
        has explicit."""
        if self.out_features != self.in_features:
            raise ValueError(f"{self.name}: a residual needs out == in, got {self.in_features} -> {self.out_features}")
        return self.unfolded().replace(residual=True)  # type: ignore[return-value]

    def padded_shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The shapes of (L~, R~, D~) in ``padded``."""
        h, d = self.left.shape
        return _bilinear_shapes(h, d, self.out_features, self.residual)

    def left_is_right(self) -> bool:
        """True when L~ == R~ (equal maps and biases, no residual units): the
        swap of the two inputs is then an exact symmetry without symmetrizing."""
        same = lambda x, y: x is y or x is not None and y is not None and bool(np.all(x == y))  # noqa: E731
        return not self.residual and same(self.left, self.right) and (
            self.left_bias is None and self.right_bias is None or same(self.left_bias, self.right_bias))

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
            L, R, D = (zeros(shape, self.exact) for shape in self.padded_shapes())
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
        declared = symmetric or self.left_is_right()
        if not data:
            return _bilinear_expression(self.padded_shapes(), tag, symmetric, declared)
        L, R, D = self.padded()
        if symmetric:
            # (B + B^swap) / 2 as one CP form of twice the width
            half = D / 2 if D.dtype != object else D * __import__("fractions").Fraction(1, 2)
            L, R, D = np.concatenate([L, R]), np.concatenate([R, L]), np.concatenate([half, half], axis=1)
        return _bilinear_expression((L, R, D), tag, False, declared)

    def __repr__(self) -> str:
        flags = [f for f, on in (("residual", self.residual), ("biases", any(
            b is not None for b in (self.left_bias, self.right_bias, self.down_bias)))) if on]
        return f"{self.name}({self.in_features} -> {self.hidden} -> {self.out_features}{''.join(', ' + f for f in flags)})"


def _linear_expression(W: np.ndarray | tuple[int, int], tag: str) -> Network:
    """The network of a padded linear map W~ (an array, or its shape alone)."""
    legs = (f"o{tag}", f"i{tag}")
    w = Tensor.of(f"W{tag}", legs, W) if isinstance(W, np.ndarray) else Tensor(f"W{tag}", legs, W)
    return Network((w,), (f"i{tag}",), (f"o{tag}",))


def _bilinear_shapes(h: int, d: int, o: int, residual: bool) -> tuple[tuple[int, int], ...]:
    """Shapes of (L~, R~, D~): unit 0 for the constant, h units, d residual units."""
    units = 1 + h + (d if residual else 0)
    return (units, d + 1), (units, d + 1), (o + 1, units)


def _bilinear_expression(LRD: tuple[Any, Any, Any], tag: str, symmetrize_shapes: bool, declared: bool) -> Network:
    """The network of padded factors (L~, R~, D~), arrays or shapes alone
    (``symmetrize_shapes``: the shapes of the symmetrized form, twice the units)."""
    L, R, D = LRD
    if symmetrize_shapes:
        L, R, D = (2 * L[0], L[1]), (2 * R[0], R[1]), (D[0], 2 * D[1])
    h, o, i0, i1 = f"h{tag}", f"o{tag}", f"i{tag}a", f"i{tag}b"
    make = lambda name, legs, x: Tensor.of(name, legs, x) if isinstance(x, np.ndarray) else Tensor(name, legs, x)  # noqa: E731
    tensors = (make(f"D{tag}", (o, h), D), make(f"L{tag}", (h, i0), L), make(f"R{tag}", (h, i1), R))
    return Network(tensors, (i0, i1), (o,), ((1, 0),) if declared else ())


class Embedding(Linear):
    """A token embedding: token t maps to column t of ``weight`` (d, vocab),
    a Linear layer (without bias) on the token's one-hot vector.  A model
    whose first layer is one (or a :class:`PositionWise` one) takes integer
    token ids too, and carries the token measure over its vocabulary as its
    default (:attr:`Component.default_measure`).  Fields: ``weight``."""

    weight_fields = ("weight",)

    def __init__(self, weight: Any, *, name: str = "Embedding") -> None:
        super().__init__(weight, None, name=name)

    @property
    def vocab(self) -> int:
        return self.in_features

    def __repr__(self) -> str:
        return f"{self.name}({self.vocab} tokens -> {self.out_features})"


AffineLayer = Union[Linear, Bilinear]


def _affine_operands(layer: AffineLayer, weight: np.ndarray, bias: np.ndarray | None
                     ) -> tuple[AffineLayer, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(layer with any residual unfolded, W, b, its weights by name), all cast
    to one kind of number: exact when every operand is (see :func:`all_exact`)."""
    if isinstance(layer, Bilinear):
        layer = layer.unfolded()  # the skip reads the input and is part of the output
    exact = all_exact(weight, bias, *layer.weights())
    weights = {k: cast(v, exact) for k, v in layer.named_weights().items()}
    return layer, cast(weight, exact), cast(bias, exact), weights  # type: ignore[return-value]


def precompose(layer: AffineLayer, weight: np.ndarray, bias: np.ndarray | None = None) -> AffineLayer:
    """``layer`` applied to ``weight @ x + bias``, as one layer of its kind:
    every input map A and its bias a become A W and a + A b.  A residual
    Bilinear is unfolded first.  Exact when the layer and the map are (see
    :func:`all_exact`), float64 otherwise."""
    layer, W, b, w = _affine_operands(layer, weight, bias)
    for A, a in layer.input_maps:
        if b is not None:
            w[a] = w[A] @ b if w[a] is None else w[a] + w[A] @ b
        w[A] = w[A] @ W
    return layer.replace(**w)  # type: ignore[return-value]


def postcompose(layer: AffineLayer, weight: np.ndarray, bias: np.ndarray | None = None) -> AffineLayer:
    """``weight @ layer(x) + bias`` as one layer of ``layer``'s kind: the
    output map D and its bias d become W D and W d + b.  A residual Bilinear
    is unfolded first.  Exact when the layer and the map are, float64
    otherwise."""
    layer, W, b, w = _affine_operands(layer, weight, bias)
    D, d = layer.output_map
    w[D], w[d] = W @ w[D], None if w[d] is None else W @ w[d]
    if b is not None:
        w[d] = b if w[d] is None else w[d] + b
    return layer.replace(**w)  # type: ignore[return-value]


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
    def per_position_output(self) -> bool:
        return self._layers[-1].per_position_output

    def evaluate_flat(self, x: Any) -> Any:
        """Layer by layer: each layer's own expression is far smaller than the
        composed one (a 2-layer attention model at d_model 128 evaluates ten
        times faster so)."""
        for layer in self._layers:
            x = layer.evaluate_flat(x)
        return x

    @property
    def degree(self) -> int:
        return int(np.prod([layer.degree for layer in self._layers]))

    def named_weights(self) -> dict[str, np.ndarray | None]:
        """Every layer's weight fields, layer by layer, named
        ``"<layer index>.<field>"`` (e.g. ``"0.left"``, ``"1.bias"``)."""
        return {f"{k}.{n}": w for k, layer in enumerate(self._layers) for n, w in layer.named_weights().items()}

    def settings(self) -> dict[str, Any]:
        """Every layer's settings, named like :meth:`named_weights` (the
        layers' names can be replaced as ``"<layer index>.name"``)."""
        return {f"{k}.{n}": v for k, layer in enumerate(self._layers) for n, v in layer.settings().items()}

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"{k}.{n}": s for k, layer in enumerate(self._layers) for n, s in layer.bias_shapes().items()}

    def replace(self, **changes: Any) -> "Sequential":
        """A Sequential with fields of its layers replaced, named
        ``"<layer index>.<field>"`` (pass them as ``**{"0.left": w}``); each
        changed layer is rebuilt by its own :meth:`Component.replace`."""
        per_layer: list[dict[str, Any]] = [{} for _ in self._layers]
        for key, value in changes.items():
            index, _, field = key.partition(".")
            if not (index.isdigit() and int(index) < len(self._layers) and field):
                raise TypeError(f"{self!r}: no field {key!r} to replace; fields are named "
                                f"'<layer index>.<field>' with indices 0..{len(self._layers) - 1}")
            per_layer[int(index)][field] = value
        return Sequential(*(layer.replace(**c) if c else layer for layer, c in zip(self._layers, per_layer)))

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        net = self._layers[0].network(symmetric, f"{tag}1", data)
        for k, layer in enumerate(self._layers[1:], start=2):
            net = layer.network(symmetric, f"{tag}{k}", data).substitute(net)
        return net

    def __repr__(self) -> str:
        return "Sequential(" + ", ".join(repr(l) for l in self._layers) + ")"


class PositionWise(Component):
    """A Linear or Bilinear ``layer`` applied at each of ``n_ctx`` positions of
    a flat, position-major sequence (``n_ctx`` blocks of the layer's input).

    The layer is held once.  As one flat layer it is block-diagonal with tiled
    biases (:meth:`flat`), which is formed only where an algorithm needs the
    whole network with data (pairing orbits, quadrature: small models); the
    attention algorithms, planning (``network(data=False)``) and evaluation
    read the layer itself, so an embedding from a 4,096-token vocabulary over
    64 positions never becomes a 16,385 x 262,145 matrix.  Fields: the
    layer's, and the setting ``n_ctx``."""

    def __init__(self, layer: Component, n_ctx: int, *, name: str | None = None) -> None:
        if not isinstance(layer, (Linear, Bilinear)):
            raise TypeError(f"PositionWise takes a Linear or Bilinear layer, not {layer!r}")
        if int(n_ctx) < 1:
            raise ValueError(f"{layer.name}: n_ctx must be positive, got {n_ctx}")
        self.layer, self.n_ctx = layer, int(n_ctx)
        self.name = name or f"{layer.name} x{self.n_ctx}"
        self.in_features, self.out_features = self.n_ctx * layer.in_features, self.n_ctx * layer.out_features
        self._flat: Component | None = None

    @property
    def per_position_output(self) -> bool:
        return True

    @property
    def degree(self) -> int:
        return self.layer.degree

    def named_weights(self) -> dict[str, np.ndarray | None]:
        """The layer's own weights (one position's)."""
        return self.layer.named_weights()

    def settings(self) -> dict[str, Any]:
        return {**self.layer.settings(), "n_ctx": self.n_ctx}

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.layer.bias_shapes()

    def replace(self, **changes: Any) -> "PositionWise":
        n_ctx, name = changes.pop("n_ctx", self.n_ctx), changes.pop("name", None)
        return PositionWise(self.layer.replace(**changes) if changes else self.layer, n_ctx, name=name)

    def flat(self) -> Component:
        """The flat layer on the whole sequence: block-diagonal weights, tiled
        biases (formed once, on first use)."""
        if self._flat is None:
            n, layer = self.n_ctx, self.layer
            kron = lambda w: np.kron(np.eye(n, dtype=int).astype(w.dtype), w)  # noqa: E731
            biases = layer.bias_shapes()
            tiled = {k: None if w is None else np.tile(w, n) if k in biases else kron(w)
                     for k, w in layer.named_weights().items()}
            self._flat = layer.replace(**tiled, name=self.name)
        return self._flat

    def flat_padded_shapes(self) -> tuple[str, tuple[tuple[int, int], ...]]:
        """("linear", (W~,)) or ("bilinear", (L~, R~, D~)): the padded shapes
        of the flat layer, without forming it."""
        if isinstance(self.layer, Linear):
            return "linear", ((self.out_features + 1, self.in_features + 1),)
        return "bilinear", _bilinear_shapes(self.n_ctx * self.layer.hidden, self.in_features, self.out_features,
                                            self.layer.residual)

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        if data or self._flat is not None:
            return self.flat().network(symmetric, tag, data)
        kind, shapes = self.flat_padded_shapes()
        if kind == "linear":
            return _linear_expression(shapes[0], tag)
        return _bilinear_expression(shapes, tag, symmetric, symmetric or self.layer.left_is_right())

    def evaluate_flat(self, x: Any) -> Any:
        """Position by position: the layer on (batch * n_ctx, in)."""
        return self.evaluator()(x)

    def evaluator(self) -> Callable[[Any], Any]:
        inner, n = self.layer.evaluator(), self.n_ctx
        return lambda x: inner(x.reshape(x.shape[0] * n, self.layer.in_features)).reshape(x.shape[0], self.out_features)

    def __repr__(self) -> str:
        return f"{self.layer!r} x{self.n_ctx}"
