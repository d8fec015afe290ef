"""Runs where the learner's JobMetrics runs (in its process when grading): calls it from many
threads at once, the way a job worker's threads do, and makes every bytecode of the learner's
code take a little while in those threads, so that they interleave step by step as on a
loaded many-core machine. A read-modify-write of a shared number (a dict of counts, a gauge's
value read back and set) then loses updates: several threads read the same value before any
of them writes it back. prometheus_client's inc()/dec() hold a lock, and are not stretched
(they are not the learner's code): through them nothing changes but the time taken. The
verdict is the test's: it reads the gauge Prometheus scraped."""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any

from labrunner.slow_steps import slow_tracer


def at_once(module: ModuleType, metrics: Any, call: str, args: tuple[Any, ...], threads: int,
            delay: float) -> None:
    """``metrics.<call>(*args)`` from ``threads`` threads released together, each bytecode of
    the learner's folder preceded by a ``delay`` s sleep (which lets the other threads run)."""
    tracer = slow_tracer(module, delay, opcodes=True)
    start = threading.Barrier(threads)
    failures: list[BaseException] = []

    def one() -> None:
        try:
            start.wait(30)
            sys.settrace(tracer)  # this thread's calls from here on
            getattr(metrics, call)(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failures.append(exc)
        finally:
            sys.settrace(None)

    workers = [threading.Thread(target=one, name=f"job-worker-{n}") for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    if failures:
        raise failures[0]
