"""The algorithm registry, the chooser and the cost guard.

- a toy algorithm registered from outside the package is chosen, planned,
  run and reported without editing any package module;
- plans are what runs: their flops are the same in a fresh process and a
  warm one, and within 2x of the flops the contractions actually spend
  (counted independently, by instrumenting numpy's einsum and tensordot);
- nothing large is allocated before the estimate is checked, and refusals
  of astronomically large problems format without overflow.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import opt_einsum.backends.dispatch as dispatch
import pytest

import tsalgebra as ts
from tsalgebra.algorithms import Algorithm, register, registered, unregister
from tsalgebra.problem import CostError, InnerProblem, Plan

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------- models

MODELS = """
import numpy as np
import tsalgebra as ts

def models(kind):
    rng = np.random.default_rng(7)
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])
    bil = lambda d, h, o, **kw: ts.Bilinear(W(h, d), W(h, d), W(o, h), left_bias=W(h), **kw)
    if kind == "one layer":
        return bil(5, 4, 3), bil(5, 6, 3)
    if kind == "two layers":
        return (ts.Sequential(bil(3, 3, 3, residual=True), bil(3, 2, 2)),
                ts.Sequential(bil(3, 2, 3), bil(3, 3, 2)))
    att = lambda d, **kw: ts.BilinearAttention(W(2, 2, d), W(2, 2, d), W(2, 2, d), W(2, 2, d), W(2, 2, d),
                                               W(2, d, 2), n_ctx=2, **kw)
    if kind == "attention":
        return att(2, causal=True, q1_bias=W(2, 2)), att(2, rotary_base=10.0, residual=True)
    embed = ts.position_wise(ts.Linear(W(2, 3), W(2)), 2)
    return ts.Sequential(embed, att(2, causal=True)), ts.Sequential(embed, att(2, residual=True))
