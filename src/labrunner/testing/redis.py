"""Redis: the commands executed in the test's own database, read with MONITOR; and a gate
in front of the server that acts at an exact command of a learner's client."""

from __future__ import annotations

import re
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Literal, overload

import pytest

from .relay import RelayLink, TcpRelay

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


def resp_command(buf: bytes) -> tuple[list[bytes], int] | None:
    """One RESP command (an array of bulk strings) from the start of ``buf`` and the bytes it
    took, or None while it is incomplete (or ``buf`` holds no array: an inline command)."""
    if not buf.startswith(b"*"):
        return None
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    count, pos, parts = int(buf[1:end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0 or buf[pos:pos + 1] != b"$":
            return None
        size = int(buf[pos + 1:end])
        if len(buf) < end + 2 + size + 2:
            return None
        parts.append(buf[end + 2:end + 2 + size])
        pos = end + 2 + size + 2
    return parts, pos


def resp_encode(command: list[bytes]) -> bytes:
    """``command`` (``[NAME, arg, ...]``) as the RESP array a client sends."""
    return b"*%d\r\n" % len(command) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in command)


# What a gate's ``before`` returns to change a command on its way: the command the server
# gets instead (None: the client's own).
Before = Callable[[list[bytes]], "list[bytes] | None"]


class RedisGate(TcpRelay):
    """A :class:`TcpRelay` in front of Redis that calls ``before(command)`` (``[NAME, arg,
    ...]`` as bytes) for each command a client sends, before passing it on. ``before`` runs
    on the connection's own relay thread: it may act (write a key, kill a process) or block
    until the test lets the command through - commands sent on the client's other
    connections go on meanwhile.

    ``before`` may also return another command for the server to run in its place: the
    server's answer to that one reaches the client, in order with every other answer (a
    pipeline stays a pipeline). An ``EVALSHA`` of a digest the server never loaded is how a
    test makes one client meet a flushed script cache, and no one else."""

    def __init__(self, target: tuple[str, int], before: Before) -> None:
        super().__init__(target)
        self._before = before

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        buf = link.state.get("buf", b"") + chunk
        while (got := resp_command(buf)) is not None:
            command, used = got
            instead = self._before(command)
            link.upstream.sendall(buf[:used] if instead is None else resp_encode(instead))
            buf = buf[used:]
        if buf and not buf.startswith(b"*"):  # inline command: pass it on
            link.upstream.sendall(buf)
            buf = b""
        link.state["buf"] = buf
        return None


@contextmanager
def redis_gate(url: str, before: Before) -> Iterator[str]:
    """A :class:`RedisGate` in front of the server ``url`` names, running ``before(command)``
    before each command a client sends through it - so a test acts at an exact point of the
    learner's sequence (between its GET and its SET), or sends the server another command in
    its place. Yields ``url`` pointed at the gate (the learner's to use; the test's own
    clients keep ``url``)."""
    parts = urllib.parse.urlsplit(url)
    with RedisGate((parts.hostname or "127.0.0.1", parts.port or 6379), before) as gate:
        yield gate.url_for(url)


def assert_decoded(label: str, value: Any) -> None:
    """Every name, job and field ``value`` holds (lists, tuples, dicts walked) is text:
    bytes (a client made without ``decode_responses=True``) or ``str()`` of bytes
    ("b'job-1'") fails, naming the call (``label``) and how to connect."""
    stack: list[Any] = [value]
    undecoded: Any = None
    while stack and undecoded is None:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.items())
        elif isinstance(item, (bytes, bytearray)) or (
                isinstance(item, str) and len(item) > 2 and item[:2] in ("b'", 'b"')):
            undecoded = item
    assert undecoded is None, (
        f"{label} returned {undecoded!r}, "
        f"{'bytes' if not isinstance(undecoded, str) else 'the text of a bytes object'}"
        ", where text was expected - redis-py hands back bytes unless the client is made with "
        "decode_responses=True, and str() of bytes is \"b'...'\", not the decoded text. "
        "Connect with redis.Redis.from_url(url, decode_responses=True) (or .decode() each "
        "reply)")
