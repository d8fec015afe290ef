"""Runs where the learner's pool runs (in its process when grading): a release followed at
once by a new borrower, in one thread that keeps the interpreter (a long switch interval)
from the release's notify() until the new borrower holds the connection - so a waiter woken
by that release finds the connection gone, every time, not only when the scheduler says so.
And which threads sleep in the learner's code itself (blocked on a lock), so that a wait for
a call that cannot go on while another holds the pool's lock ends when that is seen; and
which wait in the pool with nothing left to wake them (never notified, no timeout due), so
that a wait for a borrower the pool forgot to wake ends when that is seen."""

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
            threading_waits_in(folder or "").get(ident) is frame and not _unnotified(frame)
            for ident, frame in before.items()):
        time.sleep(0.01)
    return got


def _unnotified(frame: Any) -> bool:
    """A Condition.wait whose waiter lock is still queued in the condition: no notify() has
    come for it, so it does not leave that wait before its timeout (the release notified no
    one); waiting for it to leave would wait that long."""
    try:
        local = frame.f_locals
        waiter, cond = local.get("waiter"), local.get("self")
        return waiter is not None and any(w is waiter for w in list(cond._waiters))
    except Exception:  # noqa: BLE001 - not shaped like Condition.wait: keep waiting
        return False


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


def waits_nothing_wakes(folder: str, within: float) -> tuple[int, int]:
    """(threads in a ``threading`` wait from the learner's code, those of them that nothing
    wakes within ``within`` seconds). Every such wait is, innermost, a Condition.wait (an
    Event, a Semaphore, a queue.Queue wait on one too): its waiter lock stays queued in the
    condition's _waiters until a notify() takes it out and releases it. A waiter still queued
    whose wait has no timeout, or a longer one than ``within``, sleeps on until someone
    notifies: when nothing in the test is left to do so (the release that should have done
    it has returned), it is stranded - known at once, not after a deadline. A pool that
    waits in short slices (wait(0.1) in a loop) is never counted: its waits time out."""
    waiting = stranded = 0
    for frame in threading_waits_in(folder).values():
        waiting += 1
        timeout = frame.f_locals.get("timeout")
        if _unnotified(frame) and (timeout is None or timeout > within):
            stranded += 1
    return waiting, stranded


def wait_timeouts(folder: str) -> list[float | None]:
    """The timeout each threading wait from the learner's code was given (None: no timeout),
    innermost: a Condition.wait's ``timeout``. A borrower woken and sent back to wait must
    wait only for what is left of its acquire_timeout, counted from its acquire() call: a
    new wait given the whole timeout again moves the deadline with every wake-up."""
    timeouts: list[float | None] = []
    for frame in threading_waits_in(folder).values():
        timeout = frame.f_locals.get("timeout")
        timeouts.append(None if timeout is None else float(timeout))
    return timeouts
