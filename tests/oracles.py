"""Slow, obviously-correct reference implementations ("oracles").

These functions are deliberately independent of the ``tsalgebra`` package:
they work on a plain-data model specification and build everything
explicitly (loops, explicit tensors, explicit matchings).  Speed is not a
goal; readability and correctness are.  Everything numeric is float64.

Model specification
-------------------
A model is a list of layers applied in order; each layer is a dict:

* ``{"kind": "linear", "weight": W (out, in), "bias": b (out,) or None}``
  computing ``y = W x + b``.
* ``{"kind": "bilinear", "left": L (h, in), "right": R (h, in),
  "down": D (out, h), "left_bias": (h,) or None, "right_bias": (h,) or None,
  "down_bias": (out,) or None, "residual": bool}`` computing
  ``y = D((L x + lb) * (R x + rb)) + db (+ x if residual)``.

Padded conventions
------------------
With ``x~ = [1; x]`` (channel 0 is the constant 1), a layer of degree k is a
tensor ``T`` of shape ``(out+1, in+1, ..., in+1)`` (k input axes) with
``[1; f(x)] = T . x~ . x~ ... x~`` (every input axis contracted with x~).
Output channel 0 is the constant: ``T[0, 0, ..., 0] = 1`` and all other
entries of ``T[0]`` are 0.

* linear:   ``W~ = [[1, 0], [b, W]]``.
* bilinear: ``B~[o, i, j] = sum_h D[o-1, h] L~[h, i] R~[h, j]`` for o >= 1 with
  ``L~ = [lb | L]``, ``R~ = [rb | R]`` (bias in column 0), plus
  ``B~[o, 0, 0] += db[o-1]``, plus (residual) ``B~[o, o, 0] += 1``; and
  ``B~[0, 0, 0] = 1``.
"""

from __future__ import annotations

import itertools
import math
import string
from fractions import Fraction
from typing import Any, Iterator, Sequence

import numpy as np
import sympy
import torch

Layer = dict[str, Any]
Spec = list[Layer]


# ---------------------------------------------------------------------------
# Small helpers on the spec
# ---------------------------------------------------------------------------


def _f64(a: Any) -> np.ndarray:
    """Convert (possibly object / Fraction / sympy) array to float64."""
    a = np.asarray(a)
    if a.dtype == object:
        return np.array([float(v) for v in a.ravel()], dtype=np.float64).reshape(a.shape)
    return a.astype(np.float64)


def _opt(a: Any, n: int) -> np.ndarray:
    """Optional bias -> float64 vector of length n (zeros if None)."""
    return np.zeros(n, dtype=np.float64) if a is None else _f64(a)


def layer_degree(layer: Layer) -> int:
    """Polynomial degree of a layer: linear 1, bilinear 2."""
    if layer["kind"] == "linear":
        return 1
    if layer["kind"] == "bilinear":
        return 2
    raise ValueError(f"unknown layer kind {layer['kind']!r}")


def spec_degree(spec: Spec) -> int:
    """Product of per-layer degrees."""
    k = 1
    for layer in spec:
        k *= layer_degree(layer)
    return k


def layer_in_out(layer: Layer) -> tuple[int, int]:
    """(in width, out width) of one layer."""
    if layer["kind"] == "linear":
        out, inp = np.asarray(layer["weight"]).shape
        return inp, out
    h, inp = np.asarray(layer["left"]).shape
    out = np.asarray(layer["down"]).shape[0]
    return inp, out


def spec_in_out(spec: Spec) -> tuple[int, int]:
    """(input width of the first layer, output width of the last layer)."""
    return layer_in_out(spec[0])[0], layer_in_out(spec[-1])[1]


