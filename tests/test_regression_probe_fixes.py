"""What a probe of the last changes and of the control variate's accounting
found (the probes of /tmp/probe_reg and /tmp/probe_cv): refusals by an
algorithm's fixed limits when it is named, exact and symbolic operations
counted and said as such, joint estimates' units, token tail figures beyond
1e-300, verify offering what it takes, and the control variate's effect said
of the value each result returns."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import sympy
import torch
from torch import nn

import tsalgebra as ts
from tsalgebra.adapters import BilinearAttentionModule
from tsalgebra.algorithms.registry import EXACT_FLOP_COST, SYMBOLIC_FLOP_COST
from tsalgebra.algorithms.sampled import DEGREE_CEILING, TAIL_CEILING, Estimate
from tsalgebra.cli import _cli_spelling
from tsalgebra.inner import joint_inner


def _bilinear(rng, d, o):
    return ts.Bilinear(rng.standard_normal((d, d)), rng.standard_normal((d, d)), rng.standard_normal((o, d)))


def test_a_named_algorithm_refused_by_its_fixed_limits_is_not_applicable():
    """46 million pairings: the automatic choice said so (NotApplicableError);
    naming the algorithm said "the budget is inf flops" (a CostError, exit 3)."""
    rng = np.random.default_rng(0)
    m = ts.exactify(ts.Sequential(_bilinear(rng, 2, 2), _bilinear(rng, 2, 2), _bilinear(rng, 2, 1)))
    for budget in (None, math.inf):
        kw = {} if budget is None else {"budget": budget}
        with pytest.raises(ts.NotApplicableError) as err:
            ts.inner(m, m, algorithm="pairings", **kw)
        said = str(err.value)
        assert "pairings does not apply within its fixed limits" in said and "the budget is" not in said


def test_fixed_limits_are_named_only_where_one_refused():
    torch.manual_seed(0)
    m = ts.from_torch(nn.Sequential(BilinearAttentionModule(1, 2, 2, n_ctx=2), nn.Linear(2, 2)).double())
    with pytest.raises(ts.NotApplicableError) as err:
        ts.inner(m, m, inner="network")
    assert "no exact algorithm applies (" in str(err.value) and "fixed limits" not in str(err.value)


def test_exact_and_symbolic_operations_are_said_and_costed_as_such():
    rng = np.random.default_rng(0)
    f = ts.Sequential(_bilinear(rng, 4, 4), _bilinear(rng, 4, 2))
    m = ts.exactify(f)
    with pytest.raises(ts.CostError) as err:
        ts.inner(m, m, budget=1e8)
    assert "pairings: in exact operations, exact gaussian enumeration" in str(err.value)
    assert "each counted as 1,000 float64 flops" in str(err.value)
    plan = ts.plan_inner(m, m)
    assert plan.facts["flops_per_exact_operation"] == EXACT_FLOP_COST
    assert plan.flops == pytest.approx(EXACT_FLOP_COST * plan.facts["sums"][0]["flops_total"])
    assert any("its other counts are exact operations" in n for n in plan.notes)

    def symbolic(tag, d, o):  # one layer of sympy symbols
        sym = lambda rows, cols, k: np.array([[sympy.Symbol(f"{tag}{k}{i}_{j}") for j in range(cols)]  # noqa: E731
                                              for i in range(rows)], dtype=object)
        return ts.Bilinear(sym(d, d, "l"), sym(d, d, "r"), sym(o, d, "d"))

    s = ts.Sequential(symbolic("a", 2, 2), symbolic("b", 2, 1))
    numeric = ts.exactify(ts.Sequential(_bilinear(rng, 2, 2), _bilinear(rng, 2, 1)))
    sp, npl = ts.plan_inner(s, s), ts.plan_inner(numeric, numeric)
    assert sp.facts["flops_per_exact_operation"] == SYMBOLIC_FLOP_COST  # two layers ran at 690 operations a second
    assert SYMBOLIC_FLOP_COST > EXACT_FLOP_COST
    assert sp.flops == pytest.approx(npl.flops / EXACT_FLOP_COST * SYMBOLIC_FLOP_COST)
    assert any(n.startswith("symbolic arithmetic") for n in sp.notes)


def test_joint_self_products_keep_the_pairs_scales():
    """<a, a> and <b, b> from joint_inner share the pair's estimate: their
    products() read (la, la) and (lb, lb) and came out 1e6 times off."""
    rng = np.random.default_rng(0)
    a = ts.Bilinear(rng.standard_normal((3, 3)) * 1e3, rng.standard_normal((3, 3)) * 1e3, rng.standard_normal((1, 3)))
    b = _bilinear(rng, 3, 1)
    results = joint_inner(a, b, method="sampled", samples=4000, seed=1)
    first = results[0].estimate.products()[0]
    for k, r in enumerate(results):
        values, errors = r.estimate.products()
        np.testing.assert_allclose(values, first)
        assert float(values[k, 0]) == pytest.approx(float(r.value), rel=1e-12)
    exact = [float(ts.inner(x, y).value) for x, y in ((a, b), (a, a), (b, b))]
    assert np.all(np.abs(first[:, 0] - exact) < 5 * errors[:, 0])


def test_token_tail_figures_beyond_float64():
    """A rarest sequence of 10^-361: the ceiling was computed from 10^300."""
    torch.manual_seed(0)
    f, g = (ts.from_torch(nn.Sequential(nn.Embedding(4096, 2), nn.Linear(2, 2)).double(), n_ctx=100)
            for _ in range(2))
    tokens = ts.Tokens(4096, 100)
    r = ts.inner(f, g, measure=tokens, method="sampled", samples=200, seed=0)
    expected = (-tokens.log10_rarest - math.log10(200)) / 2  # log10 sqrt((1/p - 1) / n)
    assert math.log10(r.estimate.tail_ceiling) == pytest.approx(expected, abs=1e-9)
    note = next(n for n in r.notes if n.startswith("HEAVY TAILS"))
    assert f"about {10 ** expected:.3g} times itself" in note and "(about 10^360 could; of the 200 drawn" in note


def test_the_former_ceiling_names_still_read():
    r = ts.inner(ts.Bilinear([[1.0, 0.5]], [[0.3, 1.0]], [[1.0]]), ts.Bilinear([[1.0, 0.2]], [[0.1, 1.0]], [[1.0]]),
                 method="sampled", samples=200, seed=0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert r.estimate.degree_ceiling == r.estimate.tail_ceiling
    assert said and issubclass(said[0].category, DeprecationWarning)
    assert DEGREE_CEILING == TAIL_CEILING


def test_verify_offers_only_what_it_takes_and_says_exact_false_once():
    rng = np.random.default_rng(0)
    f = ts.Sequential(_bilinear(rng, 4, 4), _bilinear(rng, 4, 2))
    with pytest.raises(ts.CostError) as err:
        ts.verify(f, f, exact=True, budget=1e8)
    assert [a.option for a in err.value.alternatives] == ["budget"]  # inner='network' is no verify question
    assert "inner=" not in str(err.value).split("Alternatives:")[1]
    torch.manual_seed(0)
    rotary = ts.from_torch(nn.Sequential(BilinearAttentionModule(1, 2, 2, n_ctx=2, rotary_base=1e4),
                                         nn.Linear(2, 2)).double())
    with pytest.raises(ValueError) as err:
        ts.verify(rotary, rotary, exact=True)
    cli, _ = _cli_spelling(str(err.value))
    assert "without --exact gives a tolerance verdict" in cli and "on the command line" not in cli


def _attention_pair():
    def model(seed):
        torch.manual_seed(seed)
        embedding = nn.Embedding(4, 4)
        blocks = [BilinearAttentionModule(2, 2, 4, causal=True, rotary_base=1e4, residual=True, n_ctx=3, bias=True,
                                          scale=0.5) for _ in range(2)]
        with torch.no_grad():
            blocks[1].o.mul_(0.05)
            blocks[1].o_bias.mul_(0.05)
        return ts.from_torch(nn.Sequential(embedding, *blocks, nn.Linear(4, 3)).double().eval())

    return model(1), model(2)


def test_the_control_variate_note_is_of_the_value_returned():
    """It said the mean of the three products' factors (1.9) where the
    control variate multiplied the returned cosine's variance (by 1.67 over
    400 seeds; 1.43 with the best coefficients, by enumeration)."""
    a, b = _attention_pair()
    r = ts.similarity(a, b, method="sampled", samples=2000, seed=0)
    est = r.estimate
    assert est.saved(0)[0] > 1 > est.cosine_saved()[0]  # <a, b>'s variance divided, the cosine's multiplied
    said = f"the control variate multiplied the variance of the cosine by {1 / est.cosine_saved()[0]:.3g}"
    assert f"{said} (it added variance)" in r.notes
    assert not any("of <a, b>" in n for n in r.notes)
    ri = ts.inner(a, b, method="sampled", samples=2000, seed=0)
    assert f"the control variate divided the variance of <a, b> by {ri.estimate.saved(0)[0]:.3g}" in ri.notes, ri.notes
    assert ri.estimate.variance_saved == pytest.approx(ri.estimate.saved(0)[0])


def test_a_product_made_exact_by_its_control_is_said_so():
    """a has no layer to drop: its control is a itself and <a, a> exact;
    the figure read 110 to 2e23 from seed to seed (the true factors ~180)."""
    def stack(seed, depth, d_in=12, d=8):
        rng = np.random.default_rng(seed)
        w = lambda *shape, scale=1.0: scale * rng.normal(size=shape) / np.sqrt(shape[-1])  # noqa: E731
        layers = [ts.Linear(w(d, d_in))]
        layers += [ts.Bilinear(w(4, d, scale=1.0 if i == 0 else 0.05), w(4, d), w(d, 4), residual=True)
                   for i in range(depth)]
        return ts.Sequential(*layers, ts.Linear(w(2, d)))

    a, b = stack(5, 1), stack(7, 2)
    tokens = ts.Tokens(4, 3)
    for seed in range(3):
        ab, aa, bb = joint_inner(a, b, measure=tokens, method="sampled", samples=2000, seed=seed)
        assert "the control variate made <a, a> exact (its spread within float64's rounding)" in aa.notes
        assert 50 < aa.estimate.saved(0)[0] < 1000 and 50 < aa.estimate.saved(2)[0] < 1000
        assert math.isinf(aa.estimate.variance_saved)


def test_cosine_saved_is_the_delta_method_ratio():
    means = np.array([[0.5], [1.0], [2.0], [2.0]])
    cov = np.diag([1.0, 2.0, 3.0, 4.0])[:, :, None] * 1e-4
    raw = cov * np.array([4.0, 2.0, 1.0, 1.0])[:, None, None]  # <a, b>'s variance divided by 4, <a, a>'s by 2
    est = Estimate(means, cov, 100, 0, raw)
    cos = 0.5 / math.sqrt(2.0)
    grad = np.array([cos / 0.5, -0.5 * cos / 1.0, -0.5 * cos / 2.0])
    by_hand = (grad ** 2 @ np.diag(raw[:3, :3, 0])) / (grad ** 2 @ np.diag(cov[:3, :3, 0]))
    assert est.cosine_saved()[0] == pytest.approx(by_hand)
    assert est.saved(0)[0] == pytest.approx(4.0) and est.saved(2)[0] == pytest.approx(1.0)
    assert Estimate(means, cov, 100, 0).cosine_saved()[0] == 1.0  # no control variate


def test_a_matrix_of_exact_models_says_its_entries_are_floats():
    rng = np.random.default_rng(0)
    models = [ts.exactify(_bilinear(rng, 3, 2)) for _ in range(3)]
    m = ts.similarity_matrix(models, progress=False)
    assert any(n.startswith("some models' weights are exact numbers") for n in m.notes)
    assert not any("exact numbers" in n for n in ts.similarity_matrix([_bilinear(rng, 3, 2)] * 2).notes)
