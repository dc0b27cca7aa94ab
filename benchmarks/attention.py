"""Exact similarity of one bilinear-attention layer: orbit counts, timings,
and what a wrongly declared symmetry would cost.

Run: python benchmarks/attention.py [--quick] [--full] [--lm]

Prints, from one run:
1. the orbits of the Gaussian cross term (10 input legs) against the raw
   pairings, all partial matchings and the 945 perfect matchings alone, for
   distinct and for quadratic (shared-factor) attention;
2. exact similarity of two random attention layers at 3 positions, 2 heads
   of width 4 (causal): Gaussian at d_model 16 by per-position attention
   moments (the default), checked against Monte Carlo; symmetric at d_model
   16 by pairing orbits; Gaussian by pairing orbits at d_model 4 (16 with
   --full), the generic route; cold (a fresh process: imports done, first
   call with every table and path built) and warm (median of 5 repeats);
3. the error that declaring the factor exchange for distinct factors (the
   reference's defect) introduces, against the honest exact value;
4. closure for attention + bilinear-MLP blocks: its relative error against
   the exact Gaussian value at one input feature and 2 positions (where the
   exact value is cheap), and its time at d_model 16, 3 positions, cold and
   warm as in 2;
5. language-model width (skipped by --quick): embedding from a vocabulary of
   4,096, one attention layer (8 heads, causal, rotary, query-key biases,
   residual), unembedding; d_model 256 with heads of 32 at 4 positions, and
   d_model 128 with heads of 16 at 4, 16 and 64 positions: the exact
   similarity under the Gaussian and under the token measure, its planned
   flops, cold (fresh process, imports excluded) and warm times, the rate
   those flops ran at against this machine's matrix-product rate (measured
   in the same run), and the time Monte Carlo would take to reach a relative
   error of 1e-3 on the same similarity (its per-sample cost and variance
   measured on a pilot of samples), as a ratio to the exact warm time.
   Plans above a minute of work are reported, not run.  At the first shape
   also the inner product alone (the token measure's target) under both
   measures at the default budget, and the token measure with a different
   law at every position (inner product and similarity).
Timings are wall-clock on this machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

from typing import Any

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


def mlp(rng: np.random.Generator, d: int, n_ctx: int) -> ts.Component:
    """A residual bilinear MLP (hidden 8), position-wise."""
    return ts.position_wise(ts.Bilinear(rng.normal(size=(8, d)) / np.sqrt(d), rng.normal(size=(8, d)) / np.sqrt(d),
                                        rng.normal(size=(d, 8)) / np.sqrt(8), residual=True), n_ctx)


def case(name: str, d: int):
    """(a, b, call) for a timing case, built the same way in every process."""
    if name.startswith("lm "):  # "lm MEASURE V d heads dh n [inner] [laws]"
        _, measure, *words = name.split()
        V, d, heads, dh, n = (int(v) for v in words[:5])
        a, b = (ts.from_torch(m) for m in language_models(V, d, heads, dh, n))
        if measure == "tokens":
            kw = {"measure": ts.Tokens(V, n, token_laws(V, n) if "laws" in words else None)}
        else:
            kw = {"measure": ts.Gaussian()}
        if "inner" in words:  # the inner product alone, at the default budget
            return a, b, lambda: ts.inner(a, b, **kw)
        return a, b, lambda: ts.similarity(a, b, budget=RUN_LIMIT, **kw)
    seed = {"distinct": 0, "quadratic": 1, "block": 2}[name.split()[0]]
    rng = np.random.default_rng(seed)
    if name.startswith("block"):
        a, b = (ts.Sequential(attention(rng, d, 4, 2, 3, False), mlp(rng, d, 3)) for _ in range(2))
        return a, b, lambda: ts.similarity(a, b, method="closure")
    kind, inner, algorithm = name.split()
    a, b = (attention(rng, d, 4, 2, 3, kind == "quadratic") for _ in range(2))
    return a, b, lambda: ts.similarity(a, b, inner, algorithm=None if algorithm == "default" else algorithm)


def cold(name: str, d: int) -> float:
    """Seconds of the first call in a fresh interpreter (imports excluded)."""
    out = subprocess.run([sys.executable, __file__, "--cold", name, "--d", str(d)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def timing_row(name: str, d: int) -> ts.InnerResult:
    a, b, call = case(name, d)
    r, _, warm = timed(call, 5)
    kind = name.split()[0]
    cost = f"{r.orbits:,} / {r.pairings:,}" if r.pairings else "-"
    print(f"| {kind} | {r.inner} | {d} | {r.algorithm} | {r.value:.12f} | {cost} | {r.flops:.3g} | "
          f"{cold(name, d):.2f} s | {warm * 1e3:.1f} ms |", flush=True)
    return r


def monte_carlo_check(d: int, samples: int = 40_000) -> None:
    """The d_model-16 exact Gaussian inner products against sampled averages."""
    a, b, _ = case("distinct gaussian default", d)
    z = np.random.default_rng(7).normal(size=(samples, 3, d))
    fa, fb = a(z), b(z)
    for label, x, y, fx, fy in (("<a,a>", a, a, fa, fa), ("<a,b>", a, b, fa, fb)):
        prod = np.einsum("bio,bio->b", fx, fy)
        se = prod.std(ddof=1) / np.sqrt(samples)
        exact = ts.inner(x, y).value
        print(f"{label}: exact {exact:.6g}, Monte Carlo {prod.mean():.6g} +- {se:.2g} "
              f"({abs(prod.mean() - exact) / se:.1f} standard errors, {samples:,} samples)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d_model 4 throughout (a smoke run)")
    parser.add_argument("--full", action="store_true",
                        help="the pairing-orbit Gaussian rows at d_model 16 too (tens of minutes on 2 cores)")
    parser.add_argument("--lm", action="store_true", help="only the language-model-width section")
    parser.add_argument("--cold", help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold:  # child process of cold(): time one first call
        call = case(args.cold, args.d)[2]
        t0 = time.perf_counter()
        call()
        print(time.perf_counter() - t0)
        return
    if args.lm:
        language_model_section()
        return
    d = 4 if args.quick else 16
    d_pairs = d if args.full else 4
    print(f"python {platform.python_version()}, numpy {np.__version__}, tsalgebra {ts.__version__}")
    print("\n## Orbits of the Gaussian cross term of one attention layer (5 legs per side)\n")
    orbit_table()
    print("\n## Exact similarity, 3 positions, 2 heads of width 4, causal (cold: fresh process; warm: median of 5)\n")
    print("| attention | inner | d_model | algorithm | similarity | orbits / pairings | flops | cold | warm |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for quadratic in ("distinct", "quadratic"):
        timing_row(f"{quadratic} gaussian default", d)
        timing_row(f"{quadratic} symmetric default", d)
        timing_row(f"{quadratic} gaussian pairings", d_pairs)
    print()
    monte_carlo_check(d)
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
    if not args.quick:
        language_model_section()


def block(rng: np.random.Generator, d: int, n_ctx: int, quadratic: bool) -> ts.Sequential:
    """Attention (one head of width 2) then a residual bilinear MLP."""
    tail = mlp(rng, d, n_ctx)  # drawn first: the seeds of the table in docs/inner-products.md
    return ts.Sequential(attention(rng, d, 2, 1, n_ctx, quadratic), tail)


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
    print("\nblock (attention with 2 heads of width 4, residual bilinear MLP of hidden width 8), closure:\n")
    print("| attention | inner | d_model | algorithm | similarity | orbits / pairings | flops | cold | warm |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    r = timing_row("block", d)
    print(f"\nexact={r.exact}; {'; '.join(r.notes)}")


# ------------------------------------------------------- language-model width


def language_models(V: int, d: int, heads: int, dh: int, n: int) -> tuple[Any, Any]:
    """Two torch language models (embedding -> bilinear attention with
    biases, causal, rotary, residual -> unembedding; float64), the second
    the first's weights with 30 % noise (similar, not equal).  The exact
    side converts them with ``from_torch``; Monte Carlo runs their forward."""
    import torch
    from torch import nn

    from tsalgebra.adapters import BilinearAttentionModule

    def model(noise: bool) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(V, d), BilinearAttentionModule(heads, dh, d, causal=True, rotary_base=10000.0,
                                                                       scale=dh ** -0.5, residual=True, n_ctx=n,
                                                                       bias=True), nn.Linear(d, V)).double()
        if noise:
            torch.manual_seed(1)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.3 * p.std(correction=0) * torch.randn_like(p))  # one element: no noise, not NaN
        return m.eval()

    return model(False), model(True)


def token_laws(V: int, n: int) -> np.ndarray:
    """A different token distribution at every position, far from uniform
    (a few tokens carry most of each position's mass)."""
    p = np.random.default_rng(3).random((n, V)) ** 4
    return p / p.sum(axis=1, keepdims=True)


def matmul_rate() -> float:
    """Flops per second of a 2000 x 2000 float64 matrix product (best of 3)."""
    A = np.random.default_rng(0).normal(size=(2000, 2000))
    best = min(timed(lambda: A @ A, 0)[1] for _ in range(3))
    return 2 * 2000**3 / best


def monte_carlo_seconds(a: Any, b: Any, measure: str, V: int, n: int, pilot: int = 4000) -> float:
    """Seconds for Monte Carlo to reach relative error 1e-3 on the
    similarity of the torch models ``a`` and ``b``: per-sample time of their
    forward (tokens: token ids; Gaussian: N(0, I) vectors through the
    embedding matrix) and the delta-method variance of the cosine of sampled
    products, both from ``pilot`` samples."""
    import torch

    def forward(m: Any, x: Any) -> Any:
        return m(x) if measure == "tokens" else m[1:](x @ m[0].weight)

    gen = torch.Generator().manual_seed(2)
    chunk = max(1, 2**22 // (n * V))  # samples per forward: 32 MiB of inputs at most
    t0 = time.perf_counter()
    products: list[np.ndarray] = []  # per sample <a,b>, <a,a>, <b,b>: the outputs themselves are not kept
    with torch.no_grad():
        for start in range(0, pilot, chunk):
            k = min(chunk, pilot - start)
            x = torch.randint(0, V, (k, n), generator=gen) if measure == "tokens" else \
                torch.randn(k, n, V, generator=gen, dtype=torch.float64)
            fa, fb = (forward(m, x).reshape(k, -1) for m in (a, b))
            products.append(torch.stack([(fa * fb).sum(1), (fa * fa).sum(1), (fb * fb).sum(1)]).numpy())
    per_sample = (time.perf_counter() - t0) / pilot
    ab, aa, bb = np.concatenate(products, axis=1)
    means = np.array([ab.mean(), aa.mean(), bb.mean()])
    cos = means[0] / np.sqrt(means[1] * means[2])
    grad = cos * np.array([1 / means[0], -0.5 / means[1], -0.5 / means[2]])  # the cosine's gradient in the means
    var = grad @ np.cov(np.stack([ab, aa, bb])) @ grad  # per sample
    return var / (1e-3 * abs(cos)) ** 2 * per_sample


LM_SHAPES = [(4096, 256, 8, 32, 4), (4096, 128, 8, 16, 4), (4096, 128, 8, 16, 16), (4096, 128, 8, 16, 64)]
RUN_LIMIT = 5e12  # flops: about a minute here; costlier plans are reported, not run


def language_model_section() -> None:
    rate = matmul_rate()
    print(f"\n## Language-model width: vocabulary 4,096, one attention layer (matrix products here: "
          f"{rate / 1e9:.0f} GF/s)\n")
    print("| measure | d_model | heads | positions | algorithm | similarity | flops | cold | warm | rate | "
          "Monte Carlo to 1e-3 | ratio |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for V, d, heads, dh, n in LM_SHAPES:
        for measure in ("gaussian", "tokens"):
            name = f"lm {measure} {V} {d} {heads} {dh} {n}"
            a, b, call = case(name, 0)
            kw = {"measure": ts.Tokens(V, n)} if measure == "tokens" else {}
            plan = ts.plan_similarity(a, b, measure, budget=RUN_LIMIT, **kw)
            head = f"| {measure} | {d} | {heads} x {dh} | {n} |"
            if plan.refused or plan.flops > RUN_LIMIT:
                algorithms = "/".join(sorted({p.algorithm for p in plan.plans})) or "-"
                print(f"{head} {algorithms} | (not run) | {plan.flops:.3g} | | | | | |", flush=True)
                continue
            r, _, warm = timed(call, 3)
            mc = monte_carlo_seconds(*language_models(V, d, heads, dh, n), measure, V, n)
            print(f"{head} {r.algorithm} | {r.value:.9f} | {r.flops:.3g} | {cold(name, 0):.2f} s | {warm:.2f} s | "
                  f"{r.flops / warm / 1e9:.0f} GF/s ({r.flops / warm / rate:.0%}) | {mc:.3g} s | "
                  f"{mc / warm:.3g} |", flush=True)
    V, d, heads, dh, n = LM_SHAPES[0]
    print(f"\nat d_model {d}, {heads} heads of {dh}, {n} positions: the inner product <a, b> alone (default budget), "
          "and the token measure with a different law at every position\n")
    print("| measure | product | algorithm | value | flops | cold | warm |")
    print("|---|---|---|---:|---:|---:|---:|")
    for measure, extra in (("gaussian", "inner"), ("tokens", "inner"), ("tokens", "inner laws"), ("tokens", "laws")):
        name = f"lm {measure} {V} {d} {heads} {dh} {n} {extra}"
        r, _, warm = timed(case(name, 0)[2], 3)
        what = ("<a, b>" if "inner" in extra else "similarity") + (", a law per position" if "laws" in extra else "")
        print(f"| {measure} | {what} | {r.algorithm} | {r.value:.9g} | {r.flops:.3g} | {cold(name, 0):.2f} s | "
              f"{warm:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
