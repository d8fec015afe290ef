"""A circuit breaker (closed / open / half-open, on an injected clock) and a bulkhead.
See README.md."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class CircuitOpen(Exception):
    """The call was refused without reaching the dependency."""


class BulkheadFull(Exception):
    """Every slot of this dependency's pool is taken: refused at once, not queued."""


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, reset_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = "closed"

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # TODO: count failures, open, fail fast, half-open probe after reset_timeout
        return fn(*args, **kwargs)


class Bulkhead:
    def __init__(self, max_concurrent: int) -> None:
        pass

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # TODO: at most max_concurrent in flight; refuse the next with BulkheadFull
        return fn(*args, **kwargs)
