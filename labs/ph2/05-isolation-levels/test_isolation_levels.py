"""ph2.5 isolation levels, on two (or three) real connections driven step by step.

read_twice(): the learner's transaction reads, then calls between() - where the check,
on its own connection, commits an update, inserts a row, or leaves an update
uncommitted - then reads again. Inside between() the check also looks at the learner's
connection: it must be inside a transaction, at the requested level. Then the two reads
must differ (READ COMMITTED) or not (REPEATABLE READ, SERIALIZABLE, and READ UNCOMMITTED
which in Postgres never reads dirty data).

go_off_call(): alice and bob, the only two doctors on call, go off call at the same time.
The schedule is fixed through the after_check hook: both read the roster first; then
alice writes and commits; then bob writes. Under SERIALIZABLE bob's transaction fails
with 40001 and must be retried, see one doctor on call, and refuse. Anything else is
reported: nobody on call (write skew), an escaped 40001 (no retry), a refusal decided on
the stale count (a loop that never retried), the wrong isolation level.

The error paths are taken too, with triggers the check installs (deterministic, no race):
every attempt failing with 40001 (the loop must make exactly max_attempts attempts, then
let the 40001 out), a 40001 raised at COMMIT by a deferred constraint trigger (the COMMIT
must be inside the retry), a 40001 raised at the read of the roster (so must the read),
and an error that is not 40001 (never retried).
After each error path (and go_off_call's refusal), the caller's connection must be idle:
no failed or open transaction left behind, and its session's isolation settings as they
were.

Mistakes a learner makes here, each caught with its own message:
- both reads in separate transactions (autocommit)              -> status between reads
- SET TRANSACTION before BEGIN / the wrong level                  -> level seen in between()
- SET SESSION CHARACTERISTICS / default_transaction_isolation    -> the session default
  changed (or "restored" to the server default, not to what it was) after read_twice
- conn.isolation_level changed and left so                       -> attribute compared
- no retry, a retry loop inside the aborted transaction          -> bob's 40001 escapes
- a failed attempt decides "refused"                             -> bob refused on count 2
- max_attempts + 1 attempts, or never giving up                  -> attempts counted
- giving up with a return value instead of the 40001             -> exhausted retries
- COMMIT outside the retry (40001 at COMMIT escapes or is lost)  -> deferred trigger
- only the write and COMMIT retried (40001 at the read escapes,
  or taken for a refusal)                                        -> a view's filter raises
- a refusal rolled back ("nothing to commit") instead of
  committed: what it read is never validated                    -> a 40001 at its COMMIT
- retrying every error (psycopg.Error, Exception)                -> a CheckViolation
- a transaction left open on an error or early-return path (BEGIN
  by hand, ROLLBACK only for 40001 or none at all)               -> connection status after
- a session setting (conn.isolation_level, SET SESSION) put back
  only when the function returns, left behind by an error        -> the same error paths
- the doctor's name formatted into the UPDATE's text (quoted by
  hand or by repr())                                             -> d'Artagnan, x' OR 'a' = 'a
- the attempts counted outside the call (a module-level variable,
  a function attribute) and reset only on success                -> a call after one that
                                                                    gave up, or refused
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from labrunner.testing import wait_until

Conn = psycopg.Connection[Any]


def isolation_of(conn: Conn) -> str:
    row = conn.execute("SHOW transaction_isolation").fetchone()
    assert row is not None
    return str(row[0])


# --------------------------------------------------------------------------------------
# Part 1: what a transaction sees of concurrent changes

BALANCE = "SELECT balance FROM accounts WHERE id = 1"
RICH = "SELECT count(*) FROM accounts WHERE balance >= 100"


@dataclass(frozen=True)
class ReadCase:
    id: str
    isolation: str
    query: str
    change: str  # what the other connection does in between: update, insert, uncommitted
    first: list[tuple[int]]
    second: list[tuple[int]]
    why: str


READ_CASES = [
    ReadCase("non-repeatable-read-under-read-committed", "READ COMMITTED", BALANCE, "update",
             [(100,)], [(150,)],
             "READ COMMITTED takes a new snapshot for every statement, so the second read "
             "sees the update committed in between (a non-repeatable read)"),
    ReadCase("no-non-repeatable-read-under-repeatable-read", "REPEATABLE READ", BALANCE,
             "update", [(100,)], [(100,)],
             "REPEATABLE READ reads the snapshot taken by its first query until the end"),
    ReadCase("phantom-under-read-committed", "READ COMMITTED", RICH, "insert",
             [(2,)], [(3,)],
             "READ COMMITTED sees the row inserted and committed in between (a phantom)"),
    ReadCase("no-phantom-under-repeatable-read", "REPEATABLE READ", RICH, "insert",
             [(2,)], [(2,)],
             "Postgres' REPEATABLE READ snapshot hides rows committed later, phantoms "
             "included (stricter than the SQL standard asks)"),
    ReadCase("no-dirty-read-under-read-uncommitted", "READ UNCOMMITTED", BALANCE,
             "uncommitted", [(100,)], [(100,)],
             "Postgres never shows uncommitted data: READ UNCOMMITTED behaves as READ "
             "COMMITTED"),
    ReadCase("no-non-repeatable-read-under-serializable", "SERIALIZABLE", BALANCE, "update",
             [(100,)], [(100,)],
             "SERIALIZABLE reads one snapshot too (and also checks for conflicts on write)"),
]

CHANGES = {
    "update": "UPDATE accounts SET balance = 150 WHERE id = 1",
    "insert": "INSERT INTO accounts (id, balance) VALUES (3, 500)",
    "uncommitted": "UPDATE accounts SET balance = 999 WHERE id = 1",
}


@pytest.fixture
def connect(postgres: Any) -> Callable[[], Conn]:
    def make() -> Conn:
        conn: Conn = postgres.connect(autocommit=True)
        return conn
    return make


@pytest.mark.parametrize("case", READ_CASES, ids=[c.id for c in READ_CASES])
def test_read_twice(case: ReadCase, connect: Callable[[], Conn], learner: Any) -> None:
    read_twice = learner.function("isolation", "read_twice")
    with connect() as setup:
        setup.execute("CREATE TABLE accounts (id integer PRIMARY KEY, balance integer)")
        setup.execute("INSERT INTO accounts VALUES (1, 100), (2, 200)")
    seen: dict[str, Any] = {}
    # The learner's session starts with a default level that is neither the server's nor
    # the one asked for: a SET SESSION that is left behind, or "restored" with RESET (to
    # the server's default), shows after the call.
    session_default = ("repeatable read" if case.isolation in ("READ COMMITTED",
                                                               "READ UNCOMMITTED")
                       else "read committed")
    with connect() as conn, connect() as other:
        conn.execute(f"SET default_transaction_isolation = '{session_default}'")
        attribute_before = conn.isolation_level

        def between() -> None:
            # Look at the learner's session first: are we between two reads of ONE
            # transaction, and at which level?
            seen["status"] = conn.info.transaction_status
            seen["level"] = isolation_of(conn)
            if case.change == "uncommitted":
                other.execute("BEGIN")  # left open: the update is never committed
            other.execute(CHANGES[case.change])

        first, second = read_twice(conn, case.query, case.isolation, between)
        seen["autocommit_after"] = conn.autocommit
        if case.change == "uncommitted":
            other.execute("ROLLBACK")
        after = conn.execute("SHOW default_transaction_isolation").fetchone()
        seen["default_after"] = after[0] if after else None
        seen["status_after"] = conn.info.transaction_status
        attribute_after = conn.isolation_level

    assert seen, "read_twice never called between(): call it between the two reads"
    assert seen["status"] == TransactionStatus.INTRANS, (
        f"between the two reads your connection was not inside a transaction (status "
        f"{seen['status'].name}): each read ran in a transaction of its own, so no "
        f"isolation level can apply to both - wrap them in one: with conn.transaction()")
    assert seen["level"] == case.isolation.lower(), (
        f"asked for {case.isolation}, your transaction ran at {seen['level']}: SET "
        f"TRANSACTION ISOLATION LEVEL must be the first statement inside the transaction "
        f"(outside one it is ignored with a warning)")
    assert seen["autocommit_after"], (
        "read_twice turned the caller's connection's autocommit off and left it so: every "
        "later statement of the caller now opens a transaction that nothing commits (its "
        "writes are lost when the connection closes, its locks and snapshot held "
        "meanwhile) - open your own transaction with 'with conn.transaction():' instead, "
        "or put conn.autocommit back in a finally")
    assert seen["status_after"] == TransactionStatus.IDLE, (
        f"read_twice returned with its transaction still open (status "
        f"{seen['status_after'].name}): end it (leave the with conn.transaction() block, or "
        f"COMMIT/ROLLBACK) before returning")
    assert seen["default_after"] == session_default, (
        f"read_twice changed the session's default isolation level: it was "
        f"{session_default!r} before the call, {seen['default_after']!r} after - SET SESSION "
        f"CHARACTERISTICS / SET default_transaction_isolation (and RESET, which goes back "
        f"to the server's default, not to what the session had) changes every later "
        f"transaction on this connection; set the level of this one transaction only, "
        f"with SET TRANSACTION ISOLATION LEVEL as its first statement")
    assert attribute_after == attribute_before, (
        f"read_twice left conn.isolation_level = {attribute_after!r} (it was "
        f"{attribute_before!r}): every later transaction on the caller's connection now "
        f"runs at that level - set the level of this one transaction (SET TRANSACTION "
        f"ISOLATION LEVEL inside it), or put the attribute back")
    got = ([tuple(r) for r in first], [tuple(r) for r in second])
    assert got == (case.first, case.second), (
        f"{case.isolation}, {case.query!r} with {CHANGES[case.change]!r} "
        f"{'left uncommitted' if case.change == 'uncommitted' else 'committed'} in between: "
        f"read {got[0]} then {got[1]}, expected {case.first} then {case.second} - {case.why}")


# --------------------------------------------------------------------------------------
# Part 2: write skew, prevented by SERIALIZABLE and a retry loop


@dataclass
class Doctor:
    """One doctor's go_off_call() running in its own thread on its own connection."""

    name: str
    conn: Conn
    counts: list[int]  # every count after_check saw, one per attempt that got that far
    levels: set[str]
    arrived: threading.Event  # the first attempt has read the roster
    release: threading.Event  # the test lets the first attempt go on
    future: Future[Any] | None = None

    def after_check(self, count: int) -> None:
        self.counts.append(count)
        self.levels.add(isolation_of(self.conn))
        if len(self.counts) == 1:  # hold the first attempt between its read and its write
            self.arrived.set()
            self.release.wait(timeout=30)

    @property
    def pid(self) -> int:
        return self.conn.info.backend_pid

    def outcome(self) -> Any:
        assert self.future is not None
        return self.future.result(timeout=30)


