"""Grokking modular addition, seen by tensor similarity.

A one-layer bilinear model ``down((left x) * (right x))`` (no biases) reads
a pair (a, b) as two concatenated one-hot vectors (input width 2P) and
predicts (a + b) mod P.  It is trained full-batch with AdamW and weight decay
on a random share of the P^2 pairs, first memorizing the training split and
later generalizing ("grokking").  A checkpoint is saved every few steps in
tsalgebra's native safetensors layout and read back with
:func:`tsalgebra.load`.

Over all checkpoint pairs the demo computes:

- tensor similarity, symmetric inner product (the paper's one-layer formula),
- tensor similarity, centred Gaussian inner product (for bias-free one-layer
  models this equals the symmetric one up to round-off: a built-in check),
- logit cosine: cosine of the concatenated logits on all P^2 inputs (the
  behaviour over all inputs), computed from the weights as the similarity
  under the token measure (two uniform one-hot tokens) and checked against
  the logits of every input, run through the models; uncentred (also
  reported centred: each output's mean over inputs removed),
- flattened-weight cosine (basis-dependent baseline),

and reports the Pearson correlation between tensor similarity and logit
cosine across checkpoint pairs (the paper: 0.998 at P = 113), the
similarity of the first and last checkpoints, and a figure.

Defaults follow the paper (P = 113, width 64, 30 % training split, weight
decay 0.3) with a learning rate of 1e-2 so that grokking happens within
about a thousand full-batch steps on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..baselines import weight_cosine
from ..matrix import similarity_matrix
from ..measure import Tokens
from ..plots import pyplot
from .common import (TRAINING_SIZES, Checks, DemoResult, Size, Written, advising_memory, check_finite,
                     cosine_matrix, demo_main, labelled_steps, optimizer_step, pearson, plot_cosines, sizes_advice,
                     start, torch_threads, training_bar, upper, write_outputs)

__all__ = ["GrokkingConfig", "run", "add_arguments", "config_from_args", "main", "memory_advice"]


@dataclass
class GrokkingConfig:
    """Settings of the grokking demo (command-line flags of the same names)."""

    modulus: int = 113
    width: int = 64
    train_fraction: float = 0.3
    weight_decay: float = 0.3
    lr: float = 1e-2
    steps: int = 2000
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 1
    out: Path = Path("grokking-demo")
    progress: bool | None = None  # None: bars on a terminal only

    def check(self, python: bool = False) -> None:
        """ValueError for a setting out of range, named by its flag (the
        keyword with ``python``), before any training."""
        c = Checks(self, python)
        p = c.integer("modulus", 3, 10**5)  # (far beyond any memory: the P^2 inputs are P^3 numbers)
        if any(p % k == 0 for k in range(2, math.isqrt(p) + 1)):
            raise ValueError(f"{c.name('modulus')} must be a prime >= 3, got {p}")
        c.integer("width")
        c.number("train_fraction", 0, True, below=1)
        if _n_train(self) >= p * p:
            raise ValueError(f"{c.given('train_fraction')} takes all {p * p} pairs at {c.given('modulus')}, leaving "
                             "none to test on: lower it")
        c.number("weight_decay", 0, False)
        c.number("lr", 0, True)
        c.integer("steps")
        c.integer("checkpoint_every")
        if self.steps // self.checkpoint_every < 2:
            raise ValueError(f"need at least 3 checkpoints: lower {c.name('checkpoint_every')} or raise "
                             f"{c.name('steps')}")
        c.seed()
        c.threads()
        c.progress()
        c.out(("grokking.png", "summary.txt", "summary.json"), demo="grokking")
        # every size against the memory it takes (the P^2 inputs, every checkpoint's logits on them, the models
        # and their activations) and the disk its checkpoints take: refused now, not after the training
        c.fits_machine("grokking", _need, _disk, SIZES,
                       lambda cfg: f"the inputs and the logits of {_checkpoints(cfg):,} checkpoints on all "
                                   f"{cfg.modulus**2:,} of them, the models and their activations",
                       _checkpoints)
        refused = _tokens_refusal(p, self.width)
        if refused is not None:  # the logit cosine from the weights, refused after the training: refused now
            fit = _widest_planned(p, self.width)
            raise ValueError(f"{c.given('width')}: refused before the training, as the logit cosine under the token "
                             f"measure would be after it: {refused.reason}"
                             + (f". Alternatives: {c.given('width', fit)} (the largest whose analysis plans within "
                                "the limits)" if fit else ""))


# the settings that size a run's memory and disk (checked before the training, and said after an allocation
# the machine refused)
SIZES = (Size("modulus", least=3, valid=lambda cfg, v: _largest_prime(v), said="the largest prime that fits"),
         Size("width"),
         *TRAINING_SIZES)


def memory_advice(python: bool = False) -> str:
    """What lowers a run's memory, in the caller's spelling (:func:`~.common.sizes_advice`)."""
    return sizes_advice(SIZES, python)


def _n_train(cfg: GrokkingConfig) -> int:
    return max(1, int(round(cfg.train_fraction * cfg.modulus**2)))


def _checkpoints(cfg: GrokkingConfig) -> int:
    """Checkpoints written: step 0, every ``checkpoint_every``, and the last step."""
    return 1 + cfg.steps // cfg.checkpoint_every + (cfg.steps % cfg.checkpoint_every != 0)


def _bytes(p: int, checkpoints: int, width: int = 0) -> int:
    """About the bytes of a run's largest arrays: the P^2 x 2P inputs (float32 twice, float64 once), each
    checkpoint's P^2 x P logits (raw and centred, float64) and two of those for the checkpoint at hand; with
    ``width``, also every checkpoint's model (float64, read back), the model in training (float32, with its
    gradient and AdamW's two moments) and its copies while saved, the activations of the P^2 inputs (three
    float64 P^2 x width arrays: above the training's, float32) and the matrices over the checkpoint pairs."""
    return p**3 * (48 + 16 * checkpoints) + p * width * (40 * checkpoints + 160) + 24 * p * p * width \
        + 64 * checkpoints**2


