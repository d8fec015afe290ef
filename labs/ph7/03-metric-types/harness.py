"""Runs where the learner's JobMetrics runs (in its process when grading): calls it from many
threads at once, the way a job worker's threads do, and makes every bytecode of the learner's
code take a little while in those threads, so that they interleave step by step as on a
loaded many-core machine. A read-modify-write of a shared number (a dict of counts, a gauge's
value read back and set) then loses updates: several threads read the same value before any
of them writes it back. prometheus_client's inc()/dec() hold a lock, and are not stretched
(they are not the learner's code): through them nothing changes but the time taken. The
verdict is the test's: it reads the gauge Prometheus scraped."""

from __future__ import annotations

import linecache
import sys
import threading
from types import ModuleType
from typing import Any

from labrunner.slow_steps import hold_first_at_step, learner_folder, slow_tracer, steps_in


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


def steps_of(module: ModuleType, metrics: Any, call: str, args: tuple[Any, ...]) -> int:
    """How many lines of the learner's code one ``metrics.<call>(*args)`` runs."""
    return steps_in(learner_folder(module), lambda: getattr(metrics, call)(*args))


def held_while_other_runs(module: ModuleType, metrics: Any, call: str,
                          args: tuple[Any, ...], k: int) -> dict[str, Any]:
    """``metrics.<call>(*args)`` on one thread, held before the k-th line of the learner's
    code it runs, while a second such call on another thread runs to its end (or is seen
    asleep in the learner's code: waiting for a lock the first holds); then the first goes
    on (:func:`labrunner.slow_steps.hold_first_at_step`). Every interleaving of two calls
    is one such k. Returns where the first was held ({"line", "text"}, None if it never got
    there) and any exception raised."""
    errors: list[str] = []

    def body() -> None:
        try:
            getattr(metrics, call)(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(f"{type(exc).__name__}: {exc}")

    held = hold_first_at_step(learner_folder(module), k, body, body)
    return {"line": held[1] if held else None,
            "text": linecache.getline(held[0], held[1]).strip() if held else None,
            "errors": errors}
