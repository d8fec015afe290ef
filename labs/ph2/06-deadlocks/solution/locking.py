"""Row locks without deadlocks: a fixed lock order, a SKIP LOCKED job queue, and a bounded
wait with lock_timeout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


class LockBusy(Exception):
    """The row stayed locked by someone else for longer than the timeout."""


def transfer(conn: Conn, from_id: int, to_id: int, amount: int, *,
             after_first_lock: Callable[[], None] | None = None) -> None:
    """Move ``amount`` between two accounts, locking them in a fixed order.

    A transfer 1->2 and a transfer 2->1 running at once would each lock their source
    first, then wait forever for the other's row: a cycle in the wait-for graph, which
    Postgres breaks after deadlock_timeout by aborting one of them (SQLSTATE 40P01).
    Locking both rows lowest id first, whatever the direction, means both transfers
    queue for the same first row: the second simply waits, and no cycle can form.
    """
    first, second = sorted((from_id, to_id))
    with conn.transaction():
        conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (first,))
        if after_first_lock is not None:
            after_first_lock()
        conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (second,))
        # Both rows are ours now; the order of the updates no longer matters.
        conn.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s",
                     (amount, from_id))
        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                     (amount, to_id))


def take_job(conn: Conn, worker: str, handle: Callable[[int, str], None]) -> int | None:
    """Claim the oldest queued job, run ``handle(job_id, payload)``, mark it done by
    ``worker``; return its id, or None when no job is free.

    FOR UPDATE locks the claimed row so no other worker can take it; SKIP LOCKED lets the
    other workers pass over rows already locked instead of queueing behind them, so N
    workers work on N jobs at once. The handler runs inside the claiming transaction: if
    it raises (or the worker dies), the rollback releases the row, still 'queued', for the
    next worker - a job is never lost between claim and done.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT id, payload FROM jobs WHERE status = 'queued' "
            "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED").fetchone()
        if row is None:
            return None
        job_id, payload = row
        handle(job_id, payload)
        conn.execute("UPDATE jobs SET status = 'done', done_by = %s, done_at = now() "
                     "WHERE id = %s", (worker, job_id))
    return int(job_id)


def update_balance_with_timeout(conn: Conn, account_id: int, delta: int,
                                timeout_ms: int) -> None:
    """Add ``delta`` to the account's balance, waiting at most ``timeout_ms`` for its row
    lock; raise LockBusy if it stays locked.

    lock_timeout bounds only the wait for a lock (a slow query is not cancelled, unlike
    statement_timeout), and set_config(..., true) is SET LOCAL: the setting ends with
    this transaction instead of staying on the connection for whatever runs next.
    """
    if timeout_ms <= 0:
        update_balance_without_waiting(conn, account_id, delta)
        return
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{timeout_ms}ms",))
            conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                         (delta, account_id))
    except psycopg.errors.LockNotAvailable as exc:  # SQLSTATE 55P03
        raise LockBusy(f"account {account_id} stayed locked for more than {timeout_ms} ms"
                       ) from exc


def update_balance_without_waiting(conn: Conn, account_id: int, delta: int) -> None:
    """timeout_ms=0: wait at most 0 ms, that is not at all. lock_timeout = 0 would mean the
    opposite (Postgres' "no timeout": wait forever), so the row is taken with NOWAIT, which
    fails at once with the same 55P03 when another transaction holds it."""
    try:
        with conn.transaction():
            conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE NOWAIT",
                         (account_id,))
            conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                         (delta, account_id))
    except psycopg.errors.LockNotAvailable as exc:  # SQLSTATE 55P03
        raise LockBusy(f"account {account_id} was locked (timeout_ms=0: no wait)") from exc
