"""Inner products, norms and similarities of tensor-based models.

Three inner products (see docs/inner-products.md):

- ``"gaussian"``: E over x ~ N(mean, cov) of f(x) . g(x);
- ``"symmetric"``: Frobenius product of the symmetrized padded coefficient
  tensors at a common degree k (the Bombieri product);
- ``"network"``: the recursive per-layer product (a property of the
  factorization, not only of the function, at depth >= 2).

The exact methods of the first two share one mechanism: join the two
networks, sum over pairings of their input legs (Gaussian: pairs joined by
the padded covariance and singletons fed the padded mean; symmetric: cross
pairs joined by the identity), one planned contraction per orbit of pairings
under the declared symmetries, weighted by orbit size.  The constant output
channel is always excluded.
"""

from __future__ import annotations

import math
from functools import lru_cache
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import numpy as np
import sympy

from .attention import BilinearAttention, sequence_measure
from .attention_moments import (MAX_WHITENED, attention_moments, moment_head, moment_products, moments_cost,
                                per_position_measure, whitened_rank)
from .components import Component, Linear, Sequential
from .expr import Network, Sum
from .pairing_sum import (MAX_PAIRINGS, OUTER, CostError, Joins, PairingPlan, Tally, lift, orbit_sum, plan_pairings,
                           same_network)
from .pairings import count_pairings
from .quadrature import grid_points, quadrature_inner
from .recursive import _linear_block, closure_moments, closure_steps, fold, network_gram

__all__ = ["InnerResult", "CostError", "inner", "norm", "plan_inner", "similarity", "DEFAULT_BUDGET", "MAX_PAIRINGS"]

INNERS = ("gaussian", "symmetric", "network")
METHODS = ("auto", "exact", "closure")
DEFAULT_BUDGET = 1e11  # flops of all orbit contractions together


@dataclass(frozen=True)
class InnerResult:
    """A number with the facts needed to trust it.

    ``value`` is a float (or an exact rational with exact weights, or a
    vector with ``per_output``); ``exact`` is False only for approximations
    (closure); ``contractions``/``flops`` are what was spent; ``pairings`` and
    ``orbits`` count the raw and the contracted terms of exact enumeration.
    """

    value: Any
    quantity: str  # "inner", "norm" or "similarity"
    inner: str
    method: str
    exact: bool
    algorithm: str
    centered: bool = False
    measure: str = ""
    degree: int | None = None
    lifted: bool = False
    per_output: bool = False
    contractions: int = 0
    flops: int = 0
    pairings: int = 0
    orbits: int = 0
    notes: tuple[str, ...] = field(default=())

    def __float__(self) -> float:
        if self.per_output:
            raise TypeError("a per-output result is a vector; use .value")
        return float(self.value)

    def __repr__(self) -> str:
        val = self.value
        if not self.per_output and isinstance(val, float):
            val = f"{val:.12g}"
        flags = [self.inner, self.method + (" (approximate)" if not self.exact else ""), self.algorithm]
        if self.centered:
            flags.append("centred")
        if self.measure:
            flags.append(self.measure)
        if self.degree is not None:
            flags.append(f"degree {self.degree}" + (" (lifted)" if self.lifted else ""))
        cost = f"{self.contractions} contractions, {self.flops:.3g} flops"
        if self.pairings:
            cost += f", {self.orbits} orbits of {self.pairings} pairings"
        return f"{self.quantity} = {val}  [{', '.join(flags)}; {cost}]"


# ----------------------------------------------------------------- inputs


def _terms(model: Any) -> list[tuple[Any, Network]]:
    """A model as weighted networks, bilinear nodes symmetrized so their
    swaps are declared symmetries."""
    if isinstance(model, Component):
        return [(1, model.network(symmetric=True))]
    if isinstance(model, Network):
        return [(1, model)]
    if isinstance(model, Sum):
        return list(model.terms)
    raise TypeError(f"expected a tsalgebra model, network or Sum, got {type(model).__name__}")


