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
under "model", as the papers' code writes it) and
``checkpoints/step_{s:05d}.pt`` with ``model_state_dict``; a config.json
without vocab_size, d_model, n_head and n_layers (a training run's own
settings) is not this layout.  Every setting of config.json is read or
refused (:func:`_settings`): a misspelt or unknown one (``"attn_scaling"``,
``"causal": false``, ``"rope_theta"``) may make another function, and is
named.  The papers' code's own settings are read too: ``rope_base`` (its name
for rotary_base), and ``attn_type``, ``use_rmsnorm_qk``, ``qk_norm_type``,
``norm_places`` (and ``causal``) with the value this layout computes only;
settings known not to change the function (the training context ``n_ctx``,
initialisation, optimisation: :data:`INERT`) are accepted.  A missing setting
takes a default only where the papers' code documents it (rotary_base 10,000;
rotary "rotate_half"; use_bias_qk unsaid: the biases present are used);
attn_scale has none here (the papers' code defaults it to 0.2, tsalgebra read
1.0): a config.json without it is refused.  :func:`attention_lm` builds the
tsalgebra model (embedding, attention layers, unembedding; reading token ids)
at the analysis length ``n_ctx``, on which the weights do not depend.  Every
key of the state dict is used, with the shape the configuration gives it, or
the load is refused naming the key.  An optional key (a bias, the final norm's gain and scale) may be
absent only where its absence is a property of the whole model: a
projection's bias is in every layer or none (the query-key biases all four
together, as ``use_bias_qk`` says when config.json says it); a key missing
from part of the model is refused naming it (docs/user-guide.md, section
4).  A key the model holds once (the final norm's gain or scale,
``unembed.bias``) cannot be told deleted from absent.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .attention import BilinearAttention
from .components import Component, Embedding, Linear, PositionWise, Sequential

__all__ = ["attention_lm", "is_run_directory", "missing_sizes", "read_config"]

ROTARY_BASE = 10_000.0  # the papers' default when config.json does not name one
SIZES = ("vocab_size", "d_model", "n_head", "n_layers")  # the settings naming the papers' layout
MAX_CONFIG_BYTES = 2**20  # a model's settings are a few lines; a larger config.json is not read
_LAYER_KEY = re.compile(r"layers\.(0|[1-9][0-9]*)\.(q1|k1|q2|k2|v|o)\.(weight|bias)")  # no "layers.01": read as 1
# the settings the layout reads (rope_base: the papers' code's name for rotary_base); any other key of
# config.json is refused unless FIXED or INERT lists it: a setting not read may make another function
SETTINGS = SIZES + ("attn_scale", "rotary_base", "rope_base", "rotary", "use_bias_qk")
# the papers' code's settings whose other values are other functions: accepted with the value computed here
FIXED: dict[str, tuple[Any, str]] = {
    "attn_type": ("bilinear", "scores (q1.k1)(q2.k2); 'quadratic' and 'softmax' attention are other layouts"),
    "causal": (True, "a causal mask"),
    "use_rmsnorm_qk": (False, "an RMSNorm of queries and keys is not a polynomial"),
    "qk_norm_type": ("none", "a norm of queries and keys is not a polynomial"),
    "norm_places": ([], "a norm dividing by its input's size is not a polynomial"),
}
# settings that do not change the function of the trained weights: the training context (the analysis
# length is n_ctx), initialisation (alpha_init: of the query-key norm, fixed to none above), the norm kind
# and options put at norm_places (fixed to [] above), optimisation and bookkeeping
INERT = frozenset({
    "n_ctx", "std_embed", "std_qkv", "std_o", "init_type", "init_gain", "alpha_init", "norm_type", "norm_kwargs",
    "dropout", "lr", "learning_rate", "weight_decay", "batch", "batch_size", "steps", "n_steps", "max_steps",
    "epochs", "warmup", "warmup_steps", "seq_len", "seed", "optimizer", "betas", "grad_clip", "dtype", "name",
})


def _raw_config(run: Path) -> Any:
    """config.json's model settings (its top level or "model"), unchecked;
    OSError or ValueError when it cannot be read as JSON."""
    path = run / "config.json"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"over {MAX_CONFIG_BYTES:,} bytes, not a model's settings")
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        return None
    if not isinstance(raw.get("model"), dict):  # the settings at the top level ("model" there: a name)
        return {k: v for k, v in raw.items() if not (k == "model" and isinstance(v, str))}
    # the settings under "model", beside sections of other things ("train"): a setting of the layout
    # (or a near miss of one) among those sections would be dropped, the run read as another function
    names = list(SETTINGS) + list(FIXED) + sorted(INERT)
    for key in raw:
        near = difflib.get_close_matches(key, names, n=1, cutoff=0.8)
        if key != "model" and near:
            said = f"the setting {key!r}" if near[0] == key else f"{key!r} (the setting {near[0]!r}?)"
            raise ValueError(f"{said} stands beside \"model\", which holds the model's settings: put it "
                             "inside \"model\", where it is read or refused")
    return raw["model"]


