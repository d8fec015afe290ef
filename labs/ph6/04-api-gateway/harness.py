"""Runs where the learner's gateway runs (in its process when grading): makes every line of
the learner's code take a little while, in the threads the WSGI server starts for its
requests, so that concurrent requests interleave line by line as they would on a loaded
server with many cores. A rate limiter whose check and count are not one atomic step per
user then lets a burst through: several requests read the same count before any of them
writes it back. Guarded by a lock, the others wait and nothing changes but the time taken.
The verdict is the test's: it counts what reached its backend."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any


def stretch_lines(module: ModuleType, delay: float) -> None:
    """From now on, threads started afterwards sleep ``delay`` s before each line of code in
    the learner's folder (a sleep lets the other threads run: the GIL is released)."""
    folder = str(Path(module.__file__ or "").parent).rstrip("/") + "/"

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            time.sleep(delay)
        return local

    def trace(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(folder) else None

    threading.settrace(trace)


def unstretch() -> None:
    threading.settrace(None)  # type: ignore[arg-type]
