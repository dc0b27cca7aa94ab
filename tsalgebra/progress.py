"""Progress bars for long work: one rule for when a bar shows, and the bar of
the plan being run, which the algorithms advance by the flops they have done.

``progress`` is True (always shown), False (never) or None (shown on a
terminal when the work is long).  Long means an estimated time: the plan's
flops over its algorithm's rate (:data:`RATES`, flops per second measured
here per algorithm: Monte Carlo and the token moments do far less per
second than a flop count suggests), at least :data:`LONG_SECONDS`.
:func:`planned` opens the bar of a plan around its run
(:func:`tsalgebra.algorithms.registry.run`); inside it, :func:`advance`
(or, in worker threads, the callable that :func:`advancer` returned in the
caller's thread) moves it.  Outside a run, or with the bar hidden, there is
nothing to move, so shared code (the node sums, the pairing runs) may
report unconditionally.  :func:`labelled` names what the runs inside it
compute (``<a,b>``): a similarity's three products are three bars.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from typing import Any, Callable, Iterator

__all__ = ["LONG_FLOPS", "LONG_SECONDS", "RATES", "advance", "advancer", "estimated_seconds", "is_long", "labelled",
           "planned", "progress_bar"]

# A bar is offered (progress=None: shown on a terminal) to work estimated at
# this many seconds or more.
LONG_SECONDS = 1.0

# Flops per second of each algorithm's runs, the slowest measured here for
# runs of 0.3-3 s (2 shared cores at a load of 4-7; flops as the plans count
# them): an estimate errs towards offering a bar, and an offered bar is drawn
# only once the work has run _DELAY seconds (so work that turns out short
# draws nothing).  Measured (plan flops / wall seconds):
#   pairings     1.94e9 flops in 1.44 s (two bilinear layers, d 32, h 64)  1.3e9
#   closure      4.72e7 in 0.87 s (four layers, d 32, h 64)                5.4e7
#   quadrature   9.40e7 in 1.42 s (one layer, d 10: 59,049 nodes)          6.6e7
#   sampled      2.98e8 in 3.09 s (two layers, d 8, h 16; 100,000 samples) 9.7e7
#                (2.6e9 in 1.55 s at d 48, h 128: 1.7e9; a sample costs
#                about 16 us beyond its flops, so small models run slowest)
#   moments      5.17e7 in 0.34 s (attention, d 24, 4 heads of 12, n 8)    1.5e8
#   hermite      2.79e8 in 0.64 s (attention, d 12, 2 heads of 6, n 4)     4.4e8
#   token-moments 6.01e6 in 1.63 s (V 64, d 16, 4 heads of 8, n 8)         3.7e6
#   enumeration  5.05e7 in 0.52 s (V 6, n 5)                               9.7e7
#   gram         2.31e9 in 0.72 s (network product, three layers, d 256)   3.2e9
# The batched matrix routes (matmul 102 GF/s, their own products 10-70
# GF/s) keep the rate the flop threshold assumed: LONG_FLOPS a second.
RATES = {"pairings": 1.3e9, "closure": 5.4e7, "quadrature": 6.6e7, "sampled": 9.7e7, "moments": 1.5e8,
         "hermite": 4.4e8, "token-moments": 3.7e6, "enumeration": 9.7e7, "gram": 3.2e9, "batched": 2e10}
# An algorithm not measured (a registered one): the slowest rate above.
_DEFAULT_RATE = min(RATES.values())
LONG_FLOPS = LONG_SECONDS * RATES["batched"]  # the batched matrix routes' threshold, in flops
# A bar offered by the estimate (progress=None) is drawn after this many
# seconds of work, at its first update after them: the estimates above take
# the slowest rate measured, and a bar offered to work that ends sooner
# would flash.
_DELAY = 0.5

_RUNNING: ContextVar[Any] = ContextVar("tsalgebra_progress", default=None)
_LABEL: ContextVar[str | None] = ContextVar("tsalgebra_progress_label", default=None)


def _rate(method: str | None) -> float:
    """The flop rate of ``method``: an algorithm's name, or its title (what
    the registry's run gives :func:`planned` as the bar's description)."""
    if method in RATES:
        return RATES[method]  # type: ignore[index]
    if method is not None:
        from .algorithms.registry import registered  # at call time: the registry imports this module

        for alg in registered():
            if method in (alg.name, getattr(alg, "title", None)):
                return RATES.get(alg.name, _DEFAULT_RATE)
    return _DEFAULT_RATE


def estimated_seconds(flops: float, method: str | None = None) -> float:
    """The seconds ``flops`` of ``method``'s work may take here (its rate in
    :data:`RATES`; an algorithm not measured at the slowest rate)."""
    return float(flops) / _rate(method)


def is_long(flops: float, method: str | None = None) -> bool:
    """Whether ``flops`` of ``method``'s work is long enough for a bar
    (progress=None: on a terminal): estimated at LONG_SECONDS or more."""
    return estimated_seconds(flops, method) >= LONG_SECONDS


def progress_bar(total: float | None, desc: str, unit: str, progress: bool | None, long: bool,
                 scale: bool = False) -> Any:
    """A tqdm bar on stderr: shown (``progress`` True), hidden (False), or with
    None shown on a terminal when the work is ``long`` (drawn once it has run
    half a second: an estimate of long work may be pessimistic); ``scale``
    writes large counts with SI prefixes (flops)."""
    from tqdm.auto import tqdm

    show = progress if progress is not None else (None if long else False)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, disable=(None if show is None else not show),
                file=sys.stderr, leave=False, dynamic_ncols=True, delay=_DELAY if show is None else 0.0)


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Runs inside name their bars' product: ``desc <a,b>``; inside another
    label, after it (a matrix's pair, then the similarity's product: ``<0,1>
    <a,b>``)."""
    outer = _LABEL.get()
    token = _LABEL.set(f"{outer} {label}" if outer else label)
    try:
        yield
    finally:
        _LABEL.reset(token)


@contextlib.contextmanager
def planned(flops: float, desc: str, progress: bool | None, method: str | None = None) -> Iterator[None]:
    """The bar of a plan of ``flops`` (counted in flops) for the work inside,
    offered when long at ``method``'s rate (an algorithm's name; default:
    ``desc``, the algorithm's title as the registry gives it).  A run inside
    another run (a control variate's exact value, say) adds no bar of its
    own and does not move the outer one: its flops are not in the outer
    plan's count."""
    outer = _RUNNING.get()
    label = _LABEL.get()
    bar = progress_bar(flops, f"{desc} {label}" if label else desc, "flop", progress if outer is None else False,
                       is_long(flops, method or desc), scale=True)
    token = _RUNNING.set(bar)
    try:
        yield
    finally:
        _RUNNING.reset(token)
        bar.close()


def advancer() -> Callable[[float], Any] | None:
    """What advances the bar of the plan running in the calling thread by a
    number of flops (callable from worker threads: tqdm locks its updates),
    or None outside a run or when its bar is hidden (then nothing need be
    counted)."""
    bar = _RUNNING.get()
    return None if bar is None or bar.disable else bar.update


def advance(flops: float) -> None:
    """Advance the running plan's bar, if one shows, by ``flops``."""
    tick = advancer()
    if tick is not None:
        tick(flops)
