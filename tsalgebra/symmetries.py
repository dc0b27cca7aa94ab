"""Weight-space symmetries of tensor-based models, as first-class objects.

A :class:`Symmetry` takes a model (``Linear``, ``Bilinear``,
``BilinearAttention``, ``PositionWise`` or a ``Sequential`` of them, such as a
``Transformer``) and returns a new model computing the same function with
different weights; the input is never mutated.  A bare layer comes back as a
bare layer of the same kind, a ``Sequential`` as a ``Sequential`` (a
``Transformer`` as a ``Transformer``).  On a position-wise layer the
generators act on the per-position layer (the same change at every
position), and a wire between two position-wise layers changes position by
position.

Conventions: layers are the positions in ``model.layers``; wire ``k`` is the
vector passed from layer ``k`` to layer ``k + 1`` (so a model of n layers has
wires 0..n-2; the model's input and output are not wires).

The generators (see docs/symmetries.md for why each preserves the function):

- :func:`permute_hidden`: hidden-unit permutation of a bilinear layer;
- :func:`swap_left_right`: exchange of a bilinear layer's two factors;
- :func:`rescale_hidden`: L_h -> a_h L_h, R_h -> b_h R_h, D_:h -> D_:h / (a_h b_h);
- :func:`change_wire_basis`: the affine change y -> M y + c of one wire,
  compensated in the consuming layer;
- attention (:class:`~tsalgebra.BilinearAttention`): :func:`permute_heads`,
  :func:`swap_query_key_factors`, :func:`map_query_key` (Q -> A Q,
  K -> A^-T K in one head's query-key space), :func:`map_value_output`
  (V -> B V, O -> O B^-1).  Wires into or out of an attention layer are not
  among the random generators.

A Linear layer has no symmetry of its own; it is moved by the wire changes
next to it.  :func:`random_symmetry` draws a group element that touches every
layer.  Float64 weights are supported throughout; exact weights (numpy object
arrays of Fractions) stay exact when the transform's own numbers are exact
(ints or Fractions), and are converted to float64 otherwise.
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from .arrays import generator
from .attention import BilinearAttention, rotary_matrices
from .components import (Bilinear, Component, Linear, PositionWise, Sequential, all_exact, cast, postcompose,
                         precompose)
from .messages import counted

__all__ = [
    "Symmetry",
    "compose",
    "identity",
    "permute_hidden",
    "swap_left_right",
    "rescale_hidden",
    "change_wire_basis",
    "unfold_residual",
    "permute_heads",
    "swap_query_key_factors",
    "map_query_key",
    "map_value_output",
    "random_generators",
    "random_symmetry",
]

Model = TypeVar("Model", bound=Component)
Layers = tuple[Component, ...]


# ------------------------------------------------------------ the object


@dataclass(frozen=True, eq=False)
class Symmetry:
    """A function-preserving transformation of a model's weights.

    ``symmetry(model)`` returns a new model (same kind as ``model``: a bare
    layer stays a bare layer) that computes the same function; ``model`` is
    not modified.  ``name`` is the generator's name ("permute_hidden", ...,
    or "composite"), ``description`` says what it does to which layer or wire.
    A composite keeps its generators, in the order applied, in ``parts``.
    """

    name: str
    description: str
    act: Callable[[Layers], Layers] = field(repr=False)
    parts: tuple["Symmetry", ...] = ()

    def __call__(self, model: Model) -> Model:
        layers = _layers_of(model)
        new = _harmonize(self.act(layers))
        if isinstance(model, Sequential):
            return _same_kind(model, new)
        if len(new) != 1:
            raise AssertionError(f"{self.description}: a one-layer model became {len(new)} layers")
        return new[0]  # type: ignore[return-value]

    def then(self, other: "Symmetry") -> "Symmetry":
        """``self`` followed by ``other``: ``self.then(other)(m) == other(self(m))``."""
        return compose(self, other)

    def __repr__(self) -> str:
        return f"Symmetry({self.description})"


def compose(*symmetries: Symmetry) -> Symmetry:
    """The symmetries applied left to right: ``compose(s, t)(m) == t(s(m))``.

    Nested composites are flattened; ``compose()`` is the identity."""
    flat: list[Symmetry] = []
    for s in symmetries:
        if not isinstance(s, Symmetry):
            raise TypeError(f"compose: expected Symmetry objects, got {type(s).__name__}")
        flat.extend(s.parts if s.name == "composite" else (s,))
    if not flat:
        return identity()
    if len(flat) == 1:
        return flat[0]

    def act(layers: Layers) -> Layers:
        for s in flat:
            layers = _harmonize(s.act(layers))
        return layers

    return Symmetry("composite", "; ".join(s.description for s in flat), act, tuple(flat))


def identity() -> Symmetry:
    """The identity element (returns an equal model)."""
    return Symmetry("identity", "identity", lambda layers: tuple(layers))


# --------------------------------------------------------------- numbers


def _is_exact_number(x: Any) -> bool:
    return isinstance(x, (int, np.integer, Fraction)) and not isinstance(x, bool) or bool(getattr(x, "is_Rational", False))


def _param(value: Any, what: str) -> np.ndarray:
    """A transform's numbers as an array: object (exact) when every entry is an
    int, Fraction or sympy Rational, else float64 (finite)."""
    arr = np.asarray(value)
    if arr.dtype == bool:
        raise TypeError(f"{what}: expected numbers, got booleans")
    if arr.dtype == object:
        if arr.size and all(_is_exact_number(v) for v in arr.ravel()):
            return arr
        # anything but real numbers (None, strings, ...) would become NaN or a numpy error below
        bad = [v for v in arr.ravel() if isinstance(v, bool) or not isinstance(v, numbers.Real)
               and not (getattr(v, "is_number", False) and getattr(v, "is_real", False))]
        if bad:
            raise TypeError(f"{what}: expected real numbers, got {bad[0]!r}")
        arr = arr.astype(np.float64)
    elif np.issubdtype(arr.dtype, np.integer):
        return arr.astype(object)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{what}: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: contains NaN or Inf")
    return arr


def _reciprocal(x: Any) -> Any:
    """1 / x, exactly for ints (as a Fraction), Fractions and sympy numbers."""
    return Fraction(1, int(x)) if isinstance(x, (int, np.integer)) else 1 / x


def _exact_inverse(M: np.ndarray, what: str) -> np.ndarray:
    """Gauss-Jordan inverse in exact arithmetic (Fractions; sympy numbers via sympy)."""
    n = M.shape[0]
    if not all(isinstance(v, (int, np.integer, Fraction)) for v in M.ravel()):
        import sympy

        inv = sympy.Matrix(M.tolist())
        if inv.det() == 0:
            raise ValueError(f"{what}: the matrix is singular")
        return np.array(inv.inv().tolist(), dtype=object)
    A = [[Fraction(int(v)) if isinstance(v, (int, np.integer)) else v for v in row] for row in M.tolist()]
    B = [[Fraction(int(i == j)) for j in range(n)] for i in range(n)]
    for col in range(n):
        pivot = next((r for r in range(col, n) if A[r][col] != 0), None)
        if pivot is None:
            raise ValueError(f"{what}: the matrix is singular")
        A[col], A[pivot], B[col], B[pivot] = A[pivot], A[col], B[pivot], B[col]
        p = A[col][col]
        A[col] = [v / p for v in A[col]]
        B[col] = [v / p for v in B[col]]
        for r in range(n):
            if r != col and A[r][col] != 0:
                f = A[r][col]
                A[r] = [x - f * y for x, y in zip(A[r], A[col])]
                B[r] = [x - f * y for x, y in zip(B[r], B[col])]
    return np.array(B, dtype=object)


MAX_CONDITION = 1e12  # beyond it, undoing a float matrix loses most of float64's digits


def _inverse(M: np.ndarray, what: str, exact: bool) -> np.ndarray:
    """M^-1: exact (object) when ``exact``, else float64 after a conditioning
    check, so a singular or near-singular matrix is refused by name."""
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{what}: the matrix must be square, got shape {M.shape}")
    if exact:
        return _exact_inverse(M, what)
    M = M.astype(np.float64)  # exact entries of a map used on float weights
    # The condition number |M| |M^-1| does not change when M is scaled, so this
    # refuses a near-singular matrix at any scale (an absolute determinant or
    # pivot test would pass 1e13 * (a singular matrix + noise) and refuse 1e-13 * I).
    with np.errstate(all="ignore"):
        cond = np.linalg.cond(M)
    if not np.isfinite(cond) or cond > MAX_CONDITION:
        raise ValueError(f"{what}: the matrix is singular or ill-conditioned (condition number {cond:.3g})")
    with np.errstate(all="ignore"):
        # a left inverse, X M = I to round-off: every generator multiplies it into M (O B^-1 B V, L M^-1 M D),
        # where np.linalg.inv left |X M - I| at 14-65 eps cond for about 1 in 400 4 x 4 matrices, solving
        # M^T X^T = I at 0.6 eps cond at most (check_invariance's worst sampled round-off ratio, 1350 genuine
        # transforms at condition 1e8-1e12: 160 to 5.1)
        inv = np.linalg.solve(M.T, np.eye(M.shape[0])).T
    # well conditioned but scaled past float64 (1e-310 * I: its inverse is inf)
    if not np.isfinite(inv).all() or _below_normal(np.abs(M).max()) or _below_normal(np.abs(inv).max()):
        raise ValueError(f"{what}: the matrix (largest entry {np.abs(M).max():.3g}) or its inverse (largest "
                         f"entry {np.abs(inv).max():.3g}) is beyond float64")
    return inv


TINY = np.finfo(np.float64).tiny  # the smallest normal float64


def _below_normal(x: Any) -> Any:
    """True where |x| is subnormal (or 0): float64's spacing there is
    TINY * eps, so such a number has lost digits relative to itself, while
    any array whose largest entry is at least TINY keeps every entry to eps
    relative to that largest one."""
    return np.abs(x) < TINY


def _lost_digits(old: np.ndarray | None, new: np.ndarray | None, unit_axis: int | None = None) -> Any:
    """Whether a float transform took ``old`` to a ``new`` that float64 no
    longer holds to its own scale: an entry over- or underflowed (inf, or a
    largest entry that became subnormal where it was not).  The largest
    |entry| is taken over the whole array, or per index of ``unit_axis``
    (per hidden unit, for a rescaling that scales each unit by its own
    factor); exact arrays never lose digits."""
    if old is None or new is None or new.dtype == object:
        return False
    with np.errstate(invalid="ignore"):
        if not np.isfinite(new).all():
            return True
    o, n = np.abs(np.asarray(old, dtype=np.float64)), np.abs(new)
    if o.ndim and unit_axis is not None:
        axes = tuple(a for a in range(o.ndim) if a != unit_axis % o.ndim)
        o, n = (o.max(axis=axes), n.max(axis=axes)) if axes else (o, n)
    else:
        o, n = o.max(initial=0.0), n.max(initial=0.0)
    # only a loss the transform caused: an old entry already subnormal is left as the user gave it
    return bool(np.any((o > 0) & _below_normal(n) & (n < o)))


def _indices(values: Any, what: str) -> np.ndarray:
    """A list of integer indices (floats would fail as numpy indices; whether
    they permute the layer's units is checked against the layer)."""
    perm = np.asarray(values)
    if perm.ndim != 1 or (perm.size and perm.dtype.kind not in "iu"):
        raise TypeError(f"{what}: expected a list of integer indices, got {perm.tolist()!r}")
    return perm.astype(int)


def _integer(value: Any, what: str, arg: str) -> int:
    """An index argument (layer, wire, head) as an int, refused by the
    argument's name when it is not an integer: "0", 1.0 and True are not (a
    str was reported as "layer 0 is out of range", and a bool indexes as 0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}: argument {arg} (the {arg} index) must be an integer, "
                        f"got {value!r} ({type(value).__name__})")
    return int(value)


def _index(value: Any, n: int, what: str, noun: str) -> int:
    """A position 0..n-1 (no negative indices: they would silently pick from the end)."""
    value = _integer(value, what, noun)
    if not 0 <= value < n:
        raise IndexError(f"{what}: {noun} {value!r} is out of range 0..{n - 1}")
    return value


# ---------------------------------------------------------------- layers


def _not_a_model(model: Any, lead: str, kinds: str) -> TypeError:
    """The error for an argument that is not a model of ``kinds``: its type by
    the full name (a torch.nn.Linear and a tsalgebra Linear share the short
    one, which made "act on Linear ..., got Linear"), and for a torch module
    how to convert it."""
    cls = type(model)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(model, Component):
        return TypeError(f"{lead} tsalgebra {kinds} models, got a {name}")
    torch_module = any(c.__module__.split(".")[0] == "torch" for c in cls.__mro__)
    hint = "; convert a torch module first: ts.from_torch(module)" if torch_module else ""
    return TypeError(f"{lead} tsalgebra {kinds} models, got {name}, which is not a tsalgebra model{hint}")


def _layers_of(model: Component) -> Layers:
    if not isinstance(model, (Linear, Bilinear, Sequential, BilinearAttention, PositionWise)):
        raise _not_a_model(model, "symmetries act on", "Linear, Bilinear, BilinearAttention, PositionWise or "
                           "Sequential")
    return tuple(model.layers)


def _same_kind(model: Sequential, layers: Layers) -> Any:
    """``layers`` as a model of ``model``'s class: a subclass of Sequential
    (a Transformer) keeps its own attributes (n_ctx, d_model) and its call on
    sequences; the layers are checked as Sequential checks them."""
    if type(model) is Sequential:
        return Sequential(*layers)
    out = copy.copy(model)
    Sequential.__init__(out, *layers)
    return out


def _unwrapped(layer: Component) -> Component:
    """The per-position layer of a PositionWise (what the generators change)."""
    return layer.layer if isinstance(layer, PositionWise) else layer


def _harmonize(layers: Layers) -> Layers:
    """Float64 everywhere as soon as one layer is float (no exact/float mix)."""
    kinds = {w.dtype == object for layer in layers for w in layer.weights()}
    if len(kinds) < 2:
        return tuple(layers)
    return tuple(_float_layer(layer) for layer in layers)


def _float_layer(layer: Component) -> Component:
    return layer.map_weights(lambda w: cast(w, False))


def _bilinear_at(layers: Layers, k: int, what: str) -> Bilinear:
    """Layer k as a Bilinear (a position-wise Bilinear's per-position layer)."""
    if not 0 <= k < len(layers):  # an integer: checked when the generator was made
        raise IndexError(f"{what}: layer {k} is out of range for a model of {counted(len(layers), 'layer')}")
    layer = _unwrapped(layers[k])
    if not isinstance(layer, Bilinear):
        raise TypeError(f"{what}: layer {k} is {layers[k]!r}; this generator acts on Bilinear layers "
                        "(bare or position-wise)")
    return layer


def _with_layer(layers: Layers, k: int, layer: Component) -> Layers:
    """``layers`` with the one at position k exchanged for ``layer``; a new
    per-position layer replacing a PositionWise one is applied position-wise
    again (same positions, same name)."""
    old = layers[k]
    if isinstance(old, PositionWise) and not isinstance(layer, PositionWise):
        layer = PositionWise(layer, old.n_ctx, name=old.name)
    return tuple(layer if i == k else other for i, other in enumerate(layers))


def unfold_residual(model: Model) -> Model:
    """The same model with every residual Bilinear rewritten as a non-residual one.

    The residual ``+ x`` becomes d extra hidden units computing x_i * 1 (see
    :meth:`~tsalgebra.Bilinear.unfolded`, which this applies to every layer):
    the function and the padded factorization are unchanged.  Accepts a
    Bilinear (returns a Bilinear), a Linear (returned as is), a PositionWise
    one (the per-position layer unfolded) or a Sequential (of its own class).
    """
    if isinstance(model, Sequential):
        return _same_kind(model, tuple(unfold_residual(layer) for layer in model.layers))
    if isinstance(model, PositionWise):
        return PositionWise(unfold_residual(model.layer), model.n_ctx, name=model.name)  # type: ignore[return-value]
    if isinstance(model, Linear):
        return model
    if not isinstance(model, Bilinear):
        raise _not_a_model(model, "unfold_residual: expected", "Linear, Bilinear, PositionWise or Sequential")
    return model.unfolded()  # type: ignore[return-value]


# ------------------------------------------------------------ generators


def permute_hidden(layer: int, permutation: Sequence[int]) -> Symmetry:
    """Reorder the hidden units of Bilinear ``layer``: new unit j is old unit
    ``permutation[j]`` (rows of left, right and their biases, columns of down)."""
    layer = _integer(layer, "permute_hidden", "layer")
    what = f"permute_hidden(layer {layer})"
    perm = _indices(permutation, what)

    def act(layers: Layers) -> Layers:
        b = _bilinear_at(layers, layer, what)
        if perm.shape != (b.hidden,) or sorted(perm.tolist()) != list(range(b.hidden)):
            raise ValueError(f"{what}: {perm.tolist()} is not a permutation of the layer's {b.hidden} hidden units")
        take = lambda v: None if v is None else v[perm]  # noqa: E731
        return _with_layer(layers, layer, b.replace(
            left=b.left[perm], right=b.right[perm], down=b.down[:, perm],
            left_bias=take(b.left_bias), right_bias=take(b.right_bias)))

    return Symmetry("permute_hidden", f"permute hidden units of layer {layer} by {perm.tolist()}", act)


def swap_left_right(layer: int) -> Symmetry:
    """Exchange the left and right factors (and their biases) of Bilinear ``layer``."""
    layer = _integer(layer, "swap_left_right", "layer")
    what = f"swap_left_right(layer {layer})"

    def act(layers: Layers) -> Layers:
        b = _bilinear_at(layers, layer, what)
        return _with_layer(layers, layer, b.replace(left=b.right, right=b.left,
                                                     left_bias=b.right_bias, right_bias=b.left_bias))

    return Symmetry("swap_left_right", f"swap left and right factors of layer {layer}", act)


def rescale_hidden(layer: int, left: Any, right: Any) -> Symmetry:
    """Per-unit rescaling of Bilinear ``layer``: L_h -> a_h L_h (and its bias),
    R_h -> b_h R_h (and its bias), D_:h -> D_:h / (a_h b_h).

    ``left`` (a) and ``right`` (b): one nonzero number per hidden unit, or a
    scalar for all units."""
    layer = _integer(layer, "rescale_hidden", "layer")
    a, b_ = _param(left, "rescale_hidden left"), _param(right, "rescale_hidden right")
    what = f"rescale_hidden(layer {layer})"
    if np.any(a == 0) or np.any(b_ == 0):
        raise ValueError(f"{what}: scale factors must be nonzero")

    def act(layers: Layers) -> Layers:
        bl = _bilinear_at(layers, layer, what)
        h = bl.hidden
        sa, sb = (np.broadcast_to(s, (h,)) if s.ndim == 0 else s for s in (a, b_))
        if sa.shape != (h,) or sb.shape != (h,):
            raise ValueError(f"{what}: need {h} factors (one per hidden unit), got {a.shape} and {b_.shape}")
        exact = all_exact(sa, sb, *bl.weights())
        sa, sb = cast(sa, exact), cast(sb, exact)
        c = lambda v: cast(v, exact)  # noqa: E731
        if exact:
            inv = np.array([_reciprocal(x * y) for x, y in zip(sa, sb)], dtype=object)
        else:
            with np.errstate(over="ignore", under="ignore", divide="ignore"):
                prod = sa * sb
                inv = 1.0 / prod
            # a product that under- or overflows would silently zero or blow up the down map
            # (subnormal counts: "!= 0" let 1e-320 through, a number with 11 of its 53 bits)
            if not (np.isfinite(prod).all() and np.isfinite(inv).all()
                    and not np.any(_below_normal(prod)) and not np.any(_below_normal(inv))):
                raise ValueError(f"{what}: the products left * right of the factors ({_short(prod)}) or their "
                                 "reciprocals are beyond float64")
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            new = dict(left=c(bl.left) * sa[:, None], right=c(bl.right) * sb[:, None], down=c(bl.down) * inv[None, :],
                       left_bias=None if bl.left_bias is None else c(bl.left_bias) * sa,
                       right_bias=None if bl.right_bias is None else c(bl.right_bias) * sb)
        # Each unit's weights are scaled by its own factor, so each must stay in
        # float64's normal range on its own: left 1e-320, right 1e300 (products
        # 1e-20, in range) made the left rows subnormal and changed the outputs
        # by 1.8e-4.
        axis = {"left": 0, "right": 0, "down": 1, "left_bias": 0, "right_bias": 0}
        lost = [name for name, w in new.items() if _lost_digits(bl.named_weights()[name], w, axis[name])]
        if lost:
            raise ValueError(f"{what}: the factors (left {_short(a)}, right {_short(b_)}) take the layer's "
                             f"{', '.join(lost)} beyond float64 (to inf, or below its normal range, where a "
                             "weight loses digits)")
        return _with_layer(layers, layer, bl.replace(**new, down_bias=c(bl.down_bias)))

    return Symmetry("rescale_hidden", f"rescale hidden units of layer {layer} (left by {_short(a)}, right by {_short(b_)})", act)


def change_wire_basis(wire: int, matrix: Any, shift: Any = None) -> Symmetry:
    """The affine change y -> M y + c of wire ``wire`` (between layers ``wire``
    and ``wire + 1``), for invertible M (width x width) and shift c.

    The producing layer's output becomes M y + c (Linear: W -> M W,
    b -> M b + c; Bilinear: D -> M D, down bias -> M db + c); the consuming
    layer undoes it on its input (Linear: W -> W M^-1, b -> b - W M^-1 c;
    Bilinear: L -> L M^-1, lb -> lb - L M^-1 c, likewise R).  A residual
    Bilinear on either side is first rewritten by :func:`unfold_residual`.
    In padded form this is M~ = [[1, 0], [c, M]] on the wire, which keeps
    the constant channel.
    """
    wire = _integer(wire, "change_wire_basis", "wire")
    M = _param(matrix, "change_wire_basis matrix")
    c = None if shift is None else _param(shift, "change_wire_basis shift")
    what = f"change_wire_basis(wire {wire})"
    M_inv = _inverse(M, what, M.dtype == object)
    if c is not None and c.shape != (M.shape[0],):
        raise ValueError(f"{what}: the shift has shape {c.shape}, expected ({M.shape[0]},)")

    def act(layers: Layers) -> Layers:
        if not 0 <= wire < len(layers) - 1:
            raise IndexError(f"{what}: a model of {counted(len(layers), 'layer')} has "
                             + (f"wires 0..{len(layers) - 2}" if len(layers) > 1 else "no wires"))
        pair = [layers[k] for k in (wire, wire + 1)]
        if any(isinstance(layer, BilinearAttention) for layer in pair):
            raise TypeError(f"{what}: the wire enters or leaves an attention layer ({pair[0]!r}, {pair[1]!r}); "
                            "change_wire_basis applies to wires between Linear and Bilinear layers")
        if isinstance(pair[0], PositionWise) != isinstance(pair[1], PositionWise):
            raise TypeError(f"{what}: the wire joins a position-wise layer and a layer on the whole sequence "
                            f"({pair[0]!r}, {pair[1]!r}); a change of basis applies to a wire between two "
                            "position-wise layers (position by position) or two flat ones")
        # between position-wise layers the per-position wire changes, the same at every position
        prod, cons = (unfold_residual(_unwrapped(layer)) for layer in pair)
        if prod.out_features != M.shape[0]:
            raise ValueError(f"{what}: the wire has width {prod.out_features}"
                             f"{' per position' if isinstance(pair[0], PositionWise) else ''}, "
                             f"the matrix is {M.shape}")
        if c is not None and not _takes_shift(prod):
            raise ValueError(f"{what}: layer {wire} ({pair[0]!r}) has no output bias to take the shift; "
                             "change its basis without a shift")
        _check_range(what, _wire_products(prod, cons, wire, M, M_inv))
        exact = all_exact(M_inv, c)
        undo = None if c is None else -(cast(M_inv, exact) @ cast(c, exact))  # x = M^-1 (M x + c) - M^-1 c
        if _takes_shift(prod):
            new_prod = postcompose(prod, M, c)
        else:  # postcompose would write the absent output bias: only the output map changes
            D = prod.output_map[0]
            ex = all_exact(M, prod.named_weights()[D])
            new_prod = prod.replace(**{D: cast(M, ex) @ cast(prod.named_weights()[D], ex)})
        return _with_layer(_with_layer(layers, wire, new_prod), wire + 1, precompose(cons, M_inv, undo))

    shifted = c is not None and bool(np.any(c != 0))  # a zero shift is no shift
    desc = f"change basis of wire {wire} ({M.shape[0]}x{M.shape[0]} matrix{', with shift' if shifted else ''})"
    return Symmetry("change_wire_basis", desc, act)


def _check_range(what: str, changes: list[tuple[str, Any, Any]]) -> None:
    """Refuse a float transform that takes weights (name, old, new) past
    float64 (see :func:`_lost_digits`): the layer would otherwise fail on an
    inf with no word of the transform, or keep weights that lost digits."""
    lost = [name for name, old, new in changes if _lost_digits(old, new)]
    if lost:
        raise ValueError(f"{what}: the matrix takes {', '.join(lost)} beyond float64 (to inf, or below its "
                         "normal range, where the weights lose digits); scale the matrix nearer to 1")


def _wire_products(prod: Component, cons: Component, wire: int, M: np.ndarray,
                   M_inv: np.ndarray) -> list[tuple[str, Any, Any]]:
    """(name, old, new) for the maps a float change of basis multiplies: the
    producer's output map and bias by M, the consumer's input maps by M^-1
    (none when everything is exact: exact weights cannot over- or underflow)."""
    w_prod, w_cons = prod.named_weights(), cons.named_weights()
    if all_exact(M, *w_prod.values(), *w_cons.values()):
        return []
    Mf, Mi = M.astype(np.float64), np.asarray(M_inv, dtype=np.float64)
    D, d = prod.output_map
    with np.errstate(all="ignore"):
        out = [(f"layer {wire}'s {D}", w_prod[D], Mf @ cast(w_prod[D], False))]
        if w_prod.get(d) is not None:
            out.append((f"layer {wire}'s {d}", w_prod[d], Mf @ cast(w_prod[d], False)))
        out += [(f"layer {wire + 1}'s {A}", w_cons[A], cast(w_cons[A], False) @ Mi) for A, _ in cons.input_maps]
    return out


def _takes_shift(layer: Component) -> bool:
    """Whether the layer's output bias exists as a field (an Embedding has none)."""
    return layer.output_map[1] in layer.named_weights()


def _short(a: np.ndarray) -> str:
    if a.ndim == 0:
        return str(a.item())
    vals = [f"{float(v):.3g}" if not isinstance(v, (int, Fraction)) else str(v) for v in a.ravel()[:4]]
    return "[" + ", ".join(vals) + (", ...]" if a.size > 4 else "]")


# ---------------------------------------------------------------- random


def _random_scales(rng: np.random.Generator, n: int, exact: bool) -> np.ndarray:
    signs = rng.choice([-1, 1], size=n)
    if exact:
        return np.array([Fraction(int(s) * int(p), int(q)) for s, p, q in
                         zip(signs, rng.integers(1, 5, n), rng.integers(1, 5, n))], dtype=object)
    return signs * np.exp(rng.normal(0.0, 0.5, n))


def _random_basis(rng: np.random.Generator, scale: np.ndarray, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """(M, c) for a wire whose coordinates have typical sizes ``scale``.

    Float: M = S Q1 diag(exp N(0, 0.3)) Q2 S^-1 with S = diag(scale) and Q1, Q2
    random orthogonal, so M is well conditioned in the wire's own units (no
    cancellation when the consumer undoes it); c_i = +-U(0.25, 1) scale_i, a
    shift of the wire's order of size.  Exact: unit-triangular factors with
    small integer entries around a diagonal of small rationals, and a small
    rational shift, redrawn while they make the identity (M = I, c = 0: likely
    on a narrow wire), which would leave the layers around the wire as they
    were."""
    n = len(scale)
    if exact:
        while True:
            lo = np.tril(rng.integers(-2, 3, (n, n)), -1) + np.eye(n, dtype=int)
            up = np.triu(rng.integers(-2, 3, (n, n)), 1) + np.eye(n, dtype=int)
            diag = _random_scales(rng, n, True)
            M = lo.astype(object) @ (diag[:, None] * up.astype(object))
            c = np.array([Fraction(int(p), int(q)) for p, q in zip(rng.integers(-3, 4, n), rng.integers(1, 4, n))],
                         dtype=object)
            if np.any(M != np.eye(n, dtype=int)) or np.any(c != 0):
                return M, c
    q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    core = (q1 * np.exp(rng.normal(0.0, 0.3, n))) @ q2
    M = scale[:, None] * core / scale[None, :]
    c = scale * rng.choice([-1.0, 1.0], n) * rng.uniform(0.25, 1.0, n)
    return M, c


def _wire_scales(layers: Layers, rng: np.random.Generator, n: int = 32) -> list[np.ndarray]:
    """Root mean square of every coordinate of every wire on standard normal
    inputs (1 for a coordinate that is identically zero there); per position
    (over all positions) for the output of a position-wise layer, whose wire
    changes position by position."""
    y = rng.normal(size=(n, layers[0].in_features))
    out = []
    for layer in layers[:-1]:
        y = np.asarray(layer.evaluate_flat(y), dtype=float)  # flat: attention layers take (batch, n_ctx x d)
        per = y.reshape(-1, layer.layer.out_features) if isinstance(layer, PositionWise) else y
        rms = np.sqrt(np.mean(per**2, axis=0))
        good = rms[(rms > 0) & np.isfinite(rms)]
        top = good.max() if good.size else 1.0
        # Sizes relative to the wire's largest, at least WIRE_SCALE_SPREAD of it:
        # "> 0" alone took a coordinate at round-off level (1e-17 of the others)
        # or merely small (1e-8) as its size, and M = S core S^-1 then had
        # condition number 1e16 to 1e32, which change_wire_basis refuses.
        out.append(np.where((rms > 0) & np.isfinite(rms), np.clip(rms, WIRE_SCALE_SPREAD * top, None), top))
    return out


# The smallest coordinate size _random_basis works with, relative to the
# wire's largest: cond(S core S^-1) <= cond(S)^2 cond(core) <= 1e8 cond(core)
# (cond(core) = exp(spread of 0.3 N(0, 1) draws), about 7 at a width of
# 1000), far below MAX_CONDITION, where a wire change of condition 1e10 still
# passed check_invariance.
WIRE_SCALE_SPREAD = 1e-4


# ------------------------------------------------------------- attention


def _attention_at(layers: Layers, k: int, what: str) -> BilinearAttention:
    if not 0 <= k < len(layers):  # an integer: checked when the generator was made
        raise IndexError(f"{what}: layer {k} is out of range for a model of {counted(len(layers), 'layer')}")
    if not isinstance(layers[k], BilinearAttention):
        raise TypeError(f"{what}: layer {k} is {layers[k]!r}; this generator acts on BilinearAttention layers")
    return layers[k]


def _cast_copies(att: BilinearAttention, exact: bool) -> dict[str, np.ndarray | None]:
    """The layer's weights by name as new arrays (object when ``exact``, else
    float64), ready to be changed in place; absent biases stay None."""
    return {k: None if a is None else cast(a, exact).copy() for k, a in att.named_weights().items()}


def permute_heads(layer: int, permutation: Sequence[int]) -> Symmetry:
    """Reorder the heads of an attention layer (heads are summed)."""
    layer = _integer(layer, "permute_heads", "layer")
    perm = _indices(permutation, "permute_heads")

    def act(layers: Layers) -> Layers:
        att = _attention_at(layers, layer, "permute_heads")
        if sorted(perm.tolist()) != list(range(att.heads)):
            raise ValueError(f"permute_heads: {perm.tolist()} is not a permutation of {att.heads} heads")
        # every field but the output bias (one for the summed heads) has the head axis first
        w = {k: a if a is None or k == "o_bias" else a[perm] for k, a in att.named_weights().items()}
        return _with_layer(layers, layer, att.replace(**w))

    return Symmetry("permute_heads", f"permute the heads of layer {layer} by {perm.tolist()}", act)


def swap_query_key_factors(layer: int) -> Symmetry:
    """Exchange (q1, k1) with (q2, k2): the two factors of the score commute."""
    layer = _integer(layer, "swap_query_key_factors", "layer")
    swap = {"q1": "q2", "q2": "q1", "k1": "k2", "k2": "k1"}

    def other(field: str) -> str:  # "q1_bias" -> "q2_bias"; "v", "o" and their biases stay
        base, sep, rest = field.partition("_")
        return swap.get(base, base) + sep + rest

    def act(layers: Layers) -> Layers:
        att = _attention_at(layers, layer, "swap_query_key_factors")
        return _with_layer(layers, layer, att.replace(**{other(k): a for k, a in att.named_weights().items()}))

    return Symmetry("swap_query_key_factors", f"exchange the two query-key factors of layer {layer}", act)


# How far A may be from commuting with the rotations, as
# max_p |A R_p - R_p A|_F / |A|_F (R_p orthogonal: the commutator's size
# relative to |A| |R_p|, so the same at every scale of A; an absolute 1e-12
# passed 1e-13 * a random matrix, which changed a model's outputs by 74 %).
# Measured (dh 2..128, 64-256 positions, A = scaled 2x2 rotations per pair
# at scales 1e-13..1e13, block sizes spread by exp N(0, 3)): built in float
# 0.93 eps, after a product A A A^-1 1.8 eps, with 1 and 4 ulps of relative
# noise 2.0 and 6.9 eps (about 1.7 eps per ulp); random matrices >= 2.4e15 eps.
# 64 eps admits some 35 ulps of noise.  What it admits changes the scores'
# kernel A^T R A^-T by at most 64 eps |A|_F |A^-1| <= 64 eps sqrt(dh) cond(A):
# the order of the round-off that applying a matrix of that conditioning
# leaves anyway (eps cond(A)), which MAX_CONDITION bounds.
ROTARY_COMMUTATOR_TOL = 64 * np.finfo(np.float64).eps


def _rotary_commutator(att: BilinearAttention, A: np.ndarray) -> float:
    """max over positions p of |A R_p - R_p A|_F / |A|_F for the layer's rotary
    rotations R_p (positions 0..n_ctx-1, at least 0..1).

    R_p rotates the pairs (2k, 2k+1) by 2x2 blocks [[c, -s], [s, c]] (an odd
    last dimension is left alone; see :func:`rotary_matrices`), so A R_p and
    R_p A are computed pair by pair from each block's c and s, in chunks of
    positions: O(n_ctx dh^2), where dense products cost n_ctx dh^3 (49 s for
    dh = 128 and 2048 positions against 1 s).  The first chunk's last position
    is checked against the dense product, so a change of the rotary layout
    cannot go unnoticed here."""
    A = np.asarray(A, dtype=np.float64)
    dh, n = A.shape[0], max(att.n_ctx, 2)
    k = 2 * np.arange(dh // 2)
    norm = float(np.linalg.norm(A))
    chunk = max(1, 2**18 // dh**2)  # positions per chunk: a few MB of arrays
    worst = 0.0
    for start in range(0, n, chunk):
        rot = rotary_matrices(np.arange(start, min(n, start + chunk)), dh, att.rotary_base)
        c, s = rot[:, k, k][:, None, :], rot[:, k + 1, k][:, None, :]  # (positions, 1, pairs)
        AR = np.repeat(A[None], len(rot), axis=0)
        RA = AR.copy()
        AR[:, :, k], AR[:, :, k + 1] = A[:, k] * c + A[:, k + 1] * s, A[:, k + 1] * c - A[:, k] * s
        c, s = c.transpose(0, 2, 1), s.transpose(0, 2, 1)  # (positions, pairs, 1)
        RA[:, k, :], RA[:, k + 1, :] = c * A[k] - s * A[k + 1], s * A[k] + c * A[k + 1]
        diff = AR - RA
        if start == 0:
            dense = A @ rot[-1] - rot[-1] @ A
            # the two orders of summation differ by a few eps |A|; a wrong layout by O(|A|)
            if np.abs(dense - diff[-1]).max() > 1e-12 * max(norm, np.abs(dense).max()):
                raise AssertionError("rotary_matrices no longer rotates the pairs (2k, 2k+1) by 2x2 blocks")
        worst = max(worst, float(np.sqrt(np.einsum("pij,pij->p", diff, diff)).max()))
    return worst / norm


def map_query_key(layer: int, factor: int, head: int, matrix: Any) -> Symmetry:
    """Q -> A Q, K -> A^-T K (biases alike) inside one head's query-key space
    of factor 1 or 2: q . k is unchanged.  With rotary factors, A must commute
    with the rotations (e.g. scaled 2x2 rotations on each rotated pair)."""
    layer = _integer(layer, "map_query_key", "layer")
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)):  # 1.0 made the field "q1.0"
        raise TypeError(f"map_query_key(layer {layer}): argument factor must be the integer 1 or 2 (the two "
                        f"query-key factors), got {factor!r} ({type(factor).__name__})")
    factor = int(factor)
    head = _integer(head, f"map_query_key(layer {layer}, factor {factor})", "head")
    what = f"map_query_key(layer {layer}, factor {factor}, head {head})"
    if factor not in (1, 2):
        raise ValueError(f"{what}: factor must be 1 or 2 (the two query-key factors), got {factor!r}")
    A = _param(matrix, f"{what} matrix")
    _inverse(A, what, A.dtype == object)  # refuse a singular matrix at once, before any model

    def act(layers: Layers) -> Layers:
        att = _attention_at(layers, layer, "map_query_key")
        h = _index(head, att.heads, what, "head")
        q, k = f"q{factor}", f"k{factor}"
        dh = getattr(att, q).shape[1]
        if A.shape != (dh, dh):
            raise ValueError(f"{what}: matrix has shape {A.shape}, expected ({dh}, {dh})")
        if att.rotary_base is not None:
            off = _rotary_commutator(att, A)
            if not off <= ROTARY_COMMUTATOR_TOL:
                raise ValueError(f"{what}: with rotary factors the map must commute with the rotations R; "
                                 f"|A R - R A| / |A| (Frobenius norms, R a rotation) is {off:.3g} at worst, above "
                                 f"{ROTARY_COMMUTATOR_TOL:.2g}, float64 round-off (the test does not depend on "
                                 "the scale of A)")
        exact = all_exact(A, getattr(att, q))
        A_, A_inv_T = cast(A, exact), _inverse(A, what, exact).T
        w = _cast_copies(att, exact)
        changes = []
        with np.errstate(all="ignore"):
            for name, M in ((q, A_), (f"{q}_bias", A_), (k, A_inv_T), (f"{k}_bias", A_inv_T)):
                if w[name] is not None:
                    changes.append((f"head {h}'s {name}", w[name][h].copy(), M @ w[name][h]))
                    w[name][h] = changes[-1][2]
        _check_range(what, changes)
        return _with_layer(layers, layer, att.replace(**w))

    return Symmetry("map_query_key", f"map head {head}'s query-key space {factor} of layer {layer}", act)


def map_value_output(layer: int, head: int, matrix: Any) -> Symmetry:
    """V -> B V (bias alike), O -> O B^-1 in one head: O V is unchanged."""
    layer = _integer(layer, "map_value_output", "layer")
    head = _integer(head, f"map_value_output(layer {layer})", "head")
    what = f"map_value_output(layer {layer}, head {head})"
    B = _param(matrix, f"{what} matrix")
    _inverse(B, what, B.dtype == object)  # refuse a singular matrix at once, before any model

    def act(layers: Layers) -> Layers:
        att = _attention_at(layers, layer, "map_value_output")
        h = _index(head, att.heads, what, "head")
        dv = att.v.shape[1]
        if B.shape != (dv, dv):
            raise ValueError(f"{what}: matrix has shape {B.shape}, expected ({dv}, {dv}) (the head's value width)")
        exact = all_exact(B, att.v)
        B_, B_inv = cast(B, exact), _inverse(B, what, exact)
        w = _cast_copies(att, exact)
        old = {name: None if w[name] is None else w[name][h].copy() for name in ("v", "o", "v_bias")}
        with np.errstate(all="ignore"):
            w["v"][h], w["o"][h] = B_ @ w["v"][h], w["o"][h] @ B_inv
            if w["v_bias"] is not None:
                w["v_bias"][h] = B_ @ w["v_bias"][h]
        _check_range(what, [(f"head {h}'s {name}", old[name], None if w[name] is None else w[name][h])
                            for name in old])
        return _with_layer(layers, layer, att.replace(**w))

    return Symmetry("map_value_output", f"map head {head}'s value space of layer {layer}", act)


def _random_head_map(rng: np.random.Generator, n: int, rotary: bool) -> np.ndarray:
    """Well conditioned; for rotary, scaled rotations on each pair (they commute with RoPE)."""
    if not rotary:
        q1, _ = np.linalg.qr(rng.normal(size=(n, n)))
        q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
        return (q1 * np.exp(rng.normal(0.0, 0.3, n))) @ q2
    A = np.zeros((n, n))
    for k in range(0, n - 1, 2):
        r, t = np.exp(rng.normal(0.0, 0.3)), rng.uniform(0, 2 * np.pi)
        A[k : k + 2, k : k + 2] = r * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if n % 2:
        A[-1, -1] = np.exp(rng.normal(0.0, 0.3))
    return A


def _attention_generators(k: int, att: BilinearAttention, rng: np.random.Generator) -> list[Symmetry]:
    out = [permute_heads(k, rng.permutation(att.heads))]
    if rng.random() < 0.5:
        out.append(swap_query_key_factors(k))
    for h in range(att.heads):
        for factor in (1, 2):
            out.append(map_query_key(k, factor, h, _random_head_map(rng, getattr(att, f"q{factor}").shape[1],
                                                                      att.rotary_base is not None)))
        out.append(map_value_output(k, h, _random_head_map(rng, att.v.shape[1], False)))
    return out


def random_generators(model: Component, rng: np.random.Generator | int | None = None, *,
                      exact: bool | None = None) -> list[Symmetry]:
    """One random instance of every generator that applies to ``model``, in an
    order in which they compose: for each Bilinear layer a hidden permutation,
    a left/right swap (with probability 1/2) and a rescaling (factors
    +-exp(N(0, 0.5)), random signs); then an affine change y -> M y + c of
    every internal wire, well conditioned relative to the size of the wire's
    values on standard normal inputs (see ``_random_basis``), with a shift c
    of that size.  Each element is valid on ``model`` alone as well.

    ``exact`` (default: ``model.exact``) draws rational numbers instead, so an
    exact model stays exact.  A lone Linear layer has no generators: [].
    """
    rng = generator(rng)
    layers = _layers_of(model)
    exact = model.exact if exact is None else exact
    out: list[Symmetry] = []
    for k, layer in enumerate(layers):
        if isinstance(layer, BilinearAttention):
            out.extend(_attention_generators(k, layer, rng))
        inner = _unwrapped(layer)
        if isinstance(inner, Bilinear):
            out.append(permute_hidden(k, rng.permutation(inner.hidden)))
            if rng.random() < 0.5:
                out.append(swap_left_right(k))
            while True:  # all factors 1 (possible with exact draws) would be the identity
                a, b = _random_scales(rng, inner.hidden, exact), _random_scales(rng, inner.hidden, exact)
                if np.any(a != 1) or np.any(b != 1):
                    break
            out.append(rescale_hidden(k, a, b))
    widths = [_unwrapped(l).out_features for l in layers]
    scales = _wire_scales(layers, rng) if len(layers) > 1 and not exact else [np.ones(w) for w in widths]
    for k in range(len(layers) - 1):
        if isinstance(layers[k], BilinearAttention) or isinstance(layers[k + 1], BilinearAttention):
            continue  # wires into or out of attention: not among the generators here
        if isinstance(layers[k], PositionWise) != isinstance(layers[k + 1], PositionWise):
            continue  # a per-position layer next to a flat one: no per-position wire to change
        M, c = _random_basis(rng, scales[k], exact)
        out.append(change_wire_basis(k, M, c if _takes_shift(_unwrapped(layers[k])) else None))
    return out


def random_symmetry(model: Component, rng: np.random.Generator | int | None = None, *,
                    exact: bool | None = None) -> Symmetry:
    """A random group element for ``model`` touching every layer: the
    composition of :func:`random_generators` (every Bilinear layer is
    permuted, maybe swapped, rescaled; every internal wire gets a random
    well-conditioned affine change, which also moves the Linear layers).
    The identity for a lone Linear layer (its group is trivial)."""
    return compose(*random_generators(model, rng, exact=exact))
