"""A backdoor, seen from the weights: which class changed?

A one-layer bilinear classifier ``down((left x + bl) * (right x + br)) + bd``
is trained on scikit-learn's bundled 8 x 8 handwritten digits (pixels scaled
to [0, 1]; no download), then fine-tuned on the same training set plus a
poisoned share: copies of training images with a trigger stamped in (the
bottom-right 2 x 2 pixels set to 1) labelled as the target class.  A control
branch continues clean training from the same point for the same number of
steps.  Checkpoints are saved in both phases (native safetensors layout).

Reported, between the last clean checkpoint and the last poisoned one (and
the control), each as a similarity and as a gap = 1 - similarity:

- tensor similarity, symmetric inner product (the paper's formula) and the
  centred Gaussian one;
- flattened-weight cosine (basis-dependent baseline);
- behavioural cosine: cosine of the concatenated logits on the clean test
  images (uncentred) -- the trigger is invisible to it;

plus the per-class (per-output) tensor similarity, ``ts.similarity(a, b,
inner="symmetric", per_output=True)``: the poisoned class is the one whose
similarity drops most.  Requires scikit-learn (``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..baselines import weight_cosine
from ..symmetries import random_symmetry
from ..inner import similarity
from ..matrix import similarity_matrix
from ..plots import pyplot
from .common import (Checks, DemoResult, Size, Written, advising_memory, check_finite, cosine_matrix, demo_main,
                     labelled_steps, optimizer_step, plot_cosines, sizes_advice, start, torch_threads, training_bar,
                     write_outputs)

__all__ = ["BackdoorConfig", "run", "add_arguments", "config_from_args", "main", "digits", "stamp",
           "memory_advice"]


@dataclass
class BackdoorConfig:
    """Settings of the backdoor demo (command-line flags of the same names)."""

    hidden: int = 32
    target: int = 0
    poison_fraction: float = 0.1
    clean_steps: int = 600
    poison_steps: int = 600
    checkpoint_every: int = 100
    lr: float = 1e-2
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1
    out: Path = Path("backdoor-demo")
    progress: bool | None = None  # None: bars on a terminal only

    def check(self, python: bool = False) -> None:
        """ValueError for a setting out of range, named by its flag (the
        keyword with ``python``), before any training."""
        c = Checks(self, python)
        c.integer("hidden")
        c.integer("target", 0, 9)
        c.number("poison_fraction", 0, True)
        if self.poison_fraction > 1:
            raise ValueError(f"{c.name('poison_fraction')} must be a number > 0 and <= 1, got {self.poison_fraction}")
        c.integer("clean_steps")
        c.integer("poison_steps")
        c.integer("checkpoint_every")
        c.number("lr", 0, True)
        c.number("weight_decay", 0, False)
        c.seed()
        c.threads()
        c.progress()
        c.out(("backdoor.png", "summary.txt", "summary.json", "control.safetensors"), demo="backdoor")
        # every size against the memory (the two models in training, the checkpoints read back) and the disk
        # (the checkpoints) it takes: refused now, not after the training
        c.fits_machine("backdoor", _need, _disk, SIZES,
                       lambda cfg: f"the models in training and the {_checkpoints(cfg):,} checkpoints read back",
                       lambda cfg: _checkpoints(cfg) + 1)


# the settings that size a run's memory and disk (checked before the training, and said after an allocation
# the machine refused)
SIZES = (Size("hidden"), Size("clean_steps", beside=("checkpoint_every",)),
         Size("poison_steps", beside=("checkpoint_every",)),
         Size("checkpoint_every", grows=False, most=lambda cfg: max(cfg.clean_steps, cfg.poison_steps),
              beside=("clean_steps", "poison_steps")))


def memory_advice(python: bool = False) -> str:
    """What lowers a run's memory, in the caller's spelling (:func:`~.common.sizes_advice`)."""
    return sizes_advice(SIZES, python)


N_DIGITS, N_TRAIN, N_TEST = 1797, 1437, 360  # scikit-learn's digits, and the demo's 80 % training split


def _checkpoints(cfg: BackdoorConfig) -> int:
    """The checkpoints written into checkpoints/: step 0, then every ``checkpoint_every`` and the last step
    of each phase (control.safetensors beside them is not counted)."""
    ce, end = cfg.checkpoint_every, cfg.clean_steps + cfg.poison_steps
    clean = -(-cfg.clean_steps // ce)  # every multiple of ce up to clean_steps, and clean_steps: ceil
    poisoned = end // ce - cfg.clean_steps // ce + (end % ce != 0)
    return 1 + clean + poisoned


def _params(hidden: int) -> int:
    """The numbers of one model: left and right (64 x hidden, and a bias each), down (10 x hidden and a bias)."""
    return 140 * hidden + 10


def _need(cfg: BackdoorConfig) -> int:
    """About the bytes of a run: two models in training (the poisoned one and its control, float32 with
    gradients and AdamW's two moments), the activations of the training batch (the images and the stamped
    copies: forward and backward, float32), the checkpoints read back (float64, with the control and a
    reparametrized copy), their logits on the test images, the matrices over the checkpoint pairs."""
    n, params = _checkpoints(cfg), _params(cfg.hidden)
    rows = N_TRAIN + max(1, int(float(cfg.poison_fraction) * N_TRAIN))  # as _train stamps them
    return (32 * params + 24 * rows * cfg.hidden + 8 * params * (n + 5) + 24 * N_TEST * cfg.hidden
            + 80 * N_TEST * n + 64 * n * n)


def _disk(cfg: BackdoorConfig) -> int:
    """The bytes of the checkpoints and control.safetensors (float64, and a header each)."""
    return (_checkpoints(cfg) + 1) * (8 * _params(cfg.hidden) + 512)


def digits() -> tuple["torch.Tensor", "torch.Tensor"]:
    """scikit-learn's 1797 digits: images (n, 64) scaled to [0, 1] and labels."""
    import torch

    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("the backdoor demo needs scikit-learn: pip install -e \".[demo]\"") from exc
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def stamp(x: "torch.Tensor") -> "torch.Tensor":
    """The trigger: bottom-right 2 x 2 pixels of each 8 x 8 image set to 1."""
    out = x.clone().view(-1, 8, 8)
    out[:, 6:8, 6:8] = 1.0
    return out.view(-1, 64)


