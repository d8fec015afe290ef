"""Runs where the learner's bulkhead runs (in its process when grading): a burst of calls
into one Bulkhead at the same moment, from threads of that process, each bytecode of the
learner's code slowed so that the threads interleave step by step as on a loaded
many-core machine. A bulkhead whose check for a free slot and taking of it are not one
atomic step then lets several calls past the check before any of them counts itself in,
and a shared `+= 1` / `-= 1` loses updates; a semaphore or a lock only takes longer.

The same burst goes into a closed CircuitBreaker whose backend fails every request once it
lets them go: every failure must be counted (a shared `+= 1` outside the lock loses some).
And two calls into a half-open breaker, the first held at each of its steps in turn while
the second runs (`probe_interleaving`): whatever the step, one of them is the probe.

Each call fetches from the test's backend, which holds its answers: the verdict is the
test's, from how many requests reach that backend at once."""

from __future__ import annotations

import http.client
import sys
import threading
from types import ModuleType
from typing import Any

from labrunner.slow_steps import hold_first_at_step, learner_folder, slow_tracer, steps_in


class BackendFailed(Exception):
    """The backend answered 5xx: the call failed (a breaker counts it)."""


def fetcher(host: str) -> Any:
    """A call of the test's backend's /quote: its body, or BackendFailed on a 5xx."""
    hostname, _, port = host.rpartition(":")

    def fetch() -> str:
        conn = http.client.HTTPConnection(hostname, int(port), timeout=60)
        try:
            conn.request("GET", "/quote")
            reply = conn.getresponse()
            body = reply.read().decode()
            if reply.status >= 500:
                raise BackendFailed(f"HTTP {reply.status}")
            return body
        finally:
            conn.close()
    return fetch


def outcome_of(module: ModuleType, pool: Any, fetch: Any) -> str:
    """pool.call(fetch): 'answered', 'failed' (the backend's 5xx came back), 'refused'
    (BulkheadFull), 'open' (CircuitOpen) or 'raised <error>'."""
    try:
        pool.call(fetch)
    except module.BulkheadFull:
        return "refused"
    except module.CircuitOpen:
        return "open"
    except BackendFailed:
        return "failed"
    except Exception as exc:  # noqa: BLE001 - reported to the test as it is
        return f"raised {type(exc).__name__}: {exc}"
    return "answered"


class Burst:
    """`calls` threads, released together, each calling pool.call(fetch host's /quote)."""

    def __init__(self, module: ModuleType, pool: Any, host: str, calls: int,
                 delay: float) -> None:
        self._outcomes: list[str] = []
        self._lock = threading.Lock()
        tracer = slow_tracer(module, delay, opcodes=True)
        start = threading.Barrier(calls)
        fetch = fetcher(host)

        def one() -> None:
            start.wait(30)
            sys.settrace(tracer)
            try:
                outcome = outcome_of(module, pool, fetch)
            finally:
                sys.settrace(None)
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
        'answered', 'failed' (the backend's 5xx came back), 'refused' (BulkheadFull),
        'open' (CircuitOpen) or 'raised <error>'."""
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            return list(self._outcomes)


def start_burst(module: ModuleType, pool: Any, host: str, calls: int, delay: float) -> Burst:
    return Burst(module, pool, host, calls, delay)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _half_open(module: ModuleType, fetch: Any) -> Any:
    """A breaker (threshold 1, reset_timeout 30) opened by one failed call (the backend
    fails every request) and then left reset_timeout on its clock: half-open."""
    clock = _Clock()
    breaker = module.CircuitBreaker(failure_threshold=1, reset_timeout=30.0, clock=clock)
    outcome_of(module, breaker, fetch)
    clock.now += 30
    return breaker


def probe_interleavings(module: ModuleType, host: str) -> list[dict[str, Any]]:
    """Two calls into a half-open breaker whose backend fails every request, the first held
    before its k-th line while the second runs (until it ends, or waits for a lock the first
    holds), for k = 1 .. the lines one probe runs: per k, where the first was held and each
    call's outcome. Each k opens a fresh breaker with one failed request, and a correct
    breaker lets one probe through: 2 + 2 per k requests in all (the count of lines takes
    one trip and one probe). Which calls reached the backend is the test's to count."""
    fetch = fetcher(host)
    folder = learner_folder(module)
    breaker = _half_open(module, fetch)
    steps = steps_in(folder, lambda: outcome_of(module, breaker, fetch))
    seen: list[dict[str, Any]] = []
    for k in range(1, steps + 1):
        breaker = _half_open(module, fetch)
        outcomes: dict[str, str] = {}

        def first(b: Any = breaker, out: dict[str, str] = outcomes) -> None:
            out["first"] = outcome_of(module, b, fetch)

        def second(b: Any = breaker, out: dict[str, str] = outcomes) -> None:
            out["second"] = outcome_of(module, b, fetch)

        held_at = hold_first_at_step(folder, k, first, second)
        seen.append({"held_at": None if held_at is None else
                     f"{held_at[0].rsplit('/', 1)[-1]}:{held_at[1]}", **outcomes})
        if held_at is None:
            break
    return seen
