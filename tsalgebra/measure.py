"""Input measures: the law of x over which a functional inner product averages.

A measure is a small frozen value.  It is validated once, when made; its
factorisations are computed once and cached on it; it labels the results
computed under it and draws samples from itself.  Algorithms read what they
need from it (padded moments, a factor, the law of one position) and say in
their ``supports`` which measures they take, so a new measure touches only
the algorithms that can use it.

:class:`Gaussian` is x ~ N(mean, cov), per feature.  A sequence model reads
``positions`` independent copies of one per-position law, laid out flat and
position-major (see :mod:`tsalgebra.attention`); :meth:`Gaussian.at` binds a
measure to a model's flat input width, tiling a per-position law over the
positions without forming the flat covariance.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Sequence

import numpy as np

from .arrays import is_torch, torch_to_numpy

__all__ = ["Measure", "Gaussian", "Tokens", "TOLERANCE", "block_diagonal", "sequence_measure", "support_note"]

# Relative tolerance of the checks on a covariance (symmetry, positive
# semi-definiteness): round-off below zero is accepted down to it.
TOLERANCE = 1e-10
# The rank cut of the factorisations (a covariance at a unit diagonal, the
# images of maps at unit rows): eigenvalues at most this fraction of the
# largest are round-off of a zero.  Measured: np.cov of half as many samples
# as features (d = 8 to 1,024, features of scales e^N(0, 1) and offsets 100)
# left its zero eigenvalues at 1.1e-16 to 3.8e-16 of the largest; the cut
# was TOLERANCE, which dropped a direction of eigenvalue 1e-12 that the
# models read with weight 1e6 (a cosine of -1 for 0.80, exact).
RANK_CUT = 2.0**-44
# A feature of a covariance whose standard deviation is below this fraction
# of the largest is float64 rounding of a zero, not a direction: the rank cut
# is relative to each feature's own variance above it (a constant feature in
# a covariance from np.cov had a variance of 5e-33 beside 1e-2; 2^-40 is
# 1e-12).  The maps' rows have no such floor: a residual channel scaled by
# 1e30 leaves the others 1e-30 of it, and they are directions.
ROUNDED_SCALE = 2.0**-40


# The most one-hot features (n_ctx * vocab) a token measure takes: one input
# of them is 128 MiB in float64, as is the (n_ctx, vocab) table of the token
# laws that the exact algorithms read; the smallest Monte Carlo batch holds
# 192 such inputs, and the planners loop over positions in Python.  Beyond
# it nothing could run, and planning what would be refused took minutes
# (n_ctx = 3e6 at a vocabulary of 32: over 2 minutes, no output).
MAX_TOKEN_FEATURES = 2**24
# The largest exact count of token sequences formed, in decimal digits (a
# 33,000-bit integer: microseconds; 10^(3e6) took seconds, 10^(1.4e7) minutes).
MAX_EXACT_DIGITS = 10_000


def format_bytes(n: float) -> str:
    """A size in bytes as text: 768 MB, 1.2 TB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


def format_power(log10: float) -> str:
    """A count known by its log10, as text: "about 3.27e+150" in float range,
    "about 10^150515" beyond it."""
    if abs(log10) < 300:
        return f"about {10 ** log10:.3g}"
    return f"about 10^{math.floor(log10)}"


