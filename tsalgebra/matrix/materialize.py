"""Route "materialize" (one bilinear layer): each model's symmetric tensor
formed once, then one Gram of those.

Each model's symmetric padded coefficient tensor S[o, i, j] is formed once
(about 2 o h d^2 flops per model), only its upper triangle kept (in blocks;
entries off the diagonal blocks times sqrt 2), and the matrix is one Gram of
those rows (about o d^2 per pair).  Wins by a wide margin when h^2 > o d.
Two formations (see :class:`_Formation`): a GEMM per output, then the blocks
of T + T^T (large h), or the upper block triangle straight from the
symmetric CP form (small h); the planner picks by cost.  A symmetric matrix
takes one Gram of one set of rows.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from .costs import COSTS
from .job import Gram, Job, judged_gram
from ..progress import LONG_FLOPS, progress_bar
from ..threads import blas_worker_pool
from .ops import THREADED_FLOPS, Clock, Ops, partition
from .prepare import Chain, Dims, centred_rounding, uncovered
from .results import RouteCost

NAME = "materialize"
COSTED = True

_SQRT2 = math.sqrt(2.0)
# On CPUs the chunks are kept near this size when memory allows more: the
# buffer of flattened tensors is allocated once per call and reused by every
# feature chunk; its huge-page faults took 0.03-0.7 s of kernel time per call
# here at 263-290 MB (all ten outputs of 100 models at d = 256), 0.00-0.04 s
# at 145 MB (five).  Where the chunks are ranges of outputs, the formation's
# products are cut to the chunk's outputs rather than the chunk grown to a
# product's.
_WORKING_SET = 160 * 2**20
# Each model's tensors are formed a few outputs at a time, so that the scaled
# operand and the product stay near this size.
_FORM_CACHE = 8 * 2**20
# Formation (see _Formation): rows per product of the triangle formation, and
# the flop-equivalent of one pass over one entry (measured here: symmetrizing
# and packing a 257 x 257 output, two passes, took about as long as 100 GEMM
# flops per entry).
_TRI_ROWS = 256
_PASS_FLOPS = 50
# Diagonal blocks of the packed layout (see _packed_blocks) have at most this
# many rows: larger ones add Gram features, smaller ones more calls (a 257 x 257
# output took 49 us at 32, 63 us at 16, against 94 us for a gather of the
# triangle here).
_PACK_LEAF = 32


# ------------------------------------------------------------ the interface


def applies(job: Job) -> str | None:
    """Models of exactly one bilinear layer that the batched routes cover."""
    if job.prepared is None:
        return uncovered(job.inner)
    if job.prepared.dims.depth != 1:
        return "materialize needs models of exactly one bilinear layer"
    return None


def layout(job: Job) -> RouteCost:
    """The formation, feature chunks and model blocks that fit ``job.memory``,
    their flops and peak bytes."""
    prep, ops = job.prepared, job.ops
    assert prep is not None, "materialize laid out for a job it does not apply to"
    # chunks near the working set on CPUs, as large as memory allows on a GPU
    target = job.memory if ops.cuda else min(job.memory, _WORKING_SET)
    return _layout(prep.rows, prep.cols, prep.dims, ops.itemsize, job.memory, target, ops.cuda, job.threads)


def run(job: Job, cost: RouteCost, clock: Clock) -> Gram:
    """The Gram of the job, feature chunk by feature chunk as ``cost.layout`` says."""
    prep, lay = job.prepared, cost.layout
    assert prep is not None and isinstance(lay, _Layout)
    K, kA, kB = _run(prep.rows, prep.cols, prep.dims, job.ops, lay, clock, job.progress, cost.flops > LONG_FLOPS)
    # one layer: U is the product of the scales taken out of L~, R~ and D~
    logA = np.array([c.log_scales.sum() for c in prep.rows])
    logB = logA if prep.cols is None else np.array([c.log_scales.sum() for c in prep.cols])
    gram = Gram(K, kA, kB, logA, logB, clock.total_flops, clock.steps(), job.ops.dtype_name, job.ops.name)
    rounding = [None if side is None else centred_rounding(side, job.ops.itemsize) for side in (prep.rows, prep.cols)]
    return judged_gram(gram, *rounding, prep.cols is None)


# ------------------------------------------------------------ formation and layout


def _packed_blocks(n: int, leaf: int) -> tuple[tuple[int, int, int, int], ...]:
    """The packed layout of a symmetric n x n matrix: blocks (r0, r1, c0, c1)
    in feature order, row-major within each.  Halving [a, b) recursively: the
    off-diagonal rectangle [a, m) x [m, b), then both halves, down to diagonal
    blocks of at most ``leaf`` rows kept whole (r0 == c0).  Each block is one
    contiguous add of T and T^T (no gather), at about 11 % more features than
    the triangle at n = 257."""
    out: list[tuple[int, int, int, int]] = []

    def split(a: int, b: int) -> None:
        if b - a <= leaf:
            out.append((a, b, a, b))
            return
        m = (a + b) // 2
        out.append((a, m, m, b))
        split(a, m)
        split(m, b)

    split(0, n)
    return tuple(out)


def _packing(blocks: Sequence[tuple[int, ...]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into an n x n matrix of the packed layout's features and the
    weights (1 in the whole diagonal blocks, sqrt 2 in the rectangles) that make
    the packed dot product equal the Frobenius product of symmetric matrices."""
    idx, w = [], []
    for r0, r1, c0, c1 in blocks:
        idx.append((np.arange(r0, r1)[:, None] * n + np.arange(c0, c1)[None, :]).ravel())
        w.append(np.full((r1 - r0) * (c1 - c0), 1.0 if r0 == c0 else _SQRT2))
    return np.concatenate(idx), np.concatenate(w)


