"""PyTorch modules to tsalgebra models.

:func:`from_torch` walks a torch module and converts every part into a
tsalgebra component, or refuses with an :class:`AdapterError` that names the
module path (``"<root>"`` for the module itself, else the dotted name that
``module.named_modules()`` uses, e.g. ``"2.mlp.act"``).  Weights are copied
to float64 numpy arrays; the torch module is never modified.

What is recognized (see docs/user-guide.md for the full table):

- registered classes, looked up along the class's MRO (most specific first):
  ``nn.Linear``; ``nn.Sequential`` (children in order, skipped ones dropped);
  ``nn.Identity`` and ``nn.Dropout*`` in eval mode (or with ``p == 0``)
  are skipped; :class:`Residual` (``x + inner(x)``); :class:`BilinearLayer`;
  everything added with :func:`register_adapter`.  A subclass that overrides
  ``forward`` does not inherit its parent's adapter (its forward may do
  anything); it goes through the conventions below instead.
- attribute conventions, for any other module.  They are guesses about a
  forward that cannot be read, so each candidate is checked numerically
  against the module's own forward (float64, random inputs) and accepted only
  if it matches:

  * bilinear, separate factors: three ``nn.Linear`` attributes, one name from
    each of ``LEFT_NAMES``, ``RIGHT_NAMES`` and ``DOWN_NAMES``, with
    ``forward(x) == down(left(x) * right(x))``;
  * bilinear, fused: one ``nn.Linear`` named in ``FUSED_NAMES`` with 2h
    outputs whose halves are left and right (``.chunk(2, -1)``), and a
    ``DOWN_NAMES`` Linear: ``forward(x) == down(l * r)``;
  * bilinear without a down projection: a subclass of ``nn.Linear`` whose
    forward returns ``l * r`` of its two output halves (the "Bilinear(nn.Linear)"
    idiom); the down projection is the identity;
  * residual wrapper: exactly one child module, named in ``WRAPPER_NAMES``,
    with ``forward(x) == x + inner(x)``; a plain wrapper
    ``forward(x) == inner(x)`` with the same names is accepted too.

- refused with a reason: non-polynomial activations, normalizations, softmax
  attention, embeddings, dropout in train mode (p > 0), anything else.

A registered adapter is ``fn(module, path) -> Component | None`` (``None``
means "skip: the identity"); it may call :func:`convert` on children to
recurse with correct paths.  Adding support for a class, e.g. a bilinear
attention module, is one call: ``register_adapter(MyAttention, fn)``.
"""

from __future__ import annotations

import contextvars
import math
import numbers
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .arrays import real_float64
from .attention import BilinearAttention
from .components import Bilinear, Component, Embedding, Linear, PositionWise, Sequential, postcompose, precompose
from .messages import UNPRINTABLE, message_of

__all__ = [
    "AdapterError",
    "BilinearLayer",
    "Residual",
    "from_torch",
    "to_torch",
    "convert",
    "register_adapter",
    "unregister_adapter",
    "registered_adapters",
    "fold_linear",
    "LEFT_NAMES",
    "RIGHT_NAMES",
    "DOWN_NAMES",
    "FUSED_NAMES",
    "WRAPPER_NAMES",
]

Adapter = Callable[[nn.Module, str], "Component | None"]

# attribute conventions (documented in docs/user-guide.md)
LEFT_NAMES = ("left", "w_l", "l", "left_proj", "w1", "gate_proj", "gate")  # gate/up: HF-style names
RIGHT_NAMES = ("right", "w_r", "r", "right_proj", "w2", "up_proj")
DOWN_NAMES = ("down", "proj", "d", "down_proj", "out", "out_proj", "w_o", "w_out", "p", "w3")
FUSED_NAMES = ("w", "in_proj", "w_in", "up", "fused", "lr")
WRAPPER_NAMES = ("inner", "block", "fn", "mlp", "module", "layer", "sublayer", "body", "f")

# Inputs of the forward check: a hidden nonlinearity is caught only where a sample reaches it (a ReLU
# acting on 10 % of inputs: missed by 8 samples 41 % of the time, by 64 0.1 %).  64 where the model is
# narrow (cheap to run 64 times), 8 beyond (a language model's one-hot input over its whole context).
_CHECK_SAMPLES, _CHECK_SAMPLES_NARROW, _NARROW_FEATURES = 8, 64, 4096
# Up to this vocabulary the check also feeds every token id once (a module
# that zeroed its padding token's embedding converted without an error in 11
# of 64 vocabularies of 64, its random ids missing the token).  The cost grows
# as the vocabulary squared: at the field's 4,096 tokens (d_model 256, 4
# positions) the 1,024 sequences took 0.9-1.5 s beside the conversion's
# 0.03-0.07 s; at 1,024 tokens 0.18-0.21 s against 0.08-0.13 s.
_COVERED_VOCAB = 1024
_CHECK_RTOL = 1e-6
_CHECK_FLOOR = 1e-6  # an output below this fraction of the largest is measured against it: its round-off


