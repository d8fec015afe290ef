"""What a process does with signals, and which objects it keeps alive: probes a verification
runs beside the learner's program (``learner.run_helper``), where grading hides its /proc or
its objects from the test's process."""

from __future__ import annotations

import gc
from pathlib import Path


def signals_caught(pid: int) -> list[int]:
    """The signal numbers process ``pid`` has a handler for (``SigCgt`` in
    /proc/<pid>/status), sorted; empty when it is gone or out of sight. Tells "no handler
    for SIGTERM" from "a handler that never lets the process end" (ph6.10)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return [n for n in range(1, 65) if mask >> (n - 1) & 1]
    return []


def objects_alive(type_names: tuple[str, ...]) -> int:
    """How many objects of the classes named ``module.QualName`` (e.g.
    ``threading.Event``) this process keeps alive after a full collection: run beside the
    learner's code, before and after N operations, it shows per-operation state that is
    never released (a waiter left in a map after its call timed out, ph6.3)."""
    gc.collect()
    wanted = set(type_names)
    return sum(1 for obj in gc.get_objects()
               if f"{type(obj).__module__}.{type(obj).__qualname__}" in wanted)
