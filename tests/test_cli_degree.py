"""``--degree``: the symmetric product's common degree on the command line
(the library's ``degree=``), so that the note and the refusals that suggest
it name an option the command has."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tsalgebra as ts
from helpers import exit_code, saved_bilinears


@pytest.fixture()
def folder(tmp_path):
    """Two bilinear layers (degree 2) and a linear one (degree 1)."""
    saved_bilinears(tmp_path, n=2)
    ts.save(ts.Linear(np.random.default_rng(1).normal(size=(2, 3))), tmp_path / "lin.safetensors")
    return tmp_path


def test_similarity_and_plan_take_the_degree(folder, capsys):
    a, b = folder / "m0.safetensors", folder / "m1.safetensors"
    code, out, err = exit_code(capsys, "similarity", a, b, "--inner", "symmetric", "--degree", "3", "--json")
    assert code == 0, err
    got = json.loads(out)
    want = ts.similarity(ts.load(a), ts.load(b), "symmetric", degree=3)
    assert got["degree"] == 3 and got["value"] == pytest.approx(want.value, rel=1e-12)
    code, out, err = exit_code(capsys, "plan", a, folder / "lin.safetensors", "--inner", "symmetric", "--degree", "4")
    assert code == 0 and "within the budget" in out, err


def test_matrix_takes_the_degree_and_its_note_names_the_option(folder, capsys, tmp_path):
    paths = [folder / f for f in ("m0.safetensors", "m1.safetensors", "lin.safetensors")]
    base = ["matrix", *paths, "--inner", "symmetric", "--out", tmp_path / "m.png", "--no-progress"]
    code, out, err = exit_code(capsys, *base)
    assert code == 0, err
    note = next(line for line in out.splitlines() if "common degree 2" in line)
    assert "pass --degree K to choose" in note and "degree=" not in note
    code, out, err = exit_code(capsys, *base, "--degree", "4", "--json")
    assert code == 0, err
    got = json.loads(out)
    models = [ts.load(p) for p in paths]
    want = ts.similarity_matrix(models, inner="symmetric", degree=4).values
    assert np.allclose(got["values"], want, rtol=1e-12, atol=1e-15)
    assert not any("common degree" in n for n in got["notes"])  # the degree was chosen: nothing lifted silently
    assert got["values"][0][1] == pytest.approx(ts.similarity(models[0], models[1], "symmetric", degree=4).value,
                                                rel=1e-12)


@pytest.mark.parametrize("extra,says", [
    (["--degree", "3"], "--degree K belongs to --inner symmetric"),  # under the Gaussian
    (["--inner", "symmetric", "--degree", "1"], "--degree 1 is below the models' degree 2"),
    (["--inner", "symmetric", "--degree", "0"], "--degree"),  # argparse: not an integer > 0
])
def test_a_wrong_degree_is_a_usage_error_naming_the_option(folder, capsys, extra, says):
    code, out, err = exit_code(capsys, "similarity", folder / "m0.safetensors", folder / "m1.safetensors", *extra)
    assert code == 2 and says in err and "Traceback" not in err, err


def test_a_refusal_at_a_lifted_degree_offers_the_models_own(folder, capsys):
    """Lifting adds input legs (the pairings grow factorially): a symmetric
    product refused at degree 12 is offered at the models' degree 2, where it
    plans within the same budget; not offered when asked at that degree."""
    a, b = (ts.load(folder / f"m{k}.safetensors") for k in (0, 1))
    with pytest.raises(ts.CostError) as refused:
        ts.similarity(a, b, "symmetric", degree=12, budget=1e6)
    offered = [alt for alt in refused.value.alternatives if alt.option == "degree"]
    assert [alt.value for alt in offered] == [2] and "degree=2 (the models' own degree" in str(refused.value)
    assert ts.similarity(a, b, "symmetric", degree=2, budget=1e6).degree == 2
    code, out, err = exit_code(capsys, "similarity", folder / "m0.safetensors", folder / "m1.safetensors",
                               "--inner", "symmetric", "--degree", "12", "--budget", "1e6")
    # 479,001,600 pairings: over the pairings' fixed limit, which no budget lifts (exit 2, not 3)
    assert code == 2 and "--degree 2 (the models' own degree" in err, err
    with pytest.raises(ts.CostError) as unlifted:
        ts.similarity(a, b, "symmetric", degree=2, budget=10)
    assert not any(alt.option == "degree" for alt in unlifted.value.alternatives)
