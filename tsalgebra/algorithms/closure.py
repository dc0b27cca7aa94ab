"""Gaussian closure (the reference's multi-layer method): approximate.

Propagate the joint mean and second moment of the two models' padded
features layer by layer, taking each nonlinear layer's output moments as if
its input were Gaussian with the propagated moments.  Exact through the first
nonlinear layer, approximate beyond, where the error can be large (see
docs/inner-products.md).  One joint computation yields <a, b>, <a, a> and
<b, b>.

Models with attention are closed after an exact head, the layers up to and
including their first attention layer: linear maps then attention have an
exactly Gaussian input, and :func:`attention_closure` gives the joint
moments of their outputs over all positions (the Hermite moments instead
where they are cheaper; pairing orbits with both output legs open for other
heads).  After it the state is the joint mean and second moment of both
models' padded streams over all positions (the attention layer correlated
them); bilinear, linear and position-wise layers are closed by
:func:`closure_steps`, every further attention layer by
:func:`attention_closure` on the propagated mean and covariance (Isserlis
with a non-zero mean, exact as if the input were Gaussian), and the linear
maps after the last nonlinear layer are read out without entering the state
(per position when position-wise, so that an unembedding a vocabulary wide
never forms a vocabulary-sized second moment).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..attention import BilinearAttention
from ..components import Bilinear, Component, Linear, PositionWise, Sequential
from ..folding import Block, fold, folded_shapes
from ..form_moments import Factor, Leg, MomentCost, moment
from ..measure import Gaussian
from ..pairing_sum import OUTER, Joins, PairingPlan, plan_pairings, run_pairings
from ..problem import CostError, InnerProblem, InnerResult, Plan, format_count, positions_of
from ..progress import advance
from ..threads import blas_threads, blas_worker_pool
from .hermite import MAX_WHITENED, HermiteMoments, attention_moments
from .moments import AttentionMoments, AttentionSide, moment_head, moment_result, position_maps
from .registry import Algorithm, Triple

__all__ = ["GaussianClosure", "attention_closure", "attention_closure_cost", "closure_steps"]


def _linear_block(W: np.ndarray) -> Block:
    """A padded linear map W~ as a bilinear block computing (W~ z) * 1."""
    R = np.zeros(W.shape)
    R[:, 0] = 1.0
    return W, R, np.eye(W.shape[0])


def _block_diag(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0] + y.shape[0], x.shape[1] + y.shape[1]))
    out[: x.shape[0], : x.shape[1]] = x
    out[x.shape[0] :, x.shape[1] :] = y
    return out


def _gaussian_state(measure: Gaussian) -> tuple[np.ndarray, np.ndarray]:
    """The joint (mean, second moment) of [x~; x~]: both models read one input."""
    mu0 = measure.padded_mean()
    M0 = measure.padded_cov() + np.outer(mu0, mu0)
    return np.concatenate([mu0, mu0]), np.block([[M0, M0], [M0, M0]])


# What closure keeps of a closed layer is its output's mean and covariance,
# not its tails, on which the products of the layers after it feed: its
# products and norms can be far from the exact ones, mostly below (residual
# bilinear stacks of depth 2-3, widths 3-4, 8 pairs: 0.7 to 350 times below;
# two-layer transformers at d_model 1-6, 15 pairs: 3e5 to 1e14 times, some of
# the opposite sign), its cosines much less (measured in docs/inner-products.md).
_MAGNITUDES = ("closure keeps each closed layer's output mean and covariance, not its tails: its products and norms "
               "can be orders of magnitude from the exact ones (mostly below); its cosines are what was measured")

# Tile side of the hidden x hidden products of a closure step.  The old step
# held LMR, LML, RMR and Q whole, with their temporaries about 7 H^2 floats at
# H joint hidden units (3.9 GB at H = 8194, a 3-layer stack of hidden 4096);
# by tiles only LM, RM (H x width) and D Q stay whole, the tiles of the
# symmetric Q are formed once per pair (a <= b): a third fewer flops beyond
# one tile.  Tiles of equal sides of at most 1024 (8 MB): one tile up to a
# joint hidden width of 1024 (the small cases run as before).
_TILE = 1024
_TILE_TEMPS = 6  # tiles live at once forming one of Q: 5.7 measured (tracemalloc, 3 tiles of 684)


def _tiles(h: int) -> list[slice]:
    side = -(-h // -(-h // _TILE))
    return [slice(s, min(h, s + side)) for s in range(0, h, side)]


def closure_steps(ba: list[Block], bb: list[Block], mu: np.ndarray, M: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Propagate a joint state (mean ``mu``, second moment ``M`` of the padded
    [u_a; u_b]) through two chains of bilinear blocks, taking each layer's
    fourth moments as if its input were Gaussian.  Returns (mu, M, steps)."""
    steps = max(len(ba), len(bb))
    for t in range(steps):
        # the shallower model waits at its output (an identity block)
        blk_a = ba[t] if t < len(ba) else _linear_block(np.eye(ba[-1][2].shape[0]))
        blk_b = bb[t] if t < len(bb) else _linear_block(np.eye(bb[-1][2].shape[0]))
        L, R, D = (_block_diag(x, y) for x, y in zip(blk_a, blk_b))
        # Q = pair pair' + LML * RMR + LMR * LMR' - 2 mean_prod mean_prod' (M symmetric), by tiles
        LM, RM = L @ M, R @ M
        lm, rm = L @ mu, R @ mu
        pair = np.einsum("ij,ij->i", LM, R)  # diag(L M R')
        mean_prod = lm * rm
        DQ = np.zeros((D.shape[0], L.shape[0]))
        tiles = _tiles(L.shape[0])
        for k, x in enumerate(tiles):
            for y in tiles[k:]:
                q = (LM[x] @ L[y].T) * (RM[x] @ R[y].T)
                c = LM[x] @ R[y].T  # LMR[x, y], times LMR[y, x]'
                q += c * (c.T if y == x else (LM[y] @ R[x].T).T)
                q += np.outer(pair[x], pair[y]) - 2 * np.outer(mean_prod[x], mean_prod[y])
                DQ[:, y] += D[:, x] @ q
                if y != x:  # the mirrored tile Q[y, x] = q'
                    DQ[:, x] += D[:, y] @ q.T
        mu, M = D @ pair, DQ @ D.T
    return mu, M, steps


def _step_cost(H: int, w: int, o: int) -> tuple[int, int]:
    """(flops, elements at its peak besides the blocks) of one step of
    :func:`closure_steps`: joint hidden units H, state width w, output width o."""
    diagonal = sum((x.stop - x.start) ** 2 for x in _tiles(H))
    off = (H * H - diagonal) // 2  # entries of the tiles above the diagonal
    flops = 2 * 2 * H * w * w + 2 * 2 * H * w + 2 * H * w  # LM, RM; lm, rm; pair
    flops += 2 * w * (3 * diagonal + 4 * off) + 10 * (diagonal + off)  # the tiles of Q
    flops += 2 * o * H * H + 2 * o * H * o + 2 * o * H  # D Q D', D pair
    T = _tiles(H)[0].stop
    # the state in and out; L, R, LM, RM; D and D Q; one tile's temporaries
    return flops, w * w + o * o + 4 * H * w + 2 * o * H + _TILE_TEMPS * T * T


