"""Isolation levels on Postgres: what a transaction sees of concurrent commits, and a
write-skew prevented by SERIALIZABLE with retries.

Every function gets a psycopg connection in autocommit mode: each statement runs in a
transaction of its own unless you open one (``with conn.transaction(): ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]
Row = tuple[Any, ...]


def read_twice(conn: Conn, query: str, isolation: str,
               between: Callable[[], None]) -> tuple[list[Row], list[Row]]:
    """Run ``query`` twice in ONE transaction at ``isolation`` ("READ UNCOMMITTED",
    "READ COMMITTED", "REPEATABLE READ" or "SERIALIZABLE"), calling ``between()`` after
    the first read; return both results (lists of rows)."""
    raise NotImplementedError(
        "read_twice: open a transaction, set its isolation level, read, between(), read")


def go_off_call(conn: Conn, doctor: str, *,
                after_check: Callable[[int], None] | None = None,
                max_attempts: int = 10) -> bool:
    """Take ``doctor`` off call unless that would leave nobody on call; return True if
    they went off call, False if refused.

    In a SERIALIZABLE transaction: count the doctors on call, call
    ``after_check(count)`` (if given), and only if count >= 2 set this doctor's on_call
    to false. Retry the whole transaction on a serialization failure (SQLSTATE 40001).
    """
    raise NotImplementedError(
        "go_off_call: count, after_check(count), update - SERIALIZABLE, retried on 40001")
