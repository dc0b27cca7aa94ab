"""Route "pairwise-gram": the cross Grams of every pair's factors.

The cross Grams La Lb^T, Ra Rb^T, La Rb^T, Ra Lb^T and Da^T Db of every
pair, as one big matrix product per block of models, then the Hadamard core
of section 3.2 of the design note (for stacks: the Gram recursion of section
3.3 batched over pairs, G of shape (a, w_a, b, w_b)).  About
8 h^2 d + 2 h^2 o flops per pair.  A symmetric matrix computes the blocks
i <= j only (numpy multiplies a diagonal block by syrk).

In stacks each intermediate Gram G[a, b] is divided by
sqrt(|G[a,a]| |G[b,b]|); the cosine is invariant to that, and the norms are
rebuilt from the logs of the scales (:func:`_log_scale`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..planner import ContractionPlan
from .costs import COSTS
from .job import Gram, Job, judged_gram
from ..progress import LONG_FLOPS, progress_bar
from ..threads import blas_worker_pool
from .ops import THREADED_FLOPS, Clock, Ops, partition, run_tasks
from .prepare import Chain, Dims, rounding_unit, stack_models, uncovered
from .results import RouteCost

NAME = "pairwise-gram"
COSTED = True

# Blocks: at least this many stacked rows per block (smaller matrix products
# lose BLAS efficiency) and at most this many blocks per side when memory
# does not force more (more blocks skip more of the symmetric matrix's lower
# triangle, at smaller products).
_MIN_BLOCK_ROWS = 1024
_MAX_SYM_BLOCKS = 8
# On CPUs the blocks are also kept near this size when memory allows more:
# buffers of blocks that small are recycled by the allocator, while fresh
# large ones cost page faults (on the VMs measured, touching new memory took
# up to ~2 ms per MiB), and the products are already large enough for full
# BLAS speed.
_WORKING_SET = 64 * 2**20


@dataclass(frozen=True)
class _Blocks:
    """The layout: ``models`` per block, whether each block is stacked once
    per call and kept for all its block pairs (``keep``), and the worker
    threads."""

    models: int
    keep: bool
    workers: int


# ------------------------------------------------------------ the interface


def applies(job: Job) -> str | None:
    """Any models the batched routes cover (one bilinear layer; stacks under
    the network product), except centred products in float32."""
    if job.prepared is None:
        return uncovered(job.inner)
    if job.centered and job.ops.itemsize < 8:
        # Centring cancels each model's constant term only in the sum over
        # the pair's products here, after they are formed: float32 loses the
        # digits of a large output mean (a bias of 1e3: 20 % of a cosine).
        # materialize cancels it within each model's tensor, before any product.
        return ("in float32 the centred product loses digits on this route (the output means cancel after the "
                "products); materialize or float64 keeps them")
    return None


def layout(job: Job) -> RouteCost:
    """The blocking that fits ``job.memory``, its flops and peak bytes."""
    prep, ops = job.prepared, job.ops
    assert prep is not None, "pairwise-gram laid out for a job it does not apply to"
    # blocks near the working set on CPUs (four times it in torch), as large as memory allows on a GPU
    target = job.memory if ops.cuda else min(job.memory, _WORKING_SET * (4 if ops.is_torch else 1))
    NB = len(prep.rows) if prep.cols is None else len(prep.cols)
    return _layout(len(prep.rows), NB, job.symmetric, prep.dims, ops.itemsize, job.memory, not ops.is_torch, target,
                   job.threads)


def run(job: Job, cost: RouteCost, clock: Clock) -> Gram:
    """The Gram of the job, block pair by block pair as ``cost.layout`` says."""
    prep, blocks = job.prepared, cost.layout
    assert prep is not None and isinstance(blocks, _Blocks)
    K, kA, kB, logA, logB, terms = _run(prep.rows, prep.cols, prep.dims, job.ops, blocks, clock, job.progress,
                                        cost.flops > LONG_FLOPS)
    gram = Gram(K, kA, kB, logA, logB, clock.total_flops, clock.steps(), job.ops.dtype_name, job.ops.name)
    unit = rounding_unit(job.ops.itemsize)
    return judged_gram(gram, *(None if t is None else unit * t for t in terms), prep.cols is None)


# ------------------------------------------------------------ costs and layout


def _fused(dims: Dims) -> list[bool]:
    """Per layer, whether it is propagated in the fused order (see _fused_uncached)."""
    if dims not in _FUSED_MEMO:
        _FUSED_MEMO[dims] = _fused_uncached(dims)
    return _FUSED_MEMO[dims]


_FUSED_MEMO: dict[Dims, list[bool]] = {}


def _fused_uncached(dims: Dims) -> list[bool]:
    """Per layer l >= 1, the planner's choice between the two orders of the
    chain X_a D_a core D_b^T X_b^T: fused (P_a = X_a D_a once per model, then
    P_a core P_b^T per pair) or through G = D_a core D_b^T (better when the
    intermediate width w is below the hidden width)."""
    out = [False]
    for l in range(1, dims.depth):
        H, Hp, w = dims.H[l], dims.H[l - 1], dims.w[l - 1]
        via_g = (COSTS.flops("oh,hk->ok", (w, Hp), (Hp, Hp)) + COSTS.flops("ok,pk->op", (w, Hp), (w, Hp))
                 + COSTS.flops("xi,ij->xj", (2 * H, w), (w, w)) + COSTS.flops("xj,yj->xy", (2 * H, w), (2 * H, w)))
        fused = COSTS.flops("xh,hk->xk", (2 * H, Hp), (Hp, Hp)) + COSTS.flops("xk,yk->xy", (2 * H, Hp), (2 * H, Hp))
        out.append(fused < via_g)
    return out


def _pair_elements(dims: Dims) -> int:
    """Elements held per pair of models at the peak of one block."""
    fused = _fused(dims)
    worst = 0
    for l in range(dims.depth):
        H, wi = dims.H[l], dims.w_in(l)
        e = 4 * H * H + 3 * H * H  # Z, core and one temporary
        if l > 0:
            Hp = dims.H[l - 1]
            e += Hp * Hp + (4 * H * Hp if fused[l] else 2 * wi * Hp + 2 * wi * wi + 4 * H * wi)
        if l == dims.depth - 1:
            e += H * H  # Da^T Db
        worst = max(worst, e)
    return worst


def _phase_flops(cI: int, cJ: int, dims: Dims, same: bool, numpy_syrk: bool) -> list[dict[str, int]]:
    """Planner flops of one block of pairs (cI x cJ models): per layer, per phase
    ("in": the cross Gram (layer 1) or the propagation to Z = [L; R] G [L; R]^T
    (later layers); "core": the Hadamard core and its rescaling; "out": Da^T Db
    and "reduce": the final sum (last layer))."""
    half = 0.5 if (same and numpy_syrk) else 1.0  # numpy multiplies X @ X.T by syrk (one triangle)
    fused = _fused(dims)
    layers = []
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        ph: dict[str, int] = {}
        if l == 0:
            ph["in"] = int(half * COSTS.flops("xi,yi->xy", (cI * 2 * H, wi), (cJ * 2 * H, wi)))
        elif fused[l]:
            Hp = dims.H[l - 1]
            ph["in"] = (COSTS.flops("axh,ahbk->axbk", (cI, 2 * H, Hp), (cI, Hp, cJ, Hp))
                        + COSTS.flops("axbk,byk->axby", (cI, 2 * H, cJ, Hp), (cJ, 2 * H, Hp)))
        else:
            Hp = dims.H[l - 1]
            ph["in"] = (COSTS.flops("aoh,ahbk->aobk", (cI, wi, Hp), (cI, Hp, cJ, Hp))
                        + COSTS.flops("aobk,bpk->aobp", (cI, wi, cJ, Hp), (cJ, wi, Hp)) + cI * cJ * wi * wi
                        + COSTS.flops("axi,aibj->axbj", (cI, 2 * H, wi), (cI, wi, cJ, wi))
                        + COSTS.flops("axbj,byj->axby", (cI, 2 * H, cJ, wi), (cJ, 2 * H, wi)))
        ph["core"] = 3 * cI * cJ * H * H  # LL*RR + LR*RL
        if l == dims.depth - 1:
            ph["out"] = int(half * COSTS.flops("ox,oy->xy", (wo, cI * H), (wo, cJ * H)))
            ph["reduce"] = COSTS.flops("ahbk,ahbk->ab", (cI, H, cJ, H), (cI, H, cJ, H))
        elif fused[l + 1]:
            ph["core"] += cI * cJ * H * H  # rescaling
        layers.append(ph)
    return layers


def _block_flops(cI: int, cJ: int, dims: Dims, same: bool, numpy_syrk: bool) -> int:
    return sum(sum(ph.values()) for ph in _phase_flops(cI, cJ, dims, same, numpy_syrk))


def _count_blocks(parts_a: list[tuple[int, int]], parts_b: list[tuple[int, int]], sym: bool
                  ) -> dict[tuple[int, int, bool], int]:
    """How many blocks of each (rows, columns, diagonal) size a blocking has."""
    counts: dict[tuple[int, int, bool], int] = {}
    for i, (a0, a1) in enumerate(parts_a):
        for j, (b0, b1) in enumerate(parts_b):
            if sym and j < i:
                continue
            key = (a1 - a0, b1 - b0, sym and i == j)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _diag_flops(c: int, dims: Dims) -> int:
    f = 0
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        if l > 0:
            f += COSTS.flops("mxi,mij->mxj", (c, 2 * H, wi), (c, wi, wi))
        f += COSTS.flops("mxj,myj->mxy", (c, 2 * H, wi), (c, 2 * H, wi)) + 3 * c * H * H
        if l == dims.depth - 1:
            f += COSTS.flops("moh,mok->mhk", (c, wo, H), (c, wo, H)) + 2 * c * H * H
        else:
            f += (COSTS.flops("moh,mhk->mok", (c, wo, H), (c, H, H))
                  + COSTS.flops("mok,mpk->mop", (c, wo, H), (c, wo, H)))
    return f


def _plans(dims: Dims, cI: int, cJ: int) -> tuple[tuple[str, ContractionPlan], ...]:
    H, n, o = dims.H[0], dims.n, dims.w[-1]
    plans = [("cross-gram", COSTS.plan("xi,yi->xy", (cI * 2 * H, n), (cJ * 2 * H, n)))]
    Hl = dims.H[-1]
    plans.append(("down-gram", COSTS.plan("ox,oy->xy", (o, cI * Hl), (o, cJ * Hl))))
    plans.append(("hadamard", COSTS.plan("ahbk,ahbk->ab", (cI, Hl, cJ, Hl), (cI, Hl, cJ, Hl))))
    return tuple(plans)


def _layout(NA: int, NB: int, sym: bool, dims: Dims, itemsize: int, memory: int, numpy_syrk: bool,
            target: int, threads: int = 1) -> RouteCost:
    """The cost of the blocking that fits ``memory`` bytes, with its _Blocks
    as the layout.  Blocks are stacked once and kept when all of them fit
    within ``target`` beside the largest block's work (on a GPU: the host-side
    stacking and the transfer per block pair otherwise took ten times the
    products' time); otherwise each block pair stacks its two blocks.  Up to
    ``threads`` workers (numpy) take block pairs in turn when the blocks cost
    at least THREADED_FLOPS, each holding one block pair's work within the
    target (``memory`` bounds all of them together)."""
    per_pair = _pair_elements(dims) * itemsize
    per_model = sum(2 * dims.H[l] * dims.w_in(l) + dims.w[l] * dims.H[l] for l in range(dims.depth)) * itemsize

    def laid_out(workers: int) -> RouteCost:
        need = lambda c: c * c * per_pair + 2 * c * per_model  # noqa: E731  one worker's

        def largest(limit: int) -> int:
            lo, hi = 1, max(NA, NB)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if need(mid) <= limit else (lo, mid - 1)
            return lo

        c_mem = largest(memory // workers)
        fits = workers * need(c_mem) <= memory
        c = min(c_mem, largest(min(memory // workers, target)))
        if sym:
            # prefer a few blocks per side: blocks below the diagonal are skipped
            rows = 2 * dims.H[0]
            want = max(1, min(_MAX_SYM_BLOCKS, (NA * rows) // _MIN_BLOCK_ROWS))
            c = min(c, -(-NA // want))
        parts_a = partition(NA, c)
        parts_b = parts_a if sym else partition(NB, c)
        flops = sum(k * _block_flops(cI, cJ, dims, same, numpy_syrk)
                    for (cI, cJ, same), k in _count_blocks(parts_a, parts_b, sym).items())
        if dims.depth > 1 or not sym:
            flops += _diag_flops(NA, dims) + (0 if sym else _diag_flops(NB, dims))
        cmax, cmax_b = max(b - a for a, b in parts_a), max(b - a for a, b in parts_b)
        work = workers * cmax * cmax_b * per_pair
        stacked = (NA + (0 if sym else NB)) * per_model
        nblocks = len(parts_a) * (len(parts_a) + 1) // 2 if sym else len(parts_a) * len(parts_b)
        keep = nblocks > 1 and work + stacked <= min(memory, workers * target)
        peak = work + (stacked if keep else workers * 2 * cmax * per_model)
        blocking = (f"{nblocks} block{'s' if nblocks != 1 else ''} of up to {cmax} x {cmax_b} models"
                    + (", each stacked once" if keep else "") + (f", in {workers} threads" if workers > 1 else ""))
        return RouteCost(NAME, int(flops), int(peak), bool(fits), blocking, _plans(dims, cmax, cmax_b),
                         _Blocks(c, keep, workers))

    serial = laid_out(1)
    if threads < 2 or serial.flops < THREADED_FLOPS:
        return serial
    parts = partition(NA, serial.layout.models)
    nblocks = sum(_count_blocks(parts, parts if sym else partition(NB, serial.layout.models), sym).values())
    for workers in range(min(threads, nblocks), 1, -1):  # as many as fit the memory
        threaded = laid_out(workers)
        if threaded.fits:
            return threaded
    return serial


# ------------------------------------------------------------ computation


def _diag(ops: Ops, Xs: list[Any], Ds: list[Any], dims: Dims) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Self terms of a block of models: (K^[a, a], r[layer, a], the size of
    their terms) with r the rescaling 1/sqrt(|G[a,a]|_F) of each intermediate
    Gram (1 at the last layer); see :func:`_term_sizes`."""
    c = Xs[0].shape[0]
    rs = np.ones((dims.depth, c))
    G = None
    K = None
    for l in range(dims.depth):
        H = dims.H[l]
        X = Xs[l]
        Y = X if G is None else X @ G
        Z = Y @ ops.mT(X)
        core = ops.core_batched(Z, H)
        D = Ds[l]
        if l == dims.depth - 1:
            DD = ops.mT(D) @ D
            K = ops.get((core * DD).sum(dim=(1, 2)) if ops.is_torch else (core * DD).sum(axis=(1, 2)))
            sizes = _term_sizes(ops, core, DD) if dims.depth == 1 else None
        else:
            G = D @ core @ ops.mT(D)
            fro = np.sqrt(ops.row_sq(G.reshape(G.shape[0], -1)))
            r = np.where(fro > 0, 1.0 / np.sqrt(np.where(fro > 0, fro, 1.0)), 1.0)
            rs[l] = r
            rr = ops.put(r * r)
            G = G * rr[:, None, None]
    return np.asarray(K, dtype=float), rs, sizes