"""

KINDS = ["one layer", "two layers", "attention", "attention after an embedding"]


def models(kind: str):
    scope: dict = {}
    exec(MODELS, scope)  # the same definitions run in the fresh processes below
    return scope["models"](kind)


# ------------------------------------------------------------ toy algorithm


class LinearExpectation(Algorithm):
    """E[f . g] of two Linear layers under a Gaussian in closed form:
    tr(Wa C Wb^T) + (Wa m + ba) . (Wb m + bb)."""

    name = "toy-linear"
    title = "closed form for Linear layers"
    measures = (ts.Gaussian,)
    cost = 0.0  # flops the plan claims (a test knob: large values lose to other algorithms)

    def check(self, problem: InnerProblem) -> str | None:
        if not all(isinstance(m, ts.Linear) for m in (problem.a, problem.b)):
            return "it takes Linear layers only"
        if problem.centered or problem.per_output or problem.exact_numbers:
            return "it computes the plain float sum"
        return None

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        o, d = problem.a.weight.shape
        flops = self.cost or 2.0 * o * d * (d + o)
        if flops > limit:
            raise CostError(f"the closed form needs {flops:.3g} flops", flops=flops)
        return Plan(self.name, problem, flops, 8.0 * d * d, 2, facts={"closed_form": True})

    def run(self, plan: Plan):
        p = plan.problem
        law = p.measure
        C, m = law.padded_cov()[1:, 1:], law.padded_mean()[1:]
        Wa, Wb = p.a.weight, p.b.weight
        ba = p.a.bias if p.a.bias is not None else 0.0
        bb = p.b.bias if p.b.bias is not None else 0.0
        value = float(np.trace(Wa @ C @ Wb.T) + (Wa @ m + ba) @ (Wb @ m + bb))
        return plan.result(value), None, None


@pytest.fixture
def toy():
    alg = register(LinearExpectation(), before="moments")
    try:
        yield alg
    finally:
        unregister(alg.name)


def test_a_registered_algorithm_is_chosen_planned_run_and_reported(toy):
    rng = np.random.default_rng(0)
    a, b = ts.Linear(rng.normal(size=(3, 4)), rng.normal(size=3)), ts.Linear(rng.normal(size=(3, 4)))
    mean, A = rng.normal(size=4), rng.normal(size=(4, 4))
    cov = A @ A.T
    assert registered()[0] is toy
    plan = ts.plan_inner(a, b, mean=mean, cov=cov)
    assert plan.algorithm == "toy-linear" and plan.facts["closed_form"]
    assert {name for name, _ in plan.refusals} >= {"pairings"}  # the others were planned and lost on cost
    got = ts.inner(a, b, mean=mean, cov=cov)
    want = ts.inner(a, b, mean=mean, cov=cov, algorithm="pairings")
    assert got.algorithm == "toy-linear" and got.exact and got.flops == plan.flops
    assert got.value == pytest.approx(want.value, rel=1e-12)
    sim = ts.similarity(a, b, mean=mean, cov=cov)
    assert sim.algorithm == "toy-linear" and "toy-linear" in repr(sim)
    assert sim.value == pytest.approx(ts.similarity(a, b, mean=mean, cov=cov, algorithm="pairings").value, rel=1e-12)
    # named, it runs; where it does not apply it says why
    assert ts.inner(a, b, algorithm="toy-linear").algorithm == "toy-linear"
    bil = ts.Bilinear(rng.normal(size=(2, 4)), rng.normal(size=(2, 4)), rng.normal(size=(3, 2)))
    with pytest.raises(ValueError, match="toy-linear.*Linear layers only"):
        ts.inner(bil, bil, algorithm="toy-linear")
    assert ts.inner(bil, bil).algorithm != "toy-linear"
    # the rule is the cheapest plan: a costlier claim loses to the pairing orbits
    toy.cost = 1e10
    assert ts.plan_inner(a, b).algorithm != "toy-linear"
    toy.cost = 0.0


def test_a_registered_name_must_be_new(toy):
    with pytest.raises(ValueError, match="new name"):
        register(LinearExpectation())


# ------------------------------------------------------------- cost guard


def _start(code: str) -> subprocess.Popen:
    """Start ``code`` (after the model definitions) in a fresh interpreter; it
    prints one JSON line, read by :func:`_result`."""
    script = MODELS + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def _result(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _fresh(code: str) -> dict:
    return _result(_start(code))


def test_estimates_are_the_same_cold_and_warm():
    cold = _start(f"""
        import json
        flops = {{}}
        for kind in {KINDS!r}:
            a, b = models(kind)
            first = ts.plan_inner(a, b, algorithm="pairings").flops
            flops[kind] = [first, ts.plan_inner(a, b, algorithm="pairings").flops]
        print(json.dumps(flops))
    """)
    # planned here while the fresh process plans there (one core each: the
    # orbits of the attention pairs take most of a minute to plan)
    warm = {kind: ts.plan_inner(*models(kind), algorithm="pairings").flops for kind in KINDS}
    cold = _result(cold)
    for kind in KINDS:
        assert cold[kind][0] == cold[kind][1] == warm[kind], kind


def test_a_fresh_process_refuses_what_exceeds_the_budget():
    a, b = models("two layers")
    cost = ts.plan_inner(a, b, algorithm="pairings").flops
    got = _fresh(f"""
        import json
        a, b = models("two layers")
        try:
            ts.inner(a, b, algorithm="pairings", budget={cost * 0.95!r})
            refused = False
        except ts.CostError as exc:
            refused = exc.flops
        ran = ts.inner(a, b, algorithm="pairings", budget={cost * 1.05!r})
        print(json.dumps({{"refused": refused, "flops": ran.flops}}))
    """)
    assert got["refused"] == cost and got["flops"] == cost


class _Counter:
    """Flops of the contractions numpy actually executes, counted from the
    operands' shapes the way opt_einsum counts them (independently of any
    plan): einsum, all index sizes times (terms - 1, + 1 when an index is
    summed); tensordot, twice the product of all index sizes; matmul, twice
    the output's size times the summed length."""

    def __init__(self, monkeypatch) -> None:
        self.flops = 0
        einsum, tensordot = np.einsum, np.tensordot

        def counted_einsum(eq, *ops, **kw):
            if isinstance(eq, str) and "->" in eq:
                ins, out = eq.replace(" ", "").split("->")
                sizes = {}
                for term, op in zip(ins.split(","), ops):
                    sizes.update(zip(term, np.shape(op)))
                factor = max(1, len(ops) - 1) + (1 if set(ins) - {","} - set(out) else 0)
                self.flops += math.prod(sizes.values()) * factor
            return einsum(eq, *ops, **kw)

        def counted_tensordot(x, y, axes=2):
            ax = axes if not isinstance(axes, int) else (list(range(-axes, 0)), list(range(axes)))
            ay = [a % np.ndim(y) for a in np.atleast_1d(ax[1])]
            free = [s for k, s in enumerate(np.shape(y)) if k not in ay]
            self.flops += 2 * math.prod(np.shape(x)) * math.prod(free)
            return tensordot(x, y, axes)

        def counted_matmul(x, y, *args, **kw):
            out = matmul(x, y, *args, **kw)
            self.flops += 2 * math.prod(np.shape(out)) * np.shape(x)[-1]
            return out

        matmul = np.matmul
        monkeypatch.setattr(np, "einsum", counted_einsum)  # layers that evaluate themselves (attention) call numpy
        monkeypatch.setattr(np, "matmul", counted_matmul)
        monkeypatch.setitem(dispatch._cached_funcs, ("einsum", "numpy"), counted_einsum)
        monkeypatch.setitem(dispatch._cached_funcs, ("tensordot", "numpy"), counted_tensordot)
        monkeypatch.setattr(np, "tensordot", counted_tensordot)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algorithm", ["pairings", "quadrature"])
