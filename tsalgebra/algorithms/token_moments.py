"""Exact inner products of one attention layer under the token measure.

The same models as :mod:`tsalgebra.algorithms.moments` (position-wise Linear
layers, an embedding from the vocabulary included, one BilinearAttention,
position-wise Linear layers after it), with independent tokens, position i
drawn from p_i (one distribution for all, or one per position).  Every form
of the attention is a table over the vocabulary (the embedded tokens through
each head's maps).  Given the query token t at position i, the keys at other
positions are independent, so

    E[y_x,i y_y,i'] = E_t~p_i[G_x,i(t) G_y,i(t)'] + sum_(j != i) c_x c_y D_ij,

- G_i(t) = E[y_i | t]: the virtual head, the keys at i (a product of
  scalars and values of one token), and for each j != i the carried key
  side sum_tk p_j(tk) score(t, tk) v(tk), read through the mean key-value
  feature K_j[h, r, s, e] = sum_tk p_j(tk) k1_r(tk) k2_s(tk) v_e(tk) rotated
  to the offset j - i (one matrix product per head for every offset and
  key distribution);
- D_ij corrects the terms where both models read the same key position j
  (the keys are then one token, not two independent ones): the exact sum
  over (query token, key token) of p_i p_j scores_x scores_y v_x v_y minus
  the product of conditional means.  It depends on the offset j - i (the
  scores' arithmetic) and on the two positions' distributions only.  Its
  score matrices over pairs of tokens are the one cost quadratic in the
  vocabulary, taken in blocks, once per offset for every head of both
  models (a Gram over the query tokens for each query distribution).

Nothing is enumerated.  Tested against the enumeration of every token
sequence.
"""

from __future__ import annotations

import contextlib
import math
import queue
from concurrent.futures import as_completed
from functools import cached_property
from typing import Any, Iterable

import numpy as np

from ..measure import Tokens
from ..problem import CostError, InnerProblem, Plan, format_count, positions_of
from ..progress import advancer
from ..threads import blas_threads, blas_worker_pool, one_blas_thread
from .moments import AttentionMoments, AttentionSide, moment_head, moment_tail, positions_fit
from .registry import Algorithm, Triple

__all__ = ["TokenMoments"]

# Elements of one block of pair products k1_r k2_s (or q1_r q2_s) over tokens
# in the conditional tables (16 MiB): at vocabulary 4096, 8 heads of 32,
# 0.23 s per model, against 0.27 s at half and 0.24 s at twice.
_PAIR_ELEMENTS = 2**21
# Query x key tokens per block of the score matrices, each block on one
# worker thread (a block of 16 heads is 4 MiB, a worker's two 8 MiB): at
# vocabulary 4096, 8 + 8 heads of width 32, 4 positions, the inner product took
# 2.9-3.1 s with key blocks of 128 or 64, 3.4-3.8 s with 256 (3.1-3.5 s with
# query blocks of 128 or 512; key blocks of 32: 3.8-3.9 s).
_QUERY_BLOCK, _KEY_BLOCK = 256, 128


