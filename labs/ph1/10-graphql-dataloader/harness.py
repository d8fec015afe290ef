"""Runs where the learner's code runs (in its process when grading): keeps a reference to
every psycopg.AsyncConnection the process opens while hold_connections() is on.

CPython closes a connection the moment its last reference goes (its __del__ finalizes
libpq), so a request that never closes its connection looks tidy on the wire - until
something else holds it: a reference cycle (an exception's traceback keeps the resolver's
frames, and through them the request's context), a cache, a list of "open connections".
Holding each one here makes that happen every time: only an explicit close (`async with`,
`close()`) ends a connection, and the test sees on the wire which ones stayed open."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

_lock = threading.Lock()
_held: list[Any] = []
_original: Any = None


def hold_connections() -> None:
    """From now on, psycopg.AsyncConnection.connect() keeps the connection it returns."""
    global _original
    with _lock:
        if _original is not None:
            return
        _original = psycopg.AsyncConnection.__dict__["connect"]
        inner = _original.__func__

        async def connect(cls: Any, *args: Any, **kwargs: Any) -> Any:
            conn = await inner(cls, *args, **kwargs)
            with _lock:
                _held.append(conn)
            return conn

        psycopg.AsyncConnection.connect = classmethod(connect)  # type: ignore[method-assign,assignment]  # the lab's own hook, undone by release_connections()


def open_held() -> int:
    """How many of the connections held are still open: none of them closes any more unless
    the learner's code closes it, so a count past what a pool keeps is final."""
    with _lock:
        return sum(1 for conn in _held if not conn.closed)


def release_connections() -> int:
    """connect() as it was; the connections held are let go. Returns how many were held."""
    global _original
    with _lock:
        if _original is not None:
            psycopg.AsyncConnection.connect = _original  # type: ignore[method-assign]  # the original classmethod back
            _original = None
        held = len(_held)
        _held.clear()
    return held
