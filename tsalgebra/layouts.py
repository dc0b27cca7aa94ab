"""Checkpoint layouts of the field's models, read from their state dicts alone.

The bilinear-attention language models of the tensor-similarity papers are
written as (read from their public code, rebuilt as twins in
tests/test_layouts.py):

- ``embed``: ``nn.Embedding(vocab, d_model)``;
- ``layers.{i}``: ``q1, k1, q2, k2, v, o``, each ``nn.Linear(d_model,
  d_model)`` (query-key biases when ``use_bias_qk``), heads by reshaping the
  d_model outputs into (n_head, d_head); scores (q1 . k1)(q2 . k2) / d_head^2
  under a causal mask with rotary embeddings on q and k (the rotate-half
  convention: dimension k pairs with k + d_head / 2); ``out = x + attn_scale *
  o(z)``; an optional ``norm_qk`` (RMSNorm on queries and keys) is not a
  polynomial and is refused;
- ``final_norm``: its eval-time gain ``weight`` (and an optional
  input-independent ``scale`` buffer dividing it) is absorbed into
  ``unembed``: ``nn.Linear(d_model, vocab, bias=False)``.

A run directory holds ``config.json`` (vocab_size, d_model, n_head, n_layers,
attn_scale, use_bias_qk, optionally rotary_base and rotary: "rotate_half" or
"interleaved", for runs that rotate consecutive pairs; at its top level or
under "model") and ``checkpoints/step_{s:05d}.pt`` with ``model_state_dict``.
:func:`attention_lm` builds the tsalgebra model (embedding, attention layers,
unembedding; reading token ids) at the analysis length ``n_ctx``, on which
the weights do not depend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .arrays import is_torch, torch_to_numpy
from .attention import BilinearAttention
from .components import Component, Embedding, Linear, PositionWise, Sequential

__all__ = ["attention_lm", "is_run_directory", "read_config"]

ROTARY_BASE = 10_000.0  # the papers' default when config.json does not name one


def _array(sd: Mapping[str, Any], key: str, source: Any) -> np.ndarray:
    from .io import LoadError

    if key not in sd:
        raise LoadError(source, f"the language-model layout needs {key!r}; the state dict has "
                                f"{sorted(sd)[:6]}{'...' if len(sd) > 6 else ''}")
    v = sd[key]
    return torch_to_numpy(v) if is_torch(v) else np.asarray(v, dtype=np.float64)


def read_config(run: Path) -> dict[str, Any]:
    """The model's settings from ``run/config.json`` (top level or under "model")."""
    from .io import LoadError

    try:
        raw = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(run / "config.json", f"cannot read the run's configuration: {exc}") from None
    cfg = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(cfg, dict):
        raise LoadError(run / "config.json", "expected a JSON object (the model's settings)")
    missing = [k for k in ("vocab_size", "d_model", "n_head", "n_layers") if k not in cfg]
    if missing:
        raise LoadError(run / "config.json", f"missing {missing}")
    return cfg


def is_run_directory(path: Path) -> bool:
    """A training run in the papers' layout: config.json beside checkpoints/."""
    return path.is_dir() and (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def _rotate_half_to_pairs(d_head: int) -> np.ndarray:
    """The permutation of a head's dimensions taking rotate-half pairs (k,
    k + d_head/2) to the consecutive pairs (2k, 2k + 1) tsalgebra rotates;
    applied to queries and keys alike it leaves every score unchanged."""
    half = d_head // 2
    order = np.empty(d_head, dtype=int)
    order[0 : 2 * half : 2], order[1 : 2 * half : 2] = np.arange(half), half + np.arange(half)
    if d_head % 2:
        order[-1] = d_head - 1
    return order


def attention_lm(sd: Mapping[str, Any], config: Mapping[str, Any], n_ctx: int, source: Any = "<state dict>",
                 rotary: str = "rotate_half") -> Component:
    """The tsalgebra model of a bilinear-attention language model's state dict
    (see the module docstring); ``rotary``: "rotate_half" (the papers') or
    "interleaved" (pairs (2k, 2k + 1)), unless the config names one under
    "rotary"."""
    from .io import LoadError

    if any(".norm_qk" in k or k.startswith("norm_qk") for k in sd):
        raise LoadError(source, "norm_qk (an RMSNorm of queries and keys) divides by a data-dependent norm: not "
                                "a polynomial, so this model has no tensor form")
    rotary = config.get("rotary", rotary)
    if rotary not in ("rotate_half", "interleaved"):
        raise LoadError(source, f"rotary must be 'rotate_half' or 'interleaved', got {rotary!r}")
    V, d, H, L = (int(config[k]) for k in ("vocab_size", "d_model", "n_head", "n_layers"))
    if d % H:
        raise LoadError(source, f"d_model {d} is not divisible by n_head {H}")
    dh = d // H
    attn_scale = float(config.get("attn_scale", 1.0))
    base = float(config.get("rotary_base", ROTARY_BASE))
    order = _rotate_half_to_pairs(dh) if rotary == "rotate_half" else np.arange(dh)
    embed = _array(sd, "embed.weight", source)  # (vocab, d)
    if embed.shape != (V, d):
        raise LoadError(source, f"embed.weight has shape {embed.shape}, config.json says ({V}, {d})")
    layers: list[Component] = [PositionWise(Embedding(embed.T, name="embed"), n_ctx)]
    for i in range(L):
        w: dict[str, Any] = {}
        for name in ("q1", "k1", "q2", "k2", "v"):
            W = _array(sd, f"layers.{i}.{name}.weight", source).reshape(H, dh, d)
            b = sd.get(f"layers.{i}.{name}.bias")
            b = None if b is None else _array(sd, f"layers.{i}.{name}.bias", source).reshape(H, dh)
            if name != "v":  # queries and keys into tsalgebra's rotary pairing
                W, b = W[:, order], None if b is None else b[:, order]
            w[name], w[f"{name}_bias"] = W, b
        O = _array(sd, f"layers.{i}.o.weight", source)  # (d, d): columns are (head, d_head)
        w["o"] = attn_scale * O.reshape(d, H, dh).transpose(1, 0, 2)
        ob = sd.get(f"layers.{i}.o.bias")
        w["o_bias"] = None if ob is None else attn_scale * _array(sd, f"layers.{i}.o.bias", source)
        layers.append(BilinearAttention(**w, causal=True, rotary_base=base, scale=1.0 / dh**2, residual=True,
                                        n_ctx=n_ctx, name=f"layers.{i}"))
    unembed = _array(sd, "unembed.weight", source)  # (vocab, d)
    if "final_norm.weight" in sd:  # an eval-time gain: exactly a diagonal map before the unembedding
        gain = _array(sd, "final_norm.weight", source)
        if "final_norm.scale" in sd:
            gain = gain / _array(sd, "final_norm.scale", source)
        unembed = unembed * gain[None, :]
    bias = sd.get("unembed.bias")
    layers.append(PositionWise(Linear(unembed, None if bias is None else _array(sd, "unembed.bias", source),
                                      name="unembed"), n_ctx))
    return Sequential(*layers)
