"""Layer-by-layer inner products on padded factor matrices.

Both routines first fold each model into a chain of bilinear blocks
(L~, R~, D~) on padded widths: a Linear layer before a bilinear one is folded
into its L~ and R~, one after it into its D~, so only bilinear layers count as
depth.  A model without bilinear layers is a single padded matrix W~.

- :func:`network_gram`: the network inner product, propagating the cross
  Gram matrix G between the two chains (exact for its own definition,
  O(depth h^2 d)).
- :func:`closure_moments`: Gaussian moment propagation (the reference's
  multi-layer method): the joint mean and second moment of the two chains'
  features, with fourth moments taken as if every hidden layer were Gaussian.
  Exact through the first bilinear layer, approximate after it.
"""

from __future__ import annotations

import numpy as np

from .components import Bilinear, Component, Linear

__all__ = ["fold", "network_gram", "closure_moments", "closure_steps", "gaussian_state"]

Block = tuple[np.ndarray, np.ndarray, np.ndarray]


def fold(model: Component) -> tuple[list[Block], np.ndarray | None]:
    """(bilinear blocks, trailing-free linear map).  With at least one bilinear
    layer the second item is None; otherwise it is the product of the padded
    linear maps."""
    blocks: list[Block] = []
    pending: np.ndarray | None = None  # product of linear maps not yet folded
    for layer in model.layers:
        if isinstance(layer, Linear):
            W = layer.padded().astype(float)
            if blocks and pending is None:
                L, R, D = blocks[-1]
                blocks[-1] = (L, R, W @ D)
            else:
                pending = W if pending is None else W @ pending
        elif isinstance(layer, Bilinear):
            L, R, D = (m.astype(float) for m in layer.padded())
            if pending is not None:
                L, R = L @ pending, R @ pending
                pending = None
            blocks.append((L, R, D))
        else:
            raise TypeError(f"layer-wise inner products need Linear/Bilinear layers, not {layer!r}")
    return blocks, (pending if not blocks else None)


def _chain_flops(*mats: np.ndarray) -> int:
    """Flops of multiplying the matrices left to right."""
    rows, total = mats[0].shape[0], 0
    for m in mats[1:]:
        total += 2 * rows * m.shape[0] * m.shape[1]
    return total


def network_gram(a: Component, b: Component) -> tuple[np.ndarray, int]:
    """The final cross Gram matrix (out+1, out+1) of the network inner
    product, and the flops spent.

    G_0 = I; G_{l+1} = Da [1/2 ((La G Lb^T) * (Ra G Rb^T) + (La G Rb^T) * (Ra G Lb^T))] Db^T.
    """
    ba, wa = fold(a)
    bb, wb = fold(b)
    if len(ba) != len(bb):
        raise ValueError(
            f"the network inner product needs the same layer structure: {a!r} has {len(ba)} bilinear "
            f"layers and {b!r} has {len(bb)} (Linear layers fold into their neighbours)"
        )
    if not ba:
        return wa @ wb.T, _chain_flops(wa, wb.T)
    G = np.eye(a.in_features + 1)
    flops = 0
    for (La, Ra, Da), (Lb, Rb, Db) in zip(ba, bb):
        core = 0.5 * ((La @ G @ Lb.T) * (Ra @ G @ Rb.T) + (La @ G @ Rb.T) * (Ra @ G @ Lb.T))
        flops += 4 * _chain_flops(La, G, Lb.T) + 3 * core.size + _chain_flops(Da, core, Db.T)
        G = Da @ core @ Db.T
    return G, flops


def _linear_block(W: np.ndarray) -> Block:
    """A padded linear map W~ as a bilinear block computing (W~ z) * 1."""
    R = np.zeros(W.shape)
    R[:, 0] = 1.0
    return W, R, np.eye(W.shape[0])


def _block_diag(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0] + y.shape[0], x.shape[1] + y.shape[1]))
    out[: x.shape[0], : x.shape[1]] = x
    out[x.shape[0] :, x.shape[1] :] = y
    return out


def gaussian_state(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The joint (mean, second moment) of [x~; x~] for x ~ N(mean, cov): both
    models start from the same input."""
    mu0 = np.concatenate([[1.0], mean])
    C0 = np.zeros((len(mu0), len(mu0)))
    C0[1:, 1:] = cov
    M0 = C0 + np.outer(mu0, mu0)
    return np.concatenate([mu0, mu0]), np.block([[M0, M0], [M0, M0]])


def closure_moments(a: Component, b: Component, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Joint (mean, second moment) of [f~(x); g~(x)] under Gaussian closure,
    the number of closure steps (bilinear layers beyond the first count as
    approximations) and the flops spent.  ``mean`` (d,), ``cov`` (d, d)."""
    ba, wa = fold(a)
    bb, wb = fold(b)
    mu, M = gaussian_state(mean, cov)
    return closure_steps(ba or [_linear_block(wa)], bb or [_linear_block(wb)], mu, M)


def closure_steps(ba: list[Block], bb: list[Block], mu: np.ndarray, M: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Propagate a joint state (mean ``mu``, second moment ``M`` of the padded
    [u_a; u_b]) through two chains of bilinear blocks, taking each layer's
    fourth moments as if its input were Gaussian.  Returns (mu, M, steps, flops)."""
    steps = max(len(ba), len(bb))
    flops = 0
    for t in range(steps):
        # the shallower model waits at its output (an identity block)
        blk_a = ba[t] if t < len(ba) else _linear_block(np.eye(ba[-1][2].shape[0]))
        blk_b = bb[t] if t < len(bb) else _linear_block(np.eye(bb[-1][2].shape[0]))
        L, R, D = (_block_diag(x, y) for x, y in zip(blk_a, blk_b))
        LMR, LML, RMR = L @ M @ R.T, L @ M @ L.T, R @ M @ R.T
        lm, rm = L @ mu, R @ mu
        pair = np.diag(LMR)
        mean_prod = lm * rm
        Q = np.outer(pair, pair) + LML * RMR + LMR * LMR.T - 2 * np.outer(mean_prod, mean_prod)
        flops += 3 * _chain_flops(L, M, R.T) + 2 * _chain_flops(L, mu[:, None]) + _chain_flops(D, Q, D.T) + 8 * Q.size
        mu, M = D @ pair, D @ Q @ D.T
    return mu, M, steps, flops
