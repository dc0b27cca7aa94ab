"""What tsalgebra refuses, and never returns silently wrong (issue classes of
docs/refusals.md): each class stated as a property over bad inputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import tsalgebra as ts


def bilinear(seed, d=64, h=32, o=10):
    rng = np.random.default_rng(seed)
    return ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)))


# ------------------------------------------------------------ concurrency


def test_overlapping_matrix_calls_leave_blas_threads_as_they_were():
    """Two similarity matrices computed at once (started at a barrier): the
    one-thread BLAS limit of their worker pools is held by a count, so the
    last to leave restores the original, and both results are right."""
    from tsalgebra.threads import _current_threads, blas_threads

    before = _current_threads()
    models = [bilinear(s) for s in range(24)]
    serial = np.asarray(ts.similarity_matrix(models, progress=False).values)
    barrier = threading.Barrier(2)
    out: list = [None, None]
    threads_seen: list[int] = []

    def work(k):
        barrier.wait()
        out[k] = np.asarray(ts.similarity_matrix(models, progress=False).values)
        threads_seen.append(blas_threads())

    workers = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert _current_threads() == before and blas_threads() == before
    assert threads_seen == [before, before]  # a call inside another's limit sees the count to restore
    for m in out:
        np.testing.assert_allclose(m, serial, atol=1e-12)


# ------------------------------------------------------------ formula files


@pytest.mark.parametrize("formula, why", [
    ("1e999999*x1*x2", "beyond float64"),
    ("x1^999999999", "exceeds"),
    ("x1/x2", "division by a polynomial"),
    ("(x1+x2+1)^400", "exceeds"),
    ("(x1+x2+x3+x4+1)^30*(x1+1)^30", "monomials"),
    ("x1^x2", "integer literal"),
    ("1" * 200 + "*x1", "digits"),
    ("((x1+x2)", "parentheses"),
])
def test_hostile_formulas_refused_at_once_naming_file_and_line(formula, why):
    from tsalgebra.cli import parse_formulas

    with pytest.raises(ValueError, match=why) as err:
        parse_formulas(f"# a circuit\nx1*x2\n{formula}\n", ["x1", "x2", "x3", "x4"], "circuit.txt")
    assert "circuit.txt:3" in str(err.value)  # refused by the bound, before sympy sees the line


def test_ordinary_formulas_still_parse():
    from tsalgebra.cli import parse_formulas

    exprs = parse_formulas("x1*x2/2 + 3e-2*x1^2\n(x1 + 1)**3 - x2\n", ["x1", "x2"])
    assert str(exprs[0].expand()) == "0.03*x1**2 + x1*x2/2" and exprs[1].expand().coeff("x2") == -1
