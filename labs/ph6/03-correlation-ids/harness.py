"""Runs where the learner's RpcClient runs (in its process when grading): notes the threads
that die of an exception, so that a test waiting for a reply the client's listener should
hand over learns at once that the listener is gone (and of what, at which line of rpc.py),
instead of waiting out its deadline. The verdict stays the test's: a call that never returns
fails it either way; the note only says why, and sooner."""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

_deaths: list[str] = []
_previous: list[Any] = []


def _noted(args: Any) -> None:
    thread = args.thread.name if args.thread is not None else "?"
    where = ""
    for frame in reversed(traceback.extract_tb(args.exc_traceback)):
        if frame.filename.endswith(f"{os.sep}rpc.py"):
            where = f" at rpc.py line {frame.lineno} ({(frame.line or '').strip()[:80]})"
            break
    _deaths.append(f"thread {thread!r} died of {args.exc_type.__name__}: "
                   f"{str(args.exc_value)[:200]}{where}")
    if _previous:
        _previous[0](args)


def watch_thread_deaths() -> None:
    """From now on, note every thread that ends with an uncaught exception (then let the
    previous hook report it as before)."""
    _deaths.clear()
    if not _previous:
        _previous.append(threading.excepthook)
        threading.excepthook = _noted


def thread_deaths() -> list[str]:
    """'thread <name> died of <exception>: <message> at rpc.py line N', one per thread."""
    return list(_deaths)


def unwatch_thread_deaths() -> None:
    if _previous:
        threading.excepthook = _previous.pop()
