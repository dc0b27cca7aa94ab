"""The command line, end to end: error paths and JSON in a subprocess
(exactly as a user runs it), functional checks in-process through
``tsalgebra.cli.main`` (the same code, without paying for a new
interpreter each time)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tsalgebra as ts
from helpers import exit_code, strict_json
from tsalgebra.adapters import BilinearLayer
from tsalgebra.cli import main, parse_formulas
from tsalgebra.io import save


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsalgebra", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three one-layer checkpoints (4 -> 5 -> 3), one of another width, a
    malformed file, a formula file and a deep model, in the native layout."""
    d = tmp_path_factory.mktemp("ck")
    rng = np.random.default_rng(0)
    (d / "run").mkdir()
    models = []
    for step in (10, 2, 1):
        m = ts.Bilinear(rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=(3, 5)),
                        left_bias=rng.normal(size=5))
        save(m, d / "run" / f"step_{step}.safetensors")
        models.append(m)
    save(ts.Bilinear(rng.normal(size=(5, 6)), rng.normal(size=(5, 6)), rng.normal(size=(3, 5))), d / "wide.safetensors")
    (d / "broken.safetensors").write_bytes((d / "wide.safetensors").read_bytes()[:60])
    exact = ts.Bilinear(np.array([[1.0, 1.0]]), np.array([[1.0, -1.0]]), np.array([[1.0]]), down_bias=np.array([3.0]))
    save(exact, d / "square.safetensors")
    (d / "good.txt").write_text("# (x1 + x2)(x1 - x2) + 3\nx1^2 - x2**2 + 3\n")
    (d / "wrong.txt").write_text("x1^2 - x2^2 + x1\n")
    (d / "evil.txt").write_text("__import__('os').system('echo owned')\n")
    layer = lambda: ts.Bilinear(rng.normal(size=(2, 2)), rng.normal(size=(2, 2)), rng.normal(size=(2, 2)))  # noqa: E731
    save(ts.Sequential(layer(), layer(), layer()), d / "deep.safetensors")  # degree 8: too many pairings
    return d


# ------------------------------------------------------------ subprocess


def test_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("similarity", "matrix", "verify", "plan", "demo", "summary", "Exit codes"):
        assert cmd in r.stdout


def test_usage_errors_exit_2():
    for args in (["similarity", "only-one.pt"], ["similarity", "a", "b", "--inner", "bogus"]):
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "usage:" in r.stderr
        assert r.stdout == ""


def test_missing_file_exits_2_naming_it(ckpts):
    r = run("similarity", ckpts / "nope.safetensors", ckpts / "wide.safetensors")
    assert r.returncode == 2
    assert "nope.safetensors" in r.stderr and r.stdout == ""


def test_malformed_file_exits_1_naming_it(ckpts):
    r = run("similarity", ckpts / "broken.safetensors", ckpts / "wide.safetensors", "--json")
    assert r.returncode == 1
    assert str(ckpts / "broken.safetensors") in r.stderr and "truncated" in r.stderr
    out = json.loads(r.stdout)  # --json: the error as a JSON object on stdout too (nothing else)
    assert out["exit_code"] == 1 and str(ckpts / "broken.safetensors") in out["error"] and "truncated" in out["error"]


def test_model_error_exits_1_with_message(ckpts):
    r = run("similarity", ckpts / "run" / "step_1.safetensors", ckpts / "wide.safetensors")
    assert r.returncode == 1
    assert r.stderr.startswith("tsalgebra: error: ") and "input widths differ" in r.stderr
    assert "Traceback" not in r.stderr


