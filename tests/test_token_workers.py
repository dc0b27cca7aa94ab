"""The token engine's score blocks and carried keys on worker threads, each
product on one thread (a busy process on one of the two cores stretched the
products batched on torch's own threads 3.5-fold): with many key and query
blocks, the heads split among the workers, several token blocks in the
carried keys and several query laws, equal to the enumeration of every token
sequence, and the same number the blocks give run in this thread."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.algorithms.token_moments as tm

from test_tokens import attention_lm


@pytest.mark.parametrize("laws", ["uniform", "per position"])
def test_worker_blocks_against_enumeration(monkeypatch, laws):
    rng = np.random.default_rng(11)
    V, n = 150, 2
    a = attention_lm(rng, V, 3, 2, 2, n, causal=True, rotary_base=10.0)
    b = attention_lm(rng, V, 3, 1, 2, n)
    measure = ts.Tokens(V, n, None if laws == "uniform" else rng.dirichlet(np.ones(V), size=n))
    want = ts.similarity(a, b, measure=measure, algorithm="enumeration", budget=1e12).value
    # blocks of 16 key and 32 query tokens: 10 x 5 blocks per offset, on 3 workers or in this thread;
    # the carried keys in blocks of 40 tokens (2 heads of 2 x 2 pair products), a's heads one per worker
    monkeypatch.setattr(tm, "_KEY_BLOCK", 16)
    monkeypatch.setattr(tm, "_QUERY_BLOCK", 32)
    monkeypatch.setattr(tm, "_PAIR_ELEMENTS", 2 * 2 * 2 * 40)
    got = {}
    for workers in (3, 1):
        monkeypatch.setattr(tm, "blas_threads", lambda: workers)
        r = ts.similarity(a, b, measure=measure, algorithm="token-moments")
        assert r.algorithm == "token-moments" and r.exact
        got[workers] = r.value
    assert got[3] == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert got[3] == pytest.approx(got[1], rel=1e-13, abs=1e-15)
