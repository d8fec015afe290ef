"""Runs where the learner's app runs (in its process when grading): a gate on the log file's
writes, so that two requests logging at once interleave at the one point where it matters.

The gate wraps every file object opened (open(), io.open(), Path.open()) for writing on the
log path. A write that leaves the file mid-line (what it wrote does not end with a newline:
print()'s text before its separate "\\n", or write(line) before write("\\n")) waits, for a
bounded time, until another thread writes to the log. Under CPython's GIL such a window is
rarely hit by chance (it is on a free-threaded build, or when a long line flushes between
the two writes); here it is hit every time. A logger that writes each line in one write
never waits; one that writes a line in pieces under a lock waits out the bound (the other
thread is held by the lock) and its lines stay whole. The verdict is the test's: it reads
the file back.
"""

from __future__ import annotations

import builtins
import io
import os
import threading
import time
from typing import Any

_real_open = io.open


class _Gate:
    def __init__(self, path: str, wait: float, waits: int) -> None:
        self.path = path
        self.wait = wait
        self.waits_left = waits
        self.cond = threading.Condition()
        self.writes = 0
        self.held = 0         # writes that left the file mid-line and waited
        self.interleaved = 0  # ... and saw another thread's write before their next one

    def after_write(self, data: Any) -> None:
        with self.cond:
            self.writes += 1
            mine = self.writes
            self.cond.notify_all()
            mid_line = bool(data) and not (data.endswith("\n") if isinstance(data, str)
                                           else bytes(data).endswith(b"\n"))
            if not mid_line or self.waits_left <= 0:
                return
            self.waits_left -= 1
            self.held += 1
            if self.cond.wait_for(lambda: self.writes > mine, timeout=self.wait):
                self.interleaved += 1


class _GatedFile:
    """The learner's file object, with each write reported to the gate."""

    def __init__(self, real: Any, gate: _Gate) -> None:
        self._real = real
        self._gate = gate

    def write(self, data: Any) -> int:
        written = self._real.write(data)
        self._gate.after_write(data)
        return written  # type: ignore[no-any-return]

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> _GatedFile:
        self._real.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._real.__exit__(*exc)

    def __iter__(self) -> Any:
        return iter(self._real)


_gate: _Gate | None = None


def _gated_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    real = _real_open(file, mode, *args, **kwargs)
    gate = _gate
    if (gate is not None and isinstance(file, str | bytes | os.PathLike)
            and os.path.abspath(os.fsdecode(file)) == gate.path
            and any(c in mode for c in "awx+")):
        return _GatedFile(real, gate)
    return real


def install(path: str, wait: float, waits: int) -> None:
    """Gate the writes to ``path`` from now on: at most ``waits`` mid-line writes wait, each
    up to ``wait`` seconds, for another thread's write."""
    global _gate
    _gate = _Gate(os.path.abspath(path), wait, waits)
    builtins.open = io.open = _gated_open


def report() -> dict[str, int]:
    gate = _gate
    if gate is None:
        return {"writes": 0, "held": 0, "interleaved": 0}
    with gate.cond:
        return {"writes": gate.writes, "held": gate.held, "interleaved": gate.interleaved}


def remove() -> None:
    global _gate
    _gate = None
    builtins.open = io.open = _real_open


# A request body that arrives late, as from a slow client: the first read of wsgi.input
# waits the seconds the request's X-Lab-Body-Delay header names (the duration check, which
# then knows the least time the request took inside the app: a sleep never ends early).
class _SlowInput:
    def __init__(self, real: Any, delay: float) -> None:
        self._real = real
        self._delay = delay

    def _arrive(self) -> None:
        if self._delay > 0:
            time.sleep(self._delay)
            self._delay = 0

    def read(self, *args: Any) -> Any:
        self._arrive()
        return self._real.read(*args)

    def readline(self, *args: Any) -> Any:
        self._arrive()
        return self._real.readline(*args)

    def readlines(self, *args: Any) -> Any:
        self._arrive()
        return self._real.readlines(*args)

    def __iter__(self) -> Any:
        self._arrive()
        return iter(self._real)


def slow_bodies(app: Any) -> Any:
    """The app, with each request's body delayed by its X-Lab-Body-Delay (seconds)."""
    def delayed(environ: dict[str, Any], start_response: Any) -> Any:
        delay = float(environ.pop("HTTP_X_LAB_BODY_DELAY", "0") or 0)
        environ["wsgi.input"] = _SlowInput(environ["wsgi.input"], delay)
        return app(environ, start_response)
    return delayed
