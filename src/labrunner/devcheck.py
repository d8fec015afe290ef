"""``labrunner dev check``: every selected lab's reference passes its verification, its
starter fails it, and each plausible wrong solution in ``wrong/`` fails it (rustlings'
``dev check`` for this course). ``tests/test_labs.py`` runs the same checks under pytest."""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import Lab
from .errors import LabrunnerError
from .runner import LabResult, Sandbox, run_lab


@dataclass(frozen=True)
class Expectation:
    lab: Lab
    variant: str          # "solution", "starter" or "wrong/<name>"
    source: Path
    must_pass: bool


@dataclass(frozen=True)
class CheckOutcome:
    expectation: Expectation
    result: LabResult

    @property
    def met(self) -> bool:
        passed = self.result.outcome == "passed"
        if self.expectation.must_pass:
            return passed
        # A failing variant must fail the verification itself, with a message.
        return self.result.outcome in ("failed", "timeout") and bool(self.result.first_line)

    @property
    def failed_by(self) -> str | None:
        """The name of the first test that failed it (with its parameters), if one did."""
        return next((t.name for t in self.result.tests
                     if t.outcome in ("failed", "timeout", "error")), None)


# Per lab, the test that failed each wrong solution the last time (``dev check
# --record-failed-by``): run first, it ends the check without the tests before it.
FAILED_BY = "failed_by.tsv"


def recorded_failed_by(lab: Lab) -> dict[str, str]:
    """``wrong/failed_by.tsv``: the test that failed each variant (``wrong/<name>``)."""
    try:
        text = (lab.path / "wrong" / FAILED_BY).read_text(encoding="utf-8")
    except OSError:
        return {}
    return {f"wrong/{name}": test for name, test in _failed_by_rows(text).items()}


def _failed_by_rows(text: str) -> dict[str, str]:
    """A wrong solution's name, a tab, a test's name, per line."""
    return dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)


def record_failed_by(outcomes: Sequence[CheckOutcome]) -> list[Path]:
    """Write each lab's ``wrong/failed_by.tsv`` from these outcomes, merged with what it held
    (the others' checks, maybe in another process at once: the file is locked while it is
    read and written); the files written."""
    written = []
    for lab in {o.expectation.lab.id: o.expectation.lab for o in outcomes}.values():
        found = {o.expectation.variant: o.failed_by for o in outcomes
                 if o.expectation.lab.id == lab.id and o.met and not o.expectation.must_pass
                 and o.failed_by}
        if not found:
            continue
        path = lab.path / "wrong" / FAILED_BY
        present = {e.variant for e in expectations([lab])}
        with open(path, "a+", encoding="utf-8") as table:
            fcntl.flock(table, fcntl.LOCK_EX)
            table.seek(0)
            rows = _failed_by_rows(table.read())
            rows.update({variant.removeprefix("wrong/"): test for variant, test in found.items()})
            table.seek(0)
            table.truncate()
            table.writelines(f"{name}\t{test}\n" for name, test in sorted(rows.items())
                             if f"wrong/{name}" in present)
        written.append(path)
    return written


def wrong_solutions(lab: Lab) -> list[Path]:
    """``wrong/<name>.diff`` (a patch against the reference: the mistake and nothing else)
    or ``wrong/<name>/`` (the learner's files as a wrong solution would have them)."""
    wrong = lab.path / "wrong"
    if not wrong.is_dir():
        return []
    return sorted(p for p in wrong.iterdir() if p.is_dir() or p.suffix == ".diff")


def expectations(labs: Sequence[Lab]) -> Iterator[Expectation]:
    for lab in labs:
        yield Expectation(lab, "solution", lab.solution_dir, True)
        yield Expectation(lab, "starter", lab.starter_dir, False)
        for variant in wrong_solutions(lab):
            yield Expectation(lab, f"wrong/{variant.name.removesuffix('.diff')}", variant, False)


class WrongSolutionError(LabrunnerError):
    pass


def complete_source(lab: Lab, folder: Path, scratch: Path | None = None
                    ) -> tuple[Path, Callable[[], None]]:
    """The folder to verify for a variant (made in ``scratch`` when it must be made), and
    how to clean it up. A ``.diff`` is applied to a copy of the reference; a folder may
    hold only the files it gets wrong, the others come from the reference."""
    if folder.suffix == ".diff":
        patched = Path(tempfile.mkdtemp(prefix=f"lrwrong-{lab.slug}-", dir=scratch))
        shutil.copytree(lab.solution_dir, patched, dirs_exist_ok=True)
        # Exactly (no fuzz): a hunk moved by fuzz can land where it makes another mistake,
        # or none, or a syntax error that then counts as a kill (154 diffs had drifted so).
        with open(folder, "rb") as diff:
            done = subprocess.run(["patch", "-p1", "-s", "-f", "-F0", "-d", str(patched)],
                                  stdin=diff, capture_output=True, text=True)
        problem = (f"does not apply exactly: {done.stdout}{done.stderr}" if done.returncode
                   else _syntax_error(patched, folder))
        if problem:
            shutil.rmtree(patched, ignore_errors=True)
            raise WrongSolutionError(
                f"{folder}: {problem} (rebase it on {lab.solution_dir} with "
                "scripts/rebase-wrongs.py, or remake it with scripts/wrong-to-diff.py)")
        return patched, lambda: shutil.rmtree(patched, ignore_errors=True)
    missing = [name for name in lab.learner_files if not (folder / name).exists()]
    if not missing:
        return folder, lambda: None
    merged = Path(tempfile.mkdtemp(prefix=f"lrwrong-{lab.slug}-", dir=scratch))
    shutil.copytree(lab.solution_dir, merged, dirs_exist_ok=True)
    shutil.copytree(folder, merged, dirs_exist_ok=True)
    return merged, lambda: shutil.rmtree(merged, ignore_errors=True)