class AdapterError(ValueError):
    """A module that cannot be converted; ``path`` names it (``"<root>"`` for
    the top-level module) and the message says why and what to do."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path or "<root>"
        super().__init__(f"{self.path}: {message}")


# ------------------------------------------------------- torch reference modules


class BilinearLayer(nn.Module):
    """The torch twin of :class:`tsalgebra.Bilinear`:
    ``down(left(x) * right(x))`` with three ``nn.Linear`` layers.

    Its state dict (``left.weight``, ``right.weight``, ``down.weight`` and the
    optional ``.bias`` entries) is tsalgebra's native checkpoint layout.
    """

    def __init__(self, d_in: int, hidden: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.left = nn.Linear(d_in, hidden, bias=bias)
        self.right = nn.Linear(d_in, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.left(x) * self.right(x))


class Residual(nn.Module):
    """``x + inner(x)``: the residual wrapper that :func:`from_torch` folds into
    a residual tsalgebra layer.  ``inner`` must convert to a single polynomial
    layer of degree <= 2 once Linear layers are folded in (see
    :func:`fold_linear`), with as many outputs as inputs."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class BilinearAttentionModule(nn.Module):
    """The torch twin of :class:`tsalgebra.BilinearAttention`, and the layout
    :func:`from_torch` reads for attention: parameters ``q1, k1, q2, k2, v``
    (heads, d_head, d_model) and ``o`` (heads, d_model, d_head), optional
    ``q1_bias ... v_bias`` (heads, d_head) and ``o_bias`` (d_model,), and the
    attributes ``causal``, ``rotary_base``, ``scale``, ``residual``, ``n_ctx``.
    Input (batch, n_ctx, d_model).  Any module with these attribute names can
    be converted with ``register_adapter(MyClass, attention_adapter)``."""

    def __init__(self, heads: int, d_head: int, d_model: int, *, causal: bool = False,
                 rotary_base: float | None = None, scale: float = 1.0, residual: bool = False,
                 n_ctx: int | None = None, bias: bool = False) -> None:
        super().__init__()
        w = lambda *s: nn.Parameter(torch.randn(*s) / s[-1] ** 0.5)  # noqa: E731
        self.q1, self.k1, self.q2, self.k2, self.v = (w(heads, d_head, d_model) for _ in range(5))
        self.o = w(heads, d_model, d_head)
        for name in ("q1_bias", "k1_bias", "q2_bias", "k2_bias", "v_bias"):
            setattr(self, name, nn.Parameter(0.1 * torch.randn(heads, d_head)) if bias else None)
        self.o_bias = nn.Parameter(0.1 * torch.randn(d_model)) if bias else None
        self.causal, self.rotary_base, self.scale, self.residual, self.n_ctx = causal, rotary_base, scale, residual, n_ctx

    def _rope(self, t: torch.Tensor) -> torch.Tensor:  # (batch, pos, heads, d_head)
        if self.rotary_base is None:
            return t
        n, dh = t.shape[1], t.shape[-1]
        out = t.clone()
        pos = torch.arange(n, dtype=t.dtype)[:, None]
        for k in range(dh // 2):
            angle = pos * self.rotary_base ** (-2 * k / dh)
            c, s_ = torch.cos(angle), torch.sin(angle)
            x0, x1 = t[..., 2 * k], t[..., 2 * k + 1]
            out[..., 2 * k], out[..., 2 * k + 1] = c * x0 - s_ * x1, s_ * x0 + c * x1
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def proj(name: str) -> torch.Tensor:
            y = torch.einsum("hed,bpd->bphe", getattr(self, name), x)
            b = getattr(self, f"{name}_bias")
            return y if b is None else y + b

        q1, k1, q2, k2 = (self._rope(proj(n)) for n in ("q1", "k1", "q2", "k2"))
        score = self.scale * torch.einsum("bihe,bjhe->bhij", q1, k1) * torch.einsum("bihe,bjhe->bhij", q2, k2)
        if self.causal:
            score = score * torch.tril(torch.ones(x.shape[1], x.shape[1], dtype=x.dtype))
        out = torch.einsum("bhij,bjhe,hce->bic", score, proj("v"), self.o)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out + x if self.residual else out


def attention_adapter(module: nn.Module, path: str) -> Component:
    """Convert a module with the :class:`BilinearAttentionModule` attribute layout."""

    try:  # the layout's parameter names are the layer's field names; biases may be missing
        weights = {f: _np(getattr(module, f, None) if f.endswith("_bias") else getattr(module, f))
                   for f in BilinearAttention.weight_fields}
    except AttributeError as exc:
        raise AdapterError(path, f"not in the bilinear-attention layout ({exc})") from None
    base = getattr(module, "rotary_base", None)
    base = None if base is None else _setting(base, path, "rotary_base", positive=True)
    return BilinearAttention(**weights, causal=bool(getattr(module, "causal", False)), rotary_base=base,
                             scale=_setting(getattr(module, "scale", 1.0), path, "scale"),
                             residual=bool(getattr(module, "residual", False)), n_ctx=getattr(module, "n_ctx", None),
                             name=_name("BilinearAttention", path))


def _setting(value: Any, path: str, name: str, positive: bool = False) -> float:
    """A module's scalar setting as a float: a learned one (an nn.Parameter,
    a 0-d tensor) read as its value (one that requires grad reached numpy
    inside the attention); not finite, or not positive where it must be, an
    AdapterError naming it."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise AdapterError(path, f"{name} holds {value.numel()} values; one number is read")
        value = value.detach().cpu().item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AdapterError(path, f"{name} = {value!r} is not a number") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise AdapterError(path, f"{name} = {number!r} must be a finite{' positive' if positive else ''} number")
    return number


# ----------------------------------------------------------------- registry

_REGISTRY: dict[type, Adapter] = {}


def register_adapter(cls: type, fn: Adapter | None = None) -> Any:
    """Convert modules of class ``cls`` (and of subclasses that keep its
    ``forward``) with ``fn(module, path) -> Component | None``; ``None`` means
    the module is the identity and is skipped.  Replaces any adapter already
    registered for ``cls``.  Usable as a decorator: ``@register_adapter(cls)``.
    Returns ``fn``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_adapter: {cls!r} is not an nn.Module subclass")

    def add(f: Adapter) -> Adapter:
        if not callable(f):
            raise TypeError(f"register_adapter: adapter for {cls.__name__} is not callable")
        _REGISTRY[cls] = f
        return f

    return add if fn is None else add(fn)


def unregister_adapter(cls: type) -> None:
    """Remove the adapter registered for exactly ``cls`` (KeyError if none)."""
    del _REGISTRY[cls]


def registered_adapters() -> dict[type, Adapter]:
    """A copy of the registry: class -> adapter."""
    return dict(_REGISTRY)


def _overrides_forward(cls: type, base: type) -> bool:
    """True when some class between ``cls`` and ``base`` (exclusive) defines its own forward."""
    for k in cls.__mro__:
        if k is base:
            return False
        if "forward" in vars(k):
            return True
    return False


def _lookup(module: nn.Module) -> Adapter | None:
    cls = type(module)
    for k in cls.__mro__:
        if k in _REGISTRY:
            if k is not cls and _overrides_forward(cls, k):
                return None  # a subclass with its own forward: the parent's adapter may be wrong
            return _REGISTRY[k]
    return None


# ------------------------------------------------------------------ helpers


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    """A parameter as a float64 numpy copy (None stays None: an absent bias);
    TypeError for a complex or meta tensor (a cast would keep the real part)
    and for integer weights (the module's forward cannot take real inputs)."""
    if t is not None and not (t.is_floating_point() or t.is_complex() or t.is_meta):
        raise TypeError(f"integer weights (dtype {t.dtype}) are not supported: torch's forward cannot take real "
                        "inputs with them; convert the module with .double() first")
    return None if t is None else real_float64(t)  # a new array already (torch_to_numpy copies): no second


def _name(kind: str, path: str) -> str:
    return f"{kind}[{path}]" if path else kind


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _linear(module: nn.Linear, path: str) -> Linear:
    try:
        return Linear(_np(module.weight), _np(module.bias), name=_name("Linear", path))
    except ValueError as exc:  # its message starts with the layer's name: not prefixed again by convert
        raise AdapterError(path, str(exc)) from None


def _bilinear(left: nn.Linear, right: nn.Linear, down: nn.Linear | None, path: str) -> Bilinear:
    lw, rw = _np(left.weight), _np(right.weight)
    if down is None:
        dw, db = np.eye(lw.shape[0]), None
    else:
        dw, db = _np(down.weight), _np(down.bias)
    try:
        return Bilinear(lw, rw, dw, _np(left.bias), _np(right.bias), db, name=_name("Bilinear", path))
    except ValueError as exc:
        raise AdapterError(path, str(exc)) from None


def _fused(fused: nn.Linear, down: nn.Linear | None, path: str) -> Bilinear:
    w, b = _np(fused.weight), _np(fused.bias)
    if w.shape[0] % 2:
        raise AdapterError(path, f"fused projection has {w.shape[0]} outputs, not an even number to split in halves")
    h = w.shape[0] // 2
    dw, db = (np.eye(h), None) if down is None else (_np(down.weight), _np(down.bias))
    try:
        return Bilinear(w[:h], w[h:], dw, None if b is None else b[:h], None if b is None else b[h:], db,
                        name=_name("Bilinear", path))
    except ValueError as exc:
        raise AdapterError(path, str(exc)) from None


def _compose(first: Component, second: Component) -> Component | None:
    """One layer computing second(first(x)) when one of them is Linear, else None."""
    if isinstance(first, Linear) and isinstance(second, (Linear, Bilinear)):
        return precompose(second, first.weight, first.bias)
    if isinstance(first, Bilinear) and isinstance(second, Linear):
        return postcompose(first, second.weight, second.bias)
    return None


def fold_linear(model: Component) -> Component:
    """The same function with every Linear layer multiplied into a neighbouring
    layer (Linear into Linear, Linear into the factors of the next Bilinear,
    or into the down projection of the previous one).  A residual Bilinear
    that absorbs a Linear has its skip made explicit as extra hidden units.
    Returns a single layer when the model has at most one Bilinear layer."""
    layers = list(model.layers)
    changed = True
    while changed and len(layers) > 1:
        changed = False
        for k in range(len(layers) - 1):
            merged = _compose(layers[k], layers[k + 1])
            if merged is not None:
                layers[k : k + 2] = [merged]
                changed = True
                break
    return layers[0] if len(layers) == 1 else Sequential(*layers)


def _residual_of(inner: Component | None, path: str) -> Component:
    """x + inner(x) as one layer."""
    if inner is None:
        raise AdapterError(path, "residual around the identity (2 x) is not a tsalgebra layer; "
                                 "use a Linear with weight 2 I")
    folded = fold_linear(inner)
    if isinstance(folded, BilinearAttention) and not folded.residual:
        return folded.replace(residual=True)
    if isinstance(folded, (Linear, Bilinear)):
        try:
            return folded.with_residual()
        except ValueError as exc:
            raise AdapterError(path, str(exc)) from None
    raise AdapterError(
        path,
        f"residual around {len(folded.layers)} polynomial layers ({folded!r}); tsalgebra layers carry a skip "
        "around one bilinear layer only. Wrap each bilinear block in its own Residual.")


# ------------------------------------------------------------ built-in adapters


class _Flatten:
    """Marks where an nn.Flatten stood (at ``path``) among a module's converted
    children: the layers after it read all positions at once, not one
    position each."""

    def __init__(self, path: str) -> None:
        self.path = path


# from_torch's n_ctx= while it converts: the number of token positions where
# the weights fix none (an nn.Embedding then layers that all act per position
# run on any number of tokens), and the length every attention is bound at
_N_CTX: contextvars.ContextVar[int | None] = contextvars.ContextVar("tsalgebra_from_torch_n_ctx", default=None)


def _seq(module: nn.Sequential, path: str) -> Component | None:
    return _sequence(_children(module, path), path)


def _children(module: nn.Module, path: str) -> list[Any]:
    """The converted children in order (see :func:`_part`)."""
    # _modules, not named_children(): that skips a module used twice (a shared projection at 0 and 2 was
    # converted as two layers, the forward check then blaming an adapter)
    return [p for name, child in module._modules.items() if child is not None
            for p in _part(child, _child(path, name))]


def _part(child: nn.Module, path: str) -> list[Any]:
    """One child converted: a _Flatten for an nn.Flatten, a plain
    nn.Sequential's children read in line (where a Flatten stands decides
    which layers act per position, whatever the nesting), else the child."""
    if type(child) is nn.Sequential:
        return _children(child, path)
    return [_Flatten(path) if isinstance(child, nn.Flatten) else convert(child, path)]


def _sequence(parts: list[Any], path: str) -> Component | None:
    """The converted children (None for the identity, a _Flatten for an
    nn.Flatten) as one component."""
    kept = [p for p in parts if p is not None and not isinstance(p, _Flatten)]
    flat = next((k for k, p in enumerate(parts) if isinstance(p, _Flatten)), None)
    where = path
    if flat is not None:  # the first flat layer's index among those kept
        where = parts[flat].path
        flat = sum(p is not None for p in parts[:flat])
    if not kept:
        return None
    late = next((p for p in kept[1:] if p.token_input is not None), None)
    if late is not None:  # else only the forward check would fail, on token ids given to the first layer
        raise AdapterError(path, f"{late!r} follows {kept[0]!r}: an nn.Embedding reads token ids, so it must be "
                                 "the first layer")
    try:
        # one layer too: an nn.Embedding alone before a Flatten reads as many tokens as torch is given
        layers = _per_position(kept, flat, where)
        return layers[0] if len(layers) == 1 else Sequential(*layers)
    except ValueError as exc:
        raise AdapterError(path, str(exc)) from None


QKV_NAMES = ("qkv", "c_attn", "in_proj")  # a fused projection of d_model to 5 d_model: q1, k1, q2, k2, v
OUT_NAMES = ("o", "out", "proj", "out_proj", "o_proj", "c_proj")
HEAD_ATTRS = ("n_head", "n_heads", "heads", "num_heads")
CHECK_POSITIONS = 4  # the sequence length a fused attention is checked (and bound) at when it names none


def _fused_attention_candidates(module: nn.Module, path: str) -> list[tuple[str, Callable[[], Component | None]]]:
    """Readings of a bilinear attention with a fused projection ``qkv:
    nn.Linear(d, 5 d)`` split into q1, k1, q2, k2, v (heads by reshape, each
    score divided by sqrt(d_head)) and an output map: causal or not, residual
    or not, rotary none, interleaved or rotate-half (base 10,000); each is
    checked against the forward and the one that matches is kept."""
    qkv = next((m for n, m in _attr_linear(module, QKV_NAMES)), None)
    o = next((m for n, m in _attr_linear(module, OUT_NAMES)), None)
    heads = next((getattr(module, a) for a in HEAD_ATTRS if isinstance(getattr(module, a, None), int)), None)
    if qkv is None or o is None or heads is None or qkv.weight.shape[0] != 5 * qkv.weight.shape[1]:
        return []
    d = qkv.weight.shape[1]
    if d % heads:
        return []
    n = getattr(module, "n_ctx", None) or CHECK_POSITIONS
    out = []
    for rotary in (None, "interleaved", "rotate_half"):
        for causal in (True, False):
            for residual in (True, False):
                what = (f"fused q1, k1, q2, k2, v = qkv(x).chunk(5, -1), {heads} heads, scores / sqrt(d_head), "
                        f"{'causal' if causal else 'not causal'}, rotary {rotary or 'none'}, "
                        f"{'residual' if residual else 'no residual'}")
                out.append((what, lambda rotary=rotary, causal=causal, residual=residual: _fused_attention(
                    qkv, o, heads, d, n, rotary, causal, residual, path)))
    return out


def _fused_attention(qkv: nn.Linear, o: nn.Linear, heads: int, d: int, n: int, rotary: str | None, causal: bool,
                     residual: bool, path: str) -> Component:
    from .layouts import _rotate_half_to_pairs

    dh = d // heads
    W, b = _np(qkv.weight).reshape(5, heads, dh, d), _np(qkv.bias)
    b = None if b is None else b.reshape(5, heads, dh)
    order = _rotate_half_to_pairs(dh) if rotary == "rotate_half" else np.arange(dh)
    w: dict[str, Any] = {}
    for k, name in enumerate(("q1", "k1", "q2", "k2", "v")):
        perm = order if name != "v" else np.arange(dh)
        w[name], w[f"{name}_bias"] = W[k][:, perm], None if b is None else b[k][:, perm]
    w["o"], w["o_bias"] = _np(o.weight).reshape(-1, heads, dh).transpose(1, 0, 2), _np(o.bias)
    return BilinearAttention(**w, causal=causal, rotary_base=None if rotary is None else 10000.0, scale=1.0 / dh,
                             residual=residual, n_ctx=n, name=_name("BilinearAttention", path))


def _stack_of(module: nn.Module, path: str, residual: bool) -> Component | None:
    """A module whose forward runs its children in order, looping over the
    blocks of its ModuleList(s) (``x = x + block(x)`` when ``residual``):
    a reading of the forward, accepted only if it matches it."""
    parts: list[Any] = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                p = convert(block, _child(path, f"{name}.{i}"))
                parts.append(_residual_of(p, _child(path, f"{name}.{i}")) if residual else p)
        else:
            parts.extend(_part(child, _child(path, name)))
    return _sequence(parts, path)


def _per_position(parts: list[Component], flat: int | None = None, where: str = "") -> list[Component]:
    """Torch's layers act on the last axis: beside an attention layer over
    n_ctx positions every Linear or Bilinear layer acts per position (up to
    an nn.Flatten after the attention, at index ``flat`` and module path
    ``where``: the layers from there on read every position at once), and a
    token embedding reads one token per position (before flat layers, as many
    tokens as the next layer's width holds; else from_torch's n_ctx=, one
    token without it, and refused where a Flatten ends the model: there the
    one-token model is no reading of torch's)."""
    want = _N_CTX.get()
    if want is not None:  # from_torch(n_ctx=): attention read at that length, as torch's runs at any
        parts = [p.at(want) if isinstance(p, BilinearAttention) else p for p in parts]
    n = next((p.n_ctx for p in parts if isinstance(p, BilinearAttention) and p.n_ctx), None)
    if n is not None:
        first = next(k for k, p in enumerate(parts) if isinstance(p, BilinearAttention))
        end = len(parts) if flat is None or flat <= first else flat
        if want is not None and end < len(parts):  # a layer after the Flatten: its width fixes the positions
            before = parts[end - 1]
            _fits(want, parts[end], before.d_out if isinstance(before, BilinearAttention) else before.out_features,
                  where)
        return [PositionWise(p, n) if isinstance(p, (Linear, Bilinear)) and k < end else p
                for k, p in enumerate(parts)]
    if not isinstance(parts[0], Embedding):
        return parts
    if flat is not None and 0 < flat < len(parts):  # per token up to the flat layers (nn.Flatten)
        end: int | None = flat
    elif len(parts) > 1 and parts[1].in_features > parts[0].out_features:
        end = 1  # several tokens' width without an nn.Flatten (a forward flattening in code): the check decides
    else:
        end = None
    if end is not None:  # the width of the layer after the flat ones fixes the number of tokens
        width, d = parts[end].in_features, parts[end - 1].out_features
        fixed = width // d if width % d == 0 else None
        if want is not None:
            _fits(want, parts[end], d, where)
        if fixed is not None and fixed > 1:
            return [PositionWise(p, fixed) for p in parts[:end]] + parts[end:]
        return parts
    # every layer acts per position: torch runs the model on any number of tokens, and no weight fixes one
    if want is not None:
        return [PositionWise(p, want) if isinstance(p, (Linear, Bilinear)) else p for p in parts]
    if flat is not None and flat == len(parts):
        # a Flatten over the positions ends the model: read at one token it would refuse the (batch, n) ids
        # torch takes, or give (batch, d) where the guide promises (batch, positions, d)
        raise ValueError(f"the nn.Flatten at {where or '<root>'} flattens the token positions of a model whose "
                         f"layers all act per position ({parts[0]!r} first, no attention, no layer after the "
                         "Flatten): torch runs it on any number of tokens, and its weights fix none. Pass "
                         "from_torch(module, n_ctx=N) with N the number of token positions; the model then reads "
                         "(batch, N) token ids and gives (batch, N, d_out), torch's (batch, N x d_out) per position")
    return parts


def _fits(want: int, layer: Component, d: int, where: str) -> None:
    """Refuse from_torch's n_ctx= where ``layer``, after the nn.Flatten at
    ``where``, reads another number of positions of ``d`` features (a
    mismatch of widths is left to the Sequential, which names it)."""
    width = layer.in_features
    if width % d == 0 and width // d != want:
        raise ValueError(f"n_ctx={want} was given, but {layer!r} after the nn.Flatten at {where or '<root>'} reads "
                         f"{width} features: {width // d} token positions of {d}, fixed by its weights")


def _embedding(module: nn.Embedding, path: str) -> Embedding:
    # refused by name: with max_norm the lookup rescales rows (the forward
    # check would only report a mismatch, without saying why)
    if module.max_norm is not None:
        raise AdapterError(path, f"Embedding(max_norm={module.max_norm}) rescales each row it looks up to at most "
                                 "that norm (and rewrites its weight in place): not a fixed table of the token. "
                                 "Renormalise the weight once, then set max_norm=None")
    return Embedding(module.weight.detach().T, name=f"Embedding[{path}]" if path else "Embedding")


def _dropout(module: nn.Module, path: str) -> None:
    if module.training and float(getattr(module, "p", 0.0)) > 0:
        raise AdapterError(path, f"{type(module).__name__}(p={module.p}) is in train mode: it is random, not a "
                                 "polynomial. Call model.eval() first (dropout is then the identity)")
    return None


register_adapter(nn.Linear, lambda m, p: _linear(m, p))
register_adapter(nn.Identity, lambda m, p: None)
register_adapter(nn.Flatten, lambda m, p: None)  # inputs are held flat, position-major already
register_adapter(nn.Embedding, lambda m, p: _embedding(m, p))
register_adapter(nn.Sequential, _seq)
register_adapter(BilinearLayer, lambda m, p: _bilinear(m.left, m.right, m.down, p))
register_adapter(BilinearAttentionModule, attention_adapter)
register_adapter(Residual, lambda m, p: _residual_of(convert(m.inner, _child(p, "inner")), p))
for _cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
    register_adapter(_cls, _dropout)

# classes refused with a specific reason (matched along the MRO)
_REFUSED: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.Softplus, nn.Mish, nn.Hardtanh,
      nn.PReLU, nn.SELU, nn.CELU, nn.GLU, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign),
     "is a non-polynomial activation; tensor-based models are multilinear (use a bilinear layer instead)"),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin), "is a softmax, not a polynomial"),
    ((nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer),
     "is softmax attention, not a polynomial; only bilinear attention has an adapter (register_adapter)"),
    ((nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm),
     "is a normalization (a division by a data-dependent norm), not a polynomial"),
    ((nn.EmbeddingBag,), "sums several tokens' embeddings per sample; use nn.Embedding (one token per position)"),
    ((nn.Bilinear,), "takes two inputs (torch's x1^T A x2); tsalgebra bilinear layers take one input x twice"),
    ((nn.ModuleList, nn.ModuleDict), "has no forward of its own; convert its elements or wrap them in nn.Sequential"),
)


