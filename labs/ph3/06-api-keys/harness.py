"""Harness for ph3.6: watches which comparison the learner's authenticate() calls, with
labrunner.compare_watch, and seeds Python's `random` to see whether new keys depend on it.
It runs where the learner's code runs (a process of its own when grading: learner.harness()).
The test decides from what was recorded: whether compare_digest saw the stored hash at all."""

from __future__ import annotations

import random
from typing import Any

from labrunner.compare_watch import CompareWatch, watch

__all__ = ["CompareWatch", "watch"]


def keys_after_seeding(store: Any, owner: str, scopes: list[str]) -> list[str]:
    """Two keys, each made right after random.seed(1234): equal keys come from `random`
    (a predictable PRNG), not from the OS's CSPRNG."""
    made = []
    for _ in range(2):
        random.seed(1234)
        made.append(str(store.create(owner, list(scopes))))
    random.seed()
    return made
