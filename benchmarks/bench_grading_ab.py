"""Grade one synthetic cohort with two checkouts of labrunner, side by side in one run, and
print the seconds each took (rounds interleaved A B A B, so the machine's load hits both).

Usage: python benchmarks/bench_grading_ab.py --old DIR --new DIR [--students 4]
       [--select ph2[,ph3.1,...]] [--jobs 2] [--rounds 2]
       [--project tests/fixtures/grading/project]
(DIR: a checkout, e.g. a `git worktree` of main and one of a branch; each grades with its
own src/ and its own labs. To time only the grading code, give both the same labs: a folder
whose src/ links to one checkout's and whose labs/ and c_examples/ are copies of the other's.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grading import make_cohort  # noqa: E402

from labrunner.catalog import as_lab, load_catalog  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--students", type=int, default=4)
    parser.add_argument("--select", default="ph2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--project", default=".",
                        help="the project to grade, inside each checkout (e.g. "
                             "tests/fixtures/grading/project: no services, quick)")
    args = parser.parse_args()
    os.environ["LABRUNNER_HOME"] = str(args.new.resolve() / args.project)
    selectors = args.select.split(",")
    labs = [lab for lab in (as_lab(i) for i in load_catalog().select(selectors)) if lab]
    work = Path(tempfile.mkdtemp(prefix="lr-bench-ab-"))
    cohort = work / "cohort"
    make_cohort(cohort, labs, args.students)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for round_ in range(args.rounds):
        for name, home in (("old", args.old), ("new", args.new)):
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
            env.update(PYTHONPATH=str(home.resolve() / "src"),
                       LABRUNNER_HOME=str(home.resolve() / args.project))
            out = work / f"out-{name}-{round_}"
            # Each checkout's own environment where it has one: a sandboxed learner host
            # or tests process imports labrunner from the interpreter's site-packages, not
            # from PYTHONPATH, so one shared venv would mix the two versions.
            own = home.resolve() / ".venv" / "bin" / "python"
            python = str(own) if own.exists() else sys.executable
            started = time.monotonic()
            done = subprocess.run(
                [python, "-m", "labrunner.cli", "grade", str(cohort),
                 *(f"--select={selector}" for selector in selectors),
                 "--out", str(out), "--jobs", str(args.jobs), "--force"],
                env=env, capture_output=True, text=True)
            took = time.monotonic() - started
            times[name].append(took)
            last = (done.stdout.strip().splitlines() or [""])[-1]
            last += f" | {_statuses(out)}"
            print(f"round {round_ + 1} {name}: {took:.1f} s (exit {done.returncode}) {last}",
                  flush=True)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"median: old {old:.1f} s, new {new:.1f} s: {100 * (new / old - 1):+.1f}% "
          f"({args.students} submissions x {len(labs)} labs, --jobs {args.jobs})")


def _statuses(out: Path) -> str:
    """How the labs graded, counted: a run whose labs broke is quick and proves nothing."""
    import collections
    import json

    counts: collections.Counter[str] = collections.Counter()
    for result in (out / "results").glob("*.json"):
        counts.update(c["status"] for c in json.loads(result.read_text())["concepts"])
    return " ".join(f"{status}={n}" for status, n in sorted(counts.items()))


if __name__ == "__main__":
    main()