@pytest.fixture
def doctors(connect: Callable[[], Conn]) -> Iterator[tuple[Doctor, Doctor, Conn]]:
    with connect() as admin:
        admin.execute("CREATE TABLE doctors (name text PRIMARY KEY, on_call boolean NOT NULL)")
        admin.execute("INSERT INTO doctors VALUES ('alice', true), ('bob', true), "
                      "('carol', false)")
        with connect() as a, connect() as b:
            yield (Doctor("alice", a, [], set(), threading.Event(), threading.Event()),
                   Doctor("bob", b, [], set(), threading.Event(), threading.Event()),
                   admin)


def blocked(admin: Conn, pid: int) -> bool:
    """Is that session waiting for a row lock (another transaction's row or xact)?"""
    row = admin.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock" and row[1] in ("transactionid", "tuple")


def attempts_made(admin: Conn) -> int:
    """How many attempts reached the UPDATE: the injecting trigger's sequence counts them
    (a sequence is not rolled back with the transaction)."""
    row = admin.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                        "FROM injected").fetchone()
    assert row is not None
    return int(row[0])


def test_after_check_is_called_in_every_attempt(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    inject(admin, failures=1, sqlstate="40001", when=AT_STATEMENT,
           message="could not serialize access (injected by the check)")
    result, exc, counts = call_recorded(go_off_call, alice.conn, max_attempts=3)
    made = attempts_made(admin)
    if made == 1 and exc is not None:
        pytest.fail(
            f"the first attempt's UPDATE failed with 40001 (injected) and go_off_call let "
            f"{type(exc).__name__} out without a second attempt: catch "
            f"psycopg.errors.SerializationFailure and run the whole transaction again",
            pytrace=False)
    assert len(counts) == made, (
        f"the UPDATE ran in {made} attempts (the first failed with 40001, injected) but "
        f"after_check was called {len(counts)} time(s) ({counts}): call after_check(count) "
        f"in every attempt, right after that attempt reads the count - a retry reads the "
        f"roster again (a count read once, outside the retry, is stale after the 40001), "
        f"and what it read is what it decides on")
    assert result is True, (
        f"the first attempt failed with 40001 (injected) and the second could commit, yet "
        f"go_off_call returned {result!r} (exception: {exc!r})")


def test_go_off_call_leaves_the_session_as_it_found_it(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, _ = doctors
    conn = alice.conn
    conn.execute("SET default_transaction_isolation = 'repeatable read'")
    attribute_before = conn.isolation_level
    result = go_off_call(conn, "alice")
    assert conn.autocommit, (
        "go_off_call turned the caller's connection's autocommit off and left it so: every "
        "later statement of the caller now opens a transaction that nothing commits (its "
        "writes are lost when the connection closes, its locks and snapshot held "
        "meanwhile) - open your own transaction with 'with conn.transaction():' instead, "
        "or put conn.autocommit back in a finally")
    default_after = conn.execute("SHOW default_transaction_isolation").fetchone()
    with conn.transaction():
        level_after = isolation_of(conn)
    assert result is True, f"alice could go off call (2 on call) but got {result!r}"
    assert conn.isolation_level == attribute_before, (
        f"go_off_call left conn.isolation_level = {conn.isolation_level!r} (it was "
        f"{attribute_before!r}): every later transaction on the caller's connection now runs "
        f"at that level - set the level of your own transaction only (SET TRANSACTION "
        f"ISOLATION LEVEL SERIALIZABLE as its first statement), or put the attribute back")
    assert default_after is not None and default_after[0] == "repeatable read", (
        f"go_off_call changed the session's default isolation level from 'repeatable read' "
        f"to {default_after[0] if default_after else None!r}: set the level of this one "
        f"transaction only")
    assert level_after == "repeatable read", (
        f"after go_off_call, a new transaction on the caller's connection ran at "
        f"{level_after!r}, not the session's 'repeatable read': go_off_call must not "
        f"change the level of transactions that are not its own")


def test_write_skew_is_prevented_by_serializable_with_retry(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, bob, admin = doctors

    def settled(d: Doctor) -> bool:
        assert d.future is not None
        return d.arrived.is_set() or d.future.done() or blocked(admin, d.pid)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for d in (alice, bob):
            d.future = pool.submit(go_off_call, d.conn, d.name, after_check=d.after_check)
        # Step 1: both transactions have read the roster ("2 on call") and wait.
        wait_until(lambda: settled(alice) and settled(bob),
                   "both doctors to read the roster (after_check)")
        # Step 2: alice writes and commits first.
        alice.release.set()
        wait_until(lambda: alice.future is not None and (alice.future.done()
                                                         or blocked(admin, alice.pid)),
                   "alice's go_off_call to return")
        # Step 3: only now does bob write, against alice's committed change.
        bob.release.set()
        results: dict[str, Any] = {}
        for d in (alice, bob):
            try:
                results[d.name] = d.outcome()
            except psycopg.errors.SerializationFailure:
                pytest.fail(
                    f"{d.name}'s go_off_call raised SerializationFailure (SQLSTATE 40001): "
                    f"under SERIALIZABLE Postgres aborts one of two transactions that "
                    f"cannot be ordered; catch it and run the whole transaction again",
                    pytrace=False)
            except psycopg.errors.InFailedSqlTransaction:
                pytest.fail(
                    f"{d.name}'s go_off_call raised InFailedSqlTransaction: after 40001 the "
                    f"transaction is dead; a retry must start a new transaction (and read "
                    f"again), not repeat a statement inside the old one", pytrace=False)

    for d in (alice, bob):
        assert d.counts, f"{d.name}'s go_off_call never called after_check(count): call it " \
                         f"after reading the count, before the update"
    levels = sorted(alice.levels | bob.levels)
    on_call = [r[0] for r in admin.execute(
        "SELECT name FROM doctors WHERE on_call ORDER BY name").fetchall()]
    if not on_call and levels == ["serializable"]:
        pytest.fail(
            f"nobody is on call: alice and bob each read 2 on call (after_check saw "
            f"{alice.counts} and {bob.counts}) and each went off, though both ran at "
            f"SERIALIZABLE: the count and the UPDATE were not in the same transaction, so "
            f"SSI never saw the read the write depends on - read, decide and write in ONE "
            f"transaction, and retry all of it", pytrace=False)
    assert on_call, (
        f"nobody is on call: alice and bob each read 2 on call (after_check saw "
        f"{alice.counts} and {bob.counts}) and each went off - a write skew, which "
        f"{' and '.join(levels)} allows; it takes SERIALIZABLE to detect it")
    wrong = set(levels) - {"serializable"}
    assert not wrong, (
        f"go_off_call ran at {', '.join(sorted(wrong))}: this lab asks for SERIALIZABLE - "
        f"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE first thing inside the transaction")
    assert results["alice"] is True, (
        f"alice wrote and committed first, yet go_off_call returned {results['alice']!r} "
        f"(after_check saw {alice.counts})")
    if results["bob"] is False and bob.counts[-1] != 1:
        pytest.fail(
            f"bob was refused, but after_check saw only {bob.counts} on call: either his "
            f"attempt failed with 40001 and go_off_call gave up instead of retrying (a "
            f"failed attempt decides nothing), or it retried without calling "
            f"after_check(count) in the new attempt - every attempt that reads the count "
            f"reports it, then decides on what it read",
            pytrace=False)
    assert results["bob"] is False and on_call == ["bob"], (
        f"go_off_call returned alice={results['alice']!r}, bob={results['bob']!r}, on call "
        f"now: {on_call}; expected bob refused (after a retry that sees 1 on call) and bob "
        f"still on call")


# --------------------------------------------------------------------------------------
# Part 3: the error paths - retries that run out, a 40001 at COMMIT, errors not to retry

# A trigger raises the error at the UPDATE (or, deferred, at COMMIT) for the first
# ``failures`` attempts; a sequence counts them, since it is not rolled back with the
# transaction. After that the update goes through, so a loop that never stops ends too.
INJECT = """
CREATE SEQUENCE injected;
CREATE FUNCTION inject() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('injected') <= {failures} THEN
    RAISE EXCEPTION '{message}' USING ERRCODE = '{sqlstate}';
  END IF;
  RETURN NEW;
END $$;
"""
AT_STATEMENT = ("CREATE TRIGGER inject BEFORE UPDATE ON doctors FOR EACH ROW "
                "EXECUTE FUNCTION inject()")
AT_COMMIT = ("CREATE CONSTRAINT TRIGGER inject AFTER UPDATE ON doctors DEFERRABLE "
             "INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION inject()")


def inject(admin: Conn, *, failures: int, sqlstate: str, message: str, when: str) -> None:
    admin.execute(INJECT.format(failures=failures, sqlstate=sqlstate, message=message))
    admin.execute(when)


def call_recorded(go_off_call: Any, conn: Conn, **kw: Any) -> tuple[Any, BaseException | None,
                                                                    list[int]]:
    counts: list[int] = []
    try:
        return go_off_call(conn, "alice", after_check=counts.append, **kw), None, counts
    except Exception as exc:  # noqa: BLE001 - what escaped is what the test judges
        return None, exc, counts


def on_call(admin: Conn) -> list[str]:
    return [r[0] for r in admin.execute(
        "SELECT name FROM doctors WHERE on_call ORDER BY name").fetchall()]


def test_gives_up_after_exactly_max_attempts_and_lets_the_40001_out(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    inject(admin, failures=8, sqlstate="40001", when=AT_STATEMENT,
           message="could not serialize access (injected by the check)")
    result, exc, counts = call_recorded(go_off_call, alice.conn, max_attempts=3)
    attempts = len(counts)
    if exc is None:
        pytest.fail(
            f"every attempt failed with 40001 and max_attempts=3, yet go_off_call returned "
            f"{result!r} after {attempts} attempt(s): when the attempts run out, let the last "
            f"SerializationFailure out (re-raise it) - "
            + ("your loop went past max_attempts until the injected failures stopped"
               if attempts > 3 else
               f"returning {result!r} reports a decision no transaction committed"),
            pytrace=False)
    assert isinstance(exc, psycopg.errors.SerializationFailure), (
        f"every attempt failed with 40001 and max_attempts=3: go_off_call raised "
        f"{type(exc).__name__} ({str(exc).splitlines()[0] if str(exc) else ''}) after "
        f"{attempts} attempt(s); expected the last SerializationFailure itself, re-raised, "
        f"so the caller sees why it failed")
    assert attempts == 3, (
        f"max_attempts=3 but go_off_call made {attempts} attempts before letting the 40001 "
        f"out (after_check was called {attempts} times): "
        + ("one too many - an off-by-one such as range(max_attempts + 1) or attempts "
           "counted from 0 and compared with >" if attempts == 4 else
           "it must make exactly max_attempts attempts, the first one included"))


DEFAULT_ATTEMPTS = 10   # go_off_call's max_attempts when the caller leaves it out (README)


def test_max_attempts_defaults_to_ten(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    """A caller that leaves max_attempts out gets the documented 10: nine attempts failing
    with 40001 and the tenth going through must end in True."""
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    inject(admin, failures=DEFAULT_ATTEMPTS - 1, sqlstate="40001", when=AT_STATEMENT,
           message="could not serialize access (injected by the check)")
    result, exc, counts = call_recorded(go_off_call, alice.conn)
    assert exc is None and result is True, (
        f"max_attempts left at its default, the first {DEFAULT_ATTEMPTS - 1} attempts failing "
        f"with 40001 and the {DEFAULT_ATTEMPTS}th free to go through: go_off_call "
        + (f"raised {type(exc).__name__} after {len(counts)} attempt(s)" if exc is not None
           else f"returned {result!r} after {len(counts)} attempt(s)")
        + f", expected True from attempt {DEFAULT_ATTEMPTS} - the default is max_attempts="
        f"{DEFAULT_ATTEMPTS} (the interface in the README): a caller that leaves it out "
        "relies on it")
    assert len(counts) == DEFAULT_ATTEMPTS, (
        f"expected {DEFAULT_ATTEMPTS} attempts ({DEFAULT_ATTEMPTS - 1} failing with 40001), "
        f"after_check saw {len(counts)}")


def test_a_40001_at_commit_is_retried_too(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    # The UPDATE succeeds; the deferred trigger fails the first COMMIT with 40001 - as
    # SERIALIZABLE does when the conflict is found at commit time.
    inject(admin, failures=1, sqlstate="40001", when=AT_COMMIT,
           message="could not serialize access (injected at COMMIT by the check)")
    result, exc, counts = call_recorded(go_off_call, alice.conn, max_attempts=3)
    if isinstance(exc, psycopg.errors.SerializationFailure):
        pytest.fail(
            f"the first attempt's UPDATE went through but its COMMIT failed with 40001, and "
            f"go_off_call let it out after {len(counts)} attempt(s): the COMMIT is part of "
            f"the transaction your retry must cover - commit inside the try (leaving "
            f"'with conn.transaction()' commits), not after the loop", pytrace=False)
    if exc is not None:
        pytest.fail(
            f"the first COMMIT failed with 40001 (injected) and go_off_call raised "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} - after "
            f"a failed COMMIT the transaction is over; start a new one and run it again",
            pytrace=False)
    now = on_call(admin)
    assert "alice" not in now, (
        f"go_off_call returned {result!r} but alice is still on call: the COMMIT failed "
        f"with 40001 (injected) and rolled the update back, and your code did not notice - "
        f"the commit must be inside the retry, and True returned only after it succeeded")
    assert result is True and len(counts) == 2, (
        f"with the first COMMIT failing (40001), expected a second attempt that commits and "
        f"returns True; saw {len(counts)} attempt(s), returned {result!r}")


# The roster read through a view whose filter raises 40001 the first ``failures`` times
# it is evaluated: SSI may abort a transaction at any statement, a read included (a
# transaction already doomed by another's commit fails at its next statement).
AT_READ = """
ALTER TABLE doctors RENAME TO doctors_stored;
CREATE SEQUENCE reads_injected;
CREATE FUNCTION read_gate() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF nextval('reads_injected') <= {failures} THEN
    RAISE EXCEPTION 'could not serialize access (injected at the read by the check)'
      USING ERRCODE = '40001';
  END IF;
  RETURN true;
END $$;
CREATE VIEW doctors AS SELECT * FROM doctors_stored WHERE read_gate();
"""


def test_a_40001_at_the_read_is_retried_too(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    admin.execute(AT_READ.format(failures=1))
    result, exc, counts = call_recorded(go_off_call, alice.conn, max_attempts=3)
    where = ("the first attempt's read of the roster (SELECT count(*) ... WHERE on_call) "
             "failed with 40001 (injected)")
    if isinstance(exc, psycopg.errors.SerializationFailure):
        pytest.fail(
            f"{where} and go_off_call let it out after {len(counts) + 1} attempt(s): under "
            f"SERIALIZABLE a 40001 can come at ANY statement of the transaction - the read "
            f"too (a transaction doomed by another's commit fails at its next statement), "
            f"not only the write or the COMMIT; the retry must cover the whole transaction, "
            f"from BEGIN to COMMIT", pytrace=False)
    if exc is not None:
        pytest.fail(
            f"{where} and go_off_call raised {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} - after a 40001 the transaction "
            f"is over; end it and run a new one from the top", pytrace=False)
    if result is False:
        pytest.fail(
            f"{where}, and go_off_call returned False (after_check saw {counts}): a failed "
            f"attempt decides nothing - alice and bob were both on call, so a new attempt "
            f"would have read 2 and let alice go; retry the whole transaction on a 40001 "
            f"wherever it is raised", pytrace=False)
    now = on_call(admin)
    assert result is True and counts == [2] and "alice" not in now, (
        f"{where}; expected a second attempt that reads 2 on call (after_check(2)), takes "
        f"alice off call and returns True; saw after_check {counts}, returned {result!r}, "
        f"on call now: {now}")


# A refusal decides on what its transaction read, and under SERIALIZABLE that is valid only
# once the transaction has committed, read-only transactions included (PostgreSQL's docs,
# 13.2.3 Serializable Isolation Level). The roster is read through a view whose filter, the
# first time it runs, leaves a row in a table with a deferred trigger: that attempt's COMMIT
# fails with 40001, as SSI's would. A refusal rolled back instead never meets it.
AT_REFUSAL_COMMIT = """
ALTER TABLE doctors RENAME TO doctors_stored;
CREATE TABLE commit_gate (at timestamptz DEFAULT now());
CREATE SEQUENCE commits_injected;
CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'could not serialize access (injected at COMMIT by the check)'
    USING ERRCODE = '40001';
END $$;
CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT ON commit_gate DEFERRABLE
  INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_commit();
CREATE FUNCTION read_gate() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF nextval('commits_injected') = 1 THEN
    INSERT INTO commit_gate DEFAULT VALUES;
  END IF;
  RETURN true;
END $$;
CREATE VIEW doctors AS SELECT * FROM doctors_stored WHERE read_gate();
"""


def test_a_refusal_commits_what_it_decided_on(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    admin.execute("UPDATE doctors SET on_call = name = 'alice'")
    admin.execute(AT_REFUSAL_COMMIT)
    counts: list[int] = []

    def after_check(count: int) -> None:
        counts.append(count)
        if len(counts) == 1:  # alice has read "1 on call"; carol goes on call and commits
            admin.execute("UPDATE doctors_stored SET on_call = true WHERE name = 'carol'")

    result = go_off_call(alice.conn, "alice", after_check=after_check, max_attempts=3)
    now = on_call(admin)
    if result is False and counts == [1]:
        pytest.fail(
            f"alice's attempt read 1 doctor on call and go_off_call returned False without "
            f"committing that attempt (after_check saw {counts}): its COMMIT would have "
            f"failed with 40001 (injected by the check) and a retry read 2 on call - carol "
            f"went on call meanwhile. Under SERIALIZABLE what a transaction read is valid "
            f"only once it has committed, read-only transactions included (PostgreSQL "
            f"docs, 13.2.3): a refusal decides on what it read, so commit it (leave 'with "
            f"conn.transaction():' normally, not with ROLLBACK or psycopg.Rollback) and "
            f"retry a 40001 there like any other", pytrace=False)
    assert result is True and counts == [1, 2] and now == ["carol"], (
        f"alice's first attempt read 1 on call, carol then went on call, and that attempt's "
        f"COMMIT failed with 40001 (injected); expected a second attempt that reads 2 "
        f"(after_check(2)), takes alice off call and returns True; saw after_check "
        f"{counts}, returned {result!r}, on call now: {now}")

NOT_40001 = {
    # sqlstate: (error class, how the learner reads it, why retrying is wrong)
    "23514": (psycopg.errors.CheckViolation, "a CheckViolation (an IntegrityError)",
              "a retry cannot fix a rule the data breaks",
              "doctors must give a week of notice (injected by the check)"),
    "53100": (psycopg.errors.DiskFull, "a DiskFull (an OperationalError, like 40001, but "
              "not a serialization failure)", "the disk is no emptier on the next attempt",
              "could not extend file: No space left on device (injected by the check)"),
}


@pytest.mark.parametrize("sqlstate", list(NOT_40001))
def test_an_error_that_is_not_40001_is_not_retried(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any, sqlstate: str) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    error, what, why, message = NOT_40001[sqlstate]
    inject(admin, failures=8, sqlstate=sqlstate, when=AT_STATEMENT, message=message)
    result, exc, counts = call_recorded(go_off_call, alice.conn, max_attempts=5)
    made = attempts_made(admin)
    if exc is None:
        pytest.fail(
            f"the UPDATE failed with {what}, SQLSTATE {sqlstate}, and go_off_call returned "
            f"{result!r} after {made} attempt(s): only 40001 may be caught and retried - any "
            f"other error must reach the caller", pytrace=False)
    assert made == 1, (
        f"the UPDATE failed with {what}, SQLSTATE {sqlstate}, and go_off_call tried {made} "
        f"times: {why} - catch only psycopg.errors.SerializationFailure (40001), not "
        f"psycopg.OperationalError, psycopg.Error or Exception")
    assert isinstance(exc, error), (
        f"the UPDATE failed with {what}, SQLSTATE {sqlstate}, and go_off_call raised "
        f"{type(exc).__name__} instead: let the database's error out unchanged")


# --------------------------------------------------------------------------------------
# Part 4: every path ends the transaction it opened. A transaction opened by hand (BEGIN,
# or autocommit turned off) and ended only on the happy path - or rolled back only on the
# one error the code expected - is left open on the caller's connection when anything else
# happens: the next statement fails with InFailedSqlTransaction, or runs inside the stale
# transaction, holding its locks and snapshot.


class BetweenFailed(Exception):
    """What the check's between() / after_check() raises: the caller's own error."""


def left_open(conn: Conn, path: str, function: str) -> str | None:
    """None if ``conn`` is idle (no transaction open), else what is wrong, to fail with;
    a transaction left open is rolled back, so the connection closes cleanly."""
    status = conn.info.transaction_status
    if status == TransactionStatus.IDLE:
        return None
    conn.rollback()
    state = ("INERROR: inside a failed transaction - the caller's next statement fails with "
             "InFailedSqlTransaction" if status == TransactionStatus.INERROR else
             f"{status.name}: inside a transaction that never ended - the caller's next "
             f"statements run inside it, in its old snapshot, holding its locks")
    return (f"{path}, {function} left the caller's connection {state}. End the "
            f"transaction on every path, errors and early returns included: 'with "
            f"conn.transaction():' rolls back when the block raises, or ROLLBACK in a "
            f"try/finally (not only in the except for the error you expected)")


def session_changed(conn: Conn, default_before: str, attribute_before: Any, path: str,
                    function: str) -> str | None:
    """None if the session's isolation settings are as they were before the call (its
    default_transaction_isolation and psycopg's conn.isolation_level), else what is wrong.
    Called after left_open(), so the connection is idle and can be asked."""
    row = conn.execute("SHOW default_transaction_isolation").fetchone()
    default_after = row[0] if row else None
    changed = []
    if default_after != default_before:
        changed.append(f"the session's default isolation level changed from {default_before!r} to "
                       f"{default_after!r}")
    if not conn.autocommit:
        changed.append("autocommit turned off (it was on: every later statement now opens a "
                       "transaction nothing commits)")
    if conn.isolation_level != attribute_before:
        changed.append(f"conn.isolation_level changed from {attribute_before!r} to "
                       f"{conn.isolation_level!r}")
    if not changed:
        return None
    return (f"{path}, {function} left {' and '.join(changed)}: every later transaction on "
            f"the caller's connection now runs at that level. A setting changed for the "
            f"call and put back only when it returns is left behind when an error comes "
            f"out - put it back in a finally, or better, change nothing of the session: "
            f"SET TRANSACTION ISOLATION LEVEL as the first statement of your own "
            f"transaction ends with it")


def raise_between() -> None:
    raise BetweenFailed("raised by the check's between()")


READ_PATHS = {
    # id: (query, between, what the path is)
    "query-fails": ("SELECT balance FROM no_such_table", lambda: None,
                    "the query failed (UndefinedTable: it names a missing table)"),
    "between-raises": (BALANCE, raise_between,
                       "between() raised after the first read (an error of the caller's)"),
}


@pytest.mark.parametrize("path", list(READ_PATHS))
def test_read_twice_ends_its_transaction_on_an_error(
        connect: Callable[[], Conn], learner: Any, path: str) -> None:
    read_twice = learner.function("isolation", "read_twice")
    query, between, what = READ_PATHS[path]
    with connect() as conn:
        conn.execute("CREATE TABLE accounts (id integer PRIMARY KEY, balance integer)")
        conn.execute("INSERT INTO accounts VALUES (1, 100)")
        # Neither the server's default nor the level asked for: a session setting changed
        # for the call (SET SESSION, conn.isolation_level) and not put back shows.
        conn.execute("SET default_transaction_isolation = 'serializable'")
        attribute_before = conn.isolation_level
        try:
            read_twice(conn, query, "REPEATABLE READ", between)
        except Exception:  # noqa: BLE001, S110 - the error may come out, as it is
            pass
        problem = left_open(conn, what, "read_twice")
        assert problem is None, problem
        problem = session_changed(conn, "serializable", attribute_before, what, "read_twice")
    assert problem is None, problem


GO_OFF_PATHS = {
    # id: (doctors on call, injected error (sqlstate, message) or None, after_check raises,
    #      max_attempts, what the path is)
    "refused": (["alice"], None, False, 10,
                "alice was the only doctor on call and go_off_call returned False"),
    "check-violation": (["alice", "bob"], ("23514", "injected by the check"), False, 10,
                        "the UPDATE failed with a CheckViolation (SQLSTATE 23514, not to "
                        "be retried)"),
    "attempts-run-out": (["alice", "bob"], ("40001", "could not serialize access "
                                            "(injected by the check)"), False, 2,
                         "every attempt failed with 40001 and the 2 attempts ran out"),
    "after-check-raises": (["alice", "bob"], None, True, 10,
                           "after_check() raised an error of the caller's, after the "
                           "count was read"),
}


@pytest.mark.parametrize("path", list(GO_OFF_PATHS))
def test_go_off_call_ends_its_transaction_on_every_path(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any, path: str) -> None:
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    on_call_now, error, check_raises, max_attempts, what = GO_OFF_PATHS[path]
    admin.execute("UPDATE doctors SET on_call = name = ANY(%s)", (on_call_now,))
    if error is not None:
        inject(admin, failures=8, sqlstate=error[0], message=error[1], when=AT_STATEMENT)

    def after_check(count: int) -> None:
        if check_raises:
            raise BetweenFailed("raised by the check's after_check()")

    alice.conn.execute("SET default_transaction_isolation = 'repeatable read'")
    attribute_before = alice.conn.isolation_level
    try:
        go_off_call(alice.conn, "alice", after_check=after_check, max_attempts=max_attempts)
    except Exception:  # noqa: BLE001, S110 - what comes out is judged by the other tests
        pass
    problem = left_open(alice.conn, what, "go_off_call")
    assert problem is None, problem
    problem = session_changed(alice.conn, "repeatable read", attribute_before, what,
                              "go_off_call")
    assert problem is None, problem


# --------------------------------------------------------------------------------------
# Part 5: what the data and the caller bring - any doctor's name, one call after another

NAMES = {
    # id: (the doctor going off call, what a name pasted into the SQL text does with it)
    "apostrophe": ("d'Artagnan", "its apostrophe ends the string literal (a syntax error) - "
                                 "or, quoted by repr(), it is in double quotes: a column "
                                 "name"),
    "quote-and-or": ("x' OR 'a' = 'a",
                     "it closes the literal and adds OR 'a' = 'a': every doctor matches"),
    "unicode": ("Zoë Ørsted", "nothing, as long as it is sent as text"),
}


@pytest.mark.parametrize("case", list(NAMES))
def test_any_doctors_name_is_taken_as_data(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any, case: str) -> None:
    """A name is data: sent as a parameter it can hold any character; pasted into the
    statement's text it becomes SQL."""
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    name, spliced = NAMES[case]
    admin.execute("UPDATE doctors SET on_call = name = 'bob'")
    admin.execute("INSERT INTO doctors VALUES (%s, true)", (name,))
    result, exc, counts = call_recorded_as(go_off_call, alice.conn, name)
    now = on_call(admin)
    told = f"go_off_call(conn, {name!r}) with {name!r} and bob on call"
    why = (f"the name went into the statement's text, where {spliced} - pass it as a "
           f"parameter (WHERE name = %s, with (doctor,)), never formatted or quoted by hand")
    if exc is not None:
        pytest.fail(f"{told} raised {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''} - {why}", pytrace=False)
    assert now == ["bob"], (
        f"{told} returned {result!r} (after_check saw {counts}), and on call now: {now}; "
        f"expected bob only - {name!r} off call, nobody else: {why}")
    assert result is True, f"{told}: {name!r} went off call, yet go_off_call returned {result!r}"


def call_recorded_as(go_off_call: Any, conn: Conn, doctor: str,
                     **kw: Any) -> tuple[Any, BaseException | None, list[int]]:
    counts: list[int] = []
    try:
        return go_off_call(conn, doctor, after_check=counts.append, **kw), None, counts
    except Exception as exc:  # noqa: BLE001 - what escaped is what the test judges
        return None, exc, counts


SERIAL = "could not serialize access (injected by the check)"
FAIL_BELOW = 1000  # inject()'s threshold: the sequence is set below it to fail n times


def fail_next(admin: Conn, n: int) -> None:
    """The next ``n`` UPDATEs fail with 40001 (the sequence's next values reach the
    threshold), those after go through."""
    admin.execute("SELECT setval('injected', %s, false)", (FAIL_BELOW - n + 1,))
EARLIER_CALLS = {
    # id: (doctors on call for the earlier call, 40001s it meets, what it was)
    "after-one-gave-up": (["alice", "bob"], 3,
                          "an earlier call ran out of its 3 attempts (every one failed "
                          "with 40001) and let the 40001 out"),
    "after-a-refusal": (["alice"], 0, "an earlier call refused (alice was the only doctor "
                                      "on call) and returned False"),
    "after-a-retried-success": (["alice", "bob"], 2,
                                "an earlier call's first 2 attempts failed with 40001 and "
                                "its third took alice off call"),
}


@pytest.mark.parametrize("case", list(EARLIER_CALLS))
def test_each_call_has_its_own_attempts(
        doctors: tuple[Doctor, Doctor, Conn], learner: Any, case: str) -> None:
    """Two calls one after the other, in one process: the second gets max_attempts of its
    own, whatever the first one used up."""
    go_off_call = learner.function("isolation", "go_off_call")
    alice, _, admin = doctors
    roster, failures, earlier = EARLIER_CALLS[case]
    admin.execute("UPDATE doctors SET on_call = name = ANY(%s)", (roster,))
    inject(admin, failures=FAIL_BELOW, sqlstate="40001", when=AT_STATEMENT, message=SERIAL)
    fail_next(admin, failures)  # the earlier call meets its own 40001s...
    first = call_recorded_as(go_off_call, alice.conn, "alice", max_attempts=3)
    made = len(first[2])
    assert (made, first[1] is None) == (failures + 1 if failures < 3 else 3, failures < 3), (
        f"the earlier call was to be this: {earlier}; it made {made} attempt(s) and "
        f"{'returned ' + repr(first[0]) if first[1] is None else 'raised ' + repr(first[1])}")
    admin.execute("UPDATE doctors SET on_call = name IN ('bob', 'carol')")
    fail_next(admin, 2)  # ...and the next call 2 more: its 3rd attempt goes through
    result, exc, counts = call_recorded_as(go_off_call, alice.conn, "bob", max_attempts=3)
    assert exc is None and result is True and len(counts) == 3, (
        f"{earlier}; then go_off_call(conn, 'bob', max_attempts=3), with bob and carol on "
        f"call and its first 2 attempts failing with 40001, "
        + (f"raised {type(exc).__name__} after {len(counts)} attempt(s)" if exc is not None
           else f"returned {result!r} after {len(counts)} attempt(s)")
        + "; expected True from its 3rd attempt - each call has max_attempts of its own: "
        "an attempt counter kept outside the call (a module-level variable, an attribute of "
        "the function, a mutable default) carries the earlier call's attempts into this one")
