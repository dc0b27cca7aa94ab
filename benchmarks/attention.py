"""Exact similarity of one bilinear-attention layer: orbit counts, timings,
and what a wrongly declared symmetry would cost.

Run: python benchmarks/attention.py [--quick]

Prints, from one run:
1. the orbits of the Gaussian cross term (10 input legs) against the raw
   pairings, all partial matchings and the 945 perfect matchings alone, for
   distinct and for quadratic (shared-factor) attention;
2. exact symmetric and Gaussian similarity of two random attention layers at
   d_model 16, 3 positions, 2 heads of width 4 (causal), cold (first call:
   orbit enumeration and path search included) and warm (repeat, median of 3);
3. the error that declaring the factor exchange for distinct factors (the
   reference's defect) introduces, against the honest exact value;
4. closure for attention + bilinear-MLP blocks: its relative error against
   the exact Gaussian value at one input feature and 2 positions (where the
   exact value is cheap), and its time at d_model 16, 3 positions.
Timings are wall-clock on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

import tsalgebra as ts
from tsalgebra.pairings import orbits

FACTOR_SWAP = (2, 3, 0, 1, 4)


def attention(rng: np.random.Generator, d: int, dh: int, heads: int, n_ctx: int, quadratic: bool) -> ts.BilinearAttention:
    w = lambda *s: rng.normal(size=s) / np.sqrt(s[-1])  # noqa: E731
    q1, k1 = w(heads, dh, d), w(heads, dh, d)
    q2, k2 = (q1, k1) if quadratic else (w(heads, dh, d), w(heads, dh, d))
    b1 = 0.1 * rng.normal(size=(heads, dh))
    b2 = b1 if quadratic else 0.1 * rng.normal(size=(heads, dh))  # quadratic: the factors share everything
    return ts.BilinearAttention(q1, k1, q2, k2, w(heads, dh, d), w(heads, d, dh), causal=True, n_ctx=n_ctx,
                                q1_bias=b1, q2_bias=b2)


def orbit_table() -> None:
    g = FACTOR_SWAP
    ga, gb = g + tuple(range(5, 10)), tuple(range(5)) + tuple(5 + x for x in g)
    exchange = tuple(range(5, 10)) + tuple(range(5))
    print("| attention | term | orbits (all pairings) | raw | orbits (perfect matchings) | raw |")
    print("|---|---|---:|---:|---:|---:|")
    for name, term, gens in (("distinct factors", "cross", ()), ("distinct factors", "self", (exchange,)),
                             ("quadratic", "cross", (ga, gb)), ("quadratic", "self", (ga, gb, exchange))):
        o = orbits("gaussian", 10, gens)
        perfect = [(p, s) for p, s in o if all(p[i] != i for i in range(10))]
        print(f"| {name} | {term} | {len(o):,} | {sum(s for _, s in o):,} | {len(perfect):,} | "
              f"{sum(s for _, s in perfect):,} |")


def timed(fn, repeats: int) -> tuple[object, float, float]:
    t0 = time.perf_counter()
    first = fn()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return first, cold, statistics.median(warm) if warm else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d_model 4 throughout (a smoke run)")
    parser.add_argument("--full", action="store_true",
                        help="the Gaussian rows at d_model 16 too (tens of minutes on 2 cores)")
    args = parser.parse_args()
    d = 4 if args.quick else 16
    d_gauss = d if args.full else 4
    print(f"python {platform.python_version()}, numpy {np.__version__}, tsalgebra {ts.__version__}")
    print("\n## Orbits of the Gaussian cross term of one attention layer (5 legs per side)\n")
    orbit_table()
    print(f"\n## Exact similarity, 3 positions, 2 heads of width 4, causal; symmetric at d_model {d}, gaussian at "
          f"d_model {d_gauss} (cold / warm median of 3)\n")
    print("| attention | inner | similarity | orbits / pairings | flops | cold | warm |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for quadratic in (False, True):
        for inner in ("symmetric", "gaussian"):
            a, b = (attention(rng, d if inner == "symmetric" else d_gauss, 4, 2, 3, quadratic) for _ in range(2))
            r, cold, warm = timed(lambda: ts.similarity(a, b, inner, algorithm="pairings" if inner == "gaussian" else None), 3)
            print(f"| {'quadratic' if quadratic else 'distinct'} | {inner} | {r.value:.12f} | {r.orbits:,} / "
                  f"{r.pairings:,} | {r.flops:.3g} | {cold:.2f} s | {warm:.3f} s |", flush=True)
    print("\n## Declaring the factor exchange for distinct factors (the reference's defect)\n")
    rng = np.random.default_rng(1)
    a, b = (attention(rng, 2, 2, 1, 2, False) for _ in range(2))

    def lie(m: ts.BilinearAttention) -> ts.Network:
        net = m.expression
        return ts.Network(net.tensors, net.inputs, net.outputs, (FACTOR_SWAP,))

    for inner in ("symmetric", "gaussian"):
        kw = {"algorithm": "pairings"} if inner == "gaussian" else {}
        honest = ts.similarity(a, b, inner, **kw).value
        wrong = ts.similarity(lie(a), lie(b), inner, **kw).value
        print(f"{inner}: honest cosine {honest:.6f}, with the undeclarable symmetry {wrong:.6f} "
              f"(relative error {abs(wrong - honest) / abs(honest):.1%})")
    closure_section(d)


def block(rng: np.random.Generator, d: int, n_ctx: int, quadratic: bool) -> ts.Sequential:
    """Attention then a residual bilinear MLP (hidden 8), position-wise."""
    mlp = ts.Bilinear(rng.normal(size=(8, d)) / np.sqrt(d), rng.normal(size=(8, d)) / np.sqrt(d),
                      rng.normal(size=(d, 8)) / np.sqrt(8), residual=True)
    return ts.Sequential(attention(rng, d, 2, 1, n_ctx, quadratic), ts.position_wise(mlp, n_ctx))


def closure_section(d: int) -> None:
    print("\n## Closure for attention + MLP blocks (head exact, MLP closed as if Gaussian)\n")
    print("| attention | seed | <a,b> exact | closure | rel. error | <a,a> exact | closure | rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    errors = []
    for quadratic in (False, True):
        for seed in range(3):
            rng = np.random.default_rng(100 + seed)
            a, b = block(rng, 1, 2, quadratic), block(rng, 1, 2, quadratic)
            row = []
            for x, y in ((a, b), (a, a)):
                exact = ts.inner(x, y).value
                closed = ts.inner(x, y, method="closure").value
                errors.append(abs(closed - exact) / abs(exact))
                row += [f"{exact:.6g}", f"{closed:.6g}", f"{errors[-1]:.2e}"]
            print(f"| {'quadratic' if quadratic else 'distinct'} | {seed} | " + " | ".join(row) + " |")
    print(f"\nmedian relative error {statistics.median(errors):.2e}, max {max(errors):.2e}")
    rng = np.random.default_rng(0)
    mlp = lambda: ts.position_wise(ts.Bilinear(rng.normal(size=(8, d)) / np.sqrt(d), rng.normal(size=(8, d)) / np.sqrt(d),  # noqa: E731
                                               rng.normal(size=(d, 8)) / np.sqrt(8), residual=True), 3)
    a, b = (ts.Sequential(attention(rng, d, 4, 2, 3, False), mlp()) for _ in range(2))
    r, cold, warm = timed(lambda: ts.similarity(a, b, method="closure", budget=1e13), 1)
    print(f"\nblock closure similarity at d_model {d}, 3 positions: {r.value:.6f} ({r.contractions:,} contractions, "
          f"{r.flops:.3g} flops, exact={r.exact}); cold {cold:.1f} s, warm {warm:.1f} s")


if __name__ == "__main__":
    main()