def _refusal(module: nn.Module) -> str | None:
    for classes, why in _REFUSED:
        if isinstance(module, classes):
            return f"{type(module).__name__} {why}"
    return None


# ------------------------------------------------------------ conventions


class _HeldFactor:
    """A factor held as a bare ``nn.Parameter`` (2-D) under a recognised name,
    read as a linear map: ``weight`` (out, in), stored that way or (in, out)
    for ``x @ W`` (``transposed``); its bias is the parameter ``<name>_bias``
    or ``b_<name>`` when there is one."""

    def __init__(self, module: nn.Module, name: str, transposed: bool) -> None:
        w = module._parameters[name]
        self.weight = w.T if transposed else w
        self.bias = module._parameters.get(f"{name}_bias", module._parameters.get(f"b_{name}"))


def _attr_linear(module: nn.Module, names: Iterable[str], held: str = "") -> list[tuple[str, Any]]:
    """The linear maps under ``names``: ``nn.Linear`` children, or (``held``
    "out_in" / "in_out") 2-D parameters read in that orientation."""
    found = []
    children = dict(module.named_children())
    for n in names:
        sub = children.get(n)
        if not held and isinstance(sub, nn.Linear) and type(sub).forward is nn.Linear.forward:
            found.append((n, sub))
        p = module._parameters.get(n)
        if held and p is not None and p.dim() == 2:
            found.append((n, _HeldFactor(module, n, held == "in_out")))
    return found


