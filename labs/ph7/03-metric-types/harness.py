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
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from labrunner.slow_steps import learner_folder, slow_tracer, step_tracer


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
    count = [0]
    sys.settrace(step_tracer(learner_folder(module),
                             lambda _frame: count.__setitem__(0, count[0] + 1)))
    try:
        getattr(metrics, call)(*args)
    finally:
        sys.settrace(None)
    return count[0]


def _asleep_in(thread: threading.Thread, native: int | None, folder: str) -> bool:
    """Whether that thread's innermost Python frame is the learner's code (it called into
    something that blocks, such as a Lock's acquire) and its OS thread sleeps."""
    frame = sys._current_frames().get(thread.ident or 0)
    if frame is None or native is None or not frame.f_code.co_filename.startswith(folder):
        return False
    try:
        stat = Path(f"/proc/self/task/{native}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "S"


def held_while_other_runs(module: ModuleType, metrics: Any, call: str,
                          args: tuple[Any, ...], k: int) -> dict[str, Any]:
    """``metrics.<call>(*args)`` on one thread, held before the k-th line of the learner's
    code it runs, while a second such call on another thread runs to its end (or is seen
    asleep in the learner's code: waiting for a lock the first holds); then the first goes
    on. Every interleaving of two calls is one such k. Returns where the first was held
    ({"line", "text"}, None if it never got there) and any exception raised."""
    folder = learner_folder(module)
    cond = threading.Condition()
    state: dict[str, Any] = {"seen": 0, "held_at": None, "go": False}
    natives: dict[str, int] = {}
    errors: list[str] = []

    def hold(frame: Any) -> None:
        state["seen"] += 1
        if state["seen"] == k:
            with cond:
                state["held_at"] = (frame.f_code.co_filename, frame.f_lineno)
                cond.notify_all()
                cond.wait_for(lambda: state["go"], timeout=60)

    def run(name: str, traced: bool) -> None:
        natives[name] = threading.get_native_id()
        if traced:
            sys.settrace(step_tracer(folder, hold))
        try:
            getattr(metrics, call)(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            sys.settrace(None)

    first = threading.Thread(target=run, args=("first", True), name="job-worker-held")
    first.start()
    with cond:
        cond.wait_for(lambda: state["held_at"] is not None or not first.is_alive(), timeout=60)
    second = threading.Thread(target=run, args=("second", False), name="job-worker-other")
    second.start()
    # Done, or waiting for the held one (then this interleaving is "one after the other").
    # The deadline only ends the hold early for a wait this cannot see (a Condition's, in
    # Python code): either way the calls then finish, and a correct gauge reads right.
    asleep, deadline = 0, time.monotonic() + 30
    while second.is_alive() and asleep < 3 and time.monotonic() < deadline:
        asleep = asleep + 1 if _asleep_in(second, natives.get("second"), folder) else 0
        second.join(0.02)
    with cond:
        state["go"] = True
        cond.notify_all()
    first.join(60)
    second.join(60)
    held = state["held_at"]
    return {"line": held[1] if held else None,
            "text": linecache.getline(held[0], held[1]).strip() if held else None,
            "errors": errors}
