"""Which array library a value comes from, and torch tensors as numpy arrays.

Torch is optional at import time: a value is recognized as a torch object by
the top-level package of its type, so nothing here imports torch unless a
torch tensor is actually handed over.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["checked_device", "exact_float64", "generator", "is_torch", "no_real_values", "real_float64",
           "torch_to_numpy"]


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


def no_real_values(v: Any) -> str | None:
    """Why the tensor ``v`` (numpy or torch) has no real values, judged from
    its device and dtype alone (nothing is read): a torch tensor without data
    (device meta), a complex dtype (a cast keeps the real part only: a
    silently wrong number); None otherwise."""
    if is_torch(v) and getattr(v, "is_meta", False):
        return "a torch tensor without readable values (device meta); materialize it before saving"
    if v.is_complex() if is_torch(v) else np.iscomplexobj(v):
        return f"dtype {v.dtype} is complex, and weights are real numbers (the imaginary part would be lost)"
    return None


def real_float64(v: Any) -> np.ndarray:
    """A weight (numpy or torch) as a float64 numpy array, or TypeError saying
    why it has no real values (:func:`no_real_values`, a layout numpy cannot
    read, a non-numeric dtype)."""
    if (why := no_real_values(v)) is not None:
        raise TypeError(why)
    if is_torch(v):
        try:
            v = torch_to_numpy(v)
        except (RuntimeError, TypeError) as exc:  # sparse, quantized: torch names the layout or dtype
            raise TypeError(f"a torch tensor numpy cannot read ({exc})") from None
    arr = np.asarray(v)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"dtype {arr.dtype}: weights are real numbers")
    return exact_float64(arr, copy=False)


def exact_float64(arr: np.ndarray, copy: bool = True) -> np.ndarray:
    """A real numpy array as float64, or TypeError for an integer that float64
    does not hold (beyond 2**53 not every one is: it would be rounded)."""
    out = arr.astype(np.float64, copy=copy)
    if np.issubdtype(arr.dtype, np.integer) and arr.size:
        big = (arr > 2**53) | (arr < -(2**53))
        rounded = next((int(v) for v, f in zip(arr[big].tolist(), out[big].tolist()) if int(f) != v), None)
        if rounded is not None:
            raise TypeError(f"integer weight {rounded} (dtype {arr.dtype}) is not a float64: it would be rounded "
                            f"to {float(rounded):.17g} (pass an object array to keep it exact)")
    return out


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
    if dev.type == "meta":
        raise ValueError(f"{argument}={device!r}: the meta device holds shapes, not values; use None (numpy), 'cpu' "
                         "or a GPU")
    if dev.type not in ("cpu", "cuda", "mps"):  # xpu, hip, ...: torch's own module says whether one is here
        backend = getattr(torch, dev.type, None)
        if not callable(getattr(backend, "is_available", None)) or not backend.is_available():  # type: ignore[union-attr]
            raise ValueError(f"{argument}={device!r}: no {dev.type} device is available here; use None (numpy) or "
                             "'cpu'")
    return dev


def generator(rng: Any, default: int | None = None) -> np.random.Generator:
    """``rng=`` as a numpy Generator: one given, a non-negative integer seed,
    or None (``default``: a fixed seed; None draws one); anything else a
    TypeError naming rng= (numpy's SeedSequence said "entropy" of a string)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(default)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)) and rng >= 0:
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator, a non-negative integer seed or None, got {rng!r}")
