"""Command-line fixes, fifth round: a demo's out-of-memory hint names the
size settings its own memory check weighs (the training's --steps and
--checkpoint-every included, not --budget), and a MemoryError without a
message reads "an allocation failed", not "()"; matrix's text output says
every note of its result once (it printed only the first, and only for a
tiled matrix), a note also raised as a warning once."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tsalgebra as ts
from tsalgebra import cli
from tsalgebra.demos import backdoor, grokking, language
from helpers import exit_code, saved_bilinears

# ------------------------------------------------------------ 1. a demo's out-of-memory hint

ADVICE = {
    "grokking": "try a smaller --modulus, --width or --steps, or a larger --checkpoint-every",
    "backdoor": "try a smaller --hidden, --clean-steps or --poison-steps, or a larger --checkpoint-every",
    "language": "try a smaller --vocab, --d-model, --n-head, --n-layers, --seq-len, --batch, --steps or --n-ctx, or "
                "a larger --checkpoint-every",
}
OWN = {"grokking": {"--modulus", "--width"}, "backdoor": {"--hidden"},
       "language": {"--vocab", "--d-model", "--n-head", "--n-layers", "--seq-len", "--batch", "--n-ctx"}}
TINY = {
    "grokking": ["-P", "3", "--width", "1", "--steps", "4", "--checkpoint-every", "2"],
    "backdoor": ["--hidden", "1", "--clean-steps", "2", "--poison-steps", "2", "--checkpoint-every", "1"],
    "language": ["--vocab", "2", "--d-model", "2", "--n-head", "1", "--n-layers", "1", "--seq-len", "4", "--batch",
                 "1", "--steps", "4", "--checkpoint-every", "2", "--n-ctx", "1"],
}
MODULES = {"grokking": grokking, "backdoor": backdoor, "language": language}


@pytest.mark.parametrize("demo", sorted(ADVICE))
def test_each_demos_memory_advice_names_its_own_sizes(demo):
    # the grokking hint lacked --steps and --checkpoint-every (its checkpoints' logits are most of its memory),
    # the language hint named --budget (flops: a smaller one refuses, it frees nothing)
    args = cli.build_parser().parse_args(["demo", demo])
    assert cli._memory_advice(args) == ADVICE[demo]
    others = set().union(*(OWN[d] for d in OWN if d != demo)) - OWN[demo]
    assert not any(flag + " " in ADVICE[demo] + " " or flag + "," in ADVICE[demo] for flag in others)
    assert "--budget" not in ADVICE[demo] and "--held-out" not in ADVICE[demo]  # not a size; not a flag
    assert MODULES[demo].memory_advice(python=True).startswith("a smaller ")  # keywords: run(width=...)


def test_the_python_spelling_has_the_keyword_only_sizes():
    assert language.memory_advice(python=True) == ("a smaller vocab, d_model, n_head, n_layers, seq_len, batch, "
                                                   "held_out, steps or n_ctx, or a larger checkpoint_every")


@pytest.mark.parametrize("demo", sorted(ADVICE))
def test_a_demo_out_of_memory_names_its_sizes_and_says_what_failed(demo, monkeypatch, capsys, tmp_path):
    if demo == "backdoor":
        pytest.importorskip("sklearn")

    def refused(*args, **kwargs):
        raise MemoryError  # as an allocation refused with no message: it read "out of memory ()"

    monkeypatch.setattr(MODULES[demo], "_train", refused)
    code, out, err = exit_code(capsys, "demo", demo, *TINY[demo], "--out", tmp_path / demo, "--no-progress", "--json")
    assert code == cli.EXIT_FAILED == 1, err
    assert json.loads(out)["error"] == f"out of memory (an allocation failed); {ADVICE[demo]}"


def test_other_commands_keep_their_advice():
    parse = cli.build_parser().parse_args
    assert cli._memory_advice(parse(["summary"])) == "try a smaller --batch"
    assert cli._memory_advice(parse(["matrix", "a", "b"])) == ("try fewer checkpoints or a smaller --n-ctx, "
                                                               "--samples, --tile, --budget or --max-memory")


# ------------------------------------------------------------ 2. every note of a matrix, once


@pytest.fixture()
def mixed(tmp_path):
    """Three bilinear layers and a linear one (degree 1): the symmetric matrix lifts it, with a note."""
    folder = tmp_path / "ck"
    folder.mkdir()
    saved_bilinears(folder, n=3)
    ts.save(ts.Linear(np.random.default_rng(1).normal(size=(2, 3))), folder / "m3.safetensors")
    return folder


def _notes(out: str) -> list[str]:
    return [line[len("note: "):] for line in out.splitlines() if line.startswith("note: ")]


@pytest.mark.parametrize("tiled", [True, False])
def test_every_note_of_a_matrix_is_printed_once(tiled, mixed, tmp_path, capsys):
    def run(*extra):  # a store of its own for each run: both compute every tile
        store = ["--store", tmp_path / f"st{len(extra)}", "--tile", "2"] if tiled else []
        return exit_code(capsys, "matrix", mixed, "--inner", "symmetric", *store, "--out", tmp_path / "m.png",
                         "--no-progress", *extra)

    code, out, err = run("--json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    # tiled, the common degree's note came first and was the only one printed (the tiles' note was meant); untiled,
    # none was
    assert len(notes) >= 2 and notes[0].startswith("symmetric product at the set's common degree 2")
    assert any(" tiles of 2 models a side " in n for n in notes) == tiled
    code, out, err = run()
    assert code == 0, err
    # each once, in the result's order (in the command line's spelling: --degree K), after the figure
    assert _notes(out) == [cli._cli_spelling(n)[0] for n in notes]
    assert out.splitlines()[-len(notes) - 1].startswith("figure: ")


def test_a_note_that_is_also_a_warning_is_printed_once(tmp_path, capsys):
    folder = tmp_path / "ck"
    folder.mkdir()
    saved_bilinears(folder, n=4)
    store = tmp_path / "st"
    base = ["matrix", folder, "--inner", "symmetric", "--store", store, "--tile", "2", "--out", tmp_path / "m.png",
            "--no-progress"]
    assert exit_code(capsys, *base)[0] == 0
    (store / "tiles" / "r0-2_c0-2.npz").write_text("garbage\n")
    code, out, err = exit_code(capsys, *base)
    assert code == 0, err
    said = _notes(out)
    unreadable = [n for n in said if n.startswith("store tile r0-2_c0-2.npz is unreadable")]
    assert len(unreadable) == 1, out  # a note of the result and a warning: once
    assert said[0].startswith("3 tiles of 2 models a side (1 computed, 2 from the store)")
    assert len(said) == len(set(said))


# ------------------------------------------------------------ a demo's run(...) out of memory, in Python


REFUSALS = {
    "numpy": lambda: MemoryError("Unable to allocate 8.00 TiB for an array with shape (2**40,)"),
    "torch": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                  "allocate memory: you tried to allocate 281474976710656 bytes."),
}


@pytest.mark.parametrize("library", sorted(REFUSALS))
@pytest.mark.parametrize("demo", sorted(ADVICE))
def test_a_demo_run_out_of_memory_says_its_keywords(demo, library, monkeypatch, capsys, tmp_path):
    """run(...) in Python raised numpy's or torch's allocation error alone;
    it now says the sizes in run's keywords, and the command line its flags,
    once (torch's refusal was a plain error there, with no advice)."""
    if demo == "backdoor":
        pytest.importorskip("sklearn")

    def refused(*args, **kwargs):
        raise REFUSALS[library]()

    monkeypatch.setattr(MODULES[demo], "_train", refused)
    cfg = MODULES[demo].config_from_args(cli.build_parser().parse_args(
        ["demo", demo, *TINY[demo], "--out", str(tmp_path / demo), "--no-progress"]))
    with pytest.raises(MemoryError) as caught:
        MODULES[demo].run(cfg)
    text = str(caught.value)
    assert text.startswith("out of memory (") and text.endswith(f"; try {MODULES[demo].memory_advice(python=True)}")
    assert str(REFUSALS[library]())[:20] in text and "--" not in text
    code, out, err = exit_code(capsys, "demo", demo, *TINY[demo], "--out", tmp_path / demo, "--no-progress", "--json")
    assert code == cli.EXIT_FAILED == 1, err
    said = json.loads(out)["error"]
    assert said.startswith("out of memory (") and said.endswith(f"; {ADVICE[demo]}") and said.count("try ") == 1
    assert str(REFUSALS[library]())[:20] in said
