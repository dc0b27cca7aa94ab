"""The demos read back exactly the checkpoints they wrote and remove no file they did not write; every size
option is checked against the memory and disk it takes before any training; a degenerate --vocab is refused.
Every demo run here is tiny (a few steps of a model of width 4), every refusal comes before any training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra import cli
from tsalgebra.demos import backdoor, common, grokking, language

TINY = ["-P", "5", "--width", "4", "--checkpoint-every", "1", "--no-progress"]


def _demo(capsys, *args):
    """``tsalgebra demo ARGS`` in this process: (exit code, stdout, stderr)."""
    code = cli.main(["demo", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _checkpoint(path: Path) -> bytes:
    """A valid native checkpoint (as a copy of a demo's step file would be); its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ts.save(ts.Bilinear(rng.normal(size=(4, 10)), rng.normal(size=(4, 10)), rng.normal(size=(5, 4))), path)
    return path.read_bytes()


# ------------------------------------------------------------ 1. the checkpoints a demo reads back and removes


@pytest.mark.parametrize("name", ["backup_7.safetensors", "mine.safetensors", "step_5000.safetensors"])
def test_a_foreign_checkpoint_is_refused_before_training_and_kept(name, tmp_path, capsys):
    # backup_7: exit 0 with "steps": [7, 0, 1, 2, 3] (the foreign file entered every number); mine: trained, then
    # "no step number in the file name"; step_5000: deleted by the rerun's clean-up, then trained
    out = tmp_path / "u"
    kept = _checkpoint(out / "checkpoints" / name)
    code, stdout, err = _demo(capsys, "grokking", *TINY, "--steps", "3", "--out", out, "--json")
    assert code == 2, stdout + err
    error = json.loads(stdout)["error"]
    assert error.startswith(f"--out {out}: {out / 'checkpoints'} holds 1 checkpoint file that no earlier run of this "
                            f"demo recorded writing ({name})") and error.endswith("choose another --out")
    assert (out / "checkpoints" / name).read_bytes() == kept  # left alone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [name]  # nothing trained, nothing written
    assert not (out / "summary.json").exists()


def test_another_demos_run_is_refused_by_name(tmp_path, capsys):
    # grokking's --out at a language run trained, then failed asking for --n-ctx (an option it does not have)
    out = tmp_path / "lm"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    for step in (0, 1):
        (out / "checkpoints" / f"step_{step:05d}.pt").write_bytes(b"PK\x03\x04 not read")
    (out / "checkpoints" / ".tsalgebra-demo").write_text("# tsalgebra demo language: ...\nstep_00000.pt\n"
                                                         "step_00001.pt\n")
    code, _, err = _demo(capsys, "grokking", *TINY, "--steps", "3", "--out", out)
    assert code == 2 and "holds 2 checkpoint files that no earlier run of this demo recorded writing (step_00000.pt, " \
                          "step_00001.pt; written by the language demo)" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".tsalgebra-demo", "step_00000.pt",
                                                                        "step_00001.pt"]


