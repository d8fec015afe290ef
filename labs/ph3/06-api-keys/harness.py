"""Harness for ph3.6: watches which comparison the learner's authenticate() calls, with
labrunner.compare_watch, and seeds Python's `random` (and freezes time.time) to see whether
new keys depend on them. It runs where the learner's code runs (a process of its own when
grading: learner.harness()). The test decides from what was recorded: whether
compare_digest saw the stored hash at all."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from labrunner.compare_watch import CompareWatch, watch

__all__ = ["CompareWatch", "watch"]


def keys_after_seeding(store: Any, owner: str, scopes: list[str],
                       freeze_clock: bool = False) -> list[str]:
    """Two keys, each made right after random.seed(1234): equal keys come from `random`
    (a predictable PRNG), not from the OS's CSPRNG. With `freeze_clock`, time.time() and
    time.time_ns() also return the same instant for both: equal keys then come from the
    time (a timestamp, or a hash of one), which anyone can guess to the second. The clock
    stands still for this thread only: other threads (the learner process's connection to
    the test) keep the real time."""
    made = []
    instant = time.time() if freeze_clock else None
    try:
        for _ in range(2):
            random.seed(1234)
            with frozen_clock(instant):
                made.append(str(store.create(owner, list(scopes))))
    finally:
        random.seed()
    return made


@contextmanager
def frozen_clock(now: float | None) -> Iterator[None]:
    """time.time() returns `now` in this thread (None: the clock runs as usual)."""
    real, real_ns = time.time, time.time_ns
    if now is not None:
        me = threading.get_ident()
        time.time = lambda: now if threading.get_ident() == me else real()
        time.time_ns = lambda: int(now * 1e9) if threading.get_ident() == me else real_ns()
    try:
        yield
    finally:
        time.time, time.time_ns = real, real_ns