def _candidates(module: nn.Module, path: str) -> list[tuple[str, Callable[[], Component | None]]]:
    """Interpretations of an unregistered module by attribute conventions,
    each a (description, builder) pair to be checked against the forward."""
    out: list[tuple[str, Callable[[], Component | None]]] = []
    for held in ("", "out_in", "in_out"):  # nn.Linear children; parameters held as (out, in) or (in, out)
        lefts = _attr_linear(module, LEFT_NAMES, held)
        rights = _attr_linear(module, RIGHT_NAMES, held)
        downs = _attr_linear(module, DOWN_NAMES, held)
        fused = _attr_linear(module, FUSED_NAMES, held)
        how = f" (parameters held {held.replace('_', ', ')})" if held else ""
        for ln, lm in lefts:
            for rn, rm in rights:
                for dn, dm in downs:
                    if len({id(lm), id(rm), id(dm)}) == 3:
                        out.append((f"bilinear {dn}({ln}(x) * {rn}(x)){how}",
                                    lambda lm=lm, rm=rm, dm=dm: _bilinear(lm, rm, dm, path)))
        for fn_, fm in fused:
            for dn, dm in downs:
                if dm is not fm:
                    out.append((f"fused bilinear {dn}(l * r) with l, r = {fn_}(x).chunk(2, -1){how}",
                                lambda fm=fm, dm=dm: _fused(fm, dm, path)))
    if isinstance(module, nn.Linear):
        out.append(("Bilinear(nn.Linear): l * r with l, r = linear(x).chunk(2, -1)",
                    lambda: _fused(module, None, path)))
    out += _fused_attention_candidates(module, path)
    kids = list(module.named_children())
    if any(isinstance(child, nn.ModuleList) for _, child in kids):  # a forward looping over blocks
        for residual in (True, False):
            what = "x + block(x)" if residual else "block(x)"
            out.append((f"children in order, each block of the ModuleList applied as {what}",
                        lambda residual=residual: _stack_of(module, path, residual)))
    if len(kids) == 1 and kids[0][0] in WRAPPER_NAMES:
        name, child = kids[0]
        out.append((f"residual x + {name}(x)",
                    lambda: _residual_of(convert(child, _child(path, name)), path)))
        out.append((f"wrapper {name}(x)", lambda: convert(child, _child(path, name))))
    return out


