"""A lab's result: what each test reported on the signed channel, scored (a test that never
reported failed, a process cut short counts for nothing), and text from the tests process
cleaned before anyone shows it."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from .catalog import Lab
from .channel import COLLECTED, FINISHED, MAX_AUTHORED, MAX_OUTPUT
from .outcome import OUTCOMES


@dataclass
class TestResult:
    nodeid: str
    outcome: str
    message: str = ""
    duration: float = 0.0
    output: str = ""      # what the learner's code printed during a failing test (capped)
    authored: str = ""    # the message the test's own code wrote, if it failed on one

    @property
    def name(self) -> str:
        return self.nodeid.split("::", 1)[-1]


@dataclass
class LabResult:
    lab: Lab
    outcome: str  # passed, failed, error (could not run), timeout, skipped (not verifiable)
    duration: float
    message: str = ""
    tests: list[TestResult] = field(default_factory=list)
    output: str = ""
    files_hash: str = ""
    started_at: float = 0.0

    @property
    def first_line(self) -> str:
        for line in self.message.splitlines():
            if line.strip():
                return line.strip()
        return ""


# pytest's own exit codes: tests failed or not, the session ran to its end.
PYTEST_EXITS = (0, 1, 2, 5)


@dataclass
class Ended:
    """How a tests process ended, as the runner saw it."""

    returncode: int | None
    timed_out: bool
    budget: float
    output: str
    started: float
    on_its_own: bool = True   # not killed by the runner (timeout, lingering after finishing)
    waited_for_cpu: float = 0.0   # seconds added to the budget: the run kept off the CPU

    def timed_out_after(self) -> str:
        """``timed out after N s``, and the time added for a loaded machine if any."""
        text = f"timed out after {self.budget:.0f} s"
        if self.waited_for_cpu >= 1:
            text += (f" (and {self.waited_for_cpu:.0f} s more, the time the machine kept it "
                     "waiting for a CPU)")
        return text


def score(lab: Lab, records: list[dict[str, Any]], ended: Ended) -> LabResult:
    """The lab's result from the signed records: a test that never reported failed (or timed
    out), and a process that did not finish its session scores nothing it reported."""
    duration = time.time() - ended.started
    finished = any(r.get("kind") == FINISHED for r in records)
    if ended.on_its_own and not (finished and ended.returncode in PYTEST_EXITS):
        cut_short = _cut_short(lab, records, ended, finished, duration)
        if cut_short is not None:
            return cut_short
        records = [r for r in records if r.get("kind") == COLLECTED]
    collected, outcomes = _reported(records)
    if not collected:
        reason = _collection_problem(ended.output) or (
            f"{ended.timed_out_after()} before any test ran" if ended.timed_out
            else f"the verification could not start (pytest exit {ended.returncode})")
        return LabResult(lab, "timeout" if ended.timed_out else "error", duration, reason,
                         output=ended.output, started_at=ended.started)
    tests = [_in_learner_terms(outcomes.get(nodeid) or _unreported(nodeid, outcomes, ended))
             for nodeid in collected]
    return _overall(lab, tests, duration, ended)


def _cut_short(lab: Lab, records: list[dict[str, Any]], ended: Ended, finished: bool,
               duration: float) -> LabResult | None:
    """A tests process that was killed (by a signal: the learner's program could send one),
    exited early or lost its channel: what it reported counts for nothing, since a pass
    written by anyone but a session that ran to its end is not ours."""
    code = ended.returncode
    how = (f"was killed by signal {-code}" if code is not None and code < 0 else
           f"exited with code {code}" if not finished else f"ended with code {code}")
    listed = next((r for r in records if r.get("kind") == COLLECTED), None)
    if listed is None:
        return None
    return LabResult(
        lab, "error" if code is not None and code < 0 else "failed", duration,
        f"the test process {how} before its session finished: every test of this "
        "lab counts as failed (the code exited, crashed or killed it)",
        [TestResult(str(n), "failed", f"the test process {how} before its session finished")
         for n in listed.get("nodeids", [])], ended.output, started_at=ended.started)


def _reported(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, TestResult]]:
    """The ids collected, and each test's reported result (its texts cleaned)."""
    collected: list[str] = []
    outcomes: dict[str, TestResult] = {}
    for record in records:
        if record.get("kind") == COLLECTED:
            collected = [str(n) for n in record.get("nodeids", [])]
        elif "nodeid" in record and record.get("outcome") in OUTCOMES:
            outcomes[record["nodeid"]] = TestResult(
                record["nodeid"], record["outcome"], clean_text(record.get("message", "")),
                float(record.get("duration", 0.0)),
                output=clean_text(record.get("output", ""), MAX_OUTPUT),
                authored=clean_text(record.get("authored", ""), MAX_AUTHORED))
    return collected, outcomes


def _unreported(nodeid: str, outcomes: dict[str, TestResult], ended: Ended) -> TestResult:
    first_timeout = next((t for t in outcomes.values()
                          if t.message.startswith("Timeout (>")), None)
    if first_timeout is not None and not ended.timed_out:
        return TestResult(nodeid, "timeout", f"not run: {first_timeout.name} timed out first")
    if ended.timed_out:
        return TestResult(nodeid, "timeout", ended.timed_out_after())
    return TestResult(nodeid, "failed",
                      "the test process ended before this test reported "
                      f"(exit code {ended.returncode}): the code exited, crashed or was killed")


def _in_learner_terms(test: TestResult) -> TestResult:
    """pytest-timeout's wording, in the learner's terms."""
    if test.outcome == "failed" and test.message.startswith("Timeout (>"):
        limit = test.message.split(">", 1)[1].split("s)", 1)[0]
        where = ""
        if " (at " in test.message.splitlines()[0]:
            where = " (at " + test.message.splitlines()[0].split(" (at ", 1)[1]
        test.outcome = "timeout"
        test.message = (f"timed out after {limit} s{where}: an infinite loop, or a call "
                        "that blocks forever (a lock, a socket read, a consumer poll)?"
                        + "".join("\n" + ln for ln in test.message.splitlines()[1:]
                                  if not ln.startswith("Timeout")))
    return test


def _overall(lab: Lab, tests: list[TestResult], duration: float, ended: Ended) -> LabResult:
    output, started = ended.output, ended.started
    first_bad = next((t for t in tests if t.outcome not in ("passed", "skipped")), None)
    if first_bad is None:
        skipped = [t for t in tests if t.outcome == "skipped"]
        if skipped:
            return LabResult(lab, "skipped", duration, skipped[0].message, tests, output,
                             started_at=started)
        return LabResult(lab, "passed", duration, "", tests, output, started_at=started)
    outcome = "timeout" if any(t.outcome == "timeout" for t in tests) else "failed"
    if all(t.outcome == "error" for t in tests if t.outcome != "passed"):
        outcome = "error" if not any(t.outcome == "passed" for t in tests) else "failed"
    message = first_bad.message or first_bad.outcome
    return LabResult(lab, outcome, duration, message, tests, output, started_at=started)


MAX_MESSAGE = 4000
# Escape sequences (CSI, OSC, other ESC forms) and control characters but tab and newline.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|"
                      r"\x1b[@-_]?|[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e"
                      r"\u2066-\u2069]")


def clean_text(value: Any, cap: int = MAX_MESSAGE) -> str:
    """Text from the test process (so possibly the learner's) as it may be shown: no
    terminal escape sequences or control characters (a ``cat`` of the feedback must not
    clear the screen or fake a line), no bidirectional overrides, at most ``cap``
    characters."""
    text = str(value)[: cap * 4]
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    if len(text) > cap:
        text = text[:cap] + " [...]"
    return text


def _collection_problem(output: str) -> str:
    """The first useful line of a collection error (the verification itself is broken)."""
    for line in output.splitlines():
        if line.startswith(("E   ", "ERROR ")) and "error" in line.lower():
            return line.removeprefix("E   ").strip()
    return ""
