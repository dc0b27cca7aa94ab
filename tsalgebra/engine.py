"""Numeric execution of networks on numpy, numpy-object (exact) or torch arrays.

The engine only moves data: it converts each tensor's data to the caller's
backend, dtype and device, asks the planner for an order, and runs it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .arrays import is_torch, torch_to_numpy
from .expr import Network, Tensor
from .planner import ContractionPlan, plan_equation

__all__ = ["contract", "evaluate", "evaluation_network", "pad_input", "to_backend"]

BATCH = "#batch"  # reserved leg name: '#' never occurs in builder-made names


def to_backend(data: Any, like: Any) -> Any:
    """``data`` as an array of the same kind, dtype and device as ``like``."""
    if is_torch(like):
        import torch

        if is_torch(data):
            return data.to(device=like.device, dtype=like.dtype)
        return torch.as_tensor(np.asarray(data, dtype=np.float64), dtype=like.dtype, device=like.device)
    if is_torch(data):
        data = torch_to_numpy(data)
    if like.dtype == object:
        return np.asarray(data, dtype=object)
    return np.asarray(data, dtype=like.dtype)


def pad_input(x: Any) -> Any:
    """x~ = [1; x] along the last axis, in x's backend."""
    if is_torch(x):
        import torch

        ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
        return torch.cat([ones, x], dim=-1)
    x = np.asarray(x)
    ones = np.ones(x.shape[:-1] + (1,), dtype=x.dtype)
    if x.dtype == object:
        ones = np.full(x.shape[:-1] + (1,), 1, dtype=object)
    return np.concatenate([ones, x], axis=-1)


def contract(
    network: Network,
    data: Mapping[str, Any] | None = None,
    output: Sequence[str] | None = None,
    like: Any = None,
) -> tuple[Any, ContractionPlan]:
    """Contract ``network`` and return (array, plan used).

    ``data`` supplies arrays for tensors by name (required for symbolic
    tensors, optional override otherwise).  All operands are converted to the
    kind of ``like`` (default: the first supplied or stored array).
    """
    data = dict(data or {})
    arrays = []
    for t in network.tensors:
        a = data.get(t.name, t.data)
        if a is None:
            raise ValueError(f"tensor {t.name!r} has no data; pass it in `data`")
        arrays.append(a)
    if like is None:
        like = next((a for a in arrays if is_torch(a)), arrays[0])
        if not is_torch(like):
            like = np.asarray(like)
            if like.dtype != object:
                like = like.astype(np.result_type(like.dtype, np.float64))
    arrays = [to_backend(a, like) for a in arrays]
    equation, _ = network.einsum(output)
    p = plan_equation(equation, [a.shape for a in arrays])
    return p.execute(*arrays), p


def evaluation_network(network: Network, n: int) -> Network:
    """The model network fed n samples: one copy of x~ (shape (n, d+1)) per
    input leg, the batch leg shared by all copies and left open first."""
    copies = tuple(Tensor(f"#x{k}", (BATCH, leg), (n, network.sizes[leg])) for k, leg in enumerate(network.inputs))
    return Network(network.tensors + copies, (), (BATCH,) + network.outputs)


def evaluate(network: Network, x: Any) -> Any:
    """Apply a model network to a batch ``x`` of shape (n, d): contract it with
    one copy of x~ per input leg, the batch leg shared (a hyperedge).

    Returns the padded output, shape (n, *output sizes); channel 0 is the
    constant channel.  Computes in x's dtype (float64 for integer input).
    """
    if is_torch(x):
        if not x.is_floating_point():
            x = x.to(dtype=__import__("torch").float64)
    else:
        x = np.asarray(x)
        if x.dtype != object and not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
    xt = pad_input(x)
    n = int(x.shape[0])
    if not network.inputs:  # a constant network: contract once, then repeat per sample
        const, _ = contract(network, output=network.outputs, like=xt)
        return const[None].repeat(n, 0) if not is_torch(const) else const.unsqueeze(0).expand(n, *const.shape)
    out, _ = contract(evaluation_network(network, n), {f"#x{k}": xt for k in range(network.degree)}, like=xt)
    return out