def _nonpolynomial_children(module: nn.Module, path: str) -> list[str]:
    found = []
    for name, sub in module.named_modules():
        if name and _refusal(sub) is not None:
            found.append(f"{_child(path, name)} ({type(sub).__name__})")
    return found


def _by_convention(module: nn.Module, path: str) -> Component | None:
    cands = _candidates(module, path)
    cls = type(module).__name__
    bad = _nonpolynomial_children(module, path)
    if not cands:
        hint = f"; it contains {', '.join(bad)}" if bad else ""
        raise AdapterError(
            path,
            f"no adapter for {cls}{hint}. Recognized: nn.Linear, nn.Sequential, Residual, BilinearLayer, "
            "modules with left/right/down (or fused) Linear attributes (see docs/user-guide.md), or register one "
            f"with tsalgebra.register_adapter({cls}, fn)")
    tried = []
    child_error: AdapterError | None = None
    best: tuple[float, Component] | None = None
    for what, build in cands:
        try:
            model = build()
        except AdapterError as exc:
            if exc.path != (path or "<root>"):  # a child failed under this reading; another may not need it
                child_error = child_error or exc
                continue
            tried.append(f"{what}: {exc.args[0].split(': ', 1)[-1]}")
            continue
        if model is None:
            continue
        err, how = _forward_mismatch(module, model, path)  # on the module's own kind of input (token ids, sequences)
        if err > _CHECK_RTOL:
            tried.append(f"{what}: forward differs ({how})")
        elif best is None or err < best[0]:
            # the closest reading, not the first: where a residual dominates the outputs, a wrong rotary
            # or mask was within 1e-6 (at init 1e-3, within 1e-14) of the largest output; every reading
            # is tried, since no error level tells the module's own rounding from a wrong reading's
            best = (err, model)
    if best is not None:
        return best[1]
    if child_error is not None:
        raise child_error  # that error names the real culprit
    hint = f"; it contains {', '.join(bad)}" if bad else ""
    raise AdapterError(
        path,
        f"{cls} looks like a known layout by its attributes, but its forward matches none of them{hint} "
        f"(tried: {'; '.join(tried)}). Register an adapter with tsalgebra.register_adapter({cls}, fn)")


