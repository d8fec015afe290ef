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
    with connect() as conn, connect() as other:

        def between() -> None:
            # Look at the learner's session first: are we between two reads of ONE
            # transaction, and at which level?
            seen["status"] = conn.info.transaction_status
            seen["level"] = isolation_of(conn)
            if case.change == "uncommitted":
                other.execute("BEGIN")  # left open: the update is never committed
            other.execute(CHANGES[case.change])

        first, second = read_twice(conn, case.query, case.isolation, between)
        if case.change == "uncommitted":
            other.execute("ROLLBACK")

    assert seen, "read_twice never called between(): call it between the two reads"
    assert seen["status"] == TransactionStatus.INTRANS, (
        f"between the two reads your connection was not inside a transaction (status "
        f"{seen['status'].name}): each read ran in a transaction of its own, so no "
        f"isolation level can apply to both - wrap them in one: with conn.transaction()")
    assert seen["level"] == case.isolation.lower(), (
        f"asked for {case.isolation}, your transaction ran at {seen['level']}: SET "
        f"TRANSACTION ISOLATION LEVEL must be the first statement inside the transaction "
        f"(outside one it is ignored with a warning)")
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
            f"bob was refused after seeing only {bob.counts} on call: his attempt failed "
            f"with 40001 and go_off_call gave up instead of retrying - a failed attempt "
            f"decides nothing; run it again and decide on what the new attempt reads",
            pytrace=False)
    assert results["bob"] is False and on_call == ["bob"], (
        f"go_off_call returned alice={results['alice']!r}, bob={results['bob']!r}, on call "
        f"now: {on_call}; expected bob refused (after a retry that sees 1 on call) and bob "
        f"still on call")
