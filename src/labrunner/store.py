"""The learner's progress: every attempt at every concept, in SQLite.

SQLite in WAL mode gives what a progress file must: two runs at once do not lose each
other's attempts (writers wait on the lock), and a kill mid-write leaves the last committed
state intact (a transaction is all or nothing). A concept is done only when an attempt
passed; one that passed and then failed is "regressed".
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import LabrunnerError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    concept_id  TEXT    NOT NULL,
    started_at  REAL    NOT NULL,
    outcome     TEXT    NOT NULL CHECK (outcome IN ('passed','failed','error','timeout','skipped')),
    duration    REAL    NOT NULL,
    files_hash  TEXT    NOT NULL,
    message     TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS attempts_by_concept ON attempts (concept_id, id);
"""


class StoreError(LabrunnerError):
    pass


@dataclass(frozen=True)
class Attempt:
    concept_id: str
    started_at: float
    outcome: str
    duration: float
    files_hash: str
    message: str = ""


@dataclass(frozen=True)
class ConceptStatus:
    concept_id: str
    state: str  # "done", "regressed", "failing", "not started"
    attempts: int
    last: Attempt | None

    @property
    def done(self) -> bool:
        return self.state == "done"


def files_hash(folder: Path, names: Iterable[str]) -> str:
    """A digest of the learner's files, to tell which version of their code an attempt ran."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        try:
            digest.update((folder / name).read_bytes())
        except OSError:
            digest.update(b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class ProgressStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._open(path)
                break
            except sqlite3.OperationalError as exc:
                # Two runs creating the store at once: switching to WAL needs a moment alone.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreError(f"{path}: {exc}; is another labrunner stuck?") from exc
                time.sleep(0.05)
            except sqlite3.DatabaseError as exc:
                raise StoreError(
                    f"{path}: the progress store is unreadable ({exc}). Move it aside and run "
                    "again to start a new one; your code is untouched.") from exc

    def _open(self, path: Path) -> None:
        # Results arrive from the runner's worker threads; a lock serialises our use.
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                            (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"{path}: written by a newer labrunner "
                             f"(schema {row[0]}); upgrade labrunner")

    def record(self, attempt: Attempt) -> None:
        with self.lock, self.db:  # one transaction: all or nothing even if we are killed here
            self.db.execute(
                "INSERT INTO attempts (concept_id, started_at, outcome, duration, files_hash,"
                " message) VALUES (?, ?, ?, ?, ?, ?)",
                (attempt.concept_id, attempt.started_at, attempt.outcome, attempt.duration,
                 attempt.files_hash, attempt.message[:2000]),
            )

    def attempts(self, concept_id: str | None = None) -> list[Attempt]:
        query = ("SELECT concept_id, started_at, outcome, duration, files_hash, message "
                 "FROM attempts")
        args: tuple[str, ...] = ()
        if concept_id:
            query += " WHERE concept_id = ?"
            args = (concept_id,)
        return [Attempt(*row) for row in self.db.execute(query + " ORDER BY id", args)]

    def revision(self) -> str:
        """Changes whenever an attempt is recorded: what a live page compares to reload."""
        row = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM attempts").fetchone()
        return str(row[0])

    def status(self) -> dict[str, ConceptStatus]:
        """Each attempted concept's state, from its whole history."""
        history: dict[str, list[Attempt]] = {}
        for attempt in self.attempts():
            history.setdefault(attempt.concept_id, []).append(attempt)
        out: dict[str, ConceptStatus] = {}
        for concept_id, attempts in history.items():
            last = attempts[-1]
            ever_passed = any(a.outcome == "passed" for a in attempts)
            if last.outcome == "passed":
                state = "done"
            elif last.outcome == "skipped":
                state = "done" if ever_passed else "not verified"
            elif ever_passed:
                state = "regressed"
            else:
                state = "failing"
            out[concept_id] = ConceptStatus(concept_id, state, len(attempts), last)
        return out

    def close(self) -> None:
        # Never while another thread's query runs (readers hold the lock): sqlite would free
        # what that query is using, and the process dies with SIGSEGV (the dashboard's
        # /events did so once as it stopped).
        with self.lock:
            self.db.close()


def now() -> float:
    return time.time()
