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

import math
from functools import cached_property
from typing import Any

import numpy as np

from ..measure import Tokens
from ..problem import CostError, InnerProblem, Plan, format_count, positions_of
from ..progress import advancer
from ..threads import one_blas_thread
from .moments import AttentionMoments, AttentionSide, moment_head, moment_tail, positions_fit
from .registry import Algorithm, Triple

__all__ = ["TokenMoments"]

# Elements of one block of pair products k1_r k2_s (or q1_r q2_s) over tokens
# in the conditional tables (16 MiB): at vocabulary 4096, 8 heads of 32,
# 0.23 s per model, against 0.27 s at half and 0.24 s at twice.
_PAIR_ELEMENTS = 2**21
# Query x key tokens per block of the score matrices (a block of 16 heads is
# 8 MiB, in the shared cache): 256 x 256 ran fastest of the shapes measured
# at vocabulary 4096 (key blocks of 128 within noise; key blocks of 64 or
# 512, or query blocks of 128, 40-55 % slower): 0.71-0.9 s per offset for
# 16 heads of width 32.
_QUERY_BLOCK, _KEY_BLOCK = 256, 256


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


class _Side:
    """One model's tables over the vocabulary (x~(t) = Z[:, t], t a token)."""

    def __init__(self, side: AttentionSide) -> None:
        self.side, self.attn = side, side.attn
        self.H, self.n = side.attn.heads, side.attn.n_ctx
        self.w1, self.w2 = side.attn.q1.shape[1], side.attn.q2.shape[1]
        self.dv = side.attn.v.shape[1]
        self.d_out = side.attn.d_out + 1
        self.rotary = side.attn.rotary_base is not None
        c = side.mask  # (heads, n, n)
        i, j = np.nonzero(np.any(c != 0, axis=0))
        self.reads = [(int(a), int(b)) for a, b in zip(i, j) if a != b]  # (query, key) positions, j != i
        self.keys_read: dict[int, list[int]] = {}  # the key positions each query position reads
        for a, b in self.reads:
            self.keys_read.setdefault(a, []).append(b)
        self.c = c

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

    def key(self, offset: int) -> int:
        """The offset that the key side's arithmetic depends on (0 without rotary)."""
        return offset if self.rotary else 0

    def rotation(self, which: int, offset: int) -> np.ndarray:
        return self.side.couplings(which, [offset])[0, 0]  # R = Rot_(j - i), the identity without rotary


