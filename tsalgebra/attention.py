"""Sequence models: bilinear attention, position-wise layers, transformers.

A sequence x of shape (n_ctx, d) is held flat, position-major, as one padded
vector x~ = [1; x_1; ...; x_n] of width 1 + n_ctx d, so a sequence model is
an ordinary component on that width and every inner product applies.  The
constant channel is one coordinate shared by all positions: it is 1 at every
position, perfectly correlated across them.  Under the Gaussian measure the
positions are independent with a shared per-feature mean and covariance
(tiled by :meth:`tsalgebra.measure.Gaussian.at`).

Bilinear attention, per head: score[i, j] = scale * mask[i, j] *
(Q1 x~_i . K1 x~_j)(Q2 x~_i . K2 x~_j), output[i] = sum_j score[i, j] O V x~_j,
heads summed.  In the network each of the five input legs reaches its
position through a selection tensor S[p, f, u] (x~_p = S_p x~).  An extra
"virtual" head with the diagonal mask, all four factors reading the constant
channel, V = identity and O = [[1, 0], [bias, I or 0]] writes the constant
channel, the output bias and the residual, so the whole layer is one network.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

import numpy as np

from .components import Bilinear, Component, Linear, PositionWise, Sequential, as_bias, as_weight, zeros
from .expr import Network, Tensor

__all__ = ["BilinearAttention", "Transformer", "position_wise", "rotary_matrices"]


def _selection(n: int, d: int, exact: bool) -> np.ndarray:
    """S[p, f, u]: the padded features of position p inside the flat padded input."""
    S = zeros((n, d + 1, 1 + n * d), exact)
    for p in range(n):
        S[p, 0, 0] = 1
        for f in range(d):
            S[p, 1 + f, 1 + p * d + f] = 1
    return S


# Elements of one block of the direct forward's largest arrays (32 MiB).
_FORWARD_ELEMENTS = 2**22


def rotary_matrices(positions: Any, dh: int, base: float) -> np.ndarray:
    """Rot[p, e, e'] (len(positions), dh, dh): the rotary position embedding
    (RoPE) at each position p (``positions``: an int n for 0..n-1, or any
    positions, negative ones included), rotating consecutive pairs (2k, 2k+1)
    of a head's dh dimensions by p * base^(-2k/dh); an odd last dimension is
    left alone.  Rotations compose: Rot_i' Rot_j = Rot_(j - i)."""
    p = np.arange(positions) if np.ndim(positions) == 0 else np.asarray(positions)
    angle = p[:, None] * base ** (-2 * np.arange(dh // 2) / dh)  # (positions, pairs)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.zeros((len(p), dh, dh))
    k = 2 * np.arange(dh // 2)
    rot[:, k, k], rot[:, k, k + 1], rot[:, k + 1, k], rot[:, k + 1, k + 1] = c, -s, s, c
    if dh % 2:
        rot[:, -1, -1] = 1.0
    return rot


class _Sequence:
    """Evaluation of flat components on sequences (..., n_ctx, d)."""

    n_ctx: int
    d_model: int
    out_features: int

    @property
    def per_position_output(self) -> bool:
        return True

    def __call__(self, x: Any) -> Any:
        ids = self.one_hot(x)  # type: ignore[attr-defined]
        if ids is not x:  # token ids: one-hot, flat
            single = len(ids.shape) == 1
            out = Component.__call__(self, ids[None] if single else ids)  # type: ignore[arg-type]
            out = out.reshape(out.shape[0], self.n_ctx, -1)
            return out[0] if single else out
        if len(x.shape) == 2 and x.shape == (self.n_ctx, self.d_model):
            return self(x[None])[0]
        if len(x.shape) != 3 or tuple(x.shape[1:]) != (self.n_ctx, self.d_model):
            raise ValueError(f"{self!r} takes sequences of shape (batch, {self.n_ctx}, {self.d_model}), got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        out = Component.__call__(self, flat)  # type: ignore[arg-type]
        return out.reshape(x.shape[0], self.n_ctx, -1)


class BilinearAttention(_Sequence, Component):
    """Bilinear attention over ``n_ctx`` positions (see the module docstring).

    q1, k1, q2, k2, v: (heads, d_head, d_model); o: (heads, d_model, d_head).
    Optional biases: q1_bias, k1_bias, q2_bias, k2_bias, v_bias (heads, d_head)
    and o_bias (d_model,).  ``causal`` zeroes score[i, j] for j > i;
    ``rotary_base`` rotates query and key vectors by position (RoPE);
    ``residual`` adds x.  Quadratic attention (q . k)^2 is q1 = q2, k1 = k2:
    only then is the exchange of the two query-key factors (both query legs
    and both key legs at once) declared as a symmetry of the expression.

    Fields: the twelve weights above, in that order (absent biases: None);
    settings ``causal``, ``rotary_base``, ``scale``, ``residual``, ``n_ctx``
    (None until bound).
    """

    weight_fields = ("q1", "k1", "q2", "k2", "v", "o", "q1_bias", "k1_bias", "q2_bias", "k2_bias", "v_bias", "o_bias")
    setting_fields = ("causal", "rotary_base", "scale", "residual", "n_ctx")
    _PROJECTIONS = ("q1", "k1", "q2", "k2", "v")  # the maps of x with a (heads, d_head) bias each

    def __init__(self, q1: Any, k1: Any, q2: Any, k2: Any, v: Any, o: Any, causal: bool = False,
                 rotary_base: float | None = None, scale: float = 1.0, residual: bool = False, *,
                 n_ctx: int | None = None, q1_bias: Any = None, k1_bias: Any = None, q2_bias: Any = None,
                 k2_bias: Any = None, v_bias: Any = None, o_bias: Any = None, name: str = "BilinearAttention") -> None:
        self.name = name
        self.q1, self.k1, self.q2, self.k2, self.v, self.o = (
            as_weight(w, k, name, 3) for k, w in (("q1", q1), ("k1", k1), ("q2", q2), ("k2", k2), ("v", v), ("o", o)))
        H, dh, d = self.q1.shape
        for k in ("k1", "q2", "k2", "v"):
            w = getattr(self, k)
            if w.shape[0] != H or w.shape[2] != d:
                raise ValueError(f"{name}: {k} has shape {w.shape}, expected ({H}, d_head, {d})")
        if self.k1.shape[1] != dh or self.q2.shape[1] != self.k2.shape[1]:
            raise ValueError(f"{name}: query and key head widths differ")
        if self.o.shape[0] != H or self.o.shape[2] != self.v.shape[1]:
            raise ValueError(f"{name}: o has shape {self.o.shape}, expected ({H}, d_out, {self.v.shape[1]})")
        self.heads, self.d_model, self.d_out = H, d, self.o.shape[1]
        shapes = self.bias_shapes()
        self.q1_bias, self.k1_bias, self.q2_bias, self.k2_bias, self.v_bias, self.o_bias = (
            as_bias(b, shapes[k], k, name) for k, b in (("q1_bias", q1_bias), ("k1_bias", k1_bias),
                                                       ("q2_bias", q2_bias), ("k2_bias", k2_bias),
                                                       ("v_bias", v_bias), ("o_bias", o_bias)))
        if getattr(rotary_base, "shape", None) == () and hasattr(rotary_base, "item"):  # a 0-d array or tensor
            rotary_base = rotary_base.item()
        if rotary_base is not None and (isinstance(rotary_base, (bool, np.bool_)) or not isinstance(
                rotary_base, numbers.Real) or not (math.isfinite(float(rotary_base)) and float(rotary_base) > 0)):
            # a base of 0, below 0 or NaN made every forward NaN, blamed on the weights' scale
            raise ValueError(f"{name}: rotary_base must be a positive finite number (RoPE's base, such as 10000) "
                             f"or None, got {rotary_base!r}")
        if isinstance(scale, numbers.Real) and not math.isfinite(float(scale)):
            raise ValueError(f"{name}: scale must be finite, got {scale!r}")
        self.causal, self.rotary_base, self.residual = bool(causal), rotary_base, bool(residual)
        self.scale = scale
        if self.residual and self.d_out != d:
            raise ValueError(f"{name}: residual needs d_out == d_model, got {self.d_out} and {d}")
        if rotary_base is not None and (self.q1.shape[1] != self.q2.shape[1]):
            raise ValueError(f"{name}: rotary needs equal query widths")
        self.n_ctx = 0
        if n_ctx is not None:
            self._bind(n_ctx)

    def _bind(self, n_ctx: int) -> None:
        if n_ctx < 1:
            raise ValueError(f"{self.name}: n_ctx must be positive, got {n_ctx}")
        self.n_ctx = int(n_ctx)

    def _positions(self) -> int:
        if not self.n_ctx:
            raise ValueError(f"{self.name}: set the number of positions first (n_ctx=... or .at(n_ctx))")
        return self.n_ctx

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self._positions() * self.d_model

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return self._positions() * self.d_out

    def at(self, n_ctx: int) -> "BilinearAttention":
        """The same layer over ``n_ctx`` positions."""
        return self.replace(n_ctx=n_ctx)  # type: ignore[return-value]

    @property
    def degree(self) -> int:
        return 5

    def settings(self) -> dict[str, Any]:
        return dict(super().settings(), n_ctx=self.n_ctx or None)

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"{k}_bias": getattr(self, k).shape[:2] for k in self._PROJECTIONS}
        return dict(shapes, o_bias=(self.d_out,))

    def padded_heads(self) -> dict[str, np.ndarray]:
        """The padded per-head maps, by factor: "q1", "k1", "q2", "k2" of
        shape (H+1, d_head, d+1) with the bias in column 0; "v" (H+1, dv,
        d+1) with dv = max(d_head_v, d+1); "o" (H+1, d_out+1, dv).  Head H is
        the virtual head: its four factors read the constant channel, its
        value map is the identity and its output map writes the constant
        channel, the output bias and the residual."""
        exact = self.exact
        H, d = self.heads, self.d_model
        out: dict[str, np.ndarray] = {}
        for k in ("q1", "k1", "q2", "k2"):
            w, b = getattr(self, k), getattr(self, f"{k}_bias")
            P = zeros((H + 1, w.shape[1], d + 1), exact)
            P[:H, :, 1:] = w
            if b is not None:
                P[:H, :, 0] = b
            P[H, 0, 0] = 1  # the virtual head's factors are all 1
            out[k] = P
        w = self.v
        dv = max(w.shape[1], d + 1)
        V = zeros((H + 1, dv, d + 1), exact)
        V[:H, : w.shape[1], 1:] = w
        if self.v_bias is not None:
            V[:H, : w.shape[1], 0] = self.v_bias
        for f in range(d + 1):
            V[H, f, f] = 1
        O = zeros((H + 1, self.d_out + 1, dv), exact)
        O[:H, 1:, : w.shape[1]] = self.o
        O[H, 0, 0] = 1
        if self.o_bias is not None:
            O[H, 1:, 0] = self.o_bias
        if self.residual:
            for f in range(d):
                O[H, 1 + f, 1 + f] = 1
        out["v"], out["o"] = V, O
        return out

    def score_mask(self) -> np.ndarray:
        """(H+1, n, n): the factor each score[i, j] is multiplied by, per head:
        ``scale`` where position i attends to j (j <= i when causal), else 0;
        the virtual head (last) acts only at j = i, with factor 1."""
        n, H, exact = self._positions(), self.heads, self.exact
        mask = zeros((H + 1, n, n), exact)
        scale = self.scale
        if exact and isinstance(scale, (float, np.floating)):
            scale = Fraction(float(scale))  # the exact rational the float stores, as exactify reads float weights
        reads = np.tril(np.ones((n, n), dtype=bool)) if self.causal else np.ones((n, n), dtype=bool)
        mask[:H, reads] = scale
        mask[H, np.arange(n), np.arange(n)] = 1
        return mask

    def evaluate_flat(self, x: Any) -> Any:
        """The outputs (n, out_features) of a validated batch, by the layer's
        own arithmetic position by position (float weights): the flat
        network's tensors grow as n_ctx^2 d^2 (64 positions at d_model 128:
        9 GB and 15 s for 8 inputs), these as n_ctx^2 per head and input.
        Exact (rational) weights go through the network."""
        if self.exact:
            return super().evaluate_flat(x)
        n, d = self._positions(), self.d_model
        P, mask = self.padded_heads(), self.score_mask()  # heads H+1: the virtual head last
        # every product below is a batched matmul (numpy's einsum of these shapes ran its own loops: 78 ms
        # of the 88 ms forward of 32 inputs at d_model 256, 8 heads of 32, 4 positions, against 9 ms)
        for k in ("q1", "k1", "q2", "k2"):  # (heads, positions or 1, width, d + 1): Rot_p at position p
            P[k] = P[k][:, None] if self.rotary_base is None else \
                np.matmul(rotary_matrices(n, P[k].shape[1], self.rotary_base)[None], P[k][:, None])
        P["v"] = P["v"][:, None]
        P["o"] = np.ascontiguousarray(np.transpose(P["o"], (0, 2, 1)).reshape(-1, P["o"].shape[1]))  # (heads v, c)
        if type(x).__module__.startswith("torch"):  # torch in, torch out (its device and dtype kept)
            import torch

            lib, cat, axes = torch, torch.cat, torch.permute
            P = {k: torch.as_tensor(v, dtype=x.dtype, device=x.device) for k, v in P.items()}
            mask, ones = torch.as_tensor(mask, dtype=x.dtype, device=x.device), lambda *s: torch.ones(s, dtype=x.dtype, device=x.device)
            X, out = x.reshape(len(x), n, d), torch.empty((len(x), n, self.d_out), dtype=x.dtype, device=x.device)
        else:
            lib, cat, ones, axes = np, np.concatenate, lambda *s: np.ones(s), np.transpose
            X, out = np.asarray(x, dtype=float).reshape(len(x), n, d), np.empty((len(x), n, self.d_out))
        H = P["v"].shape[0]
        rows = max(1, _FORWARD_ELEMENTS // (H * n * max(n, P["v"].shape[2], P["q1"].shape[-2])))
        for start in range(0, len(x), rows):  # a block of inputs at a time: the scores take heads x n^2 each
            block = X[start : start + rows]
            b = len(block)
            Xp = axes(cat([ones(b, n, 1), block], 2), (1, 2, 0))[None]  # (1, n, d + 1, b), constant channel first
            if lib is np:  # numpy's matmul of stacked matrices takes its BLAS only for contiguous ones (0.5 GF/s else)
                Xp = np.ascontiguousarray(Xp)
            # a family's forms (b, heads, n, width) from (heads, n or 1, width, d + 1) @ (1, n, d + 1, b)
            q1, k1, q2, k2, values = (axes(lib.matmul(P[k], Xp), (3, 0, 1, 2)) for k in ("q1", "k1", "q2", "k2", "v"))
            scores = lib.matmul(q1, axes(k1, (0, 1, 3, 2))) * lib.matmul(q2, axes(k2, (0, 1, 3, 2))) * mask
            mixed = axes(lib.matmul(scores, values), (0, 2, 1, 3)).reshape(b * n, -1)  # (b n, heads v)
            out[start : start + rows] = lib.matmul(mixed, P["o"]).reshape(b, n, -1)[:, :, 1:]
        return out.reshape(len(x), n * self.d_out)

    def evaluator(self) -> Any:
        return super().evaluator() if self.exact else self.evaluate_flat

    def direct_flops(self, batch: int) -> float | None:
        """Flops of the position-by-position forward (float weights)."""
        if self.exact:
            return None
        n, d, H = self._positions(), self.d_model, self.heads + 1
        w = sum(getattr(self, k).shape[1] for k in ("q1", "k1", "q2", "k2"))
        dv = max(self.v.shape[1], d + 1)
        # forms and values; the two score matrices; scores times values; the output maps
        per_input = 2 * H * n * (d + 1) * (w + dv) + 2 * H * n * n * (w // 2 + dv) + 2 * H * n * dv * (self.d_out + 1)
        return float(batch * per_input)

    def direct_elements(self, batch: int) -> float | None:
        """Elements the position-by-position forward holds at once besides its
        input and output: a block's five forms beside three score matrices
        (two products and theirs), or beside the scores, their product with
        the values and its copy by position, each at most about
        _FORWARD_ELEMENTS, and two copies of the block's padded input."""
        if self.exact:
            return None
        n, H = self._positions(), self.heads + 1
        per_input = H * n * max(n, self.v.shape[1] + 1, *(getattr(self, k).shape[1] + 1 for k in ("q1", "k1", "q2", "k2")))
        rows = min(batch, max(1, _FORWARD_ELEMENTS // per_input))
        return 8.0 * rows * per_input + 2.0 * rows * n * (self.d_model + 1)

    def network(self, symmetric: bool = False, tag: str = "", data: bool = True) -> Network:
        n, d, H = self._positions(), self.d_model, self.heads
        exact = self.exact
        P = self.padded_heads()
        flat_in, flat_out = 1 + n * d, 1 + n * self.d_out

        def tensor(name: str, legs: tuple[str, ...], shape: tuple[int, ...], make: Any) -> Tensor:
            # with data=False only the shape: these tensors grow as n^2 d^2
            return Tensor.of(name, legs, make()) if data else Tensor(name, legs, shape)

        def embedding() -> np.ndarray:
            emb = zeros((n, self.d_out + 1, flat_out), exact)
            for i in range(n):
                emb[i, 0, 0] = Fraction(1, n) if exact else 1.0 / n  # n positions share one constant channel
                for c in range(self.d_out):
                    emb[i, 1 + c, 1 + i * self.d_out + c] = 1
            return emb

        S = _selection(n, d, exact) if data else None
        t = tag
        a, i, j, out = f"a{t}", f"pi{t}", f"pj{t}", f"o{t}"
        tensors = [tensor(f"M{t}", (a, i, j), (H + 1, n, n), self.score_mask),
                   tensor(f"E{t}", (i, f"c{t}", out), (n, self.d_out + 1, flat_out), embedding)]
        inputs = []

        def projection(name: str) -> np.ndarray:
            proj = np.einsum("aef,pfu->aepu", P[name], S, optimize=True)
            if self.rotary_base is not None:
                proj = np.einsum("prs,aspu->arpu", rotary_matrices(n, P[name].shape[1], self.rotary_base), proj)
            return proj

        # one owner tensor per input leg: projection, rotation and position
        # selection folded together, so a pairing network stays small
        for name, pos in (("q1", i), ("k1", j), ("q2", i), ("k2", j)):
            width = f"e{t}1" if name in ("q1", "k1") else f"e{t}2"
            inputs.append(f"u{t}{name}")
            tensors.append(tensor(f"{name.upper()}{t}", (a, width, pos, inputs[-1]),
                                  (H + 1, P[name].shape[1], n, flat_in), lambda name=name: projection(name)))
        inputs.append(f"u{t}v")  # the value path, output map folded in
        tensors.append(tensor(f"OV{t}", (a, f"c{t}", j, inputs[-1]), (H + 1, self.d_out + 1, n, flat_in),
                              lambda: np.einsum("acv,avf,pfu->acpu", P["o"], P["v"], S, optimize=True)))
        # (q1.k1)(q2.k2) = (q2.k2)(q1.k1): exchanging both factors' legs at once
        # leaves the tensor unchanged exactly when the factors share their maps
        # (quadratic attention).  Swapping only the query legs (or only the key
        # legs) is never exact in general, and with distinct factors nothing
        # is: declaring either is the reference's bug.
        same = lambda x, y: x.shape == y.shape and bool(np.all(x == y))  # noqa: E731
        syms = [(2, 3, 0, 1, 4)] if same(P["q1"], P["q2"]) and same(P["k1"], P["k2"]) else []
        return Network(tuple(tensors), tuple(inputs), (out,), tuple(syms))

    def __repr__(self) -> str:
        flags = [f for f, on in (("causal", self.causal), ("rotary", self.rotary_base is not None),
                                 ("residual", self.residual)) if on]
        ctx = f", n_ctx={self.n_ctx}" if self.n_ctx else ""
        return f"{self.name}({self.heads} heads, {self.d_model} -> {self.d_out}{ctx}{''.join(', ' + f for f in flags)})"


def position_wise(layer: Component, n_ctx: int) -> Component:
    """A Linear or Bilinear layer applied at every position (a
    :class:`~tsalgebra.components.PositionWise`; a Sequential of them for a
    Sequential)."""
    if isinstance(layer, Sequential):
        return Sequential(*(position_wise(l, n_ctx) for l in layer.layers))
    return PositionWise(layer, n_ctx)


class Transformer(_Sequence, Sequential):
    """embed -> [attention -> bilinear MLP] * blocks -> unembed, over ``n_ctx``
    positions.  ``embed``/``unembed``/MLPs are position-wise Linear or
    Bilinear layers (give residual=True to an MLP for a residual block);
    attentions are :class:`BilinearAttention` layers (residual as built)."""

    def __init__(self, embed: Component | None, blocks: list[tuple[BilinearAttention, Component | None]],
                 unembed: Component | None, n_ctx: int) -> None:
        layers: list[Component] = []
        d_in = None
        if embed is not None:
            layers.append(position_wise(embed, n_ctx))
            d_in = embed.in_features
        for k, (attn, mlp) in enumerate(blocks):
            if not isinstance(attn, BilinearAttention):
                raise TypeError(f"Transformer: block {k} attention is {type(attn).__name__}, not BilinearAttention")
            layers.append(attn.at(n_ctx))
            d_in = d_in or attn.d_model
            if mlp is not None:
                layers.append(position_wise(mlp, n_ctx))
        if unembed is not None:
            layers.append(position_wise(unembed, n_ctx))
        if not layers:
            raise ValueError("Transformer: no layers")
        super().__init__(*layers)
        self.n_ctx = n_ctx
        self.d_model = d_in if d_in is not None else layers[0].in_features // n_ctx
