"""Isolation levels on Postgres: what a transaction sees of concurrent commits, and a
write-skew prevented by SERIALIZABLE with retries."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

Conn = psycopg.Connection[Any]
Row = tuple[Any, ...]

# Only these four may be spliced into SET TRANSACTION (never arbitrary text).
LEVELS = ("READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")


def _set_isolation(conn: Conn, isolation: str) -> None:
    """Must be the first statement of the transaction: the level is fixed when the
    transaction takes its first snapshot. (Outside a transaction block Postgres only
    warns and ignores it.)"""
    level = isolation.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown isolation level {isolation!r}; one of {LEVELS}")
    conn.execute(sql.SQL("SET TRANSACTION ISOLATION LEVEL {}").format(sql.SQL(level)))


def read_twice(conn: Conn, query: str, isolation: str,
               between: Callable[[], None]) -> tuple[list[Row], list[Row]]:
    """Run ``query`` twice in one transaction at ``isolation``, calling ``between()`` in
    the middle, and return both results.

    READ COMMITTED takes a fresh snapshot per statement, so the second read sees what
    others committed meanwhile (non-repeatable reads, phantoms). REPEATABLE READ and
    SERIALIZABLE read the snapshot taken by the first query until the end. Postgres never
    shows uncommitted data: READ UNCOMMITTED behaves as READ COMMITTED.
    """
    with conn.transaction(force_rollback=True):  # read-only: nothing to commit
        _set_isolation(conn, isolation)
        first = conn.execute(query).fetchall()
        between()
        second = conn.execute(query).fetchall()
    return first, second


def go_off_call(conn: Conn, doctor: str, *,
                after_check: Callable[[int], None] | None = None,
                max_attempts: int = 10) -> bool:
    """Take ``doctor`` off call unless that would leave nobody on call.

    Returns True if the doctor went off call, False if refused (they are the last one).
    ``after_check(on_call_count)`` is called in every attempt, after the count is read
    and before anything is written.

    Two doctors going off call at once is the classic write skew: each transaction reads
    "2 on call", each updates a *different* row, so no row lock ever conflicts, and under
    READ COMMITTED or REPEATABLE READ both commit - leaving nobody. SERIALIZABLE (SSI)
    tracks what each transaction read, sees that the pair cannot be put in any serial
    order, and aborts one with SQLSTATE 40001. That one must then start again from the
    read: in a new transaction it sees the other's commit and refuses.
    """
    for attempt in range(1, max_attempts + 1):
        try:
            with conn.transaction():
                _set_isolation(conn, "SERIALIZABLE")
                row = conn.execute("SELECT count(*) FROM doctors WHERE on_call").fetchone()
                assert row is not None
                on_call: int = row[0]
                if after_check is not None:
                    after_check(on_call)
                if on_call < 2:
                    return False  # leaving the block commits; COMMIT can raise 40001 too
                conn.execute("UPDATE doctors SET on_call = false WHERE name = %s", (doctor,))
            return True
        except psycopg.errors.SerializationFailure:
            # The whole transaction was rolled back: nothing it read can be trusted.
            # Retry from the top, after a short randomized backoff so that two retrying
            # transactions do not collide again in lockstep.
            if attempt == max_attempts:
                raise
            time.sleep(random.uniform(0, 0.002 * 2**attempt))
    raise AssertionError("unreachable: the loop returns or raises")
