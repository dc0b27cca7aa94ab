"""Similarity-matrix benchmark: tsalgebra.similarity_matrix against a pair-by-pair numpy loop.

What it measures
----------------
For N = 100 random models (weights N(0, 1/fan_in), biases N(0, 1); seed 0):

* one bilinear layer at (d, h, o) = (1024, 64, 10), (256, 64, 10), (256, 512, 10),
  symmetric inner product (the paper's one-layer core formula);
* depth-3 bilinear stacks (d -> h -> w, w -> h -> w, w -> h -> o), network
  inner product (the Gram recursion), at two sizes.

For each case:

* batched: ``ts.similarity_matrix(models, inner=...)`` with route "auto",
  float64, numpy in and out; one untimed warm-up call, PROBE_CALLS timed
  probe calls with each thread count (numpy's default and 1, for OpenBLAS and
  torch together; the fastest call of each count counts), then the median of
  REPEATS calls at the faster count (the whole
  call: folding and normalizing the models included).  Printed: the route the
  planner chose and what each candidate route would have cost, the plan's
  flops and the achieved rate, and the dominant step (the step that took the
  most time in the median call) with its own flops and rate.
* the loop: a pair-by-pair numpy loop of the same formula over the N(N+1)/2
  pairs i <= j (the norms are the pairs i = j), from padded factors prepared
  once per model (untimed).  One layer: the core formula
  1/2 sum (La Lb^T * Ra Rb^T + La Rb^T * Ra Lb^T) * (Da^T Db) over outputs 1..o.
  Depth 3: G <- Da [1/2 ((La G Lb^T) * (Ra G Rb^T) + (La G Rb^T) * (Ra G Lb^T))] Db^T
  from G = I, then the trace over outputs 1..o.  The loop runs with the
  OpenBLAS thread count (1, or numpy's default) that was faster on a probe of
  its first pairs: small products lose to thread synchronization, more so
  when other processes share the cores.  Where the full loop would take too
  long, only the first pairs are timed and the time per pair is extrapolated
  to all pairs (said in the output).  The loop's cosines on the pairs it ran
  are compared with the batched matrix.
* the float64 matmul rate of this machine: a square 2500 x 2500 product in
  numpy (OpenBLAS) and in torch (MKL), best of 3, with the default thread
  count and with 1 thread, measured at the start and again before every case.
  The dominant step is compared with the highest rate seen in the run at the
  thread count the batched run used (same resources), and the overall highest
  is printed too.

Thread counts matter on this kind of machine: the cores are shared with other
processes, and a multi-threaded BLAS call on a small or medium problem can
wait a whole scheduler slice for its second thread, which makes either side
look arbitrarily slow.  Each side is therefore timed at its own faster count.

Targets (from the issue): batched >= 3x the loop at (256, 64, 10), >= 30x at
(256, 512, 10), never slower than the loop, and the dominant step at >= 50% of
the matmul rate.

With ``--device cuda`` the same cases run on the GPU: the batched call with
``device="cuda"`` (still the whole call from numpy models to the numpy
matrix), the loop as the same formula in torch on the GPU from factors put
there once (each pair's value read back, as a loop must), and the matmul rate
is a float64 8192^3 torch product on the GPU.  There are no thread counts to
probe there.

Run:  python benchmarks/similarity_matrix.py        (about 2 minutes on 2 idle cores, longer under load)
      python benchmarks/similarity_matrix.py --only "(256, 64"     (the cases whose label contains the text)
      python benchmarks/similarity_matrix.py --device cuda        (on a CUDA GPU)
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

import tsalgebra as ts
from tsalgebra.matrix import SimilarityMatrix

N_MODELS = 100
SEED = 0
REPEATS = 3
LOOP_SECONDS = 15.0  # time the full loop when it is expected to finish within this; else extrapolate
MIN_LOOP_PAIRS = 40
ONE_LAYER = [(1024, 64, 10), (256, 64, 10), (256, 512, 10)]
DEPTH3 = [(32, 32, 32, 10), (64, 64, 64, 10)]  # (d, h, w, o)
PROBE_SECONDS = 1.5
PROBE_CALLS = 2
SPEEDUP_TARGETS = {(256, 64, 10): 3.0, (256, 512, 10): 30.0}


# ------------------------------------------------------------------ models


def random_bilinear(rng: np.random.Generator, d: int, h: int, o: int) -> ts.Bilinear:
    return ts.Bilinear(
        rng.normal(size=(h, d)) / np.sqrt(d),
        rng.normal(size=(h, d)) / np.sqrt(d),
        rng.normal(size=(o, h)) / np.sqrt(h),
        left_bias=rng.normal(size=h),
        right_bias=rng.normal(size=h),
        down_bias=rng.normal(size=o),
    )


def random_stack(rng: np.random.Generator, d: int, h: int, w: int, o: int) -> ts.Sequential:
    return ts.Sequential(random_bilinear(rng, d, h, w), random_bilinear(rng, w, h, w), random_bilinear(rng, w, h, o))


def padded_blocks(model: ts.Component, device: str | None) -> list[tuple]:
    """(L~, R~, D~) of every bilinear layer, read from the layers themselves
    (numpy; torch tensors on ``device`` when one is given)."""
    put = np.ascontiguousarray if device is None else (lambda x: torch.as_tensor(np.asarray(x), device=device))
    return [tuple(put(x) for x in layer.padded()) for layer in model.layers]


# ------------------------------------------------------------ the loops
# (numpy arrays or torch tensors alike; float() reads each value back)


def pair_one_layer(a, b) -> float:
    La, Ra, Da = a
    Lb, Rb, Db = b
    core = (La @ Lb.T) * (Ra @ Rb.T) + (La @ Rb.T) * (Ra @ Lb.T)
    return 0.5 * float((core * (Da[1:].T @ Db[1:])).sum())


def pair_network(a, b) -> float:
    G = None
    for (La, Ra, Da), (Lb, Rb, Db) in zip(a, b):
        LG, RG = (La, Ra) if G is None else (La @ G, Ra @ G)
        core = 0.5 * ((LG @ Lb.T) * (RG @ Rb.T) + (LG @ Rb.T) * (RG @ Lb.T))
        G = Da @ core @ Db.T
    return float(G[1:, 1:].diagonal().sum())


def run_loop(factors, pair_fn, max_seconds: float) -> tuple[dict[tuple[int, int], float], float, int, int]:
    """Inner products of pairs i <= j in row order; stops after ``max_seconds``
    (at least MIN_LOOP_PAIRS pairs).  Returns (values, seconds, pairs run, all pairs)."""
    n = len(factors)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    vals: dict[tuple[int, int], float] = {}
    t0 = time.perf_counter()
    for k, (i, j) in enumerate(pairs):
        vals[(i, j)] = pair_fn(factors[i], factors[j])
        if k + 1 >= MIN_LOOP_PAIRS and time.perf_counter() - t0 > max_seconds:
            break
    return vals, time.perf_counter() - t0, len(vals), len(pairs)


def loop_check(vals: dict[tuple[int, int], float], matrix: np.ndarray) -> float | None:
    """Largest |cosine difference| on the pairs whose two norms the loop computed."""
    diffs = [abs(v / np.sqrt(vals[(i, i)] * vals[(j, j)]) - matrix[i, j])
             for (i, j), v in vals.items() if (i, i) in vals and (j, j) in vals]
    return max(diffs) if diffs else None


# ---------------------------------------------------------------- helpers


class BlasThreads:
    """Get/set numpy's OpenBLAS thread count through its C API (None if not found)."""

    def __init__(self) -> None:
        import ctypes
        import glob

        self._get = self._set = None
        libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        for path in glob.glob(os.path.join(libdir, "*openblas*.so*")):
            try:
                lib = ctypes.CDLL(path)
                self._get, self._set = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
                break
            except (OSError, AttributeError):
                continue

    @property
    def available(self) -> bool:
        return self._get is not None

    def get(self) -> int | None:
        return int(self._get()) if self._get is not None else None

    def set(self, n: int) -> None:
        if self._set is not None:
            self._set(int(n))