def _widths(terms: list[tuple[Any, Network]], what: str) -> tuple[int, int]:
    ins = {n.sizes[l] for _, n in terms for l in n.inputs}
    outs = set()
    for _, n in terms:
        if len(n.outputs) != 1:
            raise ValueError(f"{what}: inner products need one output leg, got {n.outputs}")
        outs.add(n.sizes[n.outputs[0]])
    if len(ins) > 1 or len(outs) != 1:
        raise ValueError(f"{what}: terms disagree on widths (inputs {sorted(ins)}, outputs {sorted(outs)})")
    return (ins.pop() if ins else 0), outs.pop()


def _is_exact(terms: Iterable[tuple[Any, Network]]) -> bool:
    return any(getattr(t.data, "dtype", None) == object for _, n in terms for t in n.tensors)


def _array(values: Any, exact: bool) -> np.ndarray:
    if type(values).__module__.split(".")[0] == "torch":
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=object if exact else float)


@lru_cache(maxsize=16)
def _standard(d: int, exact: bool) -> tuple[np.ndarray, np.ndarray, Joins]:
    """Padded mean, covariance and joins of N(0, I): built once per width
    (they are (d+1)^2 arrays, costly to rebuild at d ~ 1000), read-only."""
    mu = np.zeros(d + 1, dtype=object if exact else float)
    mu[0] = 1
    C = np.eye(d + 1, dtype=int).astype(object) if exact else np.eye(d + 1)
    C[0, 0] = 0
    for arr in (mu, C):
        arr.setflags(write=False)
    return mu, C, Joins.gaussian(mu, C)


def _joins(mu: np.ndarray, C: np.ndarray, label: str) -> Joins:
    return _standard(len(mu) - 1, mu.dtype == object)[2] if label == "N(0, I)" else Joins.gaussian(mu, C)


