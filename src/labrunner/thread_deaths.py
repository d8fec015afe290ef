"""Threads of the learner's process that die of an uncaught exception, noted as they die.

A test that waits for a learner's thread to do something (a write-behind worker's write, a
listener handing over a reply) would otherwise learn that the thread is gone only at its
deadline. A lab's harness (it runs where the learner's code runs: imports no pytest)
re-exports these; the test calls ``watch_thread_deaths`` before it starts the learner's
threads and ``thread_deaths`` while it waits. The verdict stays the test's: the note only
says why a wait can end, and sooner."""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

_deaths: list[str] = []
_previous: list[Any] = []
_named_file: list[str] = []


def _noted(args: Any) -> None:
    thread = args.thread.name if args.thread is not None else "?"
    where = ""
    for frame in reversed(traceback.extract_tb(args.exc_traceback)):
        if _named_file and frame.filename.endswith(f"{os.sep}{_named_file[0]}"):
            where = (f" at {_named_file[0]} line {frame.lineno} "
                     f"({(frame.line or '').strip()[:80]})")
            break
    _deaths.append(f"thread {thread!r} died of {args.exc_type.__name__}: "
                   f"{str(args.exc_value)[:200]}{where}")
    if _previous:
        _previous[0](args)


def watch_thread_deaths(learner_file: str | None = None) -> None:
    """From now on, note every thread that ends with an uncaught exception (then let the
    previous hook report it as before); with ``learner_file`` (e.g. ``rpc.py``), the line
    of that file where it was raised."""
    _deaths.clear()
    _named_file[:] = [learner_file] if learner_file else []
    if not _previous:
        _previous.append(threading.excepthook)
        threading.excepthook = _noted


def thread_deaths() -> list[str]:
    """'thread <name> died of <exception>: <message>[ at <file> line N (<code>)]', one per
    thread seen dying since ``watch_thread_deaths``."""
    return list(_deaths)


def unwatch_thread_deaths() -> None:
    if _previous:
        threading.excepthook = _previous.pop()
