"""The memory bound where two plans ignored it: the node-gram matrix route
chose its stand-in pair's algorithm under the product default (half the
memory) instead of the matrix's bound, and Monte Carlo kept its batch of
BATCH_BYTES whatever the bound, so that a bound below one default batch
refused the estimator though smaller batches fit.
"""

from __future__ import annotations


import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.problem as problem_module
from tsalgebra.algorithms.sampled import MIN_BATCH, PILOT
from tsalgebra.problem import MemoryBoundError

from helpers import observed_peak, tiny_lm

# ------------------------------------------------------------ node-gram


def test_the_node_gram_stand_in_is_chosen_within_the_matrix_bound(monkeypatch):
    """With the product default at 200 kB (below the 304 kB of a pair's
    enumeration), a matrix bound of 10 MB chose no algorithm for the stand-in
    pair and fell back to pairs, where each pair was planned within 10 MB."""
    monkeypatch.setattr(problem_module, "available_memory", lambda: 400_000)
    assert problem_module.default_max_memory() == 200_000
    models = [tiny_lm(s) for s in range(3)]
    m = ts.similarity_matrix(models, max_memory=10**7, progress=False)
    assert m.route == "node-gram" and m.exact
    pairs = ts.similarity_matrix(models, max_memory=10**7, route="pairwise", progress=False)
    np.testing.assert_allclose(m.values, pairs.values, atol=1e-12)


def _big_and_small(hidden=2048, vocab=5, n_ctx=3, d=4):
    """A degree-4 model with large weights beside a small degree-2 one: the
    stand-in pair is the large model twice, whose enumeration needs more than
    the route's own blocks (the large model's weights once)."""
    r = np.random.default_rng(0)
    pw = lambda layer: ts.PositionWise(layer, n_ctx)  # noqa: E731
    big = ts.Sequential(pw(ts.Embedding(r.normal(size=(d, vocab)))),
                        pw(ts.Bilinear(r.normal(size=(hidden, d)), r.normal(size=(hidden, d)), r.normal(size=(d, hidden)))),
                        pw(ts.Bilinear(r.normal(size=(hidden, d)), r.normal(size=(hidden, d)),
                                       r.normal(size=(vocab, hidden)))))
    small = ts.Sequential(pw(ts.Embedding(r.normal(size=(d, vocab)))),
                          pw(ts.Bilinear(r.normal(size=(8, d)), r.normal(size=(8, d)), r.normal(size=(vocab, 8)))))
    return big, small, ts.Tokens(vocab, n_ctx)


def test_a_matrix_bound_that_refuses_the_stand_ins_algorithm_refuses_the_route():
    """A bound between the route's blocks (1.9 MB) and the stand-in pair's
    enumeration (2.4 MB): the route ran on enumeration's nodes, an algorithm
    the matrix's bound refuses.  Now it does not fit, and names the bytes."""
    big, small, measure = _big_and_small()
    pair = ts.plan_inner(big, big, measure=measure)
    assert pair.algorithm == "enumeration"
    bound = int(pair.peak_bytes) - 300_000
    with pytest.raises(MemoryBoundError) as info:
        ts.similarity_matrix([big, small], measure=measure, max_memory=bound, route="node-gram", progress=False)
    assert info.value.needed >= pair.peak_bytes
    assert info.value.alternatives[0].option == "max_memory"
    # the bytes it names are enough: the route runs within them
    m = ts.similarity_matrix([big, small], measure=measure, max_memory=int(info.value.needed), route="node-gram",
                             progress=False)
    assert m.route == "node-gram"


def test_a_matrix_bound_below_every_pair_plan_leaves_the_route_unfit():
    """tiny_lm: enumeration 304 kB, the route's blocks 401 kB; at 250 kB the
    route is costed and does not fit (a MemoryBoundError when named, with the
    bytes), not said to apply nor run."""
    models = [tiny_lm(s) for s in range(3)]
    with pytest.raises(MemoryBoundError) as info:
        ts.similarity_matrix(models, max_memory=250_000, route="node-gram", progress=False)
    assert info.value.needed >= ts.plan_inner(models[0], models[1]).peak_bytes


# ------------------------------------------------------------ Monte Carlo


def _w(rng, *shape):
    return rng.normal(size=shape) / np.sqrt(shape[-1])


def _hidden_pair():
    rng = np.random.default_rng(0)
    return tuple(ts.Bilinear(_w(rng, 2048, 32), _w(rng, 2048, 32), _w(rng, 8, 2048)) for _ in range(2))


