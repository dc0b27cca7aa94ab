"""Plans at long contexts: the token-moments dry run counts its loops over
positions and offsets in closed form (the loops over (query, key) pairs it
replaces took 6.8 s to plan 1,000 positions and grew as n_ctx^2), and the
counts are the ones the run makes, and the ones the loops made."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.algorithms.token_moments as tm
from tsalgebra.algorithms.pairings import PairingOrbits
from tsalgebra.inner import _problem

from test_tokens import attention_lm

FLAGS = [{}, {"causal": True}, {"rotary_base": 10.0}, {"causal": True, "rotary_base": 5.0, "residual": True}]


def measure(rng, V, n, kind):
    """Tokens of one law, or of one per position: all distinct, a few shared,
    or a first position of its own and one law for the rest."""
    if kind == "uniform":
        return ts.Tokens(V, n)
    if kind == "shared":
        return ts.Tokens(V, n, rng.dirichlet(np.ones(V)))
    if kind == "per position":
        return ts.Tokens(V, n, rng.dirichlet(np.ones(V), size=n))
    laws = rng.dirichlet(np.ones(V), size=3)
    index = rng.integers(0, 3, size=n) if kind == "mixed" else np.minimum(np.arange(n), 1)
    return ts.Tokens(V, n, laws[index])


def engine(problem, dry):
    return tm.TokenMoments()._engine(problem, dry=dry)[0]


def counted(problem, dry):
    e = engine(problem, dry)
    e.run(problem.centered)
    return e.flops, e.peak


def problems(a, b, m):
    """An inner product, a similarity (three products jointly), a model with
    itself (one side), a centred similarity."""
    yield _problem(a, b, None, "auto", None, None, m, {}, joint=False)
    yield _problem(a, b, None, "auto", None, None, m, {}, joint=True)
    yield _problem(a, a, None, "auto", None, None, m, {}, joint=False)
    yield _problem(a, b, None, "auto", None, None, m, {"centered": True}, joint=True)


def old_dry_counts(e, centered):
    """The dry run as it was counted before the closed forms: (flops, peak)
    by the loops over (query, key) position pairs, read off the masks."""
    state = {"flops": 0.0, "held": 0, "peak": 0}

    def count(flops, transient=0, held=0):
        state["flops"] += float(flops)
        state["held"] += int(held)
        state["peak"] = max(state["peak"], state["held"] + int(transient))

    sides, V, law, pairs = e.sides, e.V, e.law, e.pairs
    n = sides[0].n
    reads, keys_read = [], []
    for s in sides:
        i, j = np.nonzero(np.any(s.side.mask != 0, axis=0))
        reads.append([(int(a), int(b)) for a, b in zip(i, j) if a != b])
        keys_read.append({})
        for a, b in reads[-1]:
            keys_read[-1].setdefault(a, []).append(b)
    count(0, held=sum(s.H * n * n for s in sides), transient=n * n)  # the masks (counted since, held by the run)
    for s, r in zip(sides, reads):  # the conditional tables
        H, w1, w2, dv = s.H, s.w1, s.w2, s.dv
        carried = sorted({(law[j], s.key(j - i)) for i, j in r})
        laws = {k for k, _ in carried}
        count(2.0 * H * (2 * w1 + 2 * w2 + dv) * s.side.T.shape[0] * V, held=H * (2 * w1 + 2 * w2 + dv) * V)
        block = max(1, min(V, tm._PAIR_ELEMENTS // (H * w1 * w2)))
        count(2.0 * H * V * (w1 + w2 + dv) + H * V * w1 * w2 * (3 + 2 * dv * (len(laws) + len(carried)))
              + 4.0 * H * w1 * w2 * dv * (w1 + w2) * len(carried),
              transient=H * w1 * w2 * (block + dv * (2 * len(laws) + len(carried)))
              + H * V * (w1 + w2 + dv * (1 + len(laws))),
              held=(len(carried) + 1) * H * dv * V)
    for s in sides:
        count(2.0 * s.d_out * s.side.T.shape[0] * V, held=s.d_out * V)
    for i in range(n):
        for s, kr in zip(sides, keys_read):
            count(2.0 * s.H * s.dv * V * (len(kr.get(i, [])) + 1) + 2.0 * s.d_out * s.H * s.dv * V,
                  transient=3 * s.d_out * V + s.H * s.dv * V)
        for x, y in pairs.values():
            count(2.0 * sides[x].d_out * sides[y].d_out * V,
                  transient=(sides[x].d_out + sides[y].d_out) * V * (3 if centered else 2))
    read = {name: set(reads[x]) & set(reads[y]) for name, (x, y) in pairs.items()}
    offsets = sorted({j - i for r in read.values() for i, j in r})
    groups = sorted({tuple(s.key(o) for s in sides) for o in offsets})
    if groups:
        widths = sum(max(s.width(f) for s in sides) for f in ("q1", "k1", "q2", "k2"))
        count(0, held=sum(s.H for s in sides) * V * widths + sum(s.H * s.dv for s in sides) * V)
    Hs = sum(s.H for s in sides)
    Bq, Bk = min(tm._QUERY_BLOCK, V), min(tm._KEY_BLOCK, V)
    starts = np.cumsum([0] + [s.H for s in sides])
    cross = list(pairs.values()) == [(0, 1)]
    nr, nc = (starts[1], starts[2] - starts[1]) if cross else (Hs, Hs)
    for keys in groups:
        members = [o for o in offsets if tuple(s.key(o) for s in sides) == keys]
        needed = {name: {(law[i], law[i + o]) for o in members for i in range(n) if (i, i + o) in r}
                  for name, r in read.items()}
        queries = {q for q, _ in set().union(*needed.values())}
        count(sum(4.0 * s.H * V * (s.w1 ** 2 + s.w2 ** 2) for s in sides),
              transient=((2 + (len(queries) > 1 or any(x == y for x, y in pairs.values()))) * Hs * Bq
                         + max(sides[x].H * sides[y].H for x, y in pairs.values())) * Bk * e.workers
              + V * nr * nc * len(queries)
              + max(s.H * max(s.w1, s.w2) for s in sides) * V + 3 * max(s.H * s.dv for s in sides) * V
              + sum(s.H * s.dv for s in sides) * V
              + sum(3 * sides[x].H * sides[x].dv * sides[y].H * sides[y].dv + sides[x].H * Bk * sides[y].H * sides[y].dv
                    for x, y in pairs.values()))
        for name, (x, y) in pairs.items():
            X, Y = sides[x], sides[y]
            count(4.0 * X.H * X.dv * Y.H * Y.dv * V * len(needed[name]))
        count(2.0 * V * V * sum(s.H * (s.w1 + s.w2) for s in sides)
              + 2.0 * V * V * sum(sides[x].H * sides[y].H for x, y in pairs.values()) * len(queries))
        for name, (x, y) in pairs.items():
            X, Y = sides[x], sides[y]
            for i in range(n):
                keys = [i + o for o in members if (i, i + o) in read[name]]
                if keys:
                    count(2.0 * X.H * Y.H * X.dv * Y.dv * (2 * len({law[j] for j in keys}) + Y.d_out)
                          + 2.0 * X.d_out * Y.H * Y.dv * Y.d_out)
    return state["flops"], state["peak"]


@pytest.mark.parametrize("flags_a,flags_b", [(f, f) for f in FLAGS] + [(FLAGS[0], FLAGS[3]), (FLAGS[2], FLAGS[1]),
                                                                         (FLAGS[1], {"scale": 0.0})])
@pytest.mark.parametrize("kind", ["uniform", "per position", "mixed"])
def test_planned_counts_are_the_runs(flags_a, flags_b, kind):
    """The dry run's flops and peak elements, counted in closed form, equal
    those the run counts as it goes (from the pairs it reads), at 1 to 5
    positions: causal or not, rotary or not (and the two models unlike),
    one law or laws per position, inner product, similarity, self, centred."""
    rng = np.random.default_rng(5)
    for n in (1, 2, 5):
        a, b = attention_lm(rng, 4, 3, 2, 2, n, **flags_a), attention_lm(rng, 4, 3, 1, 3, n, **flags_b)
        for problem in problems(a, b, measure(rng, 4, n, kind)):
            assert counted(problem, dry=True) == counted(problem, dry=False)


@pytest.mark.parametrize("flags", FLAGS)
def test_planned_counts_are_the_loops_they_replace(flags):
    """At 13 and 31 positions, several law patterns (the first position's
    own law, a few laws mixed, one per position): the same flops and peak as
    the loops over (query, key) pairs counted."""
    rng = np.random.default_rng(6)
    for n, kind in itertools.product((13, 31), ("uniform", "shared", "per position", "mixed", "first")):
        a, b = attention_lm(rng, 5, 3, 2, 2, n, **flags), attention_lm(rng, 5, 3, 1, 3, n, causal=True)
        for problem in problems(a, b, measure(rng, 5, n, kind)):
            e = engine(problem, dry=True)
            e.run(problem.centered)
            assert (e.flops, e.peak) == old_dry_counts(e, problem.centered)


def test_law_counts_against_every_pair(monkeypatch):
    """The closed forms over the positions' laws against sets of every
    pair, both ways of counting a diagonal's distinct pairs (a table of few
    laws, a sort of many), in blocks of a few offsets."""
    def brute(g):
        n = len(g)
        diagonal = [len({(g[i], g[i + o]) for i in range(n) if 0 <= i + o < n}) for o in range(-(n - 1), n) if o]
        pairs = {c: len({(g[i], g[j]) for i in range(n) for j in range(n) if i != j and (j < i or not c)})
                 for c in (True, False)}
        keys = {True: sum(len(set(g[:i])) for i in range(1, n)),
                False: sum(len(set(g[:i] + g[i + 1:])) for i in range(n))}
        return diagonal, pairs, keys

    rng = np.random.default_rng(7)
    for trial in range(120):
        n = int(rng.integers(2, 40))
        raw = [rng.integers(0, int(rng.integers(1, n + 1)), n), np.arange(n) // 2, np.minimum(np.arange(n), 1),
               np.arange(n)][trial % 4]
        first: dict[int, int] = {}
        g = [first.setdefault(int(v), len(first)) for v in raw]
        diagonal, pairs, keys = brute(g)
        for elements in (2**20, 5):
            monkeypatch.setattr(tm._Laws, "_ELEMENTS", elements)
            laws = tm._Laws(g)
            offsets = np.array([o for o in range(-(n - 1), n) if o])
            assert laws.diagonal_pairs(offsets).tolist() == diagonal
            assert {c: laws.read_pairs(c) for c in (True, False)} == pairs
            assert {c: laws.key_laws(c) for c in (True, False)} == keys


@pytest.mark.parametrize("flags", [{"causal": True, "rotary_base": 10000.0}, {}])
def test_a_plan_at_2000_positions_completes(flags):
    """2,000 positions (the loops took minutes): an inner product under laws
    per position, a similarity under one law, both planned as token-moments."""
    rng = np.random.default_rng(8)
    n = 2000
    a, b = (attention_lm(rng, 16, 8, 2, 4, n, **flags) for _ in range(2))
    per_position = ts.Tokens(16, n, rng.dirichlet(np.ones(16), size=n))
    plan = ts.plan_inner(a, b, measure=per_position, algorithm="token-moments", budget=1e15)
    assert plan.algorithm == "token-moments" and plan.flops > 0
    joint = ts.plan_similarity(a, b, measure=ts.Tokens(16, n), algorithm="token-moments", budget=1e15)
    assert [p.algorithm for _, p in joint.products] == ["token-moments"]


def test_pairings_plan_builds_no_output_mask():
    """The output mask is built for a run only (a plan gets a zero-strided
    view: the list it was built from took 7 s per plan at 1e8 outputs)."""
    rng = np.random.default_rng(9)
    a, b = (ts.Linear(rng.normal(size=(4, 3)), rng.normal(size=4)) for _ in range(2))
    problem = _problem(a, b, "gaussian", "auto", None, None, None, {})
    planned = PairingOrbits()._jobs(problem, data=False)[1]
    run = PairingOrbits()._jobs(problem, data=True)[1]
    assert planned.shape == run.shape and planned.strides == (0,)
    assert run.tolist() == [0.0] + [1.0] * (len(run) - 1)
    assert ts.inner(a, b, algorithm="pairings").value == pytest.approx(ts.inner(a, b).value, rel=1e-10)


def test_pairings_exact_numbers_sum_the_outputs_through_the_mask():
    """Exact weights: the run's mask holds exact 0 and 1 (objects), and the
    answer, summed over two outputs, is the rational one."""
    from fractions import Fraction

    half = Fraction(1, 2)
    L = np.array([[Fraction(1), -half], [Fraction(2, 3), Fraction(1)]], dtype=object)
    R = np.array([[half, Fraction(1)], [Fraction(-1), Fraction(1, 3)]], dtype=object)
    D = np.array([[Fraction(3, 4), Fraction(-2)], [Fraction(1, 7), Fraction(1)]], dtype=object)
    a, b = ts.Bilinear(L, R, D), ts.Bilinear(R, L, D * 2)
    got = ts.inner(a, b, algorithm="pairings")
    assert isinstance(got.value, Fraction)
    floats = [ts.Bilinear(*(m.astype(float) for m in w)) for w in ((L, R, D), (R, L, D * 2))]
    assert float(got.value) == pytest.approx(ts.inner(*floats).value, rel=1e-12)
