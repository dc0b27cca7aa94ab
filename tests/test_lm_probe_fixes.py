"""A language-model researcher's session (the probe of /tmp/probe_lm): what
the command line says of a refused token plan, a run folder read with a
template, exact verification of attention models (fixed limits, rotary
embeddings, the cost of exact arithmetic)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tsalgebra as ts
from helpers import exit_code
from tsalgebra.adapters import BilinearAttentionModule
from tsalgebra.algorithms.registry import EXACT_FLOP_COST
from tsalgebra.demos.language import attention_lm_module
from tsalgebra.io import LoadError


def language_run(root, n_layers=1):
    """A run in the papers' layout: config.json and checkpoints/step_*.pt."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(dict(vocab_size=8, d_model=8, n_head=2, n_layers=n_layers,
                                                      attn_scale=1.0, use_bias_qk=True)))
    for step in (0, 10):
        torch.manual_seed(step)
        torch.save({"model_state_dict": attention_lm_module(8, 8, 2, n_layers).state_dict()},
                   root / "checkpoints" / f"step_{step:05d}.pt")
    return root


def attention_model(vocab=4, d=4, n_ctx=2, rotary_base=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(vocab, d), BilinearAttentionModule(2, 2, d, n_ctx=n_ctx, causal=True,
                                                                        residual=True, rotary_base=rotary_base),
                        nn.Linear(d, d)).double().eval()
    return ts.from_torch(net)


def test_a_refused_plan_names_the_token_product_it_planned(tmp_path, capsys):
    """Every product refused: the header and the JSON said "gaussian", the products "tokens"."""
    c = language_run(tmp_path / "run") / "checkpoints"
    a, b = c / "step_00000.pt", c / "step_00010.pt"
    code, out, _ = exit_code(capsys, "plan", a, b, "--n-ctx", 3, "--budget", "1e3")
    assert code == 3 and out.startswith("tokens similarity of"), out
    code, out, _ = exit_code(capsys, "plan", a, b, "--n-ctx", 3, "--budget", "1e3", "--json")
    assert code == 3 and json.loads(out)["inner"] == "tokens"


def test_a_run_folder_read_with_a_template_says_why_not(tmp_path):
    """Its config.json names every size: it said it names none of them."""
    run = language_run(tmp_path / "run")
    with pytest.raises(LoadError) as err:
        ts.load(run, template=lambda: attention_lm_module(8, 8, 2, 1), n_ctx=3)
    said = str(err.value)
    assert "does not name" not in said and "loads as the language-model run in the papers' layout" in said, said
    assert "no template= / --template" in said


def test_an_exact_verification_over_the_fixed_limits_is_no_question_of_budget():
    """The pairings' fixed limits, every other exact algorithm not applying:
    it said "would exceed the budget of inf flops", a CostError no budget cures."""
    f = attention_model()
    with pytest.raises(ts.NotApplicableError, match="no exact algorithm applies within its fixed limits") as err:
        ts.verify(f, f, exact=True, budget=float("inf"))
    assert "budget of" not in str(err.value) and "Python speed" in str(err.value)


def test_exact_verification_refuses_a_rotary_embedding_at_once():
    """Its cosines and sines are floats: the run failed after it all ("some number in it was not exact")."""
    f = attention_model(n_ctx=1, rotary_base=10_000.0)
    with pytest.raises(ValueError, match=r"rotary embedding \(BilinearAttention\[1\], rotary_base=10000\)") as err:
        ts.verify(f, f, exact=True)
    assert "exact=False gives a tolerance verdict" in str(err.value)
    assert ts.verify(f, f).verdict.startswith("equal")  # float weights: a float verdict, as before


def test_exact_arithmetic_is_costed_at_its_speed():
    """4e9 exact operations fitted the default budget (2e11) and ran for
    hours; each counts as EXACT_FLOP_COST float64 flops now, and the budget
    suggested is that count."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(8, 8), BilinearAttentionModule(2, 4, 8, n_ctx=3, causal=True, residual=True),
                        nn.Linear(8, 8)).double().eval()
    f = ts.from_torch(net)
    with pytest.raises(ts.CostError) as err:
        ts.verify(f, f, exact=True, inner="gaussian")
    e = err.value
    assert not isinstance(e, ts.NotApplicableError) and e.flops > 1e12 and "in exact operations" in e.reason
    budget = next(a for a in e.alternatives if a.option == "budget")
    assert budget.value >= e.flops / 1.01  # what admits it, in float64 flops
    exact = ts.verify(ts.Bilinear([[1, 0]], [[0, 1]], [[1]]), ts.Bilinear([[1, 0]], [[0, 1]], [[1]]), exact=True)
    assert exact.exact and exact.verdict == "equal"  # a small exact plan still fits
    plan = ts.plan_inner(ts.exactify(ts.Bilinear([[1.0, 0]], [[0, 1.0]], [[1.0]])),
                         ts.exactify(ts.Bilinear([[1.0, 0]], [[0, 1.0]], [[1.0]])))
    float_plan = ts.plan_inner(ts.Bilinear([[1.0, 0]], [[0, 1.0]], [[1.0]]), ts.Bilinear([[1.0, 0]], [[0, 1.0]],
                                                                                        [[1.0]]), algorithm="pairings")
    assert plan.algorithm == "pairings" and plan.flops == pytest.approx(EXACT_FLOP_COST * float_plan.flops)