class Threads:
    """One thread count for OpenBLAS (numpy) and torch together (on a GPU: the
    default only, nothing to probe)."""

    def __init__(self, gpu: bool = False) -> None:
        self.blas = BlasThreads()
        self.gpu = gpu
        self.default = max(self.blas.get() or 1, torch.get_num_threads())

    def counts(self) -> list[int]:
        return [self.default, 1] if self.default > 1 and not self.gpu else [self.default]

    def label(self, n: int) -> str:
        return "GPU" if self.gpu else f"{n} thread{'s' if n > 1 else ''}"

    def set(self, n: int) -> None:
        self.blas.set(n)
        torch.set_num_threads(n)

    def reset(self) -> None:
        self.set(self.default)


def matmul_rate(threads: Threads) -> dict[int, float]:
    """Best-of-3 float64 rate of a 2500^3 product, numpy or torch, per thread
    count; on a GPU of an 8192^3 torch product there (after a warm-up)."""
    if threads.gpu:
        n = 8192
        X, Y = (torch.randn(n, n, dtype=torch.float64, device="cuda") for _ in range(2))
        X @ Y
        best = np.inf
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            X @ Y
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return {threads.default: 2 * n**3 / best}
    n = 2500
    rng = np.random.default_rng(7)
    X, Y = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    rates = {}
    for count in threads.counts():
        threads.set(count)
        best = np.inf
        for f in (lambda: X @ Y, lambda: Xt @ Yt):
            for _ in range(3):
                t0 = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t0)
        rates[count] = 2 * n**3 / best
    threads.reset()
    return rates


