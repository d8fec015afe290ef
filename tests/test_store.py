from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labrunner.store import Attempt, ProgressStore, StoreError, files_hash


def attempt(concept: str, outcome: str) -> Attempt:
    return Attempt(concept, time.time(), outcome, 1.0, "h")


def test_done_only_after_a_pass_and_regressed_after_a_later_failure(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path / "p.db")
    store.record(attempt("ph2.5", "failed"))
    assert store.status()["ph2.5"].state == "failing"
    store.record(attempt("ph2.5", "passed"))
    assert store.status()["ph2.5"].done
    store.record(attempt("ph2.5", "failed"))
    status = store.status()["ph2.5"]
    assert status.state == "regressed" and not status.done and status.attempts == 3
    store.record(attempt("ph2.6", "skipped"))
    assert store.status()["ph2.6"].state == "not verified"


def test_every_attempt_is_kept(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path / "p.db")
    for outcome in ("failed", "timeout", "error", "passed"):
        store.record(attempt("ph0.1", outcome))
    assert [a.outcome for a in store.attempts("ph0.1")] == ["failed", "timeout", "error",
                                                            "passed"]


WRITER = """
import sys, time
from pathlib import Path
from labrunner.store import Attempt, ProgressStore
store = ProgressStore(Path(sys.argv[1]))
for n in range(int(sys.argv[2])):
    store.record(Attempt(sys.argv[3], time.time(), "passed", 0.1, str(n)))
    print(n, flush=True)
"""


def test_two_runs_at_once_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), "200", cid],
                              stdout=subprocess.DEVNULL) for cid in ("a", "b")]
    assert [p.wait(60) for p in procs] == [0, 0]
    store = ProgressStore(db)
    assert len(store.attempts("a")) == 200 and len(store.attempts("b")) == 200


def test_a_kill_mid_write_keeps_the_store_readable(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "100000", "k"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(50):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ProgressStore(db)
    rows = store.attempts("k")
    assert len(rows) >= 50
    assert [int(a.files_hash) for a in rows] == list(range(len(rows)))  # no torn rows


def test_a_corrupt_store_is_reported_not_overwritten(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="unreadable"):
        ProgressStore(db)
    assert db.read_bytes().startswith(b"this is not sqlite")


def test_files_hash_tracks_content(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1")
    first = files_hash(tmp_path, ["a.py"])
    (tmp_path / "a.py").write_text("x = 2")
    assert files_hash(tmp_path, ["a.py"]) != first
    assert files_hash(tmp_path, ["missing.py"])