def random_spec(
    rng: np.random.Generator,
    widths: Sequence[int],
    kinds: Sequence[str],
    hidden: int = 2,
    bias: bool = True,
    residual: bool = False,
    scale: float = 0.7,
) -> Spec:
    """Random float64 spec.  ``widths`` has len(kinds)+1 entries.

    ``residual`` is applied to bilinear layers whose in width equals out width.
    """
    assert len(widths) == len(kinds) + 1
    spec: Spec = []
    for kind, din, dout in zip(kinds, widths[:-1], widths[1:]):
        if kind == "linear":
            spec.append(
                {
                    "kind": "linear",
                    "weight": scale * rng.standard_normal((dout, din)),
                    "bias": scale * rng.standard_normal(dout) if bias else None,
                }
            )
        elif kind == "bilinear":
            spec.append(
                {
                    "kind": "bilinear",
                    "left": scale * rng.standard_normal((hidden, din)),
                    "right": scale * rng.standard_normal((hidden, din)),
                    "down": scale * rng.standard_normal((dout, hidden)),
                    "left_bias": scale * rng.standard_normal(hidden) if bias else None,
                    "right_bias": scale * rng.standard_normal(hidden) if bias else None,
                    "down_bias": scale * rng.standard_normal(dout) if bias else None,
                    "residual": bool(residual and din == dout),
                }
            )
        else:
            raise ValueError(kind)
    return spec


# ---------------------------------------------------------------------------
# 1. Direct forward passes
# ---------------------------------------------------------------------------


def forward_numpy(spec: Spec, x: np.ndarray) -> np.ndarray:
    """Evaluate the model on x of shape (n, in) with numpy; returns (n, out)."""
    y = np.asarray(x, dtype=np.float64)
    for layer in spec:
        if layer["kind"] == "linear":
            W = _f64(layer["weight"])
            y = y @ W.T + _opt(layer["bias"], W.shape[0])
        elif layer["kind"] == "bilinear":
            L, R, D = _f64(layer["left"]), _f64(layer["right"]), _f64(layer["down"])
            h = L.shape[0]
            left = y @ L.T + _opt(layer["left_bias"], h)
            right = y @ R.T + _opt(layer["right_bias"], h)
            out = (left * right) @ D.T + _opt(layer["down_bias"], D.shape[0])
            if layer["residual"]:
                out = out + y
            y = out
        else:
            raise ValueError(layer["kind"])
    return y


def forward_torch(spec: Spec, x: torch.Tensor) -> torch.Tensor:
    """Evaluate the model on a float64 torch tensor x of shape (n, in)."""
    t = lambda a: torch.from_numpy(_f64(a))  # noqa: E731
    y = x.to(torch.float64)
    for layer in spec:
        if layer["kind"] == "linear":
            W = t(layer["weight"])
            y = y @ W.T + t(_opt(layer["bias"], W.shape[0]))
        elif layer["kind"] == "bilinear":
            L, R, D = t(layer["left"]), t(layer["right"]), t(layer["down"])
            h = L.shape[0]
            left = y @ L.T + t(_opt(layer["left_bias"], h))
            right = y @ R.T + t(_opt(layer["right_bias"], h))
            out = (left * right) @ D.T + t(_opt(layer["down_bias"], D.shape[0]))
            if layer["residual"]:
                out = out + y
            y = out
        else:
            raise ValueError(layer["kind"])
    return y


# ---------------------------------------------------------------------------
# 2. Padded coefficient tensors
# ---------------------------------------------------------------------------


def padded_linear(layer: Layer) -> np.ndarray:
    """W~ = [[1, 0], [b, W]] of shape (out+1, in+1)."""
    W = _f64(layer["weight"])
    out, inp = W.shape
    T = np.zeros((out + 1, inp + 1))
    T[0, 0] = 1.0
    T[1:, 0] = _opt(layer["bias"], out)
    T[1:, 1:] = W
    return T


def padded_bilinear(layer: Layer) -> np.ndarray:
    """B~ of shape (out+1, in+1, in+1), built entry by entry from the layer."""
    L, R, D = _f64(layer["left"]), _f64(layer["right"]), _f64(layer["down"])
    h, inp = L.shape
    out = D.shape[0]
    Lt = np.zeros((h, inp + 1))
    Lt[:, 0] = _opt(layer["left_bias"], h)
    Lt[:, 1:] = L
    Rt = np.zeros((h, inp + 1))
    Rt[:, 0] = _opt(layer["right_bias"], h)
    Rt[:, 1:] = R
    db = _opt(layer["down_bias"], out)
    B = np.zeros((out + 1, inp + 1, inp + 1))
    B[0, 0, 0] = 1.0  # constant output channel
    for o in range(1, out + 1):
        for i in range(inp + 1):
            for j in range(inp + 1):
                B[o, i, j] = sum(D[o - 1, u] * Lt[u, i] * Rt[u, j] for u in range(h))
        B[o, 0, 0] += db[o - 1]
    if layer["residual"]:
        assert inp == out, "residual needs in == out"
        for o in range(1, out + 1):
            B[o, o, 0] += 1.0  # x_o = x~_o * x~_0
    return B


