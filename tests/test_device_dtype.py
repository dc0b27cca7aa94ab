"""device= and dtype= of the matrix routes: devices without values or absent here are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

import tsalgebra as ts


def _models(n: int = 3) -> list[ts.Bilinear]:
    rng = np.random.default_rng(0)
    return [ts.Bilinear(rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=(3, 6))) for _ in range(n)]


@pytest.mark.parametrize("device", ["meta", "xpu", "vulkan"])
def test_devices_without_values_or_absent_are_refused_by_name(device: str) -> None:
    """The meta device raised torch's NotImplementedError ("Cannot copy out
    of meta tensor") from inside a route; a device type torch knows but this
    machine lacks failed wherever torch first touched it."""
    with pytest.raises(ValueError, match=f"device='{device}'"):
        ts.similarity_matrix(_models(), device=device)


@pytest.mark.parametrize("tiled", [False, True])
def test_float32_products_are_not_labelled_exact(tmp_path, tiled: bool) -> None:
    """A float32 matrix (about 7 digits) said "exact" beside its values, as
    the float64 one does; it now says how it was computed, and float64 stays
    exact."""
    models = _models(4)
    kw = {"store": tmp_path, "tile": 2, "progress": False} if tiled else {}
    m32 = ts.similarity_matrix(models, dtype="float32", **kw)
    m64 = ts.similarity_matrix(models, **({"store": tmp_path / "64", "tile": 2, "progress": False} if tiled else {}))
    assert m64.exact and not m32.exact
    assert any("float32" in n and "not an exact value" in n for n in m32.notes), m32.notes
    assert not any("float32" in n for n in m64.notes)
    np.testing.assert_allclose(m32.values, m64.values, atol=1e-5)
    assert np.abs(m32.values - m64.values).max() > 1e-12  # float32 digits: the label was wrong, not the numbers
