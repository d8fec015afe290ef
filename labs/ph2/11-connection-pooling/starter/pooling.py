"""A Postgres connection pool sized by Little's Law, with an acquire timeout and a bounded
wait queue (backpressure). See README.md.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests  # noqa: F401


class PoolExhausted(Exception):
    """No connection could be had: none became free in time, or the wait queue is full."""


def pool_size(arrival_rate_per_s: float, avg_latency_s: float) -> int:
    raise NotImplementedError("pool_size: Little's Law, L = arrival rate x latency")


class Database:
    def __init__(self, dsn: str, arrival_rate_per_s: float, avg_latency_s: float,
                 acquire_timeout_s: float, max_waiting: int = 0) -> None:
        raise NotImplementedError("Database: create a psycopg_pool.ConnectionPool")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError("Database.query: run sql on a pooled connection")

    def close(self) -> None:
        pass
