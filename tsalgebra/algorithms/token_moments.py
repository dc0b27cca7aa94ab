"""Exact inner products of one attention layer under the token measure.

The same models as :mod:`tsalgebra.algorithms.moments` (position-wise Linear
layers, an embedding from the vocabulary included, one BilinearAttention,
position-wise Linear layers after it), with independent tokens of one shared
distribution p.  Every form of the attention is a table over the vocabulary
(the embedded tokens through each head's maps).  Given the query token t at
position i, the keys at other positions are independent, so

    E[y_x,i y_y,i'] = E_t[G_x,i(t) G_y,i(t)'] + sum_(j != i) c_x c_y D_(j - i),

- G_i(t) = E[y_i | t]: the virtual head, the keys at i (a product of
  scalars and values of one token), and for each j != i the carried key
  side sum_tk p(tk) score(t, tk) v(tk), read through the mean key-value
  feature K[h, r, s, e] = sum_tk p(tk) k1_r(tk) k2_s(tk) v_e(tk) rotated to
  the offset j - i (one matrix product per head for every offset);
- D_o corrects the terms where both models read the same key position j
  (the keys are then one token, not two independent ones): the exact sum
  over (query token, key token) of p p scores_x scores_y v_x v_y minus the
  product of conditional means.  Its score matrices over pairs of tokens
  are the one cost quadratic in the vocabulary, taken in blocks, once per
  offset for every head of both models.

Nothing is enumerated.  Tested against the enumeration of every token
sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..measure import Tokens
from ..problem import CostError, InnerProblem, Plan, format_count, positions_of
from .moments import AttentionMoments, AttentionSide, moment_head, position_maps
from .registry import Algorithm, Triple

__all__ = ["TokenMoments"]

# Query x key tokens per block of the score matrices (a block of 16 heads is
# 8 MiB, in the shared cache): 256 x 256 ran fastest of the shapes measured
# at vocabulary 4096, 0.84 s per offset for 16 heads of width 32 (51 GF/s).
_QUERY_BLOCK, _KEY_BLOCK = 256, 256


class _Side:
    """One model's tables over the vocabulary (x~(t) = Z[:, t], t a token)."""

    def __init__(self, side: AttentionSide, p: np.ndarray) -> None:
        self.side, self.attn = side, side.attn
        self.H, self.n = side.attn.heads, side.attn.n_ctx
        self.w1, self.w2 = side.attn.q1.shape[1], side.attn.q2.shape[1]
        self.dv = side.attn.v.shape[1]
        self.d_out = side.attn.d_out + 1
        self.rotary = side.attn.rotary_base is not None
        c = side.mask  # (heads, n, n)
        i, j = np.nonzero(np.any(c != 0, axis=0))
        self.offsets = sorted({int(o) for o in (j - i) if o != 0})  # key offsets j - i read
        self.c = c

    def key(self, offset: int) -> int:
        """The offset that the key side's arithmetic depends on (0 without rotary)."""
        return offset if self.rotary else 0

    @property
    def keys(self) -> list[int]:
        return sorted({self.key(o) for o in self.offsets})

    def rotation(self, which: int, offset: int) -> np.ndarray:
        return self.side.couplings(which, [offset])[0, 0]  # R = Rot_(j - i), the identity without rotary


