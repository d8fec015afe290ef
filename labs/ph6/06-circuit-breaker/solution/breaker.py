"""A circuit breaker (closed / open / half-open, on an injected clock) and a bulkhead."""

from __future__ import annotations

import threading
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
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._state = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == "open" and self.clock() - self._opened_at >= self.reset_timeout:
                return "half_open"
            return self._state

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._state == "open":
                if self.clock() - self._opened_at < self.reset_timeout:
                    raise CircuitOpen("circuit open: failing fast")
                self._state = "half_open"
            probe = self._state == "half_open"
            if probe:
                if self._probing:
                    raise CircuitOpen("circuit half-open: a probe is already in flight")
                self._probing = True
        try:
            result = fn(*args, **kwargs)
        except BaseException:  # also a gevent.Timeout, a cancellation, KeyboardInterrupt
            # (not Exceptions): as pybreaker does, a failure - and a probe ended by one must
            # not keep its flag, or the half-open circuit refuses every call for good
            with self._lock:
                self._on_failure(probe)
            raise
        with self._lock:
            # A call let in while closed may end after the circuit opened (other calls failed
            # meanwhile): its success closes nothing. Only time moves an open circuit on, and
            # only the probe closes it (Polly's CircuitStateController: "only time passing
            # governs transitioning from Open to HalfOpen"; resilience4j's OpenState records
            # such a result without a transition).
            if probe or self._state == "closed":
                self._probing = False
                self._state = "closed"
                self._failures = 0
        return result

    def _on_failure(self, probe: bool) -> None:
        if probe:
            self._probing = False
            self._trip()
        elif self._state == "closed":   # a late failure, after the circuit opened: nothing
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._trip()

    def _trip(self) -> None:
        self._state = "open"
        self._opened_at = self.clock()
        self._failures = 0


class Bulkhead:
    """At most max_concurrent calls in flight to one dependency; the next is refused."""

    def __init__(self, max_concurrent: int) -> None:
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._slots.acquire(blocking=False):
            raise BulkheadFull("bulkhead full: every slot of this dependency is busy")
        try:
            return fn(*args, **kwargs)
        finally:
            self._slots.release()
