"""Runs where the learner's code runs (in its process when grading: learner.harness()):
which threads are alive there, so that the test can tell whether a Subscriber's close()
ended the threads its constructor started (a listener thread left running after close()
keeps polling for ever). The deciding observations about the connection and the
subscription are the test's own, on the Redis server (CLIENT LIST, PUBSUB NUMSUB)."""

from __future__ import annotations

import sys
import threading
import time

from labrunner.testing import learner_threads


def thread_idents() -> list[int]:
    """The idents of the threads alive in this process now, labrunner's own left out (when
    grading, the threads serving the test's calls here start and grow as it goes)."""
    return [t.ident for t in learner_threads() if t.ident is not None]


def _where(ident: int) -> str:
    """The innermost frame of a thread, as `file:line in function`."""
    frame = sys._current_frames().get(ident)
    if frame is None:
        return "?"
    code = frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} in {code.co_name}"


def still_running(idents: list[int], seconds: float) -> list[str]:
    """Wait (join) up to `seconds` in all for the threads `idents` to end; describe those
    still alive then (name, class, where they are)."""
    deadline = time.monotonic() + seconds
    alive = [t for t in threading.enumerate() if t.ident in set(idents)]
    for thread in alive:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [f"thread {t.name!r} ({type(t).__module__}.{type(t).__name__}, at "
            f"{_where(t.ident or 0)})" for t in alive if t.is_alive()]
