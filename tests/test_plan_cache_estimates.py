"""A contraction plan, and so every flop and memory estimate read from it,
is the same cold as warm: the planner's cache returns a plan only for the
equation and shapes it was made for.  It used to key by topology alone, so a
network planned after the same wiring at other sizes got the other sizes'
order recounted (a depth-2 bilinear stack at (16, 64, 8): 1.03e8 flops after
the stack at (2, 3, 2), 2.87e7 cold)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.engine import evaluation_network
from tsalgebra.planner import plan_equation


def stack(d: int, h: int, o: int, depth: int, seed: int = 0) -> ts.Sequential:
    r = np.random.default_rng(seed)
    return ts.Sequential(*[ts.Bilinear(r.normal(size=(h, d)), r.normal(size=(h, d)),
                                       r.normal(size=(d if i < depth - 1 else o, h))) for i in range(depth)])


def facts(p: ts.ContractionPlan) -> tuple:
    return p.flops, p.largest_intermediate, p.optimizer, p.path


@pytest.fixture
def empty_cache():
    size = getattr(ts.plan_cache, "maxsize", None)
    ts.plan_cache.clear()
    yield ts.plan_cache
    if size is not None:
        ts.plan_cache.maxsize = size
    ts.plan_cache.clear()


# (what is planned, the same topology at other sizes planned first)
CASES = {
    # the model's expression: dp at (16, 64, 8), greedy's order at (2, 3, 2)
    "expression": (lambda: stack(16, 64, 8, 2).expression, lambda: stack(2, 3, 2, 2).expression),
    # the engine's evaluation network: batch 4096 after batch 1 (more memory cold, 6.3e5 elements for 2.7e5 warm)
    "evaluation": (lambda: evaluation_network(stack(16, 64, 8, 2).expression, 4096),
                   lambda: evaluation_network(stack(16, 64, 8, 2).expression, 1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_plan_after_other_sizes_is_the_cold_plan(empty_cache, case):
    target, other = CASES[case]
    cold = ts.plan(target())
    empty_cache.clear()
    ts.plan(other())
    warm = ts.plan(target())
    assert facts(warm) == facts(cold)


def test_an_equation_after_other_sizes_is_the_cold_plan(empty_cache):
    """The similarity matrix's formation plan: which pair of three operands
    goes first depends on the sizes (6.80e6 flops and 4e5 elements warm
    against 6.46e6 and 6.4e4 cold)."""
    eq, shapes = "oh,hi,hj->oij", ((50, 1000), (1000, 8), (1000, 8))
    cold = plan_equation(eq, shapes)
    empty_cache.clear()
    plan_equation(eq, ((2, 4), (4, 100), (4, 100)))
    assert facts(plan_equation(eq, shapes)) == facts(cold)


def test_the_cache_serves_repeated_shapes_only(empty_cache):
    """Same equation and shapes (other data): one search, then the stored
    plan; other sizes search again, and both stay cached."""
    a, b, c = stack(16, 64, 8, 2, seed=1), stack(16, 64, 8, 2, seed=2), stack(4, 8, 2, 2)
    first = ts.plan(a.expression)
    assert ts.plan(b.expression) is first
    assert empty_cache.info() == {"hits": 1, "misses": 1, "size": 1}
    ts.plan(c.expression)
    assert empty_cache.info() == {"hits": 1, "misses": 2, "size": 2}
    assert ts.plan(a.expression) is first


def test_uncached_and_evicted_plans_are_the_same(empty_cache):
    """cache=False, a hit, and a plan made again after its eviction agree."""
    nets = [stack(16, 64, 8, 2).expression, stack(4, 8, 2, 2).expression, stack(8, 16, 4, 2).expression]
    uncached = [facts(ts.plan(n, cache=False)) for n in nets]
    assert len(empty_cache) == 0
    empty_cache.maxsize = 2
    for _ in range(2):
        assert [facts(ts.plan(n)) for n in nets] == uncached
        assert len(empty_cache) == 2


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from test_plan_cache_estimates import cold_facts
print(json.dumps(cold_facts()))
"""


def cold_facts() -> dict:
    """Plans and the matrix's planned formation, as JSON-able facts."""
    rng = np.random.default_rng(3)
    models = [ts.Bilinear(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), rng.normal(size=(40, 300)))
              for _ in range(4)]
    res = ts.similarity_matrix(models, inner="symmetric")
    out = {name: [list(x) if isinstance(x, tuple) else x for x in facts(ts.plan(target()))]
           for name, (target, _) in sorted(CASES.items())}
    out["matrix"] = {route: {k: [p.flops, p.largest_intermediate] for k, p in c.plans}
                     for route, c in sorted(res.candidates.items())}
    return json.loads(json.dumps(out))


def test_warm_estimates_equal_a_fresh_process(empty_cache):
    """The plans and the similarity matrix's candidate plans of a fresh
    process, against this one after the same topologies at other sizes."""
    script = _CHILD.format(tests=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(4)
    ts.similarity_matrix([ts.Bilinear(rng.normal(size=(4, 100)), rng.normal(size=(4, 100)), rng.normal(size=(2, 4)))
                          for _ in range(4)], inner="symmetric")
    for _, other in CASES.values():
        ts.plan(other())
    assert cold_facts() == json.loads(done.stdout)
