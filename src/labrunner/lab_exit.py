"""How a lab's pytest process ends: waited for within its budget (with a grace period once it
reported the end of its session, and every thread's stack when it lingers past it), seen the
moment it exits, and its whole process group killed after."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

from .channel import FINISHED
from .cpu_wait import CpuWait


class TestsProcess(Protocol):
    """A lab's tests process: a ``subprocess.Popen``, or one forked by the zygote."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdout(self) -> IO[bytes] | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

# Seconds a verification may take to exit once it reported that its session finished.
EXIT_GRACE = 10.0


def wait_for_exit(proc: TestsProcess, budget: float, records: list[dict[str, Any]],
                  lingered: list[bool], cpu_wait: CpuWait) -> bool:
    """Wait for the verification to exit; True if it ran out of ``budget``. Once it has
    reported the end of its session, it gets EXIT_GRACE seconds more: something still
    running in it (a non-daemon thread of the learner's, a stuck clean-up) then costs those
    seconds, not the whole budget. Its threads' stacks go to its output first.

    The budget is time the machine let the run use: what ``cpu_wait`` counts (its processes
    runnable but waiting for a CPU) is added to the deadline, up to one budget more."""
    started = time.monotonic()
    finished_at: float | None = None
    sampled = started
    with _exit_watch(proc) as exited:
        while not exited(0.2):
            now = time.monotonic()
            if finished_at is None and records and records[-1].get("kind") == FINISHED:
                finished_at = now
            if finished_at is not None and now - finished_at > EXIT_GRACE:
                lingered[0] = True
                _ask_for_stacks(proc)
                return False
            if now - sampled >= CpuWait.EVERY or now > started + budget + cpu_wait.allowance:
                cpu_wait.sample(budget)
                sampled = now
            if now > started + budget + cpu_wait.allowance:
                _ask_for_stacks(proc)
                return True
    return False


def _ask_for_stacks(proc: TestsProcess) -> None:
    """Every thread's stack in the output (faulthandler on SIGUSR1, see the plugin) before
    the process is killed: where it hung is the only clue a log keeps of a rare hang."""
    try:
        os.kill(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=1)
    except (OSError, subprocess.TimeoutExpired):
        pass


@contextlib.contextmanager
def _exit_watch(proc: TestsProcess) -> Iterator[Callable[[float], bool]]:
    """``exited(timeout)``: whether ``proc`` exited (reaped), waiting at most ``timeout``
    seconds and waking the moment it exits: a pidfd in select(), where subprocess' own
    timed wait looks every 50 ms (25 ms of every lab's run on average). A forked one has
    its own: readable once the zygote saw it exit."""
    exit_fd = getattr(proc, "exit_fd", None)
    try:
        pidfd: int | None = os.pidfd_open(proc.pid) if exit_fd is None else None
    except (AttributeError, OSError):   # an old kernel: subprocess' polling wait
        pidfd = None
    watched = exit_fd if exit_fd is not None else pidfd

    def exited(timeout: float) -> bool:
        if watched is not None:
            if not select.select([watched], [], [], timeout)[0]:
                return False
            proc.wait()
            return True
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    try:
        yield exited
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_group(proc: TestsProcess) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=3)
            break
        except subprocess.TimeoutExpired:
            continue
    # Whatever the tests left in that group (servers they started) goes too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
