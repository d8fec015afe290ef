"""A bounded connection pool for Postgres: validation on borrow, and a policy for when every
connection is busy - queue (wait up to a timeout) or reject at once. See README.md."""

from __future__ import annotations

from typing import Any

import psycopg


class PoolExhausted(Exception):
    """No connection could be had: the caller should shed load (e.g. answer 503)."""


class PoolClosed(PoolExhausted):
    """The pool is closed: acquire() raises this, at once (see README.md)."""


class Pool:
    def __init__(self, dsn: str, size: int, *, policy: str = "queue",
                 acquire_timeout: float = 5.0) -> None:
        self.dsn, self.size, self.policy, self.acquire_timeout = dsn, size, policy, acquire_timeout

    def acquire(self) -> psycopg.Connection[Any]:
        # TODO: a bounded pool, not a new connection each time; and hand out a lease of your
        # own per borrow that forwards to the connection, not the connection (README, 11)
        return psycopg.connect(self.dsn)

    def release(self, conn: psycopg.Connection[Any]) -> None:
        conn.close()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self.acquire()
        try:
            cur = conn.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
            conn.commit()
            return rows
        finally:
            self.release(conn)

    def stats(self) -> dict[str, int]:
        raise NotImplementedError("stats: size, open, idle, in_use, waiting")

    def close(self) -> None:
        pass
