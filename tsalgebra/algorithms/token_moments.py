"""Exact inner products of one attention layer under the token measure.

The same models as :mod:`tsalgebra.algorithms.moments` (position-wise Linear
layers, an embedding from the vocabulary included, one BilinearAttention,
position-wise Linear layers after it), with independent tokens of one shared
distribution p.  Every form of the attention is read off a table over the
vocabulary (the embedded tokens through each head's maps), and all legs at
one position carry that position's token index (the measure's moments are
diagonal).  For a tuple of query and key positions (i, j, j') the expectation
is a contraction over at most three token indices, taken per pattern of
equal positions (the same grouping as the Gaussian algorithm):

- keys at the query's position: per token, products of scalars and values;
- keys at another position: the query side enters through its two vectors
  carried into key space (q1 R1, q2 R2), the key side through
  K[h, r, s, e] = sum_t p(t) k1_r(t) k2_s(t) v_e(t) (the mean key-value
  feature, one per model);
- both models' keys at one other position: the score matrices of the two
  models over (query token, key token), a head's width per entry, contracted
  over the query token in blocks (the one cost quadratic in the vocabulary).

Cost polynomial in the vocabulary; nothing enumerated.  Tested against the
enumeration of every token sequence and the token groupings of the pairing
mechanism.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..form_moments import Factor
from ..measure import Tokens
from ..problem import CostError, InnerProblem, Plan, format_count, positions_of
from .moments import AttentionMoments, AttentionSide, OutputMoments, form_shapes, moment_head, position_maps
from .registry import Algorithm, Triple

__all__ = ["TokenMoments"]

# Query tokens per block of the score matrices (memory: a block holds
# batch x heads x block x vocabulary numbers per model).
_BLOCK_ELEMENTS = 2**23


class _TokenMoments(OutputMoments):
    """Output moments under independent tokens of distribution ``p``: a
    run's factors on each side reduce to a table over the query token (or,
    both sides' keys at one other position, a sum over query and key
    tokens).  ``cache`` holds what the pairs of one similarity share (the
    sides' mean key-value features)."""

    def __init__(self, x: AttentionSide, y: AttentionSide, p: np.ndarray, dry: bool, cache: dict[Any, Any]) -> None:
        self.x, self.y, self.p, self.dry, self.cache = x, y, p, dry, cache
        self.flops, self.largest = 0, 0
        self.pool = None

    def _input_moment(self) -> np.ndarray:
        return (self.x.T * self.p) @ self.y.T.T  # sum_t p(t) x~(t) y~(t)'

    def _input_mean(self, side: AttentionSide) -> np.ndarray:
        return side.T @ self.p

    def _zeros(self, *shape: int) -> np.ndarray:
        """Planning: a zero-strided stand-in of the shape a step returns."""
        return np.broadcast_to(0.0, shape)

    def _run(self, factors: list[Factor]) -> np.ndarray:
        parts = {s: _part([f for f in factors if f.side == s]) for s in (0, 1) if any(f.side == s for f in factors)}
        P = max((f.bond.shape[0] for f in factors if f.bond is not None), default=1)
        if len(parts) == 1:  # one side alone: its mean
            (s, part), = parts.items()
            G = self._table(s, part, P)
            self._count(2 * G.size)
            value = self._zeros(*G.shape[:3]) if self.dry else G @ self.p
            return _layout(np.broadcast_to(value, (P,) + value.shape[1:]), s)
        if parts[0][0] == parts[1][0] == "cross" and parts[0][1] == parts[1][1]:  # keys at one shared position
            return self._shared_keys(parts[0], parts[1], P)
        gx, gy = self._table(0, parts[0], P), self._table(1, parts[1], P)
        hx, ex, hy, ey = gx.shape[1], gx.shape[2], gy.shape[1], gy.shape[2]
        self._count(2 * P * hx * ex * hy * ey * len(self.p))
        if self.dry:
            return self._zeros(P, hx, hy, ex, ey, 1, 1)
        gx = np.broadcast_to(gx * self.p, (P,) + gx.shape[1:]).reshape(P, hx * ex, -1)
        gy = np.broadcast_to(gy, (P,) + gy.shape[1:]).reshape(P, hy * ey, -1)
        S = np.matmul(gx, gy.transpose(0, 2, 1)).reshape(P, hx, ex, hy, ey).transpose(0, 1, 3, 2, 4)
        return S[..., None, None]

    def _count(self, flops: float) -> None:
        self.flops += int(flops)

    def _table(self, s: int, part: tuple[Any, ...], P: int) -> np.ndarray:
        """G[P or 1, heads, output, query token]: one side's factors given the query token."""
        if part[0] == "virtual":
            return self.side(s).forms["z"][None]  # (1, 1, d + 1, vocab)
        return self._local(s, part, P) if part[0] == "local" else self._carried(s, part, P)

    def _local(self, s: int, part: tuple[Any, ...], P: int) -> np.ndarray:
        """Keys at the query's position: (q1' R1 k1)(q2' R2 k2) v of one token."""
        _, A1, A2 = part
        F = self.side(s).forms  # (heads, width, vocab) per family
        H, V, dv = F["v"].shape[0], len(self.p), F["v"].shape[1]
        w1, w2 = F["q1"].shape[1], F["q2"].shape[1]
        Pb = max(A1.bond.shape[0], A2.bond.shape[0])
        self._count(2 * Pb * H * V * (w1 * w1 + w2 * w2 + w1 + w2) + Pb * H * V * dv)
        if self.dry:
            return self._zeros(Pb, H, dv, V)
        a1 = np.einsum("hrt,phrt->pht", F["q1"], _carry(A1.bond[:, 0], F["k1"]))
        a2 = np.einsum("hrt,phrt->pht", F["q2"], _carry(A2.bond[:, 0], F["k2"]))
        return (a1 * a2)[:, :, None, :] * F["v"][None]

    def _key_mean(self, s: int) -> np.ndarray:
        """K[h, r, s, e] = sum_t p(t) k1_r(t) k2_s(t) v_e(t): the mean key-value feature."""
        F = self.side(s).forms
        H, w1, w2, dv = F["k1"].shape[0], F["k1"].shape[1], F["k2"].shape[1], F["v"].shape[1]
        key = (id(self.side(s)), "keys")
        if key not in self.cache:
            self._count(2 * H * w1 * w2 * dv * len(self.p) + H * w1 * dv * len(self.p))
            if self.dry:
                self.cache[key] = self._zeros(H, w1, w2, dv)
            else:  # per head: (pairs r s, tokens) @ (tokens, e), never (heads, r, s, tokens) at once
                k1 = F["k1"] * self.p
                self.cache[key] = np.stack([((k1[h][:, None] * F["k2"][h][None]).reshape(w1 * w2, -1) @ F["v"][h].T)
                                            .reshape(w1, w2, dv) for h in range(H)])
        return self.cache[key]

    def _carried(self, s: int, part: tuple[Any, ...], P: int) -> np.ndarray:
        """Keys at another position: sum_tk p(tk) scores(t, tk) v(tk) for
        each query token t, read through the mean key-value feature."""
        _, _, A1, A2 = part
        F = self.side(s).forms
        H, V, dv = F["v"].shape[0], len(self.p), F["v"].shape[1]
        w1, w2 = F["q1"].shape[1], F["q2"].shape[1]
        Pb = max(A1.bond.shape[0], A2.bond.shape[0])
        K = self._key_mean(s)
        self._count(2 * Pb * H * V * (w1 * w1 + w2 * w2 + w1 * w2 * dv + w1 * dv))
        self.largest = max(self.largest, V * w1 * dv)
        if self.dry:
            return self._zeros(Pb, H, dv, V)
        q1 = np.broadcast_to(_carry(A1.bond[:, 0].transpose(0, 2, 1), F["q1"]), (Pb, H, w1, V))  # R1' q1
        q2 = np.broadcast_to(_carry(A2.bond[:, 0].transpose(0, 2, 1), F["q2"]), (Pb, H, w2, V))
        out = np.empty((Pb, H, dv, V))
        for b in range(Pb):
            for h in range(H):
                X = (q2[b, h].T @ K[h].transpose(1, 0, 2).reshape(w2, w1 * dv)).reshape(V, w1, dv)
                out[b, h] = np.matmul(q1[b, h].T[:, None, :], X)[:, 0].T
        return out

    def _shared_keys(self, px: tuple[Any, ...], py: tuple[Any, ...], P: int) -> np.ndarray:
        """Both models' keys at one other position: the sum over (query
        token, key token) of p p scores_x scores_y v_x v_y, taken over blocks
        of query tokens (the one cost quadratic in the vocabulary)."""
        V = len(self.p)
        (Fx, Fy) = (self.side(0).forms, self.side(1).forms)
        Hx, Hy = Fx["v"].shape[0], Fy["v"].shape[0]
        wx = Fx["q1"].shape[1] + Fx["q2"].shape[1]
        wy = Fy["q1"].shape[1] + Fy["q2"].shape[1]
        ex, ey = Fx["v"].shape[1], Fy["v"].shape[1]
        B = _block(max(Hx, Hy), V)
        self._count(2 * P * V * V * (Hx * wx + Hy * wy + Hx * Hy) + 2 * P * Hx * Hy * ex * ey * V
                    + 2 * P * V * (Hx * wx + Hy * wy) * max(wx, wy))
        self.largest = max(self.largest, 3 * max(Hx, Hy) * B * V)
        if self.dry:
            return self._zeros(P, Hx, Hy, ex, ey, 1, 1)
        out = np.empty((P, Hx, Hy, ex, ey))
        for b in range(P):
            queries = []
            for F, (_, _, A1, A2) in ((Fx, px), (Fy, py)):
                R1, R2 = (A.bond[min(b, A.bond.shape[0] - 1), 0] for A in (A1, A2))
                queries.append((np.einsum("hrt,rs->hts", F["q1"], R1), np.einsum("hrt,rs->hts", F["q2"], R2)))
            W = np.zeros((V, Hx, Hy))  # sum over query tokens of p scores_x scores_y, per key token
            for t0 in range(0, V, B):
                q = slice(t0, min(t0 + B, V))
                Sx = np.matmul(queries[0][0][:, q], Fx["k1"]) * np.matmul(queries[0][1][:, q], Fx["k2"])
                Sy = np.matmul(queries[1][0][:, q], Fy["k1"]) * np.matmul(queries[1][1][:, q], Fy["k2"])
                Sx *= self.p[q][None, :, None]  # (hx, block, key token)
                W += np.matmul(Sx.transpose(2, 0, 1), Sy.transpose(2, 1, 0))  # (key token, hx, hy)
            W *= self.p[:, None, None]
            out[b] = np.einsum("thg,het,gft->hgef", W, Fx["v"], Fy["v"], optimize=True)
        return out[..., None, None]


def _carry(R: np.ndarray, F: np.ndarray) -> np.ndarray:
    """R_p F_h: (P, w, w) couplings applied to a family's table (H, w, vocab) -> (P, H, w, vocab)."""
    return np.einsum("prs,hst->phrt", R, F, optimize=True)


def _part(fs: list[Factor]) -> tuple[Any, ...]:
    """("virtual",), ("local", A1, A2) for keys at the query's position, or
    ("cross", slot, A1, A2) for keys at another one."""
    if len(fs) == 1:
        return ("virtual",)
    A1, A2, _ = fs
    slot = A1.legs[1].slot
    return ("local", A1, A2) if slot == 0 else ("cross", slot, A1, A2)


def _block(H: int, V: int) -> int:
    """Query tokens per block of the score matrices."""
    return max(1, min(V, _BLOCK_ELEMENTS // max(1, H * V)))


def _layout(value: np.ndarray, s: int) -> np.ndarray:
    """A one-sided (P, h, e) in the 7-axis layout of the Gaussian engine."""
    P, h, e = value.shape
    return value.reshape(P, h, 1, e, 1, 1, 1) if s == 0 else value.reshape(P, 1, h, 1, e, 1, 1)


class TokenMoments(Algorithm):
    """One attention layer under the token measure (every token one
    distribution): the attention-moments structure with diagonal moments."""

    name = "token-moments"
    title = "attention moments under the token measure"
    inners = ("tokens",)
    measures = (Tokens,)

    def check(self, problem: InnerProblem) -> str | None:
        why = AttentionMoments.structure(problem)
        if why is None and not problem.measure.identical:  # type: ignore[union-attr]
            return "the tokens have different distributions (enumeration or the pairing groupings take that)"
        return why

    def _pairs(self, problem: InnerProblem, dry: bool) -> dict[str, _TokenMoments]:
        p = problem.measure.token_probs()[0]  # type: ignore[union-attr]
        sides = []
        for attn, E, tail in (moment_head(problem.a), moment_head(problem.b)):  # type: ignore[misc]
            Z = E[:, 1:] + E[:, :1]  # the embedded tokens, padded: x~(t) = E [1; e_t]
            sides.append(AttentionSide(attn, Z, position_maps(tail, attn.n_ctx, attn.d_out), dry))
        same = problem.a is problem.b
        cache: dict[Any, Any] = {}
        pairs = {"ab": _TokenMoments(sides[0], sides[0] if same else sides[1], p, dry, cache)}
        if problem.joint and not same:
            pairs["aa"] = _TokenMoments(sides[0], sides[0], p, dry, cache)
            pairs["bb"] = _TokenMoments(sides[1], sides[1], p, dry, cache)
        return pairs

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        pairs = self._pairs(problem, dry=True)
        (_, Ea, _), (_, Eb, _) = moment_head(problem.a), moment_head(problem.b)  # type: ignore[misc]
        flops = 0.0
        for p in pairs.values():
            for x in {id(p.x): p.x, id(p.y): p.y}.values():  # forms: the heads' maps on the embedded tokens
                flops += 2.0 * sum(h * w for h, w in form_shapes(x)) * x.T.shape[0] * x.T.shape[1]
            p.second_moments()
            if problem.centered:
                p.means(0), p.means(1)
            flops += p.flops
        if flops > limit:
            raise CostError(f"the token attention moments would cost about {format_count(flops)} flops", flops=flops)
        largest = max(p.largest for p in pairs.values())
        tables = sum(sum(h * w for h, w in form_shapes(x)) * x.T.shape[1] for x in {id(s): s for p in pairs.values()
                                                                               for s in (p.x, p.y)}.values())
        return Plan(self.name, problem, flops, 8.0 * (4 * largest + tables + (Ea.size + Eb.size)),
                    len(pairs) * positions_of(problem.a), joint=len(pairs) == 3,
                    notes=("attention moments under the token measure (diagonal moments: nothing enumerated)",))

    def run(self, plan: Plan) -> Triple:
        pairs = self._pairs(plan.problem, dry=False)
        return AttentionMoments.finish(plan, {key: (pair, pair.second_moments()) for key, pair in pairs.items()})