def _need(cfg: "GrokkingConfig") -> int:
    """The memory a run of ``cfg`` takes, about (:func:`_bytes`)."""
    return _bytes(cfg.modulus, _checkpoints(cfg), cfg.width)


def _disk(cfg: "GrokkingConfig") -> int:
    """The bytes of the checkpoints a run writes (float64 weights, and a header)."""
    return _checkpoints(cfg) * (40 * cfg.modulus * cfg.width + 512)


@functools.lru_cache(maxsize=64)  # checked by the command line and again by run(): planned once
def _tokens_refusal(p: int, width: int) -> Any | None:
    """The CostError of the logit cosine under the token measure at these sizes, or None where it plans: each
    pair of its matrix is planned as ts.similarity plans it (the pairwise route), from shapes, so two
    stand-ins of these shapes plan as any two checkpoints."""
    from ..components import Bilinear
    from ..inner import plan_similarity
    from ..problem import CostError

    rng = np.random.default_rng(0)
    a, b = (Bilinear(rng.standard_normal((width, 2 * p)), rng.standard_normal((width, 2 * p)),
                     rng.standard_normal((p, width))) for _ in range(2))
    refused = [x for _, x in plan_similarity(a, b, measure=Tokens(p, 2)).products if isinstance(x, CostError)]
    return refused[0] if refused else None


def _widest_planned(p: int, width: int) -> int | None:
    """The largest width below ``width`` whose token-measure analysis plans (the cost grows with it: a
    bisection), or None when not even width 1 does."""
    if width <= 1 or _tokens_refusal(p, 1) is not None:
        return None
    lo, hi = 1, width  # plans at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _tokens_refusal(p, mid) is None else (lo, mid)
    return lo


def _largest_prime(n: int) -> int | None:
    """The largest prime <= ``n``; None below 3 (the smallest modulus)."""
    while n >= 3 and any(n % k == 0 for k in range(2, math.isqrt(n) + 1)):
        n -= 1
    return n if n >= 3 else None


