"""A lab's budget counts the time the machine let it run: the run-queue wait of its process
tree is read from the kernel and added to the deadline (at most one budget more)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from labrunner.cpu_wait import CpuWait
from labrunner.lab_exit import kill_group, wait_for_exit

# A child that waits while its own child burns ``seconds`` of CPU (by its CPU time's clock).
BURN = """
import os, sys, time
seconds = float(sys.argv[1])
if os.fork() == 0:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    os._exit(0)
os.wait()
"""
# A child that starts ``count`` spinning children: a run that is its own load.
STORM = """
import os, sys
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        while True:
            pass
os.wait()
"""


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """One CPU, kept busy by a hog pinned to it: whatever else is pinned there waits."""
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        yield cpu
    finally:
        hog.kill()
        hog.wait()


def waited_out(code: str, budget: float, *args: str, cpu: int | None = None
               ) -> tuple[bool, float, float]:
    """Run ``code`` in a process of its own (on ``cpu`` if given) under wait_for_exit's
    ``budget``: whether it timed out, the seconds CpuWait allowed more, the seconds taken."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], start_new_session=True,
        preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}))
    cpu_wait = CpuWait(proc.pid)
    started = time.monotonic()
    try:
        timed_out = wait_for_exit(proc, budget, [], [False], cpu_wait)
    finally:
        kill_group(proc)
    return timed_out, cpu_wait.allowance, time.monotonic() - started


def test_a_tree_kept_off_the_cpu_has_its_wait_counted(one_cpu: int) -> None:
    # The grandchild's wait counts: a learner's program, the learner's factory.
    timed_out, allowance, _ = waited_out(BURN, 60, "2.0", cpu=one_cpu)
    assert not timed_out
    # Sharing one CPU with a hog, it ran half the time: it waited about 2 s, about 1.5 s of
    # it seen (read every second, so the last second's is not).
    assert allowance >= 0.5, (
        f"a process sharing a CPU with a hog for 2 s of CPU waited {allowance:.2f} s by the "
        "count: its run-queue wait was not read")


def test_a_run_that_is_its_own_load_gets_no_more_time() -> None:
    # More threads ready to run than CPUs: they wait for each other, not for the machine.
    spinners = 2 * len(os.sched_getaffinity(0)) + 1
    timed_out, allowance, took = waited_out(STORM, 2.0, str(spinners))
    assert timed_out and allowance < 0.5, (
        f"{spinners} spinning processes of the run itself were allowed {allowance:.2f} s "
        "more for waiting on each other")
    assert took < 2.0 + 1 + 3, f"a 2 s budget over a fork storm ended after {took:.1f} s"


def test_a_hang_that_sleeps_still_ends_at_the_budget(one_cpu: int) -> None:
    # Asleep, it waits for no CPU however loaded the machine: the budget is not stretched.
    timed_out, allowance, took = waited_out("import time; time.sleep(60)", 1.5)
    assert timed_out, "a process asleep for 60 s was not timed out at a 1.5 s budget"
    assert allowance < 1, f"a sleeping process was counted {allowance:.2f} s of waiting for a CPU"
    assert took < 1.5 + 1 + 3, f"a 1.5 s budget over a sleeping process ended after {took:.1f} s"


def test_the_allowance_is_at_most_one_budget_more(one_cpu: int) -> None:
    # A spinning hang on a loaded CPU waits as long as it runs: it ends at twice the budget.
    timed_out, allowance, took = waited_out("while True: pass", 1.0, cpu=one_cpu)
    assert timed_out and allowance <= 1.0
    assert took < 2.0 + 1 + 3, f"a 1 s budget over a spinning process ended after {took:.1f} s"


INNER = """
import os

import pytest


@pytest.mark.timeout(1.0)
def test_spins():
    os.sched_setaffinity(0, {int(os.environ["INNER_CPU"])})   # beside the hog
    while True:
        pass
"""


def _inner_test_time(folder: Path, name: str, cpu: int) -> float:
    """Seconds ``name`` of INNER took to fail on its timeout, in a pytest of its own
    (labrunner's plugin ends a session at its first timeout), pinned beside the hog on ``cpu``."""
    (folder / "test_inner.py").write_text(INNER)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
         "--durations-min=0", f"test_inner.py::{name}"],
        cwd=folder, capture_output=True, text=True, timeout=120,
        env={**os.environ, "INNER_CPU": str(cpu)})
    assert "Timeout (>1.0s)" in done.stdout, done.stdout[-3000:]
    return next(float(line.split("s ", 1)[0]) for line in done.stdout.splitlines()
                if " call " in line and line.endswith(f"::{name}"))


def test_a_tests_timeout_is_stretched_by_its_wait_for_a_cpu(one_cpu: int, tmp_path: Path) -> None:
    """Each test's timeout (pytest-timeout's timer, through labrunner's plugin) counts the
    time the machine let the test run: a spinning test beside a hog on its CPU is given
    its wait, up to its timeout again (a sleeping one waits for no CPU: the test above)."""
    spins = _inner_test_time(tmp_path, "test_spins", one_cpu)
    assert 1.2 <= spins < 2.0 + 3, (
        f"a test spinning beside a hog failed after {spins:.2f} s at a 1 s timeout: about "
        "half its time it waited for the CPU, which should have been added")
