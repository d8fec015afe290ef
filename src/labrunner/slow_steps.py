"""For a lab's harness (no pytest here): make each step of the learner's code take a little
while, in the threads that install the tracer, so that threads running it at once
interleave step by step as on a loaded many-core machine. A read-modify-write that is not
one atomic step then loses updates every time, not only when the scheduler says so; code
that holds a lock around it only takes longer. The verdict stays the test's."""

from __future__ import annotations

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