def _term_sizes(ops: Ops, core: Any, DD: Any) -> np.ndarray:
    """Per model (the leading axis), sum |core| |DD| over its hidden pairs:
    the size of the terms whose sum is its self product at one layer, which
    float64 keeps to about CENTRED_ROUNDING of it.  The terms cancel where
    centring removes an output mean (only in this sum, on this route) and
    where hidden units nearly cancel (down weights +K and -K on rows 1/K
    apart: 2e-3 off at K = 1e7, labelled exact)."""
    size = ops.t.abs(core) * ops.t.abs(DD) if ops.is_torch else np.abs(core) * np.abs(DD)
    return np.asarray(ops.get(size.sum(dim=(-2, -1)) if ops.is_torch else size.sum(axis=(-2, -1))), dtype=float)


def _right_product(ops: Ops, QB: Any, Y: Any, cI: int, cJ: int, x: int) -> Any:
    """Z[b, a, x, y] = sum_k Y[a, x, b, k] QB[b, y, k] as a (b, a, x, y) view.

    Computed as QB[b] @ Y[:, :, b, :]^T, batched over b, on a strided view of
    Y: no copy of Y, and the wide product (y rows, a*x columns) ran 30-40 %
    faster here than the tall one after a transposing copy."""
    k = QB.shape[-1]
    Yv = ops.perm(Y.reshape(cI * x, cJ, k), (1, 0, 2))  # (b, a*x, k), a view
    Zt = QB @ ops.mT(Yv)  # (b, y, a*x)
    return ops.perm(Zt.reshape(cJ, QB.shape[1], cI, x), (0, 2, 3, 1))


