"""Matrix fixes, fifth round: a NaN written into a model's weights after
construction is named (model and weight) on every route, a named one
included (it read as models the route does not cover); a tiled matrix
carries its tiles' own notes (a tile that went pair by pair says so), each
once, and a store of an older tsalgebra, whose tiles have no notes, stays
readable."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import tsalgebra as ts

PAIRWISE_NOTE = "no batched route covers these models/arguments: each pair with ts.inner"


def bils(n, seed=0, d=3, h=4, o=2):
    rng = np.random.default_rng(seed)
    return [ts.Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(o, h)),
                        left_bias=rng.normal(size=h)) for _ in range(n)]


# ------------------------------------------------------------ 1. a NaN written after construction


@pytest.mark.parametrize("route", ["auto", "pairwise", "materialize", "pairwise-gram"])
@pytest.mark.parametrize("inner", ["symmetric", "gaussian"])
def test_a_nan_written_into_the_weights_is_named_on_every_route(route, inner):
    models = bils(3)
    models[1].left[0, 0] = np.nan  # the arrays are writable: the constructor's check is past
    with pytest.raises(ValueError, match=r"^model 1: Bilinear: left contains NaN or Inf entries$"):
        ts.similarity_matrix(models, inner=inner, route=route, progress=False)


def test_a_nan_in_a_column_model_is_named_tiled_too(tmp_path):
    a, b = bils(2), bils(3, seed=1)
    b[2].down[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"^column model 2: Bilinear: down contains NaN or Inf entries$"):
        ts.cross_similarity_matrix(a, b, inner="symmetric", route="materialize", progress=False,
                                   store=tmp_path / "s", tile=2)
    assert not (tmp_path / "s" / "tiles").exists() or not any((tmp_path / "s" / "tiles").iterdir())


# ------------------------------------------------------------ 2. the tiles' notes


def test_a_tiled_matrix_carries_its_tiles_notes_once(tmp_path, capsys):
    models = bils(5)
    whole = ts.similarity_matrix(models, inner="symmetric", degree=3, progress=False)
    assert PAIRWISE_NOTE in whole.notes  # degree 3: no batched route, pair by pair
    tiled = ts.similarity_matrix(models, inner="symmetric", degree=3, progress=False, store=tmp_path / "s", tile=2)
    assert tiled.notes.count(PAIRWISE_NOTE) == 1  # six tiles, each said it: once
    assert tiled.notes[0].startswith("6 tiles of 2 models a side")
    np.testing.assert_allclose(tiled.values, whole.values, atol=1e-12)
    again = ts.similarity_matrix(models, inner="symmetric", degree=3, progress=False, store=tmp_path / "s", tile=2)
    assert again.tiles.from_store == 6 and again.notes[1:] == tiled.notes[1:]  # kept by the store
    assert "unusable" not in capsys.readouterr().err


def _older(file):
    """The tile file as a tsalgebra before tile notes wrote it: no notes in its metadata."""
    with np.load(file, allow_pickle=False) as z:
        parts = {k: z[k] for k in z.files}
    meta = json.loads(str(parts["meta"]))
    del meta["notes"]
    parts["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **parts)
    file.write_bytes(buf.getvalue())


def test_a_store_of_tiles_without_notes_is_still_read(tmp_path, capsys):
    models = bils(4)
    first = ts.similarity_matrix(models, inner="symmetric", degree=3, progress=False, store=tmp_path / "s", tile=2)
    files = sorted((tmp_path / "s" / "tiles").glob("*.npz"))
    assert len(files) == 3
    for f in files:
        _older(f)
    again = ts.similarity_matrix(models, inner="symmetric", degree=3, progress=False, store=tmp_path / "s", tile=2)
    assert "unusable" not in capsys.readouterr().err
    assert again.tiles.from_store == 3 and again.tiles.computed == 0
    assert PAIRWISE_NOTE not in again.notes  # the older tiles did not say
    np.testing.assert_array_equal(again.values, first.values)
