"""A Postgres connection pool sized by Little's Law, with an acquire timeout and a bounded
wait queue (backpressure).

Opening a Postgres connection costs a TCP handshake, authentication and a new server
process; a pool pays that once per connection and hands connections out per request.
How many? Little's Law: the average number of requests in the system L equals the arrival
rate λ times the average time each spends there W. At 200 requests/s holding a connection
for 50 ms each, 200 × 0.05 = 10 connections are busy on average.

When all connections are busy a request waits for one — up to a deadline, because an
unbounded wait turns a slow database into a pile-up of requests that never ends. And when
too many requests are already waiting, a new one is refused at once: failing fast is
backpressure that tells the caller to back off instead of queueing more.
"""

from __future__ import annotations

import math
from typing import Any

from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests


class PoolExhausted(Exception):
    """No connection could be had: none became free in time, or the wait queue is full."""


def pool_size(arrival_rate_per_s: float, avg_latency_s: float) -> int:
    """Connections needed on average by Little's Law, rounded up, at least one."""
    busy = arrival_rate_per_s * avg_latency_s
    # 200 * 0.05 is 10.000000000000002 in binary floating point: round away such noise
    # before taking the ceiling, or the pool gets a connection nobody needs.
    return max(1, math.ceil(round(busy, 9)))


class Database:
    """Runs queries on pooled connections; never opens more than max_connections."""

    def __init__(self, dsn: str, arrival_rate_per_s: float, avg_latency_s: float,
                 acquire_timeout_s: float, max_waiting: int = 0) -> None:
        self.max_connections = pool_size(arrival_rate_per_s, avg_latency_s)
        # min_size = max_size: all connections are opened up front, so no request pays
        # the connection cost and the server-side count is fixed and known.
        self.pool = ConnectionPool(
            dsn,
            min_size=self.max_connections,
            max_size=self.max_connections,
            timeout=acquire_timeout_s,  # how long a request may wait for a connection
            max_waiting=max_waiting,    # how many may wait at once (0 = no limit)
            open=True,
        )
        self.pool.wait(timeout=30)  # ready: every connection is open

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            # the context commits (or rolls back on error) and returns the connection
            with self.pool.connection() as conn:
                # no parameters: None, not (): psycopg reads every % as a placeholder
                # whenever it is given parameters, even none, so LIKE 'a%' would fail
                cur = conn.execute(sql, params or None)
                return cur.fetchall() if cur.description else []
        except TooManyRequests as exc:
            raise PoolExhausted(
                f"{self.pool.max_waiting} requests are already waiting: rejected") from exc
        except PoolTimeout as exc:
            raise PoolExhausted(
                f"no connection free within {self.pool.timeout} s "
                f"(pool of {self.max_connections})") from exc

    def close(self) -> None:
        self.pool.close()
