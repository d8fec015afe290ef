"""What a grading run is: its error, its configuration and limits, the statuses a grade uses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..catalog import Lab
from ..errors import LabrunnerError
from ..outcome import Outcome

GRADES_VERSION = 1


STATUS = {o.value: o.grade_status for o in Outcome}


HIDDEN_PREFIX = "hidden/"


class GradingError(LabrunnerError):
    """A submission set, an archive or an option is unusable; the message says which."""


@dataclass
class Limits:
    timeout: float | None = None          # wall clock per lab (default: from the lab)
    memory_mb: int = 1024
    cpu_seconds: int = 120
    # Threads count too: a test with a pool of workers needs room (a fork storm does not).
    processes: int = 256
    output_bytes: int = 256 * 1024
    # The largest file a graded process may write (RLIMIT_FSIZE): no run fills the disk.
    file_mb: int = 256


@dataclass
class GradeConfig:
    labs: list[Lab]
    out: Path
    backend: str = "local"
    jobs: int = 1
    limits: Limits = field(default_factory=Limits)
    hidden: Path | None = None
    force: bool = False
    shard: tuple[int, int] | None = None
    feedback_format: str = "md"
    selectors: tuple[str, ...] = ()


def use_private_services(config: GradeConfig) -> bool:
    """Private services need the local backend, root (for the sandbox uids) and a kernel
    that lets a thread have a network namespace of its own."""
    if config.backend != "local" or os.geteuid() != 0:
        return False
    from ..services.private import private_networks_available

    return private_networks_available()
