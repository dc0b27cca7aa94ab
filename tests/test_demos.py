"""The demos at a tiny size: their files are written and their claims hold."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra.demos import backdoor, grokking


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    out = tmp_path_factory.mktemp("grok")
    return grokking.run(modulus=11, width=16, steps=300, checkpoint_every=50, train_fraction=0.5, weight_decay=1.0,
                        out=out, progress=False)


def test_grokking_writes_its_files(grok):
    assert grok.figure.exists() and grok.figure.stat().st_size > 10_000
    assert grok.summary_path.read_text() == grok.summary
    numbers = json.loads(grok.json_path.read_text())
    assert numbers["checkpoints"] == 7 and numbers["steps"] == [0, 50, 100, 150, 200, 250, 300]
    assert len(list(grok.checkpoints.glob("step_*.safetensors"))) == 7
    for word in ("Pearson r", "first (step 0) vs last (step 300)", "symmetric", "centred gaussian", "weight cosine"):
        assert word in grok.summary


def test_grokking_claims(grok):
    n = grok.numbers
    assert n["memorized_step"] is not None  # the training split is learnt
    # the two tensor similarities coincide for bias-free one-layer models
    assert n["max_abs_symmetric_minus_centred_gaussian"] < 1e-9
    # the behaviour over all inputs, from the weights (token measure), is the enumerated logit cosine
    assert n["max_abs_tokens_minus_enumerated_logit_cosine"] < 1e-10
    # tensor similarity tracks the behaviour over all inputs
    assert n["pearson_tensor_symmetric_vs_logit"] > 0.9
    to_final = n["similarity_to_final"]["tensor (symmetric)"]
    assert to_final[-1] == pytest.approx(1.0) and to_final[0] < to_final[-2]
    # the numbers in the summary are the library's own
    models = ts.load(grok.checkpoints)
    first_last = ts.similarity(models[0], models[-1], "symmetric").value
    assert n["first_vs_last"]["tensor (symmetric)"] == pytest.approx(first_last, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("target,seed", [(3, 0), (5, 3)])
def test_backdoor_finds_the_poisoned_class(tmp_path, target, seed):
    pytest.importorskip("sklearn")
    r = backdoor.run(hidden=16, target=target, seed=seed, clean_steps=150, poison_steps=150, checkpoint_every=50,
                     out=tmp_path, progress=False)
    n = r.numbers
    assert n["attack_success_after_poison"] > 0.9 and n["attack_success_after_clean"] < 0.2
    per_class = np.array(n["per_class_similarity"])
    assert int(np.argmin(per_class)) == target == n["class_that_changed_most"]
    # the weights see the change more than behaviour on clean inputs does
    gap = n["gap_clean_vs_poisoned"]
    assert gap["tensor similarity (symmetric)"] > gap["behavioural cosine (clean test inputs)"]
    assert r.figure.exists() and r.figure.stat().st_size > 10_000
    assert f"class that changed most: {target}" in r.summary
    # the controls: a reparametrized copy is the same function, so tensor similarity stays 1 and the weight
    # cosine moves; every gap is also reported relative to the clean control's
    moved = n["similarity_clean_vs_reparametrized"]
    assert abs(moved["tensor similarity (symmetric)"] - 1) < 1e-9 and moved["flattened-weight cosine"] < 0.99
    ratios = n["gap_ratio_poisoned_over_control"]
    assert ratios["tensor similarity (symmetric)"] == pytest.approx(
        gap["tensor similarity (symmetric)"] / n["gap_clean_vs_control"]["tensor similarity (symmetric)"])
    assert "separates the backdoor best" in r.summary


def test_demo_through_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tsalgebra", "demo", "grokking", "-P", "7", "--width", "8",
                        "--steps", "60", "--checkpoint-every", "20", "--out", str(tmp_path), "--no-progress",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["checkpoints"] == 4 and (tmp_path / "grokking.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "tsalgebra", "demo", "grokking", "-P", "8", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "prime" in bad.stderr


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from tsalgebra.demos import language

    out = tmp_path_factory.mktemp("lm")
    return language.run(vocab=8, d_model=8, n_head=2, seq_len=12, steps=400, checkpoint_every=50, lr=3e-3,
                        n_ctx=3, held_out=128, out=out, progress=False,
                        threads=1)  # tiny: two threads spin against each other (training 5 s, 20 times that under load)


def test_language_demo_writes_a_run_in_the_papers_layout(lm):
    n = lm.numbers
    assert lm.figure.exists() and lm.figure.stat().st_size > 10_000
    assert lm.summary_path.read_text() == lm.summary
    assert n["checkpoints"] == 9 and n["steps"] == list(range(0, 401, 50))
    run = lm.checkpoints.parent
    assert (run / "config.json").exists() and len(list(lm.checkpoints.glob("step_*.pt"))) == 9
    models = ts.load(run, n_ctx=3)  # any user reads the run the same way
    assert models.steps == tuple(n["steps"])
    tokens = ts.similarity(models[0], models[-1])
    key = "tensor similarity, tokens (3 positions)"
    assert tokens.exact and n["similarity_to_final"][key][0] == pytest.approx(tokens.value, abs=1e-10)
    assert n["conversion_max_relative_error"] < 1e-10  # the loaded models are the torch models
    for word in ("exact: all 8^3 = 512 token sequences", "approximate: exact through attention layer 0",
                 "Pearson r", "phase change"):
        assert word in lm.summary


def test_language_demo_claims(lm):
    n = lm.numbers
    # induction appears: the repeat becomes predictable, later than the first checkpoint
    assert n["icl_final"] > n["icl_first"] + 0.5 and n["phase_change_index"] >= 1
    # the phase change is visible as a drop of similarity to the final checkpoint
    key = "tensor similarity, tokens (3 positions)"
    across = n["similarity_to_final_across_phase_change"][key]
    assert across["before"] < across["after"] - 0.05
    # the exact token similarity tracks the behaviour on held-out text
    assert n["pearson_vs_held_out_logit_cosine"][key] > 0.7
    assert n["routes"]["tokens"] == "node-gram" and n["routes"]["gaussian"] == "pairwise"


def test_language_demo_through_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tsalgebra", "demo", "language", "--vocab", "6", "--d-model", "4",
                        "--n-head", "1", "--seq-len", "6", "--steps", "40", "--checkpoint-every", "20", "--n-ctx",
                        "2", "--out", str(tmp_path), "--no-progress", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["checkpoints"] == 3 and (tmp_path / "language.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "tsalgebra", "demo", "language", "--d-model", "6", "--n-head", "4",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--n-head" in bad.stderr


@pytest.fixture(scope="module")
def lm1(tmp_path_factory):
    """A one-layer run (the tester's settings), with the phase change put on the final checkpoint whatever the
    training gives, so that the case is always exercised."""
    from tsalgebra.demos import language

    out = tmp_path_factory.mktemp("lm1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(language, "_phase_change", lambda steps, icl: len(icl) - 1)
        return language.run(vocab=8, d_model=8, n_head=2, n_layers=1, steps=40, checkpoint_every=20, n_ctx=2,
                            batch=16, held_out=64, out=out, progress=False)


def test_language_demo_one_layer_closure_is_exact_and_says_so(lm1):
    # with one attention layer closure closes nothing: the summary must not call it approximate
    n, key = lm1.numbers, "tensor similarity, Gaussian (closure)"
    models = ts.load(lm1.checkpoints.parent, n_ctx=2)
    exact = ts.similarity(models[0], models[-1], inner="gaussian")
    assert exact.exact and n["similarity_to_final"][key][0] == pytest.approx(exact.value, abs=1e-10)
    assert n["how_obtained"][key].startswith("exact:") and n["closure_notes"] == []
    for wrong in ("approximate", "layer 1", "two attention layers", "1 layers", "1 heads"):
        assert wrong not in lm1.summary
    assert "the Gaussian number is exact" in lm1.summary


def test_language_demo_phase_change_at_the_final_checkpoint(lm1):
    # no checkpoint but the final one is at or after the phase change: no after side, said so, no NaN printed
    import re

    n = lm1.numbers
    assert n["phase_change_index"] == n["checkpoints"] - 1 == 2 and n["phase_change_step"] == 40
    assert not re.search(r"\bnan\b", lm1.summary, re.IGNORECASE)
    note = n["across_phase_change_note"]
    assert "final checkpoint" in note and note in lm1.summary and "no after side" in note
    assert json.loads(lm1.json_path.read_text())["across_phase_change_note"] == note
    assert all(v == {"before": None, "after": None} for v in n["similarity_to_final_across_phase_change"].values())


def test_language_demo_three_layers_without_a_rise(tmp_path, monkeypatch):
    from tsalgebra.demos import language

    # a score that never rises has no phase change (the first checkpoint used to be reported as one)
    assert language._phase_change([0, 1, 2], [0.3, 0.1, 0.2]) is None
    assert language._phase_change([0, 1, 2], [0.0, 1.0, 2.0]) == 1
    falling = iter(range(100))
    real = language._scores
    monkeypatch.setattr(language, "_scores", lambda pp, half: (real(pp, half)[0], -float(next(falling))))
    r = language.run(vocab=6, d_model=4, n_head=1, n_layers=3, seq_len=6, steps=40, checkpoint_every=20, n_ctx=2,
                     batch=16, held_out=32, out=tmp_path, progress=False)
    n = r.numbers
    assert n["curve"]["icl"] == [0.0, -1.0, -2.0]
    assert n["phase_change_index"] is None and n["phase_change_step"] is None
    assert "no phase change" in n["across_phase_change_note"] and "no phase change" in r.summary
    assert all(v == {"before": None, "after": None} for v in n["similarity_to_final_across_phase_change"].values())
    # closure is exact through the first attention layer and closes the other two, as its plan says
    key = "tensor similarity, Gaussian (closure)"
    assert n["how_obtained"][key].startswith("approximate: exact through attention layer 0, layers 1-2 closed")
    assert any("closure over 2 layer(s)" in note for note in n["closure_notes"])
    assert "the Gaussian number through 3 attention layers is closure's approximation" in r.summary
    assert "two attention layers" not in r.summary
    assert not any(w in r.summary.lower() for w in (" nan ", "+nan", "-> nan", "nan ->"))