def dataset(p: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """All P^2 pairs as concatenated one-hots (P^2, 2P) and their labels (a + b) mod P."""
    import torch
    from torch import nn

    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.cat([nn.functional.one_hot(a, p), nn.functional.one_hot(b, p)], dim=1).float()
    return x, (a + b) % p


def _train(cfg: GrokkingConfig, ckdir: Path, written: Written | None = None) -> dict[str, Any]:
    """Train, writing each checkpoint into ``ckdir`` (recorded by ``written``: the paths read back)."""
    import torch
    from torch import nn

    from ..adapters import BilinearLayer, from_torch
    from ..io import save

    p = cfg.modulus
    x, y = dataset(p)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(p * p, generator=gen)
    n_train = _n_train(cfg)
    tr, te = perm[:n_train], perm[n_train:]
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = BilinearLayer(2 * p, cfg.width, p, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    eval_every = max(1, cfg.steps // 250)
    curve: dict[str, list[float]] = {"step": [], "train_acc": [], "test_acc": [], "train_loss": []}

    def evaluate(step: int, loss: float) -> None:
        with torch.no_grad():
            pred = model(x).argmax(1)
        curve["step"].append(step)
        curve["train_acc"].append(float((pred[tr] == y[tr]).float().mean()))
        curve["test_acc"].append(float((pred[te] == y[te]).float().mean()))
        curve["train_loss"].append(loss)

    def checkpoint(step: int) -> None:
        check_finite(cfg, step, model=model)
        name = f"step_{step}.safetensors"
        save(from_torch(model), written.path(name) if written else ckdir / name, metadata={"step": str(step)})

    with torch.no_grad():
        loss_v = float(nn.functional.cross_entropy(model(x[tr]), y[tr]))
    evaluate(0, loss_v)
    checkpoint(0)
    with training_bar(cfg.steps, "training", cfg.progress) as bar:
        for step in range(1, cfg.steps + 1):
            loss = nn.functional.cross_entropy(model(x[tr]), y[tr])
            check_finite(cfg, step, loss)  # a diverged run stops here, naming the learning rate
            opt.zero_grad()
            loss.backward()
            optimizer_step(opt, cfg, step)
            if step % eval_every == 0 or step == cfg.steps:
                evaluate(step, loss.item())
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step)
            bar.update(1)
    return {"curve": curve, "n_train": n_train, "n_test": p * p - n_train}


def _first(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    for s, v in zip(steps, values):
        if v >= threshold:
            return int(s)
    return None


def _when(step: int | None) -> str:
    return "never (within the run)" if step is None else f"from step {step}"


def _nearest(ck_steps: Sequence[int], step: int | None) -> int | None:
    """Index of the first checkpoint at or after ``step``."""
    if step is None:
        return None
    for k, s in enumerate(ck_steps):
        if s >= step:
            return k
    return None


def _figure(path: Path, steps: list[int], mats: dict[str, np.ndarray], curve: dict[str, list[float]],
            r: float, cfg: GrokkingConfig) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.2))
    labels = [str(s) for s in steps]
    for ax, name, title in ((axes[0, 0], "tensor (symmetric)", "tensor similarity (symmetric)"),
                            (axes[0, 1], "logit cosine", f"logit cosine (all {cfg.modulus}^2 inputs, token measure)"),
                            (axes[0, 2], "weight cosine", "flattened-weight cosine")):
        m = mats[name]
        plot_cosines(m, ax, labels=labels, col_labels=labels, title=title)
    ax = axes[1, 0]
    ax.plot(curve["step"], curve["train_acc"], label="train")
    ax.plot(curve["step"], curve["test_acc"], label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for name, m in mats.items():
        style = "--" if "gaussian" in name else "-"
        ax.plot(steps, m[-1], style, label=name, marker="." if "gaussian" not in name else None)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("similarity to the final checkpoint")
    ax.set_title("similarity to the final checkpoint", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    ax.scatter(upper(mats["logit cosine"]), upper(mats["tensor (symmetric)"]), s=6)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.6)
    ax.set_xlabel("logit cosine")
    ax.set_ylabel("tensor similarity (symmetric)")
    ax.set_title(f"checkpoint pairs: Pearson r = {r:.4f}", fontsize=9)
    fig.suptitle(f"grokking: P = {cfg.modulus}, width {cfg.width}, {cfg.train_fraction:.0%} train, "
                 f"weight decay {cfg.weight_decay}, {cfg.steps} steps", fontsize=11)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


@advising_memory(memory_advice)
def run(cfg: GrokkingConfig | None = None, **overrides: Any) -> DemoResult:
    """Train, checkpoint, compare, and write ``grokking.png``,
    ``summary.txt``, ``summary.json`` and ``checkpoints/`` under ``cfg.out``.
    Keyword overrides replace config fields.  Returns the :class:`DemoResult`
    whose ``numbers`` hold every figure printed in the summary."""
    cfg = cfg or GrokkingConfig()
    from ..io import Checkpoints, load

    written = start(cfg, overrides, "grokking")
    ckdir = written.ckdir
    started = time.perf_counter()
    out = cfg.out
    with torch_threads(cfg.threads):
        trained = _train(cfg, ckdir, written)
    t_train = time.perf_counter() - started

    paths = list(written.paths)  # the checkpoints this run wrote, in step order: never another file in the folder
    steps = labelled_steps(paths)
    models = Checkpoints([load(f) for f in paths], paths)
    p = cfg.modulus
    x = dataset(p)[0].numpy().astype(np.float64)
    logits = np.empty((len(models), p * p * p))
    centred = np.empty_like(logits)
    for k, m in enumerate(models):
        out_k = np.asarray(m(x))
        logits[k] = out_k.ravel()
        centred[k] = (out_k - out_k.mean(0)).ravel()
    t0 = time.perf_counter()
    sym = similarity_matrix(models, inner="symmetric", progress=cfg.progress)
    gau = similarity_matrix(models, inner="gaussian", centered=True, progress=cfg.progress)
    t_ts = time.perf_counter() - t0
    t0 = time.perf_counter()
    behaviour = similarity_matrix(models, measure=Tokens(p, 2), progress=cfg.progress)  # every input, none run
    t_tokens = time.perf_counter() - t0
    enumerated = cosine_matrix(logits)
    n = len(models)
    wmat = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            wmat[i, j] = wmat[j, i] = weight_cosine(models[i], models[j])
    mats = {
        "tensor (symmetric)": np.asarray(sym.values),
        "tensor (centred gaussian)": np.asarray(gau.values),
        "logit cosine": np.asarray(behaviour.values),
        "weight cosine": wmat,
    }
    logit_c = cosine_matrix(centred)
    r_sym = pearson(upper(mats["tensor (symmetric)"]), upper(mats["logit cosine"]))
    r_gau = pearson(upper(mats["tensor (centred gaussian)"]), upper(mats["logit cosine"]))
    r_sym_c = pearson(upper(mats["tensor (symmetric)"]), upper(logit_c))
    r_w = pearson(upper(mats["weight cosine"]), upper(mats["logit cosine"]))
    curve = trained["curve"]
    mem_step = _first(curve["step"], curve["train_acc"], 0.99)
    grok_step = _first(curve["step"], curve["test_acc"], 0.95)
    k_mem = _nearest(steps, mem_step)
    figure = out / "grokking.png"
    _figure(figure, steps, mats, curve, r_sym, cfg)

    def row(i: int, j: int) -> dict[str, float]:
        d = {k: float(m[i, j]) for k, m in mats.items()}
        d["logit cosine (centred)"] = float(logit_c[i, j])
        return d

    first_last = row(0, n - 1)
    mem_last = row(k_mem, n - 1) if k_mem is not None else None
    numbers: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "n_train": trained["n_train"], "n_test": trained["n_test"], "checkpoints": n, "steps": steps,
        "final_train_acc": curve["train_acc"][-1], "final_test_acc": curve["test_acc"][-1],
        "memorized_step": mem_step, "grokked_step": grok_step,
        "first_vs_last": first_last, "memorized_vs_last": mem_last,
        "pearson_tensor_symmetric_vs_logit": r_sym, "pearson_tensor_gaussian_vs_logit": r_gau,
        "pearson_tensor_symmetric_vs_centred_logit": r_sym_c, "pearson_weight_vs_logit": r_w,
        "max_abs_symmetric_minus_centred_gaussian": float(np.max(np.abs(mats["tensor (symmetric)"]
                                                                        - mats["tensor (centred gaussian)"]))),
        "max_abs_tokens_minus_enumerated_logit_cosine": float(np.max(np.abs(mats["logit cosine"] - enumerated))),
        "routes": {"symmetric": sym.route, "gaussian": gau.route, "tokens": behaviour.route},
        "similarity_to_final": {k: m[-1].tolist() for k, m in mats.items()},
        "train_seconds": round(t_train, 2), "tensor_similarity_seconds": round(t_ts, 2),
        "token_similarity_seconds": round(t_tokens, 2),
    }

    def fmt(d: dict[str, float] | None) -> str:
        if d is None:
            return "n/a"
        return (f"tensor {d['tensor (symmetric)']:.4f} (symmetric) / {d['tensor (centred gaussian)']:.4f} "
                f"(centred gaussian), logit cosine {d['logit cosine']:.4f} (centred {d['logit cosine (centred)']:.4f}), "
                f"weight cosine {d['weight cosine']:.4f}")

    lines = [
        f"grokking demo: modular addition mod P = {p}, one bilinear layer of width {cfg.width} on one-hot pairs "
        f"(input width {2 * p}), no biases",
        f"  AdamW lr {cfg.lr} weight decay {cfg.weight_decay}, full batch, {cfg.steps} steps; "
        f"train split {trained['n_train']} of {p * p} pairs ({cfg.train_fraction:.0%}); {n} checkpoints "
        f"every {cfg.checkpoint_every} steps (training {t_train:.1f} s)",
        f"  train accuracy >= 0.99 {_when(mem_step)}; test accuracy >= 0.95 {_when(grok_step)}; "
        f"final train {curve['train_acc'][-1]:.3f}, test {curve['test_acc'][-1]:.3f}",
        f"first (step {steps[0]}) vs last (step {steps[-1]}) checkpoint: {fmt(first_last)}",
        f"memorized (step {steps[k_mem] if k_mem is not None else 'n/a'}) vs last: {fmt(mem_last)}",
        f"Pearson r across {n * (n - 1) // 2} checkpoint pairs, against logit cosine (uncentred): "
        f"tensor symmetric {r_sym:.4f}, tensor centred gaussian {r_gau:.4f}, weight cosine {r_w:.4f}; "
        f"tensor symmetric vs centred logit cosine {r_sym_c:.4f}  (paper, P = 113: 0.998)",
        f"check: symmetric and centred gaussian tensor similarity agree to "
        f"{numbers['max_abs_symmetric_minus_centred_gaussian']:.1e} (equal for bias-free one-layer models); "
        f"tensor similarities took {t_ts:.1f} s via {sym.route}",
        f"check: the logit cosine over all {p * p} inputs, computed from the weights under the token measure "
        f"({t_tokens:.1f} s via {behaviour.route}), equals the logits of every input run through the models to "
        f"{numbers['max_abs_tokens_minus_enumerated_logit_cosine']:.1e}",
        f"what tensor similarity adds here: a basis-free statement about the whole function, which follows the "
        f"behaviour on all inputs (r = {r_sym:.4f}) where the flattened-weight cosine, a property of the "
        f"coordinates, follows it less (r = {r_w:.4f}); what it does not: for this one-layer model on one-hot "
        f"inputs the behaviour over all inputs is itself computable from the weights (the token measure above), "
        f"so the Gaussian and symmetric numbers are a different question, not a better answer to that one",
    ]
    return write_outputs("grokking", out, "\n".join(lines), numbers, figure, ckdir, started)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (shared by ``tsalgebra demo grokking`` and ``python -m tsalgebra.demos.grokking``)."""
    d = GrokkingConfig()
    parser.add_argument("--modulus", "-P", type=int, default=d.modulus, help=f"prime modulus P (default {d.modulus})")
    parser.add_argument("--width", type=int, default=d.width, help=f"hidden width (default {d.width})")
    parser.add_argument("--train-fraction", type=float, default=d.train_fraction,
                        help=f"share of the P^2 pairs used for training (default {d.train_fraction})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"full-batch training steps (default {d.steps})")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help=f"steps between checkpoints (default {d.checkpoint_every})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads while training (default 1: fastest for this size)")
    parser.add_argument("--out", type=Path, default=d.out, help=f"output directory (default {d.out})")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they show on a terminal only)")


def config_from_args(args: argparse.Namespace) -> GrokkingConfig:
    return GrokkingConfig(args.modulus, args.width, args.train_fraction, args.weight_decay, args.lr, args.steps,
                          args.checkpoint_every, args.seed, args.threads, args.out,
                          False if args.no_progress else None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tsalgebra.demos.grokking``: ``tsalgebra demo grokking`` with these arguments."""
    return demo_main("grokking", argv)


if __name__ == "__main__":
    sys.exit(main())
