"""Tiled similarity matrices: serial against a local dask cluster, same run.

What it measures
----------------
1. N one-layer bilinear models at (d_in, hidden, out) = (1024, 64, 10), the
   symmetric inner product (batched routes): the serial matrix against the
   same matrix in tiles on a ``LocalCluster`` of 2 worker processes (1 thread
   each), and in tiles in this process (the cost of tiling alone).
2. 50 small bilinear-attention models (d_model 8, 2 heads of 4, 4 positions,
   causal, rotary, biases; the exact Gaussian, pair by pair): serial against
   the 2-worker cluster.

3. One tile of the papers' language-model matrix: three two-layer
   bilinear-attention models at the reference's scale (vocabulary 4,096,
   d_model 128, 8 heads of 16, 4 positions; benchmarks/closure_deep.py
   builds them), Gaussian by closure: the time per product, and from it the
   wall time of the 100-checkpoint matrix (5,050 products) on k machines
   like this one.

For each: wall times, the tiles and their routes, the worker seconds, the
speed-up over serial and the efficiency (speed-up / workers), and the time
per tile and per pair a cluster of k machines would divide (printed, for the
estimate in docs/user-guide.md, "Beyond one machine").

Run:  python benchmarks/cluster.py [--n 200] [--attention 50] [--workers 2] [--no-lm]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tsalgebra as ts


def one_layer(n: int) -> list[ts.Bilinear]:
    rng = np.random.default_rng(0)
    s = 1024 ** -0.5
    return [ts.Bilinear(rng.normal(size=(64, 1024)) * s, rng.normal(size=(64, 1024)) * s,
                        rng.normal(size=(10, 64)) / 8) for _ in range(n)]


def attention(n: int) -> list[ts.BilinearAttention]:
    rng = np.random.default_rng(1)
    w = lambda *s: rng.normal(size=s) * 0.5  # noqa: E731
    return [ts.BilinearAttention(w(2, 4, 8), w(2, 4, 8), w(2, 4, 8), w(2, 4, 8), w(2, 4, 8), w(2, 8, 4),
                                 causal=True, rotary_base=100.0, n_ctx=4, q1_bias=w(2, 4), k1_bias=w(2, 4))
            for _ in range(n)]


def timed(fn):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compare(name: str, models: list, kw: dict, workers: int, client) -> None:  # noqa: ANN001
    n = len(models)
    pairs = n * (n + 1) // 2
    serial, t_serial = timed(lambda: ts.similarity_matrix(models, progress=False, **kw))
    local, t_local = timed(lambda: ts.similarity_matrix(models, progress=False, store=_tmp(), **kw))
    tiled, t_cluster = timed(lambda: ts.similarity_matrix(models, client=client, progress=False, **kw))
    err = float(np.max(np.abs(tiled.values - serial.values)))
    r = tiled.tiles
    print(f"\n{name}: N = {n} ({pairs} products), {kw}")
    print(f"  serial                      {t_serial:8.2f} s   route {serial.route}")
    print(f"  tiles in this process       {t_local:8.2f} s   {local.tiles.total} tiles of {local.tiles.size} "
          f"(ratio to serial {t_local / t_serial:.2f})")
    print(f"  tiles on {workers} workers          {t_cluster:8.2f} s   {r.total} tiles of {r.size}, routes "
          f"{dict(r.routes)}, worker seconds {r.worker_seconds:.2f}")
    print(f"  speed-up {t_serial / t_cluster:.2f}x, efficiency {t_serial / t_cluster / workers:.0%}; "
          f"max |tiled - serial| = {err:.1e}")
    print(f"  per tile {r.worker_seconds / r.total:.3f} s on a worker, per product "
          f"{r.worker_seconds / pairs * 1e3:.2f} ms; overhead (wall - worker seconds / workers) "
          f"{t_cluster - r.worker_seconds / workers:.2f} s")


def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tsalgebra-bench-store-")


def lm_tile() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from closure_deep import transformer

    models = [ts.from_torch(transformer(seed, 128, 8, 16, 4, 0.35, True, vocab=4096)) for seed in range(3)]
    m, t = timed(lambda: ts.similarity_matrix(models, inner="gaussian", method="closure", measure=ts.Gaussian(),
                                              store=_tmp(), tile=3, progress=False))
    per = m.tiles.worker_seconds / 6
    print(f"\nlanguage-model tile (vocab 4096, d_model 128, 8 x 16 heads, 4 positions, 2 layers; closure): 3 models, "
          f"6 products in {t:.1f} s: {per:.2f} s per product on this machine (2 cores)")
    total = 100 * 101 // 2
    print(f"  100 checkpoints ({total} products): " + ", ".join(
        f"{k} machine{'s' if k > 1 else ''} {total * per / k / 60:.0f} min" for k in (1, 4, 16, 64)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--attention", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-lm", action="store_true", help="skip the language-model tile")
    args = p.parse_args()
    from dask.distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        print(f"local cluster of {args.workers} workers started in {time.perf_counter() - t0:.1f} s "
              "(not counted below)")
        compare("one-layer (1024, 64, 10), symmetric", one_layer(args.n), dict(inner="symmetric"), args.workers,
                client)
        compare("attention (d_model 8, 2 x 4 heads, 4 positions), exact Gaussian", attention(args.attention),
                dict(inner="gaussian"), args.workers, client)
    if not args.no_lm:
        lm_tile()


if __name__ == "__main__":
    main()