def _measure(d: int, mean: Any, cov: Any, exact: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Padded mean [1; m] and covariance [[0, 0], [0, C]] of x ~ N(mean, cov)."""
    if mean is None and cov is None:
        mu, C, _ = _standard(d, exact)
        return mu, C, "N(0, I)"
    m = np.zeros(d, dtype=object if exact else float) if mean is None else _array(mean, exact)
    C = (np.eye(d, dtype=int).astype(object) if exact else np.eye(d)) if cov is None else _array(cov, exact)
    if m.shape != (d,):
        raise ValueError(f"mean has shape {m.shape}, expected ({d},) for input width {d}")
    if C.shape != (d, d):
        raise ValueError(f"cov has shape {C.shape}, expected ({d}, {d}) for input width {d}")
    if not exact and (mean is not None or cov is not None):
        if not (np.isfinite(m).all() and np.isfinite(C).all()):
            raise ValueError("mean or cov contains NaN or Inf")
        if not np.allclose(C, C.T, rtol=0, atol=1e-12 * max(1.0, np.abs(C).max())):
            raise ValueError("cov is not symmetric")
        if np.linalg.eigvalsh(C).min() < -1e-10 * max(1.0, np.abs(C).max()):
            raise ValueError("cov is not positive semi-definite")
    elif exact and not (C == C.T).all():
        raise ValueError("cov is not symmetric")
    mu = np.concatenate([np.array([1], dtype=m.dtype), m])
    Ct = np.zeros((d + 1, d + 1), dtype=C.dtype)
    Ct[1:, 1:] = C
    label = "N(0, I)" if mean is None and cov is None else "N(mean, cov)"
    return mu, Ct, label


# ---------------------------------------------------- exact pairing sums


def _scale(value: Any, k: int, exact: bool) -> Any:
    from fractions import Fraction

    f = math.factorial(k)
    return value * Fraction(1, f) if exact else value / f


def _exact_inner(ta: list[tuple[Any, Network]], tb: list[tuple[Any, Network]], inner: str, *, mean: Any, cov: Any,
                 centered: bool, per_output: bool, degree: int | None, budget: float,
                 use_orbits: bool, plans: list[tuple[str, PairingPlan]] | None = None) -> tuple[Any, Tally, dict[str, Any]]:
    """The exact value by pairing orbits, or, when ``plans`` is a list, only
    the plans of every orbit sum it would run (appended there)."""

    def run(A: Network, B: Network | None, joins: Joins, mask: Any, label: str) -> tuple[Any, Tally]:
        if plans is None:
            return orbit_sum(A, B, joins, mask, budget, use_orbits)
        plans.append((label, plan_pairings(A, B, joins, mask, budget, use_orbits)))
        return 0, Tally()

    exact = _is_exact(ta) or _is_exact(tb)
    d1, o1 = _widths(ta + tb, "a and b")
    tally = Tally()
    info: dict[str, Any] = {}
    out_mask = None
    if not per_output:
        out_mask = np.array([0] + [1] * (o1 - 1), dtype=object if exact else float)
    total: Any = 0
    if inner == "gaussian":
        mu, C, info["measure"] = _measure(d1 - 1, mean, cov, exact)
        joins = _joins(mu, C, info["measure"])
        for ca, A in ta:
            for cb, B in tb:
                v, t = run(A, B, joins, out_mask, "<a,b>")
                total = total + ca * cb * v
                tally.add(t)
        if centered:
            means = []
            for side, terms in (("a", ta), ("b", tb)):
                m: Any = 0
                for c, N in terms:
                    v, t = run(N, None, joins, None, f"E[{side}]")
                    m = m + c * v
                    tally.add(t)
                means.append(m)
            if plans is not None:
                return 0, tally, info
            prod = means[0] * means[1]  # per padded channel; channel 0 is dropped below
            total = total - (prod if per_output else prod[1:].sum())
    else:
        k = max(n.degree for _, n in ta + tb)
        if degree is not None:
            if degree < k:
                raise ValueError(f"degree={degree} is below the models' degree {k}")
            k = degree
        joins = Joins.identity(d1, exact)
        info["degree"], info["lifted"] = k, any(n.degree < k for _, n in ta + tb)
        for ca, A in ta:
            for cb, B in tb:
                v, t = run(lift(A, k, exact), lift(B, k, exact), joins, out_mask, "<a,b>")
                total = total + ca * cb * _scale(v, k, exact)
                tally.add(t)
    if per_output and plans is None:
        total = total[1:]
    return total, tally, info


# ------------------------------------------------------------ public API


def _check_args(inner_: str, method: str, centered: bool) -> None:
    if inner_ not in INNERS:
        raise ValueError(f"inner must be one of {INNERS}, got {inner_!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "closure" and inner_ != "gaussian":
        raise ValueError("method='closure' is a Gaussian moment method; use it with inner='gaussian'")
    if centered and inner_ != "gaussian":
        raise ValueError("centered=True is defined for the gaussian inner product only")


def _check_pair(a: Any, b: Any) -> None:
    if isinstance(a, Component) and isinstance(b, Component):
        if a.in_features != b.in_features:
            raise ValueError(f"input widths differ: {a!r} takes {a.in_features}, {b!r} takes {b.in_features}")
        if a.out_features != b.out_features:
            raise ValueError(f"output widths differ: {a!r} gives {a.out_features}, {b!r} gives {b.out_features}")


def inner(
    a: Any,
    b: Any,
    inner: str = "gaussian",
    method: str = "auto",
    mean: Any = None,
    cov: Any = None,
    *,
    centered: bool = False,
    per_output: bool = False,
    degree: int | None = None,
    budget: float = DEFAULT_BUDGET,
    orbits: bool = True,
    algorithm: str | None = None,
) -> InnerResult:
    """<a, b> under the chosen inner product, summed over output channels
    (constant channel excluded), or one value per channel with ``per_output``.

    ``method``: "exact" (pairing orbits for gaussian/symmetric, the Gram
    recursion for network), "closure" (Gaussian moment propagation;
    approximate, gaussian only) or "auto" (exact if its estimated cost is
    within ``budget`` flops, else :class:`CostError` naming the estimate and
    the alternatives; never an approximation).  ``degree`` fixes the common
    degree of the symmetric product (default: the larger model degree).
    ``orbits=False`` sums every pairing one by one (slow; a check on the
    declared symmetries, which orbit grouping trusts).  ``algorithm`` picks
    the exact Gaussian algorithm: "pairings" (orbit enumeration, exponential
    in the number of input copies), "quadrature" (Gauss-Hermite nodes,
    exponential in the input width) or "moments" (per-position attention
    moments: one attention layer between position-wise linear maps, under
    the sequence measure; ValueError naming the reason where it does not
    apply); by default "moments" where it applies, else the one of the other
    two with fewer contractions, the other when the first is refused.

    Cost: exact enumeration is exponential in the number of input copies
    (orbits of pairings, each a contraction of the two factored models);
    attention moments are polynomial (C(r+5, 5) coefficients per feature,
    r the per-position input rank); network and closure are O(depth h^2 d).
    """
    return _results(a, b, inner, method, mean, cov, joint=False, centered=centered, per_output=per_output,
                    degree=degree, budget=budget, orbits=orbits, algorithm=algorithm)[0]


Triple = tuple[InnerResult, "InnerResult | None", "InnerResult | None"]


def _results(a: Any, b: Any, inner: str, method: str, mean: Any, cov: Any, *, joint: bool, centered: bool,
             per_output: bool, degree: int | None, budget: float, orbits: bool, algorithm: str | None) -> Triple:
    """(<a, b>, <a, a>, <b, b>) as InnerResults; the last two only where one
    computation yields all three (``joint`` closure or attention moments),
    else None."""
    _check_args(inner, method, centered)
    _check_pair(a, b)
    if getattr(a, "n_ctx", 0):  # sequence models: per-feature mean/cov over independent positions
        mean, cov = sequence_measure(mean, cov, a.n_ctx, a.d_model)
    if inner == "network":
        for m in (a, b):
            if not isinstance(m, Component):
                raise TypeError("the network inner product needs layered models (Linear/Bilinear/Sequential)")
        G, flops = network_gram(a, b)
        diag = np.diag(G)[1:]
        return InnerResult(diag if per_output else float(diag.sum()), "inner", "network", "exact", True,
                           "Gram recursion", per_output=per_output, contractions=len(fold(a)[0]) or 1,
                           flops=flops), None, None
    if method == "closure":
        for m in (a, b):
            if not isinstance(m, Component):
                raise TypeError("closure needs layered models (Linear/Bilinear/BilinearAttention/Sequential)")
        mu, C, label = _measure(a.in_features, mean, cov, False)
        if any(isinstance(layer, BilinearAttention) for m in (a, b) for layer in m.layers):
            mom_mean, M, approx, flops, contractions = _attention_closure(a, b, mu, C, label, budget)
        else:
            mom_mean, M, steps, flops = closure_moments(a, b, mu[1:], C[1:, 1:])
            approx, contractions = max(steps - 1, 0), steps
        oa = a.out_features + 1
        notes = (f"Gaussian closure over {approx} bilinear layer(s) after an exact first stage: approximate",
                 ) if approx else ()
        result = lambda x, y: InnerResult(  # noqa: E731
            _diagonal(M[x, y], mom_mean[x], mom_mean[y], centered, per_output), "inner", "gaussian", "closure",
            not approx, "moment closure", centered=centered, measure=label, per_output=per_output,
            contractions=contractions, flops=flops, notes=notes)
        A, B = slice(0, oa), slice(oa, None)
        return result(A, B), (result(A, A) if joint else None), (result(B, B) if joint else None)
    measure = _moments_measure(a, b, inner, mean, cov, algorithm, orbits, tail="linear")
    if measure is not None:
        return _moments_inner(a, b, measure, centered, per_output, budget, joint)
    ta, tb = _terms(a), _terms(b)
    exact_numbers = _is_exact(ta + tb)
    quadrature_first = _quadrature_first(ta, tb, inner, mean, cov, exact_numbers, algorithm)
    if quadrature_first:
        return _quadrature(ta, tb, mean, cov, centered, per_output, budget, None), None, None
    try:
        value, tally, info = _exact_inner(ta, tb, inner, mean=mean, cov=cov, centered=centered,
                                          per_output=per_output, degree=degree, budget=budget, use_orbits=orbits)
    except CostError as too_many:
        if inner != "gaussian" or exact_numbers or algorithm == "pairings":
            raise
        return _quadrature(ta, tb, mean, cov, centered, per_output, budget, too_many), None, None
    if not exact_numbers:
        value = value if per_output else float(value)
    else:
        value = np.vectorize(_exact_number, otypes=[object])(value) if per_output else _exact_number(value)
    return InnerResult(value, "inner", inner, "exact", True, "pairing orbits", centered=centered,
                       measure=info.get("measure", ""), degree=info.get("degree"), lifted=info.get("lifted", False),
                       per_output=per_output, contractions=tally.contractions, flops=tally.flops,
                       pairings=tally.pairings, orbits=tally.orbits), None, None


def _moments_measure(a: Any, b: Any, inner_: str, mean: Any, cov: Any, algorithm: str | None, orbits: bool,
                     tail: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-position (mean, cov) when the attention-moments algorithm
    applies: Gaussian, float models of position-wise Linear layers, one
    BilinearAttention and (``tail="linear"``) only Linear layers after it,
    positions independent and identically distributed, whitened width within
    MAX_WHITENED.  None otherwise; a ValueError naming the reason when
    ``algorithm="moments"`` was asked for."""
    def refuse(why: str) -> None:
        if algorithm == "moments":
            raise ValueError(f"algorithm='moments' does not apply: {why}")
        return None

    if algorithm not in (None, "moments") or not orbits:
        return None
    if inner_ != "gaussian":
        return refuse("it computes the gaussian inner product only")
    heads = [moment_head(m) if isinstance(m, Component) else None for m in (a, b)]
    if heads[0] is None or heads[1] is None:
        return refuse("each model must be position-wise Linear layers, then a float BilinearAttention")
    if tail == "linear" and not all(isinstance(l, Linear) for h in heads for l in h[2]):
        return refuse("only Linear layers may follow the attention (use method='closure' for deeper models)")
    (attn, E, _), (other, E_b, _) = heads
    if (attn.n_ctx, E.shape[1]) != (other.n_ctx, E_b.shape[1]):
        return refuse(f"the models read {attn.n_ctx} and {other.n_ctx} positions of different widths")
    n, d = attn.n_ctx, E.shape[1] - 1
    _measure(n * d, mean, cov, False)  # the same checks as every route: shapes, NaN/Inf, symmetric, PSD
    measure = per_position_measure(mean, cov, n, d)
    if measure is None:
        return refuse("the measure is not independent and identical across positions")
    if whitened_rank(measure[1]) > MAX_WHITENED:
        return refuse(f"the per-position input rank exceeds {MAX_WHITENED}")
    return measure


def _padded_tail(model: Component) -> np.ndarray:
    """The padded linear map after the attention layer (identity if none)."""
    attn, _, tail = moment_head(model)  # type: ignore[misc]
    if not tail:
        return np.eye(model.out_features + 1)
    return fold(Sequential(*tail))[1]  # type: ignore[return-value]


def _diagonal(M: np.ndarray, mean_x: np.ndarray, mean_y: np.ndarray, centered: bool, per_output: bool) -> Any:
    """Sum (or per channel) of E[x_c y_c] over the non-constant padded channels, centred on request."""
    v = np.diag(M)[1:] - (mean_x[1:] * mean_y[1:] if centered else 0)
    return v if per_output else float(v.sum())


def _moments_inner(a: Component, b: Component, measure: tuple[np.ndarray, np.ndarray], centered: bool,
                   per_output: bool, budget: float, joint: bool) -> Triple:
    cost = moments_cost(a, b, measure[1], joint)
    if cost > budget:
        raise CostError(f"the attention-moments algorithm would cost about {cost:.3g} flops, above the budget "
                        f"{budget:.3g}; raise budget=")
    hm = attention_moments(a, b, *measure, joint=joint)
    Wa, Wb = _padded_tail(a), _padded_tail(b)
    plain = not measure[0].any() and np.array_equal(measure[1], np.eye(len(measure[0])))

    def result(Wx: np.ndarray, mx: np.ndarray, M: np.ndarray, Wy: np.ndarray, my: np.ndarray) -> InnerResult:
        return InnerResult(_diagonal(Wx @ M @ Wy.T, Wx @ mx, Wy @ my, centered, per_output), "inner", "gaussian",
                           "exact", True, "attention moments", centered=centered,
                           measure="N(0, I)" if plain else "N(mean, cov)", per_output=per_output,
                           contractions=hm.products, flops=hm.flops,
                           notes=(f"per-position feature moments over {hm.whitened} whitened dimensions",))

    ab = result(Wa, hm.mean_a, hm.ab, Wb, hm.mean_b)
    if not joint:
        return ab, None, None
    return ab, result(Wa, hm.mean_a, hm.aa, Wa, hm.mean_a), result(Wb, hm.mean_b, hm.bb, Wb, hm.mean_b)


def _split_at_attention(model: Component) -> tuple[Component, Component | None]:
    """(head, tail): the head runs through the first attention layer (or the
    first bilinear layer when there is none); its moments are computed
    exactly, the tail's by closure."""
    layers = model.layers
    kinds = [isinstance(l, BilinearAttention) for l in layers]
    cut = kinds.index(True) if any(kinds) else next(
        (k for k, l in enumerate(layers) if l.degree > 1), len(layers) - 1)
    if any(kinds[cut + 1 :]):
        raise ValueError(f"closure through a second attention layer is not implemented ({model!r})")
    head = Sequential(*layers[: cut + 1])
    return head, (Sequential(*layers[cut + 1 :]) if cut + 1 < len(layers) else None)


def _attention_closure(a: Component, b: Component, mu: np.ndarray, C: np.ndarray, label: str,
                       budget: float) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Closure for models with attention: the joint moments of the two heads
    (through the first attention layer) exactly, by pairing sums with both
    outputs open; then Gaussian closure through the bilinear tails.
    Returns (mean, second moment, approximate steps, flops, contractions)."""
    (head_a, tail_a), (head_b, tail_b) = _split_at_attention(a), _split_at_attention(b)
    tally = Tally()
    measure = _moments_measure(head_a, head_b, "gaussian", mu[1:], C[1:, 1:], None, True, tail="any")
    if measure is not None:
        hm = attention_moments(head_a, head_b, *measure, joint=True)
        means, (M_aa, M_ab, M_bb) = [hm.mean_a, hm.mean_b], (hm.aa, hm.ab, hm.bb)
        tally.flops, tally.contractions = hm.flops, hm.products
    else:
        joins = _joins(mu, C, label)
        Ha, Hb = head_a.network(symmetric=True), head_b.network(symmetric=True)
        same = same_network(Ha, Hb)  # a self product: one moment matrix serves all three blocks

        def moment(x: Network, y: Network | None, mask: Any) -> Any:
            value, t = orbit_sum(x, y, joins, mask, budget)
            tally.add(t)
            return value

        M_aa = moment(Ha, Ha, OUTER)
        M_ab, M_bb = (M_aa, M_aa) if same else (moment(Ha, Hb, OUTER), moment(Hb, Hb, OUTER))
        mean_a = moment(Ha, None, None)
        means = [mean_a, mean_a if same else moment(Hb, None, None)]
    state_mu, state_M = np.concatenate(means), np.block([[M_aa, M_ab], [M_ab.T, M_bb]])
    chains, approx = [], 0
    for head, tail in ((head_a, tail_a), (head_b, tail_b)):
        blocks, linear = fold(tail) if tail is not None else ([], np.eye(head.out_features + 1))
        approx = max(approx, len(blocks))
        chains.append(blocks or [_linear_block(linear)])
    mean_out, M_out, steps, flops = closure_steps(chains[0], chains[1], state_mu, state_M)
    return mean_out, M_out, approx, tally.flops + flops, tally.contractions + steps


def _quadrature_first(ta: list[tuple[Any, Network]], tb: list[tuple[Any, Network]], inner: str, mean: Any, cov: Any,
                      exact_numbers: bool, algorithm: str | None) -> bool:
    """Whether the exact Gaussian value is first tried by quadrature: when
    asked, or by default when its grid is smaller than the pairings divided
    by the declared symmetry group (a proxy for the orbit count)."""
    if algorithm not in (None, "pairings", "quadrature", "moments"):
        raise ValueError(f"algorithm must be 'pairings', 'quadrature' or 'moments', got {algorithm!r}")
    if algorithm == "quadrature" and (inner != "gaussian" or exact_numbers):
        raise ValueError("quadrature computes float Gaussian inner products only")
    if algorithm is not None or inner != "gaussian" or exact_numbers:
        return algorithm == "quadrature"
    d1, _ = _widths(ta + tb, "a and b")
    _, C, _ = _measure(d1 - 1, mean, cov, False)
    n_legs = max(n.degree for _, n in ta) + max(n.degree for _, n in tb)
    n_syms = max(len(n.symmetries) for _, n in ta) + max(len(n.symmetries) for _, n in tb)
    return grid_points(ta, tb, C[1:, 1:]) < count_pairings("gaussian", n_legs) / 2**n_syms


def plan_inner(a: Any, b: Any, inner: str = "gaussian", mean: Any = None, cov: Any = None, *, centered: bool = False,
               per_output: bool = False, degree: int | None = None, budget: float = DEFAULT_BUDGET,
               orbits: bool = True, algorithm: str | None = None) -> dict[str, Any]:
    """What :func:`inner` with the same arguments (exact method) would run,
    planned from shapes without contracting: ``algorithm`` ("pairing orbits",
    "Gauss-Hermite quadrature" or "attention moments"), ``products`` (for
    each orbit sum, its label "<a,b>", "E[a]" or "E[b]" and a
    :class:`~tsalgebra.pairing_sum.PairingPlan`, or the CostError message
    under "refused"), ``quadrature_points``, and for attention moments the
    estimated ``flops`` (and ``flops_with_norms`` for a similarity)."""
    _check_args(inner, "exact", centered)
    _check_pair(a, b)
    if getattr(a, "n_ctx", 0):
        mean, cov = sequence_measure(mean, cov, a.n_ctx, a.d_model)
    measure = _moments_measure(a, b, inner, mean, cov, algorithm, orbits, tail="linear")
    if measure is not None:
        return {"inner": inner, "algorithm": "attention moments", "products": [], "quadrature_points": None,
                "flops": moments_cost(a, b, measure[1]), "flops_with_norms": moments_cost(a, b, measure[1], True),
                "contractions": moment_products(a.in_features // len(measure[0]), False),
                "contractions_with_norms": moment_products(a.in_features // len(measure[0]), a is not b)}
    ta, tb = _terms(a), _terms(b)
    exact_numbers = _is_exact(ta + tb)
    plans: list[tuple[str, PairingPlan]] = []
    refused = None
    try:
        _exact_inner(ta, tb, inner, mean=mean, cov=cov, centered=centered, per_output=per_output, degree=degree,
                     budget=budget, use_orbits=orbits, plans=plans)
    except CostError as exc:
        refused = str(exc)
    points = None
    if inner == "gaussian" and not exact_numbers:
        d1, _ = _widths(ta + tb, "a and b")
        points = grid_points(ta, tb, _measure(d1 - 1, mean, cov, False)[1][1:, 1:])
    quad = _quadrature_first(ta, tb, inner, mean, cov, exact_numbers, algorithm) or (
        refused is not None and points is not None and algorithm != "pairings")
    products: list[dict[str, Any]] = [{"product": label, "plan": p} for label, p in plans]
    if refused is not None:
        products.append({"refused": refused})
    return {"inner": inner, "algorithm": "Gauss-Hermite quadrature" if quad else "pairing orbits",
            "products": products, "quadrature_points": points}


def _quadrature(ta: list[tuple[Any, Network]], tb: list[tuple[Any, Network]], mean: Any, cov: Any, centered: bool,
                per_output: bool, budget: float, refused: CostError | None) -> InnerResult:
    d1, _ = _widths(ta + tb, "a and b")
    mu, C, label = _measure(d1 - 1, mean, cov, False)
    try:
        value, points, flops = quadrature_inner(ta, tb, mu[1:], C[1:, 1:], centered, per_output, budget)
    except CostError as too_wide:
        raise (CostError(f"{refused}. {too_wide}") if refused else too_wide) from None
    notes = (f"pairing enumeration refused ({refused})",) if refused else ()
    return InnerResult(value, "inner", "gaussian", "exact", True, "Gauss-Hermite quadrature", centered=centered,
                       measure=label, per_output=per_output, contractions=points, flops=flops,
                       notes=notes + (f"exact on {points:,} quadrature nodes",))


def norm(a: Any, inner: str = "gaussian", method: str = "auto", mean: Any = None, cov: Any = None,
         **kwargs: Any) -> InnerResult:
    """sqrt(<a, a>) with the metadata of :func:`inner`."""
    r = globals()["inner"](a, a, inner, method, mean, cov, **kwargs)
    if not r.per_output and not isinstance(r.value, float):
        return replace(r, value=sympy.sqrt(_to_sympy(r.value)), quantity="norm")
    v = np.sqrt(np.maximum(np.asarray(r.value, dtype=float), 0.0))
    return replace(r, value=v if r.per_output else float(v), quantity="norm")


def _exact_number(v: Any) -> Any:
    """Exact results are Fractions when rational, sympy expressions when symbolic."""
    if isinstance(v, sympy.Basic):
        v = sympy.expand(v)
        if v.is_Rational:
            from fractions import Fraction

            return Fraction(int(v.p), int(v.q))
    return v


def _to_sympy(v: Any) -> Any:
    from fractions import Fraction

    return sympy.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else sympy.sympify(v)


def _degree(model: Any) -> int:
    return max(n.degree for _, n in _terms(model))


def _float_cosine(ab: InnerResult, aa: InnerResult, bb: InnerResult, inner: str) -> Any:
    x, y, z = (np.asarray(r.value, dtype=float) for r in (ab, aa, bb))
    if not ab.per_output and (y <= 0 or z <= 0):
        which = "a" if y <= 0 else "b"
        raise ValueError(f"model {which} has zero norm under the {inner} inner product; the similarity is undefined")
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = x / np.sqrt(y) / np.sqrt(z)  # sqrt(y * z) can overflow where each factor does not
    if ab.per_output and not np.isfinite(cos).all():
        warnings.warn("some output channels have zero norm; their similarity is NaN", RuntimeWarning, stacklevel=3)
    excess = np.nanmax(np.abs(cos)) - 1 if np.isfinite(cos).any() else 0
    if excess > 1e-9:
        raise ArithmeticError(f"|cosine| exceeds 1 by {excess:.3g}: the inner product is not positive definite here")
    cos = np.clip(cos, -1.0, 1.0)
    return cos if ab.per_output else float(cos)


def similarity(a: Any, b: Any, inner: str = "gaussian", method: str = "auto", mean: Any = None, cov: Any = None,
               **kwargs: Any) -> InnerResult:
    """The cosine <a, b> / sqrt(<a, a> <b, b>), with the metadata of :func:`inner`
    and the summed cost of the three inner products.

    A model of zero norm raises ValueError (the cosine is undefined); with
    ``per_output`` a dead output channel gives NaN and a warning.  Round-off
    beyond [-1, 1] (at most 1e-9) is clipped; more would be a bug and raises.
    """
    ip = globals()["inner"]
    if inner == "symmetric" and kwargs.get("degree") is None:
        # all three products at the common degree: a norm at a model's own
        # degree would mix Bombieri weights of different k
        kwargs = dict(kwargs, degree=max(_degree(a), _degree(b)))
    options = dict(centered=False, per_output=False, degree=None, budget=DEFAULT_BUDGET, orbits=True, algorithm=None)
    unknown = set(kwargs) - set(options)
    if unknown:
        raise TypeError(f"similarity() got unexpected keyword arguments {sorted(unknown)}")
    ab, aa, bb = _results(a, b, inner, method, mean, cov, joint=a is not b, **{**options, **kwargs})
    spent = [ab]  # a joint computation (closure, attention moments) yields all three at its own cost
    if a is b:
        aa = bb = ab
    elif aa is None or bb is None:
        aa, bb = ip(a, a, inner, method, mean, cov, **kwargs), ip(b, b, inner, method, mean, cov, **kwargs)
        spent += [aa, bb]
    if not ab.per_output and not isinstance(ab.value, float):  # exact or symbolic: keep it so
        x, y, z = (_to_sympy(r.value) for r in (ab, aa, bb))
        if y == 0 or z == 0:
            raise ValueError(f"model {'a' if y == 0 else 'b'} has zero norm under the {inner} inner product; "
                             "the similarity is undefined")
        cos = sympy.simplify(x / (sympy.sqrt(y) * sympy.sqrt(z)))
    else:
        cos = _float_cosine(ab, aa, bb, inner)
    return replace(
        ab,
        value=cos,
        quantity="similarity",
        exact=all(r.exact for r in spent),
        contractions=sum(r.contractions for r in spent),
        flops=sum(r.flops for r in spent),
        pairings=sum(r.pairings for r in spent),
        orbits=sum(r.orbits for r in spent),
        notes=tuple(dict.fromkeys(n for r in spent for n in r.notes)),
    )