class _TokenEngine:
    """The second moments and means of the models' outputs at every
    position, for the pairs of sides asked; counts its flops and largest
    arrays (``dry``: only counts)."""

    def __init__(self, sides: list[AttentionSide], pairs: dict[str, tuple[int, int]], p: np.ndarray, dry: bool) -> None:
        self.p, self.dry, self.pairs = p, dry, pairs
        self.sides = [_Side(s, p) for s in sides]
        self.flops, self.largest = 0.0, 0
        self.V = len(p)

    def _count(self, flops: float, elements: int = 0) -> None:
        self.flops += float(flops)
        self.largest = max(self.largest, int(elements))

    # ------------------------------------------------------- per side
    def _tables(self, s: _Side) -> dict[str, np.ndarray]:
        F = s.side.forms  # (heads, width, vocab) per family, the virtual head's z (1, d + 1, vocab)
        self._count(2.0 * s.H * (2 * s.w1 + 2 * s.w2 + s.dv) * s.side.T.shape[0] * self.V,
                    s.H * (2 * s.w1 + 2 * s.w2 + s.dv) * self.V)
        return F

    def _conditional(self, s: _Side) -> tuple[np.ndarray, dict[int, np.ndarray]] | None:
        """(the keys at the query's position (heads, dv, vocab), the carried
        keys per key offset (heads, dv, vocab)): E[a head's value sum | query token]."""
        V, H, w1, w2, dv = self.V, s.H, s.w1, s.w2, s.dv
        keys = s.keys
        F = self._tables(s)
        self._count(2.0 * H * V * (w1 + w2 + dv)  # the keys at the query's position
                    + H * V * w1 * w2 * (3 + 2 * dv * len(keys))  # pair products, K, every offset's carried keys
                    + 4.0 * H * w1 * w2 * dv * (w1 + w2) * len(keys),  # K rotated per offset
                    V * w1 * w2 + len(keys) * H * dv * V)
        if self.dry:
            return None
        local = ((F["q1"] * F["k1"]).sum(axis=1) * (F["q2"] * F["k2"]).sum(axis=1))[:, None, :] * F["v"]
        carried = {k: np.empty((H, dv, V)) for k in keys}
        for h in range(H):
            pair_k = (F["k1"][h][:, None, :] * F["k2"][h][None, :, :]).reshape(w1 * w2, V)
            K = ((pair_k * self.p) @ F["v"][h].T).reshape(w1, w2, dv)  # the mean key-value feature
            rotated = [np.einsum("ra,sb,abe->rse", s.rotation(1, k), s.rotation(2, k), K, optimize=True)
                       .reshape(w1 * w2, dv) for k in keys]
            pair_q = (F["q1"][h][:, None, :] * F["q2"][h][None, :, :]).reshape(w1 * w2, V)
            out = np.concatenate(rotated, axis=1).T @ pair_q  # (keys x dv, vocab): one product for every offset
            for n_k, k in enumerate(keys):
                carried[k][h] = out[n_k * dv : (n_k + 1) * dv]
        return local, carried

    def _given_query(self, s: _Side, parts: Any, i: int) -> np.ndarray:
        """G_i (d_out + 1, vocab): E[output at i | the query token]."""
        O, Vmap = s.side.out_maps
        self._count(2.0 * s.H * s.dv * self.V * (len(s.offsets) + 1) + 2.0 * s.d_out * (s.H * s.dv + s.side.T.shape[0])
                    * self.V, s.d_out * self.V + s.H * s.dv * self.V)
        if self.dry:
            return None  # type: ignore[return-value]
        local, carried = parts
        acc = s.c[:, i, i][:, None, None] * local
        for o in s.offsets:
            if 0 <= i + o < s.n and np.any(s.c[:, i, i + o]):
                acc += s.c[:, i, i + o][:, None, None] * carried[s.key(o)]
        return Vmap @ s.side.T + O.transpose(1, 0, 2).reshape(s.d_out, -1) @ acc.reshape(-1, self.V)

    # -------------------------------------------------- shared keys
    def _shared_keys(self, offset: int, parts: list[Any]) -> dict[str, np.ndarray]:
        """D[pair] (hx, hy, dv_x, dv_y) at one offset: the exact sum over the
        shared key token minus the product of conditional means."""
        V, sides = self.V, self.sides
        Hs = sum(s.H for s in sides)
        Bq, Bk = min(_QUERY_BLOCK, V), min(_KEY_BLOCK, V)
        self._count(4.0 * V * V * sum(s.H * (s.w1 + s.w2) for s in sides) / 2 + 2.0 * V * V * Hs * Hs
                    + sum(4.0 * s.H * V * (s.w1 ** 2 + s.w2 ** 2) for s in sides),
                    4 * Hs * Bq * Bk + V * Hs * Hs)
        for x, y in self.pairs.values():
            X, Y = sides[x], sides[y]
            self._count(4.0 * X.H * X.dv * Y.H * Y.dv * V, X.H * X.dv * Y.H * Y.dv)
        if self.dry:
            return {}
        import torch  # the score blocks' batched products run at twice numpy's rate here

        tables = [s.side.forms for s in sides]
        # queries carried into key space at this offset (R' q), stacked over every head of every side
        def stack(family: str, which: int) -> Any:
            """(every head of every side, vocab, width) with the widths zero-padded to the widest."""
            width = max(F[family].shape[1] for F in tables)
            out = []
            for s, F in zip(sides, tables):
                T = F[family] if family[0] == "k" else np.matmul(s.rotation(which, s.key(offset)).T, F[family])  # R' q
                out.append(np.pad(T, ((0, 0), (0, width - T.shape[1]), (0, 0))).transpose(0, 2, 1))
            return torch.from_numpy(np.ascontiguousarray(np.concatenate(out)))

        q1, q2, k1, k2 = stack("q1", 1), stack("q2", 2), stack("k1", 1), stack("k2", 2)
        root = torch.from_numpy(np.sqrt(self.p))[None, :, None]
        q1 = q1 * root  # p(query) folded in as sqrt(p) on both score matrices of a product
        W = torch.zeros((V, Hs, Hs), dtype=torch.float64)  # sum over query tokens of p scores scores', per key token
        for k0 in range(0, V, Bk):
            kb = slice(k0, min(k0 + Bk, V))
            Wk = W[kb]
            for q0 in range(0, V, Bq):
                qb = slice(q0, min(q0 + Bq, V))
                S = torch.bmm(k1[:, kb], q1[:, qb].transpose(1, 2))
                S.mul_(torch.bmm(k2[:, kb], q2[:, qb].transpose(1, 2)))  # (heads, key, query)
                S = S.permute(1, 0, 2)  # per key token, (heads, query): strided, read as is by the product
                Wk.baddbmm_(S, S.transpose(1, 2))
        W = W.numpy() * self.p[:, None, None]
        starts = np.cumsum([0] + [s.H for s in sides])
        out = {}
        for name, (x, y) in self.pairs.items():
            X, Y = sides[x], sides[y]
            Wxy = W[:, starts[x] : starts[x + 1], starts[y] : starts[y + 1]]  # (key token, hx, hy)
            vy = np.ascontiguousarray(tables[y]["v"].transpose(2, 0, 1))  # (key token, hy, f)
            shared = np.empty((X.H, Y.H, X.dv, Y.dv))
            for h in range(X.H):
                shared[h] = (tables[x]["v"][h] @ (Wxy[:, h, :, None] * vy).reshape(V, -1)).reshape(
                    X.dv, Y.H, Y.dv).transpose(1, 0, 2)
            cx, cy = parts[x][1][X.key(offset)], parts[y][1][Y.key(offset)]  # (heads, dv, vocab)
            product = ((cx * self.p).reshape(-1, V) @ cy.reshape(-1, V).T).reshape(X.H, X.dv, Y.H, Y.dv)
            out[name] = shared - product.transpose(0, 2, 1, 3)
        return out

    # -------------------------------------------------------- results
    def run(self, centered: bool) -> dict[str, tuple[np.ndarray, list[np.ndarray] | None]]:
        """{pair: (M (n, d_out_x + 1, d_out_y + 1), [means of x, means of y] or None)}."""
        sides, V = self.sides, self.V
        n = sides[0].n
        parts = [self._conditional(s) for s in sides]
        M = {name: None if self.dry else np.zeros((n, sides[x].d_out, sides[y].d_out)) for name, (x, y) in self.pairs.items()}
        means = {name: None if self.dry else [np.zeros((n, sides[x].d_out)), np.zeros((n, sides[y].d_out))]
                 for name, (x, y) in self.pairs.items()} if centered else {}
        for i in range(n):  # the conditional means given the query token
            G = [self._given_query(s, part, i) for s, part in zip(sides, parts)]
            for name, (x, y) in self.pairs.items():
                self._count(2.0 * sides[x].d_out * sides[y].d_out * V)
                if not self.dry:
                    M[name][i] = (G[x] * self.p) @ G[y].T
                    if centered:
                        means[name][0][i], means[name][1][i] = G[x] @ self.p, G[y] @ self.p
        offsets = sorted(set().union(*[s.offsets for s in sides]))
        groups = sorted({tuple(s.key(o) for s in sides) for o in offsets})
        for keys in groups:  # both models' keys at one position j != i, once per distinct arithmetic
            members = [o for o in offsets if tuple(s.key(o) for s in sides) == keys]
            D = self._shared_keys(members[0], parts)
            for name, (x, y) in self.pairs.items():
                X, Y = sides[x], sides[y]
                (Ox, _), (Oy, _) = X.side.out_maps, Y.side.out_maps
                for i in range(n):
                    weights = [(X.c[:, i, i + o], Y.c[:, i, i + o]) for o in members if 0 <= i + o < n]
                    if not weights:
                        continue
                    self._count(2.0 * X.H * Y.H * X.dv * Y.dv * (len(weights) + Y.d_out) + 2.0 * X.d_out * Y.H * Y.dv * Y.d_out)
                    if self.dry:
                        continue
                    c = sum(np.outer(a, b) for a, b in weights)  # (hx, hy)
                    N = np.einsum("xy,xyef->xeyf", c, D[name]).reshape(X.H * X.dv, Y.H * Y.dv)
                    Ax = Ox.transpose(1, 0, 2).reshape(X.d_out, -1)
                    Ay = Oy.transpose(1, 0, 2).reshape(Y.d_out, -1)
                    M[name][i] += Ax @ N @ Ay.T
        return {name: (M[name], means.get(name)) for name in self.pairs}


