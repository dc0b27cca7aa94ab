"""Bridges between tsalgebra models and the plain specs of `oracles`, and a
strict JSON reader for the tests of JSON output, a tiny two-layer
language model, and the command line's exit code with what it printed.

Only public weight attributes are read, so the oracles stay independent of
the expression code under test."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any, Callable

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


def observed_peak(run: Callable[[], Any]) -> int:
    """Bytes allocated at the peak of ``run()`` beyond what was allocated
    before it (numpy registers its arrays with tracemalloc; torch does not)."""
    gc.collect()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not tracing:
            tracemalloc.stop()


def saved_bilinears(directory: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """``n`` small random Bilinear layers (3 -> 4 -> 2) saved as safetensors."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        L, R, D = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 4))
        ts.save(ts.Bilinear(L, R, D), directory / f"m{i}.safetensors")
        paths.append(directory / f"m{i}.safetensors")
    return paths


def dead_channel_pair() -> tuple[ts.Bilinear, ts.Bilinear]:
    """Two bilinear layers, the second's output channel 1 dead (zero norm):
    a per-output cosine undefined there."""
    rng = np.random.default_rng(3)
    up, down = rng.normal(size=(5, 4)), rng.normal(size=(3, 5))
    dead = down.copy()
    dead[1] = 0
    return ts.Bilinear(up, rng.normal(size=(5, 4)), down), ts.Bilinear(up, rng.normal(size=(5, 4)), dead)


TINY_LM_TEMPLATE = (
    "from torch import nn\n"
    "from tsalgebra.adapters import BilinearAttentionModule\n"
    "def build():\n"
    "    return nn.Sequential(nn.Embedding(6, 4), BilinearAttentionModule(2, 2, 4, n_ctx=3, causal=True),\n"
    "                         nn.Linear(4, 6)).double()\n")


def template_checkpoints(directory: Path, name: str, source: str, seeds: tuple[int, ...] = (1, 2)) -> tuple[str, list[Path]]:
    """A model file ``name``.py (``source``, defining build()) in
    ``directory`` and one torch checkpoint m{seed}.pt per seed of its
    module: (the --template argument, the checkpoint paths)."""
    import importlib
    import sys

    import torch

    (directory / f"{name}.py").write_text(source)
    sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(name)
        paths = []
        for s in seeds:
            torch.manual_seed(s)
            paths.append(directory / f"m{s}.pt")
            torch.save(module.build().state_dict(), paths[-1])
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(name, None)
    return f"{directory / name}.py:build", paths


def tile_counter(monkeypatch: Any) -> list[int]:
    """A list that grows by one per tile a similarity matrix computes
    (tsalgebra.matrix.api.compute_tile wrapped for the test)."""
    from tsalgebra.matrix import api

    calls: list[int] = []
    real = api.compute_tile

    def compute_tile(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(api, "compute_tile", compute_tile)
    return calls
