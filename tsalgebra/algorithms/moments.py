"""Exact Gaussian inner products of attention layers at language-model width.

Models: position-wise Linear layers (an embedding from the vocabulary
included), one float BilinearAttention, position-wise Linear layers after it;
positions independent and identically distributed.  Cost polynomial in every
width:

- The measure is pushed through the layers before the attention: both
  models' attention inputs at one position are padded maps T u~ of one
  u ~ N(0, I_r), r the rank of their joint law (at most the sum of the
  d_models, never the vocabulary; :meth:`Gaussian.images`).
- Every head's forms q1, k1, q2, k2, v are then padded maps of u~, and their
  covariances are Gram blocks F_x F_y' (a head's width squared per pair of
  heads) with means F_x[:, 0].
- An output at position i is y_i = U(x_i) + sum_h O_h sum_j c_hij
  (q1_i' R1_ij k1_j)(q2_i' R2_ij k2_j) v_j, U the layer's virtual head
  (biases, residual, constant channel), R the rotary couplings, c the mask
  and scale.  The second moment E[y_a,i y_b,i'] of two models is, for each
  tuple of positions (i, j, j'), the Gaussian moment of a product of
  bilinear and linear factors, legs at different positions uncorrelated:
  :mod:`tsalgebra.form_moments` sums its Isserlis pairings as joint
  cumulants, by dynamic programming over Gram blocks.  Tuples with the same
  pattern of equal positions run as one batch; a model against itself runs
  one of each mirror image (:meth:`OutputMoments.second_moments`).
- Position-wise tails W act per position: <f, g> = sum_i sum_c (W_a M_ii
  W_b')_cc, so only the diagonal blocks M_ii are formed.

No Hermite coefficient and no pairing is enumerated.  The Hermite
algorithm (:mod:`tsalgebra.algorithms.hermite`) is its independent twin at
small ranks.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np

from ..attention import BilinearAttention, rotary_matrices
from ..components import Component, Linear, PositionWise
from ..form_moments import Factor, Leg, MomentCost, moment
from ..measure import Gaussian
from ..problem import CENTRED_ROUNDING, CostError, InnerProblem, InnerResult, Plan, format_count, positions_of
from ..progress import advancer
from ..threads import blas_threads, blas_worker_pool
from .registry import Algorithm, Triple

# The runs go to worker threads (one BLAS thread each) above this many planned
# flops (about 0.1 s of the programme's many small products).
_THREADED_FLOPS = 5e9
# Elements one run of the programme may hold at once (256 MiB): a batch of
# position tuples beyond it runs in pieces (64 positions: thousands of offset
# pairs, whose tensors together would take tens of GB).
_RUN_ELEMENTS = 2**25

# Position tuples a moments programme enumerates before its cost is known
# (numpy arrays: the Gaussian's (query, key, key) triples, n^3; the token
# measure's (query, key) pairs, n^2): 128 positions plan in 4 s, 256 took
# 41 s and over a GB (a one-layer pair of d_model 8), 10,000 ran out of memory.
MAX_POSITION_TUPLES = 2**23


def positions_fit(problem: InnerProblem, power: int) -> None:
    """CostError when n_ctx^power position tuples are too many to enumerate."""
    n = positions_of(problem.a)
    if n ** power > MAX_POSITION_TUPLES:
        what = "(query, key, key) triples" if power == 3 else "(query, key) pairs"
        raise CostError(f"{n:,} positions give {n ** power:,} {what} to enumerate (more than "
                        f"{MAX_POSITION_TUPLES:,})")

__all__ = ["AttentionMoments", "AttentionSide", "OutputMoments", "covariance", "attention_images", "attention_rank",
           "form_shapes", "moment_head", "moment_result", "moment_tail", "position_maps"]


# ------------------------------------------------------------- the models


def _per_position(layer: Component, n: int) -> np.ndarray | None:
    """The padded per-position map of a position-wise Linear layer (held as
    :class:`PositionWise`, or flat with block-diagonal weights), else None."""
    if isinstance(layer, PositionWise):
        return layer.layer.padded().astype(float, copy=False) if isinstance(layer.layer, Linear) and \
            layer.n_ctx == n and not layer.exact else None
    if not isinstance(layer, Linear) or layer.exact:
        return None
    W = layer.padded()
    o, d = (W.shape[0] - 1) // n, (W.shape[1] - 1) // n
    if o * n != W.shape[0] - 1 or d * n != W.shape[1] - 1:
        return None
    block = W[1 : 1 + o, 1 : 1 + d]
    expect = np.zeros_like(W)
    expect[0, 0] = 1
    for p in range(n):
        expect[1 + p * o : 1 + (p + 1) * o, 1 + p * d : 1 + (p + 1) * d] = block
        expect[1 + p * o : 1 + (p + 1) * o, 0] = W[1 : 1 + o, 0]
    if not np.array_equal(W, expect):
        return None
    out = np.zeros((o + 1, d + 1))
    out[0, 0] = 1
    out[1:, 1:], out[1:, 0] = block, W[1 : 1 + o, 0]
    return out


def position_maps(layers: list[Component], n: int, width: int) -> np.ndarray | None:
    """The padded per-position map of position-wise Linear layers applied in
    order (identity of ``width`` when there are none); None when some layer
    is not a position-wise Linear map."""
    M = None
    for layer in layers:
        W = _per_position(layer, n)
        if W is None:
            return None
        M = W if M is None else W @ M
    return np.eye(width + 1) if M is None else M


_HEADS: "weakref.WeakKeyDictionary[Component, Any]" = weakref.WeakKeyDictionary()


def moment_head(model: Component) -> tuple[BilinearAttention, np.ndarray, list[Component]] | None:
    """(attention, padded per-position map before it, layers after it) when
    ``model`` is position-wise Linear layers, one float BilinearAttention and
    anything after; None when it is not (remembered per model: the map of an
    embedding is a vocabulary wide)."""
    found = _head(model)
    if found is None:
        return None
    cut, E, _ = found
    layers = getattr(model, "layers", [model])
    return layers[cut], E, list(layers[cut + 1 :])


def moment_tail(model: Component) -> np.ndarray | None:
    """The padded per-position map of the layers after ``model``'s attention
    (:func:`position_maps`), None when they are not position-wise Linear
    layers or ``model`` has no moment head; remembered with the head (an
    unembedding is a vocabulary wide)."""
    found = _head(model)
    return None if found is None else found[2]


def _head(model: Component) -> tuple[int, np.ndarray, np.ndarray | None] | None:
    if model not in _HEADS:  # the value holds no reference to the model: a weak key must be able to die
        _HEADS[model] = _moment_head(model)
    return _HEADS[model]


def _moment_head(model: Component) -> tuple[int, np.ndarray, np.ndarray | None] | None:
    layers = getattr(model, "layers", [model])
    cut = next((k for k, l in enumerate(layers) if isinstance(l, BilinearAttention)), None)
    if cut is None:
        return None
    attn = layers[cut]
    if attn.exact or not attn.n_ctx:
        return None
    width = layers[0].in_features // attn.n_ctx
    E = position_maps(list(layers[:cut]), attn.n_ctx, width)
    return None if E is None else (cut, E, position_maps(list(layers[cut + 1 :]), attn.n_ctx, attn.d_out))


def attention_rank(problem: InnerProblem) -> int:
    """The rank of the joint law of the two attention layers' inputs at one
    position: the measure pushed through the position-wise maps before them
    (at most the sum of their widths, whatever the input width), read off
    the maps' Gram matrix only where that bound and the input rank do not
    settle it (remembered on the problem)."""
    if "_attention_rank" not in problem.__dict__:
        (_, Ea, _), (_, Eb, _) = moment_head(problem.a), moment_head(problem.b)  # type: ignore[misc]
        law = problem.measure.per_position(positions_of(problem.a))  # type: ignore[union-attr]
        shared = Ea is Eb or Ea.shape == Eb.shape and bool(np.array_equal(Ea, Eb))
        bound = min(law.rank, Ea.shape[0] - 1 + (0 if shared else Eb.shape[0] - 1))
        exact_needed = bound < law.rank and not shared
        problem.__dict__["_attention_rank"] = attention_images(problem)[0].shape[1] - 1 if exact_needed else bound
    return problem.__dict__["_attention_rank"]


def attention_images(problem: InnerProblem) -> list[np.ndarray]:
    """Both attention inputs at one position as padded maps of one whitened
    u~ (:meth:`Gaussian.images`), remembered on the problem: the plan's rank
    and the run read the same whitening (at an embedding's width, an
    eigendecomposition of the models' joint Gram)."""
    if "_attention_images" not in problem.__dict__:
        (_, Ea, _), (_, Eb, _) = moment_head(problem.a), moment_head(problem.b)  # type: ignore[misc]
        law = problem.measure.per_position(positions_of(problem.a))  # type: ignore[union-attr]
        problem.__dict__["_attention_images"] = law.images([Ea, Eb])
    return problem.__dict__["_attention_images"]


def covariance(M: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray) -> np.ndarray:
    """The padded covariance M - mean_x mean_y' of a padded second moment (or
    a stack of them along the leading axes), its constant channel's row and
    column zero: taken before any map reads the outputs, so that a map's
    bias (the constant channel's column, however large) never enters a
    subtraction (after the maps, an output bias of 1e6 took digits off the
    covariance with its square)."""
    C = M - mean_x[..., :, None] * mean_y[..., None, :]
    C[..., 0, :] = 0.0
    C[..., :, 0] = 0.0
    return C


def _read(M: np.ndarray, Wx: np.ndarray, Wy: np.ndarray, per_output: bool) -> Any:
    """diag(Wx M_i Wy') per position i (M (..., dx + 1, dy + 1), W (outputs,
    d + 1): the output channels), or its sum, without forming the square."""
    if per_output:
        return np.einsum("...or,or->...o", np.matmul(Wx, M), Wy).ravel()
    return float(np.sum((Wx.T @ Wy) * M.reshape(-1, *M.shape[-2:]).sum(axis=0)))


def moment_result(plan: Plan, M: np.ndarray, centring: Any, Wx: np.ndarray, Wy: np.ndarray, self_product: bool,
                  covariance_given: bool = False) -> InnerResult:
    """``plan``'s result from the padded second moment M (..., dx + 1,
    dy + 1) of the features that the output channels Wx, Wy (outputs,
    d + 1) read: summed or per output, centred (the problem's) on the means
    ``centring`` [(..., dx + 1), (..., dy + 1)] before the maps read them.
    A self product's covariance keeps only the digits of its difference
    from the terms it took, |C| + |m m'| read through |Wx|, |Wy|
    (Plan.rounded_result, at CENTRED_ROUNDING of them): a feature whose mean
    is far above its spread (an embedding 1e-8 of its biases, a value bias
    read through nearly constant scores) lost 2 to 16 digits, and a sign,
    labelled exact.  With ``covariance_given``, M is the covariance already
    and ``centring`` the size of those terms per entry of M, as the
    algorithm that centred it took them (token-moments)."""
    p = plan.problem
    if not p.centered or centring is None:
        return plan.result(_read(M, Wx, Wy, p.per_output))
    C = M if covariance_given else covariance(M, centring[0], centring[1])
    value = _read(C, Wx, Wy, p.per_output)
    if not self_product or p.exact_numbers:
        return plan.result(value)
    T = (np.array(centring, dtype=float) if covariance_given
         else np.abs(C) + np.abs(centring[0][..., :, None] * centring[1][..., None, :]))
    T[..., 0, :], T[..., :, 0] = 0.0, 0.0  # the constant channel: a map's bias, never subtracted
    # A variance that came out 0 exactly (a position whose token is fixed: a
    # BOS token) is not judged: a zero norm is refused, a channel's cosine NaN.
    if p.per_output:
        terms = np.where(value == 0, 0.0, _read(T, np.abs(Wx), np.abs(Wy), True))
    else:
        WW = Wx.T @ Wy
        C_, T_ = C.reshape(-1, *C.shape[-2:]), T.reshape(-1, *T.shape[-2:])  # per position
        live = np.einsum("icr,cr->i", C_, WW) != 0
        terms = float(np.sum(np.abs(WW) * T_[live].sum(axis=0)))
    return plan.rounded_result(
        value, CENTRED_ROUNDING * np.asarray(terms), lambda size, rest: f"the centred product by {plan.algorithm} "
        f"subtracts the features' E[x x'] and E[x] E[x]', about {size / abs(rest) if rest else math.inf:.2g} times "
        "the variance they leave", terms, "an algorithm that sums over inputs (algorithm='enumeration' or "
        "'quadrature', where one applies) keeps more")


# ------------------------------------------------------------- one side


@dataclass
class AttentionSide:
    """One model's attention read from a representation of one position's
    input: x~ = T u~ (Gaussian: u~ the whitened variables; tokens: u~ the
    token's one-hot vector, T the embedded tokens): its real heads' forms
    (heads, width, columns of T), output maps, virtual head, mask and rotary
    couplings, and its tail."""

    attn: BilinearAttention
    T: np.ndarray  # (d + 1, r + 1), or (d + 1, vocab) for tokens
    tail: np.ndarray  # (out + 1, d_out + 1), per position
    dry: bool = False  # forms of the right shapes, not computed (planning)
    # Centred products: the outputs shifted by the virtual head's constant
    # (the output bias), which a covariance does not see and float64 does
    # (an output bias of 1e7 carried into every output took 9 digits).
    centred: bool = False

    @property
    def heads(self) -> int:
        return self.attn.heads

    def head_maps(self) -> dict[str, np.ndarray]:
        """Each family's padded maps of the real heads, (heads, width, d + 1)."""
        P, H, dv = self.attn.padded_heads(), self.attn.heads, self.attn.v.shape[1]
        maps = {k: P[k][:H] for k in ("q1", "k1", "q2", "k2")}
        maps["v"] = P["v"][:H, :dv]
        return maps

    @cached_property
    def forms(self) -> dict[str, np.ndarray]:
        maps = self.head_maps()
        if self.dry:
            out = {k: np.broadcast_to(0.0, m.shape[:2] + (self.T.shape[1],)) for k, m in maps.items()}
        else:
            out = {k: (m.astype(float).reshape(-1, m.shape[2]) @ self.T).reshape(m.shape[:2] + (-1,))
                   for k, m in maps.items()}
        out["z"] = self.T[None]  # the virtual head reads the whole padded input
        return out

    @cached_property
    def out_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """(O~ of the real heads (heads, d_out + 1, dv), the virtual head's map (d_out + 1, d + 1))."""
        P, H, dv, d = self.attn.padded_heads(), self.attn.heads, self.attn.v.shape[1], self.attn.d_model
        virtual = P["o"][H, :, : d + 1].astype(float)
        if self.centred:
            virtual[1:, 0] = 0.0
        return P["o"][:H, :, :dv].astype(float), virtual

    @cached_property
    def mask(self) -> np.ndarray:
        return self.attn.score_mask()[: self.attn.heads].astype(float)  # (heads, n, n)

    def couplings(self, which: int, offsets: list[int]) -> np.ndarray:
        """R_ij = Rot_i' Rot_j = Rot_(j - i) of query-key factor ``which`` (1 or
        2), one per offset j - i: (offsets, 1, width, width); planning gets
        a zero-strided view of that shape."""
        w = self.attn.q1.shape[1] if which == 1 else self.attn.q2.shape[1]
        if self.dry:
            return np.broadcast_to(0.0, (len(offsets) if self.attn.rotary_base is not None else 1, 1, w, w))
        if self.attn.rotary_base is None:
            return np.eye(w)[None, None]
        return rotary_matrices(offsets, w, self.attn.rotary_base)[:, None]

    def factors(self, side: int, offsets: list[int], slot_j: int) -> list[Factor]:
        """(q1_i R1 k1_j), (q2_i R2 k2_j) and v_j, one batch entry per offset
        j - i (the mask is a factor of the whole product, applied by the caller)."""
        leg = lambda fam, slot: Leg(fam, side, slot)  # noqa: E731
        return [Factor((leg("q1", 0), leg("k1", slot_j)), self.couplings(1, offsets)),
                Factor((leg("q2", 0), leg("k2", slot_j)), self.couplings(2, offsets)), Factor((leg("v", slot_j),))]


_DRY: dict[Any, Any] = {}  # planned costs of the programme's runs, by structure and shapes


def _unique_rows(rows: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(rows, axis=0, return_inverse=True) for rows of integers in
    [0, base): each row read as one integer in that base, which sorts ten
    times faster than rows (n^3 position triples: 2.6 s of 3.4 at 96 positions)."""
    codes = rows @ (base ** np.arange(rows.shape[1] - 1, -1, -1))
    unique, inverse = np.unique(codes, return_inverse=True)
    digits = (unique[:, None] // base ** np.arange(rows.shape[1] - 1, -1, -1)) % base
    return digits.astype(rows.dtype), inverse.ravel()


@dataclass(frozen=True)
class _Batch:
    """Tuples of positions that run together: the distinct offsets (one batch
    entry each), the tuples, and each tuple's entry."""

    entries: np.ndarray  # (entries, keys)
    tuples: np.ndarray  # (tuples, 1 + keys)
    entry_of: np.ndarray  # (tuples,)

    def where(self, keep: np.ndarray) -> "_Batch":
        """The tuples ``keep`` selects, with only the entries they use."""
        used, entry_of = np.unique(self.entry_of[keep], return_inverse=True)
        return _Batch(self.entries[used], self.tuples[keep], entry_of.ravel())


# Head pairs (heads of side a, heads of side b), and a job of the programme:
# the sides with attention, its batch, its factors, and the head pairs it
# runs (None: every pair, on axes A and B).
_Pairs = tuple[np.ndarray, np.ndarray]
_Job = tuple[tuple[int, ...], _Batch, Callable[[_Batch], list[Factor]], "_Pairs | None"]


class _Grams:
    """Covariances of every form of two models, one matrix product per pair
    of models (all families and heads stacked: a few large products run at
    the machine's matmul rate where many small ones would not), shared by the
    pairs of a similarity; blocks are read off as views."""

    FAMILIES = ("q1", "k1", "q2", "k2", "v", "z")

    def __init__(self, dry: bool) -> None:
        self.dry, self.flops, self.elements = dry, 0, 0
        self._full: dict[tuple[int, int], np.ndarray] = {}
        self._rows: dict[int, dict[str, tuple[int, int, int]]] = {}
        self._blocks: dict[tuple[Any, ...], np.ndarray] = {}

    def _stack(self, side: AttentionSide) -> tuple[np.ndarray, dict[str, tuple[int, int, int]]]:
        F = side.forms
        rows, offsets, start = [], {}, 0
        for fam in self.FAMILIES:
            h, w, r1 = F[fam].shape
            rows.append(F[fam].reshape(h * w, r1))
            offsets[fam] = (start, h, w)
            start += h * w
        return np.concatenate(rows), offsets

    def full(self, x: AttentionSide, y: AttentionSide) -> np.ndarray:
        key = (id(x), id(y))
        if key not in self._full:
            if (id(y), id(x)) in self._full:
                self._full[key] = self._full[(id(y), id(x))].T
            else:
                (Sx, ox) = self._stack(x)
                (Sy, oy) = (Sx, ox) if x is y else self._stack(y)  # one array: numpy takes S S' as a symmetric product
                self._rows[id(x)], self._rows[id(y)] = ox, oy
                self.flops += 2 * Sx.shape[0] * Sy.shape[0] * (Sx.shape[1] - 1)
                self.elements += Sx.shape[0] * Sy.shape[0]
                self._full[key] = (np.broadcast_to(0.0, (Sx.shape[0], Sy.shape[0])) if self.dry  # planning: a shape
                                   else Sx[:, 1:] @ Sy[:, 1:].T)
        return self._full[key]

    def block(self, x: AttentionSide, fx: str, y: AttentionSide, fy: str, same_head: bool) -> np.ndarray:
        """Cov(fx of x, fy of y): (hx, dx, hy, dy), or (h, dx, dy) for one shared head."""
        key = (id(x), fx, id(y), fy, same_head)
        if key not in self._blocks:
            G = self.full(x, y)
            (sx, hx, wx), (sy, hy, wy) = self._rows[id(x)][fx], self._rows[id(y)][fy]
            B = G[sx : sx + hx * wx, sy : sy + hy * wy].reshape(hx, wx, hy, wy)
            self._blocks[key] = np.einsum("hxhy->hxy", B).copy() if same_head else B
        return self._blocks[key]


class OutputMoments:
    """The second moments and means of two sides' outputs, position by
    position, under the Gaussian."""

    def __init__(self, x: AttentionSide, y: AttentionSide, grams: _Grams) -> None:
        self.x, self.y, self.grams = x, y, grams
        self.dry = grams.dry
        self.flops = 0
        self.largest = 0
        self.peak = 0  # the most elements one run holds at once (its transients included)
        self.held = 0  # the most elements of runs' values summed by position, held at once
        self.pool: Any = None  # worker threads for the runs, set by the caller
        self._paired: dict[tuple[str, int, str, int], np.ndarray] = {}  # covariance blocks gathered for head pairs
        self.gathered = 0  # their elements

    def side(self, s: int) -> AttentionSide:
        return self.x if s == 0 else self.y

    def gram(self, a: Leg, b: Leg) -> Any:
        if a.slot != b.slot:
            return None
        return self.grams.block(self.side(a.side), a.family, self.side(b.side), b.family, a.side == b.side)

    def mean(self, a: Leg) -> np.ndarray:
        return self.side(a.side).forms[a.family][..., 0]

    def _gather(self, block: tuple[str, int, str, int], pairs: _Pairs) -> np.ndarray:
        """The covariance block (family x, side x, family y, side y) at the
        head pairs, (pairs, dx, dy): a copy, kept for every run (planning:
        counted, not made)."""
        if block not in self._paired:
            fx, sx, fy, sy = block
            G = self.grams.block(self.side(sx), fx, self.side(sy), fy, sx == sy)  # (h, dx, dy) or (h, dx, h, dy)
            shape = (len(pairs[0]), G.shape[1], G.shape[-1])
            self.gathered += math.prod(shape)
            self._paired[block] = (np.broadcast_to(0.0, shape) if self.dry else G[pairs[sx]] if sx == sy
                                   else G[pairs[sx], :, pairs[sy]])
        return self._paired[block]

    def _providers(self, pairs: _Pairs | None, queried: set[Any] | None = None
                   ) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """The programme's covariance and mean providers: every head pair, or
        the head pairs (heads of side a, heads of side b) on one axis (the
        blocks asked for added to ``queried``)."""
        if pairs is None:
            return self.gram, self.mean

        def gram(a: Leg, b: Leg) -> Any:
            if a.slot != b.slot:
                return None
            block = (a.family, a.side, b.family, b.side)
            if queried is not None:
                queried.add(block)
            return self._gather(block, pairs)

        return gram, lambda a: self.mean(a)[pairs[a.side]]

    def _cost(self, factors: list[Factor], pairs: _Pairs | None) -> tuple[tuple[int, ...], MomentCost]:
        """The shape of the programme's value on these factors and its cost,
        from a dry run: a function of the structure and the shapes, so
        planned once per kind."""
        forms = tuple(tuple((f, F.shape) for f, F in self.side(s).forms.items()) for s in (0, 1))
        key = (tuple((tuple((l.family, l.side, l.slot) for l in f.legs), getattr(f.bond, "shape", None))
                     for f in factors), forms, None if pairs is None else len(pairs[0]))
        if key not in _DRY:
            queried: set[Any] = set()
            value, cost = moment(factors, *self._providers(pairs, queried), dry=True, paired=pairs is not None)
            _DRY[key] = value.shape, cost, frozenset(queried)
        shape, cost, queried = _DRY[key]
        for block in queried:  # gathered here, before the runs, and counted cold or warm
            self._gather(block, pairs)  # type: ignore[arg-type]
        return shape, cost

    def _value(self, factors: list[Factor], pairs: _Pairs | None) -> np.ndarray:
        """The programme's value (entries, heads or 1, heads or 1, e, f, 1, 1);
        run on head pairs, those of one model against itself: the value at
        (B, A) is the one at (A, B) with its outputs swapped."""
        value = moment(factors, *self._providers(pairs), paired=pairs is not None)[0]
        if pairs is None:
            return value
        heads = self.x.heads
        out = np.empty((value.shape[0], heads, heads) + value.shape[3:])
        out[:, pairs[1], pairs[0]] = np.swapaxes(value[:, :, 0], 2, 3)
        out[:, pairs[0], pairs[1]] = value[:, :, 0]  # the diagonal as computed
        return out

    def _pieces(self, job: _Job) -> list["_Batch"]:
        """The batch cut along its entries into pieces whose runs each hold
        at most _RUN_ELEMENTS at once (every tensor of the programme but the
        covariance blocks carries the entries' axis)."""
        _, batch, factors, pairs = job
        _, cost = self._cost(factors(batch), pairs)
        per_entry = max(cost.peak + 3 * cost.largest, 1) / len(batch.entries)
        size = max(1, int(_RUN_ELEMENTS // per_entry))
        if size >= len(batch.entries):
            return [batch]
        pieces = []
        for start in range(0, len(batch.entries), size):
            keep = (batch.entry_of >= start) & (batch.entry_of < start + size)
            pieces.append(_Batch(batch.entries[start : start + size], batch.tuples[keep], batch.entry_of[keep] - start))
        return pieces

    def _execute(self, jobs: list[_Job]) -> Callable[[], list[Any]]:
        """Starts each job's runs (its batch in pieces), each summed by query
        position (:meth:`_by_position`) where it is made: in the worker
        threads of ``pool`` when there is one, queued at once, so that the
        caller may start another pair's runs before waiting.  Returns what
        waits for them and sums the pieces back into their jobs."""
        pieces = [self._pieces(job) for job in jobs]
        work = [(which, piece, factors, pairs) for (which, _, factors, pairs), cut in zip(jobs, pieces)
                for piece in cut]
        held, flops = 0, []
        for which, piece, factors, pairs in work:  # counted in the caller's thread: the same whether run or planned
            shape, cost = self._cost(factors(piece), pairs)
            flops.append(cost.flops)
            self.flops += cost.flops
            self.largest = max(self.largest, cost.largest)
            self.peak = max(self.peak, cost.peak + 3 * cost.largest)
            heads = shape[1:3] if pairs is None else (self.x.heads, self.x.heads)
            held += self.x.attn.n_ctx * math.prod(heads + shape[3:5])  # its values summed by position
        self.held += held  # every call's runs may be done and waiting at once
        if self.dry:
            return lambda: [None] * len(jobs)

        tick = advancer()  # the running plan's bar, when one shows

        def run(item: _Job, flops: int) -> np.ndarray:
            which, piece, factors, pairs = item
            out = self._by_position(which, piece, self._value(factors(piece), pairs))
            if tick is not None:
                tick(flops)
            return out

        if self.pool is not None:
            futures = [self.pool.submit(run, item, f) for item, f in zip(work, flops)]
            done = lambda: [f.result() for f in futures]  # noqa: E731
        else:
            parts = list(map(run, work, flops))
            done = lambda: parts  # noqa: E731

        def gathered() -> list[Any]:
            parts, out, k = done(), [], 0
            for cut in pieces:  # the pieces' parts summed back into their jobs
                out.append(sum(parts[k : k + len(cut)]))
                k += len(cut)
            return out

        return gathered

    def _configs(self, which: tuple[int, ...]) -> dict[tuple[int, ...], "_Batch"]:
        """The tuples (i, j[, j']) of query and key positions with a nonzero
        mask on the sides in ``which``, grouped by their slots (the query
        position is slot 0, a key position equal to an earlier one shares its
        slot, else takes a new one: one run of the programme each), and
        within a group by what the moment depends on: the offsets j - i where
        a side rotates (one batch entry each)."""
        n = self.x.attn.n_ctx
        live = [np.any(self.side(s).mask != 0, axis=0) for s in which]  # (n, n) per side
        rotates = any(self.side(s).attn.rotary_base is not None for s in which)
        grid = np.stack(np.meshgrid(*[np.arange(n)] * (1 + len(which)), indexing="ij"), -1).reshape(-1, 1 + len(which))
        t = grid[np.all([live[k][grid[:, 0], grid[:, 1 + k]] for k in range(len(which))], axis=0)]
        slots = np.zeros((len(t), len(which)), dtype=int)
        slots[:, 0] = t[:, 1] != t[:, 0]
        if len(which) == 2:  # the second key position: at the query's slot, the first key's, or a new one
            slots[:, 1] = np.where(t[:, 2] == t[:, 0], 0, np.where(t[:, 2] == t[:, 1], slots[:, 0], 1 + slots[:, 0]))
        offsets = t[:, 1:] - t[:, :1] if rotates else np.zeros_like(t[:, 1:])
        out = {}
        groups, group_of = _unique_rows(slots, len(which) + 1)
        for g, key in enumerate(groups):
            members = group_of == g
            entries, entry_of = _unique_rows(offsets[members] + n, 2 * n)  # offsets shifted to 1 .. 2n - 1
            out[tuple(int(v) for v in key)] = _Batch(entries - n, t[members], entry_of)
        return out

    def _by_position(self, which: tuple[int, ...], batch: "_Batch", S: np.ndarray) -> np.ndarray:
        """A run's values (entries, hx or 1, hy or 1, e, f) summed over its
        tuples by query position, each weighted by the product of the sides'
        masks: (n, hx or 1, hy or 1, e, f).  The weights are gathered per
        (position, entry) first, so the values are read once."""
        t = batch.tuples
        masks = [self.side(s).mask[:, t[:, 0], t[:, 1 + k]].T for k, s in enumerate(which)]  # (tuples, heads)
        w = masks[0][:, :, None] if which == (0,) else masks[0][:, None, :] if which == (1,) else \
            masks[0][:, :, None] * masks[1][:, None, :]
        n = self.x.attn.n_ctx
        C = np.zeros((n, len(batch.entries)) + w.shape[1:])
        np.add.at(C, (t[:, 0], batch.entry_of), w)
        S = np.broadcast_to(S[..., 0, 0], C.shape[1:] + S.shape[3:5])  # (entries, hx or 1, hy or 1, e, f)
        out = np.empty((n,) + S.shape[1:])
        for a, b in np.ndindex(*w.shape[1:]):  # per pair of heads: (positions x entries) @ (entries x outputs), in place
            out[:, a, b] = (C[:, :, a, b] @ S[:, a, b].reshape(len(S), -1)).reshape(n, *S.shape[3:])
        return out

    def second_moments(self) -> Callable[[], np.ndarray]:
        """Starts the runs of M[i] = E[y~_x,i y~_y,i] (n, d_out_x + 1,
        d_out_y + 1), padded; returns what waits for them and assembles M
        (None when planning).

        For one model against itself, a configuration and its mirror image
        (the two key positions' roles swapped; one side's virtual head
        against the other's heads and the converse) give transposed terms:
        only one of each is run.  A configuration that is its own mirror
        runs only the head pairs A <= B where its key positions coincide
        (the query's, or one other), and only the tuples j < j' of distinct
        keys where they differ."""
        x, y = self.x, self.y
        n, mirror = x.attn.n_ctx, x is y
        (Ox, Vx), (Oy, Vy) = x.out_maps, y.out_maps
        jobs: list[_Job] = []
        mirrored: list[bool] = []
        upper = np.triu_indices(x.heads)
        for slots, batch in self._configs((0, 1)).items():  # attention x attention
            if mirror and slots == (1, 0):
                continue
            if mirror and slots == (1, 2):
                batch = batch.where(batch.tuples[:, 1] < batch.tuples[:, 2])
            jobs.append(((0, 1), batch, lambda b, slots=slots: x.factors(0, b.entries[:, 0], slots[0])
                         + y.factors(1, b.entries[:, 1], slots[1]),
                         upper if mirror and slots[0] == slots[1] else None))
            mirrored.append(mirror and slots in ((0, 1), (1, 2)))
        for s in (0, 1) if not mirror else (1,):  # one side's virtual head x the other's attention
            for slots, batch in self._configs((1 - s,)).items():
                jobs.append(((1 - s,), batch, lambda b, s=s, slot=slots[0]: [Factor((Leg("z", s, 0),))]
                             + self.side(1 - s).factors(1 - s, b.entries[:, 0], slot), None))
                mirrored.append(mirror)
        gather = self._execute(jobs)

        def assembled() -> np.ndarray:
            if self.dry:
                return None  # type: ignore[return-value]
            sums: dict[tuple[tuple[int, ...], bool], np.ndarray] = {}  # per position, by sides and mirroring
            for part, (which, *_), flip in zip(gather(), jobs, mirrored):
                sums[(which, flip)] = part if (which, flip) not in sums else sums[(which, flip)] + part
            M = np.zeros((n, Ox.shape[1], Oy.shape[1]))
            M += Vx @ self._input_moment() @ Vy.T  # the virtual heads, at every position
            for (which, flip), part in sums.items():  # through the output maps, once per kind
                if which == (0, 1):
                    term = np.einsum("iabef,aqe,brf->iqr", part, Ox, Oy, optimize=True)
                elif which == (1,):  # x's virtual head, the heads on side b
                    term = np.einsum("ibef,qe,brf->iqr", part[:, 0], Vx, Oy, optimize=True)
                else:
                    term = np.einsum("iaef,aqe,rf->iqr", part[:, :, 0], Ox, Vy, optimize=True)
                M += term + term.transpose(0, 2, 1) if flip else term
            return M

        return assembled

    def _input_moment(self) -> np.ndarray:
        """E[x~_x x~_y'] of the two attention inputs at one position."""
        return self.x.T @ self.y.T.T  # u~ = [1; u], E u~ u~' = I

    def _input_mean(self, side: AttentionSide) -> np.ndarray:
        return side.T[:, 0]

    def means(self, s: int) -> Callable[[], np.ndarray]:
        """Starts the runs of E[y~_i] (n, d_out + 1) of side s; returns what
        waits for them and assembles it (None when planning)."""
        side = self.side(s)
        n = side.attn.n_ctx
        O, V = side.out_maps
        jobs: list[_Job] = [((s,), batch, lambda b, slot=slots[0]: side.factors(s, b.entries[:, 0], slot), None)
                            for slots, batch in self._configs((s,)).items()]
        gather = self._execute(jobs)

        def assembled() -> np.ndarray:
            if self.dry:
                return None  # type: ignore[return-value]
            m = np.tile(V @ self._input_mean(side), (n, 1))
            for part in gather():  # heads and output on side s's axes
                m += np.einsum("ihe,hqe->iq", part.reshape(n, side.heads, -1), O)
            return m

        return assembled


# --------------------------------------------------------- the algorithm


class AttentionMoments(Algorithm):
    """Attention layers between position-wise Linear maps under a Gaussian
    whose positions are independent and identically distributed; joint (one
    computation gives the three products of a similarity)."""

    name = "moments"
    joint = True
    title = "attention moments (Isserlis over Gram blocks)"
    measures = (Gaussian,)

    def check(self, problem: InnerProblem) -> str | None:
        if not problem.orbits:
            return "orbits=False asks for the plain sum over pairings"
        why = self.structure(problem)
        if why is None and problem.measure.per_position(positions_of(problem.a)) is None:  # type: ignore[union-attr]
            return "the measure is not independent and identical across positions"
        return why

    @staticmethod
    def structure(problem: InnerProblem) -> str | None:
        """Why the two models are not position-wise Linear layers, one
        attention and position-wise Linear layers (None when they are)."""
        heads = [moment_head(m) if isinstance(m, Component) else None for m in (problem.a, problem.b)]
        if heads[0] is None or heads[1] is None:
            return "each model must be position-wise Linear layers, then a float BilinearAttention"
        (attn, E, _), (other, E_b, _) = heads
        if (attn.n_ctx, E.shape[1]) != (other.n_ctx, E_b.shape[1]):
            return f"the models read {attn.n_ctx} and {other.n_ctx} positions of different widths"
        if moment_tail(problem.a) is None or moment_tail(problem.b) is None:  # no method named: token-moments shares this
            return "only position-wise Linear layers may follow the attention"  # (closure is Gaussian only)
        return None

    def _pairs(self, problem: InnerProblem, dry: bool) -> tuple[dict[str, OutputMoments], int]:
        """The sides read from one joint whitening, and the pairs to compute."""
        (ha, hb) = moment_head(problem.a), moment_head(problem.b)
        r = attention_rank(problem)
        if dry:
            Ta, Tb = (np.broadcast_to(0.0, (h[1].shape[0], r + 1)) for h in (ha, hb))
        else:
            Ta, Tb = attention_images(problem)
        sides = [AttentionSide(h[0], T, moment_tail(m), dry, problem.centered)  # type: ignore[arg-type]
                 for h, T, m in ((ha, Ta, problem.a), (hb, Tb, problem.b))]
        same = problem.a is problem.b
        grams = _Grams(dry)
        pairs = {"ab": OutputMoments(sides[0], sides[0] if same else sides[1], grams)}
        if problem.joint and not same:
            pairs["aa"] = OutputMoments(sides[0], sides[0], grams)
            pairs["bb"] = OutputMoments(sides[1], sides[1], grams)
        for p in pairs.values():  # every covariance the runs read: counted here, whatever they are asked
            grams.full(p.x, p.x), grams.full(p.x, p.y), grams.full(p.y, p.y)
        return pairs, r

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        positions_fit(problem, 3)
        pairs, r = self._pairs(problem, dry=True)
        (_, Ea, _), (_, Eb, _) = moment_head(problem.a), moment_head(problem.b)  # type: ignore[misc]
        prepare = 2.0 * (Ea.shape[0] + Eb.shape[0]) ** 2 * Ea.shape[1]  # the joint image of the input law
        for p in pairs.values():
            for x in {id(p.x): p.x, id(p.y): p.y}.values():  # forms: the heads' maps on the whitened input
                prepare += 2.0 * sum(h * w for h, w in form_shapes(x)) * x.T.shape[0] * (r + 1)
            p.second_moments()
            if problem.centered:
                p.means(0), p.means(1)
        flops = prepare + sum(float(p.flops) for p in pairs.values()) + next(iter(pairs.values())).grams.flops
        if flops > limit:
            raise CostError(f"the attention-moments algorithm would cost about {format_count(flops)} flops",
                            flops=flops)
        threads = blas_threads() if flops > _THREADED_FLOPS else 1  # runs at once, each at most its peak
        held = (threads * max(p.peak for p in pairs.values())  # the runs at once, every run's values queued,
                + sum(p.held + p.gathered for p in pairs.values()))  # and the gathered blocks
        grams = next(iter(pairs.values())).grams
        sides = {id(s): s for p in pairs.values() for s in (p.x, p.y)}.values()
        inputs = sum(2 * (sum(h * w for h, w in form_shapes(x)) + x.T.shape[0]) * (r + 1)  # forms, stacked for the Grams
                     for x in sides) + (Ea.shape[0] + Eb.shape[0]) * Ea.shape[1]
        return Plan(self.name, problem, flops, 8.0 * (held + grams.elements + inputs),
                    len(pairs) * positions_of(problem.a), joint=len(pairs) == 3, facts={"whitened": r},
                    notes=(f"attention moments over {r} whitened dimensions per position (Isserlis over Gram blocks)",))

    def run(self, plan: Plan) -> Triple:
        pairs, _ = self._pairs(plan.problem, dry=False)
        with contextlib.ExitStack() as stack:
            workers = blas_threads()
            if workers > 1 and plan.flops > _THREADED_FLOPS:
                pool = blas_worker_pool(stack, workers)
                for pair in pairs.values():
                    pair.pool = pool
            # every pair's runs queued before any is waited for: the workers
            # never idle while the main thread assembles a pair
            started = {key: (pair, pair.second_moments(), (pair.means(0), pair.means(1)) if plan.problem.centered
                             else None) for key, pair in pairs.items()}
            moments = {key: (pair.x.tail, pair.y.tail, M(), None if means is None else [m() for m in means])
                       for key, (pair, M, means) in started.items()}
        return self.finish(plan, moments)

    @staticmethod
    def finish(plan: Plan, moments: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, Any]],
               covariance_given: bool = False) -> Triple:
        """The products from each pair's tails, per-position second moments
        M (n, d_x + 1, d_y + 1) and, centred, means [(n, d_x + 1), (n, d_y + 1)]
        (None: not judged; ``covariance_given``: M is the covariance already,
        given with the sizes of its terms); see :func:`moment_result`."""
        p = plan.problem
        out = {key: moment_result(plan, M, means, tail_x[1:], tail_y[1:],  # the output channels, not the constant
                                  key != "ab" or p.a is p.b, covariance_given)
               for key, (tail_x, tail_y, M, means) in moments.items()}
        return out["ab"], out.get("aa"), out.get("bb")


def form_shapes(side: AttentionSide) -> list[tuple[int, ...]]:
    """Shapes of a side's head maps (heads, width) per family, for counting."""
    P, H, dv = side.attn.padded_heads(), side.attn.heads, side.attn.v.shape[1]
    return [(H, P[k].shape[1]) for k in ("q1", "k1", "q2", "k2")] + [(H, dv)]
