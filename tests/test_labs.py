"""rustlings' `dev check` for this course: every reference solution passes its verification,
every starter fails it, and every plausible wrong solution kept in `wrong/` fails it, all
through the real runner against real services (the same checks as `labrunner dev check`)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest

from labrunner.catalog import Lab, load_catalog
from labrunner.devcheck import Expectation, check, expectations, record_failed_by
from labrunner.services.manager import ServiceSet

LABS = load_catalog().labs
CHECKS = list(expectations(LABS))
REPO = Path(__file__).resolve().parents[1]


def _explain(outcome: object) -> str:
    result = outcome.result  # type: ignore[attr-defined]
    lines = [f"{t.outcome}: {t.name}: {t.message.splitlines()[0] if t.message else ''}"
             for t in result.tests]
    if not lines:
        return result.message + result.output[-3000:]
    if any(t.outcome == "timeout" for t in result.tests):
        # Where the test hung (pytest-timeout's stacks of every thread): the only trace a
        # CI log keeps of a hang that a rerun may not show again.
        lines.append(f"the verification's output, last part:\n{result.output[-6000:]}")
    return "\n".join(lines)


@pytest.mark.parametrize("expectation", CHECKS,
                         ids=[f"{e.lab.id}-{e.variant}" for e in CHECKS])
def test_lab_expectation(expectation: Expectation, local_services: ServiceSet) -> None:
    _meets(expectation, local_services, learner_process=False)


def _meets(expectation: Expectation, local_services: ServiceSet,
           learner_process: bool) -> None:
    state = None
    if expectation.lab.services:
        local_services.ensure(expectation.lab.services)
        state = local_services.state_file
    outcome = check(expectation, state, "labcheck", learner_process, local_services.workdir)
    wanted = "pass" if expectation.must_pass else "fail with a message"
    how = " (learner code in its own process)" if learner_process else ""
    assert outcome.met, (f"{expectation.lab.id} {expectation.variant}{how} should {wanted}, "
                         f"got {outcome.result.outcome}:\n{_explain(outcome)}")
    if os.environ.get("LABRUNNER_RECORD_FAILED_BY") == "1":
        record_failed_by([outcome])   # refreshing each lab's wrong/failed_by.tsv
    if "(most recent call first)" in outcome.result.output:
        # Met, but its tests process hung past its budget or lingered once finished, and
        # was killed with every thread's stack dumped: a slow check, and the CI log's only
        # trace of where it waited.
        warnings.warn(f"{expectation.lab.id} {expectation.variant}{how}: met, but its tests "
                      f"process had to be killed after {outcome.result.duration:.0f} s; "
                      f"its stacks:\n{outcome.result.output[-6000:]}", stacklevel=1)


# Grading runs the learner's Python code in a process of its own: every lab that supports it
# must give the same verdicts that way (a reference passes, a starter fails).
APART = [e for e in CHECKS if e.variant in ("solution", "starter")
         and e.lab.learner_code_in_own_process]


@pytest.mark.parametrize("expectation", APART,
                         ids=[f"{e.lab.id}-{e.variant}-apart" for e in APART])
def test_lab_expectation_with_learner_code_apart(expectation: Expectation,
                                                 local_services: ServiceSet) -> None:
    _meets(expectation, local_services, learner_process=True)


def test_every_c_reference_builds_warning_free(tmp_path: Path) -> None:
    done = subprocess.run(["make", "-C", str(REPO / "c_examples"), f"OUT={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in (done.stdout + done.stderr).lower()


def test_labs_exist() -> None:
    assert LABS, "no labs found"
    assert all(isinstance(lab, Lab) for lab in LABS)


def _programs_started_as_the_tests(source: str) -> list[str]:
    """Calls in a lab's tests that start a program with subprocess themselves, other than
    the test's own tools named by a literal first argument (["cc", ...], ["make", ...])."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id == "subprocess"
                and func.attr in ("Popen", "run", "call", "check_call", "check_output")):
            continue
        argv = node.args[0] if node.args else None
        own_tool = isinstance(argv, ast.List) and bool(argv.elts) and \
            isinstance(argv.elts[0], ast.Constant) and isinstance(argv.elts[0].value, str) \
            and not argv.elts[0].value.startswith(("/", "."))
        if not own_tool:
            shown = ast.unparse(argv) if argv else ""
            found.append(f"line {node.lineno}: subprocess.{func.attr}({shown})")
    return found


@pytest.mark.parametrize("lab", [lab for lab in LABS if lab.language == "c"],
                         ids=lambda lab: lab.id)
def test_c_labs_start_the_learners_programs_through_learner(lab: Lab) -> None:
    """A C lab's binary is the learner's code: under grading it must run as the learner's
    uid (learner.popen / learner.run), never as the verification's, which subprocess would
    do (see docs/GRADING.md)."""
    offending = [f"{file.name} {call}" for file in sorted(lab.path.glob("test_*.py"))
                 for call in _programs_started_as_the_tests(file.read_text())]
    assert not offending, (
        f"{lab.id} starts programs with subprocess itself: {offending}; start the learner's "
        "binary with learner.popen or learner.run")


OUTSIDE_THE_LAB = re.compile(r"__file__\)[^\n]*(\.parents\[\d+\]|\.parent\.parent)")


@pytest.mark.parametrize("lab", LABS, ids=lambda lab: lab.id)
def test_lab_tests_reach_nothing_outside_their_own_folder(lab: Lab) -> None:
    """Grading runs a lab's tests from a private copy of that lab's folder alone (no
    solution, no starter, no other lab): a path from the tests into a neighbouring folder
    leads nowhere there, and every submission fails (ph6.7 read ph0.7's reference so, and
    its own reference scored 0 in grading). Reach another lab through the catalog."""
    offending = [f"{file.name}:{n}" for file in sorted(lab.path.rglob("*.py"))
                 for n, line in enumerate(file.read_text().splitlines(), 1)
                 if OUTSIDE_THE_LAB.search(line)]
    assert not offending, (
        f"{lab.id}: {offending} reach outside the lab's folder from __file__; use "
        "labrunner.catalog.load_catalog().lab(ID) for another lab's files")
