"""Row locks without deadlocks: a fixed lock order, a SKIP LOCKED job queue, and a bounded
wait with lock_timeout.

Every function gets a psycopg connection in autocommit mode: each statement is its own
transaction unless you open one (``with conn.transaction(): ...``). The tables are in
README.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


class LockBusy(Exception):
    """The row stayed locked by someone else for longer than the timeout."""


def transfer(conn: Conn, from_id: int, to_id: int, amount: int, *,
             after_first_lock: Callable[[], None] | None = None) -> None:
    """Move ``amount`` from one account to the other in one transaction, locking the two
    rows so that opposite transfers can never deadlock. Call ``after_first_lock()`` (if
    given) once you hold the first row lock, before you ask for the second."""
    raise NotImplementedError("transfer: lock both accounts in a fixed order, then update")


def take_job(conn: Conn, worker: str, handle: Callable[[int, str], None]) -> int | None:
    """Claim the oldest queued job that no other worker holds, call
    ``handle(job_id, payload)`` while holding it, mark it done by ``worker``; return its id,
    or None when no job is free. If ``handle`` raises, the job must stay queued."""
    raise NotImplementedError("take_job: SELECT ... FOR UPDATE SKIP LOCKED, handle, done")


def update_balance_with_timeout(conn: Conn, account_id: int, delta: int,
                                timeout_ms: int) -> None:
    """Add ``delta`` to the account's balance, waiting at most ``timeout_ms`` milliseconds
    for its row lock; raise LockBusy if it is still locked by then."""
    raise NotImplementedError("update_balance_with_timeout: lock_timeout for this "
                              "transaction only, then UPDATE")
