"""The values the inner-product algorithms exchange.

- :class:`InnerProblem`: what is asked (two models, an inner product, a
  measure, options), validated once;
- :class:`Plan`: what an algorithm would run for it, with its cost (flops,
  peak bytes, contractions), made from shapes without contracting;
- :class:`InnerResult`: a number with the facts needed to trust it;
- :class:`CostError`: a refusal that states the estimate and the
  alternatives, spelled for Python or for the command line.

Nothing here computes: algorithms live in :mod:`tsalgebra.algorithms`.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .components import Component
from .expr import Network, Sum
from .measure import Gaussian, Measure, Tokens
from .messages import counted

__all__ = ["Alternative", "CostError", "MemoryBoundError", "NotApplicableError", "DEFAULT_BUDGET", "INNERS", "METHODS",
           "InnerProblem", "InnerResult", "Plan", "RoundingError",
           "available_memory", "bound_measure", "cgroup_memory", "check_arguments", "check_degree", "check_flags", "check_sampling", "checked_budget",
           "checked_memory", "default_max_memory", "degree_of", "format_count", "positions_of", "resolve_inner", "rounded_up"]

INNERS = ("gaussian", "tokens", "symmetric", "network")
FUNCTIONAL = ("gaussian", "tokens")  # E over the input measure of f . g: the name is the measure's kind
METHODS = ("auto", "exact", "closure", "sampled")
# Flops of one inner product's contractions together, by default: seconds at
# the rates measured here (10-70 GF/s for the algorithms' own products).  The
# token inner product of one attention layer at the field's language-model
# shape (vocabulary 4096, d_model 256, 8 heads, 4 positions) plans 1.46e11
# flops and runs in about 3 s; 1e11 refused it while admitting the similarity
# of the same models (three products of one budget each).
DEFAULT_BUDGET = 2e11
# The memory bound of one product when max_memory= is not given: this share
# of the memory available when the problem is made.  Similarity matrices keep
# their own default (a quarter of the device's: tsalgebra.matrix.ops).
DEFAULT_MEMORY_SHARE = 0.5
_FALLBACK_MEMORY = 8 * 2**30  # when the available memory cannot be read


# Where the cgroup file systems are mounted and where this process's cgroups
# are named: module-level so that a test can point them at a fake tree.
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
# A cgroup v1 limit at or above this is no limit: the kernel writes "none" as
# about 2**63 rounded down to a page (9223372036854771712).
_NO_CGROUP_LIMIT = 2**60


def available_memory() -> int:
    """Bytes of RAM available now: the host's (psutil, else /proc/meminfo,
    else 8 GiB), or less where this process's memory cgroup allows less
    (:func:`cgroup_memory`: a container's limit, which the host's figures do
    not see) or its limits do (:func:`_limit_room`: ``ulimit -v`` and
    ``ulimit -d``); the one reading of it, for the products' and the
    matrices' defaults."""
    room = [r for r in (_host_memory(), cgroup_memory(), _limit_room()) if r is not None]
    return min(room)


def _host_memory() -> int:
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _FALLBACK_MEMORY


# The resource limits on memory and what each counts, as /proc/self/status
# reports it: RLIMIT_AS every mapping (VmSize), RLIMIT_DATA the private
# writable ones (VmData: the heap and numpy's and torch's large arrays, which
# are anonymous mappings; Linux 4.7 on).
_LIMITS = (("RLIMIT_AS", "VmSize:"), ("RLIMIT_DATA", "VmData:"))


def _limit_room() -> int | None:
    """Bytes this process's resource limits leave it: over ``ulimit -v``
    (RLIMIT_AS) and ``ulimit -d`` (RLIMIT_DATA), the soft limit less what it
    counts now (an allocation beyond fails however much RAM is free); None
    without a finite limit, or where ``resource`` or /proc/self/status
    cannot be read."""
    try:
        import resource

        limits = {key: resource.getrlimit(getattr(resource, name))[0] for name, key in _LIMITS}
        limits = {key: int(v) for key, v in limits.items() if v != resource.RLIM_INFINITY and v >= 0}
        if not limits:
            return None
        used = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key + ":" in limits:
                    used[key + ":"] = int(value.split()[0]) * 1024  # kB
    except (ImportError, AttributeError, OSError, ValueError, IndexError):
        return None
    room = [max(limit - used[key], 0) for key, limit in limits.items() if key in used]
    return min(room) if room else None