def _syntax_error(patched: Path, diff: Path) -> str:
    """Why a Python file the diff changes does not compile, else "": a wrong solution that
    fails on its own syntax error is killed by nothing the verification checks."""
    for name in re.findall(r"^\+\+\+ b/(\S+\.py)\s*$", diff.read_text(errors="replace"), re.M):
        try:
            compile((patched / name).read_bytes(), name, "exec")
        except (OSError, SyntaxError, ValueError) as exc:
            return f"{name} does not compile once applied ({exc})"
    return ""


def check(expectation: Expectation, state_file: Path | None, run_id: str,
          learner_process: bool = False, scratch: Path | None = None) -> CheckOutcome:
    """Run one expectation; ``learner_process``: with the learner's code in a process of its
    own, as grading runs it (for the labs that support it). Its folders are made in
    ``scratch`` (the run's own folder, swept if the check is killed)."""
    source, cleanup = complete_source(expectation.lab, expectation.source, scratch)

    def verify(*pytest_args: str) -> LabResult:
        return run_lab(expectation.lab, source, state_file, run_id,
                       Sandbox(learner_process=learner_process, pytest_args=pytest_args,
                               workdir_root=scratch, forked=True))

    try:
        if expectation.must_pass:
            return CheckOutcome(expectation, verify())
        # A variant that must fail is judged by its first failure: the tests after it need
        # not run (pytest -x), and the test that failed it last time runs first.
        first = recorded_failed_by(expectation.lab).get(expectation.variant)
        if first is None:
            return CheckOutcome(expectation, verify("-x"))
        result = verify("-x", "-p", "labrunner.first_tests", "--lab-first", first)
        if result.outcome == "passed":   # that test no longer fails it: judged in order
            result = verify("-x")
        return CheckOutcome(expectation, result)
    finally:
        cleanup()


# --------------------------------------------------------------------------------------
# ``dev check --strength``: what each lab catches, one row per wrong solution


def strength_expectations(labs: Sequence[Lab]) -> Iterator[Expectation]:
    """Only the wrong solutions: a lab's strength is the mistakes it kills."""
    return (e for e in expectations(labs) if e.variant.startswith("wrong/"))


@dataclass(frozen=True)
class StrengthRow:
    lab: str
    wrong: str            # the wrong solution's name, without "wrong/"
    killed: bool          # the verification failed it with a message
    outcome: str          # the runner's outcome: failed, timeout, passed, error, ...
    first_line: str       # the first line of the message the learner would see

    def as_json(self) -> dict[str, object]:
        return {"lab": self.lab, "wrong": self.wrong, "killed": self.killed,
                "outcome": self.outcome, "first_line": self.first_line}


def strength_rows(outcomes: Sequence[CheckOutcome]) -> list[StrengthRow]:
    return [StrengthRow(o.expectation.lab.id, o.expectation.variant.removeprefix("wrong/"),
                        o.met, o.result.outcome, o.result.first_line or "")
            for o in outcomes if o.expectation.variant.startswith("wrong/")]


def strength_summary(rows: Sequence[StrengthRow]) -> dict[str, dict[str, int]]:
    """Per lab: how many wrong solutions it has and how many it kills."""
    summary: dict[str, dict[str, int]] = {}
    for row in rows:
        lab = summary.setdefault(row.lab, {"wrong": 0, "killed": 0})
        lab["wrong"] += 1
        lab["killed"] += int(row.killed)
    return summary


def checks_json(outcomes: Sequence[CheckOutcome]) -> dict[str, Any]:
    """``dev check --json`` (version 1): every check's lab, variant, expectation and result."""
    return {"version": 1, "checks": [
        {"lab": o.expectation.lab.id, "variant": o.expectation.variant,
         "must_pass": o.expectation.must_pass, "outcome": o.result.outcome,
         "met": o.met, "message": o.result.first_line, "failed_by": o.failed_by,
         "duration": round(o.result.duration, 1)} for o in outcomes]}
