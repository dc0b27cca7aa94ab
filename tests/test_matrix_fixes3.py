"""Matrix fixes, third round: a matrix figure's default title says how its
values were obtained; a named route's memory refusal suggests a bound that
admits it; progress bars offered by estimated time (per-algorithm rates),
the pairwise route's bar by its products' estimated time, its products'
bars labelled with their pair."""

from __future__ import annotations

import io
import re
import sys
import time

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import tsalgebra as ts  # noqa: E402
import tsalgebra.progress as progress  # noqa: E402
from tsalgebra.matrix import pairwise  # noqa: E402
from tsalgebra.problem import HEAVY_TAILS, MemoryBoundError  # noqa: E402


def stacks(seed=5, n=3):
    """Two-layer stacks: the pairwise route for every method, closure approximate."""
    rng = np.random.default_rng(seed)
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    return [ts.Sequential(ts.Bilinear(W(4, 3), W(4, 3), W(3, 4)), ts.Bilinear(W(4, 3), W(4, 3), W(2, 4)))
            for _ in range(n)]


def bil(rng, d, h, o):
    W = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    return ts.Bilinear(W(h, d), W(h, d), W(o, h))


# ------------------------------------------------------------ 1. the figure says how


@pytest.fixture(scope="module")
def matrices():
    models = stacks()
    return {"exact": ts.similarity_matrix(models, progress=False),
            "closure": ts.similarity_matrix(models, method="closure", centered=True, progress=False),
            "sampled": ts.similarity_matrix(models, method="sampled", samples=500, seed=0, progress=False)}


def test_the_default_title_says_exact_approximate_or_estimated(matrices):
    titles = {k: m.plot().axes[0].get_title() for k, m in matrices.items()}
    for k, m in matrices.items():
        assert m.accuracy in repr(m) and m.accuracy in titles[k]  # as the repr writes it
        assert "N(0, I)" in titles[k] and f"route {m.route}" in titles[k]
    assert "exact" in titles["exact"] and "approximate" not in titles["exact"] and "centred" not in titles["exact"]
    assert "closure (approximate)" in titles["closure"] and "centred" in titles["closure"]
    s, m = titles["sampled"], matrices["sampled"]
    assert "sampled (estimated" in s
    worst = float(np.max(m.stderr))
    assert f"\u00b1{worst:.2g}" in s  # the largest standard error
    assert np.any(m.heavy_tailed) and HEAVY_TAILS in s  # these 500 samples are heavy-tailed (the repr says so)


def test_estimated_cells_carry_their_errors_and_heavy_tails_are_outlined(matrices):
    from matplotlib.patches import Rectangle

    m = matrices["sampled"]
    ax = m.plot().axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert f"{m.values[0, 1]:.2f}\n\u00b1{m.stderr[0, 1]:.2f}" in texts
    assert "1.00" in texts  # the diagonal: no error
    outlined = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert len(outlined) == int(np.count_nonzero(m.heavy_tailed))
    plain = matrices["exact"].plot().axes[0]
    assert not any("\u00b1" in t.get_text() for t in plain.texts) and not plain.patches


def test_a_title_given_is_kept(matrices):
    assert matrices["closure"].plot(title="mine").axes[0].get_title() == "mine"