def _sizes(name: str) -> str:
    """The key of a pair's term sizes beside its shared-key term D (centred self products)."""
    return f"|{name}|"


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _read_pairs(n: int, reading: bool, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, key positions) i != j that a mask reads, row by row
    (j < i when causal; none when it reads no other position)."""
    if not reading or n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if causal:
        return tuple(a.astype(np.int64) for a in np.tril_indices(n, -1))  # type: ignore[return-value]
    i, j = np.nonzero(~np.eye(n, dtype=bool))
    return i.astype(np.int64), j.astype(np.int64)


class _Laws:
    """The positions' token laws (``law[i]``, numbered from 0): the number of
    distinct laws over ranges of positions and of distinct (query law, key
    law) pairs over the pairs a mask reads, which the dry run counts by,
    in closed form or vectorised over positions and offsets (a loop over the
    (i, j) pairs took 6.8 s to plan 1,000 positions, and grew as n^2)."""

    # Elements of one block of (offset, position) codes counted at once (8 MiB)
    _ELEMENTS = 2**20

    def __init__(self, law: list[int]) -> None:
        g = np.asarray(law, dtype=np.int64)
        self.g, self.n = g, len(g)
        self.L = int(g.max()) + 1
        self.count = np.bincount(g, minlength=self.L)
        self.first = np.unique(g, return_index=True)[1]  # by law: its first position
        self.last = self.n - 1 - np.unique(g[::-1], return_index=True)[1]  # and its last
        is_first, is_last = np.zeros(self.n, dtype=np.int64), np.zeros(self.n, dtype=np.int64)
        is_first[self.first], is_last[self.last] = 1, 1
        # prefix[k]: the distinct laws of the positions [0, k); suffix[k]: of [k, n)
        self.prefix = np.concatenate([[0], np.cumsum(is_first)])
        self.suffix = np.concatenate([np.cumsum(is_last[::-1])[::-1], [0]])

    def read_pairs(self, causal: bool) -> int:
        """Distinct (law[i], law[j]) over every i != j (j < i when causal)."""
        if causal:  # (a, b) is read when b's first position precedes a's last
            return int(np.searchsorted(np.sort(self.first), self.last).sum())
        return self.L * (self.L - 1) + int(np.count_nonzero(self.count > 1))

    def key_laws(self, causal: bool) -> int:
        """The sum over query positions of the distinct laws of the keys they
        read: [0, i) when causal, every j != i otherwise."""
        if causal:
            return int(self.prefix[1 : self.n].sum())
        return self.n * self.L - int(np.count_nonzero(self.count[self.g] == 1))

    def diagonal_pairs(self, offsets: np.ndarray) -> np.ndarray:
        """Per offset o, distinct (law[i], law[i + o]) over the positions
        where both are positions; the same for -o transposed, so each |o|
        is counted once."""
        n, g, L = self.n, self.g, self.L
        offsets = np.asarray(offsets, dtype=np.int64)
        out = n - np.abs(offsets)
        if L == 1 or not offsets.size:
            return np.minimum(out, 1)
        o = np.unique(np.abs(offsets))  # query positions [0, n - o)
        counts = n - o
        # A query law of one position gives one pair of its own: only the
        # positions whose law others share can repeat a pair.
        shared = np.flatnonzero(self.count[g] > 1)
        if shared.size:
            counts -= np.searchsorted(shared, n - o)
            q = np.unique(g[shared], return_inverse=True)[1].ravel()  # the shared laws renumbered
            space = int(q.max() + 1) * L  # codes q * L + key law
            rows = max(1, self._ELEMENTS // max(shared.size, space))
            for a in range(0, len(o), rows):
                oc = o[a : a + rows, None]
                j = shared[None, :] + oc
                code = np.where(j < n, q[None, :] * L + g[np.minimum(j, n - 1)], -1)  # -1: past the end
                if space <= 8 * shared.size:  # few laws: mark a table of the codes (no sort)
                    seen = np.zeros((len(oc), space + 1), dtype=bool)
                    seen[np.arange(len(oc))[:, None], code] = True  # -1 marks the last column
                    counts[a : a + rows] += seen[:, :space].sum(axis=1)
                else:
                    code.sort(axis=1)
                    new = (code[:, 1:] >= 0) & (code[:, 1:] != code[:, :-1])  # a code unlike the one before it
                    counts[a : a + rows] += (code[:, 0] >= 0) + new.sum(axis=1)
        return counts[np.searchsorted(o, np.abs(offsets))]


class _Side:
    """One model's tables over the vocabulary (x~(t) = Z[:, t], t a token)."""

    def __init__(self, side: AttentionSide) -> None:
        self.side, self.attn = side, side.attn
        self.H, self.n = side.attn.heads, side.attn.n_ctx
        self.w1, self.w2 = side.attn.q1.shape[1], side.attn.q2.shape[1]
        self.dv = side.attn.v.shape[1]
        self.d_out = side.attn.d_out + 1
        self.rotary = side.attn.rotary_base is not None
        # The mask (score_mask) is the scale where i reads j (j <= i when
        # causal): which positions are read follows from these two, and the
        # plan never forms the (heads, n, n) mask.
        self.causal = side.attn.causal
        self.reading = self.n > 1 and self.H > 0 and float(side.attn.scale) != 0.0  # reads some j != i

    @cached_property
    def c(self) -> np.ndarray:
        """The mask (heads, n, n), for a run: checked to read what the plan counted."""
        c = self.side.mask
        reads = np.any(c != 0, axis=0)
        np.fill_diagonal(reads, False)
        expect = np.zeros_like(reads)
        expect[_read_pairs(self.n, self.reading, self.causal)] = True
        if not np.array_equal(reads, expect):
            raise RuntimeError("token-moments: the attention's mask reads other positions than its plan counted")
        return c

    def read_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(query, key) positions, j != i, row by row."""
        return _read_pairs(self.n, self.reading, self.causal)

    def keys_read(self, i: int) -> list[int]:
        """The key positions j != i that position i reads, in order."""
        if not self.reading:
            return []
        return list(range(i)) if self.causal else [j for j in range(self.n) if j != i]

    @cached_property
    def tables(self) -> dict[str, Any]:
        """Each family's forms over the vocabulary, (heads, width, vocab), torch."""
        import torch

        T = torch.from_numpy(self.side.T)
        return {k: (torch.from_numpy(m.astype(float)).reshape(-1, m.shape[2]) @ T).reshape(m.shape[:2] + (-1,))
                for k, m in self.maps.items()}

    @cached_property
    def maps(self) -> dict[str, np.ndarray]:
        return self.side.head_maps()

    def width(self, family: str) -> int:
        return self.maps[family].shape[1]

    @cached_property
    def output_map(self) -> Any:
        """O~ of the real heads as one matrix (d_out + 1, heads x dv), torch."""
        import torch

        O = self.side.out_maps[0]
        return torch.from_numpy(np.ascontiguousarray(O.transpose(1, 0, 2).reshape(self.d_out, -1)))

    @cached_property
    def output_squares(self) -> Any:
        """The output map's entries squared (the rounding's sizes add through it in quadrature)."""
        return self.output_map**2

    def key(self, offset: int) -> int:
        """The offset that the key side's arithmetic depends on (0 without rotary)."""
        return offset if self.rotary else 0

    def rotation(self, which: int, offset: int) -> np.ndarray:
        return self.side.couplings(which, [offset])[0, 0]  # R = Rot_(j - i), the identity without rotary


def _token_laws(measure: Tokens) -> tuple[list[int], np.ndarray]:
    """(each position's law, the distinct laws (laws, vocab)): the rows of
    ``measure.token_probs()``, without forming that (positions, vocab) table
    when one law serves every position (1.2 GB at 3,000 positions of a
    vocabulary of 50,000, to be found one law)."""
    n = measure.n_ctx or 1
    if measure.probs is None:  # the rows token_probs() would give
        return [0] * n, np.full((1, measure.vocab), 1 / measure.vocab)
    if measure.probs.ndim == 1:
        return [0] * n, measure.probs[None].astype(float)
    probs = measure.token_probs()
    first: dict[bytes, int] = {}  # a law's index by its bytes: np.unique(axis=0) sorted 64 x 4096 in 30 ms
    law = [first.setdefault(np.ascontiguousarray(row).tobytes(), len(first)) for row in probs]
    rows = np.unique(law, return_index=True)[1]  # each law's first position
    return law, probs[rows]