def test_similarity_json_parses_and_matches_the_library(ckpts):
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_2.safetensors"
    r = run("similarity", a, b, "--inner", "symmetric", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = ts.similarity(ts.load(a), ts.load(b), "symmetric")
    assert out["value"] == pytest.approx(want.value, rel=1e-12)
    assert out["inner"] == "symmetric" and out["exact"] is True and out["method"] == "exact"


def test_console_script_and_summary_json():
    script = Path(sys.executable).parent / "tsalgebra"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "tsalgebra"]
    r = subprocess.run(cmd + ["summary", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == {"residual block", "two-layer stack"}


# -------------------------------------------------------------- in-process


def call(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_per_output_similarity(ckpts, capsys):
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_10.safetensors"
    code, out, _ = call(capsys, "similarity", a, b, "--per-output", "--json")
    assert code == 0
    vals = json.loads(out)["value"]
    want = ts.similarity(ts.load(a), ts.load(b), per_output=True).value
    np.testing.assert_allclose(vals, want, rtol=1e-12)
    code, out, _ = call(capsys, "similarity", a, b, "--per-output")
    assert code == 0 and "output 2:" in out


@pytest.mark.parametrize("inner,centered", [("gaussian", False), ("gaussian", True), ("symmetric", False)])
def test_plan_counts_what_the_engine_contracts(ckpts, capsys, inner, centered):
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_2.safetensors"
    code, out, _ = call(capsys, "plan", a, b, "--inner", inner, "--json", *(["--centered"] if centered else []))
    assert code == 0
    rep = json.loads(out)
    done = ts.similarity(ts.load(a), ts.load(b), inner, centered=centered)
    assert rep["total_contractions"] == done.contractions and rep["total_flops"] == done.flops
    ab = next(p for p in rep["products"] if p["product"] == "<a,b>")
    sums = {s["sum"]: s for s in ab["sums"]}
    assert sums["<a,b>"]["orbits"] == ts.inner(ts.load(a), ts.load(b), inner).orbits
    assert sums["<a,b>"]["representative"]["flops"] == sums["<a,b>"]["flops_per_orbit_max"] > 0
    assert rep["within_budget"] and rep["peak_bytes"] > 0
    code, out, _ = call(capsys, "plan", a, b, "--inner", inner)
    assert code == 0 and "costliest orbit" in out


def test_plan_reports_the_engines_algorithm(ckpts, capsys):
    one, deep = ckpts / "run" / "step_1.safetensors", ckpts / "deep.safetensors"
    for path in (one, deep):
        code, out, err = call(capsys, "plan", path, path, "--json")
        assert code == 0, err
        rep = json.loads(out)
        m = ts.load(path)
        assert rep["products"][0]["algorithm"] == ts.inner(m, m).algorithm
    assert rep["products"][0]["algorithm"] == "quadrature"  # degree 8: pairings refused
    refused = {r["algorithm"]: r["reason"] for r in rep["products"][0]["not_chosen"]}
    assert "pairings (more than" in refused["pairings"] and rep["within_budget"]
    code, out, _ = call(capsys, "plan", deep, deep)
    assert code == 0 and "pairings refused" in out and "quadrature" in out
    code, out, _ = call(capsys, "similarity", deep, deep, "--inner", "network", "--json")
    assert code == 0 and json.loads(out)["value"] == pytest.approx(1.0)


def test_refusal_exits_3_with_the_other_methods(ckpts, capsys):
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_2.safetensors"
    code, out, err = call(capsys, "similarity", a, b, "--inner", "symmetric", "--budget", "1")
    assert code == 3 and "--budget" in err and out == ""
    deep = ckpts / "deep.safetensors"
    code, out, err = call(capsys, "plan", deep, deep, "--inner", "symmetric", "--budget", "1", "--json")
    rep = json.loads(out)
    assert code == 3 and rep["within_budget"] is False and "sampled" in rep["other_methods"]
    code, out, err = call(capsys, "plan", a, b, "--budget", "1")
    assert code == 3 and "--method closure: " in out and "per sample" in out


def test_sampled_from_the_command_line(ckpts, capsys):
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_2.safetensors"
    code, out, _ = call(capsys, "similarity", a, b, "--method", "sampled", "--samples", "500", "--seed", "1",
                        "--json")
    rep = json.loads(out)
    assert code == 0 and rep["method"] == "sampled" and rep["stderr"] > 0 and rep["samples"] == 500
    exact = json.loads(call(capsys, "similarity", a, b, "--json")[1])["value"]
    assert abs(rep["value"] - exact) < 4 * rep["stderr"]
    code, _, err = call(capsys, "similarity", a, b, "--seed", "1")
    assert code == 2 and "--method sampled" in err


def test_a_sampled_matrix_gives_its_standard_errors(ckpts, capsys, tmp_path):
    """The matrix of estimated cosines carried no error anywhere (JSON,
    text); each entry's is ts.similarity's for its pair."""
    run = ckpts / "run"
    code, out, err = call(capsys, "matrix", run, "--out", tmp_path / "m.png", "--method", "sampled", "--samples",
                          "300", "--seed", "2", "--json", "--no-progress")
    assert code == 0, err
    rep = json.loads(out)
    se = np.array(rep["stderr"])
    models = ts.load(run)
    want = ts.similarity(models[0], models[1], method="sampled", samples=300, seed=2).stderr
    assert rep["estimated"] and not rep["exact"] and se[0, 1] == pytest.approx(want, rel=1e-12)
    assert np.all(np.diag(se) == 0) and rep["measure"] and any("same samples" in n for n in rep["notes"])
    code, out, _ = call(capsys, "matrix", run, "--out", tmp_path / "m.png", "--method", "sampled", "--samples",
                        "300", "--seed", "2", "--no-progress")
    assert code == 0 and "standard errors up to" in out
    assert json.loads(call(capsys, "matrix", run, "--out", tmp_path / "e.png", "--json",
                           "--no-progress")[1])["stderr"] is None
    code, out, err = call(capsys, "matrix", run, "--out", tmp_path / "r.png", "--method", "sampled", "--rel-error",
                          "0.05", "--seed", "2", "--json", "--no-progress")  # as similarity takes it
    rep = json.loads(out)
    off = ~np.eye(len(rep["values"]), dtype=bool)
    assert code == 0 and np.all(np.array(rep["stderr"])[off] <= 0.05 * np.abs(np.array(rep["values"]))[off]), err


def test_matrix_over_a_directory(ckpts, capsys, tmp_path):
    png = tmp_path / "m.png"
    code, out, err = call(capsys, "matrix", ckpts / "run", "--out", png, "--csv", "--json", "--inner", "symmetric",
                          "--no-progress")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["labels"] == ["step_1", "step_2", "step_10"]  # natural order
    v = np.array(rep["values"])
    assert np.allclose(v, v.T) and np.allclose(np.diag(v), 1)
    models = ts.load(ckpts / "run")
    assert v[0, 2] == pytest.approx(ts.similarity(models[0], models[2], "symmetric").value, rel=1e-9)
    assert png.stat().st_size > 0
    rows = list(csv.reader(open(tmp_path / "m.csv")))
    assert rows[0] == ["", "step_1", "step_2", "step_10"] and float(rows[3][3]) == pytest.approx(1.0)
    code, out, _ = call(capsys, "matrix", ckpts / "run" / "step_1.safetensors", "--out", png)
    assert code == 2  # one checkpoint is not a matrix


def test_verify_formula_files(ckpts, capsys):
    sq = ckpts / "square.safetensors"
    code, out, _ = call(capsys, "verify", ckpts / "good.txt", sq, "--exact", "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["verdict"] == "equal" and rep["exact"] and rep["similarity"] == 1.0
    code, out, _ = call(capsys, "verify", ckpts / "wrong.txt", sq, "--exact")
    assert code == 1 and "different" in out and "3 - x1" in out
    code, out, err = call(capsys, "verify", ckpts / "evil.txt", sq)
    assert code == 1 and "only numbers" in err and out == ""
    code, out, _ = call(capsys, "verify", sq, sq)  # a checkpoint as the circuit
    assert code == 0 and "equal" in out
    with pytest.raises(ValueError, match="unknown names"):
        parse_formulas("x1 + y", ["x1", "x2"])
    assert str(parse_formulas("1e-3*x1^2 + .5*x2", ["x1", "x2"])[0]) == "0.001*x1**2 + 0.5*x2"


def test_verify_json_in_float_mode(ckpts):
    """Float figures once came back as 0-d arrays that the JSON writer tried to
    iterate: every verify --json without --exact failed."""
    sq = ckpts / "square.safetensors"
    r = run("verify", ckpts / "good.txt", sq, "--json")
    assert r.returncode == 0, r.stderr
    same = strict_json(r.stdout)
    assert same["verdict"] == "equal (within tolerance)" and same["exact"] is False
    assert same["similarity"] == pytest.approx(1, abs=1e-12)
    assert same["relative_residual"] == pytest.approx(0, abs=1e-12)
    assert same["per_output"]["similarity"] == [pytest.approx(1, abs=1e-12)] and same["certificate"] is None
    r = run("verify", ckpts / "wrong.txt", sq, "--json")
    assert r.returncode == 1, r.stderr  # a verdict of different exits 1 (like cmp)
    other = strict_json(r.stdout)
    want = ts.verify(parse_formulas("x1^2 - x2^2 + x1", ["x1", "x2"]), ts.load(sq), exact=False)
    assert other["verdict"] == "different" and other["exact"] is False
    for key in ("similarity", "relative_residual", "explained", "scale"):
        assert isinstance(other[key], float) and other[key] == pytest.approx(getattr(want, key), rel=1e-12)
    assert other["tolerance"] == 1e-9 and other["circuit"].endswith("wrong.txt")


def test_verify_formula_too_large_to_materialize_names_its_line(ckpts, capsys, tmp_path):
    """A formula within the parser's bounds (degree 64) whose padded tensor is
    beyond the limit failed with from_sympy's message and no file or line."""
    sq = ckpts / "square.safetensors"
    big = tmp_path / "big.txt"
    big.write_text("# a comment, then a blank line\n\n(x1 + x2 + 1)^64\n")
    code, out, err = call(capsys, "verify", big, sq)
    assert code == 1 and out == ""
    assert f"{big}:3: refused:" in err and "degree 64" in err and "from_sympy" not in err
    two = tmp_path / "two.txt"  # the line of the highest degree is the one named
    two.write_text("x1 + 1\n(x1 - x2)^30 + x1\nx3 * x4\n")
    code, _, err = call(capsys, "verify", two, ckpts / "run" / "step_1.safetensors", "--symbols", "x1 x2 x3 x4")
    assert code == 1 and f"{two}:2: refused:" in err


def test_plan_labels_each_products_sums(ckpts, capsys):
    """The pairing detail lines under <a,a> and <b,b> were labelled 'sum <a,b>'."""
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_2.safetensors"
    code, out, _ = call(capsys, "plan", a, b, "--centered", "--json")
    assert code == 0
    sums = {p["product"]: [s["sum"] for s in p["sums"]] for p in json.loads(out)["products"]}
    assert sums["<a,b>"] == ["<a,b>", "E[a]", "E[b]"]
    assert sums["<a,a>"] == sums["<b,b>"] == ["<f,f>", "E[f]", "E[f]"]


def test_template_builds_the_architecture(tmp_path, capsys):
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n"
        "class Fused(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.w = nn.Linear(3, 8); self.p = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        l, r = self.w(x).chunk(2, -1); return self.p(l * r)\n"
        "def build():\n"
        "    return Fused()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import arch

        for s in (1, 2):
            torch.manual_seed(s)
            torch.save(arch.build().state_dict(), tmp_path / f"f{s}.pt")
        code, out, err = call(capsys, "similarity", tmp_path / "f1.pt", tmp_path / "f2.pt", "--template",
                              f"{tmp_path / 'arch.py'}:build", "--json")
        assert code == 0, err
        assert -1 <= json.loads(out)["value"] <= 1
        code, _, err = call(capsys, "similarity", tmp_path / "f1.pt", tmp_path / "f2.pt")  # no template
        assert code == 2 and "--template" in err and "template=" not in err  # the option it needs: bad usage
        code, _, err = call(capsys, "similarity", tmp_path / "f1.pt", tmp_path / "f2.pt", "--template", "nope:build")
        assert code == 2 and "--template" in err
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("arch", None)


def test_usage_errors_in_process(capsys):
    for args in (["frobnicate"], []):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["similarity", "a", "b", "--samples", "0"], "--samples"),
    (["similarity", "a", "b", "--rel-error", "0"], "--rel-error"),
    (["similarity", "a", "b", "--budget", "-1"], "--budget"),
    (["similarity", "a", "b", "--n-ctx", "0"], "--n-ctx"),
    (["summary", "--batch", "0"], "--batch"),
    (["demo", "grokking", "-P", "4"], "--modulus"),
    (["demo", "grokking", "--train-fraction", "1.5"], "--train-fraction"),
])
def test_option_values_out_of_range_are_usage_errors(args, named, capsys):
    """They exited 1 (a failed computation), some with numpy's own message."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own type check
        code = e.code
    assert code == 2 and named in capsys.readouterr().err


def test_subcommand_help_exits_0(capsys):
    for cmd in ("similarity", "matrix", "verify", "plan", "summary"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["demo", "grokking", "--help"])
    assert e.value.code == 0
    assert "--modulus" in capsys.readouterr().out


def test_template_file_imports_its_neighbours(tmp_path, capsys):
    """A template beside the user's model code imports it (the installed
    command's sys.path does not hold the template's folder)."""
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "class Fused(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.w = nn.Linear(3, 8); self.p = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        l, r = self.w(x).chunk(2, -1); return self.p(l * r)\n")
    (tmp_path / "tpl.py").write_text("from mymodels import Fused\ndef build():\n    return Fused()\n")
    for s in (1, 2):
        torch.manual_seed(s)
        torch.save(_fused_state(), tmp_path / f"m{s}.pt")
    r = run("similarity", tmp_path / "m1.pt", tmp_path / "m2.pt", "--template", f"{tmp_path / 'tpl.py'}:build",
            "--json", cwd=tmp_path.parent)
    assert r.returncode == 0, r.stderr
    sys.modules.pop("mymodels", None)


def _fused_state():
    w, p = torch.nn.Linear(3, 8), torch.nn.Linear(4, 2)
    return {"w.weight": w.weight, "w.bias": w.bias, "p.weight": p.weight, "p.bias": p.bias}


def test_matrix_outputs_checked_before_the_run_data_before_figure(ckpts, capsys, tmp_path):
    run_dir = ckpts / "run"
    code, _, err = call(capsys, "matrix", run_dir, "--out", tmp_path / "m.unknown", "--no-progress")
    assert code == 2 and "suffix" in err
    code, _, err = call(capsys, "matrix", run_dir, "--out", tmp_path / "nowhere" / "m.png", "--no-progress")
    assert code == 2 and "does not exist" in err
    code, out, err = call(capsys, "matrix", run_dir, "--out", tmp_path, "--csv", "--no-progress", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["figure"] == str(tmp_path / "matrix.png") and (tmp_path / "matrix.png").is_file()
    assert (tmp_path / "matrix.csv").is_file()


def test_token_frequencies_from_a_file(tmp_path, capsys):
    """--token-probs: a language model's similarity (and matrix) under token
    frequencies read from .npy, .csv or whitespace text (one law per
    position, or one for all), equal to the library's; a file that is missing, not numeric,
    of the wrong shape, or given with another inner product exits 2 naming
    the option."""
    (tmp_path / "arch_lm.py").write_text(
        "from torch import nn\n"
        "from tsalgebra.adapters import BilinearAttentionModule\n"
        "def build():\n"
        "    return nn.Sequential(nn.Embedding(6, 4), BilinearAttentionModule(2, 2, 4, n_ctx=3, causal=True),\n"
        "                         nn.Linear(4, 6)).double()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import arch_lm

        models = []
        for s in (1, 2):
            torch.manual_seed(s)
            m = arch_lm.build()
            torch.save(m.state_dict(), tmp_path / f"m{s}.pt")
            models.append(ts.from_torch(m))
        p = np.random.default_rng(0).random((3, 6))
        p /= p.sum(axis=1, keepdims=True)
        np.save(tmp_path / "p.npy", p)
        np.savetxt(tmp_path / "p.csv", p, delimiter=",")
        np.savetxt(tmp_path / "one.txt", p[0])
        (tmp_path / "short.csv").write_text("0.5,0.5\n")
        (tmp_path / "words.txt").write_text("x y\n")
        (tmp_path / "renamed.npy").write_bytes(b"\x08" + bytes(7) + b"{}      ")  # numpy: 'pickled' (allow_pickle=)
        (tmp_path / "zipped.npy").write_bytes((tmp_path / "m1.pt").read_bytes())  # a zip: numpy opens it as .npz
        base = ["similarity", tmp_path / "m1.pt", tmp_path / "m2.pt", "--template", f"{tmp_path / 'arch_lm.py'}:build"]
        for name, probs in (("p.npy", p), ("p.csv", p), ("one.txt", p[0])):
            code, out, err = call(capsys, *base, "--token-probs", tmp_path / name, "--json")
            assert code == 0, err
            got = json.loads(out)
            want = ts.similarity(*models, measure=ts.Tokens(6, 3, probs))
            assert got["value"] == pytest.approx(want.value, rel=1e-12) and "given frequencies" in got["measure"]
        assert want.value != pytest.approx(ts.similarity(*models).value, rel=1e-3)  # the frequencies matter
        code, out, err = call(capsys, "matrix", tmp_path / "m1.pt", tmp_path / "m2.pt", "--template",
                              f"{tmp_path / 'arch_lm.py'}:build", "--token-probs", tmp_path / "one.txt",
                              "--out", tmp_path / "m.png", "--json", "--no-progress")
        assert code == 0, err
        assert json.loads(out)["values"][0][1] == pytest.approx(want.value, rel=1e-12)
        for extra, says in ((["--token-probs", tmp_path / "nope.npy"], "no such file"),
                            (["--token-probs", tmp_path / "short.csv"], "vocabulary"),
                            (["--token-probs", tmp_path / "words.txt"], "not a numeric array"),
                            (["--token-probs", tmp_path / "renamed.npy"], "not in numpy's .npy format)"),
                            (["--token-probs", tmp_path / "zipped.npy"], "an archive of arrays (.npz), not one"),
                            (["--token-probs", tmp_path / "p.npy", "--inner", "gaussian"], "token measure")):
            code, _, err = call(capsys, *base, *extra)
            assert code == 2 and "--token-probs" in err and says in err and "pickle" not in err, err
        # verify: a language model's own measure by default, the frequencies with --token-probs
        verify = ["verify", tmp_path / "m2.pt", tmp_path / "m1.pt", "--template", f"{tmp_path / 'arch_lm.py'}:build",
                  "--json"]
        for extra, measure in (([], ts.Tokens(6, 3)), (["--token-probs", tmp_path / "p.npy"], ts.Tokens(6, 3, p)),
                               (["--inner", "gaussian"], None)):
            code, out, err = call(capsys, *verify, *extra)
            got = json.loads(out)
            want = ts.similarity(*models, **({"inner": "gaussian"} if measure is None else {"measure": measure}))
            assert code == 1 and got["verdict"] == "different" and got["inner"] == want.inner, err
            assert got["similarity"] == pytest.approx(want.value, rel=1e-9)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("arch_lm", None)


# ------------------------------------------- errors in the command line's terms

PYTHON_SPELLINGS = ("rel_error", "n_ctx", "state_key", "centered=", "template=", "measure=", "inner=", "method=",
                    "samples must", "ts.Tokens", "Traceback", "Warning:")


def lm_run(path: Path, **config) -> Path:
    """A language-model run folder (config.json + checkpoints/): what the
    command line checks comes before the weights are read."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict(dict(vocab_size=5, d_model=4, n_head=2, n_layers=1), **config)))
    for step in (0, 100):
        torch.save({"embed.weight": torch.zeros(5, 4)}, path / "checkpoints" / f"step_{step:05d}.pt")
    return path