@dataclass(frozen=True)
class _Formation:
    """How the materialize route writes a model's symmetric tensors as rows.

    "packed": T = (D o L~)^T R~ per output (a GEMM with inner size H), then
    the blocks of T + T^T that _packed_blocks lists (rectangles times sqrt 2;
    one pass over the features on numpy, two over n^2 entries on torch).
    "triangle": the rows of the upper block triangle of S straight from the
    symmetric CP form, S[o, I, i0:] = 1/2 [D o L~, D o R~][:, I] [R~; L~][:, i0:]
    for row blocks I = [i0, i1) (columns beyond the block times sqrt 2):
    about (1 + rb/n) times the GEMM flops with inner size 2H, but no passes.
    Its features can be chunked by row blocks as well as by outputs (see
    _feature_chunks).  ``sub`` outputs go into one product (their rows
    stacked); it is part of the layout, so both sides of a cross matrix share
    it.  The planner takes the formation with fewer flops, counting a pass
    over an entry as _PASS_FLOPS (an add of T and T^T as two).  On a GPU:
    "packed", with ``models`` models per batched product (a few launches per
    output chunk, where launches, not flops, set the time).  On numpy,
    ``workers`` threads form disjoint groups of models and take the Gram over
    disjoint groups of features, each with one BLAS thread (see
    _run)."""

    kind: str
    n: int
    sub: int
    blocks: tuple[tuple[int, ...], ...] = ()  # row blocks (i0, i1) (triangle), _packed_blocks (packed)
    models: int = 1
    workers: int = 1

    def features(self, g0: int = 0, g1: int | None = None) -> int:
        """Features per output of row blocks g0:g1 (triangle) or of the whole layout."""
        if self.kind == "packed":
            return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self.blocks)
        return sum((i1 - i0) * (self.n - i0) for i0, i1 in self.blocks[g0:g1])

    @property
    def per_output(self) -> int:
        """Features per output."""
        return self.features()

    def flops(self, k: int, H: int, g0: int = 0, g1: int | None = None) -> int:
        """Planner flops of forming ``k`` outputs (row blocks g0:g1 of the
        triangle) of one model of hidden width H."""
        n = self.n
        if self.kind == "packed":
            return k * (n * H + COSTS.flops("ih,hj->ij", (n, H), (H, n)) + 2 * self.per_output)
        return sum(k * (i1 - i0) * 2 * H + COSTS.flops("xh,hj->xj", (k * (i1 - i0), 2 * H), (2 * H, n - i0))
                   for i0, i1 in self.blocks[g0:g1])

    def temp(self, k: int, H: int, itemsize: int) -> int:
        """Bytes of the temporaries of forming ``k`` outputs of one model."""
        return _formation_temp(self.kind, self.n, k, H, itemsize)


