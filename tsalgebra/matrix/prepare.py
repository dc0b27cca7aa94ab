"""Model preparation for the batched routes: each model folded into bilinear
blocks on padded widths, normalized, and (Gaussian) rewritten so that every
batched inner product is a Frobenius product of symmetric CP tensors, or the
Gram recursion of stacks.

Inner products in batch, on padded factors L~, R~ (H, d+1), D~ (o+1, H), outputs
1..o:

- symmetric: <a, b>_S = sum_{o,i,j} S_a[o,i,j] S_b[o,i,j],
  S[o,i,j] = sum_h D[o,h] (L[h,i] R[h,j] + R[h,i] L[h,j]) / 2;
- network: the Gram recursion (equal to the symmetric one at depth 1);
- gaussian, x ~ N(m, C): the input is rewritten x = m + F z with C = F F^T,
  z ~ N(0, I), so L~ and R~ become L~ P, R~ P with P = [[1, 0], [m, F]].  For
  z ~ N(0, I) and f_o = c + b.z + z'Az (c = S[o,0,0], b = 2 S[o,0,1:],
  A = S[o,1:,1:]),  E[f_o g_o] = 2 tr(A_f A_g) + b_f.b_g + (c_f + tr A_f)(c_g + tr A_g),
  which is the Frobenius product of S' = sqrt(2) S + m' e0 e0^T with
  m' = (1 - sqrt 2) c + tr A (centred: m' = -sqrt(2) c, dropping the mean
  product).  S' is again a symmetric CP tensor: D' = [sqrt(2) D, m'],
  L' = [L; e0], R' = [R; e0].

Scale: each factor is divided by its Frobenius norm before anything is
formed (the logs of the factors taken out are kept per layer); the routes
rebuild the norms in float64 logarithms.

The Gaussian measure arrives as a :class:`~tsalgebra.measure.Gaussian`;
its whitening (cached on it) is the P above.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..components import Bilinear, Component
from ..folding import fold
from ..rescale import canonical
from ..measure import Gaussian, Measure
from ..problem import CENTRED_ROUNDING
from .ops import Ops

_SQRT2 = math.sqrt(2.0)
_SQ_TINY = 1e-280  # a sum of squares below it may have lost digits to underflow
_MODERATE = (1e-60, 1e60)  # largest weight entries of a layer padded as it is (see _plain)


# ------------------------------------------------------------ chains


@dataclass(frozen=True)
class Chain:
    """A model as normalized bilinear blocks (L, R, D) on padded widths; the
    last D without the constant channel.  ``log_scales[l]`` is
    log(|L~| |R~| |D~|) of the layer (Frobenius norms divided out).
    ``cancelled`` (centred Gaussian only, else None): per output, the size
    of the constant terms that centring cancels, sum_h |D'[o, h] L'[h, 0]
    R'[h, 0]| over the hidden units and the added one (see
    :func:`centred_rounding`)."""

    blocks: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    log_scales: np.ndarray
    cancelled: np.ndarray | None = None


def _unit(x: np.ndarray) -> tuple[np.ndarray, float]:
    """x scaled to about unit Frobenius norm, in place (``x`` is a fresh array
    of to_chains': a second copy of every model cost as much as the first, both
    in page faults on new memory), and the log of the factor taken out.  A
    norm within [1/2, 2] is left as it is (the scale only keeps magnitudes
    near 1; the log is exact either way), which saves a pass over blocks that
    to_chains scaled as it wrote them.  A zero block, or one with an entry
    that is not finite (refused by to_chains), is left as it is."""
    with np.errstate(over="ignore", under="ignore"):
        sq = float(np.einsum("ij,ij->", x, x))  # no BLAS (see Bilinear.padded_norms)
    if math.isfinite(sq) and sq > _SQ_TINY:
        s = math.sqrt(sq)
        if 0.5 <= s <= 2.0:
            return x, 0.0
        x /= s
        return x, math.log(s)
    # the sum of squares left float64 (entries beyond about 1e154, or below
    # 1e-140): divided by the largest entry first, the squares sum to [1, size]
    big = float(np.abs(x).max(initial=0.0))
    if big == 0.0 or not math.isfinite(big):
        return x, 0.0
    x /= big
    s = math.sqrt(float(np.einsum("ij,ij->", x, x)))
    x /= s
    return x, math.log(big) + math.log(s)


def _plain(m: Any) -> bool:
    """A float Bilinear layer whose weights are of moderate magnitude, padded
    as it is.  Beyond that, the constant unit of the padded form (1 * 1) can
    dwarf the layer's own units by 1e200 and their products underflow to a
    false zero norm: such a layer is balanced by canonical() first, as
    ts.similarity does."""
    if not isinstance(m, Bilinear) or m.exact:
        return False
    with np.errstate(over="ignore"):
        big = [float(np.abs(w).max(initial=0.0)) for w in m.weights()]
    return all(x == 0.0 or _MODERATE[0] <= x <= _MODERATE[1] for x in big)


def to_chains(models: Sequence[Any], inner: str, centered: bool, P: np.ndarray | None) -> list[Chain] | None:
    """The models as normalized chains, or None when a batched route does not
    cover them (the caller then takes the pairwise route)."""
    chains = []
    # Plain float layers are padded into one allocation: one page fault per
    # huge page instead of one per 4 KiB page of every model's own arrays
    # (at (d, h) = (256, 512) that halved this function's time here), and
    # scaled to unit norm as they are written (norms from the weights).  L~ is
    # stored transposed, as the materialize route's formation reads it.  (Two
    # to sixteen threads writing the models were slower, here and on a 16-core
    # GPU host: the page faults of the fresh memory did not run in parallel.)
    plain = [m for m in models if _plain(m)]
    arena = np.zeros(sum(math.prod(s) for m in plain for s in m.padded_shapes()))
    used = 0
    for m in models:
        if not isinstance(m, Component):
            return None
        pre = np.zeros(3)  # logs of the factors taken out as the blocks were written
        model_log = 0.0  # the log of the scale canonical() took out of the whole model
        try:
            if _plain(m):
                out = []
                for k, shape in enumerate(m.padded_shapes()):
                    part = arena[used : used + math.prod(shape)]
                    out.append(part.reshape(shape[::-1]).T if k == 0 else part.reshape(shape))
                    used += math.prod(shape)
                norms = m.padded_norms()  # all finite: so is every entry (their squares sum to a finite number)
                finite = all(math.isfinite(s) and s > 0 for s in norms)
                if finite:
                    pre = np.log(norms)
                blocks = [m.padded(out=tuple(out), scales=tuple(1 / s for s in norms) if finite else None)]
            else:  # at its canonical scale (a deep stack's outputs may under- or overflow float64)
                finite = False
                m, model_log = canonical(m)
                blocks, _ = fold(m)
            blocks = [tuple(np.asarray(x, dtype=float) for x in blk) for blk in blocks]
        except (TypeError, ValueError):
            return None
        if not blocks:
            return None  # a linear model: degree 1, lifting rules live in ts.inner
        if inner != "network" and len(blocks) != 1:
            return None
        if not finite and not all(np.isfinite(x).all() for blk in blocks for x in blk):
            return None
        L, R, D = blocks[-1]
        blocks[-1] = (L, R, D[1:])
        if inner == "gaussian" and P is not None:
            L, R, D = blocks[0]
            blocks[0] = (L @ P, R @ P, D)
        norm_blocks, logs = [], []
        for L, R, D in blocks:
            if finite and P is None:  # padded at unit norm: only D lost a row since
                (L, a), (R, b), (D, c) = (L, 0.0), (R, 0.0), _unit(D)
            else:
                (L, a), (R, b), (D, c) = _unit(L), _unit(R), _unit(D)
            norm_blocks.append((L, R, D))
            logs.append(a + b + c + (pre.sum() if not logs else 0.0))
        logs[-1] += model_log  # the output's scale: counted once, as the last layer's
        cancelled = None
        if inner == "gaussian":
            L, R, D = norm_blocks[0]
            const = L[:, 0] * R[:, 0]
            if centered:
                mprime = -_SQRT2 * (D @ const)
                cancelled = _SQRT2 * (np.abs(D) @ np.abs(const)) + np.abs(mprime)
            else:
                mprime = D @ ((1.0 - _SQRT2) * const + np.einsum("hi,hi->h", L[:, 1:], R[:, 1:]))
            e0 = np.zeros((1, L.shape[1]))
            e0[0, 0] = 1.0
            norm_blocks[0] = (np.vstack([L, e0]), np.vstack([R, e0]), np.hstack([_SQRT2 * D, mprime[:, None]]))
        chains.append(Chain(tuple(norm_blocks), np.asarray(logs), cancelled))
    return chains


def rounding_unit(itemsize: int) -> float:
    """The rounding of a sum relative to its terms' sizes in a route's
    float arithmetic (CENTRED_ROUNDING in float64; float32 rounds 2^29 times
    coarser)."""
    return CENTRED_ROUNDING * (1.0 if itemsize >= 8 else 2.0**29)


def centred_rounding(chains: Sequence[Chain], itemsize: int) -> np.ndarray | None:
    """Per chain, the rounding of its centred self product on a route that
    forms each model's tensor (None where nothing cancels: uncentred
    products).  Centring cancels each output's constant term, whose parts
    are of size c_o (:attr:`Chain.cancelled`): the tensor keeps about
    rounding_unit c_o of it in its constant entry, which the self product
    squares.  (A model whose outputs' mean was 1e8 times their spread kept
    8 digits of its cosines so, none on pairwise-gram, where the mean
    cancels only in the sum of a pair's products.)"""
    if all(ch.cancelled is None for ch in chains):
        return None
    unit = rounding_unit(itemsize)
    return np.array([0.0 if ch.cancelled is None else float(np.sum((unit * ch.cancelled) ** 2)) for ch in chains])


def judged_selfs(selfs: np.ndarray, rounding: np.ndarray | None) -> tuple[np.ndarray, float]:
    """The self products with each one within its ``rounding`` taken as 0
    (the model constant to the route's arithmetic: its similarity is then
    undefined, as for a model constant in exact arithmetic), and the fewest
    digits any kept of its rounding (0 where one was taken as 0, inf where
    nothing was judged).  A product that came out 0.0 within a rounding is
    no exact 0: pairwise-gram's cross self products rounded to 0.0 for a
    model of variance 1.2e4 whose outputs' mean was 1e10."""
    if rounding is None:
        return selfs, math.inf
    selfs = np.asarray(selfs, dtype=float)
    below = selfs <= rounding
    kept = np.where(below, 0.0, selfs)
    if (below & (rounding > 0)).any():
        return kept, 0.0
    with np.errstate(divide="ignore"):
        digits = np.log10(kept[~below] / rounding[~below]) if (~below).any() else np.array([math.inf])
    return kept, float(digits.min())


@dataclass(frozen=True)
class Dims:
    """Common padded sizes of a set of chains: input width n; per layer the
    hidden width H and the output width w (the last: o, channel 0 excluded)."""

    n: int
    H: tuple[int, ...]
    w: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.H)

    def w_in(self, layer: int) -> int:
        return self.n if layer == 0 else self.w[layer - 1]