def _block(ops: Ops, A: tuple[list[Any], list[Any], list[Any]], B: tuple[list[Any], list[Any], list[Any]],
           rA: np.ndarray, rB: np.ndarray, dims: Dims, same: bool, clock: Clock, numpy_syrk: bool) -> Any:
    """K^[a, b] for a block of pairs (all a in A, all b in B); A and B as made by stack_models."""
    XA, DA, PA = A
    XB, DB, PB = B
    cI, cJ = XA[0].shape[0], XB[0].shape[0]
    phases = _phase_flops(cI, cJ, dims, same, numpy_syrk)
    fused = _fused(dims)
    core = None
    for l in range(dims.depth):
        H, wi, wo = dims.H[l], dims.w_in(l), dims.w[l]
        ph = phases[l]
        clock.start()
        if l == 0:
            # rows (L or R, model, hidden): the four cross Grams are the quadrants
            XAf = ops.contig(ops.perm(XA[0].reshape(cI, 2, H, wi), (1, 0, 2, 3))).reshape(2 * cI * H, wi)
            XBf = XAf if same else ops.contig(ops.perm(XB[0].reshape(cJ, 2, H, wi), (1, 0, 2, 3))).reshape(2 * cJ * H, wi)
            Z = XAf @ ops.mT(XBf)
            clock.lap("cross-gram", ph["in"])
            core = ops.core(Z, cI * H, cJ * H).reshape(cI, H, cJ, H)  # (a, h, b, k)
            del Z, XAf, XBf
        else:
            Hp = dims.H[l - 1]
            if fused[l]:  # Z = P_a core P_b^T
                Y = PA[l] @ core.reshape(cI, Hp, cJ * Hp)  # (a, x, b*k)
                del core
                Z = _right_product(ops, PB[l], Y, cI, cJ, 2 * H)
            else:  # G = D_a core D_b^T (rescaled), then Z = X_a G X_b^T
                U = (DA[l - 1] @ core.reshape(cI, Hp, cJ * Hp)).reshape(cI, wi, cJ, Hp)  # (a, o, b, k)
                del core
                U = ops.contig(ops.perm(U, (2, 0, 1, 3))).reshape(cJ, cI * wi, Hp)
                G = (U @ ops.mT(DB[l - 1])).reshape(cJ, cI, wi, wi)  # (b, a, o, p)
                del U
                G = ops.contig(ops.perm(G, (1, 2, 0, 3)))  # (a, o, b, p)
                G *= ops.put(np.outer(rA[l - 1], rB[l - 1]))[:, None, :, None]
                Y = XA[l] @ G.reshape(cI, wi, cJ * wi)  # (a, x, b*j)
                del G
                Z = _right_product(ops, XB[l], Y, cI, cJ, 2 * H)
            del Y
            clock.lap("propagate", ph["in"])
            if l == dims.depth - 1:
                core = ops.core_batched(Z, H)  # (b, a, h, k): reduced as it is
            else:  # in Z's memory order (b, k, a, h); the next layer reads it as an (a, h, b*k) view
                core = ops.perm(ops.core_batched(Z, H), (1, 2, 0, 3))
            del Z
        if l < dims.depth - 1 and fused[l + 1]:
            core *= ops.put(np.outer(rA[l], rB[l]))[:, None, :, None]
        clock.lap("hadamard", ph["core"])
        if l == dims.depth - 1:
            DAt = ops.contig(ops.perm(DA[l], (0, 2, 1))).reshape(cI * H, wo)
            DBt = DAt if same else ops.contig(ops.perm(DB[l], (0, 2, 1))).reshape(cJ * H, wo)
            DD = (DAt @ ops.mT(DBt)).reshape(cI, H, cJ, H)
            clock.lap("down-gram", ph["out"])
            K = ops.einsum("ahbk,ahbk->ab" if l == 0 else "bahk,ahbk->ab", core, DD)
            clock.lap("hadamard", ph["reduce"])
            if same and dims.depth == 1:  # each model against itself: its terms' sizes (the self products' rounding)
                own = np.arange(cI)
                return K, _term_sizes(ops, core[own, :, own, :], DD[own, :, own, :])
            return K, None
    raise AssertionError("unreachable")  # pragma: no cover


