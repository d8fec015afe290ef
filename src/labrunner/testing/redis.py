"""Redis: the commands executed in the test's own database, read with MONITOR."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Literal, overload

import pytest

if TYPE_CHECKING:
    from ..services.kinds.redis import RedisDB

_MONITOR_LINE = re.compile(r"^(\S+) \[(\d+) (\S*)\] (.*)$")
_MONITOR_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
# What a new connection sends before its first command: not the learner's commands.
CONNECTION_SETUP = frozenset({"SELECT", "HELLO", "AUTH", "CLIENT", "PING"})


@overload
def redis_commands(redis_db: RedisDB | Any, *, with_source: Literal[False] = False
                   ) -> AbstractContextManager[list[list[str]]]: ...


@overload
def redis_commands(redis_db: RedisDB | Any, *, with_source: Literal[True]
                   ) -> AbstractContextManager[list[tuple[str, list[str]]]]: ...


def redis_commands(redis_db: RedisDB | Any, *, with_source: bool = False
                   ) -> AbstractContextManager[list[Any]]:
    """Record the commands executed in ``redis_db``'s database while the block runs.

    Yields a list filled as commands arrive; each is ``[NAME, arg, ...]`` with the name in
    upper case, or with ``with_source=True`` a ``(source, [NAME, arg, ...])`` pair whose
    source is ``"lua"`` for a command a script ran, else the client's address. A new
    connection's setup chatter (SELECT, HELLO, AUTH, CLIENT, PING) is left out.

    MONITOR streams every command the server executes, in order, each line naming its
    database; a marker command the test sends after the block tells the reader it has seen
    everything up to there, so the list is complete when the block has ended."""
    return _monitor(redis_db, lambda at, source, command: (
        (source, command) if with_source else command))


def timed_redis_commands(redis_db: RedisDB | Any
                         ) -> AbstractContextManager[list[tuple[float, list[str]]]]:
    """:func:`redis_commands` with the time each command ran, by the server's clock (Unix
    seconds, to the microsecond): ``(at, [NAME, arg, ...])``. The list fills as commands
    arrive (a test may poll it inside the block) and is complete when the block has ended.
    For the cadence of what a process writes (heartbeats against a TTL, ph6.5), measured
    where the TTL runs, so a test that is itself slow to look does not skew it."""
    return _monitor(redis_db, lambda at, source, command: (at, command))


@contextmanager
def _monitor(redis_db: Any, shape: Callable[[float, str, list[str]], Any]
             ) -> Iterator[list[Any]]:
    commands: list[Any] = []
    marker = f"labrunner-end-{uuid.uuid4().hex}"
    # MONITOR is the admin's (the lab's own user may not run it: it sees every database).
    opener = getattr(redis_db, "admin_client", None) or redis_db.client
    watcher = opener(socket_timeout=15)
    conn = watcher.connection_pool.get_connection()
    conn.send_command("MONITOR")
    if conn.read_response() not in (b"OK", "OK"):
        pytest.fail("MONITOR was refused by the Redis server", pytrace=False)

    def read() -> None:
        while True:
            raw = conn.read_response()
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            match = _MONITOR_LINE.match(line)
            if not match or int(match.group(2)) != redis_db.db:
                continue
            args = [a.replace('\\"', '"') for a in _MONITOR_ARG.findall(match.group(4))]
            if args and args[-1] == marker:
                return
            if args and args[0].upper() not in CONNECTION_SETUP:
                command = [args[0].upper(), *args[1:]]
                commands.append(shape(float(match.group(1)), match.group(3), command))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield commands
    finally:
        client = redis_db.client()
        client.echo(marker)
        client.close()
        reader.join(15)
        conn.disconnect()
        watcher.close()