def fmt_time(s: float) -> str:
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 600:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def time_batched(models, inner: str, threads: Threads, device: str | None
                 ) -> tuple[SimilarityMatrix, list[float], dict[int, float], int]:
    ts.similarity_matrix(models, inner=inner, device=device, progress=False)  # warm-up (untimed)
    probes = {}
    for count in threads.counts():
        threads.set(count)
        probes[count] = float("inf")
        for _ in range(PROBE_CALLS):  # the faster of a few: one slow call must not pick the count
            t0 = time.perf_counter()
            ts.similarity_matrix(models, inner=inner, device=device, progress=False)
            probes[count] = min(probes[count], time.perf_counter() - t0)
    best = min(probes, key=probes.get)
    threads.set(best)
    times, runs = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        runs.append(ts.similarity_matrix(models, inner=inner, device=device, progress=False))
        times.append(time.perf_counter() - t0)
    threads.reset()
    median_run = runs[sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]]
    return median_run, times, probes, best


# ------------------------------------------------------------------- main


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--only", metavar="TEXT", help="run only the cases whose label contains TEXT, e.g. '(256, 64'")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: numpy engine and loop (default); cuda: torch on the GPU for both")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device = "cuda" if gpu else None
    t_start = time.perf_counter()
    print(__doc__.strip().splitlines()[0])
    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
          f"cpus {os.cpu_count()}, tsalgebra {ts.__version__}; N = {N_MODELS} models, float64, seed {SEED}")
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          "(other processes on this machine share the cores; all rates are wall-clock)")
    threads = Threads(gpu)
    print(f"default threads: OpenBLAS {threads.blas.get() or 'unknown'}, torch {torch.get_num_threads()}")
    if gpu:
        print(f"device: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    mm = matmul_rate(threads)
    best_mm = dict(mm)
    print(f"float64 matmul {8192 if gpu else 2500}^3 at start: "
          + ", ".join(f"{threads.label(k)} {v / 1e9:.1f} GFLOP/s" for k, v in mm.items()))
    print()

    rows = []
    cases = [("one layer", "symmetric", c) for c in ONE_LAYER] + [("depth 3", "network", c) for c in DEPTH3]
    cases = [c for c in cases if args.only is None or args.only in f"{c[0]} {c[2]}"]
    for kind, inner, shape in cases:
        rng = np.random.default_rng(SEED)
        if kind == "one layer":
            d, h, o = shape
            models = [random_bilinear(rng, d, h, o) for _ in range(N_MODELS)]
            pair_fn, label = pair_one_layer, f"one layer (d, h, o) = {shape}"
        else:
            d, h, w, o = shape
            models = [random_stack(rng, d, h, w, o) for _ in range(N_MODELS)]
            pair_fn, label = pair_network, f"depth-3 stack (d, h, w, o) = {shape}"
        factors = [padded_blocks(m, device) if kind == "depth 3" else padded_blocks(m, device)[0] for m in models]

        mm = matmul_rate(threads)
        for k, v in mm.items():
            best_mm[k] = max(best_mm[k], v)
        res, times, b_probes, b_threads = time_batched(models, inner, threads, device)
        t_b = float(np.median(times))

        # the loop: probe with each thread count, then the full loop or a timed prefix
        probes = {}
        for count in threads.counts():
            threads.set(count)
            _, probe_t, probe_n, n_pairs = run_loop(factors, pair_fn, PROBE_SECONDS)
            probes[count] = probe_t / probe_n
        l_threads = min(probes, key=probes.get)
        threads.set(l_threads)
        est_full = probes[l_threads] * n_pairs
        budget = LOOP_SECONDS if est_full > LOOP_SECONDS else 10 * LOOP_SECONDS
        vals, t_loop_run, ran, n_pairs = run_loop(factors, pair_fn, budget)
        threads.reset()
        full = ran == n_pairs
        t_loop = t_loop_run if full else t_loop_run / ran * n_pairs
        check = loop_check(vals, res.values)
        ref = best_mm[b_threads]
        peak = max(best_mm.values())

        dom = res.dominant_step()
        cand = ", ".join(f"{c.route} {c.flops:.3g}" + ("" if c.fits else " (does not fit)") for c in res.candidates.values())
        print(f"== {label}, {inner} inner product, N = {N_MODELS} ==")
        print("matmul rate before this case: " + ", ".join(f"{threads.label(k)} {v / 1e9:.1f}"
                                                            for k, v in mm.items()) + " GFLOP/s")
        print(f"planner: candidates (flops) {cand}; chose {res.route}; {res.candidates[res.route].blocking}")
        print(f"batched probe, fastest of {PROBE_CALLS} calls in seconds by thread count: "
              + ", ".join(f"{k}: {v:.3f}" for k, v in b_probes.items())
              + f" -> timed with {b_threads}")
        print(f"batched: median {fmt_time(t_b)} (runs: {', '.join(fmt_time(t) for t in times)}); "
              f"{res.flops:.3g} flops -> {res.flops / t_b / 1e9:.1f} GFLOP/s overall; engine {res.device}")
        print("  steps of the median run: " + "; ".join(
            f"{s.name} {fmt_time(s.seconds)}, {s.flops:.3g} flops, {s.rate / 1e9:.1f} GFLOP/s" for s in res.steps))
        print(f"  dominant step: {dom.name} ({dom.seconds / sum(s.seconds for s in res.steps):.0%} of step time) at "
              f"{dom.rate / 1e9:.1f} GFLOP/s = {dom.rate / ref:.0%} of the matmul rate with {threads.label(b_threads)} "
              f"({ref / 1e9:.1f} GFLOP/s), "
              f"{dom.rate / peak:.0%} of the highest ({peak / 1e9:.1f})")
        print("loop probe, ms per pair by thread count: " + ", ".join(
            f"{k}: {v * 1e3:.3f}" for k, v in probes.items()) + f" -> ran with {l_threads}")
        if full:
            print(f"loop: all {n_pairs} pairs in {fmt_time(t_loop)} ({t_loop / n_pairs * 1e3:.3f} ms per pair)")
        else:
            print(f"loop: first {ran} of {n_pairs} pairs in {fmt_time(t_loop_run)} "
                  f"({t_loop_run / ran * 1e3:.3f} ms per pair) -> extrapolated to all pairs: {fmt_time(t_loop)}")
        print(f"  max |cosine difference| loop vs batched on the pairs the loop ran: "
              f"{'n/a' if check is None else f'{check:.2e}'}")
        speed = t_loop / t_b
        print(f"speedup batched vs loop: {speed:.3g}x")
        print()
        rows.append((label, res.route, t_b, t_loop, full, speed, dom, shape, check, ref, b_threads, l_threads))

    peak = max(best_mm.values())
    print("== summary ==")
    print("highest float64 matmul rate seen: " + ", ".join(
        f"{threads.label(k)} {v / 1e9:.1f} GFLOP/s" for k, v in best_mm.items()))
    print(f"{'case':<48} {'route':<14} {'batched':>9} {'loop':>10} {'threads':>8} {'speedup':>8} {'dominant step':>22}")
    ok_all = True
    for label, route, t_b, t_loop, full, speed, dom, shape, check, ref, bt, lt in rows:
        loop_s = fmt_time(t_loop) + ("" if full else "*")
        print(f"{label:<48} {route:<14} {fmt_time(t_b):>9} {loop_s:>10} {f'{bt}/{lt}':>8} {speed:>7.1f}x "
              f"{dom.name + f' {dom.rate / ref:.0%}':>22}")
    print("(* extrapolated from the pairs timed; threads: batched/loop; dominant step: its rate as a share of the")
    print(" matmul rate at the batched run's thread count)")
    print()
    print("targets:")
    for label, route, t_b, t_loop, full, speed, dom, shape, check, ref, bt, lt in rows:
        want = SPEEDUP_TARGETS.get(shape, 1.0)
        ok = speed >= want
        ok_all &= ok
        print(f"  {'PASS' if ok else 'FAIL'}  speedup >= {want:g}x at {label}: {speed:.3g}x")
    for label, route, t_b, t_loop, full, speed, dom, shape, check, ref, bt, lt in rows:
        ok = dom.rate >= 0.5 * ref
        ok_all &= ok
        print(f"  {'PASS' if ok else 'FAIL'}  dominant step >= 50% of matmul rate at {label}: {dom.name} "
              f"{dom.rate / ref:.0%} ({dom.rate / peak:.0%} of the highest rate at any thread count)")
    for label, route, t_b, t_loop, full, speed, dom, shape, check, ref, bt, lt in rows:
        ok = check is not None and check < 1e-10
        ok_all &= ok
        print(f"  {'PASS' if ok else 'FAIL'}  loop and batched cosines agree to 1e-10 at {label}")
    print(f"all targets met: {ok_all}")
    print(f"total script time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