def _log_scale(chains: Sequence[Chain], rs: np.ndarray) -> np.ndarray:
    """log U per model: true <a, b> = K^[a, b] U_a U_b (see the module docstring)."""
    logs = np.array([c.log_scales for c in chains], dtype=float).T  # (depth, N)
    logU = np.zeros(len(chains))
    with np.errstate(divide="ignore"):
        for l in range(logs.shape[0]):
            logU = 2 * logU + logs[l] - np.log(rs[l])
    return logU


def _run(A: list[Chain], B: list[Chain] | None, dims: Dims, ops: Ops, blocks: _Blocks, clock: Clock,
         progress: bool | None, long: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                     list[np.ndarray | None]]:
    """(K^ (NA, NB), K^ diagonal of A, of B, log U of A, of B, and per side the
    sizes of the self products' terms, None at depth > 1) as ``blocks``
    lays them out: with ``keep``, each block stacked once and kept for all
    its block pairs; with ``workers`` > 1 (numpy), the blocks' self terms and
    the block pairs in that many threads, each with one BLAS thread (see
    run_tasks).  ``progress`` and ``long`` as in progress_bar."""
    sym = B is None
    numpy_syrk = not ops.is_torch
    keep, workers = blocks.keep, blocks.workers
    parts_a = partition(len(A), blocks.models)
    parts_b = parts_a if sym else partition(len(B), blocks.models)
    need_diag = dims.depth > 1 or not sym
    fused = _fused(dims)
    kept: dict[tuple[str, int], Any] = {}

    def stacked(side: str, part: int, clk: Clock, with_p: bool = True) -> Any:
        """The stacked block ``part`` of side "a" or "b" (kept when ``keep``)."""
        if (side, part) in kept:
            return kept[(side, part)]
        chains, (p0, p1) = (A, parts_a[part]) if side == "a" else (B, parts_b[part])
        clk.start()
        S = stack_models(chains[p0:p1], dims, ops, fused if with_p else ())
        clk.lap("stack", 0)
        return S

    def diag(side: str, part: int, clk: Clock) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        Xs, Ds, _ = stacked(side, part, clk, with_p=False)
        clk.start()
        k, r, sizes = _diag(ops, Xs, Ds, dims)
        a0, a1 = (parts_a if side == "a" else parts_b)[part]
        clk.lap("self-terms", _diag_flops(a1 - a0, dims))
        return k, r, sizes

    K = np.zeros((len(A), len(A) if sym else len(B)))
    # per side, the size of each self product's terms (depth 1; None where not known): see _term_sizes
    terms: list[np.ndarray | None] = [np.zeros(len(A)) if sym and dims.depth == 1 else None, None]

    def block(i: int, j: int, clk: Clock) -> None:
        (a0, a1), (b0, b1) = parts_a[i], parts_b[j]
        same = sym and i == j
        SA = stacked("a", i, clk)
        SB = SA if same else stacked("a" if sym else "b", j, clk)
        blk, sizes = _block(ops, SA, SB, rA[:, a0:a1], rB[:, b0:b1], dims, same, clk, numpy_syrk)
        blk = ops.get(blk).astype(float)
        K[a0:a1, b0:b1] = blk  # disjoint blocks: the workers write K in place
        if sizes is not None:
            terms[0][a0:a1] = sizes
        if sym and not same:
            K[b0:b1, a0:a1] = blk.T

    pairs = [(i, j) for i in range(len(parts_a)) for j in range(len(parts_b)) if not (sym and j < i)]
    with contextlib.ExitStack() as stack:
        pool = blas_worker_pool(stack, workers) if workers > 1 and not ops.is_torch else None
        if keep:
            for side in ("a",) if sym else ("a", "b"):
                for part in range(len(parts_a if side == "a" else parts_b)):
                    kept[(side, part)] = stacked(side, part, clock)
        if need_diag:
            def side_diag(side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
                parts = parts_a if side == "a" else parts_b
                out = run_tasks([lambda clk, p=p: diag(side, p, clk) for p in range(len(parts))], clock, pool, workers)
                sizes = None if out[0][2] is None else np.concatenate([t for _, _, t in out])
                return np.concatenate([k for k, _, _ in out]), np.concatenate([r for _, r, _ in out], axis=1), sizes

            kA, rA, terms[0] = side_diag("a")
            kB, rB, terms[1] = (kA, rA, terms[0]) if sym else side_diag("b")
        else:
            rA = rB = np.ones((dims.depth, len(A)))
            kA = kB = None
        bar = progress_bar(len(pairs), "similarity matrix (pairwise-gram)", "block", progress, long)
        try:
            run_tasks([lambda clk, i=i, j=j: block(i, j, clk) for i, j in pairs], clock, pool, workers, bar)
        finally:
            bar.close()
    if sym:
        kA = kB = np.diag(K).copy()
        terms[1] = terms[0]
    return K, kA, kB, _log_scale(A, rA), _log_scale(B if B is not None else A, rB), terms
