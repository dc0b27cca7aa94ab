"""The memory bound of single products and matrices, and the refusals' alternatives.

- ``max_memory=`` on inner, norm, similarity, plan_inner, plan_similarity
  (default: half the memory available) and ``--max-memory`` on the command
  line; the chooser skips a plan over it as one over the budget, and a
  refusal states the bytes needed and the alternatives in the interface's
  spelling;
- a budget suggested from the cheapest estimate, extrapolated or not;
- the matrix's pairwise route plans each pair as ts.similarity does (its
  memory bound, its joint budgets); a route named that does not fit is a
  MemoryBoundError with alternatives.

The bounds are tested on plans whose estimates are right (pairings,
materialize) or on toy algorithms that claim their own figures.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.algorithms import Algorithm, register, registry, unregister
from tsalgebra.cli import build_parser, main
from tsalgebra.io import save
from tsalgebra.problem import CostError, InnerProblem, MemoryBoundError, Plan, rounded_up


def bil(rng, d, h, o):
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    return ts.Bilinear(W(h, d), W(h, d), W(o, h))


@pytest.fixture(scope="module")
def wide():
    """Two one-layer models whose pairing plan holds about 450 kB (exact: a
    product of 512 x 512 blocks), planned in milliseconds."""
    rng = np.random.default_rng(0)
    return bil(rng, 512, 8, 512), bil(rng, 512, 8, 512)


def option(err: CostError, name: str):
    return next(a for a in err.alternatives if a.option == name)


# ------------------------------------------------------------ single products


def test_a_plan_over_max_memory_is_refused_with_the_bytes_it_needs(wide):
    a, b = wide
    peak = ts.plan_inner(a, b, inner="symmetric").peak_bytes
    with pytest.raises(MemoryBoundError) as err:
        ts.plan_inner(a, b, inner="symmetric", max_memory=peak / 4)
    assert isinstance(err.value, MemoryError) and err.value.needed == peak
    assert "memory bound" in str(err.value) and "budget=" not in str(err.value)  # a plan within the budget exists
    room = option(err.value, "max_memory").value
    assert peak <= room <= 1.1 * peak
    assert ts.plan_inner(a, b, inner="symmetric", max_memory=room).algorithm == "pairings"
    for call in (lambda: ts.inner(a, b, inner="symmetric", max_memory=peak / 4),
                 lambda: ts.norm(a, inner="symmetric", max_memory=peak / 4),
                 lambda: ts.similarity(a, b, inner="symmetric", max_memory=peak / 4)):
        with pytest.raises(MemoryBoundError, match="max_memory="):
            call()
    sp = ts.plan_similarity(a, b, inner="symmetric", max_memory=peak / 4)
    assert sp.refused and sp.describe()["products"][0]["needed_bytes"] == peak


@pytest.mark.parametrize("value", [0, -1, float("nan"), "1e9", True])
def test_a_bad_max_memory_is_named(wide, value):
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        ts.plan_inner(*wide, max_memory=value)


def test_the_default_bound_is_half_the_available_memory(wide, monkeypatch):
    a, b = wide
    peak = ts.plan_inner(a, b, inner="symmetric").peak_bytes
    monkeypatch.setattr("tsalgebra.problem.available_memory", lambda: int(3 * peak))
    assert InnerProblem.of(a, b).max_memory == int(1.5 * peak)
    assert ts.plan_inner(a, b, inner="symmetric").algorithm == "pairings"
    monkeypatch.setattr("tsalgebra.problem.available_memory", lambda: int(peak))  # half of it: too little
    with pytest.raises(MemoryBoundError):
        ts.plan_inner(a, b, inner="symmetric")
    monkeypatch.setattr("tsalgebra.matrix.ops.available_memory", lambda: 4000)
    from tsalgebra.matrix.ops import Ops

    assert Ops("float64", None).default_memory() == 1000  # a matrix keeps a quarter


class Greedy(Algorithm):
    """A toy that claims the fewest flops and whatever memory the test sets."""

    name = "toy-greedy"
    title = "cheap in flops, large in memory"
    measures = (ts.Gaussian,)
    peak = 1e15

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        return Plan(self.name, problem, 1.0, self.peak, 1)

    def run(self, plan: Plan):  # pragma: no cover - never chosen over the bound
        raise AssertionError("a plan over the memory bound ran")


@pytest.fixture
def greedy():
    alg = register(Greedy(), before="moments")
    try:
        yield alg
    finally:
        unregister(alg.name)


def test_the_chooser_skips_a_plan_over_the_bound_as_one_over_the_budget(wide, greedy):
    a, b = wide
    plan = ts.plan_inner(a, b, max_memory=2**30)  # the cheapest in flops does not fit: the next one runs
    assert plan.algorithm == "pairings"
    assert any(name == "toy-greedy" and "over the memory bound" in why for name, why in plan.refusals)
    greedy.peak = 100.0
    assert ts.plan_inner(a, b, max_memory=2**30).algorithm == "toy-greedy"
    greedy.peak = 1e15
    with pytest.raises(MemoryBoundError) as err:  # named, it is refused, and the one that fits is named
        ts.plan_inner(a, b, algorithm="toy-greedy", max_memory=2**30)
    assert option(err.value, "max_memory").value >= 1e15
    assert option(err.value, "algorithm").value == "pairings"


# ------------------------------------------------------------ the budget suggested


class Refusing(Algorithm):
    measures = (ts.Gaussian,)

    def __init__(self, name: str, flops: float, extrapolated: bool) -> None:
        self.name, self.flops, self.extrapolated = name, flops, extrapolated

    def plan(self, problem: InnerProblem, limit: float) -> Plan:
        raise CostError(f"{self.name} would cost {self.flops:g}", flops=self.flops, extrapolated=self.extrapolated)


def test_the_budget_suggested_is_the_cheapest_estimate_even_extrapolated(wide, monkeypatch):
    """A full count of 4e15 beside an extrapolation of 2.7e7 suggested
    budget=4.1e+15; the refusal's extrapolated flag was False."""
    monkeypatch.setattr(registry, "_REGISTRY", {"full": Refusing("full", 4.09e15, False),
                                                "partial": Refusing("partial", 2.67e7, True)})
    with pytest.raises(CostError) as err:
        ts.plan_inner(*wide, budget=1e6)
    budget = option(err.value, "budget")
    assert budget.value == rounded_up(2.67e7) == 2.7e7 and "extrapolated" in budget.why
    assert err.value.flops == 2.67e7 and err.value.extrapolated
    monkeypatch.setattr(registry, "_REGISTRY", {"full": Refusing("full", 4.09e15, False)})
    with pytest.raises(CostError) as err:
        ts.plan_inner(*wide, budget=1e6)
    assert option(err.value, "budget").value == 4.1e15 and not err.value.extrapolated
    with pytest.raises(CostError) as err:  # a named algorithm's refusal carries its flag too
        ts.plan_inner(*wide, budget=1e6, algorithm="full")
    assert not err.value.extrapolated
    monkeypatch.setattr(registry, "_REGISTRY", {"partial": Refusing("partial", 2.67e7, True)})
    with pytest.raises(CostError) as err:
        ts.plan_inner(*wide, budget=1e6, algorithm="partial")
    assert err.value.extrapolated