# ---------------------------------------------------------------- public


def convert(module: nn.Module, path: str = "") -> Component | None:
    """Convert one module found at ``path`` (the dotted name of
    ``named_modules()``; "" for the root), or None when it is the identity.
    Registered adapters call this on children so errors name the right path."""
    if not isinstance(module, nn.Module):
        raise AdapterError(path, f"expected a torch nn.Module, got {type(module).__name__}")
    fn = _lookup(module)
    if fn is not None:
        try:
            result = fn(module, path)
        except AdapterError:
            raise
        except (ValueError, TypeError) as exc:
            raise AdapterError(path, f"{type(module).__name__}: {exc}") from exc
        if result is not None and not isinstance(result, Component):
            raise AdapterError(path, f"the adapter for {type(module).__name__} returned {type(result).__name__}, "
                                     "not a tsalgebra component or None")
        return result
    why = _refusal(module)
    if why is not None:
        raise AdapterError(path, why)
    return _by_convention(module, path)


def _hooks(module: nn.Module) -> list[str]:
    """The module paths carrying forward hooks or pre-hooks (and the global ones)."""
    found = [f"{name or '<root>'} ({type(sub).__name__})" for name, sub in module.named_modules()
             if sub._forward_hooks or sub._forward_pre_hooks]
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        found.append("every module (global hooks: torch.nn.modules.module.register_module_forward_hook)")
    return found


