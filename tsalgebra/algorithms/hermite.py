"""Exact Gaussian moments of bilinear attention outputs, position by position.

Under the sequence measure the positions are independent, and every output
of an attention layer is a sum of products of *per-position features*:

    y_i = sum_h O_h [ sum_{j != i} c_hij <Aq_h(x_i), R_ij Bk_h(x_j)>  +  c_hii Cd_h(x_i) ]

with Aq = (Q1 x~) (x) (Q2 x~) (degree 2), Bk = (K1 x~) (x) (K2 x~) (x) (V x~)
(degree 3), Cd = (x~' Q1' K1 x~)(x~' Q2' K2 x~) V x~ (degree 5, the j = i
term), c the mask and scale, R_ij = Rot_i' Rot_j the rotary coupling (the
layer's virtual head, which writes biases, residual and the constant channel,
is one more head with a diagonal mask).  Centring the features splits each
output into a constant, parts that depend on one position and parts that
depend on two; parts with different position sets are uncorrelated, so the
joint second moments of two layers need only the means and covariances of
the features at one position.  Those are exact Gaussian moments of
polynomials of degree <= 10 in the whitened input z of one position, read off
Hermite coefficients: E[p q] = sum_b b! p_b q_b.

Cost: Hermite coefficients over the C(r+5, 5) monomials of degree <= 5 in the
r whitened input dimensions (20,349 at r = 16), one Gram matrix of feature
coefficients per degree, and small contractions per ordered pair of
positions.  No pairing is enumerated.  Float only; r <= 24.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations_with_replacement
from typing import Any

import numpy as np

from ..attention import BilinearAttention, rotary_matrices
from ..components import Component, Linear, PositionWise, Sequential
from ..folding import fold
from ..measure import Gaussian
from ..problem import CostError, InnerProblem, InnerResult, Plan, format_count, positions_of
from .moments import attention_rank, moment_head, moment_result, positions_fit
from .registry import Algorithm, Triple

__all__ = ["HermiteMoments", "attention_moments", "moment_products", "moments_cost", "MAX_WHITENED"]

MAX_WHITENED = 24  # monomial codes in base 6 fit in int64 up to 24 variables


class _Hermite:
    """Multivariate Hermite polynomials He_b(z) of degree <= k in r variables,
    graded (those of degree <= j first, so a polynomial of degree j is a
    prefix of coefficients), with E[He_b He_c] = b! [b = c] under N(0, I).
    Products are built one linear factor at a time from
    z_i He_b = He_{b + e_i} + b_i He_{b - e_i}."""

    def __init__(self, r: int, k: int) -> None:
        exps = [np.bincount(np.array(c, dtype=int), minlength=r) if c else np.zeros(r, dtype=int)
                for deg in range(k + 1) for c in combinations_with_replacement(range(r), deg)]
        self.r, self.k = r, k
        # r = 0 (a rank-0 law: the input is constant): one monomial, the constant 1, whose
        # coefficient is the mean; no covariance (len(exps), not -1: a 0-wide reshape is ambiguous)
        self.exps = np.array(exps, dtype=np.int64).reshape(len(exps), r)
        self.sizes = [math.comb(r + j, j) for j in range(k + 1)]
        self.norms = np.array([math.prod(math.factorial(int(e)) for e in row) for row in self.exps], dtype=float)
        powers = (k + 1) ** np.arange(r, dtype=np.int64)
        codes = self.exps @ powers
        sorter = np.argsort(codes)
        index = lambda e: sorter[np.searchsorted(codes[sorter], e @ powers)]  # noqa: E731
        low = self.exps[: self.sizes[k - 1]]
        self.up = [index(low + np.eye(r, dtype=np.int64)[i]) for i in range(r)]  # b -> b + e_i
        self.down = []  # (b with b_i > 0, index of b - e_i, b_i), b ascending
        for i in range(r):
            src = np.flatnonzero(self.exps[:, i] > 0)
            lowered = index(self.exps[src] - np.eye(r, dtype=np.int64)[i])
            self.down.append((src, lowered, self.exps[src, i].astype(float)))

    def shifts(self, P: np.ndarray, a: int) -> np.ndarray:
        """(rows, r + 1, size a + 1): each row of P (degree <= a) times 1, z_1, ..., z_r."""
        n_in = self.sizes[a]
        out = np.zeros((P.shape[0], self.r + 1, self.sizes[a + 1]))
        out[:, 0, :n_in] = P
        for i in range(self.r):
            out[:, i + 1, self.up[i][:n_in]] = P
            src, dst, w = self.down[i]
            m = np.searchsorted(src, n_in)
            out[:, i + 1, dst[:m]] += P[:, src[:m]] * w[:m]
        return out

    def shift_sum(self, U: np.ndarray, a: int) -> np.ndarray:
        """(rows, size a + 1): U[:, 0] + sum_i z_i U[:, i] for U (rows, r + 1, size a),
        i.e. sum_i l_i p_i without forming each product."""
        n_in = self.sizes[a]
        out = np.zeros((U.shape[0], self.sizes[a + 1]))
        out[:, :n_in] = U[:, 0]
        for i in range(self.r):
            out[:, self.up[i][:n_in]] += U[:, i + 1]
            src, dst, w = self.down[i]
            m = np.searchsorted(src, n_in)
            out[:, dst[:m]] += U[:, i + 1, src[:m]] * w[:m]
        return out

    def degrees(self, X: np.ndarray) -> np.ndarray:
        """The degree of each row (highest non-zero coefficient)."""
        nz = X != 0
        last = np.where(nz.any(1), X.shape[1] - 1 - np.argmax(nz[:, ::-1], axis=1), 0)
        return np.searchsorted(self.sizes, last, side="right")

    def _by_degree(self, blocks: list[np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Rows of the stacked blocks grouped by degree: {g: (row indices, coefficients up to degree g)}."""
        parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        offset = 0
        for X in blocks:
            deg = self.degrees(X)
            for g in np.unique(deg):
                rows = np.flatnonzero(deg == g)
                parts.setdefault(int(g), []).append((rows + offset, X[rows, : self.sizes[g]]))
            offset += len(X)
        return {g: (np.concatenate([r for r, _ in p]), np.concatenate([x for _, x in p])) for g, p in parts.items()}

    def covariance(self, xs: list[np.ndarray], ys: list[np.ndarray] | None = None) -> np.ndarray:
        """Cov(p, q) = sum over b != 0 of b! p_b q_b for the rows p of the
        stacked blocks xs and q of ys (default: xs, a symmetric result), each
        block at its own width, every pair of degree groups over its
        shortest common prefix."""
        gx = self._by_degree(xs)
        gy = gx if ys is None else self._by_degree(ys)
        out = np.zeros((sum(len(x) for x in xs), sum(len(y) for y in (xs if ys is None else ys))))
        root = np.sqrt(self.norms)
        for dx, (ix, X) in gx.items():
            for dy, (iy, Y) in gy.items():
                if ys is None and dy < dx:
                    continue  # mirrored below
                m = self.sizes[min(dx, dy)]
                if ys is None and dx == dy:
                    R = X[:, 1:m] * root[1:m]
                    block = R @ R.T  # symmetric: half the work
                else:
                    block = (X[:, 1:m] * self.norms[1:m]) @ Y[:, 1:m].T
                out[np.ix_(ix, iy)] = block
                if ys is None:
                    out[np.ix_(iy, ix)] = block.T
        return out


