"""For a lab's harness (no pytest here): make each step of the learner's code take a little
while, in the threads that install the tracer, so that threads running it at once
interleave step by step as on a loaded many-core machine. A read-modify-write that is not
one atomic step then loses updates every time, not only when the scheduler says so; code
that holds a lock around it only takes longer. The verdict stays the test's."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

Tracer = Callable[[Any, str, Any], Any]


def learner_folder(module: ModuleType) -> str:
    """The folder of ``module`` (the learner's), as the prefix of its code's file names."""
    return str(Path(module.__file__ or "").parent).rstrip("/") + "/"


def step_tracer(folder: str, on_step: Callable[[Any], None], opcodes: bool = False) -> Tracer:
    """A trace function for ``sys.settrace`` (this thread) or ``threading.settrace`` (threads
    started afterwards) that calls ``on_step(frame)`` before each line - or, with
    ``opcodes``, each bytecode, for races inside one line such as ``d[k] += 1`` - of code
    under ``folder`` (:func:`learner_folder`); other code runs untraced. A harness counts
    the steps of a call with it, or holds a thread at its k-th step (ph4.9)."""
    wanted = "opcode" if opcodes else "line"

    def step(frame: Any, event: str, arg: Any) -> Any:
        if event == wanted:
            on_step(frame)
        return step

    def trace(frame: Any, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(folder):
            return None
        if opcodes:
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        return step

    return trace


def slow_tracer(module: ModuleType, delay: float, opcodes: bool = False) -> Tracer:
    """A :func:`step_tracer` over ``module``'s folder that sleeps ``delay`` s before each
    step. A sleep lets the other threads run: the GIL is released."""
    return step_tracer(learner_folder(module), lambda _frame: time.sleep(delay), opcodes)


def slow_new_threads(module: ModuleType, delay: float, opcodes: bool = False) -> None:
    """From now on, threads started afterwards (a server's workers) run ``module``'s folder
    through :func:`slow_tracer`; threads already running are left as they are."""
    threading.settrace(slow_tracer(module, delay, opcodes))


def restore_new_threads() -> None:
    """Threads started from now on run at full speed again."""
    threading.settrace(None)


# --- one interleaving at a time: hold a call at its k-th step while another runs ---------


def steps_in(folder: str, call: Callable[[], object], opcodes: bool = False) -> int:
    """How many steps (lines, or bytecodes with ``opcodes``) of the code under ``folder``
    one ``call()`` runs on this thread: the k's of :func:`hold_first_at_step` to try."""
    count = [0]
    sys.settrace(step_tracer(folder, lambda _frame: count.__setitem__(0, count[0] + 1),
                             opcodes))
    try:
        call()
    finally:
        sys.settrace(None)
    return count[0]


def asleep_in(thread: threading.Thread, folder: str) -> bool:
    """Whether ``thread``'s innermost Python frame is code under ``folder`` (the learner's
    code called into something that blocks, such as a Lock's acquire) and its OS thread
    sleeps."""
    frame = sys._current_frames().get(thread.ident or 0)
    if frame is None or thread.native_id is None \
            or not frame.f_code.co_filename.startswith(folder):
        return False
    try:
        stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "S"


def hold_first_at_step(folder: str, k: int, first: Callable[[], object],
                       second: Callable[[], object], *, opcodes: bool = False,
                       poll: float = 0.02, patience: float = 30.0) -> tuple[str, int] | None:
    """One interleaving of two calls: ``first()`` runs on a thread of its own, traced by
    :func:`step_tracer`, and is held before its k-th step of the code under ``folder``;
    ``second()`` then runs on another thread until it returns or is seen asleep in that code
    three polls in a row (waiting for a lock the first holds: then the order is "one after
    the other"); then the first goes on. Trying k = 1 .. :func:`steps_in` drives every such
    interleaving. ``patience`` only ends a wait early (a wait this cannot see, such as a
    Condition's in Python code): the calls then finish as they would, so a correct solution
    never fails by it. The bodies catch their own exceptions. Returns where the first was
    held (file, line), or None if it never got that far."""
    cond = threading.Condition()
    state: dict[str, Any] = {"seen": 0, "held_at": None, "go": False, "ended": False}

    def hold(frame: Any) -> None:
        state["seen"] += 1
        if state["seen"] == k:
            with cond:
                state["held_at"] = (frame.f_code.co_filename, frame.f_lineno)
                cond.notify_all()
                cond.wait_for(lambda: state["go"], timeout=2 * patience)

    def traced() -> None:
        sys.settrace(step_tracer(folder, hold, opcodes))
        try:
            first()
        finally:
            sys.settrace(None)
            # A first() that ended before its k-th step was never held: say so, or the wait
            # below (which only a notify wakes) would sit out its whole timeout.
            with cond:
                state["ended"] = True
                cond.notify_all()

    held = threading.Thread(target=traced, name="held-at-a-step", daemon=True)
    held.start()
    with cond:
        cond.wait_for(lambda: state["held_at"] is not None or state["ended"],
                      timeout=2 * patience)
    other = threading.Thread(target=second, name="runs-meanwhile", daemon=True)
    other.start()
    asleep, deadline = 0, time.monotonic() + patience
    while other.is_alive() and asleep < 3 and time.monotonic() < deadline:
        asleep = asleep + 1 if asleep_in(other, folder) else 0
        other.join(poll)
    with cond:
        state["go"] = True
        cond.notify_all()
    held.join(2 * patience)
    other.join(2 * patience)
    held_at: tuple[str, int] | None = state["held_at"]
    return held_at


def threading_waits_in(folder: str) -> dict[int, Any]:
    """Each thread of this process that sits in a ``threading`` wait (a Condition, an Event,
    a Semaphore) called, at any depth, from code in ``folder``: its id and the frame of that
    wait (the innermost). A new wait is a new frame, so two readings tell a thread that left
    its wait (woken) from one still in it (ph4.8's barge); how many there are is
    ``labrunner.testing.threads_waiting_in``."""
    prefix = str(folder).rstrip("/") + "/"
    waits: dict[int, Any] = {}
    for ident, frame in sys._current_frames().items():
        wait, from_folder = None, False
        current: Any = frame
        while current is not None:
            code = current.f_code
            if code.co_name == "wait" and code.co_filename.endswith("threading.py"):
                wait = wait or current
            elif code.co_filename.startswith(prefix):
                from_folder = True
            current = current.f_back
        if wait is not None and from_folder:
            waits[ident] = wait
    return waits
