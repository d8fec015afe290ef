"""Runs where the learner's bulkhead runs (in its process when grading): a burst of calls
into one Bulkhead at the same moment, from threads of that process, each bytecode of the
learner's code slowed so that the threads interleave step by step as on a loaded
many-core machine. A bulkhead whose check for a free slot and taking of it are not one
atomic step then lets several calls past the check before any of them counts itself in,
and a shared `+= 1` / `-= 1` loses updates; a semaphore or a lock only takes longer.

Each call fetches from the test's backend, which holds its answers: the verdict is the
test's, from how many requests reach that backend at once."""

from __future__ import annotations

import http.client
import sys
import threading
from types import ModuleType
from typing import Any

from labrunner.slow_steps import slow_tracer


class Burst:
    """`calls` threads, released together, each calling pool.call(fetch host's /quote)."""

    def __init__(self, module: ModuleType, pool: Any, host: str, calls: int,
                 delay: float) -> None:
        self._outcomes: list[str] = []
        self._lock = threading.Lock()
        tracer = slow_tracer(module, delay, opcodes=True)
        start = threading.Barrier(calls)
        hostname, _, port = host.rpartition(":")

        def fetch() -> str:
            conn = http.client.HTTPConnection(hostname, int(port), timeout=60)
            try:
                conn.request("GET", "/quote")
                return conn.getresponse().read().decode()
            finally:
                conn.close()

        def one() -> None:
            try:
                start.wait(30)
                sys.settrace(tracer)
                try:
                    pool.call(fetch)
                finally:
                    sys.settrace(None)
                outcome = "answered"
            except module.BulkheadFull:
                outcome = "refused"
            except Exception as exc:  # noqa: BLE001 - reported to the test as it is
                outcome = f"raised {type(exc).__name__}: {exc}"
            with self._lock:
                self._outcomes.append(outcome)

        self._threads = [threading.Thread(target=one, daemon=True) for _ in range(calls)]
        for thread in self._threads:
            thread.start()

    def ended(self) -> int:
        """How many calls have returned or raised so far."""
        with self._lock:
            return len(self._outcomes)

    def results(self, timeout: float) -> list[str]:
        """Wait for every call to end (up to `timeout` s each); each ended call's outcome:
        'answered', 'refused' (BulkheadFull) or 'raised <error>'."""
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            return list(self._outcomes)


def start_burst(module: ModuleType, pool: Any, host: str, calls: int, delay: float) -> Burst:
    return Burst(module, pool, host, calls, delay)
