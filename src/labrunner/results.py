"""Machine-readable results: a versioned JSON document (after Exercism's test-runner
``results.json``) and JUnit XML for CI systems."""

from __future__ import annotations

import json
import os
import platform
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .outcome import OUTCOMES, Outcome
from .scoring import LabResult

RESULTS_VERSION = 1


def overall_status(results: Sequence[LabResult]) -> str:
    if not results:
        return "error"
    if any(r.outcome == "error" for r in results):
        return "error" if all(r.outcome == "error" for r in results) else "fail"
    # A skipped lab was not verified: it is not a pass, just as the exit code says.
    return "pass" if all(Outcome(r.outcome).is_pass for r in results) else "fail"


def results_document(results: Sequence[LabResult], *, target: str, backend: str,
                     started_at: float, duration: float) -> dict[str, Any]:
    counts = {o: sum(1 for r in results if r.outcome == o) for o in OUTCOMES}
    return {
        "version": RESULTS_VERSION,
        "tool": {"name": "labrunner", "version": __version__,
                 "python": platform.python_version()},
        "status": overall_status(results),
        "target": target,
        "backend": backend,
        "started_at": started_at,
        "duration": round(duration, 3),
        "summary": {"total": len(results), **counts},
        "concepts": [
            {
                "id": r.lab.id,
                "slug": r.lab.slug,
                "title": r.lab.title,
                "phase": r.lab.phase_id,
                "kind": "c_example" if r.lab.is_example else "concept",
                "status": r.outcome,
                "points": r.lab.points if r.outcome == "passed" else 0,
                "max_points": r.lab.points,
                "duration": round(r.duration, 3),
                "message": r.message,
                "files_hash": r.files_hash,
                "tests": [
                    {"name": t.name, "status": t.outcome, "message": t.message,
                     "duration": round(t.duration, 3),
                     **({"output": t.output} if t.output else {})}
                    for t in r.tests
                ],
            }
            for r in results
        ],
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_junit(path: Path, results: Sequence[LabResult]) -> None:
    suites = ET.Element("testsuites", name="labrunner")
    by_phase: dict[str, list[LabResult]] = {}
    for result in results:
        by_phase.setdefault(result.lab.phase_id, []).append(result)
    for phase, items in by_phase.items():
        cases = [(r, t) for r in items for t in r.tests] or []
        suite = ET.SubElement(
            suites, "testsuite", name=phase,
            tests=str(sum(max(1, len(r.tests)) for r in items)),
            failures=str(sum(1 for r, t in cases if t.outcome in ("failed", "timeout"))),
            errors=str(sum(1 for r in items if r.outcome == "error" and not r.tests)),
            skipped=str(sum(1 for r, t in cases if t.outcome == "skipped")),
            time=f"{sum(r.duration for r in items):.3f}",
        )
        for result in items:
            classname = f"{result.lab.id}.{result.lab.slug}"
            if not result.tests:
                case = ET.SubElement(suite, "testcase", classname=classname, name="verification",
                                     time=f"{result.duration:.3f}")
                ET.SubElement(case, "error", message=result.first_line).text = result.message
                continue
            for test in result.tests:
                case = ET.SubElement(suite, "testcase", classname=classname, name=test.name,
                                     time=f"{test.duration:.3f}")
                first = test.message.splitlines()[0] if test.message else test.outcome
                if test.outcome in ("failed", "timeout"):
                    ET.SubElement(case, "failure", message=first).text = test.message
                elif test.outcome == "error":
                    ET.SubElement(case, "error", message=first).text = test.message
                elif test.outcome == "skipped":
                    ET.SubElement(case, "skipped", message=first)
                if test.output:
                    ET.SubElement(case, "system-out").text = test.output
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