def test_estimates_are_within_2x_of_the_flops_spent(kind, algorithm, monkeypatch):
    a, b = models(kind)
    plan = ts.plan_inner(a, b, algorithm=algorithm, centered=True)
    counter = _Counter(monkeypatch)
    result = ts.inner(a, b, algorithm=algorithm, centered=True)
    assert result.flops == plan.flops
    assert plan.flops / 2 <= counter.flops <= 2 * plan.flops, (counter.flops, plan.flops)


def test_nothing_large_is_allocated_before_a_refusal():
    """An attention layer at d_model 256 and 64 positions: the flat input has
    16,384 features (a flat covariance alone would be 2 GiB)."""
    rng = np.random.default_rng(0)
    H, dh, d, n = 8, 32, 256, 64
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    make = lambda **kw: ts.BilinearAttention(W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d), W(H, dh, d),  # noqa: E731
                                             W(H, d, dh), n_ctx=n, causal=True, **kw)
    a, b = make(rotary_base=10000.0, q1_bias=W(H, dh), k1_bias=W(H, dh)), make()
    tracemalloc.start()
    try:
        for call in (lambda: ts.inner(a, b), lambda: ts.similarity(a, b), lambda: ts.plan_similarity(a, b)):
            try:
                call()
            except ts.CostError as exc:
                assert exc.flops > 1e11 and "budget=" in str(exc)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the models' canonical copies (3 MiB a weight) and the three products' plans: 31 MiB
    assert peak < 40 * 2**20, f"{peak / 2**20:.1f} MiB traced before the refusal"


def test_astronomical_costs_format_and_serialize():
    """A depth-3 stack of input width 330: 16 input legs per product and a
    quadrature grid of 9^330 nodes; every figure stays a float."""
    rng = np.random.default_rng(1)
    layer = lambda d, o: ts.Bilinear(rng.normal(size=(2, d)), rng.normal(size=(2, d)), rng.normal(size=(o, 2)))  # noqa: E731
    deep = ts.Sequential(layer(330, 2), layer(2, 2), layer(2, 2))
    with pytest.raises(ts.CostError) as refused:
        ts.similarity(deep, deep)
    text = str(refused.value)
    assert "9^330" in text and "method='closure'" in text and "inner='network'" in text
    assert "--method closure" in refused.value.explain(cli=True)
    report = ts.plan_similarity(deep, deep).describe()
    assert report["products"][0]["refused"] and not report["within_budget"]
    json.dumps(report)  # no 300-digit integer, no inf where JSON has none: the CLI writes it through _jsonable
    assert all(isinstance(p.get("estimated_flops", 0.0), float) for p in report["products"])


