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
