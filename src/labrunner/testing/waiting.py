"""Waiting for what can be observed, never for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def came_true(condition: Callable[[], object], timeout: float) -> bool:
    """Whether an observable condition came true within ``timeout`` seconds (polled every
    10 ms): for a test that words its own failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_until(condition: Callable[[], object], what: str, timeout: float = 15) -> None:
    """Wait for an observable condition (not for a guessed amount of time); fail the test
    with ``timed out after N s waiting for <what>``."""
    if not came_true(condition, timeout):
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