def test_a_rerun_replaces_its_own_checkpoints_and_no_other_file(tmp_path, capsys):
    out = tmp_path / "g"
    code, stdout, err = _demo(capsys, "grokking", *TINY, "--steps", "4", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["steps"] == [0, 1, 2, 3, 4]
    ckdir = out / "checkpoints"
    (ckdir / "notes.txt").write_text("mine")  # no checkpoint: neither refused nor removed
    (ckdir / ".mine.safetensors").write_text("hidden")  # no loader reads it: neither refused nor removed
    code, stdout, err = _demo(capsys, "grokking", *TINY, "--steps", "2", "--out", out, "--json")
    assert code == 0, err
    numbers = json.loads(stdout)
    assert numbers["steps"] == [0, 1, 2] and numbers["checkpoints"] == 3  # step_3 and step_4 of the first run gone
    assert sorted(p.name for p in ckdir.iterdir()) == [".mine.safetensors", ".tsalgebra-demo", "notes.txt",
                                                       "step_0.safetensors", "step_1.safetensors",
                                                       "step_2.safetensors"]
    # what the demo wrote is what the folder loads as: its matrices' numbers are the folder's
    assert ts.load(ckdir).names == ("step_0", "step_1", "step_2")


def test_backdoor_and_language_share_the_check(tmp_path):
    # the backdoor's clean-up removed every *.safetensors in its checkpoints folder, a user's file included
    for name, run, cfg in (("backdoor", backdoor.run, backdoor.BackdoorConfig),
                           ("language", language.run, language.LanguageConfig)):
        out = tmp_path / name
        kept = _checkpoint(out / "checkpoints" / "mine.safetensors")
        with pytest.raises(ValueError, match=r"^out .*holds 1 checkpoint file that no earlier run of this demo "
                                             r"recorded writing \(mine\.safetensors\).*choose another out$"):
            run(out=out, steps=2, checkpoint_every=1) if name == "language" else run(out=out)
        with pytest.raises(ValueError, match=r"^--out .*holds 1 checkpoint file"):
            cfg(out=out).check()
        assert (out / "checkpoints" / "mine.safetensors").read_bytes() == kept
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["mine.safetensors"]


def test_backdoor_reads_back_what_it_wrote(tmp_path):
    pytest.importorskip("sklearn")
    kw = dict(hidden=4, clean_steps=2, poison_steps=2, checkpoint_every=1, out=tmp_path, progress=False)
    backdoor.run(**kw)
    r = backdoor.run(**dict(kw, poison_steps=1))  # the rerun removes the first run's poisoned_step_4
    assert r.numbers["checkpoints"] == ["c0", "c1", "c2", "p3"]
    assert len(r.numbers["checkpoints"]) == backdoor._checkpoints(backdoor.BackdoorConfig(**dict(kw, poison_steps=1)))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".tsalgebra-demo", "clean_step_0.safetensors", "clean_step_1.safetensors", "clean_step_2.safetensors",
        "poisoned_step_3.safetensors"]


# ------------------------------------------------------------ 2. sizes against memory and disk, before training


def test_grokking_width_beyond_memory_is_refused_with_a_width_that_fits(monkeypatch, tmp_path, capsys):
    # --width 100000000 reached torch's "[enforce fail at alloc_cpu.cpp:127] ... 90400000000 bytes" (exit 1)
    monkeypatch.setattr(common, "available_memory", lambda: 3 * 10**8)
    code, _, err = _demo(capsys, "grokking", *TINY[:2], "--width", "300000", "--steps", "3", "--checkpoint-every",
                         "1", "--out", tmp_path / "o")
    assert code == 2 and "error: --width 300000: " in err and "GB, more than the 0.3 GB of memory available" in err
    width = int(err.split("Alternatives: --width ")[1].split()[0])
    cfg = grokking.GrokkingConfig(modulus=5, width=width, steps=3, checkpoint_every=1, out=tmp_path / "o")
    assert grokking._need(cfg) <= 3 * 10**8 < grokking._need(grokking.GrokkingConfig(modulus=5, width=300000, steps=3,
                                                                                     checkpoint_every=1))
    cfg.check()  # the alternative is accepted
    assert not (tmp_path / "o").exists()


def test_grokking_steps_times_checkpoints_names_steps(tmp_path, capsys):
    # the old estimate saw only --modulus: it named --modulus 5 (and no alternative) for --steps 10^9
    code, _, err = _demo(capsys, "grokking", *TINY, "--steps", str(10**9), "--out", tmp_path / "o")
    assert code == 2 and f"error: --steps {10**9}: " in err and "1,000,000,001 checkpoints" in err
    steps = int(err.split("Alternatives: --steps ")[1].split()[0])
    every = int(err.split("--checkpoint-every ")[-1].split()[0])
    for kw in (dict(steps=steps, checkpoint_every=1), dict(steps=10**9, checkpoint_every=every)):
        grokking.GrokkingConfig(modulus=5, width=4, out=tmp_path / "o", **kw).check()