@lru_cache(maxsize=8)
def _basis(r: int, k: int = 5) -> _Hermite:
    return _Hermite(r, k)


# ----------------------------------------------------------- the model side


@dataclass
class _Features:
    """One attention layer's per-position features as Hermite coefficient
    rows X = [Cd (all heads); Aq (pair heads); Bk (pair heads)]."""

    n: int
    d_out: int
    mask: np.ndarray  # (H+1, n, n) scale and causal mask per head
    O: list[np.ndarray]  # per head (d_out, dv_h)
    pair_heads: list[int]  # heads with a non-zero score off the diagonal
    coupling: np.ndarray  # (n, n, q, q): kron(R1_ij, R2_ij), query index (r, s) at i to key index at j
    X: list[np.ndarray]  # [Cd per head (degree <= 5), Aq (2), Bk (3)], each at its own width
    shape: tuple[int, int, int]  # (w1, w2, dv) of the pair heads

    @property
    def rows(self) -> int:
        return sum(len(x) for x in self.X)

    def mean(self) -> np.ndarray:
        return np.concatenate([x[:, 0] for x in self.X])

    def blocks(self) -> tuple[slice, slice, slice]:
        """Rows of Cd (all heads), Aq and Bk in the stacked features."""
        a = sum(len(x) for x in self.X[:-2])
        b = a + len(self.X[-2])
        return slice(0, a), slice(a, b), slice(b, self.rows)


