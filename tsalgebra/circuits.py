"""Circuits cut out of components.

The standard bilinear-MLP analysis: for an output direction u, one bilinear
layer computes the quadratic form u . f(x) = x~^T Q x~ with the symmetric
interaction matrix Q = sum_h c_h (L~_h R~_h^T + R~_h L~_h^T) / 2, where
c = u^T D~.  On padded inputs Q also holds the biases, the residual and the
constant, so keeping all d+1 eigenvectors reproduces the projection exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .components import Bilinear, Component, Linear, Sequential
from .folding import fold
from .messages import counted

__all__ = ["project", "interaction_matrix", "top_eigen", "EigenCircuit"]


def _direction(model: Component, output: Any) -> np.ndarray:
    if isinstance(output, (bool, np.bool_)):  # True is no output index 1
        raise TypeError(f"output must be an output index or a direction of {model.out_features} numbers, "
                        f"not the bool {output!r}")
    if isinstance(output, (int, np.integer)):
        if not 0 <= output < model.out_features:
            raise ValueError(f"output {output} out of range for {counted(model.out_features, 'output')}")
        u = np.zeros(model.out_features)
        u[output] = 1.0
        return u
    try:
        u = np.asarray(output, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"output must be an output index or a direction of {model.out_features} numbers, "
                        f"got {output!r}") from None
    if u.shape != (model.out_features,):
        raise ValueError(f"output direction has shape {u.shape}, expected ({model.out_features},)")
    if not np.all(np.isfinite(u)):
        raise ValueError(f"output direction {output!r} has entries that are not finite (NaN or inf)")
    return u


def _check_k(k: Any) -> None:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer (the eigenvectors to keep), got {type(k).__name__} {k!r}")


def project(model: Component, output: Any) -> Sequential:
    """The scalar model u . f(x): ``output`` is an output index or a direction u."""
    return Sequential(model, Linear(_direction(model, output)[None, :]))


def interaction_matrix(model: Component, output: Any) -> np.ndarray:
    """Q (d+1, d+1) on padded inputs with u . f(x) = x~^T Q x~, for a model
    that folds into one bilinear layer (Linear layers around it are folded)."""
    blocks, _ = fold(model)
    if len(blocks) != 1:
        raise ValueError(f"an interaction matrix needs exactly one bilinear layer, {model!r} has {len(blocks)}")
    L, R, D = blocks[0]
    c = _direction(model, output) @ D[1:]
    Q = L.T @ (c[:, None] * R)
    return (Q + Q.T) / 2


class EigenCircuit(Bilinear):
    """A bilinear circuit sum_i lambda_i (v_i . x~)^2 keeping the k largest
    |eigenvalues| of a component's interaction matrix; remembers its source
    so that :func:`tsalgebra.verify` can report faithfulness against k."""

    def __init__(self, source: Component, output: Any, k: int) -> None:
        _check_k(k)
        Q = interaction_matrix(source, output)
        if not 1 <= k <= Q.shape[0]:
            raise ValueError(f"k must be in 1..{Q.shape[0]} (padded input width), got {k}")
        lam, V = np.linalg.eigh(Q)
        keep = np.argsort(-np.abs(lam), kind="stable")[:k]
        Vk = V[:, keep].T  # rows: padded eigenvectors
        super().__init__(Vk[:, 1:], Vk[:, 1:], lam[keep][None, :], left_bias=Vk[:, 0], right_bias=Vk[:, 0],
                         name=f"EigenCircuit(k={k})")
        self.source, self.output, self.k = source, output, k
        self.eigenvalues = lam[keep]


def top_eigen(component: Component, output: Any, k: int) -> EigenCircuit:
    """The circuit keeping the k largest eigenvectors (by |eigenvalue|) of
    the component's interaction matrix for ``output`` (index or direction).
    Compare it with ``project(component, output)``; k = d+1 is exact.
    TypeError for a k that is no integer or an ``output`` that is a bool;
    ValueError for one out of range or a direction that is not finite."""
    _check_k(k)
    return EigenCircuit(component, output, k)
