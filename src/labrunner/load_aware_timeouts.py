"""Each test's timeout counts the time the machine let it run, as the runner's lab budget
does (``lab_exit``): pytest-timeout's timer, through its own hook, with an alarm that on
going off first adds the time the tests process's tree was kept waiting for a CPU since the
test began (``CpuWait``: at most the timeout again; not the time a test's own threads, more
than the CPUs, waited for each other). A test that sleeps in a hang fails at its timeout."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import pytest

from .cpu_wait import CpuWait


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None   # pytest-timeout's own timer thread
    import pytest_timeout

    cpu_wait = CpuWait(os.getpid()).baseline()

    def alarm(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        granted = cpu_wait.allowance
        added = cpu_wait.sample(settings.timeout) - granted
        if added >= 0.05:
            signal.setitimer(signal.ITIMER_REAL, added)
            return
        pytest_timeout.timeout_sigalrm(item, settings)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
