"""Waiting for what can be observed, never for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Wait for an observable condition (not for a guessed amount of time); fail the test
    with ``timed out after N s waiting for <what>``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(0.01)