def _features(attn: BilinearAttention, ET: np.ndarray, basis: _Hermite) -> _Features:
    """Features of ``attn`` whose padded input is ET z~ for the whitened
    padded input z~ of one position."""
    n, H = attn.n_ctx, attn.heads
    P = attn.padded_heads()
    F = {k: np.einsum("hwd,de->hwe", P[k].astype(float), ET) for k in ("q1", "k1", "q2", "k2", "v")}
    dv = attn.v.shape[1]
    dvs = [dv] * H + [P["v"].shape[1]]
    O = [P["o"][h, 1:, : dvs[h]].astype(float) for h in range(H + 1)]
    mask = attn.score_mask().astype(float)
    w1, w2 = P["q1"].shape[1], P["q2"].shape[1]
    eye = lambda w: np.broadcast_to(np.eye(w), (n, w, w))  # noqa: E731
    rot1, rot2 = ((rotary_matrices(n, w1, attn.rotary_base), rotary_matrices(n, w2, attn.rotary_base))
                  if attn.rotary_base is not None else (eye(w1), eye(w2)))
    coupling = np.einsum("irk,jrl,isu,jsv->ijkulv", rot1, rot1, rot2, rot2).reshape(n, n, w1 * w2, w1 * w2)
    sh = basis.shifts
    lin = {k: F[k].reshape(-1, F[k].shape[-1]) for k in ("q1", "k1")}
    S1 = {k: sh(lin[k], 1).reshape(H + 1, -1, basis.r + 1, basis.sizes[2]) for k in lin}  # per row: (r+1, N2)
    # sum_r (Q1 x~)_r (K1 x~)_r = sum_i z~_i p_i with p_i = sum_r K1[r, i] (Q1 x~)_r
    g1 = basis.shift_sum(np.matmul(F["k1"].transpose(0, 2, 1), F["q1"]), 1)  # x~' Q1' K1 x~ per head
    g1q2 = np.matmul(F["q2"], sh(g1, 2))  # (H+1, w2, N3): g1 times each row of Q2 x~
    quartic = basis.shift_sum(np.matmul(F["k2"].transpose(0, 2, 1), g1q2), 3)  # (H+1, N4): times x~' Q2' K2 x~
    cds = []
    for h in range(H + 1):  # at its own degree: the virtual head's quartic is the constant 1
        deg = int(basis.degrees(quartic[h][None])[0])
        cds.append(F["v"][h, : dvs[h]] @ sh(quartic[h, : basis.sizes[deg]][None], deg)[0])
    off = ~np.eye(n, dtype=bool)
    pair_heads = [h for h in range(H + 1) if np.any(mask[h][off] != 0)]
    aqs, bks = [], []
    if pair_heads:
        ph = pair_heads
        aqs.append(np.matmul(F["q2"][ph][:, None], S1["q1"][ph]).reshape(-1, basis.sizes[2]))  # (p, r, s)
        k12 = np.matmul(F["k2"][ph][:, None], S1["k1"][ph]).reshape(-1, basis.sizes[2])
        S2 = sh(k12, 2).reshape(len(ph), w1 * w2, basis.r + 1, -1)
        bks.append(np.matmul(F["v"][ph, :dv][:, None], S2).reshape(-1, basis.sizes[3]))  # (p, r, s, e)
    empty = lambda deg: np.zeros((0, basis.sizes[deg]))  # noqa: E731
    X = cds + [np.concatenate(aqs) if aqs else empty(2), np.concatenate(bks) if bks else empty(3)]
    return _Features(n, attn.d_out, mask, O, pair_heads, coupling, X, (w1, w2, dv))


