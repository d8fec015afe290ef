"""How the learner's code is hosted: the environment that says so, which labs it concerns,
and the one lock on the factory's socket (a request and its reply at a time)."""

from __future__ import annotations

import threading
from typing import Protocol

ENV_LEARNER_HOST = "LABRUNNER_LEARNER_HOST"
# Grading: a folder the verification fills for the learner's process (another uid) to read.
ENV_SHARED_DIR = "LABRUNNER_SHARED_DIR"
SPAWN = "spawn"
FACTORY_PREFIX = "fd:"

# The names of labrunner's own threads in a learner host (its serving threads, the pool that
# serves calls from the tests' side): a verification that looks at the threads the learner's
# code started leaves them out (labrunner.testing.learner_threads).
OWN_THREAD_PREFIX = "labrunner-"

# One request and its reply at a time on a factory's socket (hosts and programs alike).
FACTORY_LOCK = threading.Lock()


class HostedLab(Protocol):
    """What of a catalog Lab decides where its learner code runs (this layer is below it)."""

    @property
    def language(self) -> str: ...

    @property
    def learner_code_in_own_process(self) -> bool: ...


def needs_a_host(lab: HostedLab, how: str, beside_programs: bool = True) -> bool:
    """Whether ``lab``'s learner code runs in a host under ``$LABRUNNER_LEARNER_HOST`` = ``how``:
    a Python lab's that may leave the verification's process; with ``beside_programs``, a C
    lab's helpers too when grading (a host of the learner's uid, beside its programs)."""
    return bool(how) and (lab.learner_code_in_own_process or (
        beside_programs and lab.language != "python" and how.startswith(FACTORY_PREFIX)))