# ------------------------------------------------------------ matrices


def test_the_pairwise_route_plans_each_product_within_the_bound(wide):
    a, b = wide
    peak = max(ts.plan_inner(x, y, inner="symmetric").peak_bytes for x, y in ((a, b), (a, a), (b, b)))
    with pytest.raises(MemoryBoundError, match="max_memory="):
        ts.similarity_matrix([a, b], inner="symmetric", route="pairwise", max_memory=peak / 4, progress=False)
    m = ts.similarity_matrix([a, b], inner="symmetric", route="pairwise", max_memory=peak, progress=False)
    assert m.values[0, 1] == pytest.approx(ts.similarity(a, b, inner="symmetric").value, abs=1e-12)


def test_the_pairwise_route_grants_a_pair_what_similarity_grants():
    """Closure computes <a,b>, <a,a> and <b,b> in one joint plan, which
    ts.similarity lets spend three budgets; the matrix refused it at one."""
    rng = np.random.default_rng(3)
    stack = lambda: ts.Sequential(bil(rng, 4, 6, 4), bil(rng, 4, 6, 4))  # noqa: E731
    a, b = stack(), stack()
    plan = ts.plan_similarity(a, b, method="closure")
    assert [p.joint for p in plan.plans] == [True]
    budget = plan.flops / 2  # over one budget, within three
    pair = ts.similarity(a, b, method="closure", budget=budget)
    m = ts.similarity_matrix([a, b], method="closure", budget=budget, progress=False)
    assert m.route == "pairwise" and m.values[0, 1] == pytest.approx(pair.value, abs=1e-12)
    with pytest.raises(CostError):  # and refuses what it refuses
        ts.similarity_matrix([a, b], method="closure", budget=plan.flops / 4, progress=False)


