"""What a failing test reports to the runner: its message (pytest's prefixes taken off), the
frames of the learner's code it passed through, the learner's own captured output (capped),
and the message the test's own code wrote (the only text feedback shows of a hidden test)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from .channel import MAX_AUTHORED, MAX_OUTPUT


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


# By name, not by import: the runner reads failures and must not load RPyC to do so
# (tests/test_learner_process.py checks the name).
_PROCESS_ENDED = "labrunner.learner.proxy.LearnerProcessEnded: "


def failure_message(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        message = str(crash.message)
        # pytest prefixes "AssertionError: " / "Failed: " (and the class of the proxy's own
        # LearnerProcessEnded) - keep the learner-facing part.
        for prefix in ("Failed: ", "AssertionError: ", _PROCESS_ENDED):
            if message.startswith(prefix):
                message = message[len(prefix):]
        return message
    if isinstance(longrepr, tuple):
        return str(longrepr[2])
    return str(longrepr)




def learner_frames(item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]) -> list[str]:
    """Where in the learner's files an exception passed, innermost last: ``file:line in f``
    with the line's source, so a crash in their code points at their code."""
    learner = getattr(item, "funcargs", {}).get("learner")
    folder = getattr(learner, "dir", None)
    if folder is None:
        return []
    frames = []
    for entry in excinfo.traceback:
        path = Path(str(entry.path))
        if not path.is_relative_to(folder):
            continue
        try:
            source = str(entry.statement).strip()
        except Exception:  # noqa: BLE001 - the source may be gone; the location is enough
            source = ""
        where = f"{path.relative_to(folder)}:{entry.lineno + 1} in {entry.name}"
        frames.append(f"{where}\n    {source}" if source else where)
    return frames


def captured_output(report: pytest.TestReport) -> str:
    text = "".join(f"--- {name} ---\n{content}" for name, content in report.sections
                   if name.startswith("Captured") and content.strip())
    if len(text) > MAX_OUTPUT:
        dropped = len(text) - MAX_OUTPUT
        text = f"{text[:MAX_OUTPUT]}\n... ({dropped} more characters)"
    return text


_PYTEST_DIRS = tuple(str(Path(str(m.__file__)).parent) + os.sep
                     for m in (pytest, sys.modules["_pytest"], sys.modules["pluggy"]))


def authored_message(item: pytest.Item, call: pytest.CallInfo[None]) -> str:
    """The failure's message when the test's own code wrote it (an ``assert ..., "msg"``,
    a ``raise AssertionError("msg")`` or a ``pytest.fail("msg")`` in the test file), else
    "". What the learner's code raises (any class, any text) is never authored: its
    innermost frame is in the RPC's code, not in the test file. Feedback shows a hidden
    test's failure by this alone."""
    excinfo = call.excinfo
    if excinfo is None:
        return ""
    exc = excinfo.value
    if type(exc) is not AssertionError and not isinstance(exc, pytest.fail.Exception):
        return ""
    frames = []
    tb: Any = excinfo.tb
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    while frames and frames[-1].startswith(_PYTEST_DIRS):
        frames.pop()
    if not frames or os.path.realpath(frames[-1]) != os.path.realpath(str(item.path)):
        return ""
    text = str(exc.msg if isinstance(exc, pytest.fail.Exception) else exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    # A bare assert's text is its expression (expected values): not a message.
    return "" if first.startswith("assert ") else first[:MAX_AUTHORED]