def cgroup_memory(root: str | os.PathLike[str] | None = None) -> int | None:
    """Bytes the memory cgroups of this process leave it: the smallest
    limit minus usage over its cgroup and those above it, under ``root``
    (default :data:`CGROUP_ROOT`), by cgroup v2 (``memory.max``, "max"
    meaning none, minus ``memory.current``) and v1
    (``memory/memory.limit_in_bytes``, a huge value meaning none, minus
    ``memory.usage_in_bytes``).  The usage leaves out the inactive file
    cache of ``memory.stat`` where it says it (the kernel reclaims it before
    refusing memory, as MemAvailable counts it available).  None where no
    limit is set or none can be read."""
    base = Path(CGROUP_ROOT if root is None else root)
    own = _own_cgroups()
    room = [r for r in (_cgroup_room(d, "memory.max", "memory.current", "inactive_file")
                        for d in _levels(base, own.get("")))
            if r is not None]
    room += [r for r in (_cgroup_room(d, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                         for d in _levels(base / "memory", own.get("memory")))
             if r is not None]
    return min(room) if room else None


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup paths: "" for v2's, "memory" for v1's memory
    controller ({} where /proc/self/cgroup cannot be read)."""
    out: dict[str, str] = {}
    try:
        for line in SELF_CGROUP.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out.setdefault(c, path)
    except (OSError, ValueError):
        pass
    return out


def _levels(base: Path, own: str | None) -> list[Path]:
    """The cgroup directories whose limits bind a process in ``own`` (a path
    under ``base``): its own up to ``base``.  A cgroup namespace (a
    container) mounts the process's own cgroup at ``base``, where ``own``
    is "/" or not found under it: then ``base`` alone."""
    levels = []
    if own and own.strip("/") and ".." not in Path(own).parts:  # outside the namespace's root: not under base
        d = base / own.strip("/")
        if d.is_dir():
            while d != base and base in d.parents:
                levels.append(d)
                d = d.parent
    return levels + [base]


def _cgroup_room(d: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    """Limit minus usage (less its inactive file cache) in cgroup ``d``;
    None without a limit or where the files cannot be read."""
    try:
        text = (d / limit_file).read_text().strip()
        if text == "max":
            return None
        limit = int(text)
        if limit >= _NO_CGROUP_LIMIT:
            return None
        usage = int((d / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                usage -= min(int(value), usage)
                break
    except (OSError, ValueError):
        pass
    return max(limit - usage, 0)


def default_max_memory() -> int:
    """The memory bound of one inner product when ``max_memory`` is not given."""
    return int(available_memory() * DEFAULT_MEMORY_SHARE)


def checked_memory(max_memory: Any) -> int | None:
    """``max_memory`` as a whole number of bytes (None stays None: the
    caller's default): a real number >= 1 (numpy's too; not a bool, a
    string, NaN or inf).  Any finite size is kept (1e300 too: a bound no
    plan reaches); the result is a Python int, which this accepts again
    (callers check twice, and np.isfinite refused ints of 2**63 and more)."""
    if max_memory is None:
        return None
    if isinstance(max_memory, (bool, np.bool_)) or not isinstance(max_memory, numbers.Real):
        raise ValueError(f"max_memory must be a positive number of bytes (such as 1e9), got {max_memory!r}")
    if isinstance(max_memory, numbers.Integral):
        value = int(max_memory)
    else:
        x = float(max_memory)
        if not math.isfinite(x):
            raise ValueError(f"max_memory must be a positive number of bytes (such as 1e9), finite, got "
                             f"{max_memory!r}; leave it out for the default bound")
        value = math.floor(x)
    if value < 1:
        raise ValueError(f"max_memory must be a positive number of bytes (such as 1e9), got {max_memory!r}")
    return value


def rounded_up(x: float) -> float:
    """``x`` rounded up to two significant digits: a budget or a memory bound
    to suggest, which then admits the estimate it was made from."""
    step = 10.0 ** (math.floor(math.log10(max(x, 1.0))) - 1)
    return math.ceil(x / step) * step


def format_count(x: float | int) -> str:
    """A count or flop figure as text, for any magnitude (a Python int too
    large for a float prints as a power of ten; never raises)."""
    if isinstance(x, int) and not isinstance(x, bool):
        if x.bit_length() < 1000:
            return f"{float(x):.3g}"
        # mantissa and exponent from the log (float(x) overflows): 3.27e+45154
        log = math.log10(abs(x))
        exponent = math.floor(log)
        mantissa = float(f"{10 ** (log - exponent):.3g}")
        if mantissa >= 10:  # 9.996 rounds to 10
            mantissa, exponent = mantissa / 10, exponent + 1
        return f"{'-' if x < 0 else ''}{mantissa:.3g}e+{exponent}"
    return f"{x:.3g}"


# What ts.similarity says of a per-output similarity with dead channels (NaN),
# in its warning and in the result's notes: exact (a zero norm) or estimated.
DEAD_CHANNELS = "some output channels have zero norm; their similarity is NaN"
DEAD_ESTIMATED = "some output channels have a self-product estimated at or below 0; their similarity is NaN"
# How an estimate whose samples are heavy-tailed is labelled, alone or in a matrix.
HEAVY_TAILS = "heavy tails: the error bar is doubtful"


# ---------------------------------------------------------------- refusals


@dataclass(frozen=True)
class Alternative:
    """Another way to ask: an option of :func:`tsalgebra.inner` (and of the
    command line) with the value to give it, and what it would give."""

    option: str
    value: Any
    why: str = ""

    def spelled(self, cli: bool = False) -> str:
        if isinstance(self.value, (int, np.integer)) and not isinstance(self.value, (bool, np.bool_)):
            value = str(int(self.value))  # an integer's digits: samples=3.09e+08 was refused as no integer
        elif isinstance(self.value, (int, float)):
            value = format_count(self.value)
        else:
            value = str(self.value) if cli else repr(self.value)
        text = f"--{self.option.replace('_', '-')} {value}" if cli else f"{self.option}={value}"
        return f"{text} ({self.why})" if self.why else text


class CostError(ValueError):
    """A refusal: the estimated cost exceeds the budget, or no algorithm
    applies; nothing large was allocated.  ``flops`` is the cheapest estimate
    (a float; inf when the work cannot even be enumerated or nothing applies),
    ``alternatives`` other ways to ask; ``extrapolated``: the estimate
    extrapolates the part of the work planned before the limit was passed
    (the rest may cost more)."""

    def __init__(self, reason: str, *, flops: float = math.inf,
                 alternatives: tuple[Alternative, ...] = (), extrapolated: bool = False) -> None:
        self.reason, self.flops, self.alternatives = reason, float(flops), tuple(alternatives)
        self.extrapolated = extrapolated
        super().__init__(self.explain())

    def explain(self, cli: bool = False) -> str:
        """The message, with the alternatives in Python (``budget=...``) or
        command-line (``--budget ...``) spelling."""
        if not self.alternatives:
            return self.reason
        return f"{self.reason}. Alternatives: " + "; ".join(a.spelled(cli) for a in self.alternatives)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes with its fields
        return (_cost_error, (self.reason, self.flops, self.alternatives, self.extrapolated))


class RoundingError(ArithmeticError):
    """A run whose float64 rounding left no digit of its answer (a centred
    product taken as E[f.g] - E[f].E[g] with means far above the spread):
    the automatic choice hands the problem to the next algorithm."""


class MemoryBoundError(CostError, MemoryError):
    """A refusal because the work would exceed a memory bound (``max_memory``):
    a :class:`CostError` with the estimate and the alternatives, and a
    MemoryError for code that catches those.  ``needed``: the bytes the
    cheapest plan refused for memory would take at its peak (inf: unknown)."""

    def __init__(self, reason: str, *, needed: float = math.inf, flops: float = math.inf,
                 alternatives: tuple[Alternative, ...] = (), extrapolated: bool = False) -> None:
        self.needed = float(needed)
        super().__init__(reason, flops=flops, alternatives=alternatives, extrapolated=extrapolated)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_memory_bound_error, (self.reason, self.needed, self.flops, self.alternatives, self.extrapolated))


class NotApplicableError(CostError):
    """A refusal because no algorithm of the method asked supports the
    question, at any cost (the network product of attention layers, say): no
    budget or memory bound answers it; ``alternatives`` name another inner
    product or method where one does.  ``flops`` is inf."""

    def __init__(self, reason: str, *, alternatives: tuple[Alternative, ...] = ()) -> None:
        super().__init__(reason, alternatives=alternatives)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_not_applicable_error, (self.reason, self.alternatives))


def _not_applicable_error(reason: str, alternatives: tuple[Alternative, ...]) -> NotApplicableError:
    return NotApplicableError(reason, alternatives=alternatives)


def _cost_error(reason: str, flops: float, alternatives: tuple[Alternative, ...],
                extrapolated: bool = False) -> CostError:
    return CostError(reason, flops=flops, alternatives=alternatives, extrapolated=extrapolated)


def _memory_bound_error(reason: str, needed: float, flops: float, alternatives: tuple[Alternative, ...],
                        extrapolated: bool) -> MemoryBoundError:
    return MemoryBoundError(reason, needed=needed, flops=flops, alternatives=alternatives, extrapolated=extrapolated)


# ---------------------------------------------------------------- problems


def check_sampling(method: str, options: dict[str, Any]) -> None:
    """ValueError naming a bad sampling option (or one given without
    method='sampled' or algorithm='sampled', where it would be silently
    ignored)."""
    samples, rel_error, seed = options.get("samples"), options.get("rel_error"), options.get("seed")
    given = [k for k in ("samples", "rel_error", "seed", "device") if options.get(k) is not None]
    if given and method != "sampled" and options.get("algorithm") != "sampled":
        raise ValueError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to method='sampled'")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, (int, np.integer))
                                or samples < 2):
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    if rel_error is not None and (isinstance(rel_error, (bool, np.bool_)) or not isinstance(rel_error, numbers.Real)
                                  or not 0 < rel_error < 1):  # numpy's floats too (float32 was refused)
        raise ValueError(f"rel_error must be a number in (0, 1), got {rel_error!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if options.get("device") is not None:
        from .arrays import checked_device

        checked_device(options["device"])


def check_flags(options: dict[str, Any]) -> None:
    """ValueError naming a yes/no option given something else ("yes", 0,
    None): any truthy value was taken as True, silently."""
    for name in ("centered", "per_output", "orbits"):
        if name in options and not isinstance(options[name], (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {options[name]!r}")
        if name in options:
            options[name] = bool(options[name])


def positions_of(model: Any) -> int:
    """The positions a sequence model reads (its own ``n_ctx``, or that of its
    first attention layer); 1 for models of one vector."""
    n = getattr(model, "n_ctx", 0)
    if n:
        return int(n)
    for layer in getattr(model, "layers", ()):
        if getattr(layer, "n_ctx", 0):
            return int(layer.n_ctx)
    return 1


def _terms(model: Any, data: bool = True) -> list[tuple[Any, Network]]:
    """A model as weighted networks, bilinear nodes symmetrized so their swaps
    are declared symmetries; with ``data=False`` shapes only (for planning)."""
    if isinstance(model, Component):
        return [(1, model.network(symmetric=True, data=data))]
    if isinstance(model, Network):
        return [(1, model)]
    if isinstance(model, Sum):
        return list(model.terms)
    raise TypeError(f"expected a tsalgebra model, network or Sum, got {type(model).__name__}")


def _widths(terms: list[tuple[Any, Network]], what: str) -> tuple[int, int]:
    """(padded input width, padded output width) shared by the terms."""
    ins = {n.sizes[l] for _, n in terms for l in n.inputs}
    outs = set()
    for _, n in terms:
        if len(n.outputs) != 1:
            raise ValueError(f"{what}: inner products need one output leg, got {n.outputs}")
        outs.add(n.sizes[n.outputs[0]])
    if len(ins) > 1 or len(outs) != 1:
        raise ValueError(f"{what}: terms disagree on widths (inputs {sorted(ins)}, outputs {sorted(outs)})")
    return (ins.pop() if ins else 0), outs.pop()


def degree_of(model: Any) -> int:
    """The largest number of input copies of a term of the model (its degree)."""
    return max(n.degree for _, n in _terms(model, False))


def check_arguments(inner: str, method: str, centered: bool) -> None:
    """ValueError for an unknown inner product or method, or a combination
    that is not defined (closure is a Gaussian method; centring needs a
    measure)."""
    if inner not in INNERS:
        raise ValueError(f"inner must be one of {INNERS}, got {inner!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "closure" and inner != "gaussian":
        raise ValueError("method='closure' is a Gaussian moment method; use it with inner='gaussian'")
    if method == "sampled" and inner not in FUNCTIONAL:
        raise ValueError("method='sampled' estimates the functional inner products (gaussian, tokens): an "
                         f"expectation over inputs; {inner!r} is not one")
    if centered and inner not in FUNCTIONAL:
        raise ValueError("centered=True is defined for the functional inner products only (gaussian, tokens)")


def resolve_inner(inner: str | None, measure: Measure | None, *models: Any) -> tuple[str, Measure | None]:
    """The inner product asked for and its measure.  ``inner=None``: the
    functional product under ``measure``, else under the models' own default
    measure (a token embedding's :class:`Tokens`: the first model that has
    one, so a hand-written circuit on one-hot tokens is compared with a
    language model under the model's measure, in either order), else the
    Gaussian one; "tokens" without a measure takes that default."""
    def models_default() -> Measure | None:  # read only where asked for: a Tokens too wide to build is no
        # reason to refuse the Gaussian question (vocab 50,000 at 400 positions)
        return next((d for d in (getattr(m, "default_measure", None) for m in models) if d is not None), None)

    if measure is not None and not isinstance(measure, Measure):  # was blamed on an inner= never given
        what = f"the class {measure.__name__}, not an instance" if isinstance(measure, type) else repr(measure)
        raise TypeError(f"measure must be a ts.Gaussian(...) or ts.Tokens(...), got {what}")
    if inner is None:
        if measure is None:
            try:
                measure = models_default()
            except ValueError as exc:  # the models' token measure cannot be built: the other question can be asked
                raise ValueError(f"{exc}; or the Gaussian question of these models: inner='gaussian'") from None
        inner = "tokens" if isinstance(measure, Tokens) else "gaussian"
    if inner == "tokens" and measure is None:
        default = models_default()
        if not isinstance(default, Tokens):
            raise ValueError("inner='tokens' needs measure=ts.Tokens(vocab) (or a model converted from a token "
                             "embedding, which carries it)")
        measure = default
    if inner == "gaussian" and measure is not None and not isinstance(measure, Gaussian):
        raise ValueError(f"inner='gaussian' takes a Gaussian measure, not {measure!r}; leave inner out (or "
                         f"inner='{'tokens' if isinstance(measure, Tokens) else 'gaussian'}')")
    if inner == "tokens" and not isinstance(measure, Tokens):
        raise ValueError(f"inner='tokens' takes measure=ts.Tokens(...), not {measure!r}")
    return inner, measure


def check_degree(inner: str, options: dict[str, Any]) -> None:
    """``degree=`` in ``options``: None, or a positive int (stored as int)
    of the symmetric product only (elsewhere it would be silently ignored)."""
    degree = options.get("degree")
    if degree is None:
        return
    if isinstance(degree, (bool, np.bool_)) or not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"degree must be a positive integer or None, got {degree!r}")
    if inner != "symmetric":
        raise ValueError(f"degree= belongs to inner='symmetric' (the common degree of the Bombieri "
                         f"product), not to {inner!r}")
    options["degree"] = int(degree)


def checked_budget(budget: Any) -> float:
    """``budget=`` as a float: a non-negative real number (numpy's too; not
    a bool, a string or NaN); inf, or an integer beyond float's range, is no
    limit (inf)."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Real) or not budget >= 0:  # nan fails
        raise ValueError(f"budget must be a non-negative number of flops, got {budget!r}")
    try:
        return float(budget)
    except OverflowError:  # an int of over 308 digits
        return math.inf


def default_measure_note(measure: Measure) -> str:
    """What a result says when it used the models' own measure, not one given."""
    return f"measure: {measure.label}, the models' default (they read tokens)"


def function_level_refusal(exc: CostError) -> CostError:
    """``exc`` without the alternatives that a function-level comparison
    cannot take (another inner product than a functional or the symmetric
    one: the network product)."""
    kept = tuple(a for a in exc.alternatives if a.option != "inner" or a.value in FUNCTIONAL + ("symmetric",))
    if kept == exc.alternatives:
        return exc
    out = copy.copy(exc)
    out.alternatives = kept
    out.args = (out.explain(),)
    return out


def function_level(inner: str | None, measure: Measure | None, mean: Any, cov: Any, caller: str,
                   *models: Any) -> tuple[str, Measure | None]:
    """The function-level inner product that ``caller`` compares ``models``
    with, and its measure: a functional product (``inner=None`` follows the
    models' own measure, as :func:`resolve_inner`) or "symmetric"."""
    if inner is not None and inner not in FUNCTIONAL + ("symmetric",):
        raise ValueError(f"{caller} needs a function-level inner product: 'gaussian', 'tokens' or 'symmetric', "
                         f"got {inner!r} (the network product also depends on the factorization)")
    if inner == "symmetric":
        return inner, measure
    inner, measure = resolve_inner(inner, measure, *models)
    _gaussian_shorthand_fits(inner, mean, cov)
    return inner, measure


def _gaussian_shorthand_fits(inner: str, mean: Any, cov: Any) -> None:
    if inner == "tokens" and (mean is not None or cov is not None):
        raise ValueError("mean= and cov= describe a Gaussian; the token measure takes probs (ts.Tokens(...))")


def bound_measure(model: Any, mean: Any, cov: Any, measure: Measure | None, *others: Any) -> Measure:
    """``measure`` (default ``Gaussian(mean, cov)``: mean/cov are its
    shorthand) bound to the input of ``model``: its flat width and positions.
    ``others``: models compared with it, which the law must fit as well, and
    which must read the same tokens where they read tokens (widths alone can
    agree by chance: 3 tokens of 8 and 4 of 6)."""
    if measure is not None and (mean is not None or cov is not None):
        raise ValueError("give measure= or its shorthand mean=/cov=, not both")
    if measure is not None and not isinstance(measure, Measure):
        raise TypeError(f"measure must be a tsalgebra measure (ts.Gaussian(...)), got {type(measure).__name__}")
    law = measure if measure is not None else Gaussian(mean, cov)
    read: dict[tuple[int, int], Any] = {}  # each way of reading tokens, and the first model that reads so
    for m in (model, *others):
        read.setdefault(getattr(m, "token_input", None) or (0, 0), m)
    read.pop((0, 0), None)
    if len(read) > 1:
        said = "; ".join(f"{m!r} reads {counted(n, 'token')} of a vocabulary of {v}"
                         for (v, n), m in read.items())
        raise ValueError(f"the models read different tokens ({said}): no one measure is the input of all")
    if read and isinstance(law, Tokens):
        # A model that reads tokens through its embedding knows their vocabulary
        # and count; its width alone cannot tell them apart (one token of 4 is
        # 4 features, as 2 tokens of 2), so the measure is checked against them.
        (vocab, n), m = next(iter(read.items()))
        if law.vocab != vocab or law.n_ctx not in (None, n):
            has = counted(law.n_ctx, "token") if law.n_ctx else "tokens"
            raise ValueError(f"measure={law!r} does not fit {m!r}: the model reads {counted(n, 'token')} "
                             f"of a vocabulary of {vocab}, the measure draws {has} of a vocabulary of {law.vocab} "
                             f"(give measure=ts.Tokens({vocab}, {n}, probs=...) or leave it out)")
    shapes = {(_width(m), positions_of(m)): None for m in (model, *others)}  # each shape bound once
    return [law.at(*shape) for shape in shapes][0]


def _width(model: Any) -> int:
    return model.in_features if isinstance(model, Component) else _widths(_terms(model, False), "a")[0] - 1


def _exact_weights(model: Any) -> bool:
    if isinstance(model, Component):
        return model.exact
    return any(getattr(t.data, "dtype", None) == object for _, n in _terms(model) for t in n.tensors)


def _symbolic_weights(model: Any) -> bool:
    arrays = model.weights() if isinstance(model, Component) else [t.data for _, n in _terms(model) for t in n.tensors]
    return any(getattr(w, "dtype", None) == object and any(getattr(v, "free_symbols", None) for v in w.flat)
               for w in arrays)


@dataclass(frozen=True, eq=False)
class InnerProblem:
    """<a, b> under ``inner`` (and ``measure`` for the gaussian product),
    with the options of :func:`tsalgebra.inner`.  ``joint`` asks for <a, a>
    and <b, b> too where one computation yields all three.  Make one with
    :meth:`of`, which validates the arguments and binds the measure to the
    models' input."""

    a: Any
    b: Any
    inner: str = "gaussian"
    measure: Measure | None = None
    method: str = "auto"
    centered: bool = False
    per_output: bool = False
    degree: int | None = None
    budget: float = DEFAULT_BUDGET
    max_memory: int | None = None  # bytes a plan may hold at its peak (None: default_max_memory() when chosen)
    orbits: bool = True
    joint: bool = False
    algorithm: str | None = None
    samples: int | None = None
    rel_error: float | None = None
    seed: int | None = None
    device: Any = None
    progress: bool | None = None  # a bar while it runs: always, never, or None (on a terminal when long)
    notes: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()  # algorithms the automatic choice passes over (their run lost the answer)

    @classmethod
    def of(cls, a: Any, b: Any, inner: str | None = None, method: str = "auto", mean: Any = None, cov: Any = None,
           measure: Measure | None = None, **options: Any) -> "InnerProblem":
        notes: tuple[str, ...] = ()
        if inner is None or inner in FUNCTIONAL:
            given = measure
            inner, measure = resolve_inner(inner, measure, a, b)
            if given is None and measure is not None:
                notes = (default_measure_note(measure),)
        check_flags(options)
        check_degree(inner, options)
        check_arguments(inner, method, options.get("centered", False))
        if "budget" in options:
            options["budget"] = checked_budget(options["budget"])
        # the bound fixed once per problem (its sub-problems keep it): the default is read now
        options["max_memory"] = checked_memory(options.get("max_memory")) or default_max_memory()
        if isinstance(a, Component) and isinstance(b, Component):
            if a.in_features != b.in_features:
                raise ValueError(f"input widths differ: {a!r} takes {a.in_features}, {b!r} takes {b.in_features}")
            if a.out_features != b.out_features:
                raise ValueError(f"output widths differ: {a!r} gives {a.out_features}, {b!r} gives {b.out_features}")
        if inner not in FUNCTIONAL and (measure is not None or mean is not None or cov is not None):
            raise ValueError(f"a measure (mean, cov) belongs to the functional inner products, not to {inner!r}")
        _gaussian_shorthand_fits(inner, mean, cov)
        check_sampling(method, options)
        if options.get("progress") not in (None, True, False):
            raise ValueError(f"progress must be True, False or None, got {options['progress']!r}")
        bound = bound_measure(a, mean, cov, measure, b) if inner in FUNCTIONAL else None
        return cls(a, b, inner, bound, method, notes=notes, **options)

    def replace(self, **changes: Any) -> "InnerProblem":
        return replace(self, **changes)

    def shares(self, joint: bool) -> int:
        """The products one plan answers, and so the budgets it may spend:
        three for a joint plan (<a,b>, <a,a>, <b,b> of a similarity from one
        computation), else one."""
        return 3 if joint and self.joint and self.a is not self.b else 1

    @property
    def memory(self) -> int:
        """The memory bound in bytes: ``max_memory``, else the default."""
        return self.max_memory if self.max_memory is not None else default_max_memory()

    def self_problem(self, side: str) -> "InnerProblem":
        """<a, a> (``side="a"``) or <b, b> with the same options."""
        m = self.a if side == "a" else self.b
        return replace(self, a=m, b=m, joint=False)

    # ------------------------------------------------------------ models
    def terms(self, side: str, data: bool = True) -> list[tuple[Any, Network]]:
        """The model of ``side`` ("a" or "b") as weighted networks (see _terms)."""
        key = f"_terms_{side}_{data}"
        if key not in self.__dict__:
            self.__dict__[key] = _terms(self.a if side == "a" else self.b, data)
        return self.__dict__[key]

    @cached_property
    def exact_numbers(self) -> bool:
        """True when some weight is an exact number (Fraction, sympy)."""
        return _exact_weights(self.a) or _exact_weights(self.b)

    @cached_property
    def symbolic_numbers(self) -> bool:
        """True when some weight is a sympy expression in symbols (whose
        arithmetic is far slower than exact numbers', and slows as it grows)."""
        return self.exact_numbers and (_symbolic_weights(self.a) or _symbolic_weights(self.b))

    @cached_property
    def widths(self) -> tuple[int, int]:
        """(padded input width, padded output width) of both models."""
        return _widths(self.terms("a", False) + self.terms("b", False), "a and b")

    @cached_property
    def degrees(self) -> tuple[int, int]:
        """The largest number of input copies of a term of a and of b."""
        return degree_of(self.a), degree_of(self.b)

    @property
    def components(self) -> bool:
        """True when both models are layered components (not bare networks)."""
        return isinstance(self.a, Component) and isinstance(self.b, Component)

    def describe(self) -> str:
        what = f"{self.inner}{' centred' if self.centered else ''} inner product"
        return what + (f" under {self.measure.label}" if self.measure is not None else "")


# ------------------------------------------------------------------- plans


def _with_errors(values: np.ndarray, errors: np.ndarray, shown: int = 10) -> str:
    """[v0 ± e0, v1 ± e1, ...]: per-output estimates with their standard
    errors; beyond ``shown`` outputs the first and last few, as numpy
    elides (the count said)."""
    pairs = [f"{v:.6g} ± {e:.2g}" for v, e in zip(values, errors)]
    if len(pairs) > shown:
        pairs = pairs[: shown - 3] + [f"... ({len(pairs)} outputs)"] + pairs[-3:]
    return "[" + ", ".join(pairs) + "]"


# A covariance taken as E[f.g] - E[f].E[g]: the relative rounding of the two
# products (sums over pairings or moments, each term rounded at 2^-53 of its
# size; 8 of those is a digit above what was measured: the centred token
# similarity of a model whose embedding is 1e-4..1e-7 of its biases lost
# 8e-11..6.5e-4, about 2^-53 times the terms over the difference), and the
# digits of the difference kept below which it is no longer called exact (the
# attention algorithms keep 9 at an output constant 1e7 times the spread;
# docs/inner-products.md).
CENTRED_ROUNDING = 8 * 2.0 ** -53
CENTRED_DIGITS = 8


@dataclass(frozen=True, eq=False)
class Plan:
    """What one algorithm would run for a problem, planned from shapes.

    ``flops`` estimates the arithmetic (the same cold and warm), ``peak_bytes``
    the largest arrays alive at once, ``contractions`` the planned products;
    ``exact`` whether the result will be exact, ``joint`` whether the run
    also yields <a, a> and <b, b>.  ``facts`` are JSON-able details for
    reports (orbits, nodes, ...); ``payload`` is what :meth:`run` needs;
    ``refusals`` the other algorithms considered and why they were not taken;
    ``method`` the rung of the ladder of the algorithm that made it (set by
    the chooser: a named algorithm's own, whatever ``method=`` said).
    """

    algorithm: str
    problem: InnerProblem = field(repr=False)
    flops: float
    peak_bytes: float
    contractions: int
    exact: bool = True
    joint: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    payload: Any = field(default=None, repr=False)
    refusals: tuple[tuple[str, str], ...] = ()
    method: str = "exact"

    def result(self, value: Any, **fields: Any) -> "InnerResult":
        """An InnerResult of this plan's problem, algorithm and cost."""
        p = self.problem
        base = dict(quantity="inner", inner=p.inner, method=self.method,
                    exact=self.exact, algorithm=self.algorithm, centered=p.centered,
                    measure=p.measure.label if p.measure is not None else "", per_output=p.per_output,
                    contractions=self.contractions, flops=self.flops, notes=p.notes + self.notes)
        base.update(fields)
        return InnerResult(value, **base)

    def centred_result(self, moment: Any, means: Any, magnitude: Any, **fields: Any) -> "InnerResult":
        """The result of a covariance taken as ``moment - means`` (E[f.g]
        and E[f].E[g], per output or summed), whose digits are those of the
        difference: ``magnitude`` (>= |moment| and |means| alike, per output)
        sizes the float rounding of both (see :meth:`rounded_result`).  A
        cross product's rounding is judged against the two variances, whose
        digits bound its share of a cosine (its own size may be 0, the models
        uncorrelated), so only self products are judged."""
        value = moment - means
        if self.problem.exact_numbers or self.problem.a is not self.problem.b:  # exact; a cross product
            return self.result(value, **fields)
        rounding = CENTRED_ROUNDING * np.asarray(magnitude, dtype=float)
        return self.rounded_result(
            value, rounding, lambda size, rest: f"the centred product is E[f.g] - E[f].E[g] by {self.algorithm}, "
            f"terms of about {size:.3g} against a difference of {rest:.3g}", magnitude,
            "an algorithm that sums over inputs (algorithm='enumeration' or 'quadrature', where one applies) "
            "centres each output first", **fields)

    def rounded_result(self, value: Any, rounding: Any, why: Any, sizes: Any, remedy: str,
                       **fields: Any) -> "InnerResult":
        """The result of a model's centred self product (a variance) whose
        float64 rounding is about ``rounding`` (per output, or summed; 0
        where nothing is judged): one that keeps fewer than CENTRED_DIGITS
        digits is not exact (a note says how many are left, ``why(size,
        value)`` of the worst output, ``sizes`` its terms' size), and one
        that keeps none is refused (RoundingError, saying ``remedy``: the
        automatic choice tries the next algorithm): the model's mean was too
        large against its spread for the algorithm to centre it."""
        r, v = np.asarray(rounding, dtype=float), np.abs(np.asarray(value, dtype=float))
        judged = r > 0  # an output whose terms are 0, or one taken as constant: nothing to lose
        if not np.any(judged) or not np.all(np.isfinite(r)):
            return self.result(value, **fields)
        with np.errstate(divide="ignore", invalid="ignore"):
            kept = np.where(judged, v / np.where(judged, r, 1.0), np.inf)
            digits = float(np.log10(np.min(kept)))
        if digits >= CENTRED_DIGITS:
            return self.result(value, **fields)
        worst = int(np.argmin(kept)) if np.ndim(value) else 0
        size, rest = (float(np.ravel(a)[worst]) for a in (sizes, value))
        said = why(size, rest) + (f" (output {worst})" if np.ndim(value) else "")
        if not digits >= 1:
            raise RoundingError(f"{self.problem.describe()}: {said}: float64's rounding of the terms leaves no "
                                f"digit of the difference (the model's mean is too large against its spread, or "
                                f"it is constant); {remedy}")
        note = f"{said}: about {counted(int(digits), 'digit')} of it left (not exact)"
        return self.result(value, exact=False, notes=tuple(fields.pop("notes", self.problem.notes + self.notes))
                           + (note,), digits=digits, **fields)


# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class InnerResult:
    """A number with the facts needed to trust it.

    ``value`` is a float (or an exact rational with exact weights, or a
    vector with ``per_output``); ``exact`` is False for approximations
    (closure) and estimates (``method == "sampled"``, :attr:`estimated`),
    which carry ``stderr``, a 95 % ``interval``, the number of ``samples``
    and the sampled statistics (``estimate``); ``algorithm`` names the registered algorithm that computed it
    (the vocabulary of the ``algorithm=`` argument); ``contractions``/``flops``
    are what was spent; ``pairings`` and ``orbits`` count the raw and the
    contracted terms of exact enumeration.  ``digits``: where an exact
    algorithm's float64 rounding left fewer than 8 digits of a centred
    variance (the result then not exact), about how many it left (0: none,
    the variance taken as 0); None where it left more or did not judge.
    """

    value: Any
    quantity: str  # "inner", "norm" or "similarity"
    inner: str
    method: str
    exact: bool
    algorithm: str
    centered: bool = False
    measure: str = ""
    degree: int | None = None
    lifted: bool = False
    per_output: bool = False
    contractions: int = 0
    flops: float = 0
    pairings: int = 0
    orbits: int = 0
    notes: tuple[str, ...] = field(default=())
    stderr: Any = None
    interval: Any = None
    samples: int = 0
    estimate: Any = field(default=None, repr=False, compare=False)
    # algorithms the automatic choice ran and passed over, their rounding
    # having lost digits of this product (said in the notes too)
    passed_over: tuple[str, ...] = field(default=(), repr=False)
    digits: float | None = field(default=None, repr=False)

    @property
    def estimated(self) -> bool:
        """True for a Monte Carlo estimate (it carries ``stderr``)."""
        return self.stderr is not None

    def __float__(self) -> float:
        if self.per_output:
            raise TypeError("a per-output result is a vector; use .value")
        return float(self.value)

    def __repr__(self) -> str:
        val = self.value
        if not self.per_output and isinstance(val, float):
            val = f"{val:.12g}" if self.stderr is None else f"{val:.6g} ± {self.stderr:.2g}"
        elif self.per_output and self.stderr is not None:  # each estimate with its error, which can exceed it
            val = _with_errors(np.ravel(np.asarray(val, dtype=float)), np.ravel(np.asarray(self.stderr, dtype=float)))
        heavy = f", {HEAVY_TAILS}" if getattr(self.estimate, "heavy_tailed", False) else ""
        # an exact algorithm whose float64 rounding left too few digits (see Plan.rounded_result)
        lost = " (digits lost: approximate)" if self.method == "exact" else " (approximate)"
        kind = f" (estimated{heavy})" if self.estimated else lost if not self.exact else ""
        flags = [self.inner, self.method + kind, self.algorithm]
        if self.centered:
            flags.append("centred")
        if self.measure:
            flags.append(self.measure)
        if self.degree is not None:
            flags.append(f"degree {self.degree}" + (" (lifted)" if self.lifted else ""))
        cost = f"{self.contractions} contractions, {format_count(self.flops)} flops"
        if self.pairings:
            cost += f", {self.orbits} orbits of {self.pairings} pairings"
        if self.samples:
            cost += f", {self.samples:,} samples"
        return f"{self.quantity} = {val}  [{', '.join(flags)}; {cost}]"
