"""Runs where the learner's pool runs (in its process when grading): a release followed at
once by a new borrower, in one thread that keeps the interpreter (a long switch interval)
from the release's notify() until the new borrower holds the connection - so a waiter woken
by that release finds the connection gone, every time, not only when the scheduler says so.
And which threads sleep in the learner's code itself (blocked on a lock), so that a wait for
a call that cannot go on while another holds the pool's lock ends when that is seen."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from labrunner.slow_steps import threading_waits_in


def release_and_barge(pool: Any, conn: Any, folder: str | None = None) -> Any:
    """pool.release(conn), then pool.acquire() at once; returns the connection acquired (or
    the text of what acquire() raised). With ``folder`` (the learner's), it returns only once
    every thread that sat in a threading wait from there before has left that wait (woken,
    it waits again in a new one, or goes on): until it has run, a woken waiter still looks
    like one waiting, and a test that asks then would take it for one that waits on."""
    before = threading_waits_in(folder) if folder else {}
    old = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    try:
        pool.release(conn)
        try:
            got = pool.acquire()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            got = f"{type(exc).__name__}: {exc}"
    finally:
        sys.setswitchinterval(old)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            threading_waits_in(folder or "").get(ident) is frame
            for ident, frame in before.items()):
        time.sleep(0.01)
    return got


def threads_asleep_in(folder: str) -> int:
    """How many threads of this process sleep with their innermost Python frame in code under
    ``folder`` (or entering a threading.Condition from there): the learner's code blocked on
    a lock, as in `with self._lock:` (a Condition's wait is not counted: threads_waiting_in
    counts those)."""
    prefix = str(folder).rstrip("/") + "/"
    frames = sys._current_frames()
    asleep = 0
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or 0)
        # `with cond:` enters a Condition in threading.py, whose lock's acquire blocks
        while frame is not None and frame.f_code.co_filename == threading.__file__ \
                and frame.f_code.co_name in ("__enter__", "acquire"):
            frame = frame.f_back
        if frame is None or thread.native_id is None \
                or not frame.f_code.co_filename.startswith(prefix):
            continue
        try:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        except OSError:
            continue
        asleep += stat.rsplit(")", 1)[1].split()[0] == "S"
    return asleep