# ------------------------------------------------------------ the moments


def _mean_and_linear(F: _Features) -> tuple[np.ndarray, np.ndarray]:
    """The output mean (n d_out,) and the coefficients U (n, n d_out, features)
    of the parts that depend on one position p (U[p]), on the centred
    features X of that position."""
    n, do = F.n, F.d_out
    P, (w1, w2, dv) = len(F.pair_heads), F.shape
    q = w1 * w2
    cd, aq, bk = F.blocks()
    m = F.mean()
    m_aq, m_bk = m[aq].reshape(P, q), m[bk].reshape(P, q, dv)
    mean = np.zeros(n * do)
    U = np.zeros((n, n * do, F.rows))
    for i in range(n):
        rows = slice(i * do, (i + 1) * do)
        start = 0
        for h, O in enumerate(F.O):  # the j = i terms: Cd
            c, cols = F.mask[h, i, i], slice(start, start + O.shape[1])
            mean[rows] += c * O @ m[cols]
            U[i, rows, cols] = c * O
            start += O.shape[1]
        for j in range(n):
            if j == i or P == 0:
                continue
            R = F.coupling[i, j]
            a_R = m_aq @ R  # (P, q): the query mean carried to key space
            R_b = np.einsum("rk,pke->pre", R, m_bk)  # (P, q, dv)
            for p, h in enumerate(F.pair_heads):
                c, O = F.mask[h, i, j], F.O[h]
                if c == 0:
                    continue
                mean[rows] += c * O @ (a_R[p] @ m_bk[p])
                U[i, rows, aq.start + p * q : aq.start + (p + 1) * q] += c * O @ R_b[p].T
                cols = slice(bk.start + p * q * dv, bk.start + (p + 1) * q * dv)
                U[j, rows, cols] += c * np.einsum("ae,k->ake", O, a_R[p]).reshape(do, q * dv)
    return mean, U


def _pair_part(FA: _Features, FB: _Features, G: np.ndarray) -> np.ndarray:
    """Second moments of the parts that depend on two positions i != j:
    a's pair (i, j) meets b's pair (i, j) (outputs both at i) or (j, i)."""
    n, da, db = FA.n, FA.d_out, FB.d_out
    M = np.zeros((n, da, n, db))
    PA, PB = len(FA.pair_heads), len(FB.pair_heads)
    if PA == 0 or PB == 0:
        return M.reshape(n * da, n * db)
    (wa1, wa2, dva), (wb1, wb2, dvb) = FA.shape, FB.shape
    qa, qb = wa1 * wa2, wb1 * wb2
    _, aq_a, bk_a = FA.blocks()
    _, aq_b, bk_b = FB.blocks()
    aa = G[aq_a, aq_b].reshape(PA, qa, PB, qb)
    bb = G[bk_a, bk_b].reshape(PA, qa, dva, PB, qb, dvb)
    ab = G[aq_a, bk_b].reshape(PA, qa, PB, qb, dvb)
    ba = G[bk_a, aq_b].reshape(PA, qa, dva, PB, qb)
    OA = np.stack([FA.O[h] for h in FA.pair_heads])
    OB = np.stack([FB.O[h] for h in FB.pair_heads])
    ii, jj = np.nonzero(~np.eye(n, dtype=bool))
    RA, RB, RBt = FA.coupling[ii, jj], FB.coupling[ii, jj], FB.coupling[jj, ii]
    cA = FA.mask[FA.pair_heads][:, ii, jj].T  # (pairs, PA)
    K = np.einsum("xrk,prPs,xsl->xpkPl", RA, aa, RB, optimize=True)
    same = np.einsum("xpkPl,pkePlf->xpePf", K, bb, optimize=True)
    S1 = np.einsum("xrk,prPlf->xpkPlf", RA, ab, optimize=True)
    S2 = np.einsum("pkePs,xsl->xpkePl", ba, RBt, optimize=True)
    swapped = np.einsum("xpkPlf,xpkePl->xpePf", S1, S2, optimize=True)
    mask_b = FB.mask[FB.pair_heads]
    for N, cB, cols in ((same, mask_b[:, ii, jj].T, ii), (swapped, mask_b[:, jj, ii].T, jj)):
        blocks = np.einsum("xp,pae,xpePf,xP,Pbf->xab", cA, OA, N, cB, OB, optimize=True)
        np.add.at(M, (ii, slice(None), cols), blocks)
    return M.reshape(n * da, n * db)


