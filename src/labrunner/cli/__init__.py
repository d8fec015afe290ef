"""The ``labrunner`` command: thin click commands over the library, one module a group of
commands (learn, progress, dev, services, grade), all under the one group in ``base``.

Exit codes: 0 all selected passed, 1 some failed, 2 usage or set-up errors, 130 interrupted.
"""

from __future__ import annotations

from . import dev, grade, learn, progress, services  # noqa: F401 - registers the commands
from .base import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_USAGE, LabrunnerGroup, UsageFailure, main

__all__ = ["EXIT_FAIL", "EXIT_INTERRUPTED", "EXIT_USAGE", "LabrunnerGroup", "UsageFailure",
           "entry", "main"]


def entry() -> None:  # pragma: no cover - console script
    main()
