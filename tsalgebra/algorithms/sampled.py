"""Monte Carlo: an unbiased estimator of the functional inner products, for every model and measure.

Inputs are drawn from the measure (seeded), in batches of bounded memory,
and both models run forward on them (:class:`~tsalgebra.node_sums.Forward`:
layer by layer for layered models, on numpy or, with ``device=``, torch).
One set of samples gives the three products <a, b>, <a, a>, <b, b> jointly:
each is the sample mean of its per-sample product (unbiased), with the
standard error sd / sqrt(n); their 3 x 3 covariance gives the cosine's
standard error by the delta method (:class:`Estimate`).

Centred products are the unbiased sample covariance, accumulated about the
means of an independent pilot batch (numerically stable, still unbiased:
the pilot's values only shift the origin).

Control variate: where the models have nonlinear layers after their first
one, the models truncated after it (the deeper nonlinear layers dropped,
the linear ones kept) have exactly computable products; the estimator
subtracts beta (c - E c), per product and channel, and reports the variance
it saved.  Each batch's beta is fitted on the samples before it (the pilot,
then every batch so far), and used only where the betas fitted so far did
better than none on samples they had not seen (the pilot's halves, each
fitted on the other, then every batch): every choice depends on earlier
samples only, so the estimate stays unbiased, and a beta that a few large
samples threw off (heavy tails) is dropped instead of multiplying the
variance.

Heavy tails: the standard error is the sample variance over n, and the
sample variance is itself an estimate, with a relative standard error of
sqrt((kurtosis - 1) / n) (kurtosis m4 / m2^2 of a product's per-sample
values: the error of the error bar).  The estimate is flagged
(:attr:`Estimate.heavy_tailed`) where that exceeds
:data:`HEAVY_TAIL_VARIANCE_ERROR` for any of the three products, from
running sums of the third and fourth powers beside the existing ones.  The
old test, one sample's share of the spread over 5 %, was on for nearly every
Gaussian estimate (all 200 seeds of one bilinear layer at 2,000 samples,
whose intervals covered the exact cosine 96.5 % of the time): products of
Gaussian polynomials keep a large largest share long after the error bar
is sound.  The threshold's measurement is at the constant.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from functools import reduce
from typing import Any

import numpy as np

from ..components import PositionWise, Sequential
from ..measure import Gaussian, Tokens, format_power
from ..node_sums import Forward
from ..problem import Alternative, CostError, InnerProblem, InnerResult, Plan, format_count, rounded_up
from ..progress import advancer
from .registry import Algorithm, Triple

__all__ = ["Estimate", "Sampled", "DEFAULT_SAMPLES"]

DEFAULT_SAMPLES = 10_000
PILOT = 512  # samples of the pilot batch (control-variate coefficients, centring origin), not averaged
_REACH_ROOM = 1.25  # the relative error a refusal offers "within this budget": 25 % above the drawn spread's
PILOT_FOLDS = 8  # the pilot's folds that judge the control variate, each by the fit of the others
BATCH_BYTES = 64 * 2**20  # a batch's inputs and outputs together: the default batch, kept where it fits the bound
MAX_BATCH = 4096  # the default batch at most
# The smallest batch a memory bound shrinks the batches to (the pilot is then
# drawn in pieces of it); below it a plan is refused for memory.  Each batch
# costs about 0.4 ms (one bilinear layer) to 2.5 ms (tiny_lm, two attention
# layers) besides its samples, on 2 CPU cores: at 64 a sample took 7.8 and
# 76 us where the default batches took 3-8 and 40 us; at 16, 26 and 161 us.
MIN_BATCH = 64
# The peak's count per sample (arrays of the per-sample widths held at once),
# checked against tracemalloc (tests/test_memory_bound2.py): the measure's draw
# and its mapped copy; both models' outputs, their shifted copies, the four
# products and their stack (the control's outputs in their place); the
# per-sample product arrays (4 x channels) of the stream's sums, twice that
# beside the control variate's fit.
INPUT_COPIES = 3
OUTPUT_COPIES = 12
PRODUCT_COPIES = 4
Z95 = 1.959963984540054  # the normal quantile of a 95 % interval
# The error of the error bar (the relative standard error of a product's
# sample variance, sqrt((kurtosis - 1) / n)) above which an estimate is
# flagged heavy-tailed.  Measured on 11 pairs with exact values, 200 seeds
# each at 500, 2,000 and 10,000 samples (the 95 % intervals of the cosine
# and of each product against the exact values, and the flag rate): one
# bilinear layer (four pairs, widths 3-10) and a two-layer attention model
# under the token measure cover 89-96 % and are flagged in 0-1 % of seeds
# from 2,000 samples on (0-10 % at 500; the old test: 94-100 % of the
# Gaussian ones); depth-3 residual bilinear stacks, whose products'
# intervals cover 36-65 % (the cosine's 65-87 %), are flagged in 86-96 %,
# and a two-layer attention model whose products' intervals cover 0-1 % in
# 93-96 %.  Between them, depth-2 stacks and one attention layer (products
# covered 78-91 %) are flagged in 6-80 %, fewer with more samples as their
# kurtosis is outgrown.  At 0.5 the light pairs were flagged in up to 24 %
# at 500 samples; at 0.7 the depth-3 stacks in only 71 % at 10,000.
HEAVY_TAIL_VARIANCE_ERROR = 0.6
# The samples can only check tails they reach.  Under a Gaussian a per-sample
# product of degree k has kurtosis at most 9^k (hypercontractivity:
# ||p||_4 <= 3^(k/2) ||p||_2), so its variance error is at most
# sqrt((9^k - 1) / n) whatever the samples show; where that ceiling is over
# TAIL_CEILING the sample kurtosis cannot vouch for the error bar: the
# exact kurtoses of bilinear stacks (Gauss-Hermite quadrature of s^4) are
# 90-250 at depth 1 (degree-4 products), 2e4-7e4 at depth 2 and 2e9-6e9 at
# depth 3, where n samples reach a sample kurtosis of at most about n; the
# depth-2 estimates the sample kurtosis left unflagged covered 67-92 % at
# 500-10,000 samples, the depth-3 ones 10-34 %.  At 3 the ceiling flags
# depth 1 below 729 samples (true variance error 0.4-0.7 at 500), depth 2
# below 4.8e6 and depth 3 always; one bilinear layer from 729 samples on is
# judged by its samples as before.  Under the token measure any function of
# the sequence has kurtosis at most 1/p, p the rarest sequence's probability
# (with Y the squared deviation, E[Y^2] <= max Y E[Y] and E[Y] >= p max Y):
# two-layer attention models with a token of probability 1e-3 (3 positions)
# or 0.02 gave unflagged intervals covering 4-64 % at 500-10,000 samples, the
# runs that drew no sequence carrying the product reporting it 10-25
# standard errors off; the ceiling flags them below 1/(9p) samples.
TAIL_CEILING = 3.0
DEGREE_CEILING = TAIL_CEILING  # its former name (a Gaussian's ceiling was by degree alone)
# Below this many samples the normal interval means nothing, nor does the
# tail check (the sample kurtosis of 2 samples is 1): 2 samples gave
# 0.505 +- 0.13 for an exact -0.039, unflagged.
FEW_SAMPLES = 30
PRODUCTS = 3  # <a,b>, <a,a>, <b,b>: what is reported (|a - b|^2, the fourth, serves the cosine's error)
CANCELLED = 1e-8  # a sum of terms this small beside their magnitudes has lost its digits to float64
# The rounding of a cosine from three float64 means of n products, per
# log2(n) + 4 (pairwise summation's error grows as log2(n); the products,
# the ratio and the square root add a few steps), relative to the cosine:
# two machine epsilons, one for the numerator and one for the two means
# under the root.
ROUNDING = 2 * float(np.finfo(float).eps)


@dataclass(frozen=True)
class Estimate:
    """What Monte Carlo measured: ``means`` (4, C) of the per-sample
    products <a,b>, <a,a>, <b,b> and |a - b|^2 (C channels: 1, or the
    outputs with ``per_output``), ``cov`` (4, 4, C) the covariance of those
    means (the per-sample covariance over n), ``samples`` n, ``seed``;
    ``raw_cov`` the same covariance before the control variate (None: none
    ran), which :meth:`saved` and :meth:`cosine_saved` read, and ``product``
    the product (0, 1, 2) the result holding this estimate reports, whose
    factor :attr:`variance_saved` is.

    ``tail_share``: the largest share of a product's sum of squared
    deviations that one sample carries (about 2 ln(n) / n for light tails,
    near 1 where one sample rules); ``variance_error``: the largest
    relative standard error of a product's sample variance,
    sqrt((kurtosis - 1) / n) over the three products and the channels (the
    error of the error bar), which :attr:`heavy_tailed` judges;
    ``tail_ceiling``: the most that error can be a priori, sqrt((K - 1) / n)
    with K the largest kurtosis the products can have: 9^k for degree-k
    products under a Gaussian, 1/p under tokens (p the rarest sequence's
    probability; inf beyond float64); over :data:`TAIL_CEILING` the samples cannot check their
    own tails, and ``variance_error`` is 1 (its cap), whatever they showed.

    The statistics are those of the models at their canonical scale (each
    divided by e^{log_scale}, so that float64 holds them whatever their
    weights' size; :mod:`tsalgebra.rescale`): ``log_scales`` (a's, b's)
    gives them back, as :meth:`products` does."""

    means: np.ndarray
    cov: np.ndarray
    samples: int
    seed: int | None
    raw_cov: np.ndarray | None = None
    tail_share: float = 0.0
    variance_error: float = 0.0
    tail_ceiling: float = 0.0
    log_scales: tuple[float, float] = (0.0, 0.0)
    product: int = 0

    def saved(self, k: int) -> np.ndarray:
        """The factor by which the control variate divided product k's
        variance, per channel (below 1: it added variance; 1 without a
        control variate; inf where it made the product exact, its spread
        within float64's rounding of its mean)."""
        if self.raw_cov is None:
            return np.ones(self.means.shape[1])
        kept, raw = self.cov[k, k], self.raw_cov[k, k]
        exact = np.sqrt(np.maximum(kept * self.samples, 0.0)) <= CANCELLED * np.abs(self.means[k])
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(exact, np.where(raw > 0, np.inf, 1.0), raw / kept)

    @property
    def degree_ceiling(self) -> float:
        """:attr:`tail_ceiling` by its former name (deprecated)."""
        warnings.warn("Estimate.degree_ceiling is now Estimate.tail_ceiling", DeprecationWarning, stacklevel=2)
        return self.tail_ceiling

    @property
    def variance_saved(self) -> float:
        """:meth:`saved` of the product reported, its least over the channels."""
        return float(np.min(self.saved(self.product)))

    def cosine_saved(self) -> np.ndarray:
        """The factor by which the control variate divided the cosine's
        delta-method variance, per channel (the products' own factors say
        nothing of it: each product's coefficient is fitted to that product,
        and their errors combine in the ratio; inf where the cosine came out
        within rounding)."""
        if self.raw_cov is None:
            return np.ones(self.means.shape[1])
        raw, kept = self._cosine_variance(self.raw_cov)[1], self._cosine_variance(self.cov)[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(kept > 0, raw / kept, np.where(raw > 0, np.inf, 1.0))

    @property
    def heavy_tailed(self) -> bool:
        """True when the variance behind the standard error is itself too
        uncertain for the error bar to be trusted: ``variance_error`` over
        :data:`HEAVY_TAIL_VARIANCE_ERROR` (0.6, the standard error then
        uncertain by about +-30 % or more; the depth-3 stacks flagged in
        86-96 % of seeds had product intervals covering 36-65 % of the time,
        the light-tailed pairs flagged in 0-1 % at 2,000 samples 89-96 %)."""
        return self.variance_error > HEAVY_TAIL_VARIANCE_ERROR

    def stderr(self, k: int) -> np.ndarray:
        return np.sqrt(np.maximum(self.cov[k, k], 0.0))

    def products(self) -> tuple[np.ndarray, np.ndarray]:
        """(<a,b>, <a,a>, <b,b>) of the models as given, (3, C), and their
        standard errors: the means and errors times e^{la + lb}, e^{2 la},
        e^{2 lb} (infinite beyond float64's range, as the products are)."""
        la, lb = self.log_scales
        with np.errstate(over="ignore"):
            factor = np.exp(np.array([la + lb, 2 * la, 2 * lb]))[:, None]
            return self.means[:PRODUCTS] * factor, np.array([self.stderr(k) for k in range(PRODUCTS)]) * factor

    def cosine(self) -> tuple[np.ndarray, np.ndarray]:
        """(ab / sqrt(aa bb), its delta-method standard error), per channel:
        a ratio estimator (consistent; its bias is O(1/n), below the error).

        Near a cosine of 1 the error over (ab, aa, bb) cancels to nothing in
        float64 (the three means move together: a standard error of exactly
        0 on near-identical models).  Where it has cancelled, the error is
        taken over (aa, bb, D) instead, D = E|a - b|^2 measured per sample
        (cos = (aa + bb - D) / (2 sqrt(aa bb)): the same estimate to first
        order, D's own spread measured directly).

        The error is at least the rounding of the cosine's own arithmetic
        (:data:`ROUNDING`): on models equal to the last bit the measured
        spread fell below one float64 step, and the intervals missed the
        exact cosine in 13 of 20 seeds."""
        cos, var = self._cosine_variance(self.cov)
        rounding = ROUNDING * (np.log2(max(self.samples, 2)) + 4) * np.nan_to_num(np.abs(cos))
        return cos, np.maximum(np.sqrt(np.maximum(var, 0.0)), rounding)

    def _cosine_variance(self, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cosine and its delta-method variance over the means'
        covariance ``cov`` (see :meth:`cosine`)."""
        ab, aa, bb = self.means[:3]
        with np.errstate(divide="ignore", invalid="ignore"):
            root = np.sqrt(aa) * np.sqrt(bb)
            cos = ab / root
            grad = np.stack([cos / ab, -0.5 * cos / aa, -0.5 * cos / bb])  # d cos / d (ab, aa, bb)
            grad = np.where(ab == 0, np.stack([1 / root, 0 * aa, 0 * bb]), grad)
        terms = np.einsum("ic,ijc,jc->ijc", grad, cov[:3, :3], grad)
        var = terms.sum(axis=(0, 1))
        if len(self.means) > 3:
            cancelled = var <= CANCELLED * np.abs(terms).sum(axis=(0, 1))
            with np.errstate(divide="ignore", invalid="ignore"):  # d cos / d (aa, bb, D)
                near = np.stack([0.5 / root - 0.5 * cos / aa, 0.5 / root - 0.5 * cos / bb, -0.5 / root])
            var = np.where(cancelled, np.einsum("ic,ijc,jc->c", near, cov[1:4, 1:4], near), var)
        return cos, var


def control_note(what: str, factors: np.ndarray) -> str:
    """What the control variate did to the variance of ``what`` (per
    channel ``factors``, :meth:`Estimate.saved`), for a result's notes."""
    factors = np.asarray(factors, dtype=float).ravel()
    if np.all(np.isinf(factors)):
        return f"the control variate made {what} exact (its spread within float64's rounding)"

    def span(values: np.ndarray) -> str:
        low, high = float(np.min(values)), float(np.max(values))
        return f"by {low:.3g}" if np.isclose(low, high, rtol=5e-3) else f"by {low:.3g} to {high:.3g} over the channels"

    if np.max(factors) < 1:
        return f"the control variate multiplied the variance of {what} {span(1 / factors)} (it added variance)"
    return f"the control variate divided the variance of {what} {span(factors)}" + (
        " (below 1: it added variance there)" if np.min(factors) < 1 else "")


def interval(value: Any, stderr: Any) -> tuple[Any, Any]:
    """The normal 95 % confidence interval value -/+ 1.96 stderr."""
    return value - Z95 * stderr, value + Z95 * stderr


def surrogate(model: Any) -> Any:
    """The model truncated after its first nonlinear layer: deeper nonlinear
    layers that keep the width are dropped, linear ones kept; None when
    there is nothing to drop or the widths would not chain."""
    if not isinstance(model, Sequential):
        return None
    layers, kept, seen = model.layers, [], False
    for layer in layers:
        nonlinear = (layer.layer.degree if isinstance(layer, PositionWise) else layer.degree) > 1
        if nonlinear and seen:
            if layer.in_features != layer.out_features:
                return None
            continue
        seen = seen or nonlinear
        kept.append(layer)
    return Sequential(*kept) if len(kept) < len(layers) else None


class _Stream:
    """Per-sample products accumulated about a centre (the pilot's means:
    no cancellation when the mean dwarfs the spread): sums of d = s - centre
    (4, C), of d d' (4, 4, C) and the largest d^2 (the tail share); of the
    first to fourth powers of u = (s - m) / sd for the three reported
    products, m and sd the first batch's mean and spread (the kurtosis: the
    pilot's raw means are no centre for products the control variate made
    exact, whose spread is then below their offset from it, and sd keeps u^4
    within float64); the same sums of the products before the control
    variate."""

    def __init__(self, centre: np.ndarray, raw_centre: np.ndarray) -> None:
        self.n = 0
        self.centre, self.raw_centre = centre, raw_centre
        self.sum = np.zeros_like(centre)
        self.outer = np.zeros(centre.shape[:1] + centre.shape)
        self.largest = np.zeros_like(centre)
        self.first: tuple[np.ndarray, np.ndarray] | None = None  # (m, sd), set by the first batch
        self.powers = np.zeros((4,) + centre[:PRODUCTS].shape)  # sums of u, u^2, u^3, u^4
        self.raw_sum = np.zeros_like(centre)
        self.raw_outer = np.zeros(centre.shape[:1] + centre.shape)
        self.vec: list[Any] = [0.0, 0.0]  # sums of the centred outputs (centred products' correction)

    def add(self, s: np.ndarray, raw: np.ndarray) -> None:
        # one set of per-sample temporaries at a time, within the plan's PRODUCT_COPIES: the raw sums', the
        # centred sums', then the powers' (of 3 of the 4 products)
        self.n += len(s)
        r = raw - self.raw_centre
        self.raw_sum += r.sum(0)
        self.raw_outer += np.einsum("nic,njc->ijc", r, r)
        del r
        d = s - self.centre
        self.sum += d.sum(0)
        self.outer += np.einsum("nic,njc->ijc", d, d)
        self.largest = np.maximum(self.largest, (d * d).max(0))
        del d
        if self.first is None:
            sd = s[:, :PRODUCTS].std(0)
            self.first = s[:, :PRODUCTS].mean(0), np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
        u = (s[:, :PRODUCTS] - self.first[0]) / self.first[1]
        u2 = u * u
        self.powers += np.stack([u.sum(0), u2.sum(0), (u2 * u).sum(0), (u2 * u2).sum(0)])

    def means(self) -> np.ndarray:
        return self.centre + self.sum / self.n

    def covariance(self) -> np.ndarray:
        """The per-sample covariance (4, 4, C) (unbiased)."""
        m = self.sum / self.n
        return (self.outer - self.n * np.einsum("ic,jc->ijc", m, m)) / max(self.n - 1, 1)

    def raw_covariance(self) -> np.ndarray:
        """:meth:`covariance` of the products before the control variate."""
        m = self.raw_sum / self.n
        return (self.raw_outer - self.n * np.einsum("ic,jc->ijc", m, m)) / max(self.n - 1, 1)

    def tail_share(self) -> float:
        """The largest share of a product's sum of squared deviations that one
        sample carries: about 2 ln(n) / n for light tails; near 1 when a few
        samples dominate and the standard error cannot be trusted."""
        total = np.diagonal(self.outer, axis1=0, axis2=1).T[:PRODUCTS]
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.nanmax(np.where(total > 0, self.largest[:PRODUCTS] / total, 0.0)))

    def variance_error(self) -> float:
        """The largest relative standard error of a product's sample
        variance, sqrt((m4 / m2^2 - 1) / n) from the central moments m2, m4
        (the variance of s^2 is (m4 - m2^2) / n): about sqrt(2 / n) for a
        normal product, near 1 where one sample carries the spread.  Products
        whose spread is within rounding of their mean (:data:`CANCELLED`: one
        the control variate made exact, its spread float64's noise) have no
        error bar to doubt and are left out."""
        if self.n < 2 or self.first is None:
            return 0.0
        s1, s2, s3, s4 = self.powers / self.n
        m2 = s2 - s1 * s1
        m4 = s4 - 4 * s1 * s3 + 6 * s1 * s1 * s2 - 3 * s1 ** 4
        centre, sd = self.first
        spread = np.sqrt(np.maximum(m2, 0.0)) * sd
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            excess = np.where(spread > CANCELLED * np.abs(centre + s1 * sd), m4 / (m2 * m2) - 1, 0.0)
        excess = np.where(np.isnan(excess), np.inf, excess)  # an overflow is a tail too heavy for float64's squares
        return float(min(np.sqrt(max(np.max(excess), 0.0) / self.n), 1.0))


@dataclass(frozen=True)
class _Control:
    """The control variate: the truncated models and the exact plans of
    their products (one joint plan, or three)."""

    a: Any
    b: Any
    plans: tuple[Plan, ...]

    @property
    def flops(self) -> float:
        return float(sum(p.flops for p in self.plans))

    @property
    def peak_bytes(self) -> float:
        return max(p.peak_bytes for p in self.plans)

    @property
    def algorithms(self) -> str:
        return "/".join(dict.fromkeys(p.algorithm for p in self.plans))


class _Fit:
    """The control variate's coefficients, fitted on the samples seen so far
    (sums of s and c about the pilot's means, of s c and c c), and its
    record on samples its fits had not seen: the squared deviations with
    and without it.  ``beta`` is used where that record is better."""

    def __init__(self, s: np.ndarray, c: np.ndarray) -> None:
        self.s0, self.c0 = s.mean(0), c.mean(0)
        self.n = 0
        self.sum_s = np.zeros_like(self.s0)
        self.sum_c = np.zeros_like(self.c0)
        self.sum_sc = np.zeros_like(self.s0)
        self.sum_cc = np.zeros_like(self.c0)
        self.with_cv = np.zeros_like(self.s0)
        self.without = np.zeros_like(self.s0)
        folds = np.array_split(np.arange(len(s)), PILOT_FOLDS)  # each judged by the fit of the others
        for judged in folds:
            fit = np.setdiff1d(np.arange(len(s)), judged)
            self.judge(self._slope(s[fit], c[fit]), s[judged], c[judged])
        self.add(s, c)

    def _slope(self, s: np.ndarray, c: np.ndarray) -> np.ndarray:
        ds, dc = s - s.mean(0), c - c.mean(0)
        var = (dc * dc).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(var > 0, (ds * dc).sum(0) / var, 0.0)

    def judge(self, beta: np.ndarray, s: np.ndarray, c: np.ndarray) -> None:
        """Record how ``beta`` (fitted without these samples) does on them."""
        adjusted = s - beta * c
        self.with_cv += ((adjusted - adjusted.mean(0)) ** 2).sum(0)
        self.without += ((s - s.mean(0)) ** 2).sum(0)

    def add(self, s: np.ndarray, c: np.ndarray) -> None:
        ds, dc = s - self.s0, c - self.c0
        self.n += len(s)
        self.sum_s += ds.sum(0)
        self.sum_c += dc.sum(0)
        self.sum_sc += (ds * dc).sum(0)
        self.sum_cc += (dc * dc).sum(0)

    def candidate(self) -> np.ndarray:
        """beta = cov(s, c) / var(c) over every sample so far."""
        var = self.sum_cc - self.sum_c ** 2 / self.n
        cov = self.sum_sc - self.sum_s * self.sum_c / self.n
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(var > 1e-300, cov / var, 0.0)

    def beta(self) -> np.ndarray:
        """The candidate where the fits did better than none out of sample, else 0."""
        return np.where(self.with_cv < self.without, self.candidate(), 0.0)


def _tail_ceiling(p: InnerProblem, n: int) -> tuple[float, str]:
    """The log10 of the largest variance error, sqrt((K - 1) / n), that a
    per-sample product can have, K its largest possible kurtosis (see
    TAIL_CEILING; K of 10^361 and more under tokens, so in logs), and what
    bounds K, for the note; (-inf, "") where nothing does (no degrees)."""
    if n < 1:
        return -math.inf, ""
    if isinstance(p.measure, Tokens):
        rarest = p.measure.log10_rarest
        log10_k = -rarest  # K = 1 / p
        why = (f"the rarest token sequence has probability {format_power(rarest)}, and a product carried by it alone "
               f"has kurtosis {format_power(log10_k)}")
    else:
        try:
            k = 2 * max(p.degrees)
        except (AttributeError, TypeError, ValueError):
            return -math.inf, ""
        log10_k = k * math.log10(9.0)
        why = f"the products have degree {k} under a Gaussian, whose kurtosis can reach 9^{k} (hypercontractivity)"
    excess = log10_k if log10_k > 15 else math.log10(max(10.0 ** log10_k - 1.0, 1e-300))  # log10(K - 1)
    return (excess - math.log10(n)) / 2, why


def _rounded_up3(x: float) -> float:
    """``x`` > 0 rounded up to the three significant digits it is printed
    with (format_count), for any magnitude (rounded_up stops at 1)."""
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    return float(f"{math.ceil(x / step * (1 - 1e-12)) * step:.3g}")


class Sampled(Algorithm):
    """Monte Carlo for every model (Components, networks, sums) under the
    Gaussian or the token measure; joint (the three products of a
    similarity from one set of samples)."""

    name = "sampled"
    joint = True
    title = "Monte Carlo estimate"
    method = "sampled"
    inners = ("gaussian", "tokens")
    measures = (Gaussian, Tokens)

    def check(self, problem: InnerProblem) -> str | None:
        if problem.exact_numbers:
            return "it samples float models only"
        return None

    # -------------------------------------------------------------- planning
    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        fa, fb = Forward(problem.a), Forward(problem.b)
        width, out = problem.widths
        default = max(1, min(MAX_BATCH, BATCH_BYTES // (8 * (width + 4 * out))))
        wanted = problem.samples if problem.samples is not None else (None if problem.rel_error is not None
                                                                          else DEFAULT_SAMPLES)

        def per_sample_of(batch: int, cv: "_Control | None") -> float:
            flops = (fa.flops(batch) + (fb.flops(batch) if problem.b is not problem.a else 0)) / batch
            flops += 4.0 * out  # the three products
            if cv is not None:
                flops += (Forward(cv.a).flops(batch) + Forward(cv.b).flops(batch)) / batch
            return flops

        def over(per_sample: float, fixed: float) -> CostError | None:
            """Why ``per_sample`` flops a sample (after ``fixed``) exceed the limit; None where they fit."""
            if wanted is None:
                if limit < math.inf and int((limit - fixed) / per_sample) - PILOT < 2:
                    return CostError(f"Monte Carlo costs {format_count(per_sample)} flops per sample; the budget "
                                     "affords fewer than two", flops=fixed + (PILOT + 2) * per_sample)
                return None
            cost = fixed + (int(wanted) + PILOT) * per_sample
            if cost > limit:
                return CostError(f"Monte Carlo with {int(wanted):,} samples would cost {format_count(cost)} flops "
                                 f"({format_count(per_sample)} per sample)", flops=cost)
            return None

        # The plain estimator first, at the default (largest) batch: the least any plan costs.  Over the
        # limit, it is refused before the control variate's exact plan is made, which can take long (the
        # token moments of an attention layer at a long context: minutes), for nothing.
        refusal = over(per_sample_of(default, None), 0.0)
        if refusal is not None:
            raise refusal
        control = self._control(problem)
        cv = control if isinstance(control, _Control) else None
        batch, piece = self._batch(problem, default, cv)
        if cv is not None and self._peak_bytes(problem, batch, piece, cv) > problem.memory:
            # optional too where its models (or its exact plan) take even the smallest batch over the memory
            # bound: without it the estimate may fit (and a refusal states the smaller need)
            plain = self._batch(problem, default, None)
            if self._peak_bytes(problem, *plain, None) < self._peak_bytes(problem, batch, piece, cv):  # fits, or needs less
                control, cv = "none (its models' forward passes or exact products would take the estimate over " \
                              "the memory bound)", None
                batch, piece = plain
        per_sample, fixed = per_sample_of(batch, cv), (cv.flops if cv is not None else 0.0)
        if cv is not None and over(per_sample, fixed) is not None:
            # the control variate is optional: without it the samples the limit affords are asked for
            control, cv = "none (its exact products and forward passes would take the estimate over the budget)", None
            batch, piece = self._batch(problem, default, None)
            per_sample, fixed = per_sample_of(batch, None), 0.0
        refusal = over(per_sample, fixed)  # a batch shrunk to the memory bound costs more per sample
        if refusal is not None:
            raise refusal
        samples = int(wanted) if wanted is not None else \
            (int((limit - fixed) / per_sample) - PILOT if limit < math.inf else 10**12)
        flops = fixed + (samples + PILOT) * per_sample
        notes = ["estimated by Monte Carlo: unbiased, with standard errors"]
        notes.append(f"control variate: the models truncated after their first nonlinear layer ({cv.algorithms}, "
                     f"exact)" if cv is not None else f"control variate: {control}")
        if batch != default or piece < PILOT:
            notes.append(f"batches of {batch:,} samples (the pilot's {PILOT} in pieces of {piece}) to fit the memory "
                         f"bound of {format_count(problem.memory)} bytes, where the default is {default:,}: the "
                         "samples, and so the estimate, for a seed differ from those of the default batches")
        peak = self._peak_bytes(problem, batch, piece, cv)
        facts = {"per_sample_flops": per_sample, "batch": batch, "samples": samples,
                 "rel_error": problem.rel_error, "seed": problem.seed, "control_variate": cv is not None}
        return Plan(self.name, problem, flops, peak, 0, exact=False, joint=True, facts=facts, notes=tuple(notes),
                    payload=(batch, samples, cv, piece, default))

    @staticmethod
    def _peak_bytes(problem: InnerProblem, batch: int, piece: int, cv: "_Control | None") -> float:
        """Bytes held at the peak of a run in batches of ``batch`` samples,
        the pilot's drawn and run in pieces of ``piece``.  The control's
        exact plan runs first, alone (only its values are kept)."""
        width, out = problem.widths
        channels = out if problem.per_output else 1
        models = [problem.a] + ([problem.b] if problem.b is not problem.a else [])
        forwards = [Forward(m) for m in models + ([cv.a, cv.b] if cv is not None else [])]
        products = PRODUCT_COPIES * (2 if cv is not None else 1) * 4 * channels

        def evaluating(k: int) -> float:
            """k inputs drawn and run (one model at a time: the outputs of those run before it are among the
            per-sample copies), their outputs and products formed."""
            return k * (INPUT_COPIES * width + OUTPUT_COPIES * out) + max(f.activation_elements(k) for f in forwards)

        batches = evaluating(batch) + batch * products
        pilot = evaluating(piece) + PILOT * (2 * out + products)  # the pilot's outputs and products kept whole
        held = sum(f.held_elements() for f in forwards)  # each evaluator's padded weights, first batch to last
        return max(8.0 * (max(batches, pilot) + held), cv.peak_bytes if cv is not None else 0.0)

    def _batch(self, problem: InnerProblem, default: int, cv: "_Control | None") -> tuple[int, int]:
        """(batch, pilot piece): the default batch with the pilot in one draw
        where they fit ``problem.memory``, else the largest batch down to
        MIN_BATCH that fits with the pilot in pieces of at most it, else the
        smallest (its peak then states what the bound refuses).

        The sample stream depends on the batch (the token measure draws each
        position for a whole batch; the control variate's fits and the
        rel_error checks move by batch), so the default is kept wherever it
        fits: a bound that admits it gives the samples it always gave."""
        memory = problem.memory
        if self._peak_bytes(problem, default, PILOT, cv) <= memory:
            return default, PILOT

        def fits(b: int) -> bool:
            return self._peak_bytes(problem, b, min(b, PILOT), cv) <= memory

        lo, hi = min(default, MIN_BATCH), default
        if not fits(lo):
            return lo, min(lo, PILOT)
        while lo < hi:  # the largest batch that fits (the peak grows with the batch)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo, min(lo, PILOT)

    @staticmethod
    def _control(problem: InnerProblem) -> "_Control | str":
        """The exact plan of the truncated models' products, when they exist,
        differ from the models and cost at most a tenth of the budget; else
        why there is no control variate."""
        if problem.centered:
            return "none for centred products"
        sa, sb = (surrogate(m) if problem.components else None for m in (problem.a, problem.b))
        if sa is None and sb is None:
            return "none (no nonlinear layer after the first to truncate)"
        from .registry import choose

        sub = problem.replace(a=sa or problem.a, b=sb or problem.b, method="exact", algorithm=None, joint=True,
                              budget=problem.budget / 10, samples=None, rel_error=None, seed=None, device=None)
        try:
            first = choose(sub)
            plans = [first] if first.joint else [first, choose(sub.self_problem("a")), choose(sub.self_problem("b"))]
        except (CostError, ValueError):
            return "none (the truncated models' exact products cost more than a tenth of the budget)"
        return _Control(sub.a, sub.b, tuple(plans))

    # ------------------------------------------------------------- running
    def run(self, plan: Plan) -> Triple:
        if plan.problem.seed is None:  # drawn and reported (estimate.seed, the notes): the estimate can be rerun
            plan = replace(plan, problem=plan.problem.replace(seed=int(np.random.default_rng().integers(2**63))))
        p = plan.problem
        batch, samples, cv, piece, default = plan.payload
        rng = np.random.default_rng(p.seed)
        models = [Forward(p.a), Forward(p.b)]
        controls = [Forward(cv.a), Forward(cv.b)] if cv is not None else None
        exact_c = self._exact_control(cv) if cv is not None else None

        # pilot: the centring origin and the control variate's coefficients, from samples not averaged; drawn
        # and run in one piece where the default batch fits (its samples as ever), else in pieces of the batch
        outs, cs = [], []
        for start in range(0, PILOT, piece):
            x = self._draw(p, min(piece, PILOT - start), rng)
            outs.append(self._outputs(models, x, p))
            if controls is not None:
                cs.append(self._products(*self._outputs(controls, x, p), p.per_output))
            del x
        # (in one piece fa.sum(0) / PILOT: fa.mean(0) to the bit)
        origin = tuple(reduce(np.add, (o[i].sum(0) for o in outs)) / PILOT for i in (0, 1)) if p.centered \
            else (0.0, 0.0)
        s = np.concatenate([self._products(fa - origin[0], fb - origin[1], p.per_output) for fa, fb in outs])
        del outs
        fit = None
        if controls is not None:
            fit = _Fit(s, np.concatenate(cs) - exact_c)
        del cs

        stream = _Stream(s.mean(0), s.mean(0))
        tick = advancer()  # the plan's bar (over its flops: to the most samples it may take), when one shows
        target = p.rel_error
        while stream.n < samples:
            k = min(batch, samples - stream.n)
            if fit is not None:  # batches doubling from the pilot's size: the fit improves early
                k = min(k, max(PILOT, stream.n))
            x = self._draw(p, k, rng)
            fa, fb = self._outputs(models, x, p)
            fa, fb = fa - origin[0], fb - origin[1]
            raw = self._products(fa, fb, p.per_output)
            s = raw
            if fit is not None:  # this batch's beta from the samples before it, then its record on this batch
                c = self._products(*self._outputs(controls, x, p), p.per_output) - exact_c  # type: ignore[arg-type]
                s = raw - fit.beta() * c
                fit.judge(fit.candidate(), raw, c)
                fit.add(raw, c)
            stream.add(s, raw)
            if p.centered:
                stream.vec[0] = stream.vec[0] + fa.sum(0)
                stream.vec[1] = stream.vec[1] + fb.sum(0)
            if tick is not None:
                tick(plan.facts["per_sample_flops"] * k)
            if target is not None and stream.n >= 2 * default:  # as many samples as the default batches judged on
                short = self._shortfall(stream, p, target)
                if short <= 1:
                    break
                if p.samples is None:  # samples= caps the run: its estimate comes back, "not reached"
                    self._refuse_unreachable(plan, stream.n, short, samples)
        return self._results(plan, stream)

    @staticmethod
    def _refuse_unreachable(plan: Plan, drawn: int, short: float, samples: int) -> None:
        """CostError when the samples drawn say the target needs over four
        times the samples the budget allows (the error falls as 1 / sqrt(n)):
        a target of 1e-9 ran to the budget's end, minutes, to say "not
        reached"."""
        needed = drawn * short ** 2
        if needed <= 4 * samples:
            return
        p, per = plan.problem, plan.facts["per_sample_flops"]
        # the target the budget's samples reach by the drawn spread, with room: that spread is itself an
        # estimate (taken at its value, rel_error=0.00979 'within this budget' ended at 0.00987, not reached)
        reachable = _REACH_ROOM * p.rel_error * math.sqrt(needed / samples)  # type: ignore[operator]
        what = "an estimate near 0 has no relative error to reach" if not math.isfinite(needed) else \
            f"needs about {format_count(needed)} samples ({format_count(per * needed)} flops) by the spread of the " \
            f"{drawn:,} drawn"
        # each value one its option accepts, and rounded up so that as printed it still admits what it
        # was made for: samples an int (printed "3.09e+08", which samples= refuses), the budget and the
        # target rounded up (3 digits could round either below the estimate)
        alternatives = [Alternative("samples", int(samples), "the budget's samples, no target")]
        if math.isfinite(needed):
            alternatives[:0] = [Alternative("budget", rounded_up(per * needed), f"about {format_count(needed)} samples")]
            if _rounded_up3(reachable) < 1:  # rel_error= takes (0, 1)
                alternatives.insert(1, Alternative("rel_error", _rounded_up3(reachable), "within this budget"))
        raise CostError(f"Monte Carlo to a relative error of {p.rel_error:g}: {what}; the budget allows "
                        f"{samples:,}", flops=per * needed, alternatives=tuple(alternatives))

    @staticmethod
    def _draw(p: InnerProblem, k: int, rng: np.random.Generator) -> np.ndarray:
        return p.measure.sample(k, rng)  # type: ignore[union-attr]

    @staticmethod
    def _outputs(models: list[Forward], x: np.ndarray, p: InnerProblem) -> tuple[np.ndarray, np.ndarray]:
        if p.device is not None:
            import torch

            xt = torch.as_tensor(x, device=p.device)
            outs = [m(xt) if m.layered else m(x) for m in models]
            fa, fb = (o.detach().cpu().numpy() if hasattr(o, "detach") else np.asarray(o) for o in outs)
        else:
            fa = models[0](x)
            fb = fa if models[1].model is models[0].model else models[1](x)
        for f, side in ((fa, "a"), (fb, "b")):
            if not np.all(np.isfinite(f)):
                raise FloatingPointError(f"Monte Carlo: model {side} gave a non-finite output on a sampled input "
                                         "(its weights overflow float64 at this input scale)")
        return fa, fb

    @staticmethod
    def _products(fa: np.ndarray, fb: np.ndarray, per_output: bool) -> np.ndarray:
        """Per sample (n, 4, C): f.g, f.f, g.g and |f - g|^2 (formed from the
        difference: small and exact where f and g nearly agree), per channel
        or summed."""
        s = np.stack([fa * fb, fa * fa, fb * fb, (fa - fb) ** 2], axis=1)
        return s if per_output else s.sum(axis=2, keepdims=True)

    @staticmethod
    def _exact_control(cv: "_Control") -> np.ndarray:
        """E[c]: the truncated models' exact <a,b>, <a,a>, <b,b> and
        E|a - b|^2 = <a,a> + <b,b> - 2 <a,b> (1, 4, C)."""
        from .registry import run

        results = run(cv.plans[0]) if len(cv.plans) == 1 else tuple(run(p)[0] for p in cv.plans)
        ab, aa, bb = (np.atleast_1d(np.asarray(r.value, dtype=float)) for r in results)
        return np.stack([ab, aa, bb, aa + bb - 2 * ab])[None]

    def _shortfall(self, stream: _Stream, p: InnerProblem, target: float) -> float:
        """The largest standard error over ``target`` times its value (at most
        1: the target is reached; inf for a value of 0)."""
        est = self._estimate(stream, p, False)
        value, se = est.cosine() if p.joint and p.a is not p.b else (est.means[0], est.stderr(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(se == 0, 0.0, se / (target * np.abs(value)))
        return float(np.max(np.nan_to_num(ratio, nan=np.inf)))

    @staticmethod
    def _estimate(stream: _Stream, p: InnerProblem, controlled: bool) -> Estimate:
        means = stream.means()
        if p.centered and stream.n > 1:  # unbiased sample covariance about the pilot origin
            n = stream.n
            da, db = stream.vec[0] / n, stream.vec[1] / n
            corr = np.stack([da * db, da * da, db * db, (da - db) ** 2])
            corr = corr if p.per_output else corr.sum(axis=1, keepdims=True)
            means = n / (n - 1) * (means - corr)
        cov = stream.covariance() / stream.n
        raw = stream.raw_covariance() / stream.n if controlled else None
        log10_ceiling, _ = _tail_ceiling(p, stream.n)
        ceiling = 10.0 ** log10_ceiling if log10_ceiling < 300 else math.inf
        error = 1.0 if ceiling > TAIL_CEILING else stream.variance_error()
        return Estimate(means, cov, stream.n, p.seed, raw, stream.tail_share(), error, ceiling)

    def _results(self, plan: Plan, stream: _Stream) -> Triple:
        p = plan.problem
        est = self._estimate(stream, p, plan.payload[2] is not None)
        notes = [f"{stream.n:,} samples (seed {p.seed})"]
        if stream.n < FEW_SAMPLES:
            notes.append(f"FEW SAMPLES: the 95 % interval assumes a normal mean, which {stream.n} samples do not give "
                         f"(fewer than {FEW_SAMPLES}); the standard error is itself a rough estimate: pass more samples")
        check = "an exact value" if isinstance(p.measure, Tokens) else "an exact or closure value"  # closure: Gaussian
        if est.tail_ceiling > TAIL_CEILING:
            log10_ceiling, why = _tail_ceiling(p, stream.n)
            could = 2 * (log10_ceiling - math.log10(TAIL_CEILING)) + math.log10(stream.n)
            notes.append(f"HEAVY TAILS: {why}: a product's sample variance, and so the standard error, may be off by "
                         f"up to {format_power(log10_ceiling)} times itself, which {stream.n:,} samples cannot check "
                         f"({format_power(could)} could; of the {stream.n:,} drawn, one carries "
                         f"{est.tail_share:.0%} of a product's spread); the standard error may be underestimated "
                         f"({check}, to check)")
        elif est.heavy_tailed:  # judged by the samples
            notes.append(f"HEAVY TAILS: a product's sample variance, and so the standard error, is itself uncertain "
                         f"by about {est.variance_error:.0%} (its kurtosis; one sample carries {est.tail_share:.0%} of "
                         f"its spread); the standard error is likely underestimated (more samples, or {check}, to "
                         "check)")
        if p.rel_error is not None:
            reached = self._shortfall(stream, p, p.rel_error) <= 1
            notes.append(f"relative error {p.rel_error:g} {'reached' if reached else 'NOT reached within the budget'}")
        flops = plan.facts["per_sample_flops"] * (stream.n + PILOT) + (plan.payload[2].flops if plan.payload[2] else 0)

        def result(k: int) -> InnerResult:
            value, se = est.means[k], est.stderr(k)
            if not p.per_output:
                value, se = float(value[0]), float(se[0])
            name = ("<a, b>", "<a, a>", "<b, b>")[k]
            control = (control_note(name, est.saved(k)),) if est.raw_cov is not None else ()
            return plan.result(value, stderr=se, interval=interval(value, se), samples=stream.n,
                               estimate=replace(est, product=k), flops=flops,
                               notes=plan.problem.notes + plan.notes + tuple(notes) + control)

        return result(0), result(1), result(2)

