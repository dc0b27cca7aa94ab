"""Planner flop counts of the routes' einsum steps, memoized by shapes: the
routes cost their layouts with these before anything runs."""

from __future__ import annotations

from ..planner import ContractionPlan, plan_equation


class PlanCosts:
    """Plans of einsum steps by equation and operand shapes, planned once each."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, tuple[tuple[int, ...], ...]], ContractionPlan] = {}

    def plan(self, eq: str, *shapes: tuple[int, ...]) -> ContractionPlan:
        key = (eq, tuple(tuple(int(s) for s in sh) for sh in shapes))
        p = self._memo.get(key)
        if p is None:
            p = self._memo[key] = plan_equation(eq, key[1])
        return p

    def flops(self, eq: str, *shapes: tuple[int, ...]) -> int:
        return self.plan(eq, *shapes).flops


COSTS = PlanCosts()
