"""A similarity's label names <a, b>'s algorithm; where its norms came from
other algorithms (the automatic choice plans each product on its own),
the result says which computed what."""

from __future__ import annotations

import numpy as np

import tsalgebra as ts


def test_products_by_different_algorithms_are_named():
    rng = np.random.default_rng(0)
    W = lambda *s: rng.normal(size=s)  # noqa: E731
    a = ts.Bilinear(W(3, 4), W(3, 4), W(2, 3))
    b = ts.Bilinear(W(3, 4), W(3, 4), W(2, 3))
    c = ts.Sequential(ts.Bilinear(W(3, 4), W(3, 4), W(4, 3)), ts.Bilinear(W(3, 4), W(3, 4), W(2, 3)),
                      ts.Bilinear(W(2, 2), W(2, 2), W(2, 2)))
    same = ts.similarity(a, b)
    assert not any("different algorithms" in n for n in same.notes)
    r = ts.similarity(a, c)
    each = [ts.inner(x, y).algorithm for x, y in ((a, c), (a, a), (c, c))]
    assert len(set(each)) > 1, each  # the case: the automatic choice differs between the products
    assert r.algorithm == each[0]
    assert (f"the products by different algorithms: <a, b> by {each[0]}, <a, a> by {each[1]}, <b, b> by {each[2]}"
            in r.notes)
