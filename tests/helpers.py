"""Bridges between tsalgebra models and the plain specs of `oracles`, and a
strict JSON reader for the tests of JSON output.

Only public weight attributes are read, so the oracles stay independent of
the expression code under test."""

from __future__ import annotations

import json
from typing import Any

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
