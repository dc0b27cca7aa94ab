"""Progress bars: when they show, and that the algorithms move the running
plan's bar by the flops they have done (never past the plan's count)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.progress as progress
from tsalgebra.algorithms.registry import choose

from test_tokens import attention_lm


class Recorder:
    """Stands for a tqdm bar: what it was opened with and how far it moved."""

    opened: list["Recorder"] = []

    def __init__(self, total, desc, unit, show, long, scale=False):
        self.total, self.desc, self.unit = total, desc, unit
        self.disable = show is False or (show is None and not long)
        self.n, self.closed = 0.0, False
        Recorder.opened.append(self)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    Recorder.opened = []
    monkeypatch.setattr(progress, "progress_bar", Recorder)
    return Recorder.opened


def _shown(bars):
    return [b for b in bars if not b.disable]


def _problem(a, b, **kw):
    from tsalgebra.inner import _problem

    return _problem(a, b, kw.pop("inner", None), kw.pop("method", "auto"), None, None, kw.pop("measure", None), kw,
                    joint=kw.pop("joint", False))


def test_token_moments_moves_the_bar_by_exactly_its_planned_flops(bars):
    """The run counts the dry run's flops as it goes: the bar ends at the
    plan's total, and it moved in many steps (the score blocks), not once."""
    rng = np.random.default_rng(0)
    a, b = (attention_lm(rng, 7, 3, 2, 2, 3, causal=True, rotary_base=5.0) for _ in range(2))
    m = ts.Tokens(7, 3)
    r = ts.similarity(a, b, measure=m, algorithm="token-moments", progress=True)
    plan = choose(_problem(a, b, measure=m, algorithm="token-moments", joint=True))
    (bar,) = _shown(bars)
    assert bar.closed and bar.unit == "flop" and "token measure" in bar.desc
    assert bar.total == plan.flops == r.flops
    assert bar.n == pytest.approx(plan.flops, rel=1e-12)


@pytest.mark.parametrize("algorithm,measure", [("moments", None), ("enumeration", "tokens"), ("pairings", None),
                                               ("quadrature", None), ("closure", None)])
def test_every_running_algorithm_moves_the_bar_within_its_plan(bars, algorithm, measure):
    rng = np.random.default_rng(1)
    if measure == "tokens":
        a, b = (attention_lm(rng, 3, 2, 1, 2, 3, causal=True) for _ in range(2))
        kw = {"measure": ts.Tokens(3, 3)}
    elif algorithm in ("moments", "closure"):  # closure: through two attention layers
        a, b = (attention_lm(rng, 4, 3, 2, 2, 3, causal=True, rotary_base=5.0) for _ in range(2))
        if algorithm == "closure":
            W = lambda *s: rng.normal(size=s) * 0.5  # noqa: E731
            a, b = (ts.Sequential(*[ts.BilinearAttention(*(W(2, 2, 2) for _ in range(5)), W(2, 2, 2), n_ctx=3,
                                                         causal=True, residual=True) for _ in range(2)],
                                  ts.position_wise(ts.Linear(W(2, 2)), 3)) for _ in range(2))
        kw = {"inner": "gaussian"}
    else:
        W = lambda *s: rng.normal(size=s)  # noqa: E731
        a, b = (ts.Bilinear(W(3, 4), W(3, 4), W(2, 3)) for _ in range(2))
        kw = {}
    ts.inner(a, b, algorithm=algorithm, progress=True, **kw)
    (bar,) = _shown(bars)
    assert bar.closed and 0 < bar.n <= bar.total * (1 + 1e-12)


def test_the_sampled_estimate_moves_the_bar_per_batch(bars):
    rng = np.random.default_rng(2)
    a, b = (ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))) for _ in range(2))
    r = ts.inner(a, b, method="sampled", samples=3000, seed=0, progress=True)
    (bar,) = _shown(bars)
    per_sample = bar.total / (3000 + 512)  # the plan: the samples and the pilot batch
    assert r.stderr is not None and bar.n == pytest.approx(3000 * per_sample, rel=0.05)


def test_when_a_bar_shows(bars):
    """True: always; False: never; None: only when the work is long (and
    then, in tqdm, only on a terminal)."""
    rng = np.random.default_rng(3)
    a = ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3)))
    for flag, shown in ((True, 1), (False, 0), (None, 0)):  # a tiny plan: not long
        bars.clear()
        ts.norm(a, progress=flag)
        assert len(_shown(bars)) == shown and all(b.closed for b in bars)
    with pytest.raises(ValueError, match="progress must be True, False or None"):
        ts.inner(a, a, progress="yes")


def test_a_run_inside_a_run_adds_no_bar_and_moves_only_its_own(bars):
    with progress.planned(100.0, "outer", True):
        progress.advance(10)
        with progress.planned(1e12, "inner", True):
            progress.advance(5e11)
            assert progress.advancer() is None  # the inner bar is hidden: nothing need be counted
        progress.advance(20)
    outer, inner = bars
    assert not outer.disable and inner.disable
    assert outer.n == 30 and outer.closed and inner.closed
    progress.advance(1)  # outside any run: nothing to move, no error
    assert outer.n == 30


def test_the_pairwise_matrix_shows_its_own_bar_only(bars, capsys):
    """Its inner products run with progress=None (a bar only where one is
    long, labelled with its pair): these tiny ones show none, only the
    matrix's bar shows."""
    rng = np.random.default_rng(4)
    models = [ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3)))
              for _ in range(3)]
    ts.similarity_matrix(models, "symmetric", route="pairwise", progress=True)
    assert bars and not _shown(bars)  # every inner product ran, none with a bar
    assert "similarity matrix (pairwise symmetric)" in capsys.readouterr().err


def test_a_real_bar_is_written_to_stderr_and_only_when_asked():
    """The real tqdm bar, in a child process (stderr not a terminal)."""
    code = ("import numpy as np, tsalgebra as ts; rng = np.random.default_rng(0); "
            "a = ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))); "
            "ts.inner(a, a, progress={}); ts.inner(a, a)")
    shown = subprocess.run([sys.executable, "-c", code.format(True)], capture_output=True, text=True, check=True)
    assert "flop" in shown.stderr
    hidden = subprocess.run([sys.executable, "-c", code.format(None)], capture_output=True, text=True, check=True)
    assert hidden.stderr == ""


def test_the_command_line_passes_no_progress(tmp_path, monkeypatch):
    from tsalgebra.cli import main
    from tsalgebra.io import save

    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        save(ts.Bilinear(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))),
             tmp_path / f"{name}.safetensors")
    seen = []
    module = sys.modules["tsalgebra.inner"]
    real = module.similarity
    monkeypatch.setattr(module, "similarity", lambda *a, **kw: seen.append(kw.get("progress")) or real(*a, **kw))
    files = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert main(["similarity", *files, "--json"]) == 0
    assert main(["similarity", *files, "--no-progress", "--json"]) == 0
    assert seen == [None, False]
