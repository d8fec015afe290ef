"""Runs where the learner's gateway runs (in its process when grading): makes every line of
the learner's code take a little while, in the threads the WSGI server starts for its
requests, so that concurrent requests interleave line by line as they would on a loaded
server with many cores. A rate limiter whose check and count are not one atomic step per
user then lets a burst through: several requests read the same count before any of them
writes it back. Guarded by a lock, the others wait and nothing changes but the time taken.
The verdict is the test's: it counts what reached its backend."""

from __future__ import annotations

import threading
from types import ModuleType

from labrunner.slow_steps import slow_tracer


def stretch_lines(module: ModuleType, delay: float) -> None:
    """From now on, threads started afterwards sleep ``delay`` s before each line of code in
    the learner's folder."""
    threading.settrace(slow_tracer(module, delay))


def unstretch() -> None:
    threading.settrace(None)  # type: ignore[arg-type]