@pytest.mark.parametrize("config, says", [({"n_head": 3}, "not divisible by n_head 3"),
                                          ({"vocab_size": "five"}, "vocab_size must be a positive integer")])
def test_a_bad_run_config_is_named_not_a_missing_n_ctx(tmp_path, capsys, config, says):
    """With --n-ctx given, a run whose config.json is wrong said 'pass n_ctx='
    (the retry without --n-ctx replaced the real error)."""
    run_dir = lm_run(tmp_path / "run", **config)
    a, b = sorted((run_dir / "checkpoints").iterdir())
    code, out, err = exit_code(capsys, "similarity", a, b, "--n-ctx", "3")
    assert code == 1 and out == ""
    assert f"{run_dir / 'config.json'}: " in err and says in err, err
    assert "n_ctx" not in err and "--n-ctx" not in err


@pytest.fixture()
def usage_cases(tmp_path, ckpts):
    """Checkpoints whose use is wrong: a foreign layout, one holding two
    state dicts, a language-model run's checkpoint."""
    torch.save({"w": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    one = ckpts / "run" / "step_1.safetensors"
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in
          __import__("safetensors.numpy", fromlist=["load_file"]).load_file(one).items()}
    torch.save({"model": sd, "ema": sd}, tmp_path / "two.pt")
    run_dir = lm_run(tmp_path / "lm")
    return {"one": one, "two": tmp_path / "two.pt", "foreign": tmp_path / "foreign.pt",
            "lm": run_dir / "checkpoints" / "step_00000.pt", "dir": ckpts / "run", "tmp": tmp_path}


@pytest.mark.parametrize("args, named", [
    (["similarity", "one", "one", "--method", "sampled", "--rel-error", "2"], "--rel-error"),
    (["similarity", "one", "one", "--method", "sampled", "--samples", "1"], "--samples"),
    (["similarity", "one", "one", "--method", "sampled", "--seed", "-1"], "--seed"),
    (["matrix", "dir", "--method", "sampled", "--samples", "1"], "--samples"),
    (["similarity", "one", "one", "--inner", "network", "--centered"], "--centered"),
    (["plan", "one", "one", "--inner", "symmetric", "--centered"], "--centered"),
    (["matrix", "dir", "--inner", "network", "--centered"], "--centered"),
    (["similarity", "one", "one", "--inner", "tokens"], "--inner tokens"),
    (["plan", "one", "one", "--inner", "tokens"], "--inner tokens"),
    (["similarity", "one", "one", "--inner", "symmetric", "--method", "closure"], "--method closure"),
    (["similarity", "two", "one", "--state-key", "best"], "--state-key best"),
    (["similarity", "two", "one"], "--state-key"),
    (["similarity", "foreign", "one"], "--template"),
    (["matrix", "foreign", "one"], "--template"),
    (["similarity", "lm", "lm"], "--n-ctx"),
    (["plan", "lm", "lm"], "--n-ctx"),
])
def test_usage_errors_exit_2_in_the_command_lines_spelling(usage_cases, capsys, args, named):
    """They exited 1 with the library's Python spellings (rel_error must be,
    centered=True, measure=ts.Tokens(vocab), state_key='ema', pass
    template=..., pass n_ctx=)."""
    argv = [str(usage_cases.get(a, a)) for a in args]
    if argv[0] == "matrix":
        argv += ["--out", str(usage_cases["tmp"] / "m.png"), "--no-progress"]
    code, out, err = exit_code(capsys, *argv)
    assert code == 2 and out == "", err
    assert named in err, err
    assert not [p for p in PYTHON_SPELLINGS if p in err], err


def test_library_warnings_are_notes(tmp_path, capsys):
    """A dead output channel printed a raw 'inner.py:278: RuntimeWarning'
    line, and the JSON's notes were empty beside its null."""
    rng = np.random.default_rng(3)
    up, down = rng.normal(size=(5, 4)), rng.normal(size=(3, 5))
    save(ts.Bilinear(up, rng.normal(size=(5, 4)), down), tmp_path / "a.safetensors")
    dead = down.copy()
    dead[1] = 0
    save(ts.Bilinear(up, rng.normal(size=(5, 4)), dead), tmp_path / "dead.safetensors")
    args = ["similarity", tmp_path / "a.safetensors", tmp_path / "dead.safetensors", "--per-output"]
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # a warning that escaped the command would raise here
        code, out, err = exit_code(capsys, *args, "--json")
        assert code == 0 and err == ""
        rep = json.loads(out)
        assert rep["value"][1] is None and any("zero norm" in n for n in rep["notes"])
        code, out, err = exit_code(capsys, *args)
    assert code == 0 and err == "" and "output 1: nan" in out
    assert out.rstrip().splitlines()[-1] == "note: some output channels have zero norm; their similarity is NaN"


def test_errors_name_the_files(ckpts, capsys, tmp_path):
    """The library names models by index ('row model 2 has zero norm'), by
    side ('model b') or by description; the command line knows the files."""
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_2.safetensors"
    zero = tmp_path / "zero.safetensors"
    save(ts.Bilinear(np.zeros((5, 4)), np.zeros((5, 4)), np.zeros((3, 5))), zero)
    code, _, err = exit_code(capsys, "matrix", a, b, zero, "--out", tmp_path / "z.png", "--no-progress")
    assert code == 1 and f"{zero} has zero norm" in err and "model 2" not in err, err
    code, _, err = exit_code(capsys, "similarity", a, zero)
    assert code == 1 and f"{zero} has zero norm" in err and "model b" not in err, err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in (a, b):
        (mixed / f.name).write_bytes(f.read_bytes())
    (mixed / "step_5.safetensors").write_bytes((ckpts / "wide.safetensors").read_bytes())
    code, _, err = exit_code(capsys, "matrix", mixed, "--out", tmp_path / "w.png", "--no-progress")
    assert code == 1 and "input widths differ" in err and f"{mixed / 'step_5.safetensors'} takes 6" in err, err
    code, _, err = exit_code(capsys, "similarity", a, ckpts / "wide.safetensors")
    assert code == 1 and f"{a} takes 4" in err and f"{ckpts / 'wide.safetensors'} takes 6" in err
    assert "Bilinear(" not in err


def test_matrix_refusal_lists_the_other_methods(ckpts, capsys, tmp_path):
    """matrix offered only --budget, where similarity lists --method closure
    and --method sampled for the same models."""
    code, out, err = exit_code(capsys, "matrix", ckpts / "run", "--budget", "1", "--out", tmp_path / "x.png",
                               "--no-progress")
    assert code == 3 and out == "" and "--budget" in err, err
    assert "--method closure" in err and "--method sampled" in err, err
    assert "budget=" not in err and "method=" not in err


def test_json_errors_are_json_on_stdout(ckpts, capsys, tmp_path):
    """With --json an error printed nothing on stdout; now a JSON object
    (the message stays on stderr)."""
    a, b = ckpts / "run" / "step_1.safetensors", ckpts / "run" / "step_2.safetensors"
    code, out, err = exit_code(capsys, "similarity", a, ckpts / "nope.pt", "--json")
    assert code == 2 and json.loads(out) == {"error": f"{ckpts / 'nope.pt'}: no such file or directory",
                                             "exit_code": 2} and "no such file" in err
    code, out, err = exit_code(capsys, "similarity", a, b, "--inner", "symmetric", "--budget", "1", "--json")
    rep = json.loads(out)
    assert code == 3 and rep["exit_code"] == 3 and rep["error"] in err
    assert any(alt.startswith("--budget ") for alt in rep["alternatives"])
    code, out, err = exit_code(capsys, "similarity", a, b, "--samples", "1", "--json")  # argparse's own check
    assert code == 2 and json.loads(out)["exit_code"] == 2 and "--samples" in json.loads(out)["error"]
    code, out, _ = exit_code(capsys, "similarity", a, b, "--samples", "1")
    assert code == 2 and out == ""  # without --json, stdout stays empty


def test_a_file_named_like_an_option_keeps_its_name(tmp_path, capsys):
    """The translation of the library's keywords to flags rewrote a file
    named samples=5.pt as '--samples 5.pt' and made its failure a usage
    error (exit 2)."""
    bad = tmp_path / "samples=5.pt"
    bad.write_bytes(b"not a checkpoint")
    code, out, err = exit_code(capsys, "similarity", bad, bad, "--json")
    assert code == 1 and str(bad) in err and json.loads(out)["error"].startswith(str(bad)), err
