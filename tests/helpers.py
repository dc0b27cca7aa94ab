"""Bridges between tsalgebra models and the plain specs of `oracles`, and a
strict JSON reader for the tests of JSON output, a tiny two-layer
language model, and the command line's exit code with what it printed.

Only public weight attributes are read, so the oracles stay independent of
the expression code under test."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

import tsalgebra as ts


def spec_of(model: ts.Component) -> list[dict[str, Any]]:
    spec = []
    for layer in model.layers:
        if isinstance(layer, ts.Linear):
            spec.append({"kind": "linear", "weight": layer.weight, "bias": layer.bias})
        elif isinstance(layer, ts.Bilinear):
            spec.append({
                "kind": "bilinear", "left": layer.left, "right": layer.right, "down": layer.down,
                "left_bias": layer.left_bias, "right_bias": layer.right_bias,
                "down_bias": layer.down_bias, "residual": layer.residual,
            })
        else:
            raise TypeError(f"no spec for {layer!r}")
    return spec


def model_of(spec: list[dict[str, Any]]) -> ts.Sequential:
    layers = []
    for layer in spec:
        if layer["kind"] == "linear":
            layers.append(ts.Linear(layer["weight"], layer["bias"]))
        else:
            layers.append(ts.Bilinear(layer["left"], layer["right"], layer["down"], layer["left_bias"],
                                      layer["right_bias"], layer["down_bias"], layer["residual"]))
    return ts.Sequential(*layers)


def strict_json(text: str) -> Any:
    """Parse ``text`` as strict JSON: NaN and Infinity are not JSON, and fail."""
    def refuse(word: str) -> Any:
        raise ValueError(f"not JSON: {word}")
    return json.loads(text, parse_constant=refuse)


def tiny_lm(seed: int, vocab: int = 5, d: int = 4, n_ctx: int = 3) -> ts.Sequential:
    """Embedding, two attention layers (causal, rotary, residual), unembedding."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.normal(size=s) * 0.6  # noqa: E731
    layers = [ts.PositionWise(ts.Embedding(w(d, vocab)), n_ctx)]
    for _ in range(2):
        layers.append(ts.BilinearAttention(w(2, 2, d), w(2, 2, d), w(2, 2, d), w(2, 2, d), w(2, 2, d), w(2, d, 2),
                                           causal=True, rotary_base=10.0, residual=True, n_ctx=n_ctx,
                                           q1_bias=w(2, 2)))
    layers.append(ts.PositionWise(ts.Linear(w(vocab, d)), n_ctx))
    return ts.Sequential(*layers)


def exit_code(capsys: Any, *args: Any) -> tuple[int, str, str]:
    """The command line's exit code (main's, or argparse's SystemExit) with
    what it printed on stdout and stderr."""
    from tsalgebra.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
