"""Command-line fixes found by probing as a user (each test fails before its fix)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tsalgebra as ts
from helpers import exit_code, saved_bilinears


def test_csv_before_the_paths_does_not_overwrite_a_checkpoint(tmp_path, capsys):
    """``--csv`` takes an optional value: written before the paths it took the
    first checkpoint as its PATH, wrote the CSV over it and left it out of
    the matrix (exit 0)."""
    paths = saved_bilinears(tmp_path, n=3)
    before = paths[0].read_bytes()
    code, out, err = exit_code(capsys, "matrix", "--csv", *paths, "--out", tmp_path / "m.png", "--no-progress")
    assert code == 2 and "--csv " in err and "give --csv after the checkpoints" in err, err
    assert paths[0].read_bytes() == before and not (tmp_path / "m.png").exists()
    folder = tmp_path / "run1"
    folder.mkdir()
    ts.save(ts.load(paths[1]), folder / "x.safetensors")
    code, out, err = exit_code(capsys, "matrix", "--csv", folder, *paths[1:], "--out", tmp_path / "m.png", "--json")
    assert code == 2 and "a checkpoint folder" in json.loads(out)["error"]
    code, out, err = exit_code(capsys, "matrix", *paths, "--out", tmp_path / "m.png", "--no-progress", "--csv")
    assert code == 0 and (tmp_path / "m.csv").exists(), err


TORCH_MODEL = '''
import torch


class Bil(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.left = torch.nn.Linear(4, 6, bias=False)
        self.right = torch.nn.Linear(4, 6, bias=False)
        self.down = torch.nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.down(self.left(x) * self.right(x))
'''


@pytest.fixture()
def torch_run(tmp_path):
    """A torch checkpoint of a model whose class lives in mymodel.py."""
    import sys

    import torch

    (tmp_path / "mymodel.py").write_text(TORCH_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        from mymodel import Bil

        torch.save(Bil().state_dict(), tmp_path / "a.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodel", None)
    return tmp_path


@pytest.mark.parametrize("source,says,code", [
    ("import argparse\nfrom mymodel import Bil\nargparse.ArgumentParser().parse_args(['--lr'])\n"
     "def build():\n    return Bil()\n", "train.py exited (SystemExit: 2)", 2),
    ("import sys\nfrom mymodel import Bil\ndef build():\n    return Bil()\nsys.exit(0)\n",
     "train.py exited (SystemExit: 0)", 2),
    ("def build():\n    raise SystemExit(3)\n", "train.build() raised RuntimeError: it called exit (SystemExit: 3)", 1),
])
def test_a_template_that_exits_is_an_error_said(torch_run, capsys, source, says, code):
    """A training script's argparse or sys.exit at import (or an exit in the
    builder) ended the command with its own code and nothing on stdout: exit
    0 with no result, or 3 ('refused') with nothing said."""
    (torch_run / "train.py").write_text(source)
    got, out, err = exit_code(capsys, "similarity", torch_run / "a.pt", torch_run / "a.pt",
                              "--template", f"{torch_run / 'train.py'}:build", "--json")
    assert got == code and says in json.loads(out)["error"], (out, err)


def test_a_builder_imports_the_code_beside_it_when_called(torch_run, capsys):
    """The template's folder was on the path only while its module ran: a
    builder importing its model inside the function found nothing."""
    (torch_run / "lazy.py").write_text("def build():\n    from mymodel import Bil\n    return Bil()\n")
    code, out, err = exit_code(capsys, "similarity", torch_run / "a.pt", torch_run / "a.pt",
                               "--template", f"{torch_run / 'lazy.py'}:build", "--json")
    assert code == 0 and json.loads(out)["value"] == pytest.approx(1.0), err


def test_the_size_bound_is_an_option_of_the_command_line(tmp_path, capsys):
    """The refusal of a file over the bound on its tensors said 'raise it with
    max_bytes=', an argument the command line did not have."""
    a, b = saved_bilinears(tmp_path, n=2)
    for command in (["similarity", a, b], ["verify", a, b], ["plan", a, b],
                    ["matrix", a, b, "--out", tmp_path / "m.png", "--no-progress"]):
        code, out, err = exit_code(capsys, *command, "--max-bytes", "100", "--json")
        said = json.loads(out)["error"]
        assert code == 2 and "exceed the bound of 100 (raise it with --max-bytes BYTES)" in said, said
        code, out, err = exit_code(capsys, *command, "--max-bytes", "100000", "--json")
        assert code == (1 if command[0] == "verify" else 0) and "error" not in json.loads(out), err  # 1: 'different'


def test_a_matrix_refusal_costs_every_product_and_names_the_files(tmp_path, capsys):
    """The pairwise route refused at its first product and suggested that
    product's budget (1.6e5 flops), which the second model's norm (5.3e5)
    refused again; the message named no file."""
    rng = np.random.default_rng(3)
    def bil(d, h, o):
        return ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)))

    ts.save(bil(4, 6, 3), tmp_path / "one.safetensors")
    ts.save(ts.Sequential(bil(4, 6, 4), bil(4, 6, 3)), tmp_path / "stack.safetensors")
    files = [tmp_path / "one.safetensors", tmp_path / "stack.safetensors"]
    models = [ts.load(f) for f in files]
    with pytest.raises(ts.CostError) as refused:
        ts.similarity_matrix(models, budget=0, route="pairwise", progress=False)
    said = str(refused.value)
    assert said.startswith("model 0 with model 1: ") and "the norm of model 1" in said, said
    budget = next(a.value for a in refused.value.alternatives if a.option == "budget")
    assert ts.similarity_matrix(models, budget=budget, route="pairwise", progress=False).values.shape == (2, 2)
    code, out, err = exit_code(capsys, "matrix", *files, "--out", tmp_path / "m.png", "--budget", "0",
                               "--route", "pairwise", "--no-progress", "--json")
    got = json.loads(out)
    assert code == 3 and got["error"].startswith(f"{files[0]} with {files[1]}: "), got
    assert f"the norm of {files[1]}" in got["error"] and any(a.startswith("--budget") for a in got["alternatives"])


@pytest.mark.parametrize("flag", ["--js", "--jso", "--json"])
def test_an_abbreviated_json_flag_gets_json_errors_too(tmp_path, capsys, flag):
    """argparse takes --js for --json: the output was JSON, but a usage error
    argparse itself reports printed none."""
    a, b = saved_bilinears(tmp_path, n=2)
    code, out, err = exit_code(capsys, "similarity", a, b, flag, "--budget", "-1")
    assert code == 2 and "--budget" in json.loads(out)["error"], (out, err)


def test_an_integer_in_float_spelling_is_read_exactly():
    """--seed 1e30 was read through a float: 1000000000000000019884624838656,
    another seed than 10^30."""
    from tsalgebra.cli import _COUNT

    assert _COUNT("1e30") == 10**30 and _COUNT("3.09e+08") == 309_000_000 and _COUNT("12") == 12
    for bad in ("1.5", "nan", "inf", "1e5000", "-1e3"):
        with pytest.raises(Exception, match="is not an integer"):
            _COUNT(bad)