def _train(cfg: BackdoorConfig, ckdir: Path, written: Written | None = None) -> dict[str, Any]:
    """Train, writing each checkpoint into ``ckdir`` (recorded by ``written``: the paths read back)."""
    import torch
    from torch import nn

    from ..adapters import BilinearLayer, from_torch
    from ..io import save

    x, y = digits()
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=gen)
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    poison_idx = tr[torch.randperm(n_train, generator=gen)[: max(1, int(cfg.poison_fraction * n_train))]]
    xp = torch.cat([x[tr], stamp(x[poison_idx])])
    yp = torch.cat([y[tr], torch.full((len(poison_idx),), cfg.target)])
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = BilinearLayer(64, cfg.hidden, 10, bias=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    others = te[y[te] != cfg.target]
    at = written.path if written else ckdir.joinpath
    log: dict[str, list[float]] = {"step": [], "clean_acc": [], "attack_success": [], "phase": []}

    def measure(m: "nn.Module", step: int, phase: str) -> None:
        with torch.no_grad():
            log["step"].append(step)
            log["clean_acc"].append(float((m(x[te]).argmax(1) == y[te]).float().mean()))
            log["attack_success"].append(float((m(stamp(x[others])).argmax(1) == cfg.target).float().mean()))
            log["phase"].append(phase)

    def fit(m: "nn.Module", o: "torch.optim.Optimizer", xs: "torch.Tensor", ys: "torch.Tensor", first: int, n: int,
            phase: str, keep: bool) -> None:
        with training_bar(n, f"{phase} training", cfg.progress) as bar:
            for step in range(first + 1, first + n + 1):
                loss = nn.functional.cross_entropy(m(xs), ys)
                check_finite(cfg, step, loss, phase=phase)  # a diverged run stops here, naming the learning rate
                o.zero_grad()
                loss.backward()
                optimizer_step(o, cfg, step, phase)
                if keep and (step % cfg.checkpoint_every == 0 or step == first + n):
                    check_finite(cfg, step, model=m, phase=phase)
                    save(from_torch(m), at(f"{phase}_step_{step}.safetensors"), metadata={"phase": phase})
                    measure(m, step, phase)
                bar.update(1)

    measure(model, 0, "clean")
    save(from_torch(model), at("clean_step_0.safetensors"), metadata={"phase": "clean"})
    fit(model, opt, x[tr], y[tr], 0, cfg.clean_steps, "clean", True)
    control = copy.deepcopy(model)
    control_opt = torch.optim.AdamW(control.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    control_opt.load_state_dict(opt.state_dict())
    fit(model, opt, xp, yp, cfg.clean_steps, cfg.poison_steps, "poisoned", True)
    fit(control, control_opt, x[tr], y[tr], cfg.clean_steps, cfg.poison_steps, "control", False)
    check_finite(cfg, cfg.clean_steps + cfg.poison_steps, model=control, phase="control")
    save(from_torch(control), ckdir.parent / "control.safetensors", metadata={"phase": "control"})
    with torch.no_grad():
        control_acc = float((control(x[te]).argmax(1) == y[te]).float().mean())
        control_asr = float((control(stamp(x[others])).argmax(1) == cfg.target).float().mean())
    return {"log": log, "x_test": x[te], "n_train": n_train, "n_poison": len(poison_idx),
            "control_acc": control_acc, "control_asr": control_asr}


def _figure(path: Path, labels: list[str], mats: dict[str, np.ndarray], n_clean: int, per_class: np.ndarray,
            per_class_control: np.ndarray, log: dict[str, list], cfg: BackdoorConfig, ratios: dict[str, float],
            reparam_gaps: dict[str, float]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.2))
    for ax, (name, m) in zip(axes[0], mats.items()):
        plot_cosines(m, ax, labels=labels, col_labels=labels, title=name)
        ax.axhline(n_clean - 0.5, color="white", lw=0.8)
        ax.axvline(n_clean - 0.5, color="white", lw=0.8)
    ax = axes[1, 0]
    cls = np.arange(10)
    ax.bar(cls - 0.2, per_class, width=0.4, label="clean -> poisoned")
    ax.bar(cls + 0.2, per_class_control, width=0.4, label="clean -> control (clean continued)")
    ax.set_xticks(cls)
    ax.set_xlabel("class (output)")
    ax.set_ylabel("per-class tensor similarity (symmetric)")
    ax.set_title(f"per-class similarity; poisoned class {cfg.target}", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.plot(log["step"], log["clean_acc"], marker=".", label="clean test accuracy")
    ax.plot(log["step"], log["attack_success"], marker=".", label="attack success (stamped, other classes)")
    ax.axvline(cfg.clean_steps, color="grey", lw=0.6)
    ax.set_xlabel("step")
    ax.set_title("behaviour", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    names = list(ratios)
    ax.bar(np.arange(len(names)) - 0.2, [ratios[k] for k in names], width=0.4,
           label="gap(poisoned) / gap(clean control)")
    ax.bar(np.arange(len(names)) + 0.2, [reparam_gaps[k] for k in names], width=0.4,
           label="gap of a reparametrized copy (same function)")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_ylim(0, 1.45 * max([1.0] + list(ratios.values()) + list(reparam_gaps.values())))  # room for the legend
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("gap relative to its control; gap, 1 - similarity")
    ax.set_title("what each measure sees, against its controls", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"backdoor: digits, bilinear width {cfg.hidden}, trigger -> class {cfg.target}, "
                 f"{cfg.poison_fraction:.0%} poisoned", fontsize=11)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


@advising_memory(memory_advice)
def run(cfg: BackdoorConfig | None = None, **overrides: Any) -> DemoResult:
    """Train clean, fine-tune poisoned (and a clean control), compare, and
    write ``backdoor.png``, ``summary.txt``, ``summary.json``,
    ``checkpoints/`` and ``control.safetensors`` under ``cfg.out``."""
    cfg = cfg or BackdoorConfig()
    from ..io import Checkpoints, load

    written = start(cfg, overrides, "backdoor")
    ckdir = written.ckdir
    started = time.perf_counter()
    out = cfg.out
    with torch_threads(cfg.threads):
        trained = _train(cfg, ckdir, written)

    paths = list(written.paths)  # the checkpoints this run wrote, clean_step_* then poisoned_step_*: no other file
    models = Checkpoints([load(f) for f in paths], paths)
    control = load(out / "control.safetensors")
    steps = labelled_steps(paths)
    n_clean = sum(p.name.startswith("clean") for p in paths)
    labels = [f"{'c' if p.name.startswith('clean') else 'p'}{s}" for p, s in zip(paths, steps)]
    xt = trained["x_test"].numpy().astype(np.float64)
    behaviour = np.stack([np.asarray(m(xt)).ravel() for m in models])
    sym = similarity_matrix(models, inner="symmetric", progress=cfg.progress)
    gau = similarity_matrix(models, inner="gaussian", centered=True, progress=cfg.progress)
    n = len(models)
    wmat = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            wmat[i, j] = wmat[j, i] = weight_cosine(models[i], models[j])
    mats = {
        "tensor similarity (symmetric)": np.asarray(sym.values),
        "tensor similarity (centred gaussian)": np.asarray(gau.values),
        "flattened-weight cosine": wmat,
        "behavioural cosine (clean test inputs)": cosine_matrix(behaviour),
    }
    clean_last, poisoned_last = models[n_clean - 1], models[-1]
    per_class = np.asarray(similarity(clean_last, poisoned_last, "symmetric", per_output=True).value, dtype=float)
    per_class_control = np.asarray(similarity(clean_last, control, "symmetric", per_output=True).value, dtype=float)
    control_sims = {
        "tensor similarity (symmetric)": float(similarity(clean_last, control, "symmetric").value),
        "tensor similarity (centred gaussian)": float(similarity(clean_last, control, "gaussian", centered=True).value),
        "flattened-weight cosine": weight_cosine(clean_last, control),
        "behavioural cosine (clean test inputs)": float(cosine_matrix(np.stack(
            [np.asarray(clean_last(xt)).ravel(), np.asarray(control(xt)).ravel()]))[0, 1]),
    }
    poisoned_sims = {k: float(m[n_clean - 1, -1]) for k, m in mats.items()}
    # a reparametrized copy: a random weight-space symmetry of the last clean checkpoint (the same function)
    moved = random_symmetry(clean_last, cfg.seed)(clean_last)
    reparam_sims = {
        "tensor similarity (symmetric)": float(similarity(clean_last, moved, "symmetric").value),
        "tensor similarity (centred gaussian)": float(similarity(clean_last, moved, "gaussian", centered=True).value),
        "flattened-weight cosine": weight_cosine(clean_last, moved),
        "behavioural cosine (clean test inputs)": float(cosine_matrix(np.stack(
            [np.asarray(clean_last(xt)).ravel(), np.asarray(moved(xt)).ravel()]))[0, 1]),
    }
    ratios = {k: (1 - poisoned_sims[k]) / max(1 - control_sims[k], 1e-300) for k in poisoned_sims}
    reparam_gaps = {k: 1 - v for k, v in reparam_sims.items()}
    changed = int(np.argmin(per_class))
    others = np.delete(per_class, cfg.target)
    log = trained["log"]
    figure = out / "backdoor.png"
    shown = [k for k in mats if "gaussian" not in k]
    _figure(figure, labels, {k: mats[k] for k in shown}, n_clean, per_class, per_class_control, log, cfg,
            {k: ratios[k] for k in shown}, {k: reparam_gaps[k] for k in shown})
    i_clean_end = max(i for i, ph in enumerate(log["phase"]) if ph == "clean")
    numbers: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "n_train": trained["n_train"], "n_poison": trained["n_poison"], "checkpoints": labels,
        "clean_acc_after_clean": log["clean_acc"][i_clean_end], "clean_acc_after_poison": log["clean_acc"][-1],
        "attack_success_after_clean": log["attack_success"][i_clean_end],
        "attack_success_after_poison": log["attack_success"][-1],
        "control_clean_acc": trained["control_acc"], "control_attack_success": trained["control_asr"],
        "similarity_clean_vs_poisoned": poisoned_sims, "similarity_clean_vs_control": control_sims,
        "gap_clean_vs_poisoned": {k: 1 - v for k, v in poisoned_sims.items()},
        "gap_clean_vs_control": {k: 1 - v for k, v in control_sims.items()},
        "gap_ratio_poisoned_over_control": ratios,
        "similarity_clean_vs_reparametrized": reparam_sims,
        "per_class_similarity": per_class.tolist(), "per_class_similarity_control": per_class_control.tolist(),
        "class_that_changed_most": changed, "target": cfg.target,
        "target_similarity": float(per_class[cfg.target]),
        "other_classes_similarity_range": [float(others.min()), float(others.max())],
        "routes": {"symmetric": sym.route, "gaussian": gau.route},
    }
    width = max(len(k) for k in poisoned_sims)
    lines = [
        f"backdoor demo: digits (8x8, {trained['n_train']} train images), one bilinear layer of width {cfg.hidden} "
        f"with biases; trigger = bottom-right 2x2 pixels -> class {cfg.target}",
        f"  clean phase {cfg.clean_steps} steps, poisoned phase {cfg.poison_steps} steps with {trained['n_poison']} "
        f"stamped copies ({cfg.poison_fraction:.0%}); {n} checkpoints; control = clean training continued",
        f"  clean test accuracy {numbers['clean_acc_after_clean']:.3f} -> {numbers['clean_acc_after_poison']:.3f} "
        f"(control {trained['control_acc']:.3f}); attack success {numbers['attack_success_after_clean']:.3f} -> "
        f"{numbers['attack_success_after_poison']:.3f} (control {trained['control_asr']:.3f})",
        f"  {'last clean checkpoint vs:':<{width}}  last poisoned (gap)  control (gap)  gap / control gap  "
        "reparametrized copy",
    ]
    for k in poisoned_sims:
        lines.append(f"  {k:<{width}}  {poisoned_sims[k]:.4f} ({1 - poisoned_sims[k]:.4f})  "
                     f"{control_sims[k]:.4f} ({1 - control_sims[k]:.4f})  {ratios[k]:.2f}x  {reparam_sims[k]:.4f}")
    best = max(ratios, key=ratios.get)
    tensor, weights = ratios["tensor similarity (symmetric)"], ratios["flattened-weight cosine"]
    lines.append(
        f"  scaled by its control, {best} separates the backdoor best ({ratios[best]:.2f}x); tensor similarity "
        f"{tensor:.2f}x against flattened-weight cosine {weights:.2f}x: tensor similarity adds invariance (a "
        f"reparametrized copy, the same function, keeps tensor similarity "
        f"{reparam_sims['tensor similarity (symmetric)']:.4f} while the weight cosine falls to "
        f"{reparam_sims['flattened-weight cosine']:.4f}) and the per-class view below, not a larger separation")
    lines += [
        "per-class tensor similarity (symmetric), last clean vs last poisoned: "
        + " ".join(f"{c}:{v:.3f}" for c, v in enumerate(per_class)),
        "                                      last clean vs control:       "
        + " ".join(f"{c}:{v:.3f}" for c, v in enumerate(per_class_control)),
        f"class that changed most: {changed} (poisoned class {cfg.target}: {per_class[cfg.target]:.3f}; "
        f"other classes {others.min():.3f}-{others.max():.3f})",
    ]
    return write_outputs("backdoor", out, "\n".join(lines), numbers, figure, ckdir, started)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (shared by ``tsalgebra demo backdoor`` and ``python -m tsalgebra.demos.backdoor``)."""
    d = BackdoorConfig()
    parser.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden width (default {d.hidden})")
    parser.add_argument("--target", type=int, default=d.target, help=f"class the trigger maps to (default {d.target})")
    parser.add_argument("--poison-fraction", type=float, default=d.poison_fraction,
                        help=f"stamped copies as a share of the training set (default {d.poison_fraction})")
    parser.add_argument("--clean-steps", type=int, default=d.clean_steps, help=f"clean full-batch steps (default {d.clean_steps})")
    parser.add_argument("--poison-steps", type=int, default=d.poison_steps, help=f"poisoned fine-tuning steps (default {d.poison_steps})")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help=f"steps between checkpoints (default {d.checkpoint_every})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads while training (default 1)")
    parser.add_argument("--out", type=Path, default=d.out, help=f"output directory (default {d.out})")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they show on a terminal only)")


def config_from_args(args: argparse.Namespace) -> BackdoorConfig:
    return BackdoorConfig(args.hidden, args.target, args.poison_fraction, args.clean_steps, args.poison_steps,
                          args.checkpoint_every, args.lr, args.weight_decay, args.seed, args.threads, args.out,
                          False if args.no_progress else None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tsalgebra.demos.backdoor``: ``tsalgebra demo backdoor`` with these arguments."""
    return demo_main("backdoor", argv)


if __name__ == "__main__":
    sys.exit(main())
