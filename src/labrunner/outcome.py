"""What became of a verification, in one vocabulary for every place that reads it: the
exit code, the terminal, the results JSON, JUnit, the progress store and the gradebook.

A lab's outcome is one of five; only ``passed`` counts as a pass anywhere (a ``skipped`` lab
was not verified, so neither the exit code nor ``--json`` nor a grade may call it a pass).
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"      # the verification ran and the learner's code did not meet it
    ERROR = "error"        # the verification could not run (services, a broken test)
    TIMEOUT = "timeout"    # the learner's code did not finish in the lab's time
    SKIPPED = "skipped"    # nothing was verified (e.g. a check that needs Docker)

    @property
    def is_pass(self) -> bool:
        return self is Outcome.PASSED

    @property
    def grade_status(self) -> str:
        """The gradebook's word (Exercism's: pass, fail, error; plus timeout)."""
        return _GRADE[self]

    @property
    def symbol(self) -> str:
        return _LOOK[self][0]

    @property
    def colour(self) -> str:
        return _LOOK[self][1]


_GRADE = {Outcome.PASSED: "pass", Outcome.FAILED: "fail", Outcome.ERROR: "error",
          Outcome.TIMEOUT: "timeout", Outcome.SKIPPED: "error"}
_LOOK = {Outcome.PASSED: ("✓", "green"), Outcome.FAILED: ("✗", "red"),
         Outcome.ERROR: ("!", "red"), Outcome.TIMEOUT: ("⏱", "yellow"),
         Outcome.SKIPPED: ("–", "yellow")}

OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)
