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

from .attention import BilinearAttention, _rotary
from .components import Component, Linear

__all__ = ["attention_moments", "moment_head", "MAX_WHITENED"]

MAX_WHITENED = 24  # monomial codes in base 6 fit in int64 up to 24 variables


class _Scatter:
    """Sum columns into target slots: out[:, t] = sum of vals[:, s] with target[s] = t."""

    def __init__(self, target: np.ndarray, n_out: int) -> None:
        self.order = np.argsort(target, kind="stable")
        t = target[self.order]
        self.starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
        self.slots = t[self.starts]
        self.n_out = n_out

    def __call__(self, vals: np.ndarray) -> np.ndarray:
        out = np.zeros((vals.shape[0], self.n_out))
        out[:, self.slots] = np.add.reduceat(vals[:, self.order], self.starts, axis=1)
        return out


class _Basis:
    """Monomials of degree <= k in r variables, graded (those of degree <= j
    first, so a polynomial of degree j lives in a prefix), with product maps
    and the change to Hermite polynomials He_b, where E[He_b He_c] = b! [b = c]."""

    def __init__(self, r: int, k: int) -> None:
        exps = [np.bincount(np.array(c, dtype=int), minlength=r) if c else np.zeros(r, dtype=int)
                for deg in range(k + 1) for c in combinations_with_replacement(range(r), deg)]
        self.r, self.k = r, k
        self.exps = np.array(exps, dtype=np.int64).reshape(-1, r)
        self.sizes = [math.comb(r + j, j) for j in range(k + 1)]
        self.powers = (k + 1) ** np.arange(r, dtype=np.int64)
        codes = self.exps @ self.powers
        self.sorter = np.argsort(codes)
        self.sorted_codes = codes[self.sorter]
        self.norms = np.array([math.prod(math.factorial(int(e)) for e in row) for row in self.exps], dtype=float)
        self._products: dict[tuple[int, int], _Scatter] = {}
        self._hermite: dict[int, tuple[_Scatter, np.ndarray, np.ndarray]] = {}

    def index(self, exps: np.ndarray) -> np.ndarray:
        return self.sorter[np.searchsorted(self.sorted_codes, exps @ self.powers)]

    def product(self, a: int, b: int) -> _Scatter:
        """Scatter of the outer product of coefficients (degree <= a) x (degree <= b)."""
        if (a, b) not in self._products:
            na, nb = self.sizes[a], self.sizes[b]
            s = (self.exps[:na, None, :] + self.exps[None, :nb, :]).reshape(-1, self.r)
            self._products[a, b] = _Scatter(self.index(s), self.sizes[a + b])
        return self._products[a, b]

    def multiply(self, p: np.ndarray, a: int, q: np.ndarray, b: int) -> np.ndarray:
        """Row-wise products of polynomials p (rows, size a) and q (rows, size b)."""
        outer = (p[:, :, None] * q[:, None, :]).reshape(p.shape[0], -1)
        return self.product(a, b)(outer)

    def hermite(self, p: np.ndarray, deg: int) -> np.ndarray:
        """Coefficients of He_b for polynomials of degree <= deg given by monomials."""
        if deg not in self._hermite:
            n = self.sizes[deg]
            src, ex, w = np.arange(n), self.exps[:n].copy(), np.ones(n)
            for i in range(self.r):  # x^m = sum_t m! / (2^t t! (m-2t)!) He_{m-2t}, variable by variable
                parts = [(src, ex, w)]
                m = ex[:, i]
                for t in range(1, deg // 2 + 1):
                    sel = m >= 2 * t
                    e2 = ex[sel].copy()
                    e2[:, i] -= 2 * t
                    mm = m[sel]
                    coef = np.array([math.factorial(v) / (2**t * math.factorial(t) * math.factorial(v - 2 * t))
                                     for v in mm])
                    parts.append((src[sel], e2, w[sel] * coef))
                src = np.concatenate([p_[0] for p_ in parts])
                ex = np.concatenate([p_[1] for p_ in parts])
                w = np.concatenate([p_[2] for p_ in parts])
            self._hermite[deg] = (_Scatter(self.index(ex), n), src, w)
        scatter, src, w = self._hermite[deg]
        return scatter(p[:, src] * w)


@lru_cache(maxsize=8)
def _basis(r: int, k: int = 5) -> _Basis:
    return _Basis(r, k)


# ----------------------------------------------------------- the model side


def _per_position(layer: Component, n: int) -> np.ndarray | None:
    """The padded per-position map of a position-wise Linear layer, else None."""
    if not isinstance(layer, Linear):
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


def moment_head(model: Component) -> tuple[BilinearAttention, np.ndarray, list[Component]] | None:
    """(attention, padded per-position map before it, layers after it) when
    ``model`` is position-wise Linear layers, one float BilinearAttention and
    anything after; None when this module cannot take it."""
    layers = getattr(model, "layers", [model])
    cut = next((k for k, l in enumerate(layers) if isinstance(l, BilinearAttention)), None)
    if cut is None:
        return None
    attn = layers[cut]
    if attn.exact or not attn.n_ctx:
        return None
    maps = [_per_position(layer, attn.n_ctx) for layer in layers[:cut]]
    if any(m is None for m in maps):
        return None
    E = np.eye(attn.d_model + 1)
    for m in reversed(maps):  # the map nearest the attention acts last
        E = E @ m
    return attn, E, list(layers[cut + 1 :])


@dataclass
class _Features:
    """One attention layer's per-position features as Hermite coefficients."""

    n: int
    d_out: int
    mask: np.ndarray  # (H+1, n, n) scale and causal mask per head
    O: list[np.ndarray]  # per head (d_out, dv_h)
    pair_heads: list[int]
    rot: tuple[np.ndarray, np.ndarray]  # per factor (n, w, w) rotations (identity without rotary)
    cd: np.ndarray  # (sum dv_h, N5) Hermite coefficients of Cd, all heads
    aq: np.ndarray  # (P * w1 * w2, N2) for the pair heads
    bk: np.ndarray  # (P * w1 * w2 * dv, N3)
    shape: tuple[int, int, int]  # (w1, w2, dv) of the pair heads


def _features(attn: BilinearAttention, E: np.ndarray, T: np.ndarray, basis: _Basis) -> _Features:
    """Features of ``attn`` read through the per-position map E (padded) from
    the whitened padded input z~ (x~ = T z~)."""
    n, H = attn.n_ctx, attn.heads
    P = attn._padded_heads()
    F = {k: np.einsum("hwd,de->hwe", P[k].astype(float), E @ T) for k in ("q1", "k1", "q2", "k2", "v")}
    dv_real = attn.weights_["v"].shape[1]
    dvs = [dv_real] * H + [P["v"].shape[1]]
    O = [P["o"][h, 1:, : dvs[h]].astype(float) for h in range(H + 1)]
    mask = attn._mask().astype(float)
    w1, w2 = P["q1"].shape[1], P["q2"].shape[1]
    if attn.rotary_base is not None:
        rot = (_rotary(n, w1, attn.rotary_base), _rotary(n, w2, attn.rotary_base))
    else:
        rot = (np.broadcast_to(np.eye(w1), (n, w1, w1)), np.broadcast_to(np.eye(w2), (n, w2, w2)))
    lin = basis.sizes[1]
    cds = []
    for h in range(H + 1):
        g1 = basis.multiply(F["q1"][h], 1, F["k1"][h], 1).sum(0, keepdims=True)  # x~' Q1' K1 x~
        g2 = basis.multiply(F["q2"][h], 1, F["k2"][h], 1).sum(0, keepdims=True)
        quartic = basis.multiply(g1, 2, g2, 2)
        v = F["v"][h, : dvs[h]]
        cds.append(basis.multiply(np.repeat(quartic, len(v), 0), 4, v, 1))
    off = ~np.eye(n, dtype=bool)
    pair_heads = [h for h in range(H + 1) if np.any(mask[h][off] != 0)]
    aqs, bks = [], []
    for h in pair_heads:
        q12 = basis.multiply(np.repeat(F["q1"][h], w2, 0), 1, np.tile(F["q2"][h], (w1, 1)), 1)  # (w1 w2, N2)
        k12 = basis.multiply(np.repeat(F["k1"][h], w2, 0), 1, np.tile(F["k2"][h], (w1, 1)), 1)
        v = F["v"][h, :dv_real]
        aqs.append(q12)
        bks.append(basis.multiply(np.repeat(k12, dv_real, 0), 2, np.tile(v, (w1 * w2, 1)), 1))
    empty = lambda deg: np.zeros((0, basis.sizes[deg]))  # noqa: E731
    return _Features(
        n, attn.d_out, mask, O, pair_heads, rot,
        basis.hermite(np.concatenate(cds), 5),
        basis.hermite(np.concatenate(aqs), 2) if aqs else empty(2),
        basis.hermite(np.concatenate(bks), 3) if bks else empty(3),
        (w1, w2, dv_real),
    )


# ------------------------------------------------------------ the moments


def per_position_measure(mean: Any, cov: Any, n: int, d: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-position (mean, cov) of a flat sequence measure, or None when
    the positions are not independent and identically distributed."""
    m = np.zeros(n * d) if mean is None else np.asarray(mean, dtype=float).reshape(-1)
    C = np.eye(n * d) if cov is None else np.asarray(cov, dtype=float)
    if m.shape != (n * d,) or C.shape != (n * d, n * d):
        return None
    m0, C0 = m[:d], C[:d, :d]
    if not (np.array_equal(m, np.tile(m0, n)) and np.array_equal(C, np.kron(np.eye(n), C0))):
        return None
    return m0, C0


def _whitening(mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """T with x~ = T z~ for x ~ N(mean, cov), z ~ N(0, I_r), r = rank of cov."""
    vals, vecs = np.linalg.eigh(cov)
    keep = vals > 1e-12 * max(vals.max(initial=0.0), 1e-300)
    d, r = len(mean), int(keep.sum())
    T = np.zeros((d + 1, r + 1))
    T[0, 0] = 1
    T[1:, 0] = mean
    T[1:, 1:] = vecs[:, keep] * np.sqrt(vals[keep])
    return T


def _cov(x: np.ndarray, dx: int, y: np.ndarray, dy: int, basis: _Basis) -> np.ndarray:
    m = basis.sizes[min(dx, dy)]
    return (x[:, 1:m] * basis.norms[1:m]) @ y[:, 1:m].T


def _coupling(F: _Features, i: int, j: int) -> np.ndarray:
    """kron(R1_ij, R2_ij): query index (r, s) at i to key index (k, l) at j."""
    return np.kron(F.rot[0][i].T @ F.rot[0][j], F.rot[1][i].T @ F.rot[1][j])


def _split(F: _Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of (cd, aq as (P, q), bk as (P, q, dv))."""
    w1, w2, dv = F.shape
    P = len(F.pair_heads)
    return F.cd[:, 0], F.aq[:, 0].reshape(P, w1 * w2), F.bk[:, 0].reshape(P, w1 * w2, dv)


def _mean_and_linear(F: _Features) -> tuple[np.ndarray, np.ndarray]:
    """The output mean (n d_out,) and the coefficients U (n, n d_out, features)
    of the parts that depend on one position, on the centred features
    [cd; aq; bk] of that position."""
    n, do = F.n, F.d_out
    m_cd, m_aq, m_bk = _split(F)
    n_cd, n_aq = len(F.cd), len(F.aq)
    mean = np.zeros(n * do)
    U = np.zeros((n, n * do, n_cd + n_aq + len(F.bk)))
    P = len(F.pair_heads)
    q = F.aq.shape[0] // max(P, 1)
    dv = F.shape[2]
    for i in range(n):
        rows = slice(i * do, (i + 1) * do)
        start = 0
        for h, O in enumerate(F.O):
            c = F.mask[h, i, i]
            mean[rows] += c * O @ m_cd[start : start + O.shape[1]]
            U[i, rows, start : start + O.shape[1]] = c * O
            start += O.shape[1]
        for j in range(n):
            if j == i or P == 0:
                continue
            R = _coupling(F, i, j)
            a_R = m_aq @ R  # (P, q): the query mean carried to key space
            R_b = np.einsum("rk,pke->pre", R, m_bk)  # (P, q, dv)
            for p, h in enumerate(F.pair_heads):
                c, O = F.mask[h, i, j], F.O[h]
                if c == 0:
                    continue
                mean[rows] += c * O @ (a_R[p] @ m_bk[p])
                U[i, rows, n_cd + p * q : n_cd + (p + 1) * q] += c * O @ R_b[p].T
                bk = slice(n_cd + n_aq + p * q * dv, n_cd + n_aq + (p + 1) * q * dv)
                U[j, rows, bk] += c * np.einsum("ae,k->ake", O, a_R[p]).reshape(do, q * dv)
    return mean, U


def _pair_part(FA: _Features, FB: _Features, CA: dict[str, np.ndarray]) -> np.ndarray:
    """Second moments of the parts that depend on two positions."""
    n, da, db = FA.n, FA.d_out, FB.d_out
    M = np.zeros((n * da, n * db))
    PA, PB = len(FA.pair_heads), len(FB.pair_heads)
    if PA == 0 or PB == 0:
        return M
    qa, qb = FA.aq.shape[0] // PA, FB.aq.shape[0] // PB
    dva, dvb = FA.shape[2], FB.shape[2]
    OA = np.stack([FA.O[h] for h in FA.pair_heads])
    OB = np.stack([FB.O[h] for h in FB.pair_heads])
    aa = CA["aq,aq"].reshape(PA, qa, PB, qb)
    bb = CA["bk,bk"].reshape(PA, qa, dva, PB, qb, dvb)
    ab = CA["aq,bk"].reshape(PA, qa, PB, qb, dvb)
    ba = CA["bk,aq"].reshape(PA, qa, dva, PB, qb)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            cA = FA.mask[FA.pair_heads, i, j]
            RA = _coupling(FA, i, j)
            # both outputs at i: queries at i, keys at j on both sides
            K = np.einsum("rk,prPs,sl->pkPl", RA, aa, _coupling(FB, i, j))
            N = np.einsum("pkPl,pkePlf->pePf", K, bb)
            cB = FB.mask[FB.pair_heads, i, j]
            M[i * da : (i + 1) * da, i * db : (i + 1) * db] += np.einsum(
                "p,pae,pePf,P,Pbf->ab", cA, OA, N, cB, OB, optimize=True)
            # output of a at i, of b at j: a's query meets b's key at i, and the reverse at j
            cB = FB.mask[FB.pair_heads, j, i]
            S1 = np.einsum("rk,prPlf->pkPlf", RA, ab)
            S2 = np.einsum("pkePs,sl->pkePl", ba, _coupling(FB, j, i))
            N = np.einsum("pkPlf,pkePl->pePf", S1, S2)
            M[i * da : (i + 1) * da, j * db : (j + 1) * db] += np.einsum(
                "p,pae,pePf,P,Pbf->ab", cA, OA, N, cB, OB, optimize=True)
    return M


def _covariances(FA: _Features, FB: _Features, basis: _Basis) -> dict[str, np.ndarray]:
    groups = {"cd": 5, "aq": 2, "bk": 3}
    return {f"{x},{y}": _cov(getattr(FA, x), dx, getattr(FB, y), dy, basis)
            for x, dx in groups.items() for y, dy in groups.items()}


def _second_moment(FA: _Features, FB: _Features, basis: _Basis) -> np.ndarray:
    """E[y_a y_b'] (n da, n db), exact."""
    CA = _covariances(FA, FB, basis)
    order = ("cd", "aq", "bk")
    G = np.block([[CA[f"{x},{y}"] for y in order] for x in order])
    mean_a, UA = _mean_and_linear(FA)
    mean_b, UB = _mean_and_linear(FB)
    M = np.outer(mean_a, mean_b) + np.einsum("pif,fg,pjg->ij", UA, G, UB, optimize=True)
    return M + _pair_part(FA, FB, CA)


@dataclass(frozen=True)
class HeadMoments:
    """Exact joint moments of two heads' padded outputs [1; y_1; ...; y_n]."""

    mean_a: np.ndarray
    mean_b: np.ndarray
    ab: np.ndarray
    aa: np.ndarray | None
    bb: np.ndarray | None
    whitened: int  # r, the rank of the per-position covariance


def _padded(mean_a: np.ndarray, mean_b: np.ndarray, M: np.ndarray) -> np.ndarray:
    out = np.empty((len(mean_a) + 1, len(mean_b) + 1))
    out[0, 0], out[0, 1:], out[1:, 0], out[1:, 1:] = 1.0, mean_b, mean_a, M
    return out


def attention_moments(a: Component, b: Component, mean: np.ndarray, cov: np.ndarray,
                      joint: bool = False) -> HeadMoments:
    """Exact first and second moments of the outputs of ``a`` and ``b`` up
    to and including their first attention layer (see :func:`moment_head`),
    for inputs whose positions are independent N(mean, cov) (per position).
    ``joint`` adds the self blocks aa and bb.  Raises ValueError when a model
    does not qualify or the whitened width exceeds MAX_WHITENED."""
    heads = [moment_head(m) for m in (a, b)]
    if heads[0] is None or heads[1] is None:
        raise ValueError("attention_moments needs position-wise Linear layers, then a float BilinearAttention")
    T = _whitening(np.asarray(mean, dtype=float), np.asarray(cov, dtype=float))
    r = T.shape[1] - 1
    if r > MAX_WHITENED:
        raise ValueError(f"per-position input rank {r} exceeds {MAX_WHITENED}")
    basis = _basis(r)
    FA = _features(heads[0][0], heads[0][1], T, basis)
    FB = FA if a is b else _features(heads[1][0], heads[1][1], T, basis)
    ma, _ = _mean_and_linear(FA)
    mb = ma if FB is FA else _mean_and_linear(FB)[0]
    ab = _padded(ma, mb, _second_moment(FA, FB, basis))
    aa = bb = None
    if joint:
        aa = ab if FB is FA else _padded(ma, ma, _second_moment(FA, FA, basis))
        bb = ab if FB is FA else _padded(mb, mb, _second_moment(FB, FB, basis))
    return HeadMoments(np.r_[1.0, ma], np.r_[1.0, mb], ab, aa, bb, r)