def _json(value: Any) -> str:
    """A setting as config.json spells it (false, not False)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _settings(config: Mapping[str, Any], rotary: str = "rotate_half") -> dict[str, Any]:
    """The settings the layout reads, checked (ValueError naming the setting):
    every key is a setting read (:data:`SETTINGS`), one of the papers' code
    at the value this layout computes (:data:`FIXED`) or one known not to
    change the function (:data:`INERT`); sizes are positive integers
    (n_layers may be 0), scales finite numbers.  attn_scale is required;
    rotary_base (or rope_base) defaults to 10,000 and rotary to
    "rotate_half", the papers' code's defaults."""
    unknown = sorted(str(k) for k in config if k not in SETTINGS and k not in FIXED and k not in INERT)
    if unknown:  # a misspelt "attn_scaling", a "rope_theta": dropped without a word, another function was read
        raise ValueError(f"settings the language-model layout does not read: {unknown[:6]}"
                         f"{'...' if len(unknown) > 6 else ''}; it reads {list(SETTINGS)}, and "
                         f"{sorted(FIXED)} with the value it computes, and accepts only settings known not to "
                         f"change the function (such as n_ctx, std_embed, lr, seed)")
    for key, (want, why) in FIXED.items():
        if key in config and not (config[key] == want and type(config[key]) is type(want)):
            raise ValueError(f"{key}={_json(config[key])}: this layout computes {key}={_json(want)} only ({why})")

    def number(key: str, default: float | None) -> float:
        v = config.get(key, default)
        try:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        except OverflowError:  # an integer beyond float64
            ok = False
        if not ok:
            raise ValueError(f"{key} must be a finite number, got {v!r}")
        return float(v)

    out: dict[str, Any] = {}
    for key in SIZES:
        v = config[key]
        integral = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
        if not integral or v < (0 if key == "n_layers" else 1):
            raise ValueError(f"{key} must be a {'non-negative' if key == 'n_layers' else 'positive'} integer, "
                             f"got {v!r}")
        out[key] = int(v)
    if out["d_model"] % out["n_head"]:
        raise ValueError(f"d_model {out['d_model']} is not divisible by n_head {out['n_head']}")
    if "attn_scale" not in config:  # no default is safe: the papers' code reads 0.2, tsalgebra read 1.0
        raise ValueError("attn_scale is not given (out = x + attn_scale * o(z)); it has no default here (the "
                         "papers' code defaults it to 0.2): add the run's value")
    out["attn_scale"] = number("attn_scale", None)
    bases = [k for k in ("rotary_base", "rope_base") if k in config]
    if len(bases) == 2 and number("rotary_base", None) != number("rope_base", None):
        raise ValueError(f"rotary_base {config['rotary_base']!r} and rope_base {config['rope_base']!r} (its name "
                         "in the papers' code) differ")
    base = bases[0] if bases else "rotary_base"
    out["rotary_base"] = number(base, ROTARY_BASE)
    if out["rotary_base"] <= 0:
        raise ValueError(f"{base} must be positive, got {config[base]!r}")
    out["rotary"] = config.get("rotary", rotary)
    if out["rotary"] not in ("rotate_half", "interleaved"):
        raise ValueError(f"rotary must be 'rotate_half' or 'interleaved', got {out['rotary']!r}")
    out["use_bias_qk"] = config.get("use_bias_qk")  # None: not said, the biases present are used
    if out["use_bias_qk"] not in (None, True, False):
        raise ValueError(f"use_bias_qk must be true or false, got {out['use_bias_qk']!r}")
    return out


def read_config(run: Path) -> dict[str, Any]:
    """The model's settings from ``run/config.json`` (top level or under
    "model"), checked; a LoadError naming the file otherwise."""
    from .io import LoadError

    path = run / "config.json"
    try:
        cfg = _raw_config(run)
    except (OSError, ValueError) as exc:
        raise LoadError(path, f"cannot read the run's configuration: {exc}") from None
    if not isinstance(cfg, dict):
        raise LoadError(path, "expected a JSON object (the model's settings)")
    missing = [k for k in SIZES if k not in cfg]
    if missing:
        raise LoadError(path, f"missing {missing}")
    try:
        _settings(cfg)  # checked here to name config.json; attention_lm reads the values
    except ValueError as exc:
        raise LoadError(path, str(exc)) from None
    return cfg


def is_run_directory(path: Path) -> bool:
    """A training run in the papers' layout: checkpoints/ beside a config.json
    naming vocab_size, d_model, n_head and n_layers.  Any other config.json
    (a learning rate, a step count) leaves the checkpoints to the native layout."""
    if not (path.is_dir() and (path / "config.json").is_file() and (path / "checkpoints").is_dir()):
        return False
    try:
        cfg = _raw_config(path)
    except (OSError, ValueError):  # not JSON: a run's config all the same if it names a size (read_config says why)
        try:
            text = (path / "config.json").read_text(errors="replace")[:MAX_CONFIG_BYTES]
        except OSError:
            return False
        return any(f'"{k}"' in text for k in SIZES)
    return isinstance(cfg, dict) and all(k in cfg for k in SIZES)


def missing_sizes(path: Path) -> list[str]:
    """The sizes ``path/config.json`` leaves out when it names some of them but
    not all (a misspelt "n_heads"); [] when it names all, none, or is absent
    or not JSON (read_config says why)."""
    try:
        cfg = _raw_config(path)
    except (OSError, ValueError):
        return []
    if not isinstance(cfg, dict) or not any(k in cfg for k in SIZES):
        return []
    return [k for k in SIZES if k not in cfg]


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
    "rotary".  Every key is used, each with the shape the config gives it;
    any failure is a LoadError naming ``source`` (and the key)."""
    from .io import LoadError, _values

    if any(".norm_qk" in k or k.startswith("norm_qk") for k in sd):
        raise LoadError(source, "norm_qk (an RMSNorm of queries and keys) divides by a data-dependent norm: not "
                                "a polynomial, so this model has no tensor form")
    try:
        cfg = _settings(config, rotary)
    except ValueError as exc:
        raise LoadError(source, f"the model's configuration: {exc}") from None
    V, d, H, L = (cfg[k] for k in SIZES)
    dh = d // H
    projections = ("q1", "k1", "q2", "k2", "v", "o")
    shapes = {"embed.weight": (V, d), "unembed.weight": (V, d), "unembed.bias": (V,), "final_norm.weight": (d,),
              "final_norm.scale": ()}  # the scale: one number, () or (1,)

    def expected(key: str) -> tuple[int, ...] | None:
        """The shape the configuration gives ``key``; None for a key the layout does not use."""
        if key in shapes:
            return shapes[key]
        m = _LAYER_KEY.fullmatch(key)
        return None if m is None or int(m[1]) >= L else (d, d) if m[3] == "weight" else (d,)

    # the configuration against the checkpoint's keys and shapes first, in the checkpoint's size: nothing is
    # built per layer or per entry before (config.json's n_layers may say 10**9 of a one-layer checkpoint)
    held = sorted({int(m[1]) for k in sd if (m := _LAYER_KEY.fullmatch(k))})
    unused = sorted(k for k in sd if expected(k) is None)
    if unused:  # never a model built from part of the checkpoint
        more = f", but the checkpoint holds {len(held)} layers" if held and held[-1] >= L else ""
        raise LoadError(source, f"keys the language-model layout does not use (n_layers={L} in the configuration"
                                f"{more}): {unused[:6]}{'...' if len(unused) > 6 else ''}")
    if len(held) != L:  # every index held is below L: a layer of the configuration has no key
        gap = next(i for i, j in enumerate(held + [L]) if i != j)  # the first index without a key
        said = ", ".join(f"layers.{i}" for i in held[:4]) + (", ..." if len(held) > 4 else "")
        raise LoadError(source, f"the configuration says n_layers={L}, but the checkpoint holds {len(held)} "
                                f"layer{'' if len(held) == 1 else 's'}{f' ({said})' if held else ''}: no key of "
                                f"layers.{gap}")
    for key, v in sd.items():
        shape = tuple(int(n) for n in np.shape(v))  # declared: nothing converted yet
        if shape != expected(key) and not (key == "final_norm.scale" and shape == (1,)):
            raise LoadError(source, f"{key} has shape {shape}, the configuration (vocab_size={V}, d_model={d}) "
                                    f"gives {expected(key)}")
    if cfg["use_bias_qk"] is not None:  # the query-key biases are there exactly when the configuration says so
        qk = [f"layers.{i}.{name}.bias" for i in range(L) for name in projections[:4]]
        wrong = [k for k in qk if (k in sd) != cfg["use_bias_qk"]]
        if wrong:
            raise LoadError(source, f"{wrong[0]} is {'missing' if cfg['use_bias_qk'] else 'present'}, but the "
                                    f"configuration says use_bias_qk={str(cfg['use_bias_qk']).lower()}")
    # an optional key may be absent only where its absence is a property of the whole model (a key deleted
    # from a checkpoint would load as another function): a projection's bias is in every layer or none (the
    # query-key biases all four together, as use_bias_qk says); the final norm's gain and scale are each
    # one key, with or without the other (a norm without a gain is one of the layout's variants)
    groups = [[f"layers.{i}.{name}.bias" for i in range(L) for name in projections[:4]]]
    groups += [[f"layers.{i}.{name}.bias" for i in range(L)] for name in projections[4:]]
    for group in groups:
        present = [k for k in group if k in sd]
        if present and len(present) < len(group):
            missing = next(k for k in group if k not in sd)
            raise LoadError(source, f"{missing} is missing, but the state dict has {present[0]}: the layout's "
                                    "optional keys are absent throughout the model or present throughout")

    def weight(key: str, required: bool = True) -> np.ndarray | None:
        if key not in sd:
            if not required:
                return None
            raise LoadError(source, f"the language-model layout needs {key!r}; the state dict has "
                                    f"{sorted(sd)[:6]}{'...' if len(sd) > 6 else ''}")
        # as stored, checked (its shape above): the constructors make the float64 copies kept, and only
        # what is computed on (o by attn_scale, unembed by the final norm) is converted here, once
        return _values(sd[key], key, source)

    try:  # the constructors' own checks, named by the file too
        layers: list[Component] = [PositionWise(Embedding(weight("embed.weight").T, name="embed"), n_ctx)]
        # after embed.weight (required) has the configuration's d_model: never an allocation of its size alone
        order = _rotate_half_to_pairs(dh) if cfg["rotary"] == "rotate_half" else np.arange(dh)
        for i in range(L):
            w: dict[str, Any] = {}
            for name in projections[:-1]:
                W = weight(f"layers.{i}.{name}.weight").reshape(H, dh, d)
                b = weight(f"layers.{i}.{name}.bias", required=False)
                b = None if b is None else b.reshape(H, dh)
                if name != "v":  # queries and keys into tsalgebra's rotary pairing (a permutation: exact as stored)
                    W, b = W[:, order], None if b is None else b[:, order]
                w[name], w[f"{name}_bias"] = W, b
            O = weight(f"layers.{i}.o.weight")  # (d, d): columns are (head, d_head)
            w["o"] = np.multiply(cfg["attn_scale"], O.reshape(d, H, dh).transpose(1, 0, 2), dtype=np.float64)
            ob = weight(f"layers.{i}.o.bias", required=False)
            w["o_bias"] = None if ob is None else np.multiply(cfg["attn_scale"], ob, dtype=np.float64)
            layers.append(BilinearAttention(**w, causal=True, rotary_base=cfg["rotary_base"], scale=1.0 / dh**2,
                                            residual=True, n_ctx=n_ctx, name=f"layers.{i}"))
        unembed = weight("unembed.weight")  # (vocab, d)
        # final_norm at eval time: a gain, exactly a diagonal map before the unembedding
        gain = weight("final_norm.weight", required=False)
        scale = weight("final_norm.scale", required=False)
        if scale is not None and not np.all(scale != 0):
            raise LoadError(source, "final_norm.scale is zero: the final norm divides by it")
        if gain is not None or scale is not None:
            with np.errstate(over="ignore"):  # an overflow is named below, not warned about
                unembed = np.multiply(unembed, 1.0 if gain is None else gain, dtype=np.float64)  # one copy, in place
                if scale is not None:
                    np.divide(unembed, scale, out=unembed, dtype=np.float64)
            if not np.isfinite(unembed).all():
                raise LoadError(source, "unembed.weight * final_norm.weight / final_norm.scale (the final norm "
                                        "folded into the unembedding) overflows float64")
        layers.append(PositionWise(Linear(unembed, weight("unembed.bias", required=False), name="unembed"), n_ctx))
        return Sequential(*layers)
    except LoadError:
        raise
    except (ValueError, TypeError) as exc:
        raise LoadError(source, str(exc)) from None