def _forward_mismatch(module: nn.Module, model: Component, path: str = "") -> tuple[float, str]:
    """Largest relative difference between ``module`` and ``model`` on random
    inputs of the module's own kind (token ids for a model that reads
    tokens, (batch, n_ctx, d) sequences for a sequence model, vectors else),
    and what it was: the error, or why the module's forward gave none.  A
    mismatch of a forward returning float16 or bfloat16 (floats under 32
    bits) is an AdapterError at ``path`` saying so: that rounding, not the
    conversion, may be why."""
    from .problem import positions_of

    gen = torch.Generator().manual_seed(1)
    n = positions_of(model)
    samples = _CHECK_SAMPLES_NARROW if model.in_features <= _NARROW_FEATURES else _CHECK_SAMPLES
    tokens = model.token_input
    if tokens is not None:
        x = torch.randint(0, tokens[0], (samples, tokens[1]), generator=gen)
        if tokens[0] <= _COVERED_VOCAB:  # every token id once, shuffled over the positions
            ids = torch.randperm(-(-tokens[0] // tokens[1]) * tokens[1], generator=gen) % tokens[0]
            x = torch.cat([x, ids.reshape(-1, tokens[1])])
            samples = len(x)
        shaped = x
    else:
        x = torch.randn(samples, model.in_features, generator=gen, dtype=torch.float64)
        shaped = x.reshape(samples, n, -1) if n > 1 else x
    params = {k: v.detach().to(torch.float64) if v.is_floating_point() else v
              for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    try:
        with torch.no_grad():
            want = torch.func.functional_call(module, params, (shaped,))
    except Exception as exc:  # noqa: BLE001 - the module's own forward failed on its inputs: said, as it failed
        text = message_of(exc)
        return float("inf"), (f"its forward raised {type(exc).__name__} in float64: "
                              + (UNPRINTABLE if text is None else text[:200]))
    if not isinstance(want, torch.Tensor) or want.numel() != samples * model.out_features:
        what = (f"{want.numel() // samples} outputs per input" if isinstance(want, torch.Tensor)
                else f"a {type(want).__name__}")
        return float("inf"), f"its forward returned {what}, the conversion {model.out_features} outputs"
    # float64 even where the forward casts down (bfloat16 has no numpy dtype to convert from)
    want_np = want.detach().reshape(samples, -1).to(torch.float64).numpy()
    flat = np.asarray(model.one_hot(x.numpy()), dtype=float)  # token ids one-hot; vectors as they are
    got = np.asarray(model.evaluate_flat(flat), dtype=float).reshape(samples, -1)
    # Each output relative to its own size, with no absolute floor: under a floor of 1, a hidden ReLU in a
    # layer scaled by 1e-7 passed; against the largest output of all, a ReLU on an output 1e7 times smaller
    # than another passed.  An output under _CHECK_FLOOR of the largest is measured against that floor, so an
    # output that is (nearly) zero is not failed on round-off.  (A floor from the forward on |weights| and
    # |inputs|, meant for outputs that cancel, grew with the degree: 1e13 times the outputs at depth 3, and
    # every check passed.)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(got - want_np).max(axis=0)  # per output, over the samples
        size = np.abs(want_np).max(axis=0)
    if not (np.isfinite(err).all() and np.isfinite(size).all()):
        return float("inf"), "non-finite outputs"
    if size.max() == 0:  # zero against zero is a match; anything against zero, all of it differs
        return (0.0 if err.max() == 0 else float("inf")), "all of the module's outputs are zero"
    per = err / np.maximum(size, _CHECK_FLOOR * size.max())
    worst = int(per.argmax())
    rel = float(per[worst])
    if rel > _CHECK_RTOL and want.is_floating_point() and torch.finfo(want.dtype).bits < 32:
        raise AdapterError(path, f"{type(module).__name__}'s forward returns {want.dtype} outputs even with float64 "
                                 f"weights (max relative error {rel:.3g} against the conversion on random inputs): "
                                 "too coarse to check the conversion to float64 precision; convert the module to "
                                 "float32 or float64 first (module.double()), its forward casting nothing down")
    return rel, f"max relative error {rel:.3g} on random inputs, at output {worst}"


def from_torch(module: Any, *, check: bool = True, n_ctx: int | None = None) -> Component:
    """The tsalgebra model computing the same function as ``module``.

    ``module`` is an ``nn.Module`` (a tsalgebra component is returned as is).
    Raises :class:`AdapterError` (a ValueError) naming the module path of the
    first part that is not a polynomial layer or has no adapter, of a module
    carrying forward hooks or pre-hooks (what a hook does is not in the
    weights: remove it, or convert a copy without it), and when the whole
    module is the identity.  Every conversion, registered adapters included,
    is checked against the module's own forward on random inputs (float64,
    each output's error <= 1e-6 of that output's own largest value, however
    small, an output under 1e-6 of the largest measured against that) before
    it is returned; ``check=False`` skips
    that comparison (one forward pass of each on 8 inputs) for models too
    large to run, and then nothing verifies the adapters' output.  Weights
    are copied as float64; the module is not modified (train/eval mode
    included).

    ``n_ctx``: the number of token positions to convert a sequence model at.
    Required where the weights fix none and a Flatten ends the model (an
    ``nn.Embedding`` then layers that all act per position, then
    ``nn.Flatten``: torch runs it on any number of tokens); without a Flatten
    such a model is read at one token unless ``n_ctx`` is given.  Attention
    layers are bound at ``n_ctx`` (their module's own ``n_ctx`` replaced).
    Refused where the weights fix another number of positions (a layer after
    a Flatten reading ``k x d`` features) or the model reads no tokens.
    """
    if n_ctx is not None:
        if not (isinstance(n_ctx, numbers.Integral) and not isinstance(n_ctx, bool) and n_ctx > 0):
            raise AdapterError("", f"n_ctx={n_ctx!r}: the number of token positions must be a positive integer")
        n_ctx = int(n_ctx)
    if isinstance(module, Component):
        if n_ctx is not None:  # not converted here: its positions are its own
            raise AdapterError("", f"n_ctx={n_ctx} was given with a tsalgebra model ({module!r}), which is returned "
                                   "as is; rebind its positions with .replace(n_ctx=...) or .at(n_ctx)")
        return module
    if isinstance(module, nn.Module):
        lazy = [(name, sub) for name, sub in module.named_modules()
                if any(isinstance(p, nn.parameter.UninitializedParameter) for p in sub.parameters(recurse=False))]
        if lazy:  # before the hooks: the pre-hook a lazy module carries infers its shapes, and is not the cause
            name, sub = lazy[0]
            raise AdapterError(name, f"{type(sub).__name__} is uninitialised (a lazy module has no weights until its "
                                     "first forward): run one forward pass on an input first")
        hooked = _hooks(module)
        if hooked:
            raise AdapterError("", f"forward hooks or pre-hooks on {', '.join(hooked)}: a hook changes what the "
                                   "module computes, and tsalgebra converts its weights; remove the hooks "
                                   "(handle.remove()) or convert a copy without them")
    token = _N_CTX.set(n_ctx)
    try:
        model = convert(module, "")
    finally:
        _N_CTX.reset(token)
    if model is not None and n_ctx is not None:
        model = _at_n_ctx(model, n_ctx)
    if model is None:
        raise AdapterError("", f"{type(module).__name__} converts to the identity (only skipped parts); "
                               "there is no layer to compare")
    if check:
        try:
            err, how = _forward_mismatch(module, model)
        except ValueError as exc:  # an attention with no positions bound: its width is not known
            if isinstance(exc, AdapterError):
                raise
            raise AdapterError("", f"{exc}: pass from_torch(module, n_ctx=...)") from None
        if not err <= _CHECK_RTOL:
            raise AdapterError("", f"the converted model differs from {type(module).__name__}'s own forward "
                                   f"({how}): an adapter "
                                   "(registered or provided) does not compute what the module does; "
                                   "check=False skips this comparison")
    return model


def _at_n_ctx(model: Component, n_ctx: int) -> Component:
    """``model`` over ``n_ctx`` positions: a bare embedding at every position,
    a model not converted through a Sequential (an attention alone) rebound;
    a model of no token positions refused (n_ctx would say nothing)."""
    from .problem import positions_of

    keys = [k for k in model.settings() if k == "n_ctx" or k.endswith(".n_ctx")]
    if model.token_input is None and not keys:
        raise AdapterError("", f"n_ctx={n_ctx} was given, but {model!r} reads no token positions (no nn.Embedding, "
                               "no attention): n_ctx is for sequence models; leave it out")
    have = model.token_input[1] if model.token_input is not None else positions_of(model)
    if have == n_ctx:
        return model
    if isinstance(model, Embedding):  # nn.Embedding alone: torch looks up every position's token
        return PositionWise(model, n_ctx)
    try:
        return model.replace(**{k: n_ctx for k in keys})
    except ValueError as exc:
        raise AdapterError("", f"n_ctx={n_ctx}: {model!r} cannot be read at {n_ctx} positions ({exc})") from None


def to_torch(model: Component, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A torch module computing ``model`` (Linear -> nn.Linear, Bilinear ->
    :class:`BilinearLayer`, wrapped in :class:`Residual` when residual,
    Sequential -> nn.Sequential).  Float weights only."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a torch floating dtype (torch.float32, torch.float64), got {dtype!r}")
    def t(a: np.ndarray | None) -> nn.Parameter | None:
        return None if a is None else nn.Parameter(torch.as_tensor(np.asarray(a, dtype=float), dtype=dtype))

    def lin(w: np.ndarray, b: np.ndarray | None) -> nn.Linear:
        m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=dtype)
        m.weight = t(w)
        if b is not None:
            m.bias = t(b)
        return m

    def one(layer: Component) -> nn.Module:
        if isinstance(layer, Linear):
            return lin(layer.weight, layer.bias)
        if isinstance(layer, Bilinear) and type(layer).network is Bilinear.network:
            m = BilinearLayer(layer.in_features, layer.hidden, layer.out_features)
            m.left, m.right, m.down = (lin(layer.left, layer.left_bias), lin(layer.right, layer.right_bias),
                                       lin(layer.down, layer.down_bias))
            return Residual(m) if layer.residual else m
        raise TypeError(f"to_torch: no torch module for {layer!r}")

    if isinstance(model, Sequential):
        return nn.Sequential(*(one(layer) for layer in model.layers))
    return one(model)