def test_the_command_line_figure_says_approximate(tmp_path, monkeypatch, capsys):
    from tsalgebra import plots
    from tsalgebra.cli import main
    from tsalgebra.io import save

    for k, m in enumerate(stacks(n=2)):
        save(m, tmp_path / f"m{k}.safetensors")
    titles = []
    real = plots.plot_matrix
    monkeypatch.setattr(plots, "plot_matrix", lambda *a, **kw: titles.append(kw.get("title")) or real(*a, **kw))
    files = [str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors")]
    assert main(["matrix", *files, "--out", str(tmp_path / "m.png"), "--method", "closure", "--centered",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert len(titles) == 1 and "closure (approximate)" in titles[0] and "centred" in titles[0]


# ------------------------------------------------------------ 2. a bound suggested admits the route


@pytest.mark.parametrize("route,max_memory", [("pairwise-gram", 100), ("pairwise-gram", 2000),
                                              ("materialize", 10), ("materialize", 5000)])
def test_the_memory_bound_suggested_for_a_named_route_admits_it(route, max_memory):
    """The preparation's refusal suggested room for the prepared models alone
    (3.1e3 bytes here), which the route's blocks then refused (3.71e3)."""
    rng = np.random.default_rng(0)
    models = [bil(rng, 16, 2, 8) for _ in range(3)]
    with pytest.raises(MemoryBoundError) as err:
        ts.similarity_matrix(models, route=route, max_memory=max_memory, progress=False)
    (room,) = [a.value for a in err.value.alternatives if a.option == "max_memory"]
    m = ts.similarity_matrix(models, route=route, max_memory=room, progress=False)
    assert m.route == route


def test_the_route_refusal_spells_the_argument_as_python_does():
    from tsalgebra.cli import _cli_spelling

    rng = np.random.default_rng(0)
    models = [bil(rng, 16, 2, 8) for _ in range(3)]
    with pytest.raises(MemoryBoundError) as err:  # the prepared models fit, the blocks do not
        ts.similarity_matrix(models, route="pairwise-gram", max_memory=3100, progress=False)
    assert "route='pairwise-gram' needs about" in str(err.value)
    text, found = _cli_spelling(str(err.value))
    assert found and "--route pairwise-gram needs about" in text and "route=" not in text


def test_a_route_that_does_not_apply_is_said_so_not_given_a_bound():
    rng = np.random.default_rng(0)
    models = [ts.Sequential(bil(rng, 6, 8, 6), bil(rng, 6, 8, 3)) for _ in range(3)]  # not one bilinear layer
    with pytest.raises(ValueError, match="route='materialize' is not available here"):
        ts.similarity_matrix(models, route="materialize", max_memory=10, progress=False)


# ------------------------------------------------------------ 3. bars by estimated time


class Recorder:
    """Stands for a tqdm bar: what it was opened with."""

    def __init__(self, opened, total, desc, unit, show, long, scale=False):
        self.total, self.desc, self.show, self.long = total, desc, show, long
        self.disable = show is False or (show is None and not long)
        self.n = 0.0
        opened.append(self)

    def update(self, n):
        self.n += n

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    opened = []
    monkeypatch.setattr(progress, "progress_bar", lambda *a, **kw: Recorder(opened, *a, **kw))
    return opened


def test_a_long_monte_carlo_run_is_offered_a_bar_though_its_flops_are_few(bars):
    """3,000,000 samples of the probe's models took 41 s; their 5.8e9 flops
    were under the 2e10 the bar asked for."""
    rng = np.random.default_rng(0)
    a, b = (ts.Sequential(ts.Linear(rng.normal(size=(8, 8))), bil(rng, 8, 16, 4)) for _ in range(2))
    plan = ts.plan_inner(a, b, method="sampled", samples=3_000_000, seed=0)
    assert plan.flops < 2e10 and progress.estimated_seconds(plan.flops, "sampled") > 10
    with progress.planned(plan.flops, "Monte Carlo estimate", None):  # the title, as the registry passes it
        pass
    assert bars[-1].long
    small = ts.plan_inner(a, b, method="sampled", samples=1000, seed=0)
    assert not progress.is_long(small.flops, "Monte Carlo estimate")
    # the exact algorithms keep their own rates: pairings runs 10x faster per flop than sampling
    assert progress.is_long(2e9, "pairings") and not progress.is_long(5e8, "pairings")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_an_offered_bar_is_drawn_only_once_the_work_has_run_a_while(monkeypatch):
    monkeypatch.setattr(progress, "_DELAY", 0.05)
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = progress.progress_bar(100, "short", "flop", None, True)
    bar.update(100)
    bar.close()
    assert screen.getvalue() == ""  # done before the delay: nothing drawn
    bar = progress.progress_bar(100, "long", "flop", None, True)
    time.sleep(0.1)
    bar.update(50)
    assert "long" in screen.getvalue()
    bar.close()
    screen.truncate(0)
    progress.progress_bar(100, "asked", "flop", True, False).close()  # progress=True: at once
    assert "asked" in screen.getvalue()


def test_the_pairwise_route_offers_its_bar_by_estimated_time_not_pair_count(monkeypatch, bars):
    """Two models, three products (the bar needed 50): long when their
    planned work is long at the algorithm's rate; each product's own bar
    offered too, labelled with its pair."""
    models = stacks(n=2)
    offered = []
    real = pairwise.progress_bar
    monkeypatch.setattr(pairwise, "progress_bar", lambda *a, **kw: offered.append(a[4]) or real(*a, **kw))
    monkeypatch.setattr(pairwise, "_terminal", lambda: True)
    ts.similarity_matrix(models, route="pairwise", progress=None)
    assert offered == [False]  # tiny products: short
    monkeypatch.setattr(progress, "RATES", {k: 1e3 for k in progress.RATES})  # as if each product took seconds
    bars.clear()
    ts.similarity_matrix(models, route="pairwise", progress=None)
    assert offered[-1] is True
    assert {b.desc for b in bars} == {f"Gauss-Hermite quadrature {p}" for p in ("<0,1>", "<0,0>", "<1,1>")}
    assert all(b.show is None and b.long for b in bars)  # offered as ts.similarity offers them
    bars.clear()
    ts.similarity_matrix(models, route="pairwise", progress=False)
    assert all(b.show is False for b in bars)


def test_the_pairwise_estimate_counts_products_and_calls():
    models = stacks(n=4)
    from tsalgebra.matrix import api

    job = api._job(models, None, "gaussian", "auto", None, False, None, None, None, False, {}, "pairwise")
    A, _ = pairwise._canonical(job.rows)
    one = pairwise.seconds_of(job, A[0], A[-1], 1, 0)
    six = pairwise.seconds_of(job, A[0], A[-1], 6, 4)
    assert one >= pairwise._CALL_SECONDS and six > 6 * one


def test_labelled_runs_name_their_bars(bars):
    rng = np.random.default_rng(1)
    a = bil(rng, 3, 3, 2)
    with progress.labelled("<a,b>"):
        ts.inner(a, a, progress=True)
    ts.inner(a, a, progress=True)
    assert [re.sub(r"^.* ", "", b.desc) for b in bars] == ["<a,b>", "orbits"]
