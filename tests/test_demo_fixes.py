"""The demos' entry points, option checks, progress bars and language figure: every bad setting is refused
before any training (so none of these tests trains more than a few steps)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from tsalgebra import cli
from tsalgebra.demos import backdoor, common, grokking, language


def _demo(capsys, *args):
    """``tsalgebra demo ARGS`` in this process: (exit code, stderr)."""
    code = cli.main(["demo", *map(str, args)])
    return code, capsys.readouterr().err


# ------------------------------------------------------------ 1. python -m tsalgebra.demos.NAME


def test_module_entry_point_is_the_command(tmp_path):
    # it printed a traceback (torch's "Invalid learning rate: nan") and exited 1
    r = subprocess.run([sys.executable, "-m", "tsalgebra.demos.grokking", "--lr", "nan", "--out", str(tmp_path / "g")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "error: --lr must be a finite number > 0, got nan" in r.stderr
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("module,args,flag", [(grokking, ["--modulus", "4"], "--modulus"),
                                              (grokking, ["--threads", "0"], "--threads"),
                                              (backdoor, ["--weight-decay", "-1"], "--weight-decay"),
                                              (language, ["--n-ctx", "100"], "--n-ctx")])
def test_module_main_exits_2_naming_the_flag(module, args, flag, tmp_path, capsys):
    assert module.main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ 3. numeric options and --out


@pytest.mark.parametrize("demo,args,flag", [
    ("grokking", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("grokking", ["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    ("grokking", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("grokking", ["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    ("grokking", ["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    ("grokking", ["--threads", "-1"], "--threads must be an integer >= 1"),
    ("grokking", ["--seed", "-5"], "--seed must be an integer >= 0"),
    ("grokking", ["--train-fraction", "nan"], "--train-fraction must be a finite number > 0 and < 1"),
    ("grokking", ["-P", "3", "--train-fraction", "0.99"], "--train-fraction 0.99 takes all 9 pairs"),
    ("grokking", ["--width", "0"], "--width must be an integer >= 1"),
    ("backdoor", ["--lr", "nan"], "--lr must be a finite number > 0"),
    ("backdoor", ["--poison-fraction", "nan"], "--poison-fraction must be a finite number > 0"),
    ("backdoor", ["--threads", "-1"], "--threads must be an integer >= 1"),
    ("language", ["--lr", "-1"], "--lr must be a finite number > 0"),
    ("language", ["--budget", "nan"], "--budget must be a number > 0"),
    ("language", ["--threads", "0"], "--threads must be an integer >= 1"),
])
def test_numeric_options_are_usage_errors(demo, args, flag, tmp_path, capsys):
    code, err = _demo(capsys, demo, *args, "--out", tmp_path / "o")
    assert code == 2 and f"error: {flag}" in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written or trained


def test_out_must_be_a_directory(tmp_path, capsys):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    code, err = _demo(capsys, "grokking", "--out", a_file)
    assert code == 2 and f"error: --out {a_file}: exists and is not a directory" in err
    code, err = _demo(capsys, "backdoor", "--out", a_file / "sub")
    assert code == 2 and f"--out {a_file / 'sub'}: {a_file} is not a directory" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    code, err = _demo(capsys, "language", "--out", tmp_path / "run")
    assert code == 2 and "--out" in err and "checkpoints exists and is not a directory" in err


def test_python_errors_name_the_keyword(tmp_path):
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got nan"):
        grokking.run(lr=float("nan"), out=tmp_path / "g")
    with pytest.raises(ValueError, match=r"^weight_decay must be"):
        backdoor.run(weight_decay=-1.0, out=tmp_path / "b")
    with pytest.raises(ValueError, match=r"^progress must be True, False or None"):
        grokking.run(progress="yes", out=tmp_path / "g")
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"^out .*f\.txt: exists and is not a directory"):
        language.run(out=a_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_grokking_modulus_beyond_memory_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(common, "available_memory", lambda: 10**9)
    code, err = _demo(capsys, "grokking", "--modulus", "1009")
    assert code == 2 and "error: --modulus 1009:" in err and "GB" in err
    suggested = int(err.split("Alternatives: --modulus ")[1].split()[0])
    assert grokking._bytes(suggested, 21) <= 10**9 < grokking._bytes(1009, 21)
    grokking.GrokkingConfig(modulus=suggested).check()  # the alternative is accepted


# ------------------------------------------------------------ 2. language --n-ctx


def test_language_n_ctx_above_seq_len_is_a_usage_error(capsys, tmp_path):
    # it trained first, then failed with "reads 100 token ids per sample, got (64, 16)", exit 1
    code, err = _demo(capsys, "language", "--n-ctx", "100", "--out", tmp_path / "o")
    assert code == 2 and "error: --n-ctx must be at most --seq-len (16)" in err and "got 100" in err
    with pytest.raises(ValueError, match=r"^n_ctx must be at most seq_len \(8\)"):
        language.run(n_ctx=10, seq_len=8, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_language_n_ctx_refused_before_training_with_alternatives_it_accepts(capsys, tmp_path):
    # --n-ctx 6 was refused after training, offering "--method sampled", which the demo does not accept
    code, err = _demo(capsys, "language", "--n-ctx", "6", "--out", tmp_path / "o")
    assert code == 2 and "error: --n-ctx 6: refused before the training" in err
    assert "Alternatives: --n-ctx 3 (" in err and "--method" not in err
    assert not (tmp_path / "o").exists()
    code, err = _demo(capsys, "language", "--n-ctx", "4", "--out", tmp_path / "o")
    assert code == 2 and "Alternatives: --n-ctx 3 (" in err and "--budget 6.2e+11" in err
    # each alternative is an option of the demo, and the check accepts it
    parser = cli.build_parser()
    for args in (["--n-ctx", "3"], ["--n-ctx", "4", "--budget", "6.2e+11"]):
        cfg = language.config_from_args(parser.parse_args(["demo", "language", *args]))
        cfg.check()
    with pytest.raises(ValueError, match=r"^n_ctx=4: refused before the training.*Alternatives: n_ctx=3 .*"
                                         r"budget=6\.2e\+11"):
        language.run(n_ctx=4, out=tmp_path / "o")


# ------------------------------------------------------------ 4. progress bars off a terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_follow_the_library_rule(monkeypatch):
    from tsalgebra.demos.common import training_bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with training_bar(5, "training", None) as bar:
        assert bar.disable  # not a terminal: no bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with training_bar(5, "training", None) as bar:
        assert not bar.disable  # a terminal: a bar (drawn once the work has run a moment, as the library's)
    with training_bar(5, "training", False) as bar:
        assert bar.disable  # --no-progress: none on a terminal either
    # the command line asks for the terminal rule unless --no-progress
    parser = cli.build_parser()
    for demo in (grokking, backdoor, language):
        name = demo.__name__.rsplit(".", 1)[1]
        assert demo.config_from_args(parser.parse_args(["demo", name])).progress is None
        assert demo.config_from_args(parser.parse_args(["demo", name, "--no-progress"])).progress is False


def test_training_draws_no_bar_off_a_terminal(tmp_path, capsys):
    # the demos drew their training bars on a log file (a non-terminal stderr)
    cfg = grokking.GrokkingConfig(modulus=5, width=4, steps=4, checkpoint_every=2, out=tmp_path)
    (tmp_path / "checkpoints").mkdir()
    grokking._train(cfg, tmp_path / "checkpoints")  # (the other demos' loops use the same training_bar)
    err = capsys.readouterr().err
    assert "training" not in err and "\r" not in err


# ------------------------------------------------------------ 5. the language figure


def test_colour_scale_follows_the_data():
    from tsalgebra.demos.common import colour_range, grid

    assert colour_range(np.array([[1.0, -0.2], [-0.2, 1.0]])) == (-1.0, 1.0)
    assert colour_range(np.array([[0.3, -0.4], [-0.4, 0.3]])) == (-0.4, 0.4)  # symmetric about 0
    assert colour_range(np.array([[1.0, 0.5], [0.5, 1.0]])) == (0.0, 1.0)
    assert colour_range(np.array([[0.6, 0.5], [0.5, 0.6]])) == (0.0, 0.6)
    assert [grid(n) for n in (8, 9, 10)] == [(2, 4), (3, 3), (2, 5)]


@pytest.mark.parametrize("layers", [2, 3])  # 3 x 3 and 2 x 5: the old 4 columns left 3 and 2 empty
def test_language_figure_has_no_empty_panel_and_scaled_colours(layers, monkeypatch, tmp_path):
    from tsalgebra.plots import pyplot

    plt, figures = pyplot(), []

    class Recording:  # pyplot, keeping the figure open to inspect it
        def subplots(self, *args, **kwargs):
            fig, axes = plt.subplots(*args, **kwargs)
            fig.savefig = lambda *a, **k: None  # the layout is the question, not the PNG
            figures.append(fig)
            return fig, axes

        def close(self, fig):
            pass

    monkeypatch.setattr(language, "pyplot", Recording)
    steps = [0, 10, 20, 30]
    rng = np.random.default_rng(layers)
    names = (["tokens", "closure"] + [f"layer {i}" for i in range(layers)]
             + ["held-out", "random", "weights"])
    mats = {k: np.abs(np.corrcoef(rng.normal(size=(4, 6)))) for k in names}
    mats["closure"] = np.array([[1.0, -0.03, 0.01, 0.0], [-0.03, 1.0, 0.2, 0.1], [0.01, 0.2, 1.0, 0.5],
                                [0.0, 0.1, 0.5, 1.0]])
    curve = {"step": steps, "loss": [3.0, 2.5, 2.0, 1.5], "icl": [0.0, 0.5, 2.0, 2.5]}
    language._figure(tmp_path / "f.png", steps, mats, curve, 2, language.LanguageConfig(n_layers=layers))
    fig = figures[0]
    try:
        panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]  # (a twin axis shares its cell)
        cells: dict[tuple[int, int], bool] = {}
        for ax in panels:
            spec = ax.get_subplotspec().get_topmost_subplotspec()
            key = (spec.rowspan.start, spec.colspan.start)
            cells[key] = cells.get(key, False) or bool(ax.images or ax.lines)
        assert len(cells) == len(mats) + 2 and all(cells.values())  # no empty panel
        clims = {ax.get_title(): ax.images[0].get_clim() for ax in panels if ax.images}
        assert clims["closure"] == (-1.0, 1.0)  # a negative entry: symmetric about 0
        assert all(lo == 0.0 for name, (lo, hi) in clims.items() if name != "closure")
    finally:
        plt.close(fig)
