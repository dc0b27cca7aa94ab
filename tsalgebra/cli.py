"""The tsalgebra command line (also: python -m tsalgebra).

Commands:

  similarity A B       tensor similarity of two checkpoints
  matrix PATHS...      N x N similarity matrix over checkpoints, as a heatmap (and CSV)
  verify CIRCUIT COMP  is the circuit (sympy formulas or a checkpoint) that component?
  plan A B             the contractions the exact engine would run, with FLOP and memory estimates
  demo NAME            grokking | backdoor | language: train, checkpoint, compare, plot
  summary              two small built-in models: expressions, plans, a self-check

Checkpoints are safetensors or torch files (read with weights_only=True) in
tsalgebra's native layout, or any layout with --template MODULE:FUNCTION
naming a function that builds the torch module.  Every command takes --json
for machine-readable output on stdout.

Exit codes: 0 success; 1 a computation failed (malformed or unreadable
checkpoint, a model that is not tensor-based, a model of zero norm, ...),
with a message on stderr, or `verify` found the circuit different; 2 bad
usage (unknown option, missing file, an option value out of range or that
does not apply to these models, such as a question no algorithm answers at
any cost: --inner network on attention layers; an option the checkpoints
need: --n-ctx, --template, --state-key; a --store written for other
checkpoints, options or store version); 3 refused: the cost is above the
budget or the memory above --max-memory (the message states the estimate
and the alternatives, options of the same command; `plan` exits 3 when
what it plans is refused); 130 interrupted (Ctrl-C).  Errors name the file
and the option concerned.  With --json, an error (an interruption too)
also prints {"error": MESSAGE, "exit_code": CODE} on stdout (a refusal
adds "alternatives").  Warnings are reported as notes: "note: ..." lines
after the text output, and in the JSON's "notes".
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import decimal
import functools
import importlib
import importlib.util
import inspect
import json
import keyword
import math
import os
import re
import sys
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .components import Bilinear, Component, Sequential
from .engine import evaluation_network
from .formulas import QUOTE_CHARS, parse_formulas
from .io import TemplateError, run_of
from .jsonable import dumps
from .matrix.api import ROUTES
from .messages import counted, message_of, out_of_memory, raised
from .planner import plan, plan_cache
from .problem import DEFAULT_BUDGET, Alternative, CostError, NotApplicableError, format_count, resolve_inner

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports a process it interrupted


class UsageError(Exception):
    """Bad usage detected after parsing (exit code 2)."""


def _number(kind: type, least: float, strict: bool, below: float | None = None, finite: bool = False) -> Any:
    """An argparse type: a number of ``kind`` above ``least`` (``strict``) or
    at least it (and under ``below``, when given; not inf with ``finite``),
    so that a value out of range is a usage error (exit 2) named by its flag."""
    noun = "a finite number" if finite else "an integer" if kind is int else "a number"
    what = f"{noun} {'>' if strict else '>='} {least:g}"
    if below is not None:
        what += f" and < {below:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = _whole(text) if kind is int else None  # a count in float spelling, as refusals write 3.09e+08
            if value is None:
                raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value > least if strict else value >= least) or (below is not None and not value < below) or (
                finite and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")  # NaN fails too
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _whole(text: str) -> int | None:
    """``text`` as a whole number written as a float (1e4, 3.09e+08), else
    None: read exactly (Decimal), so that 1e30 is 10^30 (through a float it
    was 1000000000000000019884624838656, another seed)."""
    try:
        value = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        return None
    if not value.is_finite() or value != value.to_integral_value() or abs(value.adjusted()) > 4300:
        return None  # (int() of 10^4300 digits is Python's own limit)
    return int(value)


_COUNT, _POSITIVE, _NON_NEGATIVE = _number(int, 0, True), _number(float, 0, True), _number(float, 0, False)
# --max-memory: bytes, in any float spelling (2e9), any finite size (the library holds it in a Python int)
_BYTES = _number(float, 1, False, finite=True)
# the sampling options, in the library's ranges (ts.inner checks them too, in its own spelling)
_SAMPLES, _FRACTION, _SEED = _number(int, 2, False), _number(float, 0, True, below=1), _number(int, 0, False)
# verify --tol: a relative residual in [0, 1), ts.verify's bound (tsalgebra.verify.MAX_TOL, not imported:
# it would load sympy at every start); inf, NaN and 1e400 are refused by the flag, a usage error
TOL_BELOW = 1.0
_TOL = _number(float, 0, False, below=TOL_BELOW)


def _workers(text: str) -> int:
    """--workers: a count of local processes, at most a few per CPU of this
    machine (a larger cluster is one --scheduler names)."""
    from .matrix.cluster import WORKERS_PER_CPU  # the bound workers= has (the tiles' module: imported when asked)

    n = _COUNT(text)
    most = WORKERS_PER_CPU * (os.cpu_count() or 1)
    if n > most:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than {most} local worker processes ({WORKERS_PER_CPU} per CPU of this machine's "
            f"{os.cpu_count() or 1}); for a larger cluster start one and give --scheduler ADDRESS")
    return n


_workers.__name__ = "int"


class _Parser(argparse.ArgumentParser):
    """argparse's parser; with --json on the command line, its usage errors
    also print the JSON error object on stdout (as every other error does)."""

    json_errors = False  # set by main for the command line it parses

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # said by the command they were given to, with its usage line (argparse: the top level's)
            getattr(parsed, "_usage", self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> Any:
        if _Parser.json_errors:
            _write(json.dumps({"error": message, "exit_code": EXIT_USAGE}, indent=2))
        super().error(message)


def _write(text: str, stream: Any = None) -> None:
    """``print(text)`` on stdout (or ``stream``), flushed now.  A reader that
    has gone (`| head`, `| true`) is not the command's failure: the rest of
    that stream goes to /dev/null, where the flush at exit cannot fail."""
    stream = sys.stdout if stream is None else stream
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):  # a stream with no file descriptor: nothing to redirect
            pass


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
                "evaluation_plan": json.loads(plan(evaluation_network(net, batch)).to_json()),
                "materialization_plan": json.loads(plan(net).to_json()),
                "max_abs_error_vs_direct": err,
            }
        )
    return rows


def summary_bytes(batch: int, seed: int = 0) -> int:
    """Bytes :func:`summary`'s self-check holds at its peak for ``batch``
    samples (an upper estimate, from shapes alone), for the costlier model:
    the inputs and their padded copy, the direct forward pass's arrays of
    each layer, the output, and the evaluation plan's two largest operands
    (its largest intermediate, twice)."""
    most = 0
    for model in example_models(seed).values():
        floats = 2 * model.in_features + 1 + model.out_features + 1  # x, x~, the padded output
        for layer in model.layers:  # left, right, their product, the output (and the residual's sum)
            floats += 3 * layer.left.shape[0] + 2 * layer.out_features
        largest = plan(evaluation_network(model.expression, batch)).largest_intermediate
        most = max(most, 8 * (batch * floats + 2 * int(largest)))
    return most


def _check_batch(batch: int, seed: int) -> None:
    """--batch whose self-check would not fit half the available memory (as
    a product's default bound): a usage error naming the estimate and a
    --batch that fits, before anything is allocated."""
    from .problem import available_memory

    need, bound = summary_bytes(batch, seed), available_memory() // 2
    if need <= bound:
        return
    fits = max(1, int(batch * bound // need))
    if fits > 100:  # two significant digits, rounded down
        unit = 10 ** (len(str(fits)) - 2)
        fits = fits // unit * unit
    while fits > 1 and summary_bytes(fits, seed) > bound:
        fits //= 2
    raise UsageError(f"--batch {batch}: the self-check evaluates each model on {batch:,} samples, about "
                     f"{need / 1e9:.3g} GB ({need / batch:.0f} bytes a sample), over half the available memory "
                     f"({bound / 1e9:.3g} GB); give --batch {fits} or less")


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


# ------------------------------------------------------------------ helpers


def _notes(args: argparse.Namespace) -> list[str]:
    """The warnings raised since the last call (recorded by :func:`main`),
    once each: they are reported as notes, never as raw Python warnings."""
    caught = getattr(args, "_warnings", None)
    if not caught:
        return []
    said = getattr(args, "_noted", set())
    out = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if text and text not in said:
            said.add(text)
            out.append(text)
    caught.clear()
    args._noted = said
    return [_note_text(n, args) for n in out]


def _note_text(note: str, args: argparse.Namespace) -> str:
    """A note as the command line says it: on one line, about the options
    given as flags (state_key='ema' is --state-key ema), the models as files."""
    return _file_names(_cli_spelling(" ".join(note.split()), _given_paths(args))[0], args)


def _emit(args: argparse.Namespace, payload: Any, text: str, shown: Sequence[str] = ()) -> None:
    """The payload as JSON with --json, else the text; the warnings raised
    on the way join the payload's notes, or follow the text as note lines
    (but those in ``shown``, the notes the text already says: once each)."""
    notes = _notes(args)
    if notes and isinstance(payload, dict):
        given = list(payload.get("notes", ()))
        # a warning the result also notes (a dead output channel) is said once
        payload = dict(payload, notes=[*given, *(n for n in notes if n not in given)])
    text = "\n".join([text, *(f"note: {n}" for n in notes if n not in shown)])
    _write(dumps(payload, indent=2) if args.json else text)


# Python keywords of the library and the command-line options that give them
# (flag, metavar): a library message naming one is translated, and is then
# about the use of that option: a usage error (exit 2).
_OPTIONS = {
    "n_ctx": ("--n-ctx", "N"), "state_key": ("--state-key", "KEY"), "template": ("--template", "MODULE:FUNCTION"),
    "centered": ("--centered", ""), "inner": ("--inner", "NAME"), "method": ("--method", "NAME"),
    "samples": ("--samples", "N"), "rel_error": ("--rel-error", "R"), "seed": ("--seed", "S"),
    "budget": ("--budget", "F"), "per_output": ("--per-output", ""), "store": ("--store", "DIR"),
    "workers": ("--workers", "N"), "scheduler": ("--scheduler", "ADDRESS"), "tile": ("--tile", "N"),
    "max_memory": ("--max-memory", "BYTES"), "route": ("--route", "NAME"), "exact": ("--exact", ""),
    "tol": ("--tol", "T"), "degree": ("--degree", "K"), "max_bytes": ("--max-bytes", "BYTES"),
}
_KEYS = "|".join(sorted(_OPTIONS, key=len, reverse=True))
# keyword=value as a message spells an argument (not inside a model's repr,
# where it is followed by a comma or a parenthesis; a store's "written with
# seed=4, this call has seed=5" is no repr)
_KEYWORD = re.compile(rf"(?<![\w.-])({_KEYS})=(?:(True|False|'[^']*'|\"[^\"]*\"|\.\.\.)(?=[\s:;,.)]|$)"
                      rf"|([-+\w.]*\w(?:,\d{{3}})*)?(?=[\s:;]|\.(?:\s|$)|, this call |$))")  # 1,000 too; a sentence's end
_MUST = re.compile(rf"(?<![\w.-])({_KEYS})(?= must be\b)")
_HINT = re.compile(r"\s*\(--[a-z][a-z-]* on the command line\)|;\s*--[a-z][a-z-]* on the command line")
# the matrix's "route 'materialize' needs ...": --route materialize (the name may be set aside as a given value)
_ROUTE = re.compile(r"(?<![\w-])route '([^'\s]+)'")


def _given_paths(args: argparse.Namespace) -> list[str]:
    """Every path the command was given or read (longest first): a file may
    be named samples=5.pt, and is no keyword to translate."""
    found: set[str] = set()
    for value in [*vars(args).values(), *(getattr(args, "_files", None) or ())]:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)) and str(v):
                found.add(str(v))
                found.add(str(Path(v)))
    return sorted(found, key=len, reverse=True)


def _cli_spelling(message: str, keep: Sequence[str] = ()) -> tuple[str, bool]:
    """``message`` with the library's Python spellings (``n_ctx=``,
    ``state_key='ema'``, ``centered=True``, ``rel_error must be``) as the
    command line's options (``--n-ctx N``, ``--state-key ema``,
    ``--centered``, ``--rel-error must be``), and whether any was found;
    the strings of ``keep`` (the paths given) left as they are."""
    kept: list[str] = []
    for text in keep:  # whole names only: a store named "st" is no part of "store="
        mark = f"\x00{len(kept)}\x00"
        message, n = re.subn(rf"(?<![\w.\x00-]){re.escape(text)}(?![\w=\x00-])", lambda _: mark, message)
        if n:
            kept.append(text)
    translated, found = _translated(message)
    for k, text in enumerate(kept):
        translated = translated.replace(f"\x00{k}\x00", text)
    return translated, found


def _translated(message: str) -> tuple[str, bool]:
    """:func:`_cli_spelling` on a message whose paths are set aside."""

    def keyword(m: re.Match) -> str:
        flag, metavar = _OPTIONS[m.group(1)]
        value = m.group(2) or m.group(3)
        if value in (None, "..."):
            return f"{flag} {metavar}" if metavar else flag
        if value in ("True", "False"):
            return flag if value == "True" else f"without {flag}"
        if re.fullmatch(r"\d{1,3}(?:,\d{3})+", value):  # a count written 1,000: the flag takes 1000
            value = value.replace(",", "")
        return f"{flag} {value.strip(chr(39) + chr(34))}"

    text = _HINT.sub("", message).replace(" or .at(n_ctx)", "")
    text, n = _KEYWORD.subn(keyword, text)
    text = text.replace("with without --", "without --")  # "written with centered=False"
    text, k = _MUST.subn(lambda m: _OPTIONS[m.group(1)][0], text)
    text, r = _ROUTE.subn(r"--route \1", text)
    return text, bool(n or k or r)


def _file_names(message: str, args: argparse.Namespace) -> str:
    """The library's names of the models (``model a``, ``row model 2``) as
    the files they came from, where the command knows them."""
    sides = getattr(args, "_sides", None)
    if sides:
        message = re.sub(r"\bmodel ([ab])\b", lambda m: sides[m.group(1)], message)
    files = getattr(args, "_files", None)
    if files:
        message = re.sub(r"\b(?:(?:row|column) )?model (\d+)\b",
                         lambda m: str(files[int(m.group(1))]) if int(m.group(1)) < len(files) else m.group(0),
                         message)
    return message


def _template(spec: str | None) -> Callable[[], Any] | None:
    """--template MODULE:FUNCTION or FILE.py:FUNCTION -> the builder."""
    if spec is None:
        return None
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise UsageError(f"--template {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    folder = None
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UsageError(f"--template: {path}: no such file")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)
            assert spec_.loader is not None
            folder = str(path.resolve().parent)  # a template imports the user's model code beside it
            with _on_path(folder):
                spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except UsageError:
        raise
    except SystemExit as exc:  # a training script's argparse (or exit) at import: it would end the command silently
        raise UsageError(f"--template: importing {mod_name} exited (SystemExit: {exc.code}): a module that parses "
                         "arguments or exits when imported; keep that under if __name__ == '__main__'") from None
    except Exception as exc:  # noqa: BLE001 - user code: report, do not crash
        raise UsageError(f"--template: cannot import {mod_name}: {exc}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise UsageError(f"--template: {mod_name} has no attribute {fn_name!r}")
    if not callable(fn):  # (a torch module is callable): said before any checkpoint is read
        raise UsageError(f"--template {spec}: {fn_name} is {type(fn).__name__}, not a function that builds the torch "
                         "module (or a module)")
    if not inspect.isfunction(fn):  # a class, or a module (which io.load takes as it is)
        return fn

    @functools.wraps(fn)
    def build() -> Any:
        """The builder with its folder on the path (a builder importing the
        code beside it inside the function found nothing), an exit it calls
        an error (it ended the command with its code and nothing said)."""
        try:
            with _on_path(folder):
                return fn()
        except SystemExit as exc:
            raise RuntimeError(f"it called exit (SystemExit: {exc.code})") from None

    return build


@contextlib.contextmanager
def _on_path(folder: str | None) -> Iterator[None]:
    """``folder`` first on sys.path meanwhile (nothing for None)."""
    if folder is None:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


def _check_files(*paths: str) -> None:
    """Missing inputs are usage errors, reported before anything heavy is imported."""
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file or directory")


def _load_one(path: str, template: Any, state_key: str | None = None, n_ctx: int | None = None,
              max_bytes: int | None = None) -> Component:
    _check_files(path)
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{p} is a directory; this command takes one checkpoint file")
    if template is None and n_ctx is None and run_of(p) is not None:  # as matrix says it
        raise UsageError(f"{p} is a checkpoint of the language-model run {run_of(p)}: give --n-ctx (the token "
                         "positions to analyse; the weights do not depend on it)")
    return _load_at(p, template, state_key, n_ctx, max_bytes)


def _load_at(path: Any, template: Any, state_key: str | None, n_ctx: int | None, max_bytes: int | None = None) -> Any:
    """ts.load at --n-ctx positions; a model without token positions (a
    hand-written circuit beside a language model) is loaded as it is:
    --n-ctx is the analysis length of the models that have positions.  The
    error at --n-ctx stands for a language-model run (its config.json, its
    weights) and wherever loading without --n-ctx fails too."""
    from .io import MAX_CHECKPOINT_BYTES, LoadError, load

    bound = MAX_CHECKPOINT_BYTES if max_bytes is None else max_bytes
    try:
        return load(path, template, state_key=state_key, n_ctx=n_ctx, max_bytes=bound)
    except LoadError as exc:
        if n_ctx is None or (template is None and run_of(Path(path)) is not None):
            raise
        try:
            model = load(path, template, state_key=state_key, max_bytes=bound)
        except LoadError:
            raise exc from None  # the cause is the first error, not the missing n_ctx
        if _has_positions(model):
            raise exc  # it has positions: the error at --n-ctx stands
        return model


def _has_positions(model: Any) -> bool:
    """Whether ``model`` reads token positions (a setting n_ctx)."""
    return isinstance(model, Component) and any(k == "n_ctx" or k.endswith(".n_ctx") for k in model.settings())


def _check_n_ctx(args: argparse.Namespace, models: Sequence[Any]) -> None:
    """--n-ctx given where no model has token positions: an option that does
    not apply (as ts.load says; :func:`_load_at` lets such a model through
    only beside one that has them)."""
    if getattr(args, "n_ctx", None) is not None and not any(_has_positions(m) for m in models):
        raise UsageError(f"--n-ctx {args.n_ctx} does not apply: none of these models has token positions (--n-ctx is "
                         "the analysis length of language models)")


def _check_widths(named: Sequence[tuple[Any, Any]]) -> None:
    """ValueError naming the files whose models disagree on their input or
    output width (the library names model descriptions or indices)."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    for attr, what in (("in_features", "input"), ("out_features", "output")):
        groups: dict[Any, list[str]] = {}
        for name, model in named:
            width = getattr(model, attr, None)
            if width is not None:
                groups.setdefault(width, []).append(str(name))
        if len(groups) > 1:
            verb = ("takes", "take") if what == "input" else ("gives", "give")
            parts = sorted(groups.items(), key=lambda kv: -len(kv[1]))  # the odd ones out last
            raise ValueError(f"{what} widths differ: " + "; ".join(
                f"{listed(names)} {verb[len(names) > 1]} {width}" for width, names in parts))


