"""Runs where the learner's pool runs (in its process when grading): a release followed at
once by a new borrower, in one thread that keeps the interpreter (a long switch interval)
from the release's notify() until the new borrower holds the connection - so a waiter woken
by that release finds the connection gone, every time, not only when the scheduler says so."""

from __future__ import annotations

import sys
from typing import Any


def release_and_barge(pool: Any, conn: Any) -> Any:
    """pool.release(conn), then pool.acquire() at once; returns the connection acquired (or
    the text of what acquire() raised)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    try:
        pool.release(conn)
        try:
            return pool.acquire()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return f"{type(exc).__name__}: {exc}"
    finally:
        sys.setswitchinterval(old)