def _steps_cost(sa: list[tuple[tuple[int, int], ...]], sb: list[tuple[tuple[int, int], ...]], width: int
                ) -> tuple[int, float]:
    """(flops, peak bytes) of :func:`closure_steps` from the blocks' shapes
    (state of ``width``): the folded blocks of both chains are held
    throughout, beside the largest step."""
    flops, peak = 0, 0
    held = sum(x[0] * x[1] for s in (sa, sb) for blk in s for x in blk)
    for t in range(max(len(sa), len(sb))):
        wait = lambda s: ((s[-1][2][0],) * 2,) * 3  # noqa: E731 - an identity block at the output
        (La, _, Da), (Lb, _, Db) = (sa[t] if t < len(sa) else wait(sa)), (sb[t] if t < len(sb) else wait(sb))
        f, e = _step_cost(La[0] + Lb[0], width, Da[0] + Db[0])
        flops, peak = flops + f, max(peak, e)
        width = Da[0] + Db[0]
    return flops, 8.0 * (held + peak)


def _split(model: Component) -> tuple[Component, Component | None]:
    """(head, tail): the head runs through the first attention layer (or the
    first bilinear layer when there is none); its moments are computed
    exactly, the tail's by closure."""
    layers = model.layers
    kinds = [isinstance(l, BilinearAttention) for l in layers]
    cut = kinds.index(True) if any(kinds) else next(
        (k for k, l in enumerate(layers) if l.degree > 1), len(layers) - 1)
    head = Sequential(*layers[: cut + 1])
    return head, (Sequential(*layers[cut + 1 :]) if cut + 1 < len(layers) else None)


def _chain_shapes(model: Component | None, width: int) -> list[Any]:
    """Shapes of the closed chain of a tail (an identity block when none)."""
    if model is None:
        return [((width, width), (width, width), (width, width))]
    blocks, linear = folded_shapes(model)
    return blocks or [(linear, linear, (linear[0], linear[0]))]  # type: ignore[list-item]


# ------------------------------------------- attention under a joint Gaussian
#
# After the first attention layer the positions of the stream are correlated,
# so an attention layer's output moments "as if its input were Gaussian" need
# the law of every pair of positions.  Two routes were weighed: whitening the
# joint law (x~ = T u~, u ~ N(0, I_r)) makes every covariance a Gram product
# (F_x T_p)(F_y T_q)', but r reaches 2 n (d + 1), every form then lives in r
# dimensions and T needs an eigendecomposition of that size; reading the
# covariance blocks C[p, q] directly keeps each form in its own position's
# d + 1 dimensions (about 2 n times fewer flops in the Gram matrices, nothing
# factorised).  So the covariances of the heads' forms are Gram blocks
# F_x C[p, q] F_y' per pair of positions, and
# each tuple of positions (i, j) of one model and (i', j') of the other is one
# batch entry of :func:`tsalgebra.form_moments.moment`, whose grams and means
# carry that batch axis.  The same function serves an input that *is*
# Gaussian (the first attention layer after linear maps: exact; independent
# positions prune every Gram block between different positions) and the
# closed layers after it (approximate).

_FAMILIES = ("q1", "k1", "q2", "k2", "v", "z")
# Bytes of one run of the moment programme per element of its largest tensor
# (its cached Gram blocks and steps, the frontier of its dynamic programme):
# 1,417 measured for one run alone, about 2,000 with two in flight
# (tracemalloc, eight heads of 16 at d_model 128), so the tuples of the runs
# are chunked to keep the runs in flight together under _RUNS_BYTES.
_BYTES_PER_LARGEST = 2048
_RUNS_BYTES = 2.0**30
# Runs go to worker threads (one BLAS thread each) above this many planned
# flops: the programme's products are small batched matrix products.
_THREADED_FLOPS = 2e9
# one tuple's run: (flops, peak elements), by kind, pattern and shapes
_DRY: dict[tuple[Any, ...], tuple[int, int]] = {}


class _StepModel:
    """One model at an attention step: its layer (None: it waits, its stream
    passes through as the virtual head alone) read on its own padded stream of
    ``n`` positions of ``d`` features: the heads' forms of x~_p (T = I),
    stacked by family, and the maps that write the output."""

    def __init__(self, attn: BilinearAttention | None, n: int, d: int, dry: bool) -> None:
        self.attn, self.n, self.d = attn, n, d
        if attn is None:
            self.side: AttentionSide | None = None
            forms = {"z": np.eye(d + 1)[None]}
            self.U, self.d_out = np.eye(d + 1), d
        else:
            self.side = AttentionSide(attn, np.eye(d + 1), np.eye(1), dry)
            forms = {k: self.side.forms[k] for k in _FAMILIES}
            self.O, self.U = self.side.out_maps
            self.d_out = attn.d_out
            self.live_matrix = self.side.mask.any(axis=0).astype(float)  # (n, n): 1 where some head reads (i, j)
            self.live = np.argwhere(self.live_matrix)  # (pairs, 2): those (i, j)
        self.rows: dict[str, tuple[int, int, int]] = {}  # family -> (first row, heads, width)
        start = 0
        for k in _FAMILIES:
            if k in forms:
                h, w, _ = forms[k].shape
                self.rows[k], start = (start, h, w), start + h * w
        self.R = start
        self.stack = None if dry else np.concatenate([np.asarray(forms[k]).reshape(-1, d + 1)
                                                      for k in _FAMILIES if k in forms])
        self.F = None if dry else np.ascontiguousarray(self.stack[:, 1:])  # type: ignore[index]


@dataclass(frozen=True)
class _Run:
    """Tuples of positions whose moments run as one batch: the model on each
    side (side 1 absent for a mean), each side's term ("att": its attention
    heads, "z": its virtual head), the tuples' positions and the column of
    each (side, slot) (slot 0: the query position i, slot 1: the key j);
    ``mirror``: a moment of one model with itself whose transpose is the
    mirrored tuple's, added once for both."""

    models: tuple[int, ...]
    terms: tuple[str, ...]
    tuples: np.ndarray
    columns: dict[tuple[int, int], int]
    mirror: np.ndarray


