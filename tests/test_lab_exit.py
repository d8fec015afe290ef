"""A lab's budget counts the time the machine let it run: the run-queue wait of its process
tree is read from the kernel and added to the deadline (at most one budget more)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from labrunner.lab_exit import CpuWait, kill_group, wait_for_exit

# A child and its grandchild burn ``seconds`` of CPU each (by the clock of their own CPU time).
BURN = """
import os, sys, time
seconds = float(sys.argv[1])
if os.fork() == 0:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    os._exit(0)
end = time.process_time() + seconds
while time.process_time() < end:
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


def test_a_tree_kept_off_the_cpu_has_its_wait_counted(one_cpu: int) -> None:
    # The grandchild's wait counts too: a learner's program, the learner's factory.
    proc = subprocess.Popen([sys.executable, "-c", BURN, "1.0"], start_new_session=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    cpu_wait = CpuWait(proc.pid)
    try:
        timed_out = wait_for_exit(proc, 60, [], [False], cpu_wait)
    finally:
        kill_group(proc)
    assert not timed_out
    # Two processes sharing one CPU with a hog: each ran a third of the time, so together
    # they waited about 4 s (read every second, so the last second's is not seen).
    assert cpu_wait.allowance >= 0.8, (
        f"two processes sharing a CPU with a hog for 1 s of CPU each waited "
        f"{cpu_wait.allowance:.2f} s by the count: their run-queue wait was not read")


def test_a_hang_that_sleeps_still_ends_at_the_budget(one_cpu: int) -> None:
    # Asleep, it waits for no CPU however loaded the machine: the budget is not stretched.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    cpu_wait = CpuWait(proc.pid)
    started = time.monotonic()
    try:
        timed_out = wait_for_exit(proc, 1.5, [], [False], cpu_wait)
    finally:
        kill_group(proc)
    took = time.monotonic() - started
    assert timed_out, "a process asleep for 60 s was not timed out at a 1.5 s budget"
    assert cpu_wait.allowance < 1, (
        f"a sleeping process was counted {cpu_wait.allowance:.2f} s of waiting for a CPU")
    assert took < 1.5 + 1 + 3, f"a 1.5 s budget over a sleeping process ended after {took:.1f} s"


def test_the_allowance_is_at_most_one_budget_more(one_cpu: int) -> None:
    # A spinning hang on a loaded CPU waits as long as it runs: it ends at twice the budget.
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    cpu_wait = CpuWait(proc.pid)
    started = time.monotonic()
    try:
        timed_out = wait_for_exit(proc, 1.0, [], [False], cpu_wait)
    finally:
        kill_group(proc)
    took = time.monotonic() - started
    assert timed_out and cpu_wait.allowance <= 1.0
    assert took < 2.0 + 1 + 3, f"a 1 s budget over a spinning process ended after {took:.1f} s"