def common_dims(*groups: list[Chain]) -> Dims:
    """The common sizes of the chains of all ``groups`` (the widest hidden and
    output widths per layer: narrower models are zero-padded to them)."""
    chains = [c for g in groups for c in g]
    depth = {len(c.blocks) for c in chains}
    if len(depth) != 1:
        raise ValueError(
            "the network inner product needs the same layer structure: the models have "
            f"{sorted(depth)} bilinear layers (Linear layers fold into their neighbours)"
        )
    ns = {c.blocks[0][0].shape[1] for c in chains}
    if len(ns) != 1:  # pragma: no cover - guarded by the in_features check
        raise ValueError(f"input widths differ: {sorted(ns)}")
    L = depth.pop()
    H = tuple(max(c.blocks[l][0].shape[0] for c in chains) for l in range(L))
    w = tuple(max(c.blocks[l][2].shape[0] for c in chains) for l in range(L))
    return Dims(ns.pop(), H, w)


def stack_models(chains: Sequence[Chain], dims: Dims, ops: Ops, fused: Sequence[bool] = ()
           ) -> tuple[list[Any], list[Any], list[Any]]:
    """Per layer: X = [L; R] of shape (c, 2H, w_in) and D / sqrt(2) of shape
    (c, w, H), zero-padded (padding leaves every function unchanged); and for
    the layers l >= 1 propagated in the fused order, P = X_l D_{l-1} / sqrt(2)
    of shape (c, 2H_l, H_{l-1}) (else None)."""
    Xs, Ds = [], []
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        X = np.zeros((len(chains), 2 * H, wi))
        D = np.zeros((len(chains), wo, H))
        for k, ch in enumerate(chains):
            Lm, Rm, Dm = ch.blocks[l]
            h, i = Lm.shape
            X[k, :h, :i] = Lm
            X[k, H : H + h, :i] = Rm
            D[k, : Dm.shape[0], :h] = Dm / _SQRT2
        Xs.append(ops.put(X))
        Ds.append(ops.put(D))
    Ps = [None] + [Xs[l] @ Ds[l - 1] if (l < len(fused) and fused[l]) else None for l in range(1, dims.depth)]
    return Xs, Ds, Ps


