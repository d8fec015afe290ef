"""Grade a synthetic cohort with --jobs 1 and with --jobs 2, in one run, and print
submissions per minute for each.

The cohort: N submissions of Phase 2 (default 20), mixed: correct, wrong answers, missing
files, import errors. Each is graded from scratch (--force) into its own output folder, by
the real command (`labrunner grade`), so the numbers include unpacking, the sandbox set-up
and the services.

Usage: python benchmarks/bench_grading.py [--students 20] [--select ph2] [--home DIR]
(--home: the labrunner project whose labs to grade, default this checkout; the test
fixture project tests/fixtures/grading/project grades fast and needs no services).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labrunner.catalog import as_lab, load_catalog

REPO = Path(__file__).resolve().parents[1]


def make_cohort(root: Path, labs: list, count: int) -> None:  # type: ignore[type-arg]
    for n in range(count):
        ws = root / f"student{n:03d}"
        (ws).mkdir(parents=True)
        (ws / "labrunner.toml").write_text('labrunner_version = "0.1.0"\n')
        kind = n % 4  # 0 correct, 1 starter (fails), 2 missing files, 3 import error
        for lab in labs:
            folder = ws / lab.workspace_dir
            folder.mkdir(parents=True, exist_ok=True)
            if kind == 2:
                continue
            source = lab.solution_dir if kind == 0 else lab.starter_dir
            for name in lab.learner_files:
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if kind == 3:
                    target.write_text("import not_a_module_anywhere\n")
                elif (source / name).is_file():
                    shutil.copyfile(source / name, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=20)
    parser.add_argument("--select", default="ph2")
    parser.add_argument("--home", type=Path, default=REPO)
    args = parser.parse_args()
    os.environ["LABRUNNER_HOME"] = str(args.home.resolve())
    catalog = load_catalog()
    labs = [lab for lab in (as_lab(i) for i in catalog.select([args.select])) if lab]
    work = Path(tempfile.mkdtemp(prefix="lr-bench-grading-"))
    try:
        make_cohort(work / "cohort", labs, args.students)
        print(f"{args.students} submissions x {len(labs)} labs of {args.select} "
              f"({', '.join(lab.id for lab in labs)}), on {os.cpu_count()} CPUs")
        seconds: dict[int, float] = {}
        for jobs in (1, 2):
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "labrunner.cli", "grade", str(work / "cohort"),
                 "--select", args.select, "--out", str(work / f"out-j{jobs}"), "--force",
                 "--jobs", str(jobs)],
                capture_output=True, text=True)
            elapsed = time.monotonic() - started
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-2000:])
                raise SystemExit(f"grading with --jobs {jobs} failed ({done.returncode})")
            seconds[jobs] = elapsed
            print(f"--jobs {jobs}: {elapsed:6.1f} s, "
                  f"{args.students / elapsed * 60:6.1f} submissions/minute")
        print(f"--jobs 2 grades {seconds[1] / seconds[2]:.2f}x as fast as --jobs 1")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