class Measure:
    """The law of a model's input.  Subclasses are frozen values with a
    ``label`` for results, :meth:`at` to bind them to an input width and
    :meth:`sample` to draw inputs."""

    label: str = "measure"

    def at(self, width: int, positions: int = 1) -> "Measure":
        """This measure on inputs of ``width`` features made of ``positions``
        positions (raises ValueError naming the mismatch)."""
        raise NotImplementedError

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` inputs drawn from the measure, shape (n, width)."""
        raise NotImplementedError


def _as_numbers(value: Any, what: str, rank: int | tuple[int, ...], expected: str | None = None) -> np.ndarray:
    """A float64 array, or an object array of exact numbers (Fractions, sympy
    rationals), of the given rank (or one of the given ranks); ValueError/
    TypeError naming ``what`` and the shape ``expected`` (by default a vector
    or a square matrix)."""
    ranks = rank if isinstance(rank, tuple) else (rank,)
    expected = expected or ("a vector" if ranks == (1,) else "a square matrix")
    if is_torch(value):
        value = torch_to_numpy(value)
    try:
        arr = np.asarray(value)
    except ValueError:  # nested lists of unequal lengths: numpy's message names no argument
        raise ValueError(f"{what} is ragged (its rows differ in length); expected {expected}") from None
    if arr.dtype == object:
        for x in arr.ravel():
            if isinstance(x, bool) or not isinstance(x, numbers.Number) and not _is_sympy_number(x):
                raise TypeError(f"{what} holds {type(x).__name__} entries; expected real numbers")
            # sympy's 3/0 is zoo (complex infinity), 0/0 nan: in words, not sympy's names
            if _is_sympy_number(x) and (x.has(*_sympy_unbounded()) or x.is_finite is False):
                raise ValueError(f"{what} holds an infinite or undefined entry (a division by zero?)")
            if isinstance(x, complex) or _is_sympy_number(x) and x.is_extended_real is False:
                raise TypeError(f"{what} holds a complex entry ({x}); expected real numbers")
        if all(isinstance(x, (float, np.floating)) for x in arr.ravel()):
            arr = arr.astype(np.float64)
    elif np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64)
    else:
        raise TypeError(f"{what} has dtype {arr.dtype}; expected real numbers")
    if arr.ndim not in ranks:
        raise ValueError(f"{what} has shape {arr.shape}; expected {expected}")
    finite = np.isfinite(arr).all() if arr.dtype != object else all(
        np.isfinite(float(x)) for x in arr.ravel() if isinstance(x, (float, np.floating)))
    if not finite:
        raise ValueError(f"{what} contains NaN or Inf")
    return arr


def _precision(value: Any) -> tuple[str, float]:
    """The dtype of the floats ``value`` holds and its machine epsilon
    (float64's for anything else: lists, integers, exact numbers)."""
    if is_torch(value) and value.is_floating_point():
        import torch

        return str(value.dtype).replace("torch.", ""), float(torch.finfo(value.dtype).eps)
    kind = getattr(value, "dtype", None)
    if kind is not None and not is_torch(value) and np.issubdtype(kind, np.floating):
        return str(kind), float(np.finfo(kind).eps)
    return "float64", float(np.finfo(float).eps)


def _is_sympy_number(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "sympy" and bool(getattr(x, "is_number", False))


def _sympy_unbounded() -> tuple[Any, ...]:
    import sympy

    return (sympy.zoo, sympy.oo, -sympy.oo, sympy.nan)


def _ldl(C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C = F diag(w) F^T in exact arithmetic (object arrays), zero pivots
    dropped; ValueError when C is not positive semi-definite."""
    A = C.copy()
    cols, ws = [], []
    for k in range(A.shape[0]):
        pivot = A[k, k]
        if pivot < 0 or pivot == 0 and any(A[i, k] != 0 for i in range(A.shape[0])):
            raise ValueError("cov is not positive semi-definite")
        if pivot == 0:
            continue
        col = A[:, k] / pivot
        cols.append(col)
        ws.append(pivot)
        A = A - pivot * np.outer(col, col)
    F = np.array(cols, dtype=object).T.reshape(C.shape[0], len(cols))
    return F, np.array(ws, dtype=object)


def block_diagonal(F: np.ndarray, n: int) -> np.ndarray:
    """kron(I_n, F): ``n`` copies of F down the diagonal (any dtype)."""
    if n == 1:
        return F
    out = np.zeros((n * F.shape[0], n * F.shape[1]), dtype=F.dtype)
    if F.dtype == object:
        out[...] = 0
    for p in range(n):
        out[p * F.shape[0] : (p + 1) * F.shape[0], p * F.shape[1] : (p + 1) * F.shape[1]] = F
    return out


@dataclass(frozen=True, eq=False)
class Gaussian(Measure):
    """x ~ N(mean, cov): ``mean`` of shape (d,), ``cov`` (d, d), either None
    for zero mean / identity covariance (then ``Gaussian()`` fits any width).

    ``positions``: the number of independent copies of this law that make up
    one input (a sequence model's positions), tiled without forming the flat
    covariance; ``dim``: features per copy (read from mean/cov, or fixed by
    :meth:`at` for N(0, I)).  Arrays may be floats, or exact numbers (object
    arrays of Fractions) for exact computations.  Validated when made: shapes,
    finiteness, symmetry and positive semi-definiteness (tolerance
    :data:`TOLERANCE` relative to the largest entry).
    """

    mean: Any = None
    cov: Any = None
    positions: int = 1
    dim: int | None = None

    def __post_init__(self) -> None:
        mean = None if self.mean is None else _as_numbers(self.mean, "mean", 1)
        cov = None if self.cov is None else _as_numbers(self.cov, "cov", 2)
        if cov is not None and cov.shape[0] != cov.shape[1]:
            raise ValueError(f"cov has shape {cov.shape}; expected a square matrix")
        dims = {x.shape[0] for x in (mean, cov) if x is not None} | ({self.dim} if self.dim is not None else set())
        if len(dims) > 1:
            raise ValueError(f"mean and cov disagree on the width: {sorted(dims)}")
        if self.positions < 1:
            raise ValueError(f"positions must be positive, got {self.positions}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)
        object.__setattr__(self, "dim", dims.pop() if dims else None)
        if cov is not None:
            if cov.dtype == object:
                if not (cov == cov.T).all():
                    raise ValueError("cov is not symmetric")
                self.decomposition  # noqa: B018 - raises when not positive semi-definite
            else:
                scale = max(1.0, float(np.abs(cov).max()))
                if not np.allclose(cov, cov.T, rtol=0, atol=TOLERANCE * scale):
                    raise ValueError("cov is not symmetric")
                if self._spectrum[0].min(initial=0.0) < -TOLERANCE * scale:
                    raise ValueError("cov is not positive semi-definite")

    # ----------------------------------------------------------- facts
    @property
    def standard(self) -> bool:
        """True for N(0, I) as given (no mean, no covariance)."""
        return self.mean is None and self.cov is None

    @property
    def label(self) -> str:  # type: ignore[override]
        return "N(0, I)" if self.standard else "N(mean, cov)"

    @property
    def exact(self) -> bool:
        """True when mean or cov holds exact numbers."""
        return any(x is not None and x.dtype == object for x in (self.mean, self.cov))

    @property
    def diagonal(self) -> bool:
        """True when the covariance is diagonal (pairs join without a factor)."""
        if self.cov is None:
            return True
        off = self.cov.copy()
        np.fill_diagonal(off, 0)
        return not off.any()

    @property
    def variances(self) -> np.ndarray:
        """The per-position diagonal of the covariance (ones for none), its
        round-off below 0 (which the validation accepts) taken as 0: a
        diagonal of -1e-12 made the factor NaN."""
        if self.cov is None:
            return np.ones(self.dim or 0, dtype=int)
        diag = np.diag(self.cov)
        return diag if diag.dtype == object else np.clip(diag.astype(float), 0.0, None)

    @property
    def width(self) -> int:
        """Features of one whole input (dim x positions)."""
        if self.dim is None:
            raise ValueError("N(0, I) has no width until it is bound to a model (Gaussian.at)")
        return self.dim * self.positions

    @cached_property
    def _spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues, eigenvectors) of the per-position covariance (float)."""
        C = np.eye(self.dim or 0) if self.cov is None else self.cov.astype(float)
        return np.linalg.eigh((C + C.T) / 2)

    @cached_property
    def _scaled_spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        """(eigenvalues, D U) of the per-position covariance taken to a unit
        diagonal first, cov = D C' D with C' = U diag(eigenvalues) U^T: the
        rank cut is then relative to each feature's own variance, not to
        the largest (a feature of variance 1e-10 beside one of 1, read
        through weights 1e5, was dropped: a cosine of 1 for 0.82, exact)."""
        C = np.eye(self.dim or 0) if self.cov is None else self.cov.astype(float)
        sd = np.sqrt(np.clip(np.diag(C), 0.0, None))
        live = sd > ROUNDED_SCALE * sd.max(initial=0.0)  # below: a constant feature's rounding (np.cov's 5e-33)
        scale = np.where(live, sd, 1.0)
        unit = (C + C.T) / 2 / np.outer(scale, scale) * np.outer(live, live)
        vals, vecs = np.linalg.eigh(unit)
        return vals, vecs * scale[:, None]

    @cached_property
    def _kept(self) -> np.ndarray:
        vals = self._scaled_spectrum[0]
        return vals > RANK_CUT * max(float(vals.max(initial=0.0)), 1e-300)

    @property
    def rank(self) -> int:
        """Independent normal variables behind one whole input."""
        if self.cov is None:
            return self.width
        if self.diagonal:
            return self.positions * int(np.count_nonzero(self.variances))
        return self.positions * int(self._kept.sum())

    # ----------------------------------------------------------- binding
    def at(self, width: int, positions: int = 1) -> "Gaussian":
        """This measure on a model's flat input of ``width`` features made of
        ``positions`` positions: a per-position law (of width / positions
        features) is tiled over them; a law of the whole width is kept."""
        if self.dim is None:
            per = width // positions if positions > 1 and width % positions == 0 else width
            return _standard(per, width // per)
        if self.width == width:
            return self
        if self.positions == 1 and positions > 1 and self.dim * positions == width:
            return Gaussian(self.mean, self.cov, positions=positions)
        per = f" or ({width // positions},) per position" if positions > 1 else ""
        which = ("mean", self.mean) if self.mean is not None else ("cov", self.cov)
        expect = f"({width},)" if which[0] == "mean" else f"({width}, {width})"
        raise ValueError(f"{which[0]} has shape {which[1].shape}, expected {expect}{per} for input width {width}")

    def per_position(self, positions: int) -> "Gaussian | None":
        """The law of one of ``positions`` positions when they are independent
        and identically distributed under this measure, else None."""
        if self.positions == positions:
            if positions == 1:
                return self
            return _standard(self.dim, 1) if self.standard else Gaussian(self.mean, self.cov)  # type: ignore[arg-type]
        if self.positions != 1 or self.width % positions:
            return None
        d = self.width // positions
        if self.standard:
            return _standard(d, 1)
        m = np.zeros(self.width) if self.mean is None else self.mean
        C = np.eye(self.width) if self.cov is None else self.cov
        m0, C0 = m[:d], C[:d, :d]
        if not (np.array_equal(m, np.tile(m0, positions)) and np.array_equal(C, np.kron(np.eye(positions), C0))):
            return None
        return Gaussian(m0, C0)

    # ----------------------------------------------------------- arrays
    def block_mean(self, exact: bool = False) -> np.ndarray:
        """The per-position mean (zeros when none was given)."""
        m = np.zeros(self.dim or 0, dtype=int) if self.mean is None else self.mean  # int: exact zeros
        return m.astype(object) if exact else m.astype(float)

    def padded_mean(self, exact: bool = False) -> np.ndarray:
        """[1; mean] over the whole input (width + 1,)."""
        m = np.tile(self.block_mean(exact), self.positions)
        return np.concatenate([np.array([1], dtype=m.dtype), m])

    def padded_cov(self, exact: bool = False) -> np.ndarray:
        """[[0, 0], [0, cov]] over the whole input, (width + 1, width + 1)."""
        C = np.eye(self.dim or 0, dtype=int) if self.cov is None else self.cov
        C = block_diagonal(C.astype(object) if exact else C.astype(float), self.positions)
        out = np.zeros((self.width + 1, self.width + 1), dtype=object if exact else float)
        if exact:
            out[...] = 0
        out[1:, 1:] = C
        return out

    @cached_property
    def decomposition(self) -> tuple[np.ndarray, np.ndarray]:
        """(F, w) with the per-position cov = F diag(w) F^T: the eigenvectors
        and eigenvalues of the covariance at a unit diagonal, scaled back,
        for floats (F orthonormal where the variances are equal), an exact
        LDL^T for exact numbers; zero directions dropped."""
        if self.cov is not None and self.cov.dtype == object:
            return _ldl(self.cov)
        if self.cov is not None and self.diagonal:  # exact as given: no rounding to cut (a variance of 1e-26 is one)
            live = np.flatnonzero(self.variances)
            F = np.zeros((self.dim, live.size))
            F[live, np.arange(live.size)] = 1.0
            return F, self.variances[live]
        vals, vecs = self._scaled_spectrum
        return vecs[:, self._kept], vals[self._kept]

    def factor(self) -> np.ndarray:
        """F (width, rank) with cov = F F^T over the whole input (float)."""
        if self.cov is None:
            return np.eye(self.width)
        F, w = self.decomposition
        return block_diagonal(F.astype(float) * np.sqrt(w.astype(float)), self.positions)

    def whitening(self) -> np.ndarray:
        """P (width + 1, rank + 1) with x~ = P z~ for z ~ N(0, I_rank): the
        padded input as a padded map of independent standard normals."""
        F = self.factor()
        P = np.zeros((self.width + 1, F.shape[1] + 1))
        P[0, 0] = 1.0
        P[1:, 0] = self.padded_mean()[1:]
        P[1:, 1:] = F
        return P

    def images(self, maps: list[np.ndarray]) -> list[np.ndarray]:
        """The law pushed through padded affine maps W~ (each (out + 1, width
        + 1), row 0 = [1, 0, ...]): padded maps T_k with W~_k x~ = T_k u~ for
        u ~ N(0, I_r), one u for all maps, r the rank of their joint image
        (at most the sum of their output widths, whatever this law's rank).
        So an embedding from a large vocabulary leaves r <= d_model."""
        # each image over the whitened input, (out + 1, rank + 1): N(0, I) is
        # already white (no product with an identity of the input's width)
        images = [W.astype(float) if self.standard else W.astype(float) @ self.whitening() for W in maps]
        J = np.concatenate([T[1:, 1:] for T in images])
        # Each row taken to unit norm first, J = D J', so that the rank cut is
        # relative to each row, not to the largest: a residual channel scaled
        # by 1e5 (its readers by 1e-5, the same function) put every other
        # direction below TOLERANCE of it, and similarities changed sign.
        norms = np.sqrt(np.einsum("ij,ij->i", J, J))
        rows = np.where(norms > 0, norms, 1.0)[:, None]
        unit = J / rows
        vals, vecs = np.linalg.eigh(unit @ unit.T)  # J' = U sqrt(lam) V^T: keep D U sqrt(lam), drop V (orthonormal)
        keep = vals > RANK_CUT * max(float(vals.max(initial=0.0)), 1e-300)
        B = rows * vecs[:, keep] * np.sqrt(vals[keep])
        out, row = [], 0
        for T in images:
            k = T.shape[0] - 1
            U = np.zeros((k + 1, B.shape[1] + 1))
            U[0, 0], U[1:, 0], U[1:, 1:] = 1.0, T[1:, 0], B[row : row + k]
            out.append(U)
            row += k
        return out

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Position by position through the per-position factor (never a
        product with the whole input's block-diagonal factor)."""
        z = rng.normal(size=(n * self.positions, self.dim if self.cov is None else len(self.decomposition[1])))
        if self.cov is not None:
            F, w = self.decomposition
            z = z @ (F.astype(float) * np.sqrt(w.astype(float))).T
        return z.reshape(n, self.width) + self.padded_mean()[1:]

    def __repr__(self) -> str:
        parts = [self.label]
        if self.dim is not None:
            parts.append(f"{self.dim} features")
        if self.positions > 1:
            parts.append(f"x {self.positions} positions")
        return f"Gaussian({', '.join(parts)})"


@lru_cache(maxsize=32)
def _standard(dim: int, positions: int) -> Gaussian:
    """N(0, I) at one shape: one value per shape, so what is cached on it
    (its joins, its factor) serves every call."""
    return Gaussian(positions=positions, dim=dim)


def sequence_measure(mean: Any, cov: Any, n_ctx: int, d: int) -> tuple[Any, Any]:
    """A per-feature mean (d,) and covariance (d, d) as the flat arrays of
    ``n_ctx`` independent positions (arrays already of the flat width, and
    None, pass through).  The algorithms never need this: :meth:`Gaussian.at`
    tiles without forming the flat covariance."""
    law = Gaussian(mean, cov)
    if law.dim != d or n_ctx == 1:
        return mean, cov
    law = law.at(n_ctx * d, n_ctx)
    return (None if mean is None else law.padded_mean()[1:]), (None if cov is None else law.padded_cov()[1:, 1:])


@dataclass(frozen=True, eq=False)
class Tokens(Measure):
    """``n_ctx`` independent tokens from a vocabulary of ``vocab``, each fed as
    a one-hot vector: a sequence model reads one per position, a flat model
    (the grokking layer) ``n_ctx`` one-hot blocks of width ``vocab``
    concatenated.  Uniform unless ``probs`` gives one distribution (vocab,)
    for every token, or one per token (n_ctx, vocab), each summing to 1 to
    the precision of its dtype (float laws are renormalised in float64).
    ``n_ctx`` None: read from the model it is bound to (its input width over
    ``vocab``).

    The expectation over all vocab^n_ctx sequences is exact and never
    enumerated where an algorithm contracts with the measure's diagonal
    moments: every leg of a network at one position carries that position's
    token index."""

    vocab: int
    n_ctx: int | None = None
    probs: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.vocab, bool) or not isinstance(self.vocab, (int, np.integer)) or self.vocab < 1:
            raise ValueError(f"vocab must be a positive integer, got {self.vocab!r}")
        object.__setattr__(self, "vocab", int(self.vocab))
        if self.n_ctx is not None:
            if isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, (int, np.integer)) or self.n_ctx < 1:
                raise ValueError(f"n_ctx must be a positive integer, got {self.n_ctx!r}")
            object.__setattr__(self, "n_ctx", int(self.n_ctx))
        if self.probs is not None:
            shapes = f"one distribution ({self.vocab},) or one per token (n_ctx, {self.vocab})"
            p = _as_numbers(self.probs, "probs", (1, 2), shapes)
            if p.shape[-1] != self.vocab:
                raise ValueError(f"probs has shape {p.shape}; its last axis must be the vocabulary ({self.vocab})")
            if p.ndim == 2:
                if p.shape[0] == 0:
                    raise ValueError("probs gives no distribution (shape (0, vocab))")
                if self.n_ctx is not None and p.shape[0] != self.n_ctx:
                    raise ValueError(f"probs gives {p.shape[0]} distributions for n_ctx={self.n_ctx} tokens")
                object.__setattr__(self, "n_ctx", p.shape[0])
            values = p.astype(float)
            if (values < 0).any():
                raise ValueError("probs has negative entries")
            # Frequencies in single precision (torch's default) sum to 1 only
            # to that precision: the bound follows the dtype given, and float
            # laws are renormalised in float64, so that every algorithm sums
            # a law of mass 1 (an enumeration would otherwise see mass^n_ctx).
            if p.dtype == object:  # exact numbers: exactly 1, or the answer is labelled exact for mass != 1
                exact_sums = [sum(row) for row in p.reshape(-1, self.vocab)]
                if any(total != 1 for total in exact_sums):
                    raise ValueError(f"exact probs must sum to exactly 1 over the vocabulary; sums "
                                     f"{[str(total) for total in exact_sums]}")
            else:
                dtype, eps = _precision(self.probs)
                bound = max(1e-9, 8 * math.sqrt(self.vocab) * eps)
                sums = values.sum(axis=-1)
                if not np.allclose(sums, 1.0, rtol=0, atol=bound):
                    raise ValueError(f"probs must sum to 1 over the vocabulary (to {bound:.1g} for {dtype}; "
                                     f"sums {sums})")
                p = p / sums[..., None]
            object.__setattr__(self, "probs", p)
        if self.n_ctx is not None and self.n_ctx * self.vocab > MAX_TOKEN_FEATURES:
            raise ValueError(f"n_ctx={self.n_ctx}: {self.n_ctx:,} tokens of a vocabulary of {self.vocab:,} are "
                             f"{self.n_ctx * self.vocab:,} one-hot features, more than the {MAX_TOKEN_FEATURES:,} the "
                             f"token measure takes (one input alone would be {format_bytes(8 * self.n_ctx * self.vocab)}"
                             f", as would the per-position token laws: no algorithm here could use it); a context of "
                             f"at most {max(MAX_TOKEN_FEATURES // self.vocab, 1):,} tokens at this vocabulary"
                             if self.vocab <= MAX_TOKEN_FEATURES else
                             f"vocab={self.vocab}: more one-hot features than the {MAX_TOKEN_FEATURES:,} the token "
                             "measure takes (one token's input alone would be "
                             f"{format_bytes(8 * self.vocab)}: no algorithm here could use it)")

    @property
    def label(self) -> str:  # type: ignore[override]
        n = f" x {self.n_ctx}" if self.n_ctx else ""
        return f"tokens({self.vocab}{n}, {'uniform' if self.probs is None else 'given frequencies'})"

    @property
    def exact(self) -> bool:
        return self.probs is not None and self.probs.dtype == object

    @property
    def width(self) -> int:
        if self.n_ctx is None:
            raise ValueError(f"{self.label}: n_ctx is unknown until the measure is bound to a model (Tokens.at)")
        return self.n_ctx * self.vocab

    def at(self, width: int, positions: int = 1) -> "Tokens":
        """This measure on a model reading ``width`` features: n_ctx one-hot
        blocks of width ``vocab`` (a sequence model of ``positions``
        positions reads one block per position)."""
        if width % self.vocab:
            raise ValueError(f"the model reads {width} features, not a whole number of one-hot tokens of a "
                             f"vocabulary of {self.vocab}")
        n = width // self.vocab
        if self.n_ctx is not None and self.n_ctx != n:
            raise ValueError(f"{self.label}: the model reads {n} tokens of {self.vocab} ({width} features)")
        if positions > 1 and n != positions:
            raise ValueError(f"{self.label}: the model reads {positions} positions of {width // positions} features, "
                             f"not one token of {self.vocab} each")
        return self if self.n_ctx == n else Tokens(self.vocab, n, self.probs)

    def token_probs(self, exact: bool = False) -> np.ndarray:
        """(n_ctx, vocab): the distribution of each token."""
        n = self.n_ctx or 1
        if self.probs is None:
            from fractions import Fraction

            return np.full((n, self.vocab), Fraction(1, self.vocab), dtype=object) if exact else \
                np.full((n, self.vocab), 1 / self.vocab)
        p = self.probs if self.probs.ndim == 2 else np.tile(self.probs, (n, 1))
        return p.astype(object) if exact else p.astype(float)

    def support_sizes(self) -> list[tuple[int, int]]:
        """(tokens of nonzero probability, positions with that many) for
        each distinct count: a uniform or shared law is one pair, read
        without forming the (n_ctx, vocab) table of :meth:`token_probs`."""
        n = self.n_ctx or 1
        if self.probs is None:
            return [(self.vocab, n)]
        nonzero = np.count_nonzero(np.asarray(self.probs, dtype=float) != 0, axis=-1)
        if self.probs.ndim == 1:
            return [(int(nonzero), n)]
        sizes, counts = np.unique(nonzero, return_counts=True)
        return [(int(k), int(m)) for k, m in zip(sizes, counts)]

    @property
    def log10_sequences(self) -> float:
        """log10 of :attr:`sequences`, for any n_ctx (in constant time for a
        uniform or shared law): what a planner compares with its limits."""
        sizes = self.support_sizes()
        if any(k == 0 for k, _ in sizes):  # a position of no token at all (probs rows are checked to sum to 1)
            return -math.inf
        return sum(m * math.log10(k) for k, m in sizes)

    @property
    def log10_rarest(self) -> float:
        """log10 of the smallest nonzero probability of a whole sequence (the
        product of each token's rarest possible value), in constant time for
        a uniform or shared law: what bounds how heavy a sampled product's
        tails can be (a value carried by that one sequence alone)."""
        n = self.n_ctx or 1
        if self.probs is None:
            return -n * math.log10(self.vocab)
        p = np.asarray(self.probs, dtype=float)
        rarest = np.min(np.where(p > 0, p, np.inf), axis=-1)
        return n * math.log10(float(rarest)) if p.ndim == 1 else float(np.sum(np.log10(rarest)))

    @property
    def sequences(self) -> int:
        """The number of token sequences of nonzero probability, exactly, up
        to 10**MAX_EXACT_DIGITS (ValueError beyond: an exact vocab**n_ctx at
        n_ctx = 3e6 took minutes to form; :attr:`log10_sequences` is the
        magnitude of any count)."""
        digits = self.log10_sequences
        if digits > MAX_EXACT_DIGITS:
            raise ValueError(f"{self.label} has {format_power(digits)} token sequences, too many to count exactly "
                             "(log10_sequences gives the magnitude)")
        return math.prod(k ** m for k, m in self.support_sizes())

    def padded_mean(self, exact: bool = False) -> np.ndarray:
        """[1; E x] = [1; p_1; ...; p_n]: the one-hot vectors' mean."""
        p = self.token_probs(exact).reshape(-1)
        return np.concatenate([np.array([1], dtype=p.dtype), p])

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        p = self.token_probs()
        out = np.zeros((n, self.width))
        for k, row in enumerate(p):
            t = rng.choice(self.vocab, size=n, p=row)
            out[np.arange(n), k * self.vocab + t] = 1.0
        return out

    def __repr__(self) -> str:
        return f"Tokens({self.label})"


def support_note(law: Measure | None, width: int, names: Sequence[str] | None = None) -> str | None:
    """Where the measure does not reach every input: a note that the verdict
    holds on its support only, naming it (the covariance's rank, the tokens
    of probability 0), else None.  ``names``: the inputs' (default x1, x2, ...)."""
    names = names if names is not None else [f"x{k + 1}" for k in range(width)]
    if isinstance(law, Gaussian) and law.cov is not None:
        d = law.dim or law.cov.shape[0]
        r = len(law.decomposition[1])
        if r < d:
            per = " per position" if law.positions > 1 or (width and width > d) else ""
            return (f"the verdict holds on the measure's support only: cov has rank {r} of {d}{per}, so the inputs "
                    f"lie on an affine subspace of dimension {r}{per}, where the two models are compared; "
                    "off it they may differ")
        return None
    if isinstance(law, Tokens) and law.probs is not None:
        p = np.asarray(law.probs)
        n = law.n_ctx or max(width // law.vocab, 1)
        rows = p.reshape(-1, law.vocab) if p.ndim == 2 else np.tile(p.reshape(1, -1), (n, 1))
        zero = [(pos, t) for pos, row in enumerate(rows) for t, v in enumerate(row) if v == 0]
        if not zero:
            return None
        inputs = [names[pos * law.vocab + t] if pos * law.vocab + t < len(names) else f"x{pos * law.vocab + t + 1}"
                  for pos, t in zero]
        if p.ndim == 1:
            ids = sorted({t for _, t in zero})
            which = f"token{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids[:8]))}{' ...' if len(ids) > 8 else ''}"
            said = f"{which} (ids from 0) of probability 0 at every position"
        else:
            said = ", ".join(f"token {t} at position {pos}" for pos, t in zero[:8]) + (" ..." if len(zero) > 8 else "")
            said += " (ids from 0) of probability 0"
        shown = ", ".join(inputs[:8]) + (" ..." if len(inputs) > 8 else "")
        return (f"the verdict holds on the measure's support only: {said} (inputs {shown} never 1), so only "
                "sequences of the other tokens are compared; on the others the two models may differ")
    return None
