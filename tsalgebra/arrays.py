"""Which array library a value comes from, and torch tensors as numpy arrays.

Torch is optional at import time: a value is recognized as a torch object by
the top-level package of its type, so nothing here imports torch unless a
torch tensor is actually handed over.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["is_torch", "torch_to_numpy"]


def is_torch(x: Any) -> bool:
    """True when ``x`` is a torch object (a tensor, a dtype, a device, ...),
    judged by its type's package so that torch need not be imported."""
    return type(x).__module__.split(".")[0] == "torch"


def torch_to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as a new numpy array on the CPU, detached from autograd:
    floating dtypes as float64 (numpy has no bfloat16), other dtypes as they are."""
    t = t.detach().to("cpu")
    if t.is_floating_point():
        import torch

        t = t.to(torch.float64)
    return t.numpy().copy()