def _second_moment(FA: _Features, FB: _Features, G: np.ndarray) -> np.ndarray:
    """E[y_a y_b'] (n da, n db), exact, from G = Cov(X_a, X_b)."""
    mean_a, UA = _mean_and_linear(FA)
    mean_b, UB = _mean_and_linear(FB)
    M = np.outer(mean_a, mean_b) + np.einsum("pif,fg,pjg->ij", UA, G, UB, optimize=True)
    return M + _pair_part(FA, FB, G)


@dataclass(frozen=True)
class HeadMoments:
    """Exact joint moments of two heads' padded outputs [1; y_1; ...; y_n]."""

    mean_a: np.ndarray
    mean_b: np.ndarray
    ab: np.ndarray
    aa: np.ndarray | None
    bb: np.ndarray | None
    whitened: int  # r, the rank of the per-position covariance
    flops: int  # estimated, as moments_cost
    products: int  # covariance blocks and pair contractions computed


def _padded(mean_a: np.ndarray, mean_b: np.ndarray, M: np.ndarray) -> np.ndarray:
    out = np.empty((len(mean_a) + 1, len(mean_b) + 1))
    out[0, 0], out[0, 1:], out[1:, 0], out[1:, 1:] = 1.0, mean_b, mean_a, M
    return out


def attention_moments(a: Component, b: Component, measure: Gaussian, joint: bool = False) -> HeadMoments:
    """Exact first and second moments of the outputs of ``a`` and ``b`` up
    to and including their first attention layer (see :func:`moment_head`),
    for inputs whose positions are independent with law ``measure`` (that of
    one position).  ``joint`` adds the self blocks aa and bb.  Raises
    ValueError when a model does not qualify or the whitened width exceeds
    MAX_WHITENED."""
    heads = [moment_head(m) for m in (a, b)]
    if heads[0] is None or heads[1] is None:
        raise ValueError("attention_moments needs position-wise Linear layers, then a float BilinearAttention")
    if heads[0][0].n_ctx != heads[1][0].n_ctx or heads[0][1].shape[1] != heads[1][1].shape[1]:
        raise ValueError("attention_moments: the two models split their input into different positions")
    if heads[0][1].shape[1] != measure.width + 1:
        raise ValueError(f"attention_moments: the measure has {measure.width} features per position, the models "
                         f"read {heads[0][1].shape[1] - 1}")
    Ta, Tb = measure.images([heads[0][1], heads[1][1]])  # the input laws of the two attention layers
    r = Ta.shape[1] - 1
    if r > MAX_WHITENED:
        raise ValueError(f"per-position input rank {r} exceeds {MAX_WHITENED}")
    basis = _basis(r)
    FA = _features(heads[0][0], Ta, basis)
    FB = FA if a is b else _features(heads[1][0], Tb, basis)
    ma, mb = _mean_and_linear(FA)[0], _mean_and_linear(FB)[0]
    if joint and FB is not FA:  # one Gram matrix of both models' features serves all three blocks
        G = basis.covariance(FA.X + FB.X)
        k = FA.rows
        ab = _padded(ma, mb, _second_moment(FA, FB, G[:k, k:]))
        aa = _padded(ma, ma, _second_moment(FA, FA, G[:k, :k]))
        bb = _padded(mb, mb, _second_moment(FB, FB, G[k:, k:]))
    else:
        ab = _padded(ma, mb, _second_moment(FA, FB, basis.covariance(FA.X, FB.X)))
        aa = bb = (ab if FB is FA else None) if joint else None
    return HeadMoments(np.r_[1.0, ma], np.r_[1.0, mb], ab, aa, bb, r, moments_cost(a, b, r, joint),
                       moment_products(FA.n, joint and FB is not FA))