def test_a_refusals_budget_admits_the_whole_similarity():
    """The budget a refusal suggests runs the similarity: per inner product
    (it was divided by three for every similarity, joint plan or not), from a
    full count (not a pairing-orbit extrapolation, which fell short), and the
    largest of the three products' (the self-products, planned before
    anything runs).  A budget of 0 is refused, not a ZeroDivisionError."""
    rng = np.random.default_rng(0)
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    stack = lambda h: ts.Sequential(ts.Bilinear(W(h, 3), W(h, 3), W(3, h)),  # noqa: E731
                                    ts.Bilinear(W(h, 3), W(h, 3), W(2, h)))
    a, b = stack(2), stack(4)  # <b,b> costs the most
    plans = ts.plan_similarity(a, b).plans
    assert len(plans) == 3 and not plans[0].joint
    for budget in (0.0, 1e3):
        with pytest.raises(ts.CostError) as info:
            ts.similarity(a, b, budget=budget)
        suggested = next(alt.value for alt in info.value.alternatives if alt.option == "budget")
        assert suggested >= max(p.flops for p in plans)
        result = ts.similarity(a, b, budget=suggested)
        assert result.exact and result.value == pytest.approx(ts.similarity(a, b).value, rel=1e-12)
    with pytest.raises(ts.CostError, match=r"<b,b>"):  # <a,b> fits, <b,b> does not: refused before any run
        ts.similarity(a, b, budget=plans[0].flops)


def test_long_sequences_are_refused_before_their_positions_are_enumerated():
    """A one-layer pair of d_model 4 at 256 positions: the Gaussian moments
    programme enumerated its 16.8 M (query, key, key) triples before costing
    them (41 s and over a GB to plan); at 10,000 positions the token
    measure's (query, key) pairs ran out of memory.  Both are refused at once."""
    from tsalgebra.algorithms.moments import MAX_POSITION_TUPLES

    rng = np.random.default_rng(0)
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    make = lambda n: ts.BilinearAttention(*(W(1, 2, 4) for _ in range(5)), W(1, 4, 2), n_ctx=n, causal=True)  # noqa: E731
    tracemalloc.start()
    try:
        with pytest.raises(ts.CostError, match=r"256 positions give 16,777,216 \(query, key, key\) triples"):
            ts.plan_inner(make(256), make(256), algorithm="moments")
        lm = lambda: ts.Transformer(ts.Embedding(W(4, 3)), [(make(3000), None)], ts.Linear(W(2, 4)), n_ctx=3000)  # noqa: E731
        with pytest.raises(ts.CostError, match=r"3,000 positions give 9,000,000 \(query, key\) pairs"):
            ts.plan_inner(lm(), lm(), algorithm="token-moments")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 256 ** 3 > MAX_POSITION_TUPLES and peak < 64 * 2**20
    assert ts.plan_inner(make(128), make(128), algorithm="moments").algorithm == "moments"


def test_wide_inputs_do_not_form_their_identity():
    """N(0, I) and the network product formed a (width + 1)^2 identity that
    no plan counted: 984 MB for a 2 x 8000 layer (74.5 GiB asked at 100,000
    inputs).  The diagonal is used as such, and the network recursion starts
    from the first layer's own Gram."""
    rng = np.random.default_rng(0)
    d = 8000
    Wa, Wb = rng.normal(size=(2, d)), rng.normal(size=(2, d))
    a, b = ts.Linear(Wa), ts.Linear(Wb)
    La, Ra, Lb, Rb = (rng.normal(size=(2, d)) for _ in range(4))
    ba, bb = ts.Bilinear(La, Ra, np.eye(2)), ts.Bilinear(Lb, Rb, np.eye(2))
    tracemalloc.start()
    try:
        gauss = ts.inner(a, b).value
        net = ts.inner(ba, bb, "network").value
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert gauss == pytest.approx(float(np.sum(Wa * Wb)), rel=1e-10)  # E[(Wa x).(Wb x)] = tr(Wa Wb^T)
    assert net == pytest.approx(ts.inner(ba, bb, "symmetric").value, rel=1e-10)  # one layer: the same product
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_hermite_counts_its_work_over_pairs_of_positions():
    """Its planned flops did not depend on the positions (4.7e4 at 8, 64 or
    1024): budget= never stopped it, and 100,000 positions ran out of memory."""
    rng = np.random.default_rng(0)
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    make = lambda n: ts.BilinearAttention(*(W(1, 2, 4) for _ in range(5)), W(1, 4, 2), n_ctx=n, causal=True)  # noqa: E731
    small, large = (ts.plan_inner(make(n), make(n), algorithm="hermite").flops for n in (8, 64))
    assert large > 30 * small
    with pytest.raises(ts.CostError, match=r"100,000 positions give"):
        ts.plan_inner(make(100_000), make(100_000), algorithm="hermite")
