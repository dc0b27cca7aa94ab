"""One-layer similarity benchmark: tsalgebra's exact answer against dense and Monte Carlo baselines.

What it measures
----------------
Two random bilinear layers with biases (input width d=1024, hidden h=64,
o=10 outputs; seed 0), compared by

* tsalgebra's exact symmetric similarity and exact Gaussian similarity
  (x ~ N(0, I)): value, cold time (first call in the process, with the
  planner's topology cache and the orbit cache emptied first) and warm time
  (repeated calls; the median and the best of several repeats are printed,
  the median is used in ratios);
* baseline (a): the dense route.  Each model's padded coefficient tensor
  T (o+1, d+1, d+1) is materialized with numpy einsum from the padded factors
  (``np.einsum(..., optimize=True)``, i.e. BLAS), symmetrized, and the two
  quantities are computed from the dense tensors (symmetric: Frobenius
  product over outputs 1..o; Gaussian: the closed form for quadratic forms,
  E[f g] = 2 tr(A_f A_g) + tr A_f tr A_g + b_f.b_g + c_f c_g + c_f tr A_g + c_g tr A_f,
  checked against tsalgebra on small models to 1e-10 before any timing);
* baseline (b): Monte Carlo estimation of the Gaussian similarity with a
  direct numpy forward pass (sampling included in the time), its standard
  error at n samples (delta method for the ratio), and the extrapolated
  sample count and time to reach 1e-10 and 1e-3 relative error;
* the flops tsalgebra reports for the exact computations, the float64 matmul
  rate of this machine (2048^3 matmul, best of 3) and tsalgebra's achieved
  rate (flops / warm median time).

All numbers and ratios are measured in the same run; float64 throughout;
timings use time.perf_counter.

Run:  python benchmarks/one_layer.py        (about a minute on 2 cores)
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np

import tsalgebra as ts

PAIRINGS = sys.modules["tsalgebra.pairings"]  # the orbit cache lives here

D_IN, HIDDEN, OUT = 1024, 64, 10
SEED = 0
WARM_REPEATS = 5
BASELINE_REPEATS = 5
MC_SAMPLES = 100_000
MC_CHUNK = 10_000
MC_SEED = 12345
TARGETS = (1e-10, 1e-3)


# ------------------------------------------------------------------ models


def random_bilinear(rng: np.random.Generator, d: int, h: int, o: int, residual: bool = False) -> ts.Bilinear:
    """Weights N(0, 1/fan_in), biases N(0, 1)."""
    return ts.Bilinear(
        rng.normal(size=(h, d)) / np.sqrt(d),
        rng.normal(size=(h, d)) / np.sqrt(d),
        rng.normal(size=(o, h)) / np.sqrt(h),
        left_bias=rng.normal(size=h),
        right_bias=rng.normal(size=h),
        down_bias=rng.normal(size=o),
        residual=residual,
    )


def forward(m: ts.Bilinear, x: np.ndarray) -> np.ndarray:
    """Direct numpy forward pass of one bilinear layer (not tsalgebra's evaluation)."""
    lb = m.left_bias if m.left_bias is not None else 0.0
    rb = m.right_bias if m.right_bias is not None else 0.0
    db = m.down_bias if m.down_bias is not None else 0.0
    y = ((x @ m.left.T + lb) * (x @ m.right.T + rb)) @ m.down.T + db
    return y + x if m.residual else y


# ------------------------------------------------------- dense baseline (a)


def dense_tensor(m: ts.Bilinear) -> np.ndarray:
    """Symmetrized padded coefficient tensor (o+1, d+1, d+1) from the padded factors."""
    L, R, D = m.padded()
    T = np.einsum("ou,ui,uj->oij", D, L, R, optimize=True)
    return (T + T.transpose(0, 2, 1)) / 2


def dense_symmetric_inner(Ta: np.ndarray, Tb: np.ndarray) -> float:
    """Frobenius product of the symmetrized padded tensors over outputs 1..o."""
    return float(np.dot(Ta[1:].ravel(), Tb[1:].ravel()))


def _parts(T: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output 1..o: quadratic block A, linear part b, constant c, trace of A."""
    A = T[1:, 1:, 1:]
    b = 2 * T[1:, 0, 1:]
    c = T[1:, 0, 0]
    tr = np.einsum("kii->k", A)
    return A, b, c, tr


def dense_gaussian_inner(Ta: np.ndarray, Tb: np.ndarray, per_output: bool = False) -> np.ndarray | float:
    """E_{x ~ N(0, I)} f(x).g(x) for quadratic forms f = c + b.x + x'Ax (A symmetric)."""
    Af, bf, cf, tf = _parts(Ta)
    Ag, bg, cg, tg = _parts(Tb)
    tr_AfAg = np.einsum("kij,kij->k", Af, Ag)  # tr(A_f A_g) for symmetric A_g
    val = 2 * tr_AfAg + tf * tg + np.einsum("ki,ki->k", bf, bg) + cf * cg + cf * tg + cg * tf
    return val if per_output else float(val.sum())


def cosine(ab: float, aa: float, bb: float) -> float:
    return ab / np.sqrt(aa * bb)


# ---------------------------------------------------------------- helpers


def timed(fn, repeats: int) -> tuple[object, list[float]]:
    """Run fn ``repeats`` times; the previous result is freed before each call."""
    times, out = [], None
    for _ in range(repeats):
        out = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def rel(x: float, y: float) -> float:
    return abs(x - y) / max(abs(y), 1e-300)


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    if s < 3600:
        return f"{s:.2f} s"
    if s < 86400 * 365.25:
        return f"{s / 3600:.3g} h"
    return f"{s / (86400 * 365.25):.3g} years"


def clear_caches() -> None:
    """Forget contraction orders, orbits and compiled orbit contractions (a cold start)."""
    from tsalgebra import pairing_sum

    ts.plan_cache.clear()
    PAIRINGS.orbits.cache_clear()
    pairing_sum._PLANS.clear()


# ------------------------------------------------------ formula self-check


def check_formulas() -> list[str]:
    """The dense closed forms against tsalgebra's exact results on small models."""
    lines = []
    worst = 0.0
    for k, (d, h, o, residual) in enumerate([(5, 3, 2, False), (6, 4, 3, False), (5, 7, 5, True), (3, 2, 3, True)]):
        rng = np.random.default_rng(100 + k)
        a, b = random_bilinear(rng, d, h, o, residual), random_bilinear(rng, d, h, o, residual)
        Ta, Tb = dense_tensor(a), dense_tensor(b)
        for x, y, xn, yn in ((a, b, Ta, Tb), (a, a, Ta, Ta), (b, b, Tb, Tb)):
            pairs = [
                (ts.inner(x, y, inner="gaussian", method="exact", per_output=True).value,
                 dense_gaussian_inner(xn, yn, per_output=True)),
                (ts.inner(x, y, inner="symmetric", method="exact").value, dense_symmetric_inner(xn, yn)),
            ]
            for got, want in pairs:
                got, want = np.atleast_1d(np.asarray(got, float)), np.atleast_1d(np.asarray(want, float))
                err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
                worst = max(worst, err)
                assert err < 1e-10, f"dense closed form disagrees with tsalgebra: rel {err:.3g} (d={d}, h={h}, o={o})"
    lines.append(f"closed forms vs tsalgebra on 4 small models (d<=6, with/without residual, per output):"
                 f" worst relative difference {worst:.2e} (< 1e-10: OK)")
    return lines


# ------------------------------------------------------------------- main


def main() -> None:
    t_start = time.perf_counter()
    print(__doc__.strip().splitlines()[0])
    print(f"python {platform.python_version()}, numpy {np.__version__}, cpus {os.cpu_count()}, "
          f"tsalgebra {ts.__version__}; d={D_IN}, h={HIDDEN}, o={OUT}, seed {SEED}, float64")
    print()

    # BLAS warm-up (does not touch tsalgebra's caches)
    w = np.random.default_rng(0).normal(size=(256, 256))
    for _ in range(3):
        w @ w

    # 0. check the dense formulas first (then empty tsalgebra's caches so the cold timings are cold)
    for line in check_formulas():
        print(line)
    clear_caches()
    print()

    rng = np.random.default_rng(SEED)
    a = random_bilinear(rng, D_IN, HIDDEN, OUT)
    b = random_bilinear(rng, D_IN, HIDDEN, OUT)

    # 1. tsalgebra, cold then warm
    ts_res, ts_cold, ts_warm = {}, {}, {}
    for inner in ("symmetric", "gaussian"):
        clear_caches()
        t0 = time.perf_counter()
        r = ts.similarity(a, b, inner=inner, method="exact")
        ts_cold[inner] = time.perf_counter() - t0
        ts_res[inner], ts_warm[inner] = timed(lambda: ts.similarity(a, b, inner=inner, method="exact"), WARM_REPEATS)

    # 2. dense baseline (a)
    (Ta, Tb), mat_times = timed(lambda: (dense_tensor(a), dense_tensor(b)), BASELINE_REPEATS)
    mat_first = mat_times[0]
    dense_val, dense_q_times = {}, {}

    def dense_sym() -> float:
        return cosine(dense_symmetric_inner(Ta, Tb), dense_symmetric_inner(Ta, Ta), dense_symmetric_inner(Tb, Tb))

    def dense_gauss() -> float:
        return cosine(dense_gaussian_inner(Ta, Tb), dense_gaussian_inner(Ta, Ta), dense_gaussian_inner(Tb, Tb))

    dense_val["symmetric"], dense_q_times["symmetric"] = timed(dense_sym, BASELINE_REPEATS)
    dense_val["gaussian"], dense_q_times["gaussian"] = timed(dense_gauss, BASELINE_REPEATS)
    dense_mem = 2 * Ta.nbytes
    del Ta, Tb

    # 3. Monte Carlo baseline (b): Gaussian similarity
    mc_rng = np.random.default_rng(MC_SEED)
    p = np.empty(MC_SAMPLES)
    q = np.empty(MC_SAMPLES)
    r_ = np.empty(MC_SAMPLES)
    t_sample = t_forward = 0.0
    for s in range(0, MC_SAMPLES, MC_CHUNK):
        t0 = time.perf_counter()
        x = mc_rng.standard_normal((MC_CHUNK, D_IN))
        t1 = time.perf_counter()
        fa, fb = forward(a, x), forward(b, x)
        p[s : s + MC_CHUNK] = np.einsum("ij,ij->i", fa, fb)
        q[s : s + MC_CHUNK] = np.einsum("ij,ij->i", fa, fa)
        r_[s : s + MC_CHUNK] = np.einsum("ij,ij->i", fb, fb)
        t2 = time.perf_counter()
        t_sample += t1 - t0
        t_forward += t2 - t1
    P, Q, R = p.mean(), q.mean(), r_.mean()
    mc_sim = P / np.sqrt(Q * R)
    influence = p / np.sqrt(Q * R) - mc_sim / 2 * (q / Q + r_ / R)  # delta method for P / sqrt(Q R)
    mc_se = influence.std(ddof=1) / np.sqrt(MC_SAMPLES)
    mc_rel_se = mc_se / abs(mc_sim)
    per_sample = (t_sample + t_forward) / MC_SAMPLES

    # 4. machine matmul rate
    n = 2048
    mrng = np.random.default_rng(7)
    X, Y = mrng.normal(size=(n, n)), mrng.normal(size=(n, n))
    _, mm_times = timed(lambda: X @ Y, 3)
    mm_rate = 2 * n**3 / min(mm_times)
    del X, Y

    # ------------------------------------------------------------- report
    med = {k: float(np.median(v)) for k, v in ts_warm.items()}
    mat_med = float(np.median(mat_times))
    print("== tsalgebra exact similarity (warm: median and best of %d calls) ==" % WARM_REPEATS)
    print(f"{'inner':<10} {'value':>20} {'cold':>10} {'warm med':>10} {'warm best':>10} "
          f"{'contractions':>12} {'orbits/pairings':>16} {'flops':>10}")
    for inner in ("symmetric", "gaussian"):
        r = ts_res[inner]
        print(f"{inner:<10} {r.value:>20.15f} {fmt_time(ts_cold[inner]):>10} {fmt_time(med[inner]):>10} "
              f"{fmt_time(min(ts_warm[inner])):>10} {r.contractions:>12} {f'{r.orbits}/{r.pairings}':>16} "
              f"{r.flops:>10.3g}")
    print()

    print(f"== baseline (a): dense padded tensors, median of {BASELINE_REPEATS} (outputs freed between repeats) ==")
    print(f"materialize + symmetrize both (o+1, d+1, d+1) tensors: median {fmt_time(mat_med)}, "
          f"best {fmt_time(min(mat_times))}, first {fmt_time(mat_first)} ({dense_mem / 2**20:.0f} MiB kept)")
    print(f"{'inner':<10} {'dense value':>20} {'rel diff vs ts':>15} {'quantity':>10} "
          f"{'total':>10} {'total/ts warm':>14} {'total/ts cold':>14}")
    for inner in ("symmetric", "gaussian"):
        qt = float(np.median(dense_q_times[inner]))
        tot = mat_med + qt
        tot_first = mat_first + dense_q_times[inner][0]
        print(f"{inner:<10} {dense_val[inner]:>20.15f} {rel(dense_val[inner], ts_res[inner].value):>15.2e} "
              f"{fmt_time(qt):>10} {fmt_time(tot):>10} {tot / med[inner]:>13.2f}x {tot_first / ts_cold[inner]:>13.2f}x")
    print("(total = materialize both + quantity; 'total/ts warm' uses medians, 'total/ts cold' first calls)")
    print()

    exact_g = ts_res["gaussian"].value
    print(f"== baseline (b): Monte Carlo Gaussian similarity, n = {MC_SAMPLES:,} samples (chunks of {MC_CHUNK:,}) ==")
    print(f"estimate {mc_sim:.6f} +- {mc_se:.2e} (relative standard error {mc_rel_se:.2e}); "
          f"exact {exact_g:.6f}; (estimate - exact)/stderr = {(mc_sim - exact_g) / mc_se:+.2f}")
    print(f"time: sampling {fmt_time(t_sample)}, forward passes {fmt_time(t_forward)}; "
          f"per sample {per_sample * 1e6:.2f} us (sampling included, used below)")
    print(f"{'target rel err':>14} {'samples needed':>16} {'time needed':>14} {'/ ts gaussian warm':>19}")
    for tgt in TARGETS:
        need = MC_SAMPLES * (mc_rel_se / tgt) ** 2
        tneed = need * per_sample
        print(f"{tgt:>14.0e} {need:>16.3g} {fmt_time(tneed):>14} {tneed / med['gaussian']:>18.3g}x")
    print()

    print("== flops and rates ==")
    print(f"float64 matmul {n}x{n} @ {n}x{n}: best {fmt_time(min(mm_times))} -> {mm_rate / 1e9:.1f} GFLOP/s")
    for inner in ("symmetric", "gaussian"):
        r = ts_res[inner]
        ach = r.flops / med[inner]
        print(f"tsalgebra {inner:<9}: {r.flops:.3g} flops reported (3 inner products) in {fmt_time(med[inner])} "
              f"-> {ach / 1e9:.1f} GFLOP/s = {ach / mm_rate:.0%} of matmul rate")
    measure = getattr(sys.modules["tsalgebra.inner"], "_measure", None)
    if measure is not None:  # diagnostic: validation of the default N(0, I) measure inside each inner product
        _, mt = timed(lambda: measure(D_IN, None, None, False), WARM_REPEATS)
        share = 3 * float(np.median(mt)) / med["gaussian"]
        print(f"diagnostic: tsalgebra.inner._measure(d, None, None) (builds and validates the default covariance; "
              f"called once per inner product, 3 per similarity) takes {fmt_time(float(np.median(mt)))} median "
              f"-> {share:.0%} of the warm gaussian similarity time")
    print()
    print(f"total script time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
