"""Progress bars for long work: one rule for when a bar shows, and the bar of
the plan being run, which the algorithms advance by the flops they have done.

``progress`` is True (always shown), False (never) or None (shown on a
terminal when the work is long).  :func:`planned` opens the bar of a plan
around its run (:func:`tsalgebra.algorithms.registry.run`); inside it,
:func:`advance` (or, in worker threads, the callable that :func:`advancer`
returned in the caller's thread) moves it.  Outside a run, or with the bar
hidden, there is nothing to move, so shared code (the node sums, the
pairing runs) may report unconditionally.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from typing import Any, Callable, Iterator

__all__ = ["LONG_FLOPS", "advance", "advancer", "planned", "progress_bar"]

# A bar is offered (progress=None: shown on a terminal) above this much work:
# a second or more on this 2-core machine (matmul 102 GF/s, the algorithms'
# own products 10-70 GF/s).
LONG_FLOPS = 2e10

_RUNNING: ContextVar[Any] = ContextVar("tsalgebra_progress", default=None)


def progress_bar(total: float | None, desc: str, unit: str, progress: bool | None, long: bool,
                 scale: bool = False) -> Any:
    """A tqdm bar on stderr: shown (``progress`` True), hidden (False), or with
    None shown on a terminal when the work is ``long``; ``scale`` writes
    large counts with SI prefixes (flops)."""
    from tqdm.auto import tqdm

    show = progress if progress is not None else (None if long else False)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, disable=(None if show is None else not show),
                file=sys.stderr, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def planned(flops: float, desc: str, progress: bool | None) -> Iterator[None]:
    """The bar of a plan of ``flops`` (counted in flops) for the work inside.
    A run inside another run (a control variate's exact value, say) adds no
    bar of its own and does not move the outer one: its flops are not in the
    outer plan's count."""
    outer = _RUNNING.get()
    bar = progress_bar(flops, desc, "flop", progress if outer is None else False, flops > LONG_FLOPS, scale=True)
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
