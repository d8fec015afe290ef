# WRONG (no_pool): a new connection per query
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

import psycopg


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
        self.dsn = dsn

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def close(self) -> None:
        pass