class _AttentionStep:
    """The joint (mean, second moment) of both models' padded outputs of one
    attention step, their joint padded input taken as Gaussian; or, ``dry``,
    its cost from the shapes alone."""

    def __init__(self, layers: tuple[BilinearAttention | None, BilinearAttention | None], widths: tuple[int, int],
                 independent: bool, same: bool, diagonal: bool, dry: bool) -> None:
        n = next(l.n_ctx for l in layers if l is not None)
        self.models = [_StepModel(l, n, (w - 1) // n, dry) for l, w in zip(layers, widths)]
        self.n, self.widths, self.independent, self.same, self.dry = n, widths, independent, same, dry
        self.diagonal = diagonal
        self._grams: dict[tuple[int, int], np.ndarray] = {}
        self.means_in: list[np.ndarray] = []  # per model (n, d + 1)
        self.means: list[np.ndarray] = []  # every form's mean per position: per model (n, R)
        self.cov: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------ input
    def load(self, mu: np.ndarray, M: np.ndarray) -> None:
        """Per-position padded means (n, d + 1) and covariance blocks (n, d_s, n, d_t) of the joint state."""
        n, starts = self.n, (0, self.widths[0])
        for m, s in zip(self.models, starts):
            mean = np.ones((n, m.d + 1))
            mean[:, 1:] = mu[s + 1 : s + 1 + n * m.d].reshape(n, m.d)
            self.means_in.append(mean)
        span = [slice(s + 1, s + 1 + n * m.d) for m, s in zip(self.models, starts)]
        for x, y in ((0, 0), (0, 1), (1, 1)):
            block = M[span[x], span[y]] - np.outer(mu[span[x]], mu[span[y]])
            self.cov[(x, y)] = block.reshape(n, self.models[x].d, n, self.models[y].d)
        self.means = [mean @ m.stack.T for m, mean in zip(self.models, self.means_in)]  # type: ignore[union-attr]

    def grams(self, x: int, y: int) -> np.ndarray:
        """Cov of every form of model x at position p with every form of model
        y at p': (n, R_x, n, R_y), or (n, R_x, R_y) for p = p' alone when
        positions are independent; formed by :meth:`form_grams`."""
        if (x, y) in self._grams:
            return self._grams[(x, y)]
        G = self._grams[(y, x)]
        return G.transpose(0, 2, 1) if self.independent else G.transpose(2, 3, 0, 1)

    def form_grams(self, pool: Any = None) -> None:
        """The Gram matrices of the pairs, one row of position blocks per job:
        F_x C[p, p'] F_y' (F a model's stacked forms without the constant
        column), the blocks p' < p of a model with itself mirrored."""
        n = self.n
        for x, y in self.pairs():
            Rx, Ry = self.models[x].R, self.models[y].R
            self._grams[(x, y)] = np.empty((n, Rx, Ry) if self.independent else (n, Rx, n, Ry))
        jobs = [(x, y, p) for x, y in self.pairs() for p in range(n)]
        list(pool.map(lambda job: self._gram_row(*job), jobs)) if pool is not None else \
            [self._gram_row(*job) for job in jobs]
        if not self.independent:
            for x, y in self.pairs():
                if x == y:
                    G = self._grams[(x, y)]
                    for p in range(n):
                        G[p + 1 :, :, p] = G[p, :, p + 1 :].transpose(1, 2, 0)

    def _gram_row(self, x: int, y: int, p: int) -> None:
        Fx, Fy, C, G = self.models[x].F, self.models[y].F, self.cov[(x, y)], self._grams[(x, y)]
        if self.independent:
            G[p] = (Fx @ C[p, :, p]) @ Fy.T
            return
        lo = p if x == y else 0  # a model with itself: the blocks p' >= p
        left = (Fx @ C[p, :, lo:].reshape(C.shape[1], -1)).reshape(-1, C.shape[3])
        G[p, :, lo:] = (left @ Fy.T).reshape(Fx.shape[0], self.n - lo, Fy.shape[0])

    def gram_flops(self) -> float:
        """Flops of :meth:`form_grams`."""
        n, total = self.n, 0.0
        for x, y in self.pairs():
            mx, my = self.models[x], self.models[y]
            blocks = n if self.independent else n * (n + 1) // 2 if x == y else n * n
            total += 2.0 * blocks * mx.R * mx.d * (my.d + my.R)
        return total

    # ------------------------------------------------------------- runs
    def pairs(self) -> list[tuple[int, int]]:
        return [(0, 0)] if self.same else [(0, 1), (0, 0), (1, 1)]

    def kinds(self) -> list[tuple[tuple[int, ...], tuple[str, ...], dict[tuple[int, int], int]]]:
        """(models, terms, columns) of every kind of run: per pair of models,
        attention x attention (i, j, i', j'), virtual head x attention (i, i',
        j') and, unless mirrored, attention x virtual head (i, j, i'); per
        model the attention's mean (i, j)."""
        out: list[tuple[tuple[int, ...], tuple[str, ...], dict[tuple[int, int], int]]] = []
        for x, y in self.pairs():
            mx, my = self.models[x], self.models[y]
            if mx.attn is not None and my.attn is not None:
                out.append(((x, y), ("att", "att"), {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}))
            if my.attn is not None:
                out.append(((x, y), ("z", "att"), {(0, 0): 0, (1, 0): 1, (1, 1): 2}))
            if mx.attn is not None and x != y:
                out.append(((x, y), ("att", "z"), {(0, 0): 0, (0, 1): 1, (1, 0): 2}))
        out += [((x,), ("att",), {(0, 0): 0, (0, 1): 1}) for x in range(1 if self.same else 2)
                if self.models[x].attn is not None]
        return out

    def tuples(self, models: tuple[int, ...], terms: tuple[str, ...], i: int) -> tuple[np.ndarray, np.ndarray]:
        """The tuples of a kind of run whose first position is i (only those
        of one query position on both sides when ``diagonal``), and whether
        each stands for itself and its mirror image (a model with itself:
        the tuples of side b before those of side a are their transposes)."""
        n, first = self.n, self.models[models[0]]
        mine = first.live[first.live[:, 0] == i] if terms[0] == "att" else np.array([[i]])
        if len(models) == 1:
            return mine, np.zeros(len(mine), dtype=bool)
        other = self.models[models[1]]
        theirs = other.live if terms[1] == "att" else np.arange(n)[:, None]
        if self.diagonal:
            theirs = theirs[theirs[:, 0] == i]
        a, b = (g.ravel() for g in np.meshgrid(np.arange(len(mine)), np.arange(len(theirs)), indexing="ij"))
        t = np.concatenate([mine[a], theirs[b]], axis=1)
        if models[0] != models[1]:
            return t, np.zeros(len(t), dtype=bool)
        if terms == ("z", "att"):
            return t, np.ones(len(t), dtype=bool)
        # attention with itself: (i, j) <= (i', j') in the order of the live pairs, mirrored when <
        order = lambda p: p[:, 0] * n + p[:, 1]  # noqa: E731
        keep = order(t[:, :2]) <= order(t[:, 2:])
        return t[keep], order(t[keep, :2]) < order(t[keep, 2:])

    def _patterns(self, tuples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distinct patterns, pattern of each tuple): with independent
        positions, which of the tuple's positions coincide (a Gram block
        between different positions is zero: the programme skips it); else one."""
        if not self.independent:
            return np.zeros((1, 0), dtype=bool), np.zeros(len(tuples), dtype=int)
        k = tuples.shape[1]
        equal = np.stack([tuples[:, u] == tuples[:, v] for u in range(k) for v in range(u + 1, k)], axis=1)
        keys, group = np.unique(equal, axis=0, return_inverse=True)
        return keys, group.ravel()

    def runs(self) -> list[_Run]:
        """Every batch of tuples that runs together: a kind, one pattern."""
        out: list[_Run] = []
        for models, terms, columns in self.kinds():
            parts = [self.tuples(models, terms, i) for i in range(self.n)]
            t = np.concatenate([p[0] for p in parts])
            mirror = np.concatenate([p[1] for p in parts])
            if not len(t):
                continue
            _, group = self._patterns(t)
            out += [_Run(models, terms, t[group == g], columns, mirror[group == g]) for g in np.unique(group)]
        return out

    # ------------------------------------------------- the moment programme
    def moment(self, run: _Run, rows: slice) -> tuple[Any, MomentCost]:
        """E[product of the run's factors] for the tuples ``rows`` of the run,
        (P, A, B, E, F, 1, 1), and its cost (see :func:`tsalgebra.form_moments.moment`)."""
        t = run.tuples[rows]
        pos = {key: t[:, c] for key, c in run.columns.items()}
        factors: list[Factor] = []
        for side, (m, term) in enumerate(zip(run.models, run.terms)):
            if term == "att":
                offsets = pos[(side, 1)] - pos[(side, 0)]
                factors += self.models[m].side.factors(side, offsets, 1)  # type: ignore[union-attr]
            else:
                factors.append(Factor((Leg("z", side, 0),)))

        def gram(a: Leg, b: Leg) -> Any:
            pa, pb = pos[(a.side, a.slot)], pos[(b.side, b.slot)]
            if self.independent and pa[0] != pb[0]:  # the group fixes which positions coincide
                return None
            ma, mb = run.models[a.side], run.models[b.side]
            (sa, ha, wa), (sb, hb, wb) = self.models[ma].rows[a.family], self.models[mb].rows[b.family]
            shape = (len(pa), ha, wa, hb, wb)
            if self.dry:
                return np.broadcast_to(0.0, (len(pa), ha, wa, wb) if a.side == b.side else shape)
            G = self.grams(ma, mb)
            rows, cols = slice(sa, sa + ha * wa), slice(sb, sb + hb * wb)
            g = (G[pa, rows, cols] if self.independent else G[pa, rows, pb, cols]).reshape(shape)
            # laid out as the programme's tensors are (tuples, side a's head, side b's head, then the
            # legs' indices), so that its products read them without copying
            if a.side == b.side:  # a side's factors share its head
                return np.ascontiguousarray(np.einsum("phxhy->phxy", g))
            first, second = (1, 3) if a.side == 0 else (3, 1)
            return np.ascontiguousarray(g.transpose(0, first, second, 2, 4)).transpose(
                (0, 1, 3, 2, 4) if a.side == 0 else (0, 2, 3, 1, 4))

        def mean(a: Leg) -> Any:
            p, m = pos[(a.side, a.slot)], run.models[a.side]
            s, h, w = self.models[m].rows[a.family]
            if self.dry:
                return np.broadcast_to(0.0, (len(p), h, w))
            return self.means[m][p, s : s + h * w].reshape(len(p), h, w)

        return moment(factors, gram, mean, dry=self.dry)

    # ------------------------------------------------------------ output
    def _maps(self, m: int, term: str, t: np.ndarray, i: int, j: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(weights (P, heads), output maps (heads, d_out + 1, e)) of a side's term."""
        model = self.models[m]
        if term == "z":
            return np.ones((len(t), 1)), model.U[None]
        return model.side.mask[:, t[:, i], t[:, j]].T, model.O  # type: ignore[union-attr]

    def run(self, pool: Any = None, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The joint state of the outputs (flat padded mean and second moment),
        the runs in ``pool`` (``workers`` at once) when given."""
        n = self.n
        jobs = []
        for run in self.runs():
            P = len(run.tuples)
            per = max(1, int(_RUNS_BYTES / workers // (_BYTES_PER_LARGEST * self._largest_per_tuple(run))))
            jobs += [(run, slice(s, min(P, s + per))) for s in range(0, P, per)]
        self.form_grams(pool)  # shared by the runs: formed before they start
        values = list(pool.map(lambda job: self.moment(*job), jobs)) if pool is not None else \
            [self.moment(*job) for job in jobs]
        outs = [m.d_out + 1 for m in self.models]
        M = {xy: np.zeros((n, outs[xy[0]], n, outs[xy[1]])) for xy in self.pairs()}
        mirrored = {xy: np.zeros_like(M[xy]) for xy in self.pairs() if xy[0] == xy[1]}
        means = [mean @ m.U.T for m, mean in zip(self.models, self.means_in)]  # the virtual heads
        for (run, rows), (value, _) in zip(jobs, values):
            t = run.tuples[rows]
            col = run.columns
            wx, Ox = self._maps(run.models[0], run.terms[0], t, col[(0, 0)], col.get((0, 1)))
            if len(run.models) == 1:
                S = np.broadcast_to(value[:, :, 0, :, 0, 0, 0], (len(t), Ox.shape[0], Ox.shape[2]))
                np.add.at(means[run.models[0]], t[:, 0], np.einsum("pa,pae,aqe->pq", wx, S, Ox, optimize=True))
                continue
            wy, Oy = self._maps(run.models[1], run.terms[1], t, col[(1, 0)], col.get((1, 1)))
            blocks = _write(value[..., 0, 0], wx, wy, Ox, Oy)
            i, i2 = t[:, col[(0, 0)]], t[:, col[(1, 0)]]
            key = tuple(run.models)
            if run.mirror.any():
                mir = run.mirror[rows]
                np.add.at(mirrored[key], (i[mir], slice(None), i2[mir], slice(None)), blocks[mir])
                i, i2, blocks = i[~mir], i2[~mir], blocks[~mir]
            np.add.at(M[key], (i, slice(None), i2, slice(None)), blocks)
        for (x, y), block in M.items():  # the virtual heads of both, from the input's second moment
            mx, my = self.models[x], self.models[y]
            E = np.einsum("ie,jf->iejf", self.means_in[x], self.means_in[y])
            E[:, 1:, :, 1:] += self.cov[(x, y)]
            block += np.einsum("qe,iejf,rf->iqjr", mx.U, E, my.U, optimize=True)
            if (x, y) in mirrored:
                block += mirrored[(x, y)] + mirrored[(x, y)].transpose(2, 3, 0, 1)
            if self.diagonal:  # not computed: NaN, so that no later step can read them unnoticed
                off = ~np.eye(n, dtype=bool)
                block[off.nonzero()[0], :, off.nonzero()[1], :] = np.nan
        return _pack(means, M, self.same)

    def _largest_per_tuple(self, run: _Run) -> int:
        """A bound on the elements of the run's largest tensor per tuple: both
        sides' heads times two of the widths of its legs and open outputs."""
        heads, widths = 1, []
        for m, term in zip(run.models, run.terms):
            rows = self.models[m].rows
            heads *= rows["q1"][1] if term == "att" else 1
            widths += [w for k, (_, _, w) in rows.items() if (k == "z") == (term == "z")]
        widths.sort()
        return heads * widths[-1] * (widths[-2] if len(widths) > 1 else 1)

    def _signature(self, m: int) -> tuple[Any, ...]:
        """What the cost of a run depends on besides the pattern: the rows of
        each family, and whether the bonds differ between tuples (rotary)."""
        model = self.models[m]
        return tuple(model.rows.items()) + (model.attn is not None and model.attn.rotary_base is not None,)

    def _term_shape(self, run: _Run, side: int) -> tuple[int, int]:
        """(heads, open output width) of a side's term."""
        model = self.models[run.models[side]]
        return (model.rows["v"][1], model.rows["v"][2]) if run.terms[side] == "att" else (1, model.d + 1)

    def counts(self, models: tuple[int, ...], terms: tuple[str, ...], columns: dict[tuple[int, int], int]
               ) -> dict[bytes, tuple[int, np.ndarray]]:
        """The tuples of a kind of run by pattern (as :meth:`tuples` and
        :meth:`_patterns` would group them): {pattern: (count, a tuple of that
        pattern)}, counted in closed form.  Enumerating them (n^4 tuples)
        took 31 s to refuse a closure at 64 positions, 109 s at 96; here each
        count is a contraction of n x n indicator matrices over the tuple's
        columns: the live pairs of each side's attention, the query positions
        equal (``diagonal``), a model with itself in the order of its live
        pairs.  With independent positions a pattern says which columns are
        equal: the tuples whose columns are equal at least within each block
        of a partition are counted, and the exact patterns follow by Moebius
        inversion over the partitions of the columns."""
        n, k = self.n, len(columns)
        eye, ones = np.eye(n), np.ones((n, n))
        base = [(columns[(s, 0)], columns[(s, 1)], self.models[m].live_matrix)
                for s, (m, term) in enumerate(zip(models, terms)) if term == "att"]
        products = [base]  # each a list of (column u, column v, n x n indicator): a sum over the products
        if len(models) == 2:
            i, i2 = columns[(0, 0)], columns[(1, 0)]
            if self.diagonal:
                base.append((i, i2, eye))
            if models[0] == models[1] and terms == ("att", "att"):  # (i, j) <= (i', j'): i < i', or i = i', j <= j'
                j, j2 = columns[(0, 1)], columns[(1, 1)]
                products = [base + [(i, i2, np.triu(ones, 1))], base + [(i, i2, eye), (j, j2, np.triu(ones))]]

        def at_least(blocks: tuple[int, ...]) -> int:
            """Tuples whose columns in one block are equal (``blocks``: each column's block)."""
            total = 0.0
            for factors in products:
                ops: list[Any] = []
                for u, v, F in factors:
                    ops += [np.diagonal(F), [blocks[u]]] if blocks[u] == blocks[v] else [F, [blocks[u], blocks[v]]]
                free = set(blocks) - {b for sub in ops[1::2] for b in sub}
                ops += [x for b in sorted(free) for x in (np.ones(n), [b])]  # a column no factor reads
                total += float(np.einsum(*ops, [], optimize=True))
            return int(round(total))

        if not self.independent:  # one pattern: every tuple
            count = at_least(tuple(range(k)))
            return {np.zeros(0, dtype=bool).tobytes(): (count, np.zeros((1, k), dtype=np.int64))} if count else {}
        partitions = _partitions(k)
        coarse = {p: at_least(p) for p in partitions}
        out = {}
        for p in partitions:
            count = sum(_moebius(p, q) * c for q, c in coarse.items() if _refines(p, q))
            if count:
                key = np.array([p[u] == p[v] for u in range(k) for v in range(u + 1, k)], dtype=bool).tobytes()
                out[key] = (count, np.array([p], dtype=np.int64))  # positions: the block labels (n > their count)
        return out

    def cost(self) -> tuple[float, float]:
        """(flops, peak bytes) from the shapes: the Gram blocks, the
        programme's runs (dry: its cost is linear in the tuples, so one
        representative tuple per kind and pattern, the tuples counted in
        closed form, never materialised: :meth:`counts`), and the products
        that write the outputs."""
        flops, jobs, held, write = self.gram_flops(), [], 0.0, 0.0
        workers = max(1, blas_threads())  # run() may put as many jobs in flight at once
        for models, terms, columns in self.kinds():
            for pattern, (count, sample) in self.counts(models, terms, columns).items():
                run = _Run(models, terms, sample, columns, np.zeros(1, dtype=bool))
                key = (terms, pattern, self.independent) + tuple(self._signature(m) for m in models)
                if key not in _DRY:  # a function of the shapes and the pattern: planned once per process
                    dry = self.moment(run, slice(None))[1]
                    _DRY[key] = dry.flops, dry.peak
                flops += count * _DRY[key][0]
                # the run's jobs as run() cuts them (bytes of one, how many): the dry run's elements held at
                # once per tuple (its ledger follows the real run's arrays; an independent pattern skips
                # most Gram blocks, which the bound of run()'s cut does not see)
                bound = _BYTES_PER_LARGEST * self._largest_per_tuple(run)
                per = min(count, max(1, int(_RUNS_BYTES / workers // bound)))
                jobs += [(8.0 * _DRY[key][1] * per, count // per), (8.0 * _DRY[key][1] * (count % per), 1)]
                # writing the outputs: the weights and the first side's map, then the second side's
                (h, e), q = self._term_shape(run, 0), self.models[models[0]].d_out + 1
                (g, f), r = (self._term_shape(run, 1), self.models[models[1]].d_out + 1) if len(models) > 1 \
                    else ((1, 1), 1)
                flops += 2.0 * count * (h * g * e * f * (1 + q) + g * f * q * r)
                # held until every job is done: each tuple's moments (h, g, e, f), its positions (twice: per
                # query position, then joined) and pattern; _write's operands and products for the largest job
                held += count * (h * g * e * f + 3 * len(columns) + 2)
                write = max(write, per * (2 * h * g * e * f + 2 * g * f * q + q * r))
        flight, left = 0.0, workers  # the largest jobs, as many as run at once
        for size, times in sorted(jobs, reverse=True):
            flight, left = flight + size * min(times, left), left - min(times, left)
        n = self.n
        grams = sum((1 if self.independent else n) * n * self.models[x].R * self.models[y].R for x, y in self.pairs())
        state = sum(n * n * (self.models[x].d_out + 1) * (self.models[y].d_out + 1) for x, y in self.pairs())
        return flops, 8.0 * (grams + 3 * state + held + write) + flight

def _partitions(k: int) -> list[tuple[int, ...]]:
    """The partitions of k columns, each column's block numbered in order of first appearance."""
    out: list[tuple[int, ...]] = [()]
    for _ in range(k):
        out = [p + (b,) for p in out for b in range(max(p, default=-1) + 2)]
    return out


def _refines(fine: tuple[int, ...], coarse: tuple[int, ...]) -> bool:
    return all(coarse[u] == coarse[v] for u in range(len(fine)) for v in range(u) if fine[u] == fine[v])


def _moebius(fine: tuple[int, ...], coarse: tuple[int, ...]) -> int:
    """The Moebius function of the partition lattice: the product over the
    blocks of ``coarse`` of (-1)^(m - 1) (m - 1)!, m the blocks of ``fine`` in it."""
    out = 1
    for b in set(coarse):
        m = len({fine[u] for u in range(len(fine)) if coarse[u] == b})
        out *= (-1) ** (m - 1) * math.factorial(m - 1)
    return out


def _write(S: np.ndarray, wx: np.ndarray, wy: np.ndarray, Ox: np.ndarray, Oy: np.ndarray) -> np.ndarray:
    """sum over heads a, b and value indices e, f of wx[p, a] wy[p, b] Ox[a, q, e]
    S[p, a, b, e, f] Oy[b, r, f]: (P, q, r), as two matrix products."""
    P, (A, Q, E), (B, R, F) = len(wx), Ox.shape, Oy.shape
    S = np.broadcast_to(S, (P, A, B, E, F)) * (wx[:, :, None] * wy[:, None, :])[..., None, None]
    left = S.transpose(0, 2, 4, 1, 3).reshape(P * B * F, A * E) @ Ox.transpose(0, 2, 1).reshape(A * E, Q)
    return left.reshape(P, B * F, Q).transpose(0, 2, 1) @ Oy.transpose(0, 2, 1).reshape(B * F, R)


def _pack(means: list[np.ndarray], M: dict[tuple[int, int], np.ndarray], same: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-position padded means (n, q + 1) and second moments (n, q + 1, n,
    r + 1) as the flat padded joint state [1; y_a,1; ...; 1; y_b,1; ...]."""
    if same:
        means, M = [means[0], means[0]], {(0, 0): M[(0, 0)], (0, 1): M[(0, 0)], (1, 1): M[(0, 0)]}
    flat = [np.r_[1.0, m[:, 1:].ravel()] for m in means]
    blocks = {}
    for (x, y), B in M.items():
        n, q, _, r = B.shape
        F = np.empty((1 + n * (q - 1), 1 + n * (r - 1)))
        F[0, 0], F[0, 1:], F[1:, 0] = 1.0, flat[y][1:], flat[x][1:]
        F[1:, 1:] = B[:, 1:, :, 1:].reshape(n * (q - 1), n * (r - 1))
        blocks[(x, y)] = F
    return np.concatenate(flat), np.block([[blocks[(0, 0)], blocks[(0, 1)]], [blocks[(0, 1)].T, blocks[(1, 1)]]])


def attention_closure(layers: tuple[BilinearAttention | None, BilinearAttention | None], mu: np.ndarray,
                      M: np.ndarray, widths: tuple[int, int], independent: bool = False, same: bool = False,
                      diagonal: bool = False, pool: Any = None, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One attention step of both models under a joint Gaussian.

    ``mu``, ``M``: the mean and second moment of the joint padded stream
    [x~_a; x~_b] (flat, position-major, of ``widths``); ``layers``: each
    model's attention layer, None where that model waits (its stream passes
    through).  Returns the joint (mean, second moment) of the outputs,
    computed exactly as if the input were Gaussian with that mean and
    covariance, across all positions and both models (Isserlis with a
    non-zero mean, one batch entry per tuple of positions).  Exact when the
    input is Gaussian; ``independent`` says that different positions are
    uncorrelated (their covariance blocks are then not read), ``same`` that
    both models and their inputs are one (one third of the work),
    ``diagonal`` that only position-wise maps read the output: only the
    blocks of one position with itself are computed (about n times fewer
    tuples), the others are NaN.  ``pool``: worker threads (``workers`` of
    them) for the Gram blocks and the runs of the moment programme."""
    step = _AttentionStep(layers, widths, independent, same, diagonal, dry=False)
    step.load(mu, M)
    return step.run(pool, workers)


def attention_closure_cost(layers: tuple[BilinearAttention | None, BilinearAttention | None],
                           widths: tuple[int, int], independent: bool = False, same: bool = False,
                           diagonal: bool = False) -> tuple[float, float]:
    """(flops, peak bytes) of :func:`attention_closure`, from the shapes alone."""
    return _AttentionStep(layers, widths, independent, same, diagonal, dry=True).cost()


# ------------------------------------------------------------ the programme


@dataclass(frozen=True)
class _Stage:
    """One step of the closed tail: each model's layers before its next
    attention layer (a chain closed by :func:`closure_steps`; None: none),
    then that attention layer (None: the model has no more and waits)."""

    chains: tuple[Component | None, Component | None]
    attentions: tuple[BilinearAttention | None, BilinearAttention | None]


@dataclass(frozen=True)
class _Tail:
    """Everything after the heads: the attention stages, aligned by the
    index of the attention layer; the chains closed after the last one
    (through the last bilinear layer); and the linear maps after those, read
    out without entering the state (an unembedding a vocabulary wide would
    make the joint second moment vocabulary-sized)."""

    stages: tuple[_Stage, ...]
    closing: tuple[Component | None, Component | None]
    readout: tuple[tuple[Component, ...], tuple[Component, ...]]

    @property
    def attentions(self) -> int:
        """Attention layers closed (the more of the two models')."""
        return max(sum(s.attentions[k] is not None for s in self.stages) for k in (0, 1))


def _tail(ta: Component | None, tb: Component | None) -> _Tail:
    pieces: list[tuple[list[list[Component]], list[BilinearAttention]]] = []
    for t in (ta, tb):
        chains: list[list[Component]] = [[]]
        atts: list[BilinearAttention] = []
        for layer in (t.layers if t is not None else ()):
            if isinstance(layer, BilinearAttention):
                atts.append(layer)
                chains.append([])
            else:
                chains[-1].append(layer)
        pieces.append((chains, atts))
    seq = lambda ls: Sequential(*ls) if ls else None  # noqa: E731
    stages = tuple(_Stage(tuple(seq(c[k]) if k < len(a) else None for c, a in pieces),  # type: ignore[arg-type]
                          tuple(a[k] if k < len(a) else None for _, a in pieces))  # type: ignore[arg-type]
                   for k in range(max(len(a) for _, a in pieces)))
    closing, readout = [], []
    for chains, _ in pieces:
        last = chains[-1]
        cut = max((k + 1 for k, l in enumerate(last) if l.degree > 1), default=0)
        closing.append(seq(last[:cut]))
        readout.append(tuple(last[cut:]))
    return _Tail(stages, tuple(closing), tuple(readout))  # type: ignore[arg-type]


def _blocks(chain: Component | None, width: int) -> list[Block]:
    """The bilinear blocks of a chain (a linear chain as one block; the identity when none)."""
    if chain is None:
        return [_linear_block(np.eye(width))]
    blocks, linear = fold(chain)
    return blocks or [_linear_block(linear)]  # type: ignore[arg-type]


def _bilinear_count(chain: Component | None) -> int:
    return len(folded_shapes(chain)[0]) if chain is not None else 0


def _linear_prefix(model: Component) -> list[Component] | None:
    """The layers before a model's first attention when all are Linear maps
    (flat or position-wise): its input is then exactly Gaussian."""
    layers = model.layers
    cut = next(k for k, l in enumerate(layers) if isinstance(l, BilinearAttention))
    pre = list(layers[:cut])
    ok = all(isinstance(l, Linear) or isinstance(l, PositionWise) and isinstance(l.layer, Linear) for l in pre)
    return pre if ok else None


def _n_ctx(problem: InnerProblem) -> int:
    """The positions of the models' attention layers (check() makes them one)."""
    return next(l.n_ctx for m in (problem.a, problem.b) for l in m.layers if isinstance(l, BilinearAttention))


class GaussianClosure(Algorithm):
    name = "closure"
    joint = True
    title = "moment closure"
    method = "closure"
    measures = (Gaussian,)

    def check(self, problem: InnerProblem) -> str | None:
        if not problem.components:
            return "closure needs layered models (Linear/Bilinear/BilinearAttention/Sequential)"
        if problem.exact_numbers:
            return "closure computes with float weights only"
        for m in (problem.a, problem.b):
            odd = next((l for l in m.layers if not isinstance(l, (Linear, Bilinear, PositionWise, BilinearAttention))),
                       None)
            if odd is not None:
                return f"closure takes Linear, Bilinear and BilinearAttention layers, not {odd!r}"
        contexts = {l.n_ctx for m in (problem.a, problem.b) for l in m.layers if isinstance(l, BilinearAttention)}
        if len(contexts) > 1:
            return f"closure needs every attention layer over one number of positions, got {sorted(contexts)}"
        return None

    def _head_problem(self, problem: InnerProblem) -> InnerProblem:
        (ha, _), (hb, _) = _split(problem.a), _split(problem.b)
        return problem.replace(a=ha, b=hb, method="exact", joint=True, algorithm=None)

    def _head_plan(self, problem: InnerProblem, limit: float, diagonal: bool) -> tuple[float, float, Any]:
        """(flops, peak bytes, payload) of the exact first stage: the cheaper
        (in flops) of the Hermite moments, where they apply (small whitened
        ranks), and :func:`attention_closure` on the heads' exactly Gaussian
        input, where the heads are linear maps and an attention layer (any
        width; the Hermite coefficients took 440 MB where it takes 3 at
        d_model 16); else pairing orbits with both outputs open."""
        hp = self._head_problem(problem)
        ha, hb = hp.a, hp.b
        law = problem.measure.per_position(positions_of(ha))  # type: ignore[union-attr]
        attentions = [h.layers[-1] for h in (ha, hb) if isinstance(h.layers[-1], BilinearAttention)]
        candidates: list[tuple[float, float, Any]] = []
        # the Hermite check reads the whitened rank (an eigendecomposition): not
        # asked where the input's rank or the widths already rule it out
        if law is not None and len(attentions) == 2 and min(law.rank, sum(l.d_model for l in attentions)) <= \
                MAX_WHITENED and HermiteMoments().check(hp, tail="any") is None:
            with contextlib.suppress(CostError):  # over the limit: the other may fit
                head = HermiteMoments().plan(hp, limit)  # its flops and memory (the feature coefficients)
                candidates.append((head.flops, head.peak_bytes, ("moments", law)))
        if len(attentions) == 2 and all(_linear_prefix(h) is not None for h in (ha, hb)):
            independent = law is not None and all(moment_head(h) is not None for h in (ha, hb))
            flops, peak = attention_closure_cost((attentions[0], attentions[1]), (
                attentions[0].in_features + 1, attentions[1].in_features + 1), independent, problem.a is problem.b,
                diagonal)
            candidates.append((flops, peak, ("gaussian", (independent, diagonal))))
        if candidates:
            return min(candidates, key=lambda c: (c[0], c[1]))
        joins = Joins.gaussian(problem.measure, False)  # type: ignore[arg-type]
        Ha, Hb = ha.network(symmetric=True, data=False), hb.network(symmetric=True, data=False)
        same = ha.same_weights(hb)
        try:
            plans = [plan_pairings(x, y, joins, OUTER if y is not None else None, limit, True, same)
                     for x, y in ((Ha, Ha), (Ha, Hb), (Hb, Hb), (Ha, None), (Hb, None))]
        except CostError as exc:
            raise CostError(f"closure's exact head: {exc.reason}", flops=exc.flops, extrapolated=True) from None
        return float(sum(p.flops for p in plans)), 8.0 * max(p.peak_elements for p in plans), ("pairings", plans)

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        a, b = problem.a, problem.b
        if not any(isinstance(l, BilinearAttention) for m in (a, b) for l in m.layers):
            return self._plan_chain(problem, limit)
        (ha, ta), (hb, tb) = _split(a), _split(b)
        tail, n = _tail(ta, tb), _n_ctx(problem)
        widths = (ha.out_features + 1, hb.out_features + 1)
        steps: list[list[Any]] = []
        for stage in tail.stages + (_Stage(tail.closing, (None, None)),):
            if any(c is not None for c in stage.chains):
                shapes = [_chain_shapes(c, w) for c, w in zip(stage.chains, widths)]
                steps.append(["chains", stage.chains, widths])
                widths = (shapes[0][-1][2][0], shapes[1][-1][2][0])
            if any(l is not None for l in stage.attentions):
                if any((w - 1) % n for w in widths):
                    raise CostError(f"closure: streams of widths {[w - 1 for w in widths]} do not split into {n} "
                                    f"positions at an attention layer")
                steps.append(["attention", stage.attentions, widths, False])
                widths = tuple(w if l is None else l.out_features + 1 for l, w in zip(stage.attentions, widths))
        per_position = _readout_maps(tail.readout, widths, n) is not None
        if per_position and steps and steps[-1][0] == "attention":
            steps[-1][3] = True  # only position-wise maps read its output: the diagonal blocks suffice
        flops, peak, head = self._head_plan(problem, limit, per_position and not steps)
        peak = max(peak, 8.0 * 6 * sum(widths) ** 2)  # the joint state and its products
        parts = [flops]  # the head's flops, then each step's
        for step in steps:
            if step[0] == "chains":
                shapes = [_chain_shapes(c, w) for c, w in zip(step[1], step[2])]
                cost = _steps_cost(shapes[0], shapes[1], sum(step[2]))
                f, peak = float(cost[0]), max(peak, cost[1])
            else:
                f, m = attention_closure_cost(step[1], step[2], False, a is b, step[3])
                peak = max(peak, m)
            flops += f
            parts.append(f)
            if flops > limit:
                break
        flops += _readout_flops(tail.readout, widths, n, per_position)
        bilinear = [sum(_bilinear_count(s.chains[k]) for s in tail.stages) + _bilinear_count(tail.closing[k])
                    for k in (0, 1)]
        approx = max(bilinear[k] + sum(s.attentions[k] is not None for s in tail.stages) for k in (0, 1))
        notes = (f"Gaussian closure over {approx} layer(s) ({tail.attentions} attention, {max(bilinear)} bilinear) "
                 "after an exact first stage: approximate", _MAGNITUDES) if approx else ()
        if flops > limit:
            raise CostError(f"closure would cost {format_count(flops)} flops", flops=flops)
        schedule = _Schedule(head, tuple(tuple(s) for s in steps), tail.readout, widths, per_position, tuple(parts))
        return Plan(self.name, problem, flops, peak, len(steps) + 2, exact=not approx, joint=True,
                    facts={"approximate_layers": approx}, notes=notes, payload=schedule)

    def _plan_chain(self, problem: InnerProblem, limit: float) -> Plan:
        """Models without attention: closed from the input."""
        a, b = problem.a, problem.b
        (sa, wa), (sb, wb) = folded_shapes(a), folded_shapes(b)
        chains = [sa or [(wa, wa, (wa[0], wa[0]))], sb or [(wb, wb, (wb[0], wb[0]))]]
        approx = max(max(len(sa), len(sb)) - 1, 0)
        width = 2 * (a.in_features + 1)
        flops, peak = _steps_cost(chains[0], chains[1], width)
        if flops > limit:
            raise CostError(f"closure would cost {format_count(flops)} flops", flops=flops)
        notes = (f"Gaussian closure over {approx} bilinear layer(s) after an exact first stage: approximate",
                 _MAGNITUDES) if approx else ()
        state = max(width, sum(c[-1][2][0] for c in chains))
        peak = max(peak, 8.0 * 6 * state * state)  # the input's state; the output's moments read off the last
        return Plan(self.name, problem, float(flops), peak, max(len(chains[0]), len(chains[1])),
                    exact=not approx, joint=True, facts={"approximate_layers": approx}, notes=notes)

    def run(self, plan: Plan) -> Triple:
        p = plan.problem
        a, b = p.a, p.b
        if plan.payload is None:
            ba, wa = fold(a)
            bb, wb = fold(b)
            mu, M = _gaussian_state(p.measure)  # type: ignore[arg-type]
            mu, M, _ = closure_steps(ba or [_linear_block(wa)], bb or [_linear_block(wb)], mu, M)
            oa = a.out_features + 1

            def result(x: slice, y: slice) -> InnerResult:
                eye = np.eye(M.shape[0])  # the padded outputs themselves: read without a map
                return moment_result(plan, M[x, y], [mu[x], mu[y]], eye[x][1:, x], eye[y][1:, y], x == y or a is b)

            A, B = slice(0, oa), slice(oa, None)
            return result(A, B), result(A, A), result(B, B)
        schedule: _Schedule = plan.payload
        with contextlib.ExitStack() as stack:
            workers = blas_threads()
            if workers > 1 and plan.flops > _THREADED_FLOPS:
                pool = blas_worker_pool(stack, workers)
            else:
                pool, workers = None, 1
            mu, M = self._head_state(plan, schedule.head, pool, workers)
            if schedule.head[0] != "pairings":  # the pairing runs move the plan's bar themselves
                advance(schedule.flops[0])
            for step, flops in zip(schedule.steps, schedule.flops[1:]):
                if step[0] == "chains":
                    blocks = [_blocks(c, w) for c, w in zip(step[1], step[2])]
                    mu, M, _ = closure_steps(blocks[0], blocks[1], mu, M)
                else:
                    mu, M = attention_closure(step[1], mu, M, step[2], False, a is b, step[3], pool, workers)
                advance(flops)
            return _readout(plan, schedule, mu, M)  # still with BLAS on one thread: waking the others costs more

    def _head_state(self, plan: Plan, head: Any, pool: Any, workers: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact joint (mean, second moment) of the two heads' outputs."""
        p = plan.problem
        (ha, _), (hb, _) = _split(p.a), _split(p.b)
        kind, detail = head
        if kind == "gaussian":
            (independent, diagonal), layers = detail, (ha.layers[-1], hb.layers[-1])
            mu, M = _input_state(p, ha, hb, independent)
            return attention_closure(layers, mu, M, (layers[0].in_features + 1, layers[1].in_features + 1),
                                     independent, p.a is p.b, diagonal, pool, workers)
        if kind == "moments":
            hm = attention_moments(ha, hb, detail, joint=True)
            means, (M_aa, M_ab, M_bb) = [hm.mean_a, hm.mean_b], (hm.aa, hm.ab, hm.bb)
        else:
            joins = Joins.gaussian(p.measure, False)  # type: ignore[arg-type]
            Ha, Hb = ha.network(symmetric=True), hb.network(symmetric=True)
            plans: list[PairingPlan] = detail
            runs = [run_pairings(pp, x, y, joins, OUTER if y is not None else None)[0]
                    for pp, (x, y) in zip(plans, ((Ha, Ha), (Ha, Hb), (Hb, Hb), (Ha, None), (Hb, None)))]
            M_aa, M_ab, M_bb, mean_a, mean_b = runs
            means = [mean_a, mean_b]
        return np.concatenate(means), np.block([[M_aa, M_ab], [M_ab.T, M_bb]])


@dataclass(frozen=True)
class _Schedule:
    """What :meth:`GaussianClosure.run` does after the heads, planned once:
    the steps in order, ("chains", (chain_a, chain_b), widths) or
    ("attention", (layer_a, layer_b), widths, diagonal), then the readout
    through each model's trailing linear maps from the final state of
    ``widths``, per position or flat."""

    head: Any
    steps: tuple[tuple[Any, ...], ...]
    readout: tuple[tuple[Component, ...], tuple[Component, ...]]
    widths: tuple[int, int]
    per_position: bool
    flops: tuple[float, ...]  # planned: the head's, then each step's (the plan's bar moves by them)


def _readout_maps(readout: tuple[tuple[Component, ...], tuple[Component, ...]], widths: tuple[int, int],
                  n: int) -> list[np.ndarray] | None:
    """Each model's trailing linear maps as one padded per-position map, or
    None when one of them is not position-wise (the layers' own per-position
    weights: an unembedding is never tiled over the positions)."""
    maps = []
    for layers, w in zip(readout, widths):
        per = position_maps(list(layers), n, (w - 1) // n) if (w - 1) % n == 0 else None
        if per is None:
            return None
        maps.append(per)
    return maps


def _readout_flops(readout: tuple[tuple[Component, ...], tuple[Component, ...]], widths: tuple[int, int], n: int,
                   per_position: bool) -> float:
    """Flops of reading the three products off the final state through the trailing linear maps."""
    if per_position:
        (oa, da), (ob, db) = (m.shape for m in _readout_maps(readout, widths, n))  # type: ignore[union-attr]
        return 2.0 * (oa * da * db + oa * da * da + ob * db * db) + 4.0 * n * (da + db) ** 2
    (sa, sb) = [(folded_shapes(Sequential(*layers))[1] or (w, w)) if layers else (w, w)
                for layers, w in zip(readout, widths)]
    return 2.0 * (sa[0] + sb[0]) * (sa[1] + sb[1]) * (sa[1] + sb[1] + sa[0] + sb[0])


def _readout(plan: Plan, schedule: _Schedule, mu: np.ndarray, M: np.ndarray) -> Triple:
    """The three products from the final state through each model's trailing
    linear maps: per position when both are position-wise (the diagonal
    blocks of the state suffice: AttentionMoments.finish), else as flat maps."""
    p = plan.problem
    n, widths = _n_ctx(p), schedule.widths
    starts = (0, widths[0])
    if schedule.per_position:
        maps = _readout_maps(schedule.readout, widths, n)
        idx = [s + 1 + np.arange(w - 1).reshape(n, -1) for s, w in zip(starts, widths)]
        means = [np.concatenate([np.ones((n, 1)), mu[i]], axis=1) for i in idx]

        def diagonal(x: int, y: int) -> np.ndarray:
            D = np.empty((n, means[x].shape[1], means[y].shape[1]))
            D[:, 0, :], D[:, :, 0] = means[y], means[x]
            D[:, 1:, 1:] = M[idx[x][:, :, None], idx[y][:, None, :]]
            return D

        centred = lambda x, y: [means[x], means[y]] if p.centered else None  # noqa: E731
        pairs = (("ab", (0, 1)), ("aa", (0, 0)), ("bb", (1, 1)))
        moments = {key: (maps[x], maps[y], diagonal(x, y), centred(x, y)) for key, (x, y) in pairs}  # type: ignore[index]
        return AttentionMoments.finish(plan, moments)
    W = [fold(Sequential(*layers))[1] if layers else np.eye(w) for layers, w in zip(schedule.readout, widths)]
    sl = [slice(s, s + w) for s, w in zip(starts, widths)]

    def result(x: int, y: int) -> InnerResult:
        Wx, Wy, mx, my = W[x], W[y], mu[sl[x]], mu[sl[y]]
        return moment_result(plan, M[sl[x], sl[y]], [mx, my], Wx[1:], Wy[1:], x == y or p.a is p.b)

    return result(0, 1), result(0, 0), result(1, 1)


def _input_state(problem: InnerProblem, ha: Component, hb: Component, independent: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The joint (mean, second moment) of the two heads' attention inputs,
    flat and padded: the measure pushed through the linear maps before them.
    With independent positions per position, E_s C0 E_t' from the per-position
    maps (an embedding's vocabulary is contracted once, nothing factorised);
    else through the flat maps."""
    measure: Gaussian = problem.measure  # type: ignore[assignment]
    if independent:
        n = ha.layers[-1].n_ctx
        law: Gaussian = measure.per_position(n)  # type: ignore[assignment]
        E = [moment_head(h)[1] for h in (ha, hb)]  # type: ignore[index]
        m0 = np.r_[1.0, law.block_mean()]
        read = [e[1:, 1:] if law.cov is None else e[1:, 1:] @ np.asarray(law.cov, dtype=float) for e in E]
        mus = [np.r_[1.0, np.tile((e @ m0)[1:], n)] for e in E]
        blocks = [[np.outer(mx, my) for my in mus] for mx in mus]
        for x, y in ((0, 0), (0, 1), (1, 0), (1, 1)):
            blocks[x][y][1:, 1:] += np.kron(np.eye(n), read[x] @ E[y][1:, 1:].T)
        return np.concatenate(mus), np.block(blocks)
    maps = []
    for h in (ha, hb):
        pre = _linear_prefix(h)
        maps.append(fold(Sequential(*pre))[1] if pre else np.eye(h.in_features + 1))
    T = np.concatenate(measure.images(maps))  # x~ = T u~, E[u~ u~'] = I
    return T[:, 0].copy(), T @ T.T
