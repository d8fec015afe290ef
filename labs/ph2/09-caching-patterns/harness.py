"""Runs where the learner's code runs (in its process when grading): notes the threads that
die of an exception, so that a test waiting for a write-behind worker to write learns at
once that the worker is gone (and of what), instead of waiting out its deadline."""

from __future__ import annotations

import threading
from typing import Any

_deaths: list[str] = []
_previous: list[Any] = []


def _noted(args: Any) -> None:
    thread = args.thread.name if args.thread is not None else "?"
    _deaths.append(f"thread {thread!r} died of {args.exc_type.__name__}: {args.exc_value}")
    _previous[0](args)


def watch_thread_deaths() -> None:
    """From now on, note every thread that ends with an uncaught exception (then let the
    previous hook report it as before)."""
    if not _previous:
        _previous.append(threading.excepthook)
        threading.excepthook = _noted


def thread_deaths() -> list[str]:
    """'thread <name> died of <exception>: <message>', one per thread seen dying."""
    return list(_deaths)


def unwatch_thread_deaths() -> None:
    if _previous:
        threading.excepthook = _previous.pop()
