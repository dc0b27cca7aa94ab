"""Fixes of the command line and loading: summary's --batch is estimated
before anything is allocated, and an out-of-memory message names only the
options of the command run; an unreadable store tile is a note of the
result (never numpy's allow_pickle advice); directories sort on the file
stems (run < run2 < run10); a template that does not fit the checkpoints is
a usage error naming --template and the checkpoint, in words; verify --tol
below float64 rounding notes that --exact decides exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tsalgebra as ts
import tsalgebra.cli as cli
import tsalgebra.problem as problem
from helpers import exit_code, saved_bilinears, template_checkpoints

# ------------------------------------------------------------ 1. summary --batch, out of memory


def test_summary_batch_is_estimated_and_refused_by_its_flag(monkeypatch, capsys):
    monkeypatch.setattr(problem, "available_memory", lambda: 10 * 2**20)  # 10 MiB: a bound of 5 MiB
    code, out, err = exit_code(capsys, "summary", "--batch", "20000", "--json")
    assert code == cli.EXIT_USAGE == 2, err
    said = json.loads(out)
    assert said["exit_code"] == 2
    message = said["error"]
    assert message.startswith("--batch 20000:") and "GB" in message and "bytes a sample" in message
    assert "--n-ctx" not in message and "--max-memory" not in message and "--budget" not in message
    fits = int(message.rsplit("give --batch ", 1)[1].split()[0])
    assert cli.summary_bytes(fits) <= 5 * 2**20 < cli.summary_bytes(20000)
    code, out, err = exit_code(capsys, "summary", "--batch", str(fits), "--json")  # the value it names runs
    assert code == 0, err
    assert json.loads(out)[0]["max_abs_error_vs_direct"] < 1e-9


def test_summary_default_batch_runs(capsys):
    code, out, err = exit_code(capsys, "summary", "--json")
    assert code == 0, err
    assert len(json.loads(out)) == 2


def _out_of_memory(args):
    raise MemoryError("an allocation of 80 GB")


@pytest.mark.parametrize("command, argv, named, not_named", [
    ("cmd_summary", ["summary"], ["--batch"], ["--n-ctx", "--budget", "--max-memory", "fewer"]),
    ("cmd_similarity", ["similarity", "a", "b"], ["--n-ctx", "--budget", "--max-memory"], ["--batch", "fewer"]),
    ("cmd_matrix", ["matrix", "a", "b"], ["fewer checkpoints", "--n-ctx", "--max-memory", "--tile"], ["--batch"]),
])
def test_the_out_of_memory_message_names_only_the_commands_options(monkeypatch, capsys, command, argv, named,
                                                                    not_named):
    monkeypatch.setattr(cli, command, _out_of_memory)
    code, out, err = exit_code(capsys, *argv, "--json")
    assert code == 1
    message = json.loads(out)["error"]
    assert message.startswith("out of memory (an allocation of 80 GB); try ")
    assert all(n in message for n in named), message
    assert not any(n in message for n in not_named), message


# ------------------------------------------------------------ 2. an unreadable store tile is a note


@pytest.fixture()
def four(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    saved_bilinears(folder, n=4)
    return folder


def test_an_unreadable_store_tile_is_a_note_of_the_result(four, tmp_path, capsys):
    models = ts.load(four)
    store = tmp_path / "st"
    first = ts.similarity_matrix(models, inner="symmetric", store=store, tile=2, progress=False)
    (store / "tiles" / "r0-2_c0-2.npz").write_text("garbage\n")
    (store / "tiles" / "r0-2_c2-4.npz").write_bytes(b"")
    with pytest.warns(UserWarning, match="is unreadable") as caught:
        again = ts.similarity_matrix(models, inner="symmetric", store=store, tile=2, progress=False)
    assert sorted(str(w.message).split()[2] for w in caught) == ["r0-2_c0-2.npz", "r0-2_c2-4.npz"]
    assert again.tiles.computed == 2 and again.tiles.from_store == 1
    assert ("store tile r0-2_c0-2.npz is unreadable (not a tile this store wrote: truncated or corrupted): "
            "computed again") in again.notes
    assert "store tile r0-2_c2-4.npz is unreadable (an empty file): computed again" in again.notes
    assert not any("pickle" in n for n in again.notes)
    assert "pickle" not in capsys.readouterr().err
    np.testing.assert_allclose(again.values, first.values, atol=1e-12)


def test_an_unreadable_store_tile_is_a_note_on_the_command_line(four, tmp_path, capsys):
    store, fig = tmp_path / "st", tmp_path / "m.png"
    base = ["matrix", four, "--inner", "symmetric", "--store", store, "--tile", "2", "--out", fig, "--no-progress"]
    assert exit_code(capsys, *base)[0] == 0
    (store / "tiles" / "r0-2_c0-2.npz").write_text("garbage\n")
    code, out, err = exit_code(capsys, *base, "--json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    said = "store tile r0-2_c0-2.npz is unreadable (not a tile this store wrote: truncated or corrupted): computed again"
    assert notes.count(said) == 1
    assert "pickle" not in err and "pickle" not in out
    (store / "tiles" / "r0-2_c0-2.npz").write_text("garbage\n")
    code, out, err = exit_code(capsys, *base)
    assert code == 0 and f"note: {said}" in out.splitlines()
    assert "pickle" not in err


# ------------------------------------------------------------ 3. natural order on the stems


def test_a_folder_loads_in_natural_order_of_its_stems(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("run", "run2", "run10", "run_1", "final"):
        ts.save(ts.Bilinear(rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4))),
                tmp_path / f"{name}.safetensors")
    order = ("final", "run", "run2", "run10", "run_1")
    assert ts.load(tmp_path).names == order
    assert tuple(p.stem for p in ts.io.checkpoint_paths(tmp_path)) == order
    code, out, err = exit_code(capsys, "matrix", tmp_path, "--inner", "symmetric", "--out", tmp_path / "m.png",
                               "--no-progress", "--json")
    assert code == 0, err
    assert tuple(json.loads(out)["labels"]) == order


# ------------------------------------------------------------ 4. a template that does not fit: usage, in words

SOURCE = ("from torch import nn\n"
          "from tsalgebra.adapters import BilinearLayer\n"
          "def build():\n"
          "    return nn.Sequential(BilinearLayer(3, 4, 2))\n"
          "def wrong():\n"
          "    return nn.Sequential(BilinearLayer(3, 5, 2), nn.Linear(2, 2))\n"
          "def not_a_module():\n"
          "    return 42\n"
          "not_a_function = 3\n")


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tpl")
    spec, paths = template_checkpoints(folder, "fixes4_model", SOURCE)
    return spec.rsplit(":", 1)[0], paths


def test_a_template_of_other_shapes_is_a_usage_error_in_words(templated, capsys):
    file, (a, b) = templated
    assert exit_code(capsys, "similarity", a, b, "--template", f"{file}:build")[0] == 0
    code, out, err = exit_code(capsys, "similarity", a, b, "--template", f"{file}:wrong", "--json")
    assert code == cli.EXIT_USAGE == 2, err
    message = json.loads(out)["error"]
    assert message.startswith(f"--template {file}:wrong cannot read {a}: ")
    assert "size mismatch" in message and "is (4, 3) in the checkpoint, (5, 3) in the template" in message
    assert "of the template missing from the checkpoint: 1.weight, 1.bias" in message
    assert "torch.Size" not in message and "Error(s) in loading" not in message
    assert "usage: tsalgebra similarity" in err


def test_a_template_that_builds_no_module_is_a_usage_error_naming_it(templated, capsys):
    file, (a, b) = templated
    code, out, err = exit_code(capsys, "similarity", a, b, "--template", f"{file}:not_a_module", "--json")
    assert code == 2, err
    message = json.loads(out)["error"]
    assert message.startswith(f"--template {file}:not_a_module cannot read {a}: ") and "returned int" in message
    code, out, err = exit_code(capsys, "matrix", a, b, "--template", f"{file}:not_a_function", "--json")
    assert code == 2, err
    message = json.loads(out)["error"]
    assert message.startswith(f"--template {file}:not_a_function: ") and "is int" in message


def test_the_python_api_says_the_mismatch_with_the_file(templated):
    import importlib.util

    file, (a, _) = templated
    spec = importlib.util.spec_from_file_location("fixes4_model_api", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ts.io.TemplateError, match=rf"^{a}: the checkpoint's state dict does not fit the template: "
                                                  r"size mismatch") as err:
        ts.load(a, template=module.wrong)
    assert isinstance(err.value, ts.LoadError) and "torch.Size" not in str(err.value)


# ------------------------------------------------------------ 5. verify --tol 0 and float rounding


@pytest.fixture()
def rounded(tmp_path):
    """A component whose float64 figures against its own formula are off by rounding (4.4e-16)."""
    ts.save(ts.Bilinear(np.array([[0.1, 0.2]]), np.array([[0.3, 0.7]]), np.array([[1.1]])),
            tmp_path / "comp.safetensors")
    (tmp_path / "c.txt").write_text("(0.1*x1+0.2*x2)*(0.3*x1+0.7*x2)*1.1\n")
    (tmp_path / "other.txt").write_text("x1*x2\n")
    return tmp_path


def test_verify_tol_below_rounding_notes_exact(rounded, capsys):
    comp, circuit = rounded / "comp.safetensors", rounded / "c.txt"
    code, out, err = exit_code(capsys, "verify", circuit, comp, "--tol", "0", "--json")
    assert code == 1, err
    said = json.loads(out)
    assert said["verdict"] == "different"  # the verdict is kept
    note = [n for n in said["notes"] if "float64 rounding" in n]
    assert len(note) == 1 and note[0].startswith("--tol 0 is below") and "--exact" in note[0]
    assert "exact=True" not in note[0]
    code, out, _ = exit_code(capsys, "verify", circuit, comp, "--tol", "0")
    assert code == 1 and "note: --tol 0 is below the float64 rounding" in out
    code, out, _ = exit_code(capsys, "verify", circuit, comp, "--tol", "0", "--exact", "--json")
    assert code == 0 and json.loads(out)["verdict"] == "equal"
    code, out, _ = exit_code(capsys, "verify", circuit, comp, "--json")  # the default tol: equal, no note
    assert code == 0 and not any("rounding" in n for n in json.loads(out)["notes"])
    code, out, _ = exit_code(capsys, "verify", rounded / "other.txt", comp, "--tol", "0", "--json")
    assert code == 1 and not any("rounding" in n for n in json.loads(out)["notes"])  # truly different: no note


def test_verify_tol_note_in_python_spelling(rounded):
    from tsalgebra.formulas import parse_formulas

    circuit = parse_formulas((rounded / "c.txt").read_text(), ["x1", "x2"], "c.txt")
    rep = ts.verify(circuit, ts.load(rounded / "comp.safetensors"), tol=0, exact=False)
    assert rep.verdict == "different"
    assert any(n.startswith("tol=0 is below the float64 rounding") and "exact=True" in n for n in rep.notes)
