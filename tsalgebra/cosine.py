"""The one cosine finaliser: <a, b> / sqrt(<a, a> <b, b>) from inner products.

Pairs (:func:`tsalgebra.similarity`, one value or one per output channel) and
matrices (:func:`tsalgebra.similarity_matrix`, broadcast over rows and
columns) finish the same way: an undefined cosine (a zero norm) is refused or,
for a dead output channel, NaN (which the caller says); round-off beyond [-1, 1]
within ``tol`` is clipped; more means the inner product is not positive
definite on these models, which is a bug, and raises.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cosines"]


def cosines(cross: Any, self_a: Any, self_b: Any, inner: str, *, tol: float = 1e-9, dead_channels: bool = False,
            sides: tuple[str, str] = ("model a", "model b")) -> np.ndarray:
    """``cross / sqrt(self_a) / sqrt(self_b)`` elementwise (numpy broadcasting:
    pass ``self_a[:, None], self_b[None, :]`` for a matrix), clipped to [-1, 1].

    A self product that is not positive raises ValueError naming the side (and
    the index, for several models) unless ``dead_channels`` (per-output
    values: such channels give NaN, said by the caller with its note)."""
    x, y, z = (np.asarray(v, dtype=float) for v in (cross, self_a, self_b))
    if not dead_channels:
        for s, side in ((y, sides[0]), (z, sides[1])):
            bad = np.flatnonzero(~(s > 0))
            if bad.size:
                which = side if s.size == 1 else f"{side} {int(bad[0])}"
                raise ValueError(f"{which} has zero norm under the {inner} inner product; the similarity is undefined")
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = x / np.sqrt(y) / np.sqrt(z)  # sqrt(y * z) can overflow where each factor does not
    # a dead channel is NaN whatever the cross product's round-off (x / 0 was +-inf, clipped to +-1)
    cos = np.where((y > 0) & (z > 0), cos, np.nan)
    excess = float(np.nanmax(np.abs(cos))) - 1.0 if np.isfinite(cos).any() else 0.0
    if excess > tol:
        raise ArithmeticError(f"|cosine| exceeds 1 by {excess:.3g}: the inner product is not positive definite here")
    return np.clip(cos, -1.0, 1.0)