def test_grokking_checkpoints_beyond_the_disk_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "disk_room", lambda out, freed=0: (10**6, Path("/the/disk")))
    code, _, err = _demo(capsys, "grokking", *TINY[:2], "--width", "20000", "--steps", "40", "--checkpoint-every", "1",
                         "--out", tmp_path / "o")
    assert code == 2 and "error: --width 20000: the 41 checkpoints (0.004 GB each) take about 0.164 GB, more than " \
                          "the 0.001 GB free on the disk of /the/disk. Alternatives: --width " in err
    assert "--checkpoint-every" in err


def test_grokking_width_whose_analysis_would_be_refused_is_refused_first(tmp_path, capsys):
    # --width 20000 trained, then the logit cosine under the token measure was refused after 3.5 minutes
    code, _, err = _demo(capsys, "grokking", "--width", "20000", "--steps", "3", "--checkpoint-every", "1",
                         "--out", tmp_path / "o")
    assert code == 2 and "error: --width 20000: refused before the training, as the logit cosine under the token " \
                          "measure would be after it" in err
    width = int(err.split("Alternatives: --width ")[1].split()[0])
    assert 1000 < width < 20000 and grokking._tokens_refusal(113, width) is None
    assert not (tmp_path / "o").exists()


def test_backdoor_hidden_beyond_memory_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "available_memory", lambda: 10**9)
    code, _, err = _demo(capsys, "backdoor", "--hidden", str(10**7), "--out", tmp_path / "o")
    assert code == 2 and f"error: --hidden {10**7}: the models in training" in err and "memory available" in err
    hidden = int(err.split("Alternatives: --hidden ")[1].split()[0])
    backdoor.BackdoorConfig(hidden=hidden, out=tmp_path / "o").check()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,flag", [(["--vocab", "1000000"], "--vocab"), (["--d-model", "100000"], "--d-model"),
                                       (["--n-layers", "100000"], "--n-layers"), (["--seq-len", "100000"], "--seq-len"),
                                       (["--batch", "10000000"], "--batch"),
                                       (["--steps", str(10**9), "--checkpoint-every", "1"], "--steps")])
def test_language_sizes_beyond_memory_are_refused(args, flag, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "available_memory", lambda: 10**9)
    code, _, err = _demo(capsys, "language", *args, "--out", tmp_path / "o")
    assert code == 2 and f"error: {flag} {args[1]}: the training and the logits" in err and "memory available" in err
    value = int(err.split(f"Alternatives: {flag} ")[1].split()[0])
    kw = {flag[2:].replace("-", "_"): value, **({"checkpoint_every": 1} if flag == "--steps" else {})}
    cfg = language.LanguageConfig(**kw)
    assert language._need(cfg) <= 10**9
    if flag == "--d-model":
        assert value % (2 * cfg.n_head) == 0  # heads of even width
    if flag == "--seq-len":
        assert value % 2 == 0
    assert not (tmp_path / "o").exists()


def test_address_space_limit_is_the_room(tmp_path):
    # under ulimit -v the room is the limit less what the process holds, not the machine's free memory
    code = ("import resource, sys; hard = resource.getrlimit(resource.RLIMIT_AS)[1]; "
            "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30 if hard == resource.RLIM_INFINITY else "
            "min(hard, 3 * 2**30), hard)); from tsalgebra import cli; sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "demo", "grokking", "-P", "31", "--width", "100000", "--steps",
                        "3", "--checkpoint-every", "1", "--out", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: --width 100000: " in r.stderr and "Traceback" not in r.stderr
    room = float(r.stderr.split("more than the ")[1].split()[0])
    assert room < 3.3  # GB: the limit's, not the machine's
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ 3. degenerate values


def test_language_vocab_1_is_refused(tmp_path, capsys):
    # it ran and reported "held-out loss 0.000 -> 0.000", r = +1.000
    code, _, err = _demo(capsys, "language", "--vocab", "1", "--d-model", "4", "--n-head", "1", "--n-layers", "1",
                         "--seq-len", "4", "--batch", "2", "--steps", "2", "--checkpoint-every", "1", "--n-ctx", "1",
                         "--threads", "1", "--no-progress", "--out", tmp_path / "o")
    assert code == 2 and "error: --vocab must be an integer >= 2 (one token leaves nothing to predict" in err
    with pytest.raises(ValueError, match=r"^vocab must be an integer >= 2"):
        language.run(vocab=1, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
