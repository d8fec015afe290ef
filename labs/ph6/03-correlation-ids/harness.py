"""Runs where the learner's RpcClient runs (in its process when grading): notes the threads
that die of an exception, so that a test waiting for a reply the client's listener should
hand over learns at once that the listener is gone (and of what, at which line of rpc.py),
instead of waiting out its deadline. The verdict stays the test's: a call that never returns
fails it either way; the note only says why, and sooner."""

from __future__ import annotations

from labrunner.thread_deaths import thread_deaths, unwatch_thread_deaths
from labrunner.thread_deaths import watch_thread_deaths as _watch

__all__ = ["thread_deaths", "unwatch_thread_deaths", "watch_thread_deaths"]


def watch_thread_deaths() -> None:
    """Note the client's threads that die from now on, with the line of rpc.py that raised."""
    _watch("rpc.py")
