"""The ``tsalgebra`` command line.  Exit codes: 0 success, 1 a computation
failed (bad model, budget exceeded), 2 bad usage."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np

from .components import Bilinear, Component, Sequential
from .engine import BATCH
from .expr import Network, Tensor
from .planner import plan, plan_cache


def example_models(seed: int = 0) -> dict[str, Component]:
    """Two small random models: a residual bilinear block with biases, and a
    two-layer bilinear stack (degree 4)."""
    rng = np.random.default_rng(seed)
    d, h = 4, 6
    block = Bilinear(
        rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(d, h)) / h,
        left_bias=rng.normal(size=h), down_bias=rng.normal(size=d), residual=True,
    )
    stack = Sequential(
        Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(d, h))),
        Bilinear(rng.normal(size=(h, d)), rng.normal(size=(h, d)), rng.normal(size=(3, h))),
    )
    return {"residual block": block, "two-layer stack": stack}


def _with_batch(net: Network, n: int) -> Network:
    """The evaluation network: the model fed n samples of x~ on every input."""
    copies = tuple(Tensor(f"#x{k}", (BATCH, leg), (n, net.sizes[leg])) for k, leg in enumerate(net.inputs))
    return Network(net.tensors + copies, (), (BATCH,) + net.outputs)


def summary(seed: int = 0, batch: int = 32) -> list[dict[str, Any]]:
    """Describe each example model: expression, degree, plans, and a check
    that evaluation through the expression matches a direct forward pass."""
    rows = []
    rng = np.random.default_rng(seed + 1)
    for name, model in example_models(seed).items():
        net = model.expression
        x = rng.normal(size=(batch, model.in_features))
        direct = x
        for layer in model.layers:  # direct forward, independent of the engine
            assert isinstance(layer, Bilinear)
            lft = direct @ layer.left.T + (layer.left_bias if layer.left_bias is not None else 0)
            rgt = direct @ layer.right.T + (layer.right_bias if layer.right_bias is not None else 0)
            out = (lft * rgt) @ layer.down.T + (layer.down_bias if layer.down_bias is not None else 0)
            direct = out + direct if layer.residual else out
        err = float(np.max(np.abs(model(x) - direct)))
        rows.append(
            {
                "name": name,
                "model": repr(model),
                "degree": model.degree,
                "in": model.in_features,
                "out": model.out_features,
                "expression": str(net),
                "declared_symmetries": len(model.network(symmetric=True).symmetries),
                "evaluation_plan": json.loads(plan(_with_batch(net, batch)).to_json()),
                "materialization_plan": json.loads(plan(net).to_json()),
                "max_abs_error_vs_direct": err,
            }
        )
    return rows


def _print_summary(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"== {r['name']}: {r['model']}")
        print(f"   degree {r['degree']} (copies of x~), widths {r['in']} -> {r['out']}")
        print(f"   expression: {r['expression']}")
        print(f"   symmetric form declares {r['declared_symmetries']} swap generators")
        for key in ("evaluation_plan", "materialization_plan"):
            p = r[key]
            print(
                f"   {key.replace('_', ' ')}: {p['equation']}  [{p['optimizer']}, "
                f"{len(p['steps'])} steps, {p['flops']:.3g} flops, largest intermediate {p['largest_intermediate']}]"
            )
        print(f"   evaluation through the expression vs direct forward: max |diff| = {r['max_abs_error_vs_direct']:.2e}")
    print(f"plan cache: {plan_cache.info()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsalgebra", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="build two small models and print their expressions and contraction plans")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=32, help="batch size of the evaluation plan")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "summary":
            rows = summary(args.seed, args.batch)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_summary(rows)
    except (ValueError, TypeError) as exc:
        print(f"tsalgebra: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