class _TokenEngine:
    """The second moments (or covariances) of the models' outputs at every
    position, for the pairs of sides asked; counts its flops and the
    elements it holds at its peak (``dry``: only counts).

    ``probs`` (positions, vocab): each position's token distribution.  The
    work that depends on a law (carried key sides, Grams over the query
    tokens) is done once per distinct law (``law[i]`` is position i's), so
    tokens of one law pay for one."""

    def __init__(self, sides: list[AttentionSide], pairs: dict[str, tuple[int, int]], probs: np.ndarray,
                 dry: bool) -> None:
        self.dry, self.pairs = dry, pairs
        first: dict[bytes, int] = {}  # a law's index by its bytes: np.unique(axis=0) sorted 64 x 4096 in 30 ms
        self.law = [first.setdefault(np.ascontiguousarray(row).tobytes(), len(first)) for row in probs]
        self.laws = probs[[self.law.index(k) for k in range(len(first))]]  # (laws, vocab)
        self.sides = [_Side(s) for s in sides]
        self.flops, self.held, self.peak = 0.0, 0, 0
        self.V = probs.shape[1]
        self.tick = None if dry else advancer()  # the running plan's bar, when one shows

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
        return sorted({(self.law[j], s.key(j - i)) for i, j in s.reads})

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
        carried_keys = self.carried_keys(s)
        laws = sorted({law for law, _ in carried_keys})
        T = self._tables(s)
        block = max(1, min(V, _PAIR_ELEMENTS // (H * w1 * w2)))
        self._count(2.0 * H * V * (w1 + w2 + dv)  # the keys at the query's position
                    + H * V * w1 * w2 * (3 + 2 * dv * (len(laws) + len(carried_keys)))  # pair products, K, carried keys
                    + 4.0 * H * w1 * w2 * dv * (w1 + w2) * len(carried_keys),  # K rotated per offset
                    transient=H * w1 * w2 * block + H * V * (w1 + w2 + dv * (1 + len(laws))),
                    held=(len(carried_keys) + 1) * H * dv * V)
        if self.dry:
            return None
        import torch  # batched over heads: 0.23 s per model against 0.29 s head by head in numpy (best of 5)

        local = ((T["q1"] * T["k1"]).sum(1) * (T["q2"] * T["k2"]).sum(1))[:, None, :] * T["v"]
        buffer = torch.empty(H * w1 * w2 * block, dtype=torch.float64)

        def pair(a: Any, b: Any, tb: slice) -> Any:
            """(heads, w1 w2, tokens): a_r b_s per token of the block, in the one buffer."""
            n = tb.stop - tb.start
            out = buffer[: H * w1 * w2 * n].view(H, w1, w2, n)
            torch.mul(a[:, :, None, tb], b[:, None, :, tb], out=out)
            return out.view(H, w1 * w2, n)

        if not carried_keys:  # every head reads only its own position
            return local, {}
        weighted_v = torch.cat([T["v"] * self.p(law) for law in laws], dim=1)  # (heads, laws x dv, vocab)
        # the mean key-value feature per key law, K[h, (law, e), (r, s)] (this way round: 26 ms against 45 ms per model)
        K = torch.zeros((H, len(laws) * dv, w1 * w2), dtype=torch.float64)
        for tb in _blocks(V, block):
            K.baddbmm_(weighted_v[:, :, tb], pair(T["k1"], T["k2"], tb).transpose(1, 2))
        K = K.view(H, len(laws), dv, w1, w2)
        rotated = torch.cat([torch.einsum("ra,sb,heab->hers", torch.from_numpy(s.rotation(1, k)),
                                          torch.from_numpy(s.rotation(2, k)), K[:, laws.index(law)]).reshape(H, dv, w1 * w2)
                             for law, k in carried_keys], dim=1)  # (heads, carried x dv, w1 w2)
        carried = torch.empty((H, len(carried_keys) * dv, V), dtype=torch.float64)
        for tb in _blocks(V, block):  # one product for every carried key side
            carried[:, :, tb] = torch.bmm(rotated, pair(T["q1"], T["q2"], tb))
        return local, {ck: carried[:, n * dv : (n + 1) * dv] for n, ck in enumerate(carried_keys)}

    def _given_query(self, s: _Side, parts: Any, i: int, U: Any) -> Any:
        """G_i (d_out + 1, vocab): E[output at i | the query token]; U the
        virtual head's part (the same at every position)."""
        keys = s.keys_read.get(i, [])
        self._count(2.0 * s.H * s.dv * self.V * (len(keys) + 1) + 2.0 * s.d_out * s.H * s.dv * self.V,
                    transient=3 * s.d_out * self.V + s.H * s.dv * self.V)  # G of both sides, p G, the heads' sum
        if self.dry:
            return None
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
        starts = np.cumsum([0] + [s.H for s in sides])
        queries = sorted({q for q, _ in laws})  # one Gram over the query tokens per query law
        # The Grams' heads, rows x columns: an inner product of two models
        # needs only the cross block (0.49 ms against 0.95 ms per block of
        # 256 x 256 tokens at 8 + 8 heads); a similarity, every head pair.
        cross = list(self.pairs.values()) == [(0, 1)]
        rows, cols = (slice(0, starts[1]), slice(starts[1], starts[2])) if cross else (slice(0, Hs), slice(0, Hs))
        nr, nc = rows.stop - rows.start, cols.stop - cols.start
        scores = 2.0 * V * V * sum(s.H * (s.w1 + s.w2) for s in sides) + 2.0 * V * V * nr * nc * len(queries)
        self._count(sum(4.0 * s.H * V * (s.w1 ** 2 + s.w2 ** 2) for s in sides),
                    transient=(2 + (len(queries) > 1)) * Hs * Bq * Bk + V * nr * nc * len(queries)
                    + max(s.H * max(s.w1, s.w2) for s in sides) * V
                    + 3 * max(s.H * s.dv for s in sides) * V  # a pair's carried keys as rows, p-weighted
                    + sum(s.H * s.dv for s in sides) * V  # the values by token, weighted by the key law
                    + sum(3 * sides[x].H * sides[x].dv * sides[y].H * sides[y].dv + sides[x].H * Bk * sides[y].H * sides[y].dv
                          for x, y in self.pairs.values()))
        for name, (x, y) in self.pairs.items():
            X, Y = sides[x], sides[y]
            self._count(4.0 * X.H * X.dv * Y.H * Y.dv * V * len(needed[name]))
        if self.dry:
            self._count(scores)
            return {}
        import torch  # the score blocks' batched products run at twice numpy's rate here

        k1, k2, q1, q2 = tables["k1"], tables["k2"], tables["q1"], tables["q2"]
        h = 0
        for s in sides:  # the queries carried into key space at this offset (R' q)
            for which, q in ((1, q1), (2, q2)):
                F = s.tables[f"q{which}"].transpose(1, 2)
                q[h : h + s.H, :, : F.shape[2]] = F @ torch.from_numpy(s.rotation(which, s.key(offset)))
            h += s.H
        if len(queries) == 1:  # p(query) folded in as sqrt(p) on both score matrices of a product
            q1.mul_(self.p(queries[0]).sqrt()[:, None])
        # per query law, the sum over query tokens of p scores scores', per key token
        W = {q: torch.zeros((V, nr, nc), dtype=torch.float64) for q in queries}
        # Both score blocks are written into buffers allocated once (a fresh
        # 8 MiB block per product: 0.74 s against 0.71 s per offset, best of 10).
        # Several query laws weight a copy of the block, one each.
        first, second, third = (torch.empty(Hs * Bk * Bq if k < 2 or len(queries) > 1 else 0, dtype=torch.float64)
                                for k in range(3))
        P = {q: self.p(q) for q in queries}
        for kb in _blocks(V, Bk):
            for qb in _blocks(V, Bq):
                shape = (Hs, kb.stop - kb.start, qb.stop - qb.start)
                S, T, R = (b[: math.prod(shape)].view(shape) if b.numel() else None for b in (first, second, third))
                torch.bmm(k1[:, kb], q1[:, qb].transpose(1, 2), out=S)
                S.mul_(torch.bmm(k2[:, kb], q2[:, qb].transpose(1, 2), out=T))  # (heads, key, query)
                for q in queries:
                    weighted = S if R is None else torch.mul(S, P[q][qb], out=R)
                    # per key token, (heads, query): strided, read as is by the product
                    W[q][kb].baddbmm_(weighted.permute(1, 0, 2)[:, rows], S.permute(1, 0, 2)[:, cols].transpose(1, 2))
            self._count(scores * (kb.stop - kb.start) / V)  # as the blocks run: the plan's bar moves with them
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
            product = ((cx * p) @ cy.T).reshape(X.H, X.dv, Y.H, Y.dv)
            out[name] = shared - product.permute(0, 2, 1, 3)

    # -------------------------------------------------------- results
    def run(self, centered: bool) -> dict[str, np.ndarray]:
        """{pair: M (n, d_out_x + 1, d_out_y + 1)}: the second moments of the
        outputs at every position, or ``centered`` their covariances (the
        shared-key terms D are covariances already)."""
        sides, V, dry = self.sides, self.V, self.dry
        n = sides[0].n
        if not dry:
            import torch
        parts = [self._conditional(s) for s in sides]
        U = [None if dry else torch.from_numpy(s.side.out_maps[1]) @ torch.from_numpy(s.side.T) for s in sides]  # virtual head
        for s in sides:
            self._count(2.0 * s.d_out * s.side.T.shape[0] * V, held=s.d_out * V)
        M = {name: None if dry else torch.zeros((n, sides[x].d_out, sides[y].d_out), dtype=torch.float64)
             for name, (x, y) in self.pairs.items()}
        for i in range(n):  # the conditional means given the query token
            G = [self._given_query(s, part, i, u) for s, part, u in zip(sides, parts, U)]
            for name, (x, y) in self.pairs.items():
                self._count(2.0 * sides[x].d_out * sides[y].d_out * V,
                            transient=(sides[x].d_out + sides[y].d_out) * V * (3 if centered else 2))
                if not dry:
                    p = self.p(self.law[i])
                    Gx, Gy = G[x], G[y]
                    if centered:  # the covariance over the query token as such: E[G G'] - E[G] E[G]' lost every digit to large biases
                        Gx, Gy = Gx - (Gx @ p)[:, None], Gy - (Gy @ p)[:, None]
                    M[name][i] = (Gx * p) @ Gy.T
        # (query position, key position) pairs that both models of a pair read
        read = {name: set(sides[x].reads) & set(sides[y].reads)
                for name, (x, y) in self.pairs.items()}
        offsets = sorted({j - i for pairs in read.values() for i, j in pairs})
        groups = sorted({tuple(s.key(o) for s in sides) for o in offsets})
        if groups:  # every head's score tables, stacked, and the values laid out by token
            self._count(0, held=sum(s.H for s in sides) * V * sum(max(s.width(f) for s in sides)
                                                                  for f in ("q1", "k1", "q2", "k2"))
                        + sum(s.H * s.dv for s in sides) * V)
        tables = None if dry or not groups else self._score_tables()
        for keys in groups:  # both models' keys at one position j != i, once per distinct arithmetic
            members = [o for o in offsets if tuple(s.key(o) for s in sides) == keys]
            needed = {name: {(self.law[i], self.law[i + o]) for o in members for i in range(n) if (i, i + o) in pairs}
                      for name, pairs in read.items()}  # (query law, key law) of the positions each pair reads
            D = self._shared_keys(members[0], needed, parts, tables)
            for name, (x, y) in self.pairs.items():
                X, Y = sides[x], sides[y]
                for i in range(n):
                    keys_read = [i + o for o in members if (i, i + o) in read[name]]
                    if not keys_read:
                        continue
                    self._count(2.0 * X.H * Y.H * X.dv * Y.dv * (2 * len({self.law[j] for j in keys_read}) + Y.d_out)
                                + 2.0 * X.d_out * Y.H * Y.dv * Y.d_out)
                    if dry:
                        continue
                    weights: dict[tuple[int, int], Any] = {}  # (hx, hy) per (query law, key law)
                    for j in keys_read:
                        law = (self.law[i], self.law[j])
                        weights[law] = weights.get(law, 0) + np.outer(X.c[:, i, j], Y.c[:, i, j])
                    N = sum(torch.from_numpy(c)[:, :, None, None] * D[law][name] for law, c in weights.items())
                    N = N.permute(0, 2, 1, 3).reshape(X.H * X.dv, Y.H * Y.dv)
                    M[name][i] += X.output_map @ N @ Y.output_map.T
        if dry:
            return {name: None for name in self.pairs}  # type: ignore[misc]
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
        return _TokenEngine(sides, pairs, problem.measure.token_probs(), dry), sides  # type: ignore[union-attr]

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
        with one_blas_thread():
            engine, sides = self._engine(plan.problem, dry=False)
            out = engine.run(plan.problem.centered)
        return AttentionMoments.finish(plan, {name: (sides[x].tail, sides[y].tail, out[name], None)
                                              for name, (x, y) in engine.pairs.items()})