def moment_products(n_ctx: int, joint: bool) -> int:
    """Matrix products of one computation: per moment block, 9 covariance
    blocks of the feature groups and 2 contractions per ordered pair of positions."""
    return (3 if joint else 1) * (9 + 2 * n_ctx * (n_ctx - 1))


def _groups(model: Component, r: int) -> tuple[list[tuple[int, int]], int]:
    """(rows, degree) of a model's feature groups and the flops of forming them."""
    attn = moment_head(model)[0]  # type: ignore[index]
    H, d = attn.heads, attn.d_model
    w1, w2 = attn.q1.shape[1], attn.q2.shape[1]
    dv = attn.v.shape[1]
    P = H if attn.n_ctx > 1 else 0
    N, r1 = [math.comb(r + j, j) for j in range(6)], r + 1
    form = 2 * (H + 1) * (w1 * r1 * N[2] + (1 + w2) * r1 * N[3] + r1 * N[3])  # Q1 K1 products, the quartics
    form += 2 * H * (1 + dv) * r1 * N[5] + 2 * P * w1 * w2 * (1 + dv) * r1 * N[3]  # Cd, Bk
    groups = [(H * dv, 5), (d + 1, 1), (P * w1 * w2, 2), (P * w1 * w2 * dv, 3)]
    return groups, form


def _pair_work(a: Component, b: Component) -> tuple[int, int]:
    """(elements of the largest einsum result, flops) of :func:`_pair_part`
    over every ordered pair of distinct positions: its arrays are (position
    pairs, heads, q1 q2 widths, heads, q1 q2 widths[, values])."""
    A, B = moment_head(a)[0], moment_head(b)[0]  # type: ignore[index]
    n = A.n_ctx or 1
    (qa, dva), (qb, dvb) = (((X.q1.shape[1] + 1) * (X.q2.shape[1] + 1), X.v.shape[1] + 1) for X in (A, B))
    base = n * (n - 1) * A.heads * B.heads * qa * qb
    return base * max(dva, dvb), 2 * base * (qa + qb + dvb * qa + dva * qb + 2 * dva * dvb)