class _TokenEngine:
    """The second moments (or covariances) of the models' outputs at every
    position, for the pairs of sides asked; counts its flops and the
    elements it holds at its peak (``dry``: only counts).

    ``law`` (positions,): each position's token distribution, a row of
    ``laws`` (distributions, vocab).  The work that depends on a law (carried
    key sides, Grams over the query tokens) is done once per distinct law
    (``law[i]`` is position i's), so tokens of one law pay for one."""

    def __init__(self, sides: list[AttentionSide], pairs: dict[str, tuple[int, int]], law: list[int],
                 laws: np.ndarray, dry: bool) -> None:
        self.dry, self.pairs = dry, pairs
        self.law, self.laws = law, laws
        self.positions = _Laws(law)
        self.sides = [_Side(s) for s in sides]
        self.flops, self.held, self.peak = 0.0, 0, 0
        self.V = laws.shape[1]
        self.tick = None if dry else advancer()  # the running plan's bar, when one shows
        # The score blocks run on this many worker threads, each product on one
        # thread (the pool, None: in this thread), planned alike: the products
        # batched on torch's own threads met a barrier per product, about 3,000
        # per call, and another busy process on one of two cores stretched the
        # call 3.5-fold (11.3-11.9 s against 3.2-3.9 s alone).
        self.workers = max(1, blas_threads())
        self.pool: Any = None
        # centred self products: per position, the size of what float64 subtracted (see moment_result)
        self.terms: dict[str, Any] = {}

    def _count(self, flops: float, transient: int = 0, held: int = 0) -> None:
        """Flops, and elements: ``held`` kept to the end of the run (tables,
        conditional means), ``transient`` alive only during the step.  A run
        counts its steps as they start, moving the plan's bar."""
        self.flops += float(flops)
        if self.tick is not None:
            self.tick(flops)
        self.held += int(held)
        self.peak = max(self.peak, self.held + int(transient))

    def p(self, law: int) -> Any:
        """The law's token probabilities, (vocab,) torch."""
        import torch

        return torch.from_numpy(self.laws[law])

    def carried_keys(self, s: _Side) -> list[tuple[int, int]]:
        """(the key position's law, the key arithmetic) of every carried key side."""
        i, j = s.read_pairs()
        n = s.n
        codes = np.unique(self.positions.g[j] * (2 * n) + (j - i if s.rotary else 0) + n)  # key + n in [1, 2n)
        return [(int(c // (2 * n)), int(c % (2 * n) - n)) for c in codes]

    def carried_counts(self, s: _Side) -> tuple[int, int]:
        """(carried key sides, distinct key laws among them), in closed form:
        len(carried_keys(s)) and its laws."""
        P, n = self.positions, s.n
        if not s.reading:
            return 0, 0
        laws = int(P.prefix[n - 1]) if s.causal else P.L  # the keys [0, n - 1) when causal, else all
        if not s.rotary:
            return laws, laws
        # offset o < 0 reads the keys [0, n + o); o > 0 (not causal) the keys [o, n)
        return int(P.prefix[1:n].sum()) + (0 if s.causal else int(P.suffix[1:n].sum())), laws

    # ------------------------------------------------------- per side
    def _tables(self, s: _Side) -> dict[str, Any] | None:
        self._count(2.0 * s.H * (2 * s.w1 + 2 * s.w2 + s.dv) * s.side.T.shape[0] * self.V,
                    held=s.H * (2 * s.w1 + 2 * s.w2 + s.dv) * self.V)
        return None if self.dry else s.tables

    def _conditional(self, s: _Side) -> tuple[Any, dict[tuple[int, int], Any]] | None:
        """(the keys at the query's position (heads, dv, vocab), the carried
        keys per (key law, key arithmetic) (heads, dv, vocab)): E[a head's
        value sum | query token]."""
        V, H, w1, w2, dv = self.V, s.H, s.w1, s.w2, s.dv
        if self.dry:
            n_carried, n_laws = self.carried_counts(s)
        else:
            carried_keys = self.carried_keys(s)
            laws = sorted({law for law, _ in carried_keys})
            n_carried, n_laws = len(carried_keys), len(laws)
        T = self._tables(s)
        block = max(1, min(V, _PAIR_ELEMENTS // (H * w1 * w2)))
        self._count(2.0 * H * V * (w1 + w2 + dv)  # the keys at the query's position
                    + H * V * w1 * w2 * (3 + 2 * dv * (n_laws + n_carried))  # pair products, K, carried keys
                    + 4.0 * H * w1 * w2 * dv * (w1 + w2) * n_carried,  # K rotated per offset
                    transient=H * w1 * w2 * (block + dv * (2 * n_laws + n_carried))  # pairs, K and a block's, rotated
                    + H * V * (w1 + w2 + dv * (1 + n_laws)),
                    held=(n_carried + 1) * H * dv * V)
        if self.dry:
            return None
        import torch

        local = ((T["q1"] * T["k1"]).sum(1) * (T["q2"] * T["k2"]).sum(1))[:, None, :] * T["v"]
        if not carried_keys:  # every head reads only its own position
            return local, {}
        q1, q2, k1, k2, v = (T[f].numpy() for f in ("q1", "q2", "k1", "k2", "v"))
        rotations = [(laws.index(law), s.rotation(1, k), s.rotation(2, k)) for law, k in carried_keys]
        carried = np.empty((H, len(carried_keys) * dv, V))

        def heads(hs: slice) -> None:
            """The carried keys of some heads, on one thread: the mean key-value
            feature K[h, (law, e), (r, s)] per key law, rotated per offset, and
            read by the query tokens' pair products."""
            n = hs.stop - hs.start
            buffer = np.empty(n * w1 * w2 * block)

            def pair(a: np.ndarray, b: np.ndarray, tb: slice) -> np.ndarray:
                """(heads, w1 w2, tokens): a_r b_s per token of the block, in the one buffer."""
                out = buffer[: n * w1 * w2 * (tb.stop - tb.start)].reshape(n, w1, w2, -1)
                np.multiply(a[hs, :, None, tb], b[hs, None, :, tb], out=out)
                return out.reshape(n, w1 * w2, -1)

            weighted_v = np.concatenate([v[hs] * self.laws[law] for law in laws], axis=1)  # (heads, laws x dv, vocab)
            K, part = np.zeros((2, n, len(laws) * dv, w1 * w2))  # this way round: 26 ms against 45 ms per model
            for tb in _blocks(V, block):
                K += np.matmul(weighted_v[:, :, tb], pair(k1, k2, tb).transpose(0, 2, 1), out=part)
            K = K.reshape(n, len(laws), dv, w1, w2)
            rotated = np.concatenate([(R1 @ K[:, i] @ R2.T).reshape(n, dv, w1 * w2) for i, R1, R2 in rotations],
                                     axis=1)  # (heads, carried x dv, w1 w2)
            for tb in _blocks(V, block):  # one product for every carried key side
                np.matmul(rotated, pair(q1, q2, tb), out=carried[hs, :, tb])

        # The heads split among the workers, each product on one thread, in
        # numpy: 0.47-0.53 s for both models (tables included) against
        # 0.56-0.74 s batched over every head on torch's two threads.
        shares = _blocks(H, -(-H // self.workers))
        if self.pool is None or len(shares) == 1:
            for hs in shares:
                heads(hs)
        else:
            for f in [self.pool.submit(heads, hs) for hs in shares]:
                f.result()
        carried_t = torch.from_numpy(carried)
        return local, {ck: carried_t[:, n * dv : (n + 1) * dv] for n, ck in enumerate(carried_keys)}

    def _query_cost(self, s: _Side, keys: int) -> tuple[float, int]:
        """(flops, transient elements) of G_i at a position reading ``keys`` other positions."""
        return (2.0 * s.H * s.dv * self.V * (keys + 1) + 2.0 * s.d_out * s.H * s.dv * self.V,
                3 * s.d_out * self.V + s.H * s.dv * self.V)  # G of both sides, p G, the heads' sum

    def _given_query(self, s: _Side, parts: Any, i: int, U: Any) -> Any:
        """G_i (d_out + 1, vocab): E[output at i | the query token]; U the
        virtual head's part (the same at every position)."""
        keys = s.keys_read(i)
        self._count(*self._query_cost(s, len(keys)))
        import torch

        local, carried = parts
        weight = lambda j: torch.from_numpy(s.c[:, i, j])[:, None, None]  # noqa: E731
        acc = weight(i) * local
        for j in keys:
            acc += weight(j) * carried[(self.law[j], s.key(j - i))]
        return torch.addmm(U, s.output_map, acc.reshape(-1, self.V))

    # -------------------------------------------------- shared keys
    def _score_tables(self) -> dict[str, Any]:
        """Every head of every side stacked (torch, (heads, vocab, width), the
        widths zero-padded to the widest): the key tables, the query tables
        (rotated per offset into ``q1``, ``q2``), and the value tables."""
        import torch

        sides = self.sides
        Hs = sum(s.H for s in sides)
        out: dict[str, Any] = {}
        for family in ("k1", "k2", "q1", "q2"):
            width = max(s.width(family) for s in sides)
            out[family] = torch.zeros((Hs, self.V, width), dtype=torch.float64)
            h = 0
            for s in sides:
                F = s.tables[family].transpose(1, 2)  # (heads, vocab, width)
                if family[0] == "k":
                    out[family][h : h + s.H, :, : F.shape[2]] = F
                h += s.H
        out["values"] = [s.tables["v"] for s in sides]  # (heads, dv, vocab)
        out["values by token"] = [v.permute(2, 0, 1).contiguous() for v in out["values"]]  # (vocab, heads, dv)
        return out

    def _gram_heads(self) -> tuple[slice, slice]:
        """The Grams' heads, rows x columns: an inner product of two models
        needs only the cross block (0.49 ms against 0.95 ms per block of
        256 x 256 tokens at 8 + 8 heads); a similarity, every head pair."""
        starts = [0] + list(np.cumsum([s.H for s in self.sides]).tolist())
        if list(self.pairs.values()) == [(0, 1)]:
            return slice(0, starts[1]), slice(starts[1], starts[2])
        return slice(0, starts[-1]), slice(0, starts[-1])

    def _shared_cost(self, queries: int) -> tuple[float, int, float]:
        """(flops before the score blocks, transient elements, the score
        blocks' flops) of one offset's shared keys with ``queries`` query laws."""
        V, sides = self.V, self.sides
        Hs = sum(s.H for s in sides)
        Bq, Bk = min(_QUERY_BLOCK, V), min(_KEY_BLOCK, V)
        rows, cols = self._gram_heads()
        nr, nc = rows.stop - rows.start, cols.stop - cols.start
        scores, per_query = self._score_cost()
        scores += per_query * queries
        weigh = queries > 1 or any(x == y for x, y in self.pairs.values())  # a weighted copy of the block
        gram = max(sides[x].H * sides[y].H for x, y in self.pairs.values())
        return (sum(4.0 * s.H * V * (s.w1 ** 2 + s.w2 ** 2) for s in sides),
                ((2 + weigh) * Hs * Bq + gram) * Bk * self.workers + V * nr * nc * queries
                + max(s.H * max(s.w1, s.w2) for s in sides) * V
                + 3 * max(s.H * s.dv for s in sides) * V  # a pair's carried keys as rows, p-weighted
                + sum(s.H * s.dv for s in sides) * V  # the values by token, weighted by the key law
                + sum(3 * sides[x].H * sides[x].dv * sides[y].H * sides[y].dv + sides[x].H * Bk * sides[y].H * sides[y].dv
                      for x, y in self.pairs.values()),
                scores)

    def _score_cost(self) -> tuple[float, float]:
        """Flops of one offset's score blocks: (the score matrices, the Grams per query law)."""
        V, sides = self.V, self.sides
        return (2.0 * V * V * sum(s.H * (s.w1 + s.w2) for s in sides),
                2.0 * V * V * sum(sides[x].H * sides[y].H for x, y in self.pairs.values()))

    def _law_pair_cost(self, x: int, y: int) -> float:
        """Flops of D for one pair and one (query law, key law) at one offset."""
        X, Y = self.sides[x], self.sides[y]
        return 4.0 * X.H * X.dv * Y.H * Y.dv * self.V

    def _position_cost(self, x: int, y: int) -> tuple[float, float]:
        """Flops of the shared keys' term at one query position: (fixed, per
        distinct law of the keys it reads at the offsets of one group)."""
        X, Y = self.sides[x], self.sides[y]
        return (2.0 * X.H * Y.H * X.dv * Y.dv * Y.d_out + 2.0 * X.d_out * Y.H * Y.dv * Y.d_out,
                4.0 * X.H * Y.H * X.dv * Y.dv)

    def _shared_keys(self, offset: int, needed: dict[str, set[tuple[int, int]]], parts: list[Any],
                     tables: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
        """D[(query law, key law)][pair] (hx, hy, dv_x, dv_y) at one offset,
        for the (query law, key law) of the positions each pair reads there
        (``needed``): the exact sum over the shared key token minus the
        product of conditional means."""
        laws = sorted(set().union(*needed.values()))
        V, sides = self.V, self.sides
        Hs = sum(s.H for s in sides)
        Bq, Bk = min(_QUERY_BLOCK, V), min(_KEY_BLOCK, V)
        queries = sorted({q for q, _ in laws})  # one Gram over the query tokens per query law
        rows, cols = self._gram_heads()
        nr, nc = rows.stop - rows.start, cols.stop - cols.start
        flops, transient, scores = self._shared_cost(len(queries))
        self._count(flops, transient=transient)
        for name, (x, y) in self.pairs.items():
            self._count(self._law_pair_cost(x, y) * len(needed[name]))
        import torch

        k1, k2, q1, q2 = tables["k1"], tables["k2"], tables["q1"], tables["q2"]
        h = 0
        for s in sides:  # the queries carried into key space at this offset (R' q)
            for which, q in ((1, q1), (2, q2)):
                F = s.tables[f"q{which}"].transpose(1, 2)
                q[h : h + s.H, :, : F.shape[2]] = F @ torch.from_numpy(s.rotation(which, s.key(offset)))
            h += s.H
        # A model against itself would read one score block as both operands of
        # its Gram, which numpy takes for a symmetric update (syrk): 1.13 ms
        # for 16 x 16 heads against 0.59 ms for operands apart, and the copy
        # 0.12 ms.  So such Grams, and several query laws, read a weighted copy.
        weigh = len(queries) > 1 or any(x == y for x, y in self.pairs.values())
        if not weigh:  # p(query) folded in as sqrt(p) on both score matrices of a product
            q1.mul_(self.p(queries[0]).sqrt()[:, None])
        starts = np.cumsum([0] + [s.H for s in sides])
        grams = [(slice(starts[x], starts[x + 1]), slice(starts[y], starts[y + 1])) for x, y in self.pairs.values()]
        # per query law, the sum over query tokens of p scores scores', per key token
        W = {q: torch.zeros((V, nr, nc), dtype=torch.float64) for q in queries}
        # Both score blocks are written into buffers allocated once per worker
        # (a fresh 8 MiB block per product: 0.74 s against 0.71 s per offset,
        # best of 10).  A weighted copy (above) takes a third buffer.
        # The blocks' products run in numpy: its BLAS here (OpenBLAS) took a
        # block of 16 heads in 3.0 ms against torch's (MKL) 3.2-4.5 ms, the
        # Gram's 128 products of 8 x 256 x 8 at 34 GF/s against 12 GF/s, and
        # the inner product 3.2-3.8 s against 4.4-4.7 s (warm, alternating).
        sizes = [Hs * Bk * Bq if k < 2 or weigh else 0 for k in range(3)]
        sizes.append(Bk * max((hx.stop - hx.start) * (hy.stop - hy.start) for hx, hy in grams))
        spare: queue.SimpleQueue[tuple[np.ndarray, ...]] = queue.SimpleQueue()
        for _ in range(self.workers):
            spare.put(tuple(np.empty(n) for n in sizes))
        P = {q: self.p(q).numpy() for q in queries}
        k1, k2, q1, q2 = k1.numpy(), k2.numpy(), q1.numpy(), q2.numpy()
        Wn = {q: w.numpy() for q, w in W.items()}

        def key_block(kb: slice) -> int:
            """One block of key tokens against every query token, on one thread."""
            *buffers, gram = spare.get()
            nk = kb.stop - kb.start
            try:
                for qb in _blocks(V, Bq):
                    shape = (Hs, nk, qb.stop - qb.start)
                    S, T, R = (b[: math.prod(shape)].reshape(shape) if b.size else None for b in buffers)
                    np.matmul(k1[:, kb], q1[:, qb].transpose(0, 2, 1), out=S)
                    S *= np.matmul(k2[:, kb], q2[:, qb].transpose(0, 2, 1), out=T)  # (heads, key, query)
                    for q in queries:
                        # per key token, (heads, query): strided, read as is by the product
                        weighted = (S if R is None else np.multiply(S, P[q][qb], out=R)).transpose(1, 0, 2)
                        for hx, hy in grams:  # each pair's block of heads
                            cut = (nk, hx.stop - hx.start, hy.stop - hy.start)
                            block = np.matmul(weighted[:, hx], S.transpose(1, 2, 0)[:, :, hy],
                                              out=gram[: math.prod(cut)].reshape(cut))
                            Wn[q][kb, hx.start - rows.start : hx.stop - rows.start,
                                  hy.start - cols.start : hy.stop - cols.start] += block
            finally:
                spare.put((*buffers, gram))
            return nk

        if self.pool is None:
            done: Iterable[int] = map(key_block, _blocks(V, Bk))
        else:
            done = (f.result() for f in as_completed([self.pool.submit(key_block, kb) for kb in _blocks(V, Bk)]))
        for keys in done:
            self._count(scores * keys / V)  # as the blocks run: the plan's bar moves with them
        out: dict[tuple[int, int], dict[str, Any]] = {law: {} for law in laws}
        for k in sorted({k for _, k in laws}):
            pk = self.p(k)[:, None, None]
            by_token = [v * pk for v in tables["values by token"]]  # (key, heads, dv), p(key) folded in
            for q in (q for q, key in laws if key == k):
                self._pair_sums(offset, (q, k), W[q], by_token, parts, tables, rows, cols, needed, out[(q, k)])
        return out

    def _pair_sums(self, offset: int, law: tuple[int, int], W: Any, by_token: list[Any], parts: list[Any],
                   tables: dict[str, Any], rows: slice, cols: slice, needed: dict[str, set[tuple[int, int]]],
                   out: dict[str, Any]) -> None:
        """D of the pairs that read positions of this (query law, key law) at
        this offset, from the Grams W of the query law's scores and the values
        weighted by the key law (a pair that does not read them may lack the
        carried keys: its masks differ)."""
        import torch

        V, sides, Bk = self.V, self.sides, min(_KEY_BLOCK, self.V)
        starts = np.cumsum([0] + [s.H for s in sides])
        q, k = law
        p = self.p(q)
        for name, (x, y) in self.pairs.items():
            if law not in needed[name]:
                continue
            X, Y = sides[x], sides[y]
            Wxy = W[:, starts[x] - rows.start : starts[x + 1] - rows.start,
                    starts[y] - cols.start : starts[y + 1] - cols.start]  # (key token, hx, hy)
            vx, vy = tables["values"][x], by_token[y]  # (hx, e, key), (key, hy, f)
            # sum over key tokens of vx_e W vy_f, in key blocks batched over x's heads (the weighted
            # values of a block stay in cache: 0.039 s against 0.067 s per offset head by head)
            shared = torch.zeros((X.H, X.dv, Y.H * Y.dv), dtype=torch.float64)
            weighted = torch.empty(X.H * Bk * Y.H * Y.dv, dtype=torch.float64)
            for kb in _blocks(V, Bk):
                R = weighted[: X.H * (kb.stop - kb.start) * Y.H * Y.dv].view(X.H, -1, Y.H, Y.dv)
                torch.mul(Wxy[kb].permute(1, 0, 2)[..., None], vy[kb][None], out=R)  # (hx, key, hy, f)
                shared.baddbmm_(vx[:, :, kb], R.view(X.H, -1, Y.H * Y.dv))
            shared = shared.view(X.H, X.dv, Y.H, Y.dv).permute(0, 2, 1, 3)
            cx, cy = (parts[z][1][(k, sides[z].key(offset))].reshape(-1, V) for z in (x, y))  # (heads dv, vocab)
            product = ((cx * p) @ cy.T).reshape(X.H, X.dv, Y.H, Y.dv).permute(0, 2, 1, 3)
            out[name] = shared - product
            if name in self.terms:  # the sizes of the two terms, which a value bias makes far above D, squared
                out[_sizes(name)] = (shared.abs() + product.abs()) ** 2

    # -------------------------------------------------------- results
    def _moment_cost(self, x: int, y: int, centered: bool) -> tuple[float, int]:
        """(flops, transient elements) of one pair's E[G G'] at one position."""
        X, Y = self.sides[x], self.sides[y]
        return 2.0 * X.d_out * Y.d_out * self.V, (X.d_out + Y.d_out) * self.V * (3 if centered else 2)

    def _pattern(self, x: int, y: int) -> tuple[bool, bool]:
        """(whether any, causal): the pairs (i, j != i) that both sides read."""
        X, Y = self.sides[x], self.sides[y]
        return X.reading and Y.reading, X.causal or Y.causal

    def _group_pairs(self, pattern: tuple[bool, bool], members: list[int],
                     rotary: bool) -> tuple[np.ndarray, np.ndarray]:
        """(query, key) positions a pair reads at the offsets of one group,
        row by row: one offset with rotary, else all of them."""
        reading, causal = pattern
        n = self.sides[0].n
        if not rotary:
            return _read_pairs(n, reading, causal)
        (o,) = members
        if not reading or (causal and o > 0):
            return _read_pairs(0, False, False)
        i = np.arange(max(0, -o), min(n, n - o), dtype=np.int64)
        return i, i + o

    def _count_positions(self, centered: bool) -> None:
        """The dry count of the loop over query positions, in closed form."""
        n, flops, transient = self.sides[0].n, 0.0, 0
        for s in self.sides:
            f, t = self._query_cost(s, 0)
            reads = (n * (n - 1) // (2 if s.causal else 1)) if s.reading else 0  # sum of the keys read
            flops += n * f + 2.0 * s.H * s.dv * self.V * reads
            transient = max(transient, t)
        for x, y in self.pairs.values():
            f, t = self._moment_cost(x, y, centered)
            flops += n * f
            transient = max(transient, t)
        self._count(flops, transient=transient)

    def _count_groups(self, read: dict[str, tuple[bool, bool]], rotary: bool) -> None:
        """The dry count of the shared keys over the offsets' groups, in
        closed form: what the loops over groups, pairs and positions count."""
        P, n = self.positions, self.sides[0].n
        names = [(x, y, read[name][1]) for name, (x, y) in self.pairs.items() if read[name][0]]
        if not names:
            return
        not_causal = not all(causal for _, _, causal in names)
        if rotary:  # one group per offset o: queries [-o, n) below 0, [0, n - o) above
            groups = (n - 1) * (1 + not_causal)
            queries = int(P.suffix[1:n].sum()) + (int(P.prefix[1:n].sum()) if not_causal else 0)
            most = max(int(P.suffix[1]), int(P.prefix[n - 1]) if not_causal else 0)
            diagonal = int(P.diagonal_pairs(np.arange(1, n)).sum())  # offsets -o and o read alike
        else:  # one group: every offset
            groups = 1
            queries = most = P.L if not_causal else int(P.suffix[1])
        fixed, transient, _ = self._shared_cost(most)
        scores, per_query = self._score_cost()
        flops = groups * (fixed + scores) + per_query * queries
        for x, y, causal in names:
            base, per_law = self._position_cost(x, y)
            if rotary:  # each position reads one key per offset
                sides = 1 + (not causal)
                flops += self._law_pair_cost(x, y) * diagonal * sides + (base + per_law) * (n * (n - 1) // 2) * sides
            else:
                positions = n - 1 if causal else n
                flops += (self._law_pair_cost(x, y) * P.read_pairs(causal) + base * positions
                          + per_law * P.key_laws(causal))
        self._count(flops, transient=transient)

    def run(self, centered: bool) -> dict[str, np.ndarray]:
        """{pair: M (n, d_out_x + 1, d_out_y + 1)}: the second moments of the
        outputs at every position, or ``centered`` their covariances (the
        shared-key terms D are covariances already).  Dry, the loops over
        positions and offsets are counted in closed form."""
        sides, V, dry = self.sides, self.V, self.dry
        n = sides[0].n
        if not dry:
            import torch
        # each side's mask (heads, n, n), formed at its first use and held to the end (0.6 GB for 8 heads at
        # n = 2,896, where nothing else is that large), and its reads checked on (n, n) booleans
        self._count(0, held=sum(s.H * n * n for s in sides), transient=n * n)
        parts = [self._conditional(s) for s in sides]
        U = [None if dry else torch.from_numpy(s.side.out_maps[1]) @ torch.from_numpy(s.side.T) for s in sides]  # virtual head
        for s in sides:
            self._count(2.0 * s.d_out * s.side.T.shape[0] * V, held=s.d_out * V)
        M = {name: None if dry else torch.zeros((n, sides[x].d_out, sides[y].d_out), dtype=torch.float64)
             for name, (x, y) in self.pairs.items()}
        if centered and not dry:
            self.terms = {name: torch.zeros_like(M[name]) for name, (x, y) in self.pairs.items() if x == y}
        if dry:
            self._count_positions(centered)
        for i in range(0 if dry else n):  # the conditional means given the query token
            G = [self._given_query(s, part, i, u) for s, part, u in zip(sides, parts, U)]
            for name, (x, y) in self.pairs.items():
                self._count(*self._moment_cost(x, y, centered))
                p = self.p(self.law[i])
                Gx, Gy = G[x], G[y]
                if centered:  # the covariance over the query token as such: E[G G'] - E[G] E[G]' lost every digit to large biases
                    mx, my = Gx @ p, Gy @ p
                    Gx, Gy = Gx - mx[:, None], Gy - my[:, None]
                M[name][i] = (Gx * p) @ Gy.T
                if name in self.terms:
                    # G - E[G] rounds at |E[G]|, read against the other side's spread: about 2 (|m| sd' + sd |m'|),
                    # and sd sd' for the product's own rounding (moment_result takes 2^-50 of it)
                    sd, am = torch.diagonal(M[name][i]).clamp(min=0).sqrt(), mx.abs()
                    self.terms[name][i] = 3 * torch.outer(sd, sd) + 2 * (torch.outer(am, sd) + torch.outer(sd, am))
        # (query position, key position) pairs that both models of a pair read: (any, causal)
        read = {name: self._pattern(x, y) for name, (x, y) in self.pairs.items()}
        offsets = list(range(-(n - 1), 0)) if any(r for r, _ in read.values()) else []
        offsets += list(range(1, n)) if any(r and not c for r, c in read.values()) else []
        rotary = any(s.rotary for s in sides)  # the keys' arithmetic differs per offset
        groups = [[o] for o in offsets] if rotary else [offsets] if offsets else []
        if groups:  # every head's score tables, stacked, and the values laid out by token
            self._count(0, held=sum(s.H for s in sides) * V * sum(max(s.width(f) for s in sides)
                                                                  for f in ("q1", "k1", "q2", "k2"))
                        + sum(s.H * s.dv for s in sides) * V)
        if dry:
            self._count_groups(read, rotary)
            return {name: None for name in self.pairs}  # type: ignore[misc]
        tables = None if not groups else self._score_tables()
        g, L = self.positions.g, self.positions.L
        # per judged pair and query position, the squared sizes of D's terms over every group (see below)
        pending = {name: torch.zeros((n, sides[x].H * sides[x].dv, sides[y].H * sides[y].dv), dtype=torch.float64)
                   for name, (x, y) in self.pairs.items() if name in self.terms}
        for members in groups:  # both models' keys at one position j != i, once per distinct arithmetic
            pairs = {name: self._group_pairs(pattern, members, rotary) for name, pattern in read.items()}
            needed = {name: {(int(c // L), int(c % L)) for c in np.unique(g[i] * L + g[j])}
                      for name, (i, j) in pairs.items()}  # (query law, key law) of the positions each pair reads
            D = self._shared_keys(members[0], needed, parts, tables)
            for name, (x, y) in self.pairs.items():
                X, Y = sides[x], sides[y]
                base, per_law = self._position_cost(x, y)
                i_all, j_all = pairs[name]
                rows = np.flatnonzero(np.diff(i_all)) + 1  # the pairs' rows: one query position each
                for i, keys in zip(i_all[np.r_[0, rows]] if i_all.size else [], np.split(j_all, rows)):
                    key_laws = g[keys]
                    laws = np.unique(key_laws)
                    self._count(base + per_law * len(laws))
                    # the masks' products (hx, hy) summed over the keys of each (query law, key law)
                    cx, cy = X.c[:, i, keys], Y.c[:, i, keys]
                    judged = name in self.terms
                    cx2, cy2 = (cx**2, cy**2) if judged else (None, None)
                    N, sizes = 0, 0
                    for k in laws.tolist():
                        on, Dk = key_laws == k, D[(int(g[i]), k)]
                        N = N + torch.from_numpy(cx[:, on] @ cy[:, on].T)[:, :, None, None] * Dk[name]
                        if judged:  # squared: see below
                            sizes = sizes + torch.from_numpy(cx2[:, on] @ cy2[:, on].T)[:, :, None, None] * Dk[
                                _sizes(name)]
                    N = N.permute(0, 2, 1, 3).reshape(X.H * X.dv, Y.H * Y.dv)
                    M[name][i] += X.output_map @ N @ Y.output_map.T
                    if judged:
                        pending[name][i] += sizes.permute(0, 2, 1, 3).reshape(X.H * X.dv, Y.H * Y.dv)
        for name, sizes in pending.items():
            # D's entries round independently, so their errors add through the maps in quadrature (through
            # |maps|, a 512-wide model's estimate was 1e5 times the error measured), over the groups too
            X, Y = (sides[z] for z in self.pairs[name])
            self.terms[name] += (X.output_squares @ sizes @ Y.output_squares.T).sqrt()
        return {name: M[name].numpy() for name in self.pairs}


class TokenMoments(Algorithm):
    """One attention layer under the token measure (one distribution for
    every position, or one per position): exact, polynomial in the
    vocabulary."""

    name = "token-moments"
    joint = True
    title = "attention moments under the token measure"
    inners = ("tokens",)
    measures = (Tokens,)

    def check(self, problem: InnerProblem) -> str | None:
        return AttentionMoments.structure(problem)

    def _engine(self, problem: InnerProblem, dry: bool) -> tuple[_TokenEngine, list[AttentionSide]]:
        sides = []
        for model in (problem.a, problem.b):
            attn, E, _ = moment_head(model)  # type: ignore[misc]
            Z = E[:, 1:] + E[:, :1]  # the embedded tokens, padded: x~(t) = E [1; e_t]
            sides.append(AttentionSide(attn, Z, moment_tail(model), dry, problem.centered))  # type: ignore[arg-type]
        if problem.a is problem.b:
            sides, pairs = sides[:1], {"ab": (0, 0)}
        else:
            pairs = {"ab": (0, 1), "aa": (0, 0), "bb": (1, 1)} if problem.joint else {"ab": (0, 1)}
        return _TokenEngine(sides, pairs, *_token_laws(problem.measure), dry), sides  # type: ignore[arg-type]

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        positions_fit(problem, 2)
        engine, sides = self._engine(problem, dry=True)
        engine.run(problem.centered)
        if engine.flops > limit:
            raise CostError(f"the token attention moments would cost about {format_count(engine.flops)} flops",
                            flops=engine.flops)
        # the embedded tokens, the tails, and the maps before the attention (kept with the models)
        inputs = sum(s.T.size + s.tail.size for s in sides)
        inputs += sum({id(m): moment_head(m)[1].size for m in (problem.a, problem.b)}.values())  # type: ignore[index]
        return Plan(self.name, problem, engine.flops, 8.0 * (engine.peak + inputs),
                    len(engine.pairs) * positions_of(problem.a), joint=len(engine.pairs) == 3,
                    notes=("attention moments under the token measure (conditional on the query token; "
                           "nothing enumerated)",))

    def run(self, plan: Plan) -> Triple:
        # The engine's products run in torch; numpy's BLAS is held at one thread
        # meanwhile, since its helper threads, spinning after a product, took
        # the cores from torch's (measured: the mean key-value feature 0.09 s
        # against 0.045 s per model right after a numpy product).
        with contextlib.ExitStack() as stack:
            stack.enter_context(one_blas_thread())
            engine, sides = self._engine(plan.problem, dry=False)
            if engine.workers > 1:
                engine.pool = blas_worker_pool(stack, engine.workers)
            out = engine.run(plan.problem.centered)
        return AttentionMoments.finish(plan, {name: (sides[x].tail, sides[y].tail, out[name],
                                                     engine.terms[name].numpy() if name in engine.terms else None)
                                              for name, (x, y) in engine.pairs.items()}, covariance_given=True)
