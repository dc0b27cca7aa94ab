"""The wording shared by messages: a count with its noun, and the text of an
exception raised by the user's code, said on one line.

An exception is named in a message by its type and text; where its
``__str__`` itself raises, the text is said to be unprintable, so that the
error being reported is never replaced by that second one.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["UNPRINTABLE", "counted", "message_of", "out_of_memory", "raised", "warn_at_caller"]

UNPRINTABLE = "(its message cannot be printed)"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one: "1 input", "3 inputs" (the
    nouns of messages take an s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def message_of(exc: BaseException) -> str | None:
    """``str(exc)`` on one line, or None where ``str`` raises."""
    try:
        return " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - whatever the failing __str__ raised
        return None


def out_of_memory(exc: BaseException) -> str | None:
    """The message of an allocation the machine refused ("an allocation
    failed" where it has none): numpy's MemoryError, or torch's allocator's
    RuntimeError (it says "can't allocate memory"); None for any other
    exception."""
    text = message_of(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in (text or "")):
        return text or "an allocation failed"
    return None


def raised(exc: BaseException) -> str:
    """``Type: message`` (``Type`` alone for an empty message; ``Type (its
    message cannot be printed)`` where str() fails)."""
    text = message_of(exc)
    name = type(exc).__name__
    return f"{name} {UNPRINTABLE}" if text is None else f"{name}: {text}" if text else name


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """A warning pointing at the user's call, the first frame outside this
    package (its depth differs by entry point)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