@pytest.fixture(scope="module")
def outer():
    """Three models whose materialized tensors need about 11 kB at the
    smallest blocks, their prepared copies 3 kB."""
    rng = np.random.default_rng(0)
    return [bil(rng, 16, 2, 8) for _ in range(3)]


def test_a_route_named_that_does_not_fit_is_a_memory_bound_error(outer):
    with pytest.raises(MemoryBoundError, match="smallest blocks") as err:
        # 5,000 bytes: one pair's plan fits (4,416), the materialized blocks do not
        ts.similarity_matrix(outer, inner="symmetric", route="materialize", max_memory=5000, progress=False)
    assert {(a.option, a.value) for a in err.value.alternatives} >= {("route", "auto"), ("route", "pairwise")}
    room = option(err.value, "max_memory").value
    m = ts.similarity_matrix(outer, inner="symmetric", route="materialize", max_memory=room, progress=False)
    assert m.route == "materialize"


# ------------------------------------------------------------ command line


def call(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, wide, outer):
    d = tmp_path_factory.mktemp("mem")
    for k, m in enumerate(wide):
        save(m, d / f"wide{k}.safetensors")
    (d / "outer").mkdir()
    for k, m in enumerate(outer):
        save(m, d / "outer" / f"m{k}.safetensors")
    rng = np.random.default_rng(0)
    stack = lambda: ts.Sequential(bil(rng, 16, 64, 16), bil(rng, 16, 64, 16))  # noqa: E731
    save(stack(), d / "deep0.safetensors")
    save(stack(), d / "deep1.safetensors")
    return d


def test_max_memory_on_the_command_line(ckpts, capsys):
    a, b = ckpts / "wide0.safetensors", ckpts / "wide1.safetensors"
    code, out, err = call(capsys, "similarity", a, b, "--inner", "symmetric", "--max-memory", "1e5", "--json")
    assert code == 3 and "--max-memory" in err and "max_memory" not in err
    room = next(x for x in json.loads(out)["alternatives"] if x.startswith("--max-memory"))
    code, out, _ = call(capsys, "similarity", a, b, "--inner", "symmetric", *room.split(" (")[0].split())
    assert code == 0, out
    with pytest.raises(SystemExit) as bad:  # argparse: a usage error
        call(capsys, "similarity", a, b, "--max-memory", "0")
    assert bad.value.code == 2 and "--max-memory" in capsys.readouterr().err
    code, out, err = call(capsys, "plan", a, b, "--inner", "symmetric", "--max-memory", "1e5")
    assert code == 3 and "--max-memory" in out
    code, out, err = call(capsys, "matrix", ckpts / "outer", "--inner", "symmetric", "--route", "materialize",
                          "--max-memory", "5000", "--out", ckpts / "m.png")
    assert code == 3 and "--max-memory" in err and "--route pairwise" in err and "max_memory" not in err


def test_the_budget_suggested_on_the_command_line_is_the_cheapest(ckpts, capsys):
    """Quadrature's 7.7e27 flops was suggested where pairings needs about 1e9."""
    a, b = ckpts / "deep0.safetensors", ckpts / "deep1.safetensors"
    code, out, err = call(capsys, "similarity", a, b, "--budget", "1e6", "--json")
    budget = next(x for x in json.loads(out)["alternatives"] if x.startswith("--budget"))
    assert code == 3 and float(budget.split()[1]) < 1e12, budget


