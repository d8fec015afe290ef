"""A graded lab as results.json records it: its status, points, first failure and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..catalog import Lab
from ..scoring import LabResult
from .config import HIDDEN_PREFIX, STATUS


def _test_name(nodeid: str, hidden_dir: Path | None) -> tuple[str, bool]:
    return nodeid, hidden_dir is not None and nodeid.startswith(HIDDEN_PREFIX)


def concept_record(lab: Lab, result: LabResult, hidden_dir: Path | None,
                   attempted: bool = True) -> dict[str, Any]:
    """A lab's grade as results.json records it. ``attempted`` False: the submission holds
    nothing of its own for the lab, which was not run (``not_attempted``)."""
    status = STATUS.get(result.outcome, "error")
    tests = []
    for test in result.tests:
        name, hidden = _test_name(test.nodeid, hidden_dir)
        tests.append({"name": name, "hidden": hidden, "status": STATUS.get(test.outcome,
                                                                           "error"),
                      "message": test.message, "authored": test.authored,
                      "duration": round(test.duration, 3)})
    first = next((t for t in tests if t["status"] != "pass"), None)
    message = result.message
    return {
        "id": lab.id, "slug": lab.slug, "title": lab.title,
        "status": status,
        "points": lab.points if status == "pass" else 0,
        "max_points": lab.points,
        "message": "" if status == "pass" else (message.splitlines() or [""])[0],
        "failed_test": first["name"] if first else None,
        "failed_hidden": bool(first and first["hidden"]),
        "authored": first["authored"] if first else "",
        "duration": round(result.duration, 3),
        # False: the learner's Python code shared the verification's interpreter (the lab
        # does not support a process of its own yet), so this outcome is not tamper-proof.
        "learner_code_apart": lab.learner_code_apart,
        "tests": tests,
        "attempted": attempted,
    }


def scrub_paths(result: LabResult, replace: dict[str, str]) -> None:
    """Private paths out of the messages: they differ on every run and mean nothing."""

    def clean(text: str) -> str:
        for old, new in sorted(replace.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(old, new)
        return text

    result.message = clean(result.message)
    for test in result.tests:
        test.message = clean(test.message)
