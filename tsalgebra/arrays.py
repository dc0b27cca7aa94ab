"""Which array library a value comes from, and torch tensors as numpy arrays.

Torch is optional at import time: a value is recognized as a torch object by
the top-level package of its type, so nothing here imports torch unless a
torch tensor is actually handed over.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["checked_device", "is_torch", "torch_to_numpy"]


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


def checked_device(device: Any, argument: str = "device") -> Any:
    """A torch device that exists here, or ValueError naming ``argument``:
    an unknown spelling, CUDA (or MPS) where torch has none, an index past
    the devices present."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{argument}={device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument}={device!r}: CUDA is not available here (torch.cuda.is_available() is "
                             "False); use None (numpy) or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{argument}={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{argument}={device!r}: MPS is not available here")
    return dev