def test_plan_takes_every_option_it_suggests(ckpts, capsys):
    a, b = ckpts / "deep0.safetensors", ckpts / "deep1.safetensors"
    code, out, _ = call(capsys, "plan", a, b, "--budget", "1e7")  # exact refused, closure within three budgets
    assert code == 3 and "--method closure: " in out
    closure = next(line for line in out.splitlines() if line.startswith("--method closure: "))
    assert " MB" in closure, closure  # a memory figure, as the product lines have
    suggested = set()
    for budget, memory in (("1e6", None), ("1e12", "1000")):
        code, out, _ = call(capsys, "plan", a, b, "--budget", budget, "--json",
                            *(["--max-memory", memory] if memory else []))
        report = json.loads(out)
        for product in report["products"] + [p for o in report.get("other_methods", {}).values()
                                             if isinstance(o, dict) for p in o["products"]]:
            for alt in product.get("alternatives", ()):
                suggested.add(ts.problem.Alternative(alt["option"], alt["value"]).spelled(cli=True))
    assert {s.split()[0] for s in suggested} >= {"--budget", "--method", "--max-memory"}
    for flags in suggested:  # each as plan takes it (argparse exits 2 on an unrecognized one)
        build_parser().parse_args(["plan", str(a), str(b), *flags.split()])
    code, out, _ = call(capsys, "plan", a, b, "--method", "closure")
    assert code == 0 and "closure" in out and " MB" in out
    code, out, _ = call(capsys, "plan", a, b, "--method", "sampled", "--samples", "100", "--seed", "1")
    assert code == 0 and "sampled" in out


def test_a_refused_route_suggests_pairwise_only_where_a_pair_fits():
    # a named route over the bound suggested route='pairwise' (and 'auto') even where every pair was refused too
    rng = np.random.default_rng(0)
    ms = [bil(rng, 3, 4, 2) for _ in range(40)]
    pair = max(p.peak_bytes for p in ts.plan_similarity(ms[0], ms[1]).plans)  # 2,560 bytes
    for bound, suggested in ((int(1.2 * pair), True), (int(0.8 * pair), False)):
        with pytest.raises(MemoryBoundError) as err:
            ts.similarity_matrix(ms, route="materialize", max_memory=bound, progress=False)
        routes = [a.value for a in err.value.alternatives if a.option == "route"]
        assert ("pairwise" in routes) is suggested and err.value.alternatives[0].option == "max_memory"
        if suggested:  # and it runs, as suggested
            assert ts.similarity_matrix(ms[:4], route="pairwise", max_memory=bound, progress=False).route == "pairwise"
        else:
            with pytest.raises(MemoryBoundError):
                ts.similarity_matrix(ms[:4], route="pairwise", max_memory=bound, progress=False)


def test_the_pairwise_route_grants_a_pair_what_similarity_grants(monkeypatch):
    # the matrix's default bound (a quarter of the memory, for the batched routes' blocks) refused pairs that
    # ts.similarity, under its own default (half), runs: a busy machine's matrix failed where it used to run
    import tsalgebra.matrix.ops as ops
    import tsalgebra.problem as problem

    rng = np.random.default_rng(0)
    a, b = (ts.Sequential(bil(rng, 16, 32, 16), bil(rng, 16, 32, 8)) for _ in range(2))
    peak = max(p.peak_bytes for p in ts.plan_similarity(a, b).plans)
    free = lambda: int(3 * peak)  # noqa: E731 - half of it fits a pair, a quarter does not
    monkeypatch.setattr(problem, "available_memory", free)
    monkeypatch.setattr(ops, "available_memory", free, raising=False)
    want = ts.similarity(a, b).value
    m = ts.similarity_matrix([a, b], progress=False)
    assert m.values[0, 1] == pytest.approx(want, rel=1e-12)
    with pytest.raises(MemoryBoundError):  # a bound given is the pairs' bound too
        ts.similarity_matrix([a, b], route="pairwise", max_memory=int(peak / 2), progress=False)