def _formation_temp(kind: str, n: int, k: int, H: int, itemsize: int) -> int:
    if kind == "packed":  # the scaled operand, the product, and its symmetrization (both engines)
        return (k * n * H + 3 * k * n * n) * itemsize
    return (k * n * 2 * H + 6 * H * n) * itemsize  # the scaled operand (at most all rows), [L; R] and [R; L] * sqrt 2


def _formation(n: int, H: int, o: int, models: int, itemsize: int, cuda: bool, max_sub: int | None = None
               ) -> _Formation:
    """The cheaper formation for one output of one model: forming flops, passes
    (packed), and its share of the Gram over ``models`` rows.  On a CPU each
    product takes as many outputs as keep its temporaries near _FORM_CACHE
    (all of them on a GPU), at most ``max_sub``; the triangle's row blocks give
    its products about _TRI_ROWS rows."""
    forms = []
    for kind in ("packed",) if cuda else ("triangle", "packed"):
        if cuda:
            sub = o
        else:
            fixed = _formation_temp(kind, n, 0, H, itemsize)
            per_output = max(1, _formation_temp(kind, n, 1, H, itemsize) - fixed)
            sub = int(max(1, min(o, (_FORM_CACHE - fixed) // per_output)))
        sub = min(sub, max_sub or sub)
        rb = min(n, max(8, min(-(-_TRI_ROWS // sub), -(-n // 8))))
        forms.append(_Formation(kind, n, sub, tuple(partition(n, rb)) if kind == "triangle"
                                else _packed_blocks(n, _PACK_LEAF)))
    cost = {f: f.flops(1, H) + 2 * models * f.per_output + (_PASS_FLOPS * 2 * f.per_output if f.kind == "packed" else 0)
            for f in forms}
    return min(cost, key=cost.get)


def _feature_chunks(form: _Formation, o: int, oc: int, oc_max: int | None = None
                    ) -> tuple[tuple[int, int, int, int], ...]:
    """The chunks (o0, o1, g0, g1) of the features a model block's buffer holds
    in turn: outputs o0:o1 of the formation's blocks g0:g1, about ``oc``
    outputs' worth each (at most ``oc_max``'s).  The triangle's are row blocks
    of all outputs when every row block fits ``oc``: its products then take
    all outputs' rows (up to ``sub``), which ran at ~85 against ~68 GFLOP/s
    for five outputs per product here (100 models at (256, 64, 10));
    otherwise ranges of outputs."""
    nb = len(form.blocks)
    by_output = tuple((o0, o1, 0, nb) for o0, o1 in partition(o, oc))
    sizes = np.array([o * form.features(g, g + 1) for g in range(nb)])
    if form.kind != "triangle" or oc >= o or sizes.max() > oc * form.per_output:
        return by_output
    # as few chunks as the target allows, balanced (their size is a target
    # for the working set, not a bound): cut where the running sum is nearest
    # to an equal share
    cs = np.cumsum(sizes)
    for m in range(-(-int(cs[-1]) // (oc * form.per_output)), nb + 1):
        cuts = sorted({0, nb, *(int(np.argmin(np.abs(cs - cs[-1] * j / m))) + 1 for j in range(1, m))})
        if max(cs[b - 1] - (cs[a - 1] if a else 0) for a, b in zip(cuts, cuts[1:])) <= (oc_max or oc) * form.per_output:
            break
    return tuple((0, o, g0, g1) for g0, g1 in zip(cuts, cuts[1:]))


def _describe_chunks(chunks: Sequence[tuple[int, int, int, int]], form: _Formation) -> str:
    if chunks[0][3] - chunks[0][2] < len(form.blocks):
        sizes = "+".join(str(g1 - g0) for _, _, g0, g1 in chunks)
        return f"{len(chunks)} chunks of row blocks ({sizes} of {len(form.blocks)}) of all {chunks[0][1]} outputs"
    most = max(o1 - o0 for o0, o1, _, _ in chunks)
    return f"{len(chunks)} output chunk{'s' if len(chunks) != 1 else ''} of up to {most}"


def _form_flops(form: _Formation, chunk: tuple[int, int, int, int], widths: Sequence[int]) -> int:
    """Planner flops of forming ``chunk`` for models of these hidden widths."""
    o0, o1, g0, g1 = chunk
    return sum(form.flops(o1 - o0, H, g0, g1) * count for H, count in Counter(widths).items())


def _gram_flops(cI: int, cJ: int, F: int) -> int:
    return COSTS.flops("xf,yf->xy", (cI, F), (cJ, F))  # a full GEMM (see Ops.wide_gram)


@dataclass(frozen=True)
class _Layout:
    """The layout: ``models`` per block, the feature ``chunks`` (see
    _feature_chunks) the buffers hold in turn, and the formation."""

    models: int
    chunks: tuple[tuple[int, int, int, int], ...]
    form: _Formation


def _layout(A: list[Chain], B: list[Chain] | None, dims: Dims, itemsize: int, memory: int, target: int, cuda: bool,
            threads: int = 1) -> RouteCost:
    """The cost of the layout that fits ``memory`` bytes, with its _Layout.
    All models of a side in one block when one output of theirs fits
    ``memory`` (a chunk then near ``target``, and a product of the formation
    no larger than a chunk); otherwise blocks of models, re-forming a block's
    tensors for every block it meets.  Up to ``threads`` workers on numpy,
    their formation temporaries within a quarter of the target."""
    sym = B is None
    NA, NB = len(A), (len(A) if sym else len(B))
    n, o = dims.n, dims.w[-1]
    Hmax = max(dims.H[0], 1)
    kbytes = 8 * NA * NB + 16 * n * n  # the accumulated matrix, packing indices and weights
    cap = NA if sym else NA + NB

    def sized(max_sub: int | None) -> tuple[_Formation, int, int, int]:
        """The formation, its temporaries, bytes of one output of one model, and
        the outputs per chunk near the target."""
        form = _formation(n, Hmax, o, NA + (0 if sym else NB), itemsize, cuda, max_sub)
        temp, row = form.temp(form.sub, Hmax, itemsize), form.per_output * itemsize
        if cuda:  # a model's factors, stacked on the device for the batched products
            temp += (2 * n + form.sub) * Hmax * itemsize
        elif form.flops(o, Hmax) * max(NA, NB) >= THREADED_FLOPS:
            form = replace(form, workers=int(max(1, min(threads, max(NA, NB), min(memory, target) // (4 * temp)))))
            temp *= form.workers
        return form, temp, row, (min(memory, target) - kbytes - temp) // (cap * row)

    form, temp, row, oc_target = sized(None)
    # chunks of row blocks take all outputs, so the products keep their size;
    # chunks of outputs cut the products to theirs
    rows = oc_target >= 1 and _feature_chunks(form, o, oc_target)[0][1] == o
    if oc_target < form.sub and not rows:
        form, temp, row, oc_target = sized(max(1, oc_target))
    q = form.sub
    avail = memory - kbytes - temp
    oc_memory = avail // (cap * row) if avail > 0 else 0
    if oc_memory >= 1:
        oc = int(max(1, min(o, oc_memory, oc_target if rows else max(q, oc_target))))
        c, fits = max(NA, NB), True
    else:
        oc = 1
        c = int(max(1, avail // (2 * row))) if avail > 0 else 1
        fits = avail >= 2 * row
    parts_a = partition(NA, c)
    parts_b = parts_a if sym else partition(NB, c)
    chunks = _feature_chunks(form, o, oc, oc_memory if oc_memory >= 1 else None)
    HA = [ch.blocks[0][0].shape[0] for ch in A]
    HB = HA if sym else [ch.blocks[0][0].shape[0] for ch in B]
    flops = 0
    for chunk in chunks:
        o0, o1, g0, g1 = chunk
        for i, (a0, a1) in enumerate(parts_a):
            flops += _form_flops(form, chunk, HA[a0:a1])
            for j, (b0, b1) in enumerate(parts_b):
                if sym and j < i:
                    continue
                if not (sym and i == j):
                    flops += _form_flops(form, chunk, HB[b0:b1])
                flops += _gram_flops(a1 - a0, b1 - b0, (o1 - o0) * form.features(g0, g1))
    cmax = max(b - a for a, b in parts_a + parts_b)
    chunk_bytes = max((o1 - o0) * form.features(g0, g1) for o0, o1, g0, g1 in chunks) * itemsize
    if len(parts_a) == 1 and len(parts_b) == 1:
        peak = cap * chunk_bytes + temp + kbytes
    else:
        peak = 2 * cmax * chunk_bytes + temp + kbytes
    if cuda:  # as many models per product as the spare memory holds
        form = replace(form, models=int(max(1, min(cmax, 1 + (memory - peak) // temp))))
        peak += (form.models - 1) * temp
    blocking = (f"{form.kind} formation" + (f" of {form.models} models per product" if cuda else "")
                + (f" in {form.workers} threads" if form.workers > 1 else "")
                + f", {_describe_chunks(chunks, form)}, model blocks of up to {cmax}")
    F = chunk_bytes // itemsize
    plans = (("form", COSTS.plan("oh,hi,hj->oij", (q, Hmax), (Hmax, n), (Hmax, n))),
             ("gram", COSTS.plan("xf,yf->xy", (cmax, F), (cmax, F))))
    return RouteCost(NAME, int(flops), int(peak), bool(fits), blocking, plans, _Layout(c, chunks, form))


# ------------------------------------------------------------ computation


def _form(ops: Ops, chains: Sequence[Chain], chunk: tuple[int, int, int, int], form: _Formation, buf: Any,
          pack: tuple[Any, Any] | None, clock: Clock, pool: Any = None) -> Any:
    """Rows of the symmetric tensors S[m, o0:o1] (row blocks g0:g1 of the
    triangle) for ``chunk`` = (o0, o1, g0, g1), as ``form`` lays them out
    (weighted so that row dot products are Frobenius products), written into
    the front of the flat buffer ``buf``; groups of models in the threads of
    ``pool`` when given."""
    o0, o1, g0, g1 = chunk
    F = (o1 - o0) * form.features(g0, g1)
    X = buf[: len(chains) * F].reshape(len(chains), F)
    flops = _form_flops(form, chunk, [ch.blocks[0][0].shape[0] for ch in chains])  # before the clock starts
    clock.start()
    if form.kind == "packed" and ops.is_torch:
        _form_batched(ops, chains, o0, o1, form, X, pack)
    elif pool is not None:
        groups = partition(len(chains), -(-len(chains) // form.workers))
        for done in [pool.submit(_form_rows, ops, chains[a:b], chunk, form, X[a:b]) for a, b in groups]:
            done.result()
    else:
        _form_rows(ops, chains, chunk, form, X)
    clock.lap("form", flops)
    return X


def _form_rows(ops: Ops, chains: Sequence[Chain], chunk: tuple[int, int, int, int], form: _Formation, X: Any
               ) -> None:
    """_form's rows of ``chains``, one model at a time, into the rows of X."""
    o0, o1, g0, g1 = chunk
    k = o1 - o0
    n, P, q = form.n, form.per_output, form.sub
    if form.kind == "packed" and not ops.is_torch:
        sizes = [(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in form.blocks]
        blocks = list(zip(form.blocks, np.cumsum([0] + sizes[:-1]).tolist()))
        # one set of temporaries for all models (fresh ones per model cost page faults)
        scaled_buf = np.empty(q * n * max(ch.blocks[0][0].shape[0] for ch in chains))
        T = np.empty((q, n, n))
    for m, ch in enumerate(chains):
        L, R, D = ch.blocks[0]
        H = L.shape[0]
        if form.kind == "packed":
            # q outputs per product, into buffers reused across the model's
            # outputs (they stay in cache); then one add of T and T^T per block
            # of the layout for all q outputs, sqrt 2 folded into the scaled
            # operand and taken back out of the whole diagonal blocks
            Lt, Rb = ops.put(L.T), ops.put(R)
            Dh = D[o0:o1] / _SQRT2
            scaled = scaled_buf[: q * n * H].reshape(q, n, H)
            rows = X[m].reshape(k, P)
            for s0 in range(0, k, q):
                s1 = min(k, s0 + q)
                t = T[: s1 - s0]
                np.multiply(Lt[None], Dh[s0:s1, None, :], out=scaled[: s1 - s0])
                np.matmul(scaled[: s1 - s0].reshape(-1, H), Rb, out=t.reshape(-1, n))
                for (r0, r1, c0, c1), off in blocks:
                    out = rows[s0:s1, off : off + (r1 - r0) * (c1 - c0)].reshape(s1 - s0, r1 - r0, c1 - c0)
                    np.add(t[:, r0:r1, c0:c1], t[:, c0:c1, r0:r1].transpose(0, 2, 1), out=out)
                    if r0 == c0:
                        out *= 1 / _SQRT2
        else:
            # rows (i, output) of a product, from row st of the chunk's first
            # block on; the right operand is a transposed view, every row
            # times sqrt 2 until its block's turn: that block's diagonal
            # square holds both S[i, j] and S[j, i], and no later block reads it
            st, en = form.blocks[g0][0], form.blocks[g1 - 1][1]
            LRt = ops.put(np.concatenate([L[:, st:en].T, R[:, st:en].T], axis=1))  # (en - st, 2H)
            Dc = ops.put(0.5 * np.concatenate([D[o0:o1], D[o0:o1]], axis=1))  # (k, 2H)
            off = 0
            for s0 in range(0, k, q):
                s1 = min(k, s0 + q)
                RLt = ops.put(np.concatenate([R[:, st:].T, L[:, st:].T], axis=1))  # (n - st, 2H), fresh
                RLt *= _SQRT2
                for i0, i1 in form.blocks[g0:g1]:
                    j0, j1 = i0 - st, i1 - st
                    size = (s1 - s0) * (j1 - j0) * (n - i0)
                    RLt[j0:j1] *= 1 / _SQRT2
                    # the block's scaled rows (in cache; one operand for all rows ran slower)
                    A = (LRt[j0:j1, None, :] * Dc[None, s0:s1, :]).reshape(-1, 2 * H)
                    out = X[m, off : off + size].reshape((s1 - s0) * (j1 - j0), n - i0)
                    (ops.t if ops.is_torch else np).matmul(A, RLt[j0:].T, out=out)
                    off += size


def _form_batched(ops: Ops, chains: Sequence[Chain], o0: int, o1: int, form: _Formation, X: Any,
                  pack: tuple[Any, Any]) -> None:
    """The packed formation in torch, ``form.models`` models per batched
    product (their factors zero-padded to the widest hidden width among them),
    then T + T^T and the layout's entries gathered and weighted."""
    t, flat, weight = ops.t, *pack
    k, n, P, q = o1 - o0, form.n, form.per_output, form.sub
    for b0 in range(0, len(chains), form.models):
        batch = chains[b0 : b0 + form.models]
        M, H = len(batch), max(ch.blocks[0][0].shape[0] for ch in batch)
        Lt = t.zeros((M, n, H), dtype=ops.dtype, device=ops.device)
        Rb = t.zeros((M, H, n), dtype=ops.dtype, device=ops.device)
        Dh = t.zeros((M, k, H), dtype=ops.dtype, device=ops.device)
        for j, ch in enumerate(batch):
            L, R, D = ch.blocks[0]
            h = L.shape[0]
            Lt[j, :, :h] = t.from_numpy(np.ascontiguousarray(L.T))
            Rb[j, :h] = t.from_numpy(R)
            Dh[j, :, :h] = t.from_numpy(0.5 * D[o0:o1])
        rows = X[b0 : b0 + M].view(M, k, P)
        for s0 in range(0, k, q):
            s1 = min(k, s0 + q)
            A = (Dh[:, s0:s1, None, :] * Lt[:, None]).reshape(M, (s1 - s0) * n, H)
            T = (A @ Rb).reshape(M, s1 - s0, n, n)
            S = (T + ops.mT(T)).reshape(M * (s1 - s0), n * n)
            rows[:, s0:s1] = t.index_select(S, 1, flat).view(M, s1 - s0, P) * weight


def _run(A: list[Chain], B: list[Chain] | None, dims: Dims, ops: Ops, lay: _Layout, clock: Clock,
         progress: bool | None, long: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K^ (NA, NB), K^ diagonal of A, of B), summed over the feature chunks
    of ``lay``.  ``progress`` and ``long`` as in progress_bar."""
    c, chunks, form = lay.models, lay.chunks, lay.form
    sym = B is None
    Bs = A if sym else B
    n = dims.n
    F = max((o1 - o0) * form.features(g0, g1) for o0, o1, g0, g1 in chunks)
    pack = None
    if form.kind == "packed" and ops.is_torch:
        flat, weight = _packing(form.blocks, n)
        pack = (ops.put_index(flat), ops.put(weight))
    parts_a = partition(len(A), c)
    parts_b = parts_a if sym else partition(len(B), c)
    NB = len(Bs)
    single = len(parts_a) == 1 and len(parts_b) == 1
    cmax = max(b - a for a, b in parts_a + parts_b)
    bufA = ops.empty((len(A) if single else cmax) * F)
    bufB = None if (sym and single) else ops.empty((NB if single else cmax) * F)
    K = np.zeros((len(A), NB))
    nA = np.zeros(len(A))
    nB = np.zeros(NB)
    per_chunk = len(parts_a) * (len(parts_a) + 1) // 2 if sym else len(parts_a) * len(parts_b)
    bar = progress_bar(len(chunks) * per_chunk, "similarity matrix (materialize)", "block", progress, long)
    with contextlib.ExitStack() as stack:
        pool = None
        if form.workers > 1 and not ops.is_torch:
            pool = blas_worker_pool(stack, form.workers)
            # the buffers' first touch in one thread: the workers' page faults
            # on fresh memory contended (formation 208 -> 185 ms after a 16 ms
            # fill, 100 models at (256, 64, 10) here)
            clock.start()
            for buf in (bufA, bufB):
                if buf is not None:
                    buf.fill(0.0)
            clock.lap("allocate", 0)
        try:
            for chunk in chunks:
                for i, (a0, a1) in enumerate(parts_a):
                    XA = _form(ops, A[a0:a1], chunk, form, bufA, pack, clock, pool)
                    if not sym:
                        nA[a0:a1] += ops.row_sq(XA)
                    for j, (b0, b1) in enumerate(parts_b):
                        if sym and j < i:
                            continue
                        same = sym and i == j
                        XB = XA if same else _form(ops, Bs[b0:b1], chunk, form, bufB, pack, clock, pool)
                        if not sym and i == 0:
                            nB[b0:b1] += ops.row_sq(XB)
                        clock.start()
                        blk = ops.get(ops.wide_gram(XA, XB, pool, form.workers)).astype(float)
                        K[a0:a1, b0:b1] += blk
                        if sym and not same:
                            K[b0:b1, a0:a1] += blk.T
                        clock.lap("gram", _gram_flops(a1 - a0, b1 - b0, XA.shape[1]))
                        bar.update(1)
        finally:
            bar.close()
    if sym:
        nA = nB = np.diag(K).copy()
    return K, nA, nB
