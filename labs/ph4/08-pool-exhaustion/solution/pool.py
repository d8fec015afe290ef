"""A bounded connection pool for Postgres: validation on borrow, and a policy for when every
connection is busy - queue (wait up to a timeout) or reject at once."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import psycopg


class PoolExhausted(Exception):
    """No connection could be had: the caller should shed load (e.g. answer 503)."""


class PoolClosed(PoolExhausted):
    """The pool is closed: no connection will ever be had from it (as psycopg_pool's
    PoolClosed). A PoolExhausted too, so a caller shedding load on that sheds it here."""


class Lease:
    """What acquire() hands out: one borrower's hold on a pooled connection. It forwards to
    the connection until it is given back, then refuses (as HikariCP's ProxyConnection does
    after close()). The pool knows a release by its lease, not by the connection, which it
    lends again: a stale second release() - or query - from an earlier borrower never
    reaches the next borrower's session."""

    __slots__ = ("_conn", "_live")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn, self._live = conn, True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):   # the object's own protocol (copy, pickle, proxies)
            raise AttributeError(name)
        if not self._live:
            raise psycopg.InterfaceError("this connection was given back to the pool")
        return getattr(self._conn, name)

    @property
    def closed(self) -> bool:
        return not self._live or self._conn.closed

    def _give_back(self) -> psycopg.Connection[Any]:
        self._live = False
        return self._conn


class Pool:
    def __init__(self, dsn: str, size: int, *, policy: str = "queue",
                 acquire_timeout: float = 5.0) -> None:
        if policy not in ("queue", "reject"):
            raise ValueError(f"unknown policy {policy!r}")
        self.dsn, self.size, self.policy, self.acquire_timeout = dsn, size, policy, acquire_timeout
        self._idle: deque[psycopg.Connection[Any]] = deque()
        self._open = 0                      # connections that exist: idle + in use
        self._waiting = 0
        self._lent: set[Lease] = set()      # leases handed out, not given back yet
        self._closed = False
        self._cond = threading.Condition()

    def _healthy(self, conn: psycopg.Connection[Any]) -> bool:
        """Validation on borrow: a backend killed on the server side is only noticed by
        talking to it, so ask it something cheap."""
        if conn.closed:
            return False
        try:
            conn.execute("SELECT 1")
            conn.rollback()
            return True
        except psycopg.Error:
            return False

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.acquire_timeout
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed("the pool is closed")
                if self._idle:
                    conn = self._idle.popleft()
                    break
                if self._open < self.size:
                    self._open += 1         # reserve the slot, connect outside the lock
                    conn = None
                    break
                if self.policy == "reject":
                    raise PoolExhausted(f"all {self.size} connections are in use")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolExhausted(f"no connection free within {self.acquire_timeout} s")
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
        if conn is not None and self._healthy(conn):
            return self._lend(conn)
        if conn is not None:                # dead: replace it in the same slot
            try:
                conn.close()
            except psycopg.Error:
                pass
        try:
            return self._lend(psycopg.connect(self.dsn))
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _lend(self, conn: psycopg.Connection[Any]) -> Lease:
        lease = Lease(conn)                 # a new one each time: it, not conn, is the owner
        with self._cond:
            self._lent.add(lease)
        return lease

    def release(self, lease: Lease) -> None:
        with self._cond:
            # Given back twice (even once the connection is lent again, to another borrower),
            # or never lent by this pool (another pool's): pooling it would hand one
            # connection to two borrowers. Refused as psycopg_pool's putconn does.
            if lease not in self._lent:
                raise ValueError("release(): this connection is not lent out by this pool "
                                 "(given back already, or from elsewhere)")
            self._lent.remove(lease)
        conn = lease._give_back()           # the lease is dead from here: only the pool has conn
        try:
            if not conn.closed:
                conn.rollback()             # never hand out a connection mid-transaction
        except psycopg.Error:
            conn.close()
        with self._cond:
            keep = not conn.closed and not self._closed
            if keep:
                self._idle.append(conn)
            else:
                self._open -= 1             # its slot is free: a waiter may open a new one
            self._cond.notify()
        if not keep:
            conn.close()                    # given back after close(): closed, not pooled

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
        with self._cond:
            return {"size": self.size, "open": self._open, "idle": len(self._idle),
                    "in_use": self._open - len(self._idle), "waiting": self._waiting}

    def close(self) -> None:
        """Close the pool the way psycopg_pool's close() does (HikariCP's too): idle
        connections now, borrowed ones when they are given back (evicted on return);
        borrowers waiting now are woken with PoolClosed, not left to their timeout, and
        every later acquire() raises it at once."""
        with self._cond:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:                   # network I/O outside the lock
            conn.close()
