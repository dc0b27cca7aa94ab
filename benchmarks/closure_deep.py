"""The error of closure on two-layer bilinear-attention transformers, measured.

What it measures
----------------
Closure (``method="closure"``) propagates the two models' joint second
moments through every layer, exact through the first attention layer and
approximate after it.  Its error is measured against

* exact values where they exist: Gauss-Hermite quadrature of the Gaussian
  products at d_model 2, 2 positions (rank 4: 26^4 nodes for the degree-50
  product), and, for the token measure, enumeration of every sequence;
* the Monte Carlo estimator (``method="sampled"``, 40,000 samples, seeded)
  with its 95 % interval, at every width.

Four sections:

1. random tiny transformers (d_model 2, 2 positions, one head of width 2,
   causal, rotary off, a Linear readout), with and without residual, at
   attention scales 0.1, 0.3 and 1: closure, exact, estimate;
2. random transformers at d_model 8, 4 positions, 2 heads of 4, causal,
   rotary, query-key biases, with and without residual, scales 0.1-1: closure
   against the estimate and its interval;
3. a trained two-layer model (vocabulary 8, 4 positions, d_model 8, trained
   here on sequences with a repeated token so that attention matters):
   every checkpoint against the last, closure against the estimate under the
   Gaussian, and the token-measure similarity exact (enumeration of 8^4
   sequences) against its estimate;
4. the time and memory of closure at the reference's scale test.

Run:  python benchmarks/closure_deep.py        (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

import tsalgebra as ts

SAMPLES = 40_000
SCALES = (0.1, 0.3, 1.0)
SEEDS = (0, 1, 2)


def transformer(seed: int, d: int, heads: int, d_head: int, n_ctx: int, scale: float, residual: bool,
                vocab: int | None = None, rotary: bool = True, bias: bool = True) -> Any:
    """A torch two-layer bilinear-attention model (float64, eval), converted."""
    import torch
    from torch import nn

    from tsalgebra.adapters import BilinearAttentionModule

    torch.manual_seed(seed)
    blocks = [BilinearAttentionModule(heads, d_head, d, causal=True, rotary_base=10000.0 if rotary else None,
                                      scale=scale, residual=residual, n_ctx=n_ctx, bias=bias) for _ in range(2)]
    mods = ([nn.Embedding(vocab, d)] if vocab else []) + blocks + [nn.Linear(d, 2 if not vocab else vocab)]
    return nn.Sequential(*mods).double().eval()


def relative(x: float, ref: float) -> float:
    return abs(x - ref) / max(abs(ref), 1e-300)


def estimate(a: Any, b: Any, **kw: Any) -> Any:
    return ts.similarity(a, b, method="sampled", samples=SAMPLES, seed=11, **kw)


def closure(a: Any, b: Any) -> tuple[float | None, float]:
    t0 = time.perf_counter()
    try:
        value = ts.similarity(a, b, method="closure", measure=ts.Gaussian()).value
    except (ts.CostError, ValueError) as exc:
        print(f"  closure refused: {exc}")
        value = None
    return value, time.perf_counter() - t0


def fmt(v: float | None, digits: int = 4) -> str:
    return "refused" if v is None else f"{v:.{digits}f}"


def inside(v: float | None, r: Any) -> str:
    if v is None:
        return "-"
    z = abs(v - r.value) / r.stderr
    return f"{z:.1f}"


def section_tiny() -> list[float]:
    print("\n## 1. Tiny random transformers (d_model 2, 2 positions, one head of 2): closure against exact "
          "(quadrature)\n")
    print("| residual | scale | seed | exact | closure | closure - exact | estimate ± se | heavy tails | "
          "exact in the 95 % interval |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    errors = []
    for residual in (False, True):
        for scale in SCALES:
            for seed in SEEDS:
                a, b = (ts.from_torch(transformer(seed * 2 + k, 2, 1, 2, 2, scale, residual, rotary=False))
                        for k in (0, 1))
                exact = ts.similarity(a, b, algorithm="quadrature", budget=1e13).value
                c, _ = closure(a, b)
                r = estimate(a, b)
                lo, hi = r.interval
                err = c - exact if c is not None else float("nan")
                errors.append(abs(err))
                print(f"| {residual} | {scale} | {seed} | {exact:.4f} | {fmt(c)} | {err:+.3f} | {r.value:.4f} ± "
                      f"{r.stderr:.2g} | {r.estimate.heavy_tailed} | {lo <= exact <= hi} |", flush=True)
    return errors


def section_random() -> None:
    print("\n## 2. Random transformers (d_model 8, 4 positions, 2 heads of 4, rotary, biases): closure against the "
          "estimate\n")
    print("| residual | scale | seed | closure | estimate ± se | heavy tails | |closure - estimate| / se | "
          "closure time |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for residual in (False, True):
        for scale in SCALES:
            for seed in SEEDS[:2]:
                a, b = (ts.from_torch(transformer(seed * 2 + k, 8, 2, 4, 4, scale, residual)) for k in (0, 1))
                c, t = closure(a, b)
                r = estimate(a, b)
                print(f"| {residual} | {scale} | {seed} | {fmt(c)} | {r.value:.4f} ± {r.stderr:.2g} | "
                      f"{r.estimate.heavy_tailed} | {inside(c, r)} | {t:.2f} s |", flush=True)


def train(steps: int = 600, every: int = 100, vocab: int = 8, n_ctx: int = 4, d: int = 8) -> list[Any]:
    """Checkpoints of a two-layer model trained on sequences whose last token
    repeats an earlier one (predict the repeated token: attention matters)."""
    import copy

    import torch

    model = transformer(0, d, 2, 4, n_ctx, 0.5, True, vocab=vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    checkpoints = [copy.deepcopy(model).eval()]
    for step in range(1, steps + 1):
        x = torch.randint(0, vocab, (256, n_ctx), generator=gen)
        src = torch.randint(0, n_ctx - 1, (256,), generator=gen)
        x[:, -1] = x[torch.arange(256), src]  # the last token copies an earlier one
        logits = model.train()(x)
        loss = torch.nn.functional.cross_entropy(logits[:, -2], x[:, -1])  # predict the copy from position n-2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            checkpoints.append(copy.deepcopy(model).eval())
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    return checkpoints


def section_trained() -> None:
    print("\n## 3. A trained two-layer model (vocabulary 8, 4 positions, d_model 8): each checkpoint against the "
          "last\n")
    models = [ts.from_torch(m) for m in train()]
    last = models[-1]
    print("\n| checkpoint | closure (Gaussian) | estimate ± se (Gaussian) | |closure - estimate| / se | "
          "tokens exact (enumeration) | tokens estimate ± se |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, m in enumerate(models[:-1]):
        c = ts.similarity(m, last, method="closure", measure=ts.Gaussian()).value
        r = estimate(m, last, measure=ts.Gaussian())
        exact = ts.similarity(m, last)  # the models' default: tokens
        rt = estimate(m, last)
        print(f"| {k * 100} | {fmt(c)} | {r.value:.4f} ± {r.stderr:.2g} | {inside(c, r)} | {exact.value:.4f} "
              f"({exact.algorithm}) | {rt.value:.4f} ± {rt.stderr:.2g} |", flush=True)


def section_scale() -> None:
    """The reference's scale test, both models in one joint computation:
    plan, cold and warm wall time, the process's peak resident memory."""
    import resource

    print("\n## 4. The reference's scale test: vocabulary 4,096, d_model 128, 8 heads of 16, 4 positions, two "
          "attention layers (biases, causal, rotary, residual, scale 0.35)\n")
    a, b = (ts.from_torch(transformer(seed, 128, 8, 16, 4, 0.35, True, vocab=4096)) for seed in (0, 1))
    plan = ts.plan_similarity(a, b, measure=ts.Gaussian(), method="closure")
    print(f"plan: {plan.flops:.3g} flops, planned peak {max(p.peak_bytes for p in plan.plans) / 2**20:.0f} MiB")
    for label in ("cold", "warm", "warm"):
        t0 = time.perf_counter()
        r = ts.similarity(a, b, measure=ts.Gaussian(), method="closure")
        print(f"{label}: {time.perf_counter() - t0:.2f} s, similarity {r.value:.6g}, exact={r.exact}")
    print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          "(models, torch and the interpreter included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", type=int, choices=(1, 2, 3, 4), help="run one section only")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.section in (None, 1):
        errors = section_tiny()
        print(f"\n|closure - exact| on the cosine, tiny models: median {np.nanmedian(errors):.2g}, max "
              f"{np.nanmax(errors):.2g}")
    if args.section in (None, 2):
        section_random()
    if args.section in (None, 3):
        section_trained()
    if args.section in (None, 4):
        section_scale()
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
