"""A demo whose training diverges stops at the first loss (or checkpointed
parameter) that is not finite, naming the step and the learning rate as its
caller spells it (--lr on the command line, exit 2 as any bad setting; lr= in
Python) and asking for a smaller one.  It trained every step before and then
failed in the analysis with "left contains NaN" (exit 1), naming no setting.
Every run here is tiny (a few steps of a model of width 1 or 2)."""

from __future__ import annotations

import json

import pytest

from tsalgebra import cli
from tsalgebra.demos import common, grokking

TINY = {
    "grokking": ["-P", "3", "--width", "1", "--steps", "4", "--checkpoint-every", "2"],
    "backdoor": ["--hidden", "1", "--clean-steps", "2", "--poison-steps", "2", "--checkpoint-every", "1"],
    "language": ["--vocab", "2", "--d-model", "2", "--n-head", "1", "--n-layers", "1", "--seq-len", "4", "--batch",
                 "1", "--steps", "4", "--checkpoint-every", "2", "--n-ctx", "1"],
}


@pytest.mark.parametrize("demo", ["grokking", "backdoor", "language"])
def test_a_diverged_training_stops_at_its_step_naming_lr(demo, tmp_path, capsys):
    if demo == "backdoor":
        pytest.importorskip("sklearn")
    out = tmp_path / demo
    code = cli.main(["demo", demo, *TINY[demo], "--lr", "1e30", "--out", str(out), "--no-progress", "--json"])
    stdout, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE == 2, stdout + err
    error = json.loads(stdout)["error"]
    # step 1 trains from the initial weights; the loss of step 2 is the first that is not finite
    phase = " of the clean phase" if demo == "backdoor" else ""
    assert error.startswith(f"the training diverged at step 2{phase} with --lr 1e+30: the loss (nan) is not finite; "
                            "give a smaller --lr (the default is --lr 0.0"), error
    assert "weight" not in error and "NaN" not in error and "lr=" not in error
    assert f"usage: tsalgebra demo {demo}" in err  # as any setting out of range
    assert not (out / "summary.json").exists()  # stopped in the training, not after it


def test_in_python_the_error_names_lr_as_a_keyword(tmp_path):
    with pytest.raises(ValueError, match=r"^the training diverged at step 2 with lr=1e\+30: the loss \(nan\) is not "
                                         r"finite; give a smaller lr \(the default is lr=0.01\)$") as caught:
        grokking.run(modulus=3, width=1, steps=4, checkpoint_every=2, lr=1e30, out=tmp_path / "g", progress=False)
    assert isinstance(caught.value, common.Diverged) and caught.value.step == 2
    written = sorted(p.name for p in (tmp_path / "g" / "checkpoints").glob("*.safetensors"))
    assert written == ["step_0.safetensors"]  # the checkpoint at step 2 was not reached


def test_a_parameter_not_finite_at_a_checkpoint_stops_the_training(tmp_path, monkeypatch):
    # the last step's update: no later loss would show it, the checkpoint's check does (here made inf by hand)
    def step(opt, cfg, at, phase=""):
        common.optimizer_step(opt, cfg, at, phase)
        if at == cfg.steps:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].fill_(float("inf"))

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(grokking, "optimizer_step", step)
    with pytest.raises(common.Diverged, match=r"^the training diverged at step 4 with lr=0.01: the parameter \S+ is "
                                              r"not finite; give a smaller lr$"):
        grokking.run(modulus=3, width=1, steps=4, checkpoint_every=2, out=tmp_path / "g", progress=False)
    written = sorted(p.name for p in (tmp_path / "g" / "checkpoints").glob("*.safetensors"))
    assert written == ["step_0.safetensors", "step_2.safetensors"]  # none saved with the infinite weights


def test_a_step_size_beyond_float32_is_said_as_a_divergence(tmp_path, capsys):
    # torch refused it in the first update: "value cannot be converted to type float without overflow", exit 1
    code = cli.main(["demo", "grokking", *TINY["grokking"], "--lr", "1e39", "--out", str(tmp_path / "g"),
                     "--no-progress", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 2, stdout + err
    assert json.loads(stdout)["error"] == ("the training diverged at step 1 with --lr 1e+39: the update (beyond "
                                           "float32) is not finite; give a smaller --lr (the default is --lr 0.01)")


def test_a_weight_decay_that_grows_the_weights_is_named_too(tmp_path, capsys):
    out = tmp_path / "g"
    code = cli.main(["demo", "grokking", *TINY["grokking"], "--weight-decay", "1e30", "--out", str(out),
                     "--no-progress", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 2, stdout + err
    error = json.loads(stdout)["error"]
    assert error.startswith("the training diverged at step 2 with --lr 0.01: ")
    assert error.endswith("give a smaller --lr, or a smaller --weight-decay (AdamW multiplies the weights by 1 - "
                          "--lr x --weight-decay at each step)")


def test_a_finite_training_is_unchanged(tmp_path, capsys):
    code = cli.main(["demo", "grokking", *TINY["grokking"], "--out", str(tmp_path / "g"), "--no-progress", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, stdout + err
    assert json.loads(stdout)["steps"] == [0, 2, 4]