_FUNCTIONAL = ("gaussian", "tokens")


def _check_inner(args: argparse.Namespace, models: Sequence[Any] = ()) -> None:
    """Options that do not apply to the inner product asked for, or to
    these models: usage errors named by their flags, before any work."""
    inner = getattr(args, "inner", None)
    if getattr(args, "centered", False) and inner is not None and inner not in _FUNCTIONAL:
        raise UsageError(f"--centered is defined for the functional inner products only (--inner gaussian or "
                         f"tokens), not --inner {inner}")
    from .measure import Tokens

    if inner == "tokens" and models and getattr(args, "token_probs", None) is None and not any(
            isinstance(getattr(m, "default_measure", None), Tokens) for m in models):
        raise UsageError("--inner tokens: the models do not read token ids (no token embedding); the token measure "
                         "is for language models (--inner gaussian for these)")


def _result_dict(r: Any) -> dict[str, Any]:
    return {
        "value": r.value, "quantity": r.quantity, "inner": r.inner, "method": r.method, "exact": r.exact,
        "algorithm": r.algorithm, "centered": r.centered, "measure": r.measure, "degree": r.degree,
        "lifted": r.lifted, "per_output": r.per_output, "contractions": r.contractions, "flops": r.flops,
        "pairings": r.pairings, "orbits": r.orbits, "notes": list(r.notes),
        "stderr": r.stderr, "interval": list(r.interval) if r.interval is not None else None, "samples": r.samples,
        "heavy_tailed": bool(r.estimate.heavy_tailed) if r.estimate is not None else None,  # the repr's label
    }