def padded_layer(layer: Layer) -> np.ndarray:
    """Padded tensor of a single layer."""
    return padded_linear(layer) if layer["kind"] == "linear" else padded_bilinear(layer)


def compose_padded(S: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Padded tensor of ``S after T``: substitute T into every input axis of S.

    result[o, I_1, ..., I_m] = sum_{j_1..j_m} S[o, j_1..j_m] prod_a T[j_a, I_a]
    where m = S.ndim - 1 and each I_a is a block of T.ndim - 1 indices.
    """
    m = S.ndim - 1
    R = S
    for _ in range(m):
        # Contract the first not-yet-substituted input axis (always axis 1,
        # because tensordot moves T's input axes to the end), so the blocks
        # end up in order I_1, I_2, ..., I_m.
        R = np.tensordot(R, T, axes=([1], [0]))
    return R


def padded_tensor(spec: Spec) -> np.ndarray:
    """Padded coefficient tensor of the whole model (degree = product of degrees)."""
    T = padded_layer(spec[0])
    for layer in spec[1:]:
        T = compose_padded(padded_layer(layer), T)
    return T


def contract_padded(T: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Contract every input axis of T with x~ = [1; x]; x of shape (in,)."""
    xt = np.concatenate([[1.0], np.asarray(x, dtype=np.float64)])
    R = T
    while R.ndim > 1:
        R = R @ xt  # contracts the last axis
    return R


# ---------------------------------------------------------------------------
# 3./4. Symmetrize and lift
# ---------------------------------------------------------------------------


def symmetrize(T: np.ndarray) -> np.ndarray:
    """Average of T over all permutations of its input axes (axes 1..k)."""
    k = T.ndim - 1
    perms = list(itertools.permutations(range(1, k + 1)))
    acc = np.zeros_like(T, dtype=np.float64)
    for p in perms:
        acc += np.transpose(T, (0,) + p)
    return acc / len(perms)


def lift(T: np.ndarray, k: int) -> np.ndarray:
    """Raise T (k0 <= k input axes) to k input axes by tensoring with e0."""
    k0 = T.ndim - 1
    assert k0 <= k, (k0, k)
    n = T.shape[1] if k0 > 0 else None
    if k0 == 0:
        raise ValueError("cannot infer input width from a tensor with no input axes")
    e0 = np.zeros(n)
    e0[0] = 1.0
    R = np.asarray(T, dtype=np.float64)
    for _ in range(k - k0):
        R = np.multiply.outer(R, e0)
    return R


# ---------------------------------------------------------------------------
# 5. Matchings and Gaussian moment tensors
# ---------------------------------------------------------------------------


def perfect_matchings(items: Sequence[Any]) -> Iterator[list[tuple[Any, Any]]]:
    """All perfect matchings of ``items`` (lists of pairs); none if odd length."""
    items = list(items)
    if not items:
        yield []
        return
    if len(items) % 2:
        return
    first, rest = items[0], items[1:]
    for idx, partner in enumerate(rest):
        remaining = rest[:idx] + rest[idx + 1 :]
        for m in perfect_matchings(remaining):
            yield [(first, partner)] + m


def _partial_matchings_of(items: list[int]) -> Iterator[list[tuple[int, ...]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    # first is a singleton
    for m in _partial_matchings_of(rest):
        yield [(first,)] + m
    # first is paired with some later element
    for idx, partner in enumerate(rest):
        remaining = rest[:idx] + rest[idx + 1 :]
        for m in _partial_matchings_of(remaining):
            yield [(first, partner)] + m


def partial_matchings(n: int) -> Iterator[list[tuple[int, ...]]]:
    """All partial matchings of positions 0..n-1: lists of pairs (a, b) and singletons (a,)."""
    yield from _partial_matchings_of(list(range(n)))


def gaussian_moment_tensor(n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """M[i1..in] = E[x~_{i1} ... x~_{in}] for x ~ N(mean, cov), x~ = [1; x].

    Isserlis with means: sum over partial matchings of prod_pairs C~ times
    prod_singletons mu~, with mu~ = [1; mean], C~ = [[0, 0], [0, cov]].
    Each matching contributes an outer product placed on its positions.
    """
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    d = mean.shape[0]
    mu_t = np.concatenate([[1.0], mean])
    C_t = np.zeros((d + 1, d + 1))
    C_t[1:, 1:] = cov
    if n == 0:
        return np.ones(())
    letters = string.ascii_letters
    assert n <= len(letters)
    out_sub = letters[:n]
    M = np.zeros((d + 1,) * n)
    for matching in partial_matchings(n):
        subs, ops = [], []
        for block in matching:
            subs.append("".join(letters[p] for p in block))
            ops.append(C_t if len(block) == 2 else mu_t)
        M += np.einsum(",".join(subs) + "->" + out_sub, *ops)
    return M


def gaussian_moment_entry_slow(index: Sequence[int], mean: np.ndarray, cov: np.ndarray) -> float:
    """One moment E[x~_{i1} ... x~_{in}] by the same formula, entry by entry."""
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    mu_t = np.concatenate([[1.0], mean])
    C_t = np.zeros((len(mu_t), len(mu_t)))
    C_t[1:, 1:] = cov
    total = 0.0
    for matching in partial_matchings(len(index)):
        term = 1.0
        for block in matching:
            if len(block) == 2:
                term *= C_t[index[block[0]], index[block[1]]]
            else:
                term *= mu_t[index[block[0]]]
        total += term
    return total


# ---------------------------------------------------------------------------
# 6. Gaussian inner product, brute force
# ---------------------------------------------------------------------------


def _default_gaussian(d: int, mean: Any, cov: Any) -> tuple[np.ndarray, np.ndarray]:
    mean = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
    cov = np.eye(d) if cov is None else np.asarray(cov, dtype=np.float64)
    assert mean.shape == (d,) and cov.shape == (d, d)
    return mean, cov


def gaussian_inner_bruteforce(
    spec_a: Spec,
    spec_b: Spec,
    mean: np.ndarray | None = None,
    cov: np.ndarray | None = None,
    centered: bool = False,
) -> float:
    """E_{x ~ N(mean, cov)} [ sum_{o>=1} f_o(x) g_o(x) ] via explicit moment tensors.

    centered=True gives E[(f - Ef) . (g - Eg)] = E[f.g] - Ef . Eg.
    """
    din_a, dout_a = spec_in_out(spec_a)
    din_b, dout_b = spec_in_out(spec_b)
    assert din_a == din_b and dout_a == dout_b, "specs must have matching widths"
    d = din_a
    mean, cov = _default_gaussian(d, mean, cov)
    Ta, Tb = padded_tensor(spec_a), padded_tensor(spec_b)
    ka, kb = Ta.ndim - 1, Tb.ndim - 1
    N = d + 1
    A = Ta[1:].reshape(dout_a, N**ka)
    B = Tb[1:].reshape(dout_b, N**kb)
    M = gaussian_moment_tensor(ka + kb, mean, cov).reshape(N**ka, N**kb)
    value = 0.0
    for o in range(dout_a):
        value += float(A[o] @ M @ B[o])
    if centered:
        Ma = gaussian_moment_tensor(ka, mean, cov).reshape(N**ka)
        Mb = gaussian_moment_tensor(kb, mean, cov).reshape(N**kb)
        for o in range(dout_a):
            value -= float(A[o] @ Ma) * float(B[o] @ Mb)
    return value


# ---------------------------------------------------------------------------
# 7. Symmetric (Frobenius) inner product of padded tensors
# ---------------------------------------------------------------------------


def symmetric_inner_bruteforce(spec_a: Spec, spec_b: Spec, k: int | None = None) -> float:
    """<sym(lift(Ta, k)), sym(lift(Tb, k))> summed over output channels o >= 1."""
    Ta, Tb = padded_tensor(spec_a), padded_tensor(spec_b)
    assert Ta.shape[0] == Tb.shape[0] and Ta.shape[1] == Tb.shape[1]
    if k is None:
        k = max(Ta.ndim, Tb.ndim) - 1
    Sa = symmetrize(lift(Ta, k))
    Sb = symmetrize(lift(Tb, k))
    return float(np.sum(Sa[1:] * Sb[1:]))


# ---------------------------------------------------------------------------
# 8. Closed form for one bilinear layer
# ---------------------------------------------------------------------------


def padded_bilinear_factors(layer: Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded factors (L~, R~, D~) with B~[o,i,j] = sum_u D~[o,u] L~[u,i] R~[u,j].

    Hidden units (H = 1 + h + (in if residual)):
      * unit 0: constant, L~ row = e0, R~ row = e0, D~ column = [1; db];
      * units 1..h: L~ row = [lb_u, L_u], R~ row = [rb_u, R_u], D~ column = [0; D[:, u]];
      * residual units h+1..h+in (one per input i = 1..in): L~ row = e_i,
        R~ row = e_0, D~ column = e_i (i.e. x_i * 1 written to output i).
    Shapes: L~, R~ (H, in+1); D~ (out+1, H).
    """
    assert layer["kind"] == "bilinear"
    L, R, D = _f64(layer["left"]), _f64(layer["right"]), _f64(layer["down"])
    h, inp = L.shape
    out = D.shape[0]
    res = bool(layer["residual"])
    H = 1 + h + (inp if res else 0)
    Lt = np.zeros((H, inp + 1))
    Rt = np.zeros((H, inp + 1))
    Dt = np.zeros((out + 1, H))
    # constant unit
    Lt[0, 0] = 1.0
    Rt[0, 0] = 1.0
    Dt[0, 0] = 1.0
    Dt[1:, 0] = _opt(layer["down_bias"], out)
    # ordinary units
    Lt[1 : h + 1, 0] = _opt(layer["left_bias"], h)
    Lt[1 : h + 1, 1:] = L
    Rt[1 : h + 1, 0] = _opt(layer["right_bias"], h)
    Rt[1 : h + 1, 1:] = R
    Dt[1:, 1 : h + 1] = D
    # residual units
    if res:
        assert inp == out
        for i in range(1, inp + 1):
            u = h + i
            Lt[u, i] = 1.0
            Rt[u, 0] = 1.0
            Dt[i, u] = 1.0
    return Lt, Rt, Dt


def bilinear_core_inner(
    La: np.ndarray, Ra: np.ndarray, Da: np.ndarray, Lb: np.ndarray, Rb: np.ndarray, Db: np.ndarray
) -> float:
    """sum_{u,v} core[u,v] (Da^T Db)[u,v], core = 1/2 ((La Lb^T)(Ra Rb^T) + (La Rb^T)(Ra Lb^T)).

    Products inside core are elementwise.  Pass D~[1:] (constant channel
    dropped) to get the symmetric inner product over outputs o >= 1.
    """
    La, Ra, Da, Lb, Rb, Db = (np.asarray(a, dtype=np.float64) for a in (La, Ra, Da, Lb, Rb, Db))
    core = 0.5 * ((La @ Lb.T) * (Ra @ Rb.T) + (La @ Rb.T) * (Ra @ Lb.T))
    return float(np.sum(core * (Da.T @ Db)))


# ---------------------------------------------------------------------------
# 9. Monte Carlo
# ---------------------------------------------------------------------------


def monte_carlo_inner(
    spec_a: Spec,
    spec_b: Spec,
    n_samples: int,
    rng: np.random.Generator,
    mean: np.ndarray | None = None,
    cov: np.ndarray | None = None,
    chunk: int = 65536,
) -> tuple[float, float]:
    """Monte Carlo estimate of E[f(x) . g(x)] and its standard error."""
    d = spec_in_out(spec_a)[0]
    assert spec_in_out(spec_b)[0] == d
    mean, cov = _default_gaussian(d, mean, cov)
    # Works also for PSD-but-singular cov (eigh instead of Cholesky).
    w, V = np.linalg.eigh(cov)
    A = V * np.sqrt(np.clip(w, 0.0, None))
    total = 0.0
    total_sq = 0.0
    done = 0
    while done < n_samples:
        m = min(chunk, n_samples - done)
        x = mean + rng.standard_normal((m, d)) @ A.T
        prod = np.sum(forward_numpy(spec_a, x) * forward_numpy(spec_b, x), axis=1)
        total += float(prod.sum())
        total_sq += float((prod**2).sum())
        done += m
    n = n_samples
    est = total / n
    var = max(total_sq / n - est**2, 0.0) * n / max(n - 1, 1)
    return est, math.sqrt(var / n)


# ---------------------------------------------------------------------------
# 10. Exact sympy expansion and Gaussian integration
# ---------------------------------------------------------------------------


def _to_sympy(v: Any) -> sympy.Expr:
    """Exact sympy number from a weight entry (float -> shortest decimal rational)."""
    if isinstance(v, sympy.Basic):
        return v
    if isinstance(v, Fraction):
        return sympy.Rational(v.numerator, v.denominator)
    if isinstance(v, (int, np.integer)):
        return sympy.Integer(int(v))
    f = float(v)
    if f.is_integer():
        return sympy.Integer(int(f))
    # repr gives the shortest decimal that round-trips, e.g. 0.1 -> 1/10.
    return sympy.Rational(repr(f))


def _sym_matrix(a: Any) -> sympy.Matrix:
    a = np.asarray(a, dtype=object)
    if a.ndim == 1:
        return sympy.Matrix([_to_sympy(v) for v in a])
    return sympy.Matrix([[_to_sympy(v) for v in row] for row in a])


def _sym_vec(a: Any, n: int) -> sympy.Matrix:
    return sympy.zeros(n, 1) if a is None else _sym_matrix(a)


def sympy_polynomials(spec: Spec, symbols: Sequence[sympy.Symbol]) -> list[sympy.Expr]:
    """Exact expanded polynomial of each output, in the given input symbols."""
    y = sympy.Matrix(list(symbols))
    for layer in spec:
        if layer["kind"] == "linear":
            W = _sym_matrix(layer["weight"])
            y = W * y + _sym_vec(layer["bias"], W.rows)
        elif layer["kind"] == "bilinear":
            L, R, D = _sym_matrix(layer["left"]), _sym_matrix(layer["right"]), _sym_matrix(layer["down"])
            left = L * y + _sym_vec(layer["left_bias"], L.rows)
            right = R * y + _sym_vec(layer["right_bias"], R.rows)
            hid = sympy.Matrix([left[u] * right[u] for u in range(L.rows)])
            out = D * hid + _sym_vec(layer["down_bias"], D.rows)
            if layer["residual"]:
                out = out + y
            y = out
        else:
            raise ValueError(layer["kind"])
        y = y.applyfunc(sympy.expand)
    return [sympy.expand(e) for e in y]


def _gaussian_moment_1d(n: int) -> sympy.Integer:
    """E[x^n] for x ~ N(0, 1): (n-1)!! for even n, 0 for odd n."""
    if n % 2:
        return sympy.Integer(0)
    return sympy.factorial2(n - 1)  # factorial2(-1) == 1


def sympy_gaussian_inner(
    polys_a: Sequence[sympy.Expr], polys_b: Sequence[sympy.Expr], symbols: Sequence[sympy.Symbol]
) -> sympy.Expr:
    """Exact E_{x ~ N(0, I)} [ sum_o p_o(x) q_o(x) ]."""
    assert len(polys_a) == len(polys_b)
    total = sympy.Integer(0)
    for p, q in zip(polys_a, polys_b):
        poly = sympy.Poly(sympy.expand(p * q), *symbols)
        for monom, coeff in poly.terms():
            term = coeff
            for e in monom:
                term *= _gaussian_moment_1d(e)
            total += term
    return total
