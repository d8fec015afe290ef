"""The runner <-> plugin wire: what the runner tells a verification through its environment,
and the signed records the verification sends back.

The runner starts one pytest process per lab with the ``labrunner`` plugin. It opens two
pipes: the plugin reads a fresh key from one (``$LABRUNNER_KEY_FD``) and writes one JSON line
a record to the other (``$LABRUNNER_REPORT_FD``), each signed with that key (HMAC-SHA256), so
the runner scores only what the plugin sent, never what the learner's code wrote. Both ends
live here, with the names of the environment variables and of the record kinds.

Records, in order: ``{"kind": "collected", "nodeids": [...]}`` before any learner code runs;
one per test (``{"nodeid", "outcome", "message", "duration", ...}``); ``{"kind":
"finished"}`` once every fixture is torn down.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from .learner.modes import ENV_LEARNER_HOST, ENV_SHARED_DIR

# What the runner sets for the plugin.
ENV_SERVICES = "LABRUNNER_SERVICES"     # the run's services state file
# The learner's folder reaches the plugin one way from the runner (--lab-src, the exact
# folder) and one way by hand (--lab-target: solution, starter or a workspace); no
# environment variable says it.
ENV_REPORT_FD = "LABRUNNER_REPORT_FD"   # the records' pipe (write end)
ENV_KEY_FD = "LABRUNNER_KEY_FD"         # the key's pipe (read end)
ENV_RUN_ID = "LABRUNNER_RUN_ID"         # names the run's per-test namespaces
# Grading: the learner's uid's home, for the learner's scripts (HOME, TMPDIR).
ENV_LEARNER_HOME = "LABRUNNER_LEARNER_HOME"

# What the plugin sends of a failing test, at most (the runner caps again what it reads).
MAX_AUTHORED = 500    # the message the test's own code wrote
MAX_OUTPUT = 8_000    # the learner's printed output

COLLECTED = "collected"
FINISHED = "finished"

__all__ = [
    "COLLECTED", "ENV_KEY_FD", "ENV_LEARNER_HOME", "ENV_LEARNER_HOST", "ENV_REPORT_FD",
    "ENV_RUN_ID", "ENV_SERVICES", "ENV_SHARED_DIR", "FINISHED",
    "MAX_AUTHORED", "MAX_OUTPUT", "Reporter", "read_signed", "sign", "verified",
]


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(key: bytes, record: dict[str, Any]) -> str:
    """One record as the line the plugin writes (newline included)."""
    body = json.dumps(record, sort_keys=True)
    return json.dumps({"body": body, "mac": _mac(key, body)}) + "\n"


def verified(key: bytes, line: str) -> dict[str, Any] | None:
    """The record a line carries when its signature holds, else None (unsigned, garbled)."""
    try:
        envelope = json.loads(line)
        body = envelope["body"]
        if hmac.compare_digest(_mac(key, body), str(envelope["mac"])):
            record = json.loads(body)
            return record if isinstance(record, dict) else None
    except (ValueError, KeyError, TypeError):
        pass
    return None


def read_signed(fd: int, key: bytes, sink: list[dict[str, Any]]) -> None:
    """The runner's end: every signed record on pipe ``fd`` into ``sink``, until it closes."""
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as stream:
        for line in stream:
            record = verified(key, line)
            if record is not None:
                sink.append(record)


class Reporter:
    """The plugin's end: takes the pipes from the environment (and removes their numbers
    from it), then signs and sends records. Without a runner (pytest run by hand) it sends
    nothing."""

    def __init__(self) -> None:
        self.stream: Any = None
        self.key = b""
        fd = os.environ.pop(ENV_REPORT_FD, None)
        key_fd = os.environ.pop(ENV_KEY_FD, None)
        if fd is None or key_fd is None:
            return
        with os.fdopen(int(key_fd), "rb") as key_pipe:
            self.key = key_pipe.read()
        # Move the report pipe to a fresh descriptor so a learner guessing the number the
        # runner used finds nothing there.
        target = os.dup(int(fd))
        os.close(int(fd))
        os.set_inheritable(target, False)
        self.stream = os.fdopen(target, "w", buffering=1, encoding="utf-8")

    def send(self, record: dict[str, Any]) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(sign(self.key, record))
        except (OSError, ValueError):
            self.stream = None
