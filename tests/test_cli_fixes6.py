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
