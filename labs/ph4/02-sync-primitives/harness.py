"""Runs where the learner's queue runs (in its process when grading): two put() calls, one
right after the other, in one thread that keeps the interpreter (a long switch interval)
from the first put's wake-up until the second put is inside the queue - so a consumer woken
by the first put has not run yet when the second put finds the queue full and waits. The
interleaving is then the same every time, not only when the scheduler says so."""

from __future__ import annotations

import sys
import threading
from typing import Any

_normal = sys.getswitchinterval()


def put_two_at_once(queue: Any, first: Any, second: Any) -> threading.Event:
    """Starts the two puts on a thread of their own; the Event is set once both returned."""
    done = threading.Event()

    def run() -> None:
        sys.setswitchinterval(2.0)
        try:
            queue.put(first)
            queue.put(second)
        finally:
            sys.setswitchinterval(_normal)
            done.set()

    threading.Thread(target=run, daemon=True, name="producer").start()
    return done


def restore_switch_interval() -> None:
    sys.setswitchinterval(_normal)