# ------------------------------------------------------------ both sides


@dataclass(frozen=True)
class Prepared:
    """Both sides of a matrix as chains for the batched routes: the row
    models', the column models' (None for a symmetric matrix: the rows are
    the columns), their common sizes, and the seconds the preparation took."""

    rows: list[Chain]
    cols: list[Chain] | None
    dims: Dims
    seconds: float


def prepare_models(rows: Sequence[Any], cols: Sequence[Any] | None, inner: str, method: str, centered: bool,
                   measure: Measure | None, degree: Any) -> Prepared | None:
    """The models as chains (None where no batched route covers them: see
    :func:`uncovered`).  ``measure``: the measure bound to the models' input
    (the batched routes take a Gaussian one).  Raises ValueError for stacks
    of different depths under the network product."""
    if method in ("closure", "sampled") or (degree not in (None, 2) and inner == "symmetric") or inner == "tokens":
        return None
    P = None if not isinstance(measure, Gaussian) or measure.standard else measure.whitening()
    started = time.perf_counter()
    chains_rows = to_chains(rows, inner, centered, P)
    chains_cols = None if cols is None else to_chains(cols, inner, centered, P)
    if chains_rows is None or (cols is not None and chains_cols is None):
        return None
    dims = common_dims(chains_rows, *([] if chains_cols is None else [chains_cols]))
    return Prepared(chains_rows, chains_cols, dims, time.perf_counter() - started)


def uncovered(inner: str) -> str:
    """Why no batched route covers models that :func:`prepare_models` returned None for."""
    if inner == "tokens":
        return "the token measure is computed pair by pair (ts.inner)"
    if inner == "network":
        return "the network product is batched for Linear/Bilinear stacks with bilinear layers"
    return ("the gaussian and symmetric products are batched for models that fold to one bilinear layer, "
            "with the default degree and an exact method")
