"""Children that die with whoever started them: the kernel's PR_SET_PDEATHSIG.

A process the runner, a verification or a service set starts must not outlive it when it
is SIGKILLed (it has no chance to clean up): the kernel sends the child the chosen signal
when the *thread* that forked it ends. So only a thread that lives as long as the child
should (a main thread, a host's serving thread) may tie a child to itself.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

# Resolved once, before any fork: a forked child of a threaded parent must not load
# libraries (dlopen could wait forever on a lock another thread held at the fork).
try:
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child (a preexec function, or a forked process): receive ``sig`` when the
    thread that started it ends. After a change of credentials, call it again: a switch
    of uid clears it."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(sig))


def killed_with_this_thread() -> Callable[[], None] | None:
    """A ``preexec_fn`` that SIGKILLs the child when the calling thread ends - only when that
    is the main thread, whose end is the process's; a child started from a short-lived
    helper thread would otherwise die with that helper."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return _die_by_sigkill


def _die_by_sigkill() -> None:
    die_with_parent(signal.SIGKILL)
