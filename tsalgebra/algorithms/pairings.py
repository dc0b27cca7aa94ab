"""Exact gaussian and symmetric inner products by pairing orbits.

The mechanism (:mod:`tsalgebra.pairing_sum`): join the two networks and sum
over pairings of their input legs, one planned contraction per orbit under
the declared symmetries.  Gaussian: all partial matchings, pairs joined by
the padded covariance and singletons fed the padded mean; symmetric: the
bijections between the two sides at a common degree k (lower-degree models
lifted by legs fed the constant channel), divided by k!.  Exact for any
model and measure width, exponential in the number of input copies.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

import numpy as np
import sympy

from ..measure import Gaussian, Tokens
from ..pairing_sum import Joins, PairingPlan, lift, plan_pairings, run_pairings
from ..problem import CostError, InnerProblem, Plan
from .registry import Algorithm, Triple

__all__ = ["PairingOrbits", "exact_number"]


def exact_number(v: Any) -> Any:
    """Exact results are Fractions when rational, sympy expressions when symbolic."""
    if isinstance(v, sympy.Basic):
        v = sympy.expand(v)
        if v.is_Rational:
            return Fraction(int(v.p), int(v.q))
    return v


def _same(problem: InnerProblem) -> bool | None:
    """Whether the components a and b (one network each) are one model with
    equal weights: the exchange of the two sides is then a symmetry.  None
    for networks and sums, whose data the mechanism reads itself."""
    if not problem.components:
        return None
    return problem.a is problem.b or problem.a.same_weights(problem.b)


class PairingOrbits(Algorithm):
    name = "pairings"
    title = "pairing orbits"
    inners = ("gaussian", "tokens", "symmetric")
    measures = (Gaussian, Tokens)

    def _degree(self, problem: InnerProblem) -> int:
        k = max(problem.degrees)
        if problem.degree is not None:
            if problem.degree < k:
                raise ValueError(f"degree={problem.degree} is below the models' degree {k}")
            k = problem.degree
        return k

    def _jobs(self, problem: InnerProblem, data: bool) -> tuple[Joins, Any, list[tuple[str, Any, Any, Any]]]:
        """(joins, output mask, [(label, coefficient, A, B or None)]): every
        orbit sum the product needs, on networks with or without data."""
        exact = problem.exact_numbers
        ta, tb = problem.terms("a", data), problem.terms("b", data)
        d1, o1 = problem.widths
        # The output mask (the padded constant channel 0 dropped) is read only
        # by a run: a plan (plan_pairings) reads whether there is one, so it
        # gets a zero-strided view, not a vector as wide as the outputs.  The
        # Python list it was built from took 7.1 s at 1e8 outputs (np.ones: 0.11 s).
        mask = None
        if not problem.per_output and data:
            mask = np.ones(o1, dtype=object if exact else float)
            mask[0] = 0
        elif not problem.per_output:
            mask = np.broadcast_to(1.0, (o1,))
        jobs: list[tuple[str, Any, Any, Any]] = []
        if problem.inner in ("gaussian", "tokens"):
            joins = (Joins.gaussian if problem.inner == "gaussian" else Joins.tokens)(problem.measure, exact)  # type: ignore[arg-type]
            jobs += [("<a,b>", ca * cb, A, B) for ca, A in ta for cb, B in tb]
            if problem.centered:
                jobs += [(f"E[{side}]", c, N, None) for side, terms in (("a", ta), ("b", tb)) for c, N in terms]
        else:
            k = self._degree(problem)
            joins = Joins.identity(d1, exact)
            jobs += [("<a,b>", ca * cb, lift(A, k, exact), lift(B, k, exact)) for ca, A in ta for cb, B in tb]
        return joins, mask, jobs

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        joins, mask, jobs = self._jobs(problem, data=False)
        same = _same(problem)
        plans: list[PairingPlan] = []
        total = 0.0
        for k, (label, _, A, B) in enumerate(jobs):
            try:
                pp = plan_pairings(A, B, joins, None if B is None else mask, limit - total, problem.orbits, same)
            except CostError as exc:  # the jobs after this one are not counted
                raise CostError(exc.reason if len(jobs) == 1 else f"{label}: {exc.reason}",
                                flops=total + exc.flops, extrapolated=exc.extrapolated or k + 1 < len(jobs)) from None
            plans.append(pp)
            total += pp.flops
        facts: dict[str, Any] = {
            "pairings": sum(p.pairings for p in plans), "orbits": sum(p.orbits for p in plans),
            "sums": [{"sum": label, "input_legs": pp.input_legs, "pairings": pp.pairings, "orbits": pp.orbits,
                      "largest_orbit": max(pp.orbit_sizes), "flops_total": float(pp.flops),
                      "flops_per_orbit_max": float(pp.costliest.flops),
                      "representative": json.loads(pp.costliest.to_json()),
                      "largest_intermediate": pp.largest_intermediate,
                      "largest_intermediate_bytes": 8 * pp.largest_intermediate}
                     for (label, _, _, _), pp in zip(jobs, plans)]}
        if problem.a is problem.b:  # a self-product, <a,a> or <b,b>: its one model is f in the labels
            for s in facts["sums"]:
                s["sum"] = {"<a,b>": "<f,f>", "E[a]": "E[f]", "E[b]": "E[f]"}[s["sum"]]
        if problem.inner == "symmetric":
            k = self._degree(problem)
            facts["degree"], facts["lifted"] = k, any(n.degree < k for _, n in problem.terms("a", False) +
                                                      problem.terms("b", False))
        return Plan(self.name, problem, total, 8.0 * max(p.peak_elements for p in plans), sum(p.orbits for p in plans),
                    facts=facts, payload=tuple(plans))

    def run(self, plan: Plan) -> Triple:
        problem = plan.problem
        joins, mask, jobs = self._jobs(problem, data=True)
        total: Any = 0
        means: dict[str, Any] = {"E[a]": 0, "E[b]": 0}
        for (label, coef, A, B), pp in zip(jobs, plan.payload):
            value, _ = run_pairings(pp, A, B, joins, None if B is None else mask)
            if label == "<a,b>":
                total = total + coef * value
            else:
                means[label] = means[label] + coef * value
        if problem.inner == "symmetric":
            k = plan.facts["degree"]
            total = total * Fraction(1, math.factorial(k)) if problem.exact_numbers else total / math.factorial(k)
        fields = dict(degree=plan.facts.get("degree"), lifted=plan.facts.get("lifted", False),
                      pairings=plan.facts["pairings"], orbits=plan.facts["orbits"])
        if problem.centered:
            prod = means["E[a]"] * means["E[b]"]  # per padded channel; channel 0 is dropped
            if problem.per_output:
                moment, subtracted = _number(problem, total[1:]), _number(problem, prod[1:])
            else:
                moment, subtracted = _number(problem, total), _number(problem, prod[1:].sum())
            magnitude = None if problem.exact_numbers else np.maximum(  # the means' products before their sum
                np.abs(moment), np.abs(prod[1:]) if problem.per_output else float(np.abs(prod[1:]).sum()))
            return plan.centred_result(moment, subtracted, magnitude, **fields), None, None
        return plan.result(_number(problem, total[1:] if problem.per_output else total), **fields), None, None


def _number(problem: InnerProblem, total: Any) -> Any:
    """A sum's value: a float (or float vector), or exact numbers."""
    if not problem.exact_numbers:
        return total if problem.per_output else float(total)
    return np.vectorize(exact_number, otypes=[object])(total) if problem.per_output else exact_number(total)