def moments_cost(a: Component, b: Component, r: int, joint: bool = False) -> int:
    """Estimated flops of :func:`attention_moments` at whitened width ``r``:
    forming the features' Hermite coefficients and their covariance Gram
    matrices, and the products per pair of positions (which grow as n_ctx^2)."""
    N = [math.comb(r + j, j) for j in range(6)]
    (ga, fa), (gb, fb) = _groups(a, r), _groups(b, r)
    gram = lambda xs, ys: sum(2 * x * y * N[min(dx, dy)] for x, dx in xs for y, dy in ys)  # noqa: E731
    cost = fa + fb + (gram(ga + gb, ga + gb) // 2 if joint else gram(ga, gb))
    return int(cost + _pair_work(a, b)[1] * (3 if joint else 1))


# ------------------------------------------------------------ the algorithm


def _padded_tail(model: Component) -> np.ndarray:
    """The padded linear map after the attention layer (identity if none)."""
    _, _, tail = moment_head(model)  # type: ignore[misc]
    if not tail:
        return np.eye(model.out_features + 1)
    return fold(Sequential(*tail))[1]  # type: ignore[return-value]


class HermiteMoments(Algorithm):
    """Models of position-wise Linear layers, one float BilinearAttention and
    Linear layers after it, under a Gaussian whose positions are independent
    and identically distributed; joint (one computation for all three
    products of a similarity)."""

    name = "hermite"
    joint = True
    title = "attention moments (Hermite coefficients)"
    measures = (Gaussian,)

    def check(self, problem: InnerProblem, tail: str = "linear") -> str | None:
        """``tail="any"`` accepts any layers after the attention (closure
        takes the moments of the head only)."""
        if not problem.orbits:
            return "orbits=False asks for the plain sum over pairings"
        heads = [moment_head(m) if isinstance(m, Component) else None for m in (problem.a, problem.b)]
        if heads[0] is None or heads[1] is None:
            return "each model must be position-wise Linear layers, then a float BilinearAttention"
        if tail == "linear" and not all(isinstance(l, (Linear, PositionWise)) and l.degree == 1
                                        for h in heads for l in h[2]):
            return "only Linear layers may follow the attention (use method='closure' for deeper models)"
        (attn, E, _), (other, E_b, _) = heads
        if (attn.n_ctx, E.shape[1]) != (other.n_ctx, E_b.shape[1]):
            return f"the models read {attn.n_ctx} and {other.n_ctx} positions of different widths"
        law = problem.measure.per_position(attn.n_ctx)  # type: ignore[union-attr]
        if law is None:
            return "the measure is not independent and identical across positions"
        r = attention_rank(problem)
        if r > MAX_WHITENED:
            return f"the attention layers' joint per-position input rank {r} exceeds {MAX_WHITENED}"
        return None

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        a, b = problem.a, problem.b
        law = problem.measure.per_position(positions_of(a))  # type: ignore[union-attr]
        joint = problem.joint and a is not b
        positions_fit(problem, 2)
        r = attention_rank(problem)
        cost = moments_cost(a, b, r, joint)
        if cost > limit:
            raise CostError(f"the attention-moments algorithm would cost about {format_count(cost)} flops", flops=cost)
        rows = sum(g for g, _ in _groups(a, r)[0]) + sum(g for g, _ in _groups(b, r)[0])
        # feature coefficients and their Gram matrix; the pair part's einsum results, six at once per
        # product: measured at d_model 4-16, 2-3 positions, 4 heads of 8 (closure's first stage), 0.4-0.9
        # of this estimate
        peak = 8.0 * (rows * math.comb(r + 5, 5) + rows * rows + 6 * _pair_work(a, b)[0] * (3 if joint else 1))
        return Plan(self.name, problem, float(cost), peak, moment_products(moment_head(a)[0].n_ctx, joint),  # type: ignore[index]
                    joint=joint, facts={"whitened": r},
                    notes=(f"per-position feature moments over {r} whitened dimensions",), payload=law)

    def run(self, plan: Plan) -> Triple:
        p, law = plan.problem, plan.payload
        hm = attention_moments(p.a, p.b, law, joint=plan.joint)
        Wa, Wb = _padded_tail(p.a), _padded_tail(p.b)

        def result(Wx: np.ndarray, mx: np.ndarray, M: np.ndarray, Wy: np.ndarray, my: np.ndarray) -> InnerResult:
            return moment_result(plan, M, [mx, my], Wx[1:], Wy[1:], Wx is Wy or p.a is p.b)

        ab = result(Wa, hm.mean_a, hm.ab, Wb, hm.mean_b)
        if not plan.joint:
            return ab, None, None
        return ab, result(Wa, hm.mean_a, hm.aa, Wa, hm.mean_a), result(Wb, hm.mean_b, hm.bb, Wb, hm.mean_b)
