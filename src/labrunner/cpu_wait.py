"""How long a run was kept off the CPU by the rest of the machine, read from the kernel: the
runner's lab budget (lab_exit) and each test's timeout (load_aware_timeouts) count only the
time the machine let the run use."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


class CpuWait:
    """How long a run was kept off the CPU by others: the run-queue wait of the threads in
    the tree under the tests process (``/proc/<tid>/schedstat``, its second field), as the
    kernel counts it. On a loaded machine a correct lab can take twice its quiet time; load
    must not turn it into a timeout (as the grader retries the machine's other failures).
    A hang that sleeps (a lock, a read) waits for no CPU and still ends at the budget; one
    that spins ends at one budget more at most. A run with more threads ready to run than
    the machine has CPUs (a fork storm, a busy pool) waits for itself: that is not counted."""

    EVERY = 1.0   # seconds between readings: a dozen small files, cheap even under load

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpus = len(os.sched_getaffinity(0))
        self.waited: dict[int, int] = {}   # tid -> nanoseconds of run-queue wait seen
        self.read_at = time.monotonic()
        self.allowance = 0.0

    def baseline(self) -> CpuWait:
        """Read the tree now without counting it: what it waited before is not this run's."""
        self.sample(0)
        return self

    def sample(self, budget: float) -> float:
        """Read the tree again; the seconds added to the deadline (at most ``budget``)."""
        now = time.monotonic()
        waited_since, runnable = 0, 0
        for pid, tids in self._tree():
            for tid, waited, running in _thread_waits(pid, tids):
                waited_since += max(0, waited - self.waited.get(tid, 0))
                self.waited[tid] = max(self.waited.get(tid, 0), waited)
                runnable += running
        if runnable <= self.cpus:
            # Threads waiting side by side wait the same wall time once.
            self.allowance += min(waited_since / 1e9, now - self.read_at)
        self.read_at = now
        self.allowance = min(budget, self.allowance)
        return self.allowance

    def _tree(self) -> list[tuple[int, list[int]]]:
        """Each process under the root, with its threads' ids."""
        found: list[tuple[int, list[int]]] = []
        todo = [self.root]
        while todo and len(found) < 4096:
            pid = todo.pop()
            tids = _tids(pid)
            found.append((pid, tids))
            for tid in tids:
                with contextlib.suppress(OSError, ValueError):
                    children = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                    todo.extend(int(child) for child in children.split())
        return found


def _tids(pid: int) -> list[int]:
    try:
        return [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except (OSError, ValueError):
        return []


def _thread_waits(pid: int, tids: list[int]) -> Iterator[tuple[int, int, bool]]:
    """(tid, nanoseconds it waited on a run queue, whether it is ready to run now) for each
    of ``pid``'s threads ``tids`` still there; nothing where the kernel keeps no schedstats."""
    for tid in tids:
        task = f"/proc/{pid}/task/{tid}"
        try:
            waited = int(Path(f"{task}/schedstat").read_text().split()[1])
            state = Path(f"{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, ValueError):
            continue
        yield tid, waited, state == "R"