def test_the_sampled_batch_shrinks_to_fit_the_bound():
    """Hidden width 2048: the default batch (4096) needs about 40 MB.  At
    half that the estimator was refused; now its batches shrink to fit, and
    under the Gaussian measure (drawn row by row, the same stream in any
    batches) it estimates what the default batches estimate."""
    a, b = _hidden_pair()
    full = ts.plan_inner(a, b, method="sampled", samples=6000, seed=0)
    bound = int(full.peak_bytes // 2)
    plan = ts.plan_inner(a, b, method="sampled", samples=6000, seed=0, max_memory=bound)
    assert plan.peak_bytes <= bound and MIN_BATCH <= plan.facts["batch"] < full.facts["batch"]
    assert any("to fit the memory bound" in n for n in plan.notes)
    small = ts.inner(a, b, method="sampled", samples=6000, seed=0, max_memory=bound)
    default = ts.inner(a, b, method="sampled", samples=6000, seed=0)
    assert small.value == pytest.approx(default.value, rel=1e-9)
    assert small.stderr == pytest.approx(default.stderr, rel=1e-6)


def test_the_default_batch_is_kept_where_it_fits():
    """Under the token measure the samples depend on the batch (each position
    is drawn for a whole batch): a bound that admits the default batch gives
    the estimate of an unbounded run to the bit."""
    a, b = tiny_lm(0), tiny_lm(1)
    full = ts.plan_inner(a, b, method="sampled", samples=3000, seed=0)
    at = ts.plan_inner(a, b, method="sampled", samples=3000, seed=0, max_memory=int(full.peak_bytes) + 1)
    assert at.facts["batch"] == full.facts["batch"] and at.peak_bytes == full.peak_bytes
    bounded = ts.similarity(a, b, method="sampled", samples=3000, seed=0, max_memory=int(full.peak_bytes) + 1)
    free = ts.similarity(a, b, method="sampled", samples=3000, seed=0)
    assert bounded.value == free.value and bounded.stderr == free.stderr


def test_a_bound_below_the_smallest_batch_is_refused_with_the_smallest_batchs_bytes():
    """The refusal names the peak of MIN_BATCH samples a batch (it named the
    default batch's, 40 MB, where 5.5 MB suffice), and that bound plans."""
    a, b = _hidden_pair()
    full = ts.plan_inner(a, b, method="sampled", samples=1000, seed=0)
    with pytest.raises(MemoryBoundError) as info:
        ts.plan_inner(a, b, method="sampled", samples=1000, seed=0, max_memory=10**6)
    assert info.value.needed < full.peak_bytes / 4
    suggested = next(alt.value for alt in info.value.alternatives if alt.option == "max_memory")
    plan = ts.plan_inner(a, b, method="sampled", samples=1000, seed=0, max_memory=suggested)
    assert plan.peak_bytes <= suggested and plan.facts["batch"] >= MIN_BATCH


def _wide_input_pair():
    rng = np.random.default_rng(1)
    return tuple(ts.Bilinear(_w(rng, 32, 3000), _w(rng, 32, 3000), _w(rng, 4, 32)) for _ in range(2)) + ({},)


def _lm_pair():  # the token measure, and a control variate (the attention stack truncated)
    return tiny_lm(0), tiny_lm(1), {}


def _wide_output_pair():  # per-output and centred: the pilot's outputs and products kept whole
    rng = np.random.default_rng(2)
    return tuple(ts.Bilinear(_w(rng, 32, 16), _w(rng, 32, 16), _w(rng, 1000, 32)) for _ in range(2)) + \
        ({"per_output": True, "centered": True},)


@pytest.mark.parametrize("make, share", [(_wide_input_pair, 0.1), (_lm_pair, 0.1), (_wide_output_pair, 0.2)])
def test_batches_shrunk_below_the_pilot_hold_what_the_plan_states(make, share):
    """Batches below the pilot's 512 samples: the pilot is drawn and run in
    pieces of the batch, and the run's measured peak is within the plan's
    peak_bytes (which is what the bound was compared with)."""
    a, b, kw = make()
    full = ts.plan_inner(a, b, method="sampled", samples=10, seed=0, **kw)
    bound = int(full.peak_bytes * share)
    plan = ts.plan_inner(a, b, method="sampled", samples=10, seed=0, max_memory=bound, **kw)
    assert plan.facts["batch"] < PILOT and plan.peak_bytes <= bound
    samples = 2 * plan.facts["batch"] + 300
    ts.inner(a, b, method="sampled", samples=300, seed=1, max_memory=bound, **kw)  # warm: caches, lazy imports
    used = observed_peak(lambda: ts.inner(a, b, method="sampled", samples=samples, seed=0, max_memory=bound, **kw))
    assert used <= plan.peak_bytes <= 4 * used, (used, plan.peak_bytes)
