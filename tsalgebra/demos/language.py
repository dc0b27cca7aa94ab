"""A small bilinear-attention language model learns induction, seen by tensor similarity.

The model is written in the papers' language-model layout
(:mod:`tsalgebra.layouts`): ``embed``, ``--n-layers`` attention layers (two by
default) with ``q1, k1, q2, k2, v, o`` (query-key biases), scores
(q1 . k1)(q2 . k2) / d_head^2 under a causal mask with rotary embeddings
(rotate-half), ``x + attn_scale * o(z)``, and ``unembed``.  It trains
offline on generated text with two learnable structures: each sequence is a
span drawn from a fixed random bigram chain followed by a repeat of the same
span.  The bigram statistics are learnt first; predicting the repeat needs
an induction circuit (a previous-token head feeding a head that looks up
what followed the current token last time), which appears mid-training as
a drop of the loss on the repeated half (the in-context-learning score: loss
on the first half minus loss on the repeat).  Checkpoints are written as
``checkpoints/step_{s:05d}.pt`` with a ``model_state_dict`` beside
``config.json``, and read back with ``tsalgebra.load(run, n_ctx=...)`` like
any run in that layout.

Over all checkpoint pairs the demo computes:

- tensor similarity under the token measure (every position an independent
  uniform token, ``n_ctx`` positions): exact, the sum over all vocab^n_ctx
  token sequences;
- tensor similarity under the Gaussian measure by closure (exact through the
  first attention layer, the later ones closed as if Gaussian): approximate
  with two or more layers, exact with one, and labelled as the result reports;
- each attention layer's own exact Gaussian similarity (its map without the
  residual, over Gaussian inputs in each checkpoint's residual basis);
- behavioural similarity: logit cosine on held-out sequences of the training
  distribution and on uniformly random token sequences (run through torch);
- flattened-weight cosine (basis-dependent baseline);

and reports how well each measure tracks the behaviour on held-out text
(Pearson r over checkpoint pairs), where the phase change happens, and how
the similarity to the final checkpoint changes across it: the mean before
it, then at or after it, which rises (the default run: 0.63 -> 0.92 under the
token measure) as the checkpoints take the final one's form (or says why not:
no rise of the score, or no checkpoint but the final one after it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..baselines import weight_cosine
from ..inner import plan_similarity
from ..matrix import similarity_matrix
from ..plots import pyplot
from ..messages import counted
from ..problem import DEFAULT_BUDGET, format_count
from .common import (TRAINING_SIZES, Checks, DemoResult, Size, Written, advising_memory, check_finite,
                     cosine_matrix, demo_main, drop_empty_panels, grid, optimizer_step, pearson, plot_cosines,
                     sizes_advice, start, torch_threads, training_bar, upper, write_outputs)

__all__ = ["LanguageConfig", "run", "add_arguments", "config_from_args", "main", "attention_lm_module",
           "memory_advice"]


@dataclass
class LanguageConfig:
    """Settings of the language-model demo (command-line flags of the same names)."""

    vocab: int = 32
    d_model: int = 32
    n_head: int = 4
    n_layers: int = 2
    seq_len: int = 16  # training sequences: a bigram span of seq_len // 2 tokens, then its repeat
    bigram_temperature: float = 1.0  # how peaked the bigram chain is (0: uniform tokens)
    attn_scale: float = 1.0
    lr: float = 1e-3
    batch: int = 64
    steps: int = 1500
    checkpoint_every: int = 100
    n_ctx: int = 3  # the analysis length: the token measure sums over vocab^n_ctx sequences
    budget: float = DEFAULT_BUDGET  # flops per inner product of the analysis
    held_out: int = 512  # held-out sequences for the behavioural similarity
    seed: int = 0
    # torch threads while training: at the default size 150 steps took 1.7 s on two, 2.5 s on one on a quiet
    # 2-core machine; beside another busy process 11.6-13.8 s on two, 2.9-5.1 s on one (--threads 1 then)
    threads: int = 2
    out: Path = Path("language-demo")
    progress: bool | None = None  # None: bars on a terminal only

    def check(self, python: bool = False) -> None:
        """ValueError for a setting out of range, named by its flag (the
        keyword with ``python``), before any training; this includes an
        analysis the library would refuse after it (planned from shapes on an
        untrained model, in about a second)."""
        c = Checks(self, python)
        c.integer("vocab", 2, why="one token leaves nothing to predict: every loss is 0")
        for name in ("d_model", "n_head", "n_layers", "batch", "held_out"):
            c.integer(name)
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"{c.name('d_model')} {self.d_model} must split into {c.name('n_head')} {self.n_head} "
                             "heads of even width (rotary rotates pairs)")
        c.integer("seq_len", 4)
        if self.seq_len % 2:
            raise ValueError(f"{c.name('seq_len')} must be even and >= 4 (a span and its repeat), got {self.seq_len}")
        c.integer("n_ctx")
        if self.n_ctx > self.seq_len:  # the loaded models are checked against torch on sequences of seq_len tokens
            raise ValueError(f"{c.name('n_ctx')} must be at most {c.name('seq_len')} ({self.seq_len}), the length "
                             f"of the sequences the model is trained and checked on, got {self.n_ctx}")
        c.number("bigram_temperature", 0, False)
        c.finite("attn_scale")
        c.number("lr", 0, True)
        c.integer("steps")
        c.integer("checkpoint_every")
        if self.steps // self.checkpoint_every < 2:
            raise ValueError(f"need at least 3 checkpoints: lower {c.name('checkpoint_every')} or raise "
                             f"{c.name('steps')}")
        c.number("budget", 0, True, infinite=True)
        c.seed()
        c.threads()
        c.progress()
        c.out(("language.png", "summary.txt", "summary.json", "config.json"), demo="language")
        # every size against the memory (training, the logits of every checkpoint, the checkpoints read back) and
        # the disk (the checkpoints) it takes: refused now, not after the training (and before the plan below
        # builds a model at these sizes)
        c.fits_machine("language", _need, _disk, SIZES,
                       lambda cfg: f"the training and the logits of {_checkpoints(cfg):,} checkpoints on "
                                   f"{2 * cfg.held_out:,} sequences",
                       _checkpoints)
        refusal = _refusal(self.vocab, self.d_model, self.n_head, self.n_layers, float(self.attn_scale),
                           self.n_ctx, float(self.budget))
        if refusal is not None:
            raise ValueError(_refusal_text(self, refusal, c))


# the settings that size a run's memory and disk (checked before the training, and said after an allocation
# the machine refused)
SIZES = (Size("vocab", least=2), Size("d_model", least=lambda cfg: 2 * cfg.n_head,
                                      valid=lambda cfg, v: v - v % (2 * cfg.n_head)),
         Size("n_head", valid=lambda cfg, v: _most_heads(cfg.d_model, v)), Size("n_layers"),
         Size("seq_len", least=lambda cfg: max(4, cfg.n_ctx + cfg.n_ctx % 2), valid=lambda cfg, v: v - v % 2),
         Size("batch"), Size("held_out", python_only=True),
         *TRAINING_SIZES)


def memory_advice(python: bool = False) -> str:
    """What lowers a run's memory, in the caller's spelling (:func:`~.common.sizes_advice`): its sizes, and the
    analysis length (n_ctx: the token measure's sequences, which its memory estimate does not weigh)."""
    return sizes_advice(SIZES, python, also=("n_ctx",))


def _most_heads(d_model: int, most: int) -> int | None:
    """The most heads, at most ``most``, into which ``d_model`` splits in heads of even width: the largest
    divisor of d_model / 2 up to ``most`` (None where d_model is odd)."""
    if d_model % 2:
        return None
    half, best = d_model // 2, None
    for i in range(1, math.isqrt(half) + 1):
        if half % i == 0:
            best = max([h for h in (i, half // i) if h <= most] + ([best] if best else []), default=None)
    return best


def _checkpoints(cfg: "LanguageConfig") -> int:
    """Checkpoints written: step 0, every ``checkpoint_every``, and the last step."""
    return 1 + -(-cfg.steps // cfg.checkpoint_every)


def _params(cfg: "LanguageConfig") -> int:
    """The numbers of the model: embedding and unembedding, and per layer q1, k1, q2, k2 (with biases), v, o."""
    d = cfg.d_model
    return 2 * cfg.vocab * d + cfg.n_layers * (6 * d * d + 4 * d)


def _need(cfg: "LanguageConfig") -> int:
    """About the bytes of a run at its peak, the training or the analysis after it.  The training: the model
    (float32, with gradients and AdamW's two moments, and a copy while saved), the bigram table (vocab^2,
    twice while drawn), a batch's activations kept for the backward pass (per layer about 26 float32 numbers
    per token and width, and 5 per head and pair of positions, twice with their gradients; the logits three
    times), and the held-out sequences' forward pass at each checkpoint.  The analysis: every checkpoint's
    logits on the held-out and the random sequences (float64, twice while stacked), one forward pass of them
    in float64, the checkpoints read back (float64, and half again while converted), the matrices."""
    params, v, d, h, L = _params(cfg), cfg.vocab, cfg.d_model, cfg.n_head, cfg.n_layers
    n, b, t, held = _checkpoints(cfg), cfg.batch, cfg.seq_len, cfg.held_out

    def forward(rows: int, per_token: int, per_pair: int, layers: int) -> int:
        """Numbers of a forward pass over rows x seq_len tokens, ``layers`` of them held at once."""
        return rows * t * (layers * per_token * d + d + 3 * v) + layers * per_pair * rows * h * t * t

    bigram = 8 * v * v
    train = 20 * params + bigram + 8 * forward(b, 26, 5, L) + 4 * forward(held, 10, 3, 1)
    analysis = (bigram + 8 * params + 16 * n * held * (2 * t - 1) * v + 8 * forward(held, 10, 3, 1)
                + 12 * n * params + 16 * n * n * (L + 6))
    return max(train, analysis)


def _disk(cfg: "LanguageConfig") -> int:
    """The bytes of the checkpoints (float32 state dicts, and torch's headers)."""
    return _checkpoints(cfg) * (4 * _params(cfg) + 4096)


def _model_config(vocab: int, d_model: int, n_head: int, n_layers: int, attn_scale: float) -> dict[str, Any]:
    """The model part of the run's config.json."""
    return {"vocab_size": vocab, "d_model": d_model, "n_head": n_head, "n_layers": n_layers,
            "attn_scale": attn_scale, "use_bias_qk": True, "rotary_base": 10000.0}


def _analysis(vocab: int, d_model: int, n_head: int, n_layers: int, attn_scale: float,
              n_ctx: int) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """The similarities the analysis computes, each as (what, a, b, keywords) on two copies of an untrained
    model at these sizes: the costs are planned from shapes, so any checkpoint's weights plan alike."""
    import torch

    from ..layouts import attention_lm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = attention_lm_module(vocab, d_model, n_head, n_layers, attn_scale)
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    config = _model_config(vocab, d_model, n_head, n_layers, attn_scale)
    a, b = (attention_lm(sd, config, n_ctx) for _ in range(2))  # two objects: the pair is planned as a pair
    attention = [k for k, layer in enumerate(a.layers) if type(layer).__name__ == "BilinearAttention"]
    return ([("the exact token similarity", a, b, {}),
             ("the Gaussian similarity by closure", a, b, {"inner": "gaussian", "method": "closure"})]
            + [(f"attention layer {i} alone (Gaussian)", a.layers[k].replace(residual=False),
                b.layers[k].replace(residual=False), {"inner": "gaussian"}) for i, k in enumerate(attention)])


@functools.lru_cache(maxsize=16)  # checked by the command line and again by run(): planned once
def _refusal(vocab: int, d_model: int, n_head: int, n_layers: int, attn_scale: float, n_ctx: int,
             budget: float) -> tuple[str, Any] | None:
    """The first similarity of the analysis that the library would refuse at these sizes, with its CostError;
    None when every one plans within ``budget`` (and the default memory bound)."""
    from ..problem import CostError

    for what, a, b, kw in _analysis(vocab, d_model, n_head, n_layers, attn_scale, n_ctx):
        refused = [p for _, p in plan_similarity(a, b, budget=budget, **kw).products if isinstance(p, CostError)]
        if refused:
            return what, refused[0]
    return None


def _longest_n_ctx(cfg: "LanguageConfig") -> int | None:
    """The longest analysis length below ``cfg.n_ctx`` whose similarities all plan (the cost grows with it:
    a bisection), or None when not even one position does."""
    fits = lambda n: _refusal(cfg.vocab, cfg.d_model, cfg.n_head, cfg.n_layers, float(cfg.attn_scale), n,  # noqa: E731
                              float(cfg.budget)) is None
    if cfg.n_ctx <= 1 or not fits(1):
        return None
    lo, hi = 1, cfg.n_ctx  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@contextlib.contextmanager
def _refusal_in_demo_terms(cfg: "LanguageConfig") -> Iterator[None]:
    """A refusal of the analysis after training (the check before it plans the same similarities, so this is
    rare: the matrix's own memory bound, say) offers only the alternatives this demo accepts: a shorter
    --n-ctx, and --budget where the library names one."""
    from ..problem import Alternative, CostError, MemoryBoundError

    try:
        yield
    except CostError as exc:
        kept = [a for a in exc.alternatives if a.option == "budget"]
        longest = _longest_n_ctx(cfg)
        if longest is not None:
            kept.insert(0, Alternative("n_ctx", longest, "the longest analysis length that plans within the limits"))
        reason = f"{exc.reason} (the trained run is kept in {cfg.out})"
        fields = dict(flops=exc.flops, alternatives=tuple(kept), extrapolated=exc.extrapolated)
        if isinstance(exc, MemoryBoundError):
            raise MemoryBoundError(reason, needed=exc.needed, **fields) from None
        raise CostError(reason, **fields) from None


def _refusal_text(cfg: "LanguageConfig", refusal: tuple[str, Any], c: Any) -> str:
    """The refusal of --n-ctx, with the alternatives this demo accepts: a shorter --n-ctx, and the budget
    the library names (its other alternatives, --method or --max-memory, are options of tsalgebra similarity
    and matrix, not of this demo)."""
    what, exc = refusal
    alternatives = []
    longest = _longest_n_ctx(cfg)
    if longest is not None:
        alternatives.append(f"{c.given('n_ctx', longest)} (the longest analysis length that plans within the "
                            f"limits)")
    for alt in exc.alternatives:
        if alt.option == "budget":
            alternatives.append(c.given("budget", format_count(alt.value)) + (f" ({alt.why})" if alt.why else ""))
    asked = c.given("n_ctx")
    if cfg.budget != DEFAULT_BUDGET:
        asked += f" with {c.given('budget', format_count(cfg.budget))}"
    reason = f"{asked}: refused before the training, as {what} would be after it: {exc.reason}"
    return reason + (". Alternatives: " + "; ".join(alternatives) if alternatives else "")


def attention_lm_module(vocab: int, d_model: int, n_head: int, n_layers: int, attn_scale: float = 1.0,
                        use_bias_qk: bool = True) -> "torch.nn.Module":
    """A torch bilinear-attention language model in the papers' layout (see
    the module docstring): ``model(ids)`` maps token ids (batch, n) to logits
    (batch, n, vocab)."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dh = d_model // n_head
            for name in ("q1", "k1", "q2", "k2"):
                setattr(self, name, nn.Linear(d_model, d_model, bias=use_bias_qk))
            self.v, self.o = nn.Linear(d_model, d_model, bias=False), nn.Linear(d_model, d_model, bias=False)

        def rope(self, t: torch.Tensor) -> torch.Tensor:  # (b, n, h, dh): dimension k pairs with k + dh / 2
            n, dh = t.shape[1], self.dh
            inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=t.dtype) / dh)
            ang = torch.arange(n, dtype=t.dtype)[:, None] * inv[None]
            cos, sin = (torch.cat([f(ang)] * 2, -1)[None, :, None] for f in (torch.cos, torch.sin))
            return t * cos + torch.cat([-t[..., dh // 2:], t[..., : dh // 2]], -1) * sin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            heads = lambda t: t.view(b, n, n_head, self.dh)  # noqa: E731
            q1, k1, q2, k2 = (self.rope(heads(getattr(self, m)(x))) for m in ("q1", "k1", "q2", "k2"))
            s = torch.einsum("bihe,bjhe->bhij", q1, k1) * torch.einsum("bihe,bjhe->bhij", q2, k2) / self.dh**2
            s = s * torch.tril(torch.ones(n, n, dtype=x.dtype))
            z = torch.einsum("bhij,bjhe->bihe", s, heads(self.v(x))).reshape(b, n, d_model)
            return x + attn_scale * self.o(z)

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.layers = nn.ModuleList(Attention() for _ in range(n_layers))
            self.unembed = nn.Linear(d_model, vocab, bias=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.unembed(x)

    return LanguageModel()


class Text:
    """The generated text: a span from a fixed random bigram chain, then its repeat."""

    def __init__(self, cfg: LanguageConfig) -> None:
        import torch

        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.bigram = torch.softmax(cfg.bigram_temperature * torch.randn(cfg.vocab, cfg.vocab, generator=g), -1)

    def sample(self, n: int, gen: "torch.Generator") -> "torch.Tensor":
        import torch

        half = self.cfg.seq_len // 2
        span = torch.empty(n, half, dtype=torch.long)
        span[:, 0] = torch.randint(0, self.cfg.vocab, (n,), generator=gen)
        for t in range(1, half):
            span[:, t] = torch.multinomial(self.bigram[span[:, t - 1]], 1, generator=gen)[:, 0]
        return torch.cat([span, span], 1)


def _losses(model: "torch.nn.Module", ids: "torch.Tensor") -> "torch.Tensor":
    """Next-token cross-entropy per sequence and position, (batch, seq_len - 1)."""
    from torch import nn

    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                       reduction="none").view(ids.shape[0], -1)


def _scores(per_position: "torch.Tensor", half: int) -> tuple[float, float]:
    """(loss, in-context-learning score): the mean loss, and the loss on the
    first span (after its first token) minus the loss on the repeat."""
    first = per_position[:, : half - 1].mean()
    repeat = per_position[:, half - 1:].mean()  # predicting tokens half .. 2 half - 1
    return float(per_position.mean()), float(first - repeat)


def _train(cfg: LanguageConfig, run: Path, text: Text, held: "torch.Tensor",
           written: Written | None = None) -> dict[str, Any]:
    """Train, writing config.json and each checkpoint into ``run`` (recorded by ``written``: the paths read
    back)."""
    import torch
    from torch import nn

    ckdir = run / "checkpoints"
    at = written.path if written else ckdir.joinpath
    config = _model_config(cfg.vocab, cfg.d_model, cfg.n_head, cfg.n_layers, cfg.attn_scale)
    (run / "config.json").write_text(json.dumps({"model": config, "train": {
        "lr": cfg.lr, "batch": cfg.batch, "steps": cfg.steps, "seq_len": cfg.seq_len, "seed": cfg.seed}}, indent=2))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = attention_lm_module(cfg.vocab, cfg.d_model, cfg.n_head, cfg.n_layers, cfg.attn_scale)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    half = cfg.seq_len // 2
    curve: dict[str, list[float]] = {"step": [], "loss": [], "icl": []}

    def checkpoint(step: int) -> None:
        check_finite(cfg, step, model=model)
        with torch.no_grad():
            loss, icl = _scores(_losses(model, held), half)
        curve["step"].append(step)
        curve["loss"].append(loss)
        curve["icl"].append(icl)
        torch.save({"step": step, "model_state_dict": model.state_dict()}, at(f"step_{step:05d}.pt"))

    checkpoint(0)
    with training_bar(cfg.steps, "training", cfg.progress) as bar:
        for step in range(1, cfg.steps + 1):
            loss = _losses(model, text.sample(cfg.batch, gen)).mean()
            check_finite(cfg, step, loss)  # a diverged run stops here, naming the learning rate
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the quartic scores make rare steps explode
            optimizer_step(opt, cfg, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step)
            bar.update(1)
    return curve


def _logits(cfg: LanguageConfig, paths: Sequence[Path], ids: "torch.Tensor") -> np.ndarray:
    """Each checkpoint's logits on ``ids``, flattened: (checkpoints, sequences * positions * vocab)."""
    import torch

    model = attention_lm_module(cfg.vocab, cfg.d_model, cfg.n_head, cfg.n_layers, cfg.attn_scale).double()
    rows = []
    for p in paths:
        model.load_state_dict(torch.load(p, weights_only=True)["model_state_dict"])
        with torch.no_grad():
            rows.append(model(ids).reshape(-1).numpy())
    return np.stack(rows)


def _phase_change(steps: Sequence[int], icl: Sequence[float]) -> int | None:
    """The first checkpoint whose in-context-learning score passes half of its
    rise from the first checkpoint to the largest; None when the score never
    rises above the first checkpoint's (there is then no phase change: the
    first checkpoint would pass "half of a zero rise")."""
    lo, hi = icl[0], max(icl)
    if not hi > lo:  # also a NaN score
        return None
    return next(k for k, v in enumerate(icl) if v - lo >= 0.5 * (hi - lo))


def _closure_how(result: Any, n_attention: int, closed: int | None, notes: Sequence[str]) -> str:
    """How the Gaussian matrix by closure was obtained, from what the result
    reports (its exact flag) and what closure's plan says it closes (``closed``
    layers, ``notes``), not from the default of two layers."""
    where = f"{result.method}, {result.route} route"
    if result.exact:
        return (f"exact: closure closes no layer as if Gaussian here (its exact first stage is the whole model, "
                f"{counted(n_attention, 'attention layer')}) ({where})")
    if closed is not None and closed == n_attention - 1 >= 1:
        span = "layer 1" if closed == 1 else f"layers 1-{closed}"
        return f"approximate: exact through attention layer 0, {span} closed as if Gaussian ({where})"
    # anything else: closure's own words rather than a guess at the layers it closed
    return f"approximate: {'; '.join(notes) or 'Gaussian closure'} ({where})"


def _figure(path: Path, steps: list[int], mats: dict[str, np.ndarray], curve: dict[str, list[float]],
            phase: int | None, cfg: LanguageConfig) -> None:
    plt = pyplot()
    n_mats = len(mats)
    rows, cols = grid(n_mats + 2)  # the matrices, then two plots: a grid with the fewest empty cells
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.3 * rows))
    axes = axes.ravel()
    labels = [str(s) for s in steps]
    for ax, (name, m) in zip(axes, mats.items()):
        plot_cosines(m, ax, labels=labels, col_labels=labels, title=name)
    ax = axes[n_mats]
    ax.plot(curve["step"], curve["loss"], marker=".", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    twin = ax.twinx()
    twin.plot(curve["step"], curve["icl"], marker=".", color="C3", label="in-context-learning score")
    twin.set_ylabel("first-span loss - repeat loss", color="C3")
    if phase is not None:
        ax.axvline(steps[phase], color="grey", lw=0.8, ls=":")
    ax.set_title("loss and in-context-learning score", fontsize=9)
    ax.legend(fontsize=7, loc="upper center")
    ax = axes[n_mats + 1]
    for name, m in mats.items():
        ax.plot(steps, m[-1], marker=".", label=name.split(" (")[0] if len(name) > 40 else name)
    if phase is not None:
        ax.axvline(steps[phase], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("checkpoint step")
    ax.set_title("similarity to the final checkpoint", fontsize=9)
    ax.legend(fontsize=6)
    drop_empty_panels(fig, axes, n_mats + 2)
    fig.suptitle(f"language model: vocab {cfg.vocab}, d_model {cfg.d_model}, {counted(cfg.n_head, 'head')}, "
                 f"{counted(cfg.n_layers, 'layer')}, {cfg.steps} steps; analysis at "
                 f"{counted(cfg.n_ctx, 'position')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


@advising_memory(memory_advice)
def run(cfg: LanguageConfig | None = None, **overrides: Any) -> DemoResult:
    """Train, checkpoint, compare, and write ``language.png``, ``summary.txt``,
    ``summary.json`` and the run (``config.json``, ``checkpoints/``) under
    ``cfg.out``.  Keyword overrides replace config fields.  Returns the
    :class:`DemoResult` whose ``numbers`` hold every figure in the summary."""
    cfg = cfg or LanguageConfig()
    import torch

    from ..io import Checkpoints, load

    written = start(cfg, overrides, "language")
    ckdir = written.ckdir
    started = time.perf_counter()
    out = cfg.out
    text = Text(cfg)
    held = text.sample(cfg.held_out, torch.Generator().manual_seed(cfg.seed + 2))
    with torch_threads(cfg.threads):
        curve = _train(cfg, out, text, held, written)
    t_train = time.perf_counter() - started

    # each checkpoint this run wrote, as any user reads a run's file (beside config.json); never another file
    models = Checkpoints([load(f, n_ctx=cfg.n_ctx) for f in written.paths], written.paths)
    steps, paths = list(models.steps), list(models.paths)
    n = len(models)
    random_ids = torch.randint(0, cfg.vocab, (cfg.held_out, cfg.seq_len),
                               generator=torch.Generator().manual_seed(cfg.seed + 3))
    with torch_threads(cfg.threads):
        short = random_ids[:64, : cfg.n_ctx]
        torch_logits = _logits(cfg, paths, short)
        held_logits = _logits(cfg, paths, held[:, :-1])
        random_logits = _logits(cfg, paths, random_ids)
    ours = np.stack([np.asarray(m(short.numpy())).reshape(-1) for m in models])
    conversion_error = float(np.max(np.abs(ours - torch_logits)) / np.max(np.abs(torch_logits)))

    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        with _refusal_in_demo_terms(cfg):
            results[name] = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        return results[name]

    limits = {"budget": cfg.budget, "progress": cfg.progress}
    timed("tokens", lambda: similarity_matrix(models, **limits))
    timed("gaussian", lambda: similarity_matrix(models, inner="gaussian", method="closure", **limits))
    attention = [k for k, layer in enumerate(models[0].layers) if type(layer).__name__ == "BilinearAttention"]
    for i, k in enumerate(attention):
        timed(f"layer {i}", lambda k=k: similarity_matrix([m.layers[k].replace(residual=False) for m in models],
                                                          inner="gaussian", **limits))
    wmat = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            wmat[i, j] = wmat[j, i] = weight_cosine(models[i], models[j])
    names = {"tokens": f"tensor similarity, tokens ({counted(cfg.n_ctx, 'position')})",
             "gaussian": "tensor similarity, Gaussian (closure)"}
    names.update({f"layer {i}": f"attention layer {i} alone, Gaussian" for i in range(len(attention))})
    mats: dict[str, np.ndarray] = {names[k]: np.asarray(r.values) for k, r in results.items()}
    behaviour = cosine_matrix(held_logits)
    mats["logit cosine, held-out text"] = behaviour
    mats["logit cosine, random tokens"] = cosine_matrix(random_logits)
    mats["flattened-weight cosine"] = wmat
    tokens, gaussian = results["tokens"], results["gaussian"]
    how = {names["tokens"]: f"exact: all {cfg.vocab}^{cfg.n_ctx} = {cfg.vocab ** cfg.n_ctx:,} token sequences "
                            f"({tokens.route} route)" if tokens.exact else
           f"not exact: {tokens.method} ({tokens.route} route)"}
    # what closure closes, in its own words: the matrix result carries the exact flag but not closure's notes,
    # so they come from its plan for one pair (planned from shapes; every checkpoint has the same shapes)
    closure_plans = plan_similarity(models[0], models[-1], inner="gaussian", method="closure",
                                    budget=cfg.budget).plans
    closure_notes = tuple(dict.fromkeys(note for p in closure_plans for note in p.notes))
    closed = max((p.facts.get("approximate_layers", 0) for p in closure_plans), default=None)
    how[names["gaussian"]] = _closure_how(gaussian, len(attention), closed, closure_notes)
    for i in range(len(attention)):
        r = results[f"layer {i}"]
        how[names[f"layer {i}"]] = f"{'exact' if r.exact else 'approximate: ' + r.method} ({r.route} route)"
    how["logit cosine, held-out text"] = f"exact on {cfg.held_out} sampled held-out sequences (an empirical measure)"
    how["logit cosine, random tokens"] = f"exact on {cfg.held_out} sampled uniform sequences (an empirical measure)"
    how["flattened-weight cosine"] = "exact (a property of the coordinates)"

    phase = _phase_change(curve["step"], curve["icl"])
    pearson_r = {k: pearson(upper(m), upper(behaviour)) for k, m in mats.items() if k != "logit cosine, held-out text"}
    to_final = {k: m[-1].tolist() for k, m in mats.items()}
    # the phase change in the similarity to the final checkpoint: the checkpoints before it against those at or
    # after it (the final one left out: its similarity to itself is 1 by definition); either side may be empty
    # (no rise of the score, or the phase change at the final checkpoint), and then there is no number to give
    if phase is None:
        split_note: str | None = ("no phase change: the in-context-learning score never rose above the first "
                                  "checkpoint's, so there is no before and after to compare")
    elif phase == n - 1:
        split_note = (f"the phase change is at the final checkpoint (step {steps[phase]}): no checkpoint other than "
                      "the final one is at or after it, so there is no after side to compare")
    else:
        split_note = None
    across = {k: {"before": None if split_note else float(np.mean(m[-1, :phase])),
                  "after": None if split_note else float(np.mean(m[-1, phase:-1]))} for k, m in mats.items()}
    figure = out / "language.png"
    _figure(figure, steps, mats, curve, phase, cfg)

    numbers: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "checkpoints": n, "steps": steps, "curve": curve,
        "phase_change_step": None if phase is None else steps[phase], "phase_change_index": phase,
        "icl_first": curve["icl"][0], "icl_final": curve["icl"][-1], "loss_final": curve["loss"][-1],
        "conversion_max_relative_error": conversion_error,
        "how_obtained": how, "pearson_vs_held_out_logit_cosine": pearson_r, "similarity_to_final": to_final,
        "similarity_to_final_across_phase_change": across, "across_phase_change_note": split_note,
        "closure_notes": list(closure_notes),
        "routes": {k: r.route for k, r in results.items()}, "seconds": timings, "train_seconds": round(t_train, 2),
    }

    def r_text(r: float) -> str:
        return f"{r:.3f}" if np.isfinite(r) else "undefined (a constant side)"

    tab = max(len(k) for k in mats)
    if phase is None:
        where = "no phase change (the score never rose above its first value)"
    else:
        where = f"phase change (half the score's rise) at step {steps[phase]}" + (
            ", the final checkpoint" if phase == n - 1 else "")
    lines = [
        f"language demo: a bilinear-attention language model (vocab {cfg.vocab}, d_model {cfg.d_model}, "
        f"{counted(cfg.n_head, 'head')}, {counted(cfg.n_layers, 'layer')}, rotary, causal) on a bigram span and "
        f"its repeat ({cfg.seq_len} tokens); AdamW lr {cfg.lr}, batch {cfg.batch}, {cfg.steps} steps "
        f"(training {t_train:.1f} s); {n} checkpoints in the papers' layout under {out}",
        f"  held-out loss {curve['loss'][0]:.3f} -> {curve['loss'][-1]:.3f} nats; in-context-learning score "
        f"(first-span loss - repeat loss) {curve['icl'][0]:.3f} -> {curve['icl'][-1]:.3f}; {where}",
        f"  the checkpoints read back by tsalgebra.load(run, n_ctx={cfg.n_ctx}) match the torch forward to "
        f"{conversion_error:.1e} (relative)",
        ("mean similarity to the final checkpoint of the checkpoints before the phase change -> at or after it; "
         if split_note is None else f"similarity to the final checkpoint across the phase change not given: "
         f"{split_note}; ")
        + f"Pearson r against the logit cosine on held-out text over {n * (n - 1) // 2} checkpoint pairs; "
        "how each number was obtained:",
    ]
    for k in mats:
        r = "" if k not in pearson_r else f"r = {pearson_r[k]:+.3f}" if np.isfinite(pearson_r[k]) else "r undefined"
        move = "" if split_note else f"{across[k]['before']:.4f} -> {across[k]['after']:.4f}  "
        lines.append(f"  {k:<{tab}}  {move}{r:<9}  {how[k]}")
    tok, weights, rand = names["tokens"], "flattened-weight cosine", "logit cosine, random tokens"
    # NaN (a constant side) has no rank: the best is chosen among the defined r
    ranked = [k for k in pearson_r if not k.startswith("logit") and np.isfinite(pearson_r[k])]
    best = max(ranked, key=lambda k: pearson_r[k]) if ranked else None
    if split_note is None:
        moves = (f"across the phase change it moves {across[tok]['after'] - across[tok]['before']:+.3f} where the "
                 f"flattened-weight cosine moves {across[weights]['after'] - across[weights]['before']:+.3f}")
    else:
        moves = "its move across the phase change is not measured (see above)"
    lines += [
        f"what tensor similarity adds here: the token measure's number is "
        + ("exact over every sequence (no sample, no choice of test set)" if tokens.exact else "not exact here")
        + f" and its Pearson r with the held-out behaviour is {r_text(pearson_r[tok])}; {moves}; what it does not: "
        + (f"of the measures read from the weights, {best} follows held-out behaviour best "
           f"(r = {pearson_r[best]:.3f})" if best else "no measure read from the weights has a defined r")
        + f", and the logit cosine on random tokens, itself a behaviour, follows it with r = {r_text(pearson_r[rand])}",
        "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()),
        "exact means: "
        + (f"the tensor similarity under the token measure is the cosine of the logits summed over every token "
           f"sequence of length {cfg.n_ctx} (not sampled); " if tokens.exact else
           "the tensor similarity under the token measure is not exact here; ")
        + (f"the Gaussian number through {counted(len(attention), 'attention layer')} is closure's approximation "
           "(docs/inner-products.md measures its error); " if not gaussian.exact else
           f"the Gaussian number is exact: with {counted(len(attention), 'attention layer')} closure closes "
           "nothing as if Gaussian; ")
        + "the per-layer numbers compare each layer's map in each checkpoint's own residual basis, so they are not "
        "invariant to a change of that basis; the logit cosines are exact on the sequences drawn, an estimate of "
        "the behaviour on the distribution they were drawn from",
    ]
    return write_outputs("language", out, "\n".join(lines), numbers, figure, ckdir, started)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (shared by ``tsalgebra demo language`` and ``python -m tsalgebra.demos.language``)."""
    d = LanguageConfig()
    parser.add_argument("--vocab", type=int, default=d.vocab, help=f"vocabulary size (default {d.vocab})")
    parser.add_argument("--d-model", type=int, default=d.d_model, help=f"residual width (default {d.d_model})")
    parser.add_argument("--n-head", type=int, default=d.n_head, help=f"heads per layer (default {d.n_head})")
    parser.add_argument("--n-layers", type=int, default=d.n_layers, help=f"attention layers (default {d.n_layers})")
    parser.add_argument("--seq-len", type=int, default=d.seq_len,
                        help=f"training length: a span of half of it and its repeat (default {d.seq_len})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"sequences per step (default {d.batch})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help=f"steps between checkpoints (default {d.checkpoint_every})")
    parser.add_argument("--n-ctx", type=int, default=d.n_ctx,
                        help=f"analysis length: token positions of the measures, at most --seq-len (default "
                             f"{d.n_ctx}; the exact token similarity sums over vocab^n_ctx sequences)")
    parser.add_argument("--budget", type=float, default=d.budget,
                        help=f"flop budget per inner product of the analysis (default {d.budget:g})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads,
                        help=f"torch threads while training (default {d.threads}; 1 is faster when other work holds a core)")
    parser.add_argument("--out", type=Path, default=d.out, help=f"output directory (default {d.out})")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they show on a terminal only)")


def config_from_args(args: argparse.Namespace) -> LanguageConfig:
    return LanguageConfig(vocab=args.vocab, d_model=args.d_model, n_head=args.n_head, n_layers=args.n_layers,
                          seq_len=args.seq_len, lr=args.lr, batch=args.batch, steps=args.steps,
                          checkpoint_every=args.checkpoint_every, n_ctx=args.n_ctx, budget=args.budget,
                          seed=args.seed, threads=args.threads, out=args.out,
                          progress=False if args.no_progress else None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tsalgebra.demos.language``: ``tsalgebra demo language`` with these arguments."""
    return demo_main("language", argv)


if __name__ == "__main__":
    sys.exit(main())