# ------------------------------------------------------------- similarity

MAX_TOKEN_PROBS_BYTES = 2**28  # 256 MiB: 64 positions of a 500,000-token vocabulary in float64


def _token_measure(args: argparse.Namespace, *models: Any) -> Any:
    """The token measure of ``--token-probs`` (None without it): the model's
    own vocabulary and positions, the frequencies read from the file (a .npy
    array, or text: one distribution per line); usage errors name the file."""
    if args.token_probs is None:
        return None
    if args.inner not in (None, "tokens"):
        raise UsageError(f"--token-probs belongs to the token measure, not --inner {args.inner}")
    path = Path(args.token_probs)
    if not path.is_file():
        raise UsageError(f"--token-probs {path}: no such file")
    if path.stat().st_size > MAX_TOKEN_PROBS_BYTES:
        raise UsageError(f"--token-probs {path}: {path.stat().st_size:,} bytes, above the bound of "
                         f"{MAX_TOKEN_PROBS_BYTES:,}")
    default = next((m.default_measure for m in models if getattr(m, "default_measure", None) is not None), None)
    if default is None:
        raise UsageError(f"--token-probs {path}: the models do not read token ids (no token embedding)")
    try:
        probs = np.load(path, allow_pickle=False) if path.suffix == ".npy" else \
            np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=1)
        if not isinstance(probs, np.ndarray):  # a zip (a torch file too) opens as an .npz archive
            probs.close()
            raise ValueError("an archive of arrays (.npz), not one")
    except (OSError, ValueError) as e:
        # numpy reads any file not in its format as pickled objects and advises
        # allow_pickle=, which no distribution needs and no untrusted file should be read with
        why = "not in numpy's .npy format" if "allow_pickle" in str(e) else str(e)
        raise UsageError(f"--token-probs {path}: not a numeric array ({why})") from None
    from .measure import Tokens

    try:
        return Tokens(default.vocab, default.n_ctx, probs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--token-probs {path}: {e}") from None


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of --budget, --max-memory and the sampling options
    (a usage error where these are given without --method sampled)."""
    kw: dict[str, Any] = {"budget": args.budget, "max_memory": args.max_memory}
    if getattr(args, "degree", None) is not None:
        kw["degree"] = args.degree
    if args.method == "sampled":
        kw.update(samples=args.samples, rel_error=args.rel_error, seed=args.seed)
    elif args.samples is not None or args.rel_error is not None or args.seed is not None:
        raise UsageError("--samples, --rel-error and --seed belong to --method sampled")
    return kw


def cmd_similarity(args: argparse.Namespace) -> int:
    from .inner import similarity

    _check_files(args.a, args.b)
    _check_inner(args)
    tpl = _template(args.template)
    a, b = (_load_one(path, tpl, args.state_key, args.n_ctx, args.max_bytes) for path in (args.a, args.b))
    args._sides = {"a": args.a, "b": args.b}  # the library's "model a" is this file
    _check_n_ctx(args, (a, b))
    _check_inner(args, (a, b))
    _check_widths([(args.a, a), (args.b, b)])
    kw: dict[str, Any] = {"per_output": args.per_output, **_limits(args)}
    if args.no_progress:
        kw["progress"] = False
    if args.centered:
        kw["centered"] = True
    r = similarity(a, b, args.inner, args.method, measure=_token_measure(args, a, b), **kw)
    payload = dict(_result_dict(r), a=args.a, b=args.b, model_a=repr(a), model_b=repr(b))
    if args.per_output:
        vals = np.asarray(r.value, dtype=float)
        meta = repr(r).split("  [", 1)[1] if "  [" in repr(r) else ""
        # an estimate's standard error beside each output (as the scalar repr's "±"): it may exceed the value
        errs = np.broadcast_to(np.asarray(r.stderr, dtype=float), vals.shape) if r.stderr is not None else None
        text = "\n".join([f"{args.a} vs {args.b}: per-output similarity  [{meta}",
                          *(f"  output {k}: {v:.6f}" + ("" if errs is None else f" ± {errs[k]:.2g}")
                            for k, v in enumerate(vals))])
    else:
        text = f"{args.a} vs {args.b}\n{r!r}"
    _emit(args, payload, text)
    return EXIT_OK


# ----------------------------------------------------------------- matrix

FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def _writable(path: Path, option: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")


def _matrix_outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The figure and CSV paths of ``matrix``, validated before the run:
    ``--out`` naming a folder writes matrix.png inside it; the figure format
    must be one matplotlib writes; both places must be writable."""
    out = Path(args.out)
    if out.is_dir():
        out = out / "matrix.png"
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise UsageError(f"--out {args.out}: the figure format comes from the suffix, one of "
                         f"{' '.join(FIGURE_SUFFIXES)}")
    _writable(out, "--out")
    csv_path = None
    if args.csv is not None:
        csv_path = out.with_suffix(".csv") if args.csv is True else Path(args.csv)
        if args.csv is not True:
            _not_a_checkpoint(csv_path)
        if csv_path.is_dir():
            csv_path = csv_path / "matrix.csv"
        _writable(csv_path, "--csv")
    return out, csv_path


def _not_a_checkpoint(path: Path) -> None:
    """``--csv PATH`` before the paths takes the first checkpoint (or folder
    of checkpoints) as its PATH: a CSV written there destroyed the file and
    left it out of the matrix, so such a PATH is bad usage."""
    from .io import CHECKPOINT_SUFFIXES

    folder = path.is_dir() and any(f.is_file() and f.suffix.lower() in CHECKPOINT_SUFFIXES for f in path.iterdir())
    if path.suffix.lower() in CHECKPOINT_SUFFIXES or folder:
        raise UsageError(f"--csv {path}: a checkpoint{' folder' if folder else ''}, taken as the CSV's PATH (the "
                         f"option's value is optional): give --csv after the checkpoints, or --csv=PATH")


def cmd_matrix(args: argparse.Namespace) -> int:
    _check_files(*args.paths)
    _check_inner(args)
    from .io import checkpoint_paths, load
    from .layouts import is_run_directory
    from .matrix import similarity_matrix

    tpl = _template(args.template)
    runs = [p for p in args.paths if tpl is None and is_run_directory(Path(p))]  # language-model runs
    if runs and args.n_ctx is None:
        raise UsageError(f"{runs[0]} is a language-model run: give --n-ctx (the token positions to analyse)")
    files: list[Path] = []
    for p in args.paths:
        files.extend(checkpoint_paths(Path(p) / "checkpoints" if p in runs else p))
    if len(files) < 2:
        raise UsageError(f"matrix needs at least two checkpoints, got {len(files)}")
    labels = [f.stem for f in files]
    if len(set(labels)) < len(labels):
        labels = [str(f) for f in files]
    out, csv_path = _matrix_outputs(args)  # checked before anything is computed: a bad path loses no run
    if args.tile is not None and args.store is None and args.workers is None and args.scheduler is None:
        raise UsageError("--tile applies to tiled matrices only (with --store, --workers or --scheduler)")
    if args.store is not None:
        from .matrix.cluster import store_path

        store_path(args.store)  # a --store that cannot be one, before the models are read
    models = []
    for p in args.paths:
        if p in runs:
            models.extend(load(p, n_ctx=args.n_ctx, state_key=args.state_key,
                               **({} if args.max_bytes is None else {"max_bytes": args.max_bytes})))
        else:
            models.extend(_load_at(f, tpl, args.state_key, args.n_ctx, args.max_bytes) for f in checkpoint_paths(p))
    args._files = files  # the library's "model k" is files[k]
    _check_n_ctx(args, models)
    _check_inner(args, models)
    _check_widths(list(zip(files, models)))
    kw: dict[str, Any] = _limits(args)  # under --method sampled each pair's cosine estimated by ts.similarity
    if args.centered:
        kw["centered"] = True
    res = similarity_matrix(models, inner=args.inner, method=args.method, route=args.route,
                            measure=_token_measure(args, *models),
                            progress=False if args.no_progress else None,  # as similarity: a bar on a terminal, for long work
                            workers=args.workers, scheduler=args.scheduler, store=args.store, tile=args.tile, **kw)
    values = np.asarray(res.values, dtype=float)
    if csv_path is not None:  # the data first: a figure that fails to draw loses nothing
        with open(csv_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([""] + labels)
            for lab, row in zip(labels, values):
                w.writerow([lab] + [repr(float(v)) for v in row])
    res.plot(path=out, labels=labels)
    payload = {"labels": labels, "files": [str(f) for f in files], "values": values, "inner": res.inner,
               "method": res.method, "exact": res.exact, "route": res.route, "flops": res.flops,
               "centered": bool(args.centered), "measure": res.measure, "estimated": res.estimated,
               "stderr": res.stderr, "heavy_tailed": res.heavy_tailed, "algorithms": list(res.algorithms),
               # each model's norm (null beyond float64, with a note) and its natural log, which float64 holds
               "norms": res.norms, "log_norms": res.log_norms,
               **({} if res.symmetric else {"col_norms": res.col_norms, "col_log_norms": res.col_log_norms}),
               "figure": out, "csv": csv_path,  # the notes as the text says them: the models as files
               "notes": list(dict.fromkeys(_note_text(n, args) for n in res.notes)),
               "tiles": None if res.tiles is None else asdict(res.tiles)}
    lines = [f"{len(files)} checkpoints, {res.inner}{' centred' if args.centered else ''} similarity "
             f"({res.method}{'' if res.exact else ', not exact'}; route: {res.route}; {res.flops:.3g} flops)"]
    if len(files) <= 12:
        width = max(len(x) for x in labels)
        lines.append(" " * (width + 1) + " ".join(f"{i:>7d}" for i in range(len(files))))
        for k, (lab, row) in enumerate(zip(labels, values)):
            lines.append(f"{lab:>{width}} " + " ".join(f"{v:7.4f}" for v in row) + f"   [{k}]")
    # every note of the result, once (as --json gives them; a tile's note may repeat another's), in flags
    notes = payload["notes"]
    doubts = [n for n in notes if n.startswith("HEAVY TAILS")] if res.stderr is not None else []
    if res.stderr is not None:  # estimates: their errors (each entry's in the JSON)
        lines.append(f"estimated: standard errors up to {float(np.max(res.stderr)):.2g} (--json gives each entry's)")
        lines.extend(doubts)  # beside the errors they doubt
    lines.append(f"figure: {out}" + (f"; csv: {csv_path}" if csv_path else ""))
    lines.extend(f"note: {n}" for n in notes if n not in doubts)
    _emit(args, payload, "\n".join(lines), shown=notes)  # a note also warned (an unreadable tile) is said once
    return EXIT_OK


# ----------------------------------------------------------------- verify

MAX_CIRCUIT_BYTES = 2**22  # 4 MiB of formulas: far above a circuit symbolic verification can expand

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# names a formula cannot use as an input: Python's keywords (True, lambda) and
# the constructors the formula parser writes numbers and names with
_RESERVED_NAMES = frozenset(keyword.kwlist) | {"Integer", "Float", "Rational", "Symbol"}


def _symbol_names(text: str) -> list[str]:
    """--symbols: the input names in order (spaces or commas between), each
    an ASCII identifier that is no Python keyword, as the formula reader
    takes them; else a UsageError naming --symbols (said before any model
    is read, not as an unknown name of a formula line)."""
    names = text.replace(",", " ").split()
    if not names:
        raise UsageError("--symbols names no input; give the input names in order, e.g. --symbols 'a b c'")
    for n in names:
        if not _NAME.fullmatch(n):
            raise UsageError(f"--symbols: {n[:QUOTE_CHARS]!r} is not a name a formula can use: ASCII letters, digits "
                             "and _, not starting with a digit (e.g. --symbols 'a b c' or 'x1 x2')")
        if n in _RESERVED_NAMES:
            why = "a Python keyword" if keyword.iskeyword(n) else "a name the formula parser uses"
            raise UsageError(f"--symbols: {n!r} is reserved ({why}); choose another input name")
    return names


def _on_lines(exc: ValueError, source: Path, lines: Sequence[int]) -> ValueError | None:
    """A library message about output k of the circuit (``output k: ...``,
    ``circuit output k: ...``) as one about the formula file's line of that
    output, or None for any other message."""
    m = re.match(r"(?:circuit )?output (\d+): ", str(exc))
    if m is None or isinstance(exc, CostError) or not int(m.group(1)) < len(lines):
        return None
    text = str(exc)[m.end():].replace("(exact=True)", "(--exact)")  # the command line's spelling
    return ValueError(f"{source}:{lines[int(m.group(1))]}: {text}")


def _check_formula_size(exprs: Sequence[Any], symbols: Sequence[Any], lines: Sequence[int], source: Path) -> None:
    """The formulas become one padded tensor of (outputs+1) (inputs+1)^k
    entries, k the highest total degree (at least 1); beyond the limit of
    :func:`tsalgebra.symbolic.from_sympy`, a ValueError naming the file and
    the line of the highest degree (from_sympy's own names neither)."""
    import sympy

    from .symbolic import MAX_ENTRIES

    degrees = [sympy.Poly(e, *symbols).total_degree() for e in exprs]
    k = max([1] + degrees)
    entries = (len(exprs) + 1) * (len(symbols) + 1) ** k
    if entries > MAX_ENTRIES:
        lineno = lines[degrees.index(max(degrees))]
        d, n = len(symbols), len(exprs)
        raise ValueError(f"{source}:{lineno}: refused: degree {k} over {counted(d, 'input')} and "
                         f"{counted(n, 'output')} is a padded tensor of {entries:.3g} entries ((outputs+1) "
                         f"(inputs+1)^degree), above the limit of {MAX_ENTRIES:,}; symbolic verification is for "
                         "small circuits")


def cmd_verify(args: argparse.Namespace) -> int:
    checked_names = _symbol_names(args.symbols) if args.symbols else None  # before any file is read
    _check_files(args.circuit, args.component)
    from .io import CHECKPOINT_SUFFIXES, is_checkpoint
    from .verify import verify

    lines: Sequence[int] = ()
    cpath = Path(args.circuit)
    if cpath.is_dir():  # as a checkpoint that is a directory is said (_load_one)
        raise UsageError(f"{cpath} is a directory; CIRCUIT is one checkpoint or one text file of formulas")
    if args.exact and args.method in ("closure", "sampled"):  # (ts.verify says it in Python's spelling)
        raise UsageError(f"--exact needs an exact method; --method {args.method} gives "
                         f"{'an estimate' if args.method == 'sampled' else 'an approximation'} (leave out --exact)")
    limits = _limits(args)  # before the models are read: a misplaced --samples loses nothing
    tpl = _template(args.template)
    component = _load_one(args.component, tpl, args.state_key, args.n_ctx, args.max_bytes)
    _check_inner(args, (component,))  # the component's measure is the one verify uses
    if not cpath.exists():
        raise FileNotFoundError(f"{cpath}: no such file or directory")
    if cpath.suffix.lower() in CHECKPOINT_SUFFIXES or is_checkpoint(cpath):
        circuit: Any = _load_one(args.circuit, tpl, args.state_key, args.n_ctx, args.max_bytes)
        symbols = None
        _check_n_ctx(args, (component, circuit))
    else:
        names = checked_names if checked_names is not None else (
            [f"x{i}" for i in range(1, component.in_features + 1)])
        if len(names) != component.in_features:
            raise UsageError(f"--symbols names {counted(len(names), 'input')}, the component has "
                             f"{component.in_features}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UsageError(f"--symbols names {repeated} more than once; give one distinct name per input")
        with open(cpath, "rb") as fh:  # bounded: a large data file given by mistake is not read whole
            data = fh.read(MAX_CIRCUIT_BYTES + 1)
        if len(data) > MAX_CIRCUIT_BYTES:
            raise ValueError(f"{cpath}: over {MAX_CIRCUIT_BYTES:,} bytes, the limit for a text file of formulas "
                             "(and not a checkpoint)")
        try:
            text = data.decode("utf-8-sig")  # a byte order mark (as Windows editors write) is no part of line 1
        except UnicodeDecodeError:
            raise ValueError(f"{cpath}: neither a checkpoint nor a text file of formulas") from None
        _check_n_ctx(args, (component,))
        formulas = sum(1 for raw in text.splitlines() if raw.split("#", 1)[0].strip())
        if formulas > component.out_features:  # before sympy reads them (about 0.1 ms a line): one is an output
            raise ValueError(f"{cpath}: the circuit has {counted(formulas, 'output')} (one formula a line), the "
                             f"component {component.out_features}")
        circuit = parse_formulas(text, names, str(cpath))
        import sympy

        from .verify import not_finite

        # a constant division by zero (3/0) parses to sympy's complex infinity:
        # said in words with the file, line and its text (not "x1 + zoo")
        written = [(n, raw.split("#", 1)[0].strip()) for n, raw in enumerate(text.splitlines(), start=1)]
        written = [(n, line) for n, line in written if line]
        for (lineno, line), e in zip(written, circuit):
            why = not_finite(e, line if len(line) <= QUOTE_CHARS else line[:QUOTE_CHARS] + "...")  # quoted short
            if why is not None:
                raise ValueError(f"{cpath}:{lineno}: {why}")
        lines = [n for n, _ in written]

        symbols = [sympy.Symbol(n) for n in names]
        _check_formula_size(circuit, symbols, lines, cpath)
    exact = True if args.exact else None
    measure = _token_measure(args, component)
    try:
        rep = verify(circuit, component, args.inner, exact, symbols=symbols, tol=args.tol, method=args.method,
                     **limits, **({} if measure is None else {"measure": measure}))
    except ValueError as exc:  # about one formula (a coefficient beyond float64): said with its file and line
        said = _on_lines(exc, cpath, lines)
        if said is None:
            raise
        raise said from None
    said = tuple(_cli_spelling(n, _given_paths(args))[0] for n in rep.notes)  # ts.verify's keywords as its flags
    if said != rep.notes:
        from dataclasses import replace

        rep = replace(rep, notes=said)
    payload = {
        "verdict": rep.verdict, "exact": rep.exact, "inner": rep.inner, "similarity": rep.similarity,
        "relative_residual": rep.relative_residual, "explained": rep.explained, "scale": rep.scale,
        "tolerance": rep.tolerance, "per_output": rep.per_output,
        "certificate": None if rep.certificate is None else rep.certificate_text(),
        "circuit": args.circuit, "component": args.component,
        # how the figures were obtained; under --method sampled their errors and the samples drawn
        "method": rep.method, "algorithm": rep.algorithm, "accuracy": rep.accuracy, "stderr": rep.stderr,
        "interval": rep.interval, "samples": rep.samples, "seed": rep.seed, "notes": list(rep.notes),
    }
    if rep.exact:  # the exact figures as sympy writes them, beside their float values
        payload["exact_figures"] = rep.exact_figures()  # a number too long to print: rounded
    _emit(args, payload, f"{args.circuit} vs {args.component}\n{rep!r}")
    # like cmp: a difference is exit 1, and so is a doubtful estimate (not a pass)
    return EXIT_OK if rep.verdict.startswith("equal") else EXIT_FAILED


# ------------------------------------------------------------------- plan


def cmd_plan(args: argparse.Namespace) -> int:
    from .inner import accuracy_of, plan_similarity

    _check_files(args.a, args.b)
    _check_inner(args)
    tpl = _template(args.template)
    a, b = (_load_one(path, tpl, args.state_key, args.n_ctx, args.max_bytes) for path in (args.a, args.b))
    args._sides = {"a": args.a, "b": args.b}
    _check_n_ctx(args, (a, b))
    _check_inner(args, (a, b))
    _check_widths([(args.a, a), (args.b, b)])
    measure = _token_measure(args, a, b)
    sp = plan_similarity(a, b, args.inner, args.method, centered=args.centered, per_output=args.per_output,
                         measure=measure, **_limits(args))
    inner_used = resolve_inner(args.inner, measure, a, b)[0]  # what was planned, every product refused or not
    rep = dict(sp.describe(), inner=inner_used, method=args.method, centered=args.centered, a=args.a, b=args.b,
               model_a=repr(a), model_b=repr(b))
    lines = [f"{inner_used}{' centred' if args.centered else ''} similarity of {args.a} and {args.b}, planned from "
             f"shapes (budget {args.budget:.3g} flops per product, memory bound {sp.max_memory / 1e6:.3g} MB):"]
    for label, p in sp.products:
        if isinstance(p, CostError):
            lines.append(f"  {label}: refused: {_refusal(p, args)}")
            continue
        joint = " (one joint computation for <a,b>, <a,a> and <b,b>)" if p.joint else ""
        lines.append(f"  {label}: {p.algorithm}{joint}{accuracy_of(p)}: {p.flops:.3g} flops, "
                     f"{counted(p.contractions, 'contraction')}, peak {p.peak_bytes / 1e6:.3g} MB")
        for s in p.facts.get("sums", ()):
            r = s["representative"]
            lines.append(f"      sum {s['sum']}: {counted(s['pairings'], 'pairing')} of "
                         f"{counted(s['input_legs'], 'leg')} in {counted(s['orbits'], 'orbit')}, "
                         f"{s['flops_total']:.3g} flops; costliest orbit "
                         f"{r['equation']}  [{counted(len(r['steps']), 'pairwise step')}, {r['optimizer']}, "
                         f"{s['flops_per_orbit_max']:.3g} flops]")
        lines += [f"      {name} refused: {why}" for name, why in p.refusals]
    lines.append(f"total: {counted(rep['total_contractions'], 'contraction')}, {rep['total_flops']:.3g} flops: "
                 f"{'within the budget' if rep['within_budget'] else 'REFUSED'}")
    lines += [f"--method {m}: {_cli_spelling(o.summary() if not isinstance(o, str) else o, _given_paths(args))[0]}"
              for m, o in sp.others]
    _emit(args, rep, "\n".join(lines))
    return EXIT_REFUSED if sp.refused else EXIT_OK



# ------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    from .demos.common import Diverged, OutOfMemory

    mod = importlib.import_module(f".demos.{args.demo}", __package__)
    cfg = mod.config_from_args(args)
    try:
        cfg.check()  # run() checks it too; here a setting out of range is bad usage, named by its flag
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        result = mod.run(cfg)
    except Diverged as exc:  # a learning rate too large for the training: bad usage too, named by its flag
        raise UsageError(exc.spelled(python=False)) from None
    except OutOfMemory as exc:  # its advice in run()'s keywords: the command line says its own flags
        raise MemoryError(exc.original) from None
    payload = dict(result.numbers, summary=result.summary, figure=result.figure, checkpoint_dir=result.checkpoints)
    _emit(args, payload, result.summary.rstrip("\n"))
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    _check_batch(args.batch, args.seed)  # estimated before anything is allocated
    rows = summary(args.seed, args.batch)
    if args.json:
        print(dumps(rows, indent=2))
    else:
        _print_summary(rows)
    return EXIT_OK


# ----------------------------------------------------------------- parser


def _seed_help(parser: argparse.ArgumentParser) -> None:
    """A demo's --seed (its module declares it without a help) said with
    its default, as --help says every option's."""
    for action in parser._actions:
        if "--seed" in action.option_strings and not action.help:
            action.help = f"random seed of the data and the training, >= 0 (default {action.default})"


def build_parser() -> argparse.ArgumentParser:
    from .matrix.cluster import TILES_PER_WORKER, WORKERS_PER_CPU  # --workers and --tile say the tiles' defaults

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    models = argparse.ArgumentParser(add_help=False)
    models.add_argument("--template", metavar="MODULE:FUNCTION",
                        help="function building the torch module the checkpoints hold (default: native layout)")
    models.add_argument("--n-ctx", type=_COUNT, metavar="N",
                        help="token positions at which a language-model run (config.json + checkpoints/) is analysed")
    models.add_argument("--state-key", metavar="KEY",
                        help="the state dict to read from checkpoints holding several (e.g. ema beside model)")
    models.add_argument("--max-bytes", type=_COUNT, metavar="BYTES", default=None,
                        help="bound on the tensors of one checkpoint file, checked before it is read "
                             "(default 2^32, 4 GiB)")
    inners = ("gaussian", "tokens", "symmetric", "network")
    token_probs_help = ("token frequencies for the token measure: a .npy or text file (.csv, or whitespace) "
                        "holding one distribution over the vocabulary or one per position (uniform without it)")
    inner_help = ("inner product (default: the models' own measure: tokens for models that read token ids, "
                  "else gaussian)")
    memory_help = ("memory bound in bytes on what one product's plan holds at its peak (default: half the available "
                   "memory)")
    degree_help = ("--inner symmetric: the common degree of the Bombieri product, at least the models' degree "
                   "(default: the largest model degree)")
    method_help = ("auto: exact within the budget, else an error (never an approximation); closure: Gaussian moment "
                   "closure (approximate); sampled: Monte Carlo estimate with a standard error")

    def add_limits(parser: argparse.ArgumentParser) -> None:
        """How each inner product is computed and what it may cost: the
        options a refusal suggests, shared by similarity, plan and verify."""
        parser.add_argument("--method", choices=("auto", "exact", "closure", "sampled"), default="auto",
                            help=method_help + " (default auto)")
        parser.add_argument("--budget", type=_NON_NEGATIVE, default=DEFAULT_BUDGET,
                            help=f"flop budget per inner product (default {DEFAULT_BUDGET:g})")
        parser.add_argument("--max-memory", type=_BYTES, metavar="BYTES", help=memory_help)
        parser.add_argument("--samples", type=_SAMPLES,
                            help="--method sampled: number of samples, at least 2 (default 10000)")
        parser.add_argument("--rel-error", type=_FRACTION,
                            help="--method sampled: sample until this relative standard error (in (0, 1); default: "
                                 "none, the --samples alone)")
        parser.add_argument("--seed", type=_SEED, help="--method sampled: random seed, >= 0 (reproducible estimates; "
                                                       "default: none, a fresh seed each run)")

    # the question about one pair, as similarity asks it and plan plans it
    pair = argparse.ArgumentParser(add_help=False)
    pair.add_argument("--inner", choices=inners, default=None, help=inner_help)
    pair.add_argument("--per-output", action="store_true", help="one similarity per output channel")
    pair.add_argument("--centered", action="store_true", help="centred gaussian (covariance of the outputs)")
    pair.add_argument("--token-probs", metavar="PATH", help=token_probs_help)
    pair.add_argument("--degree", type=_COUNT, metavar="K", help=degree_help)
    add_limits(pair)

    parser = _Parser(prog="tsalgebra", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tsalgebra {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("similarity", parents=[common, models, pair], help="tensor similarity of two checkpoints",
                       description="Similarity (a cosine) of two checkpoints under one inner product, with the "
                                   "method, exactness and cost.")
    s.add_argument("a", help="checkpoint file")
    s.add_argument("b", help="checkpoint file")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (one shows on a terminal when the "
                                                                "computation is long)")
    # each command's parser is its namespace's _usage: a usage error found
    # after parsing prints that command's usage line, not the top level's
    s.set_defaults(func=cmd_similarity, _usage=s)

    m = sub.add_parser("matrix", parents=[common, models], help="similarity matrix over checkpoints, as a heatmap",
                       description="N x N similarity matrix over checkpoint files and directories (their files in "
                                   "natural step order), drawn as a heatmap; progress on stderr.")
    m.add_argument("paths", nargs="+", help="checkpoint files and/or directories of checkpoints")
    m.add_argument("--out", default="matrix.png", help="figure path (default matrix.png; format from the suffix)")
    m.add_argument("--csv", nargs="?", const=True, default=None, metavar="PATH",
                   help="also write the matrix as CSV (default: the figure path with .csv)")
    m.add_argument("--inner", choices=inners, default=None, help=inner_help)
    m.add_argument("--centered", action="store_true", help="centred gaussian")
    m.add_argument("--degree", type=_COUNT, metavar="K", help=degree_help)
    m.add_argument("--token-probs", metavar="PATH",
                   help=token_probs_help)
    m.add_argument("--method", choices=("auto", "exact", "closure", "sampled"), default="auto",
                   help="as for similarity; sampled estimates each product pair by pair (default auto)")
    m.add_argument("--budget", type=_NON_NEGATIVE, default=DEFAULT_BUDGET,
                   help=f"flop budget per inner product (default {DEFAULT_BUDGET:g})")
    m.add_argument("--max-memory", type=_BYTES, metavar="BYTES",
                   help="memory bound in bytes on the route's blocks and each pairwise product (default: a quarter "
                        "of the available memory)")
    m.add_argument("--route", choices=ROUTES, default="auto",
                   help="auto: the cheapest route within --max-memory, else pair by pair; or one route by name "
                        "(default auto)")
    m.add_argument("--samples", type=_SAMPLES, help="--method sampled: samples per product, at least 2 (default 10000)")
    m.add_argument("--rel-error", type=_FRACTION,
                   help="--method sampled: sample each pair until this relative standard error (in (0, 1); "
                        "default: none, the --samples alone)")
    m.add_argument("--seed", type=_SEED, help="--method sampled: random seed, >= 0 (default: none, a fresh seed "
                                              "each run)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    where = m.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_workers, metavar="N",
                       help=f"tiles on a local dask cluster of N worker processes, at most {WORKERS_PER_CPU} per CPU "
                            "(pip install tsalgebra[distributed])")
    where.add_argument("--scheduler", metavar="ADDRESS", help="tiles on the dask cluster at ADDRESS (tcp://host:8786)")
    m.add_argument("--store", metavar="DIR",
                   help="keep every finished tile in DIR; a rerun with the same checkpoints and options computes "
                        "only the missing tiles")
    m.add_argument("--tile", type=_COUNT, metavar="N",
                   help=f"models a tile side (default: the largest side giving at least {TILES_PER_WORKER} tiles "
                        "per worker whose models fit the memory bound; a --store's own side when it has one)")
    m.set_defaults(func=cmd_matrix, _usage=m)

    v = sub.add_parser("verify", parents=[common, models], help="is a circuit faithful to a component?",
                       description="Compare a circuit with a component over all inputs. CIRCUIT is a checkpoint, "
                                   "or a text file with one polynomial per output line in x1..xd (numbers, "
                                   "symbols, + - * / ^ ( ); '#' comments). The inner products are computed as "
                                   "similarity computes them (--method, --budget, --max-memory); under --method "
                                   "closure or sampled the verdict is in floating point (sampled: equal where the "
                                   "95 % interval reaches within --tol).")
    v.add_argument("circuit", help="formula file or checkpoint")
    v.add_argument("component", help="checkpoint file")
    v.add_argument("--inner", choices=("gaussian", "tokens", "symmetric"), default=None,
                   help="function-level inner product (default: the component's own measure: tokens for a model "
                        "that reads token ids, else gaussian)")
    v.add_argument("--token-probs", metavar="PATH", help=token_probs_help)
    v.add_argument("--exact", action="store_true",
                   help="exact arithmetic on the stored floats (small models; not with --method closure or sampled)")
    v.add_argument("--tol", type=_TOL, default=1e-9,
                   help=f"tolerance (>= 0 and < {TOL_BELOW:g}) on the relative residual (float mode; default 1e-09)")
    v.add_argument("--symbols", help="input names in order, e.g. 'a b c' (default x1..xd)")
    add_limits(v)  # what a refusal of verify's inner products suggests is an option of verify
    v.set_defaults(func=cmd_verify, _usage=v)

    p = sub.add_parser("plan", parents=[common, models, pair], help="contraction plans and cost estimates",
                       description="The contractions the exact engine would run for the similarity of A and B: "
                                   "per inner product the pairings, their orbits, the plan of a representative "
                                   "orbit network, FLOP and memory estimates, and totals. Nothing is contracted.")
    p.add_argument("a", help="checkpoint file")
    p.add_argument("b", help="checkpoint file")
    p.set_defaults(func=cmd_plan, _usage=p)

    d = sub.add_parser("demo", help="grokking | backdoor | language: train, checkpoint, compare, plot",
                       description="Self-contained demonstrations (no download). See docs/user-guide.md.")
    dsub = d.add_subparsers(dest="demo", required=True, metavar="DEMO")
    from .demos import backdoor as _bd
    from .demos import grokking as _gk

    g = dsub.add_parser("grokking", parents=[common], help="modular addition: memorization, grokking, similarity",
                        description=_gk.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _gk.add_arguments(g)
    _seed_help(g)
    g.set_defaults(_usage=g)
    b = dsub.add_parser("backdoor", parents=[common], help="digits with a trigger: which class changed",
                        description=_bd.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _bd.add_arguments(b)
    _seed_help(b)
    b.set_defaults(_usage=b)
    from .demos import language as _lm

    lm = dsub.add_parser("language", parents=[common], help="a bilinear-attention language model learns induction",
                         description=_lm.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _lm.add_arguments(lm)
    _seed_help(lm)
    lm.set_defaults(_usage=lm)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("summary", parents=[common], help="build two small models and print their expressions and contraction plans")
    s.add_argument("--seed", type=_SEED, default=0, help="random seed of the models and inputs, >= 0 (default 0)")
    s.add_argument("--batch", type=_COUNT, default=32, help="batch size of the evaluation plan (default 32)")
    s.set_defaults(func=cmd_summary, _usage=s)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse itself exits
    with 2 on a usage error)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    options = argv[: argv.index("--")] if "--" in argv else argv
    _Parser.json_errors = any(len(a) >= 3 and "--json".startswith(a) for a in options)  # argparse takes --js too
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the parser imports the commands: an error as any other
        return _fail(argparse.Namespace(json=_Parser.json_errors), EXIT_INTERRUPTED, "interrupted")
    with warnings.catch_warnings(record=True) as caught:  # the library's warnings become notes
        warnings.simplefilter("always")
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)  # (Python's own default: not for the user of a command)
        args._warnings = caught
        return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except UsageError as exc:
        getattr(args, "_usage", parser).print_usage(sys.stderr)  # the command's usage line, its options
        return _fail(args, EXIT_USAGE, str(exc))
    except FileNotFoundError as exc:
        return _fail(args, EXIT_USAGE, str(exc))
    except TemplateError as exc:  # the option the checkpoints need is the wrong one: usage, named by its flag
        getattr(args, "_usage", parser).print_usage(sys.stderr)
        spec = getattr(args, "template", None)
        return _fail(args, EXIT_USAGE, f"--template {spec} cannot read {exc.path}: {exc.problem}" if spec
                     else str(exc))
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`): not our failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except CostError as exc:  # the alternatives spelled as this command's flags
        alternatives = [a.spelled(cli=True) for a in _passable(exc.alternatives, args)]
        if isinstance(exc, NotApplicableError):  # no algorithm answers it at any cost: an option that does not apply
            return _fail(args, EXIT_USAGE, _refusal(exc, args), **({"alternatives": alternatives} if alternatives
                                                                    else {}))
        return _fail(args, EXIT_REFUSED, _refusal(exc, args), alternatives=alternatives)
    except (ValueError, TypeError) as exc:  # a library message naming a keyword is about that option: usage
        if message_of(exc) is None:
            return _fail(args, EXIT_FAILED, _unexpected(exc))
        text, usage = _cli_spelling(str(exc), _given_paths(args))
        return _fail(args, EXIT_USAGE if usage else EXIT_FAILED, _file_names(text, args))
    except (ArithmeticError, RuntimeError, OSError, ImportError, MemoryError) as exc:
        refused = out_of_memory(exc)
        if refused is not None:  # an allocation this machine refused (torch's is a RuntimeError): said as such
            # (an exception is true even without a message: MemoryError() said "out of memory ()")
            return _fail(args, EXIT_FAILED, f"out of memory ({refused}); {_memory_advice(args)}")
        if message_of(exc) is None:
            return _fail(args, EXIT_FAILED, _unexpected(exc))
        return _fail(args, EXIT_FAILED, _file_names(_cli_spelling(str(exc), _given_paths(args))[0], args))
    except Exception as exc:  # noqa: BLE001 - the last resort: a kind of error not foreseen, said, not a traceback
        return _fail(args, EXIT_FAILED, _unexpected(exc))
    except KeyboardInterrupt:  # Ctrl-C: an error as any other (the JSON error object with --json)
        return _fail(args, EXIT_INTERRUPTED, "interrupted")
    finally:
        for note in _notes(args):  # warnings not reported with an output (a failure, say)
            _write(f"tsalgebra: note: {note}", sys.stderr)


# the options that make a command hold less memory, in the order advised: a
# command's out-of-memory message names those it takes (its parser's options);
# a demo's are its own sizes (its memory_advice)
_SMALLER = ("--batch", "--n-ctx", "--samples", "--tile", "--budget", "--max-memory")


def _memory_advice(args: argparse.Namespace) -> str:
    """What to try after an allocation this machine refused, in options of
    the command that was run only (``matrix`` also: fewer checkpoints; a
    demo: the sizes its memory check weighs, not --budget)."""
    demo = getattr(args, "demo", None)
    if demo is not None:
        return "try " + importlib.import_module(f".demos.{demo}", __package__).memory_advice()
    command = getattr(args, "_usage", None)
    flags = {f for action in getattr(command, "_actions", ()) for f in action.option_strings}
    smaller = [f for f in _SMALLER if f in flags]
    advice = ["fewer checkpoints"] if getattr(command, "prog", "").endswith(" matrix") else []
    if smaller:
        advice.append("a smaller " + (smaller[0] if len(smaller) == 1 else
                                      ", ".join(smaller[:-1]) + " or " + smaller[-1]))
    return ("try " + " or ".join(advice)) if advice else "free some memory, or run it on a larger machine"


def _passable(alternatives: Sequence[Alternative], args: argparse.Namespace) -> list[Alternative]:
    """The alternatives this command can be given: an option it has, with a
    value its parser accepts (``verify`` has no --inner network, no command
    but ``matrix`` a --route, none an --algorithm); under ``verify --exact``
    no approximate or estimated method."""
    command = getattr(args, "_usage", None)
    if command is None:
        return list(alternatives)
    actions = {flag: action for action in command._actions for flag in action.option_strings}
    out = []
    for alt in alternatives:
        action = actions.get("--" + alt.option.replace("_", "-"))
        if action is None:
            continue
        text = format_count(alt.value) if isinstance(alt.value, (int, float)) else str(alt.value)  # as spelled
        try:
            value = action.type(text) if callable(action.type) else text
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        if action.choices is not None and value not in action.choices:
            continue
        if alt.option == "method" and value in ("closure", "sampled") and getattr(args, "exact", False):
            continue
        out.append(alt)
    return out


def _refusal(exc: CostError, args: argparse.Namespace) -> str:
    """A refusal in the command line's spelling: the alternatives this
    command takes (:func:`_passable`) as flags, a keyword in its reason too
    (max_memory=, method='closure')."""
    alternatives = _passable(exc.alternatives, args)
    text = exc.reason + (". Alternatives: " + "; ".join(a.spelled(cli=True) for a in alternatives)
                         if alternatives else "")  # CostError.explain(cli=True), with only these alternatives
    return _file_names(_cli_spelling(text, _given_paths(args))[0], args)


def _unexpected(exc: BaseException) -> str:
    """An exception of a kind the command does not expect, in one line: its
    type, message and the innermost place of the user's code it came from
    (a --template builder), else a bug of tsalgebra's to report."""
    text = f"unexpected {raised(exc)}"
    frames = traceback.extract_tb(exc.__traceback__)
    package = Path(__file__).resolve().parent
    libraries = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    users = [f for f in frames if not f.filename.startswith("<") and not any(  # "<frozen ...>": Python's own
        Path(f.filename).resolve().is_relative_to(p) for p in (package, *libraries))]
    if users:
        return f"{text} (raised in {users[-1].filename}, line {users[-1].lineno}, in {users[-1].name})"
    where = f" (at {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{text}{where}; this is a bug in tsalgebra, please report it"


def _fail(args: argparse.Namespace, code: int, message: str, **extra: Any) -> int:
    """The error on stderr (with the warnings raised before it, as notes),
    and with --json as a JSON object on stdout."""
    _write(f"tsalgebra: error: {message}", sys.stderr)
    notes = _notes(args)
    for note in notes:
        _write(f"tsalgebra: note: {note}", sys.stderr)
    if getattr(args, "json", False):  # a reader of it that has gone is no second error (see _write)
        _write(json.dumps({"error": message, "exit_code": code, **extra, **({"notes": notes} if notes else {})},
                          indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