class TokenMoments(Algorithm):
    """One attention layer under the token measure (every token one
    distribution): exact, polynomial in the vocabulary."""

    name = "token-moments"
    title = "attention moments under the token measure"
    inners = ("tokens",)
    measures = (Tokens,)

    def check(self, problem: InnerProblem) -> str | None:
        why = AttentionMoments.structure(problem)
        if why is None and not problem.measure.identical:  # type: ignore[union-attr]
            return "the tokens have different distributions (enumeration or the pairing groupings take that)"
        return why

    def _engine(self, problem: InnerProblem, dry: bool) -> tuple[_TokenEngine, list[AttentionSide]]:
        sides = []
        for attn, E, tail in (moment_head(problem.a), moment_head(problem.b)):  # type: ignore[misc]
            Z = E[:, 1:] + E[:, :1]  # the embedded tokens, padded: x~(t) = E [1; e_t]
            sides.append(AttentionSide(attn, Z, position_maps(tail, attn.n_ctx, attn.d_out), dry))
        if problem.a is problem.b:
            sides, pairs = sides[:1], {"ab": (0, 0)}
        else:
            pairs = {"ab": (0, 1), "aa": (0, 0), "bb": (1, 1)} if problem.joint else {"ab": (0, 1)}
        return _TokenEngine(sides, pairs, problem.measure.token_probs()[0], dry), sides  # type: ignore[union-attr]

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        engine, sides = self._engine(problem, dry=True)
        engine.run(problem.centered)
        if engine.flops > limit:
            raise CostError(f"the token attention moments would cost about {format_count(engine.flops)} flops",
                            flops=engine.flops)
        embeddings = sum(s.T.size for s in sides)
        return Plan(self.name, problem, engine.flops, 8.0 * (3 * engine.largest + embeddings),
                    len(engine.pairs) * positions_of(problem.a), joint=len(engine.pairs) == 3,
                    notes=("attention moments under the token measure (conditional on the query token; "
                           "nothing enumerated)",))

    def run(self, plan: Plan) -> Triple:
        engine, sides = self._engine(plan.problem, dry=False)
        out = engine.run(plan.problem.centered)
        return AttentionMoments.finish(plan, {name: (sides[x].tail, sides[y].tail) + out[name]
                                              for name, (x, y) in engine.pairs.items()})
