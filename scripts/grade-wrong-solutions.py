#!/usr/bin/env python3
"""Grade each lab's reference and every wrong solution for real, as an instructor's
`labrunner grade` would: one cohort per lab, one student per variant. `dev check` runs a lab
in one uid and stops at its first failing test; grading runs the learner's code as another
uid, hides /proc across uids, copies the lab alone and runs every test. This finds what
scores differently there (docs/STRENGTH.md, "As grading runs them"). Needs root (the
sandbox uids).

    .venv/bin/python scripts/grade-wrong-solutions.py [--out DIR] [--jobs N] [LAB_ID...]

Prints one line per lab and each variant that scored the wrong way (a reference below full
marks, a wrong solution above 0); exits 1 when there was one. Default: every lab.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labrunner.catalog import Lab, load_catalog
from labrunner.devcheck import complete_source, wrong_solutions
from labrunner.workspace import write_marker


def _nothing() -> None:
    """Nothing to clean: the reference is used where it is."""


def make_cohort(lab: Lab, cohort: Path) -> list[str]:
    """A student folder per variant, holding only the lab's learner files; their names."""
    variants = [("reference", lab.solution_dir)] + [
        (v.name.removesuffix(".diff"), v) for v in wrong_solutions(lab)]
    for name, source in variants:
        folder, clean = (source, _nothing) if name == "reference" else \
            complete_source(lab, source)
        try:
            student = cohort / name
            (student / lab.workspace_dir).mkdir(parents=True)
            write_marker(student)
            for file in lab.learner_files:
                if (folder / file).exists():
                    target = student / lab.workspace_dir / file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(folder / file, target)
        finally:
            clean()
    return [name for name, _ in variants]


def grade_lab(lab: Lab, out: Path, jobs: int) -> list[str]:
    """Grade the lab's cohort; the variants that scored the wrong way, with their status
    and first line."""
    cohort = Path(tempfile.mkdtemp(prefix=f"lr-sweep-{lab.slug}-"))
    try:
        names = make_cohort(lab, cohort)
        results = out / lab.id
        shutil.rmtree(results, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "labrunner.cli", "grade", str(cohort),
                        "--select", lab.id, "--out", str(results), "--jobs", str(jobs)],
                       capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(cohort, ignore_errors=True)
    wrong = []
    for name in names:
        try:
            concept = json.loads((results / "results" / f"{name}.json").read_text())[
                "concepts"][0]
            status, message = concept["status"], (concept.get("message") or "")
        except (OSError, ValueError, KeyError, IndexError) as exc:
            status, message = "no result", str(exc)
        if (name == "reference") != (status == "pass"):
            wrong.append(f"{name}: {status}: {message.splitlines()[0] if message else ''}")
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labs", nargs="*", help="lab ids (default: every lab)")
    parser.add_argument("--out", type=Path, default=Path("grade-sweep"),
                        help="where each lab's gradebook goes")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    catalog = load_catalog()
    labs = [catalog.lab(i) for i in args.labs] if args.labs else list(catalog.labs)
    failed = False
    for lab in labs:
        started = time.monotonic()
        wrong = grade_lab(lab, args.out, args.jobs)
        failed |= bool(wrong)
        print(f"{lab.id}: {len(wrong)} scored the wrong way "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        for line in wrong:
            print(f"   {line[:200]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
