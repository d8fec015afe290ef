"""Runs where the learner's code runs (in its process when grading): makes connection setup
take long enough to see. On loopback a TCP connect() takes microseconds, so a clock started
after it would look the same as one started before; while slow_connects() is on, every
connect() the process makes to a port other than the test's own waits `delay` seconds first,
and the moment each began is noted. A measurement that starts its clock before connecting
includes that wait; one that starts it after does not.

Only connections made through Python's socket module are slowed (http.client, urllib, a
relay of the learner's): grpc opens its connections in its own C core.

It also tells, while a measurement against a server that is down runs, when the relay has
dealt with its refused connect upstream and left the client's connection open (read from
/proc/net/tcp): the test then fails at once instead of waiting out its deadline."""

from __future__ import annotations

import _socket
import socket
import threading
import time
from typing import Any

_lock = threading.Lock()
_started: list[float] = []
_listening: list[tuple[str, int]] = []
_in_accept: set[int] = set()   # threads blocked in accept() now
_last_accepted: dict[int, int] = {}   # thread -> peer port of the connection it accepted last
_refused: list[tuple[int, int | None]] = []   # (thread, that peer port) per refused connect
_original_accept = socket.socket.accept


def slow_connects(delay: float, exempt_ports: list[int]) -> None:
    """From now on, a connect() to any TCP port but `exempt_ports` (the test's proxy and
    server: the learner's relay forwarding to the proxy is not slowed) first notes the time
    (time.perf_counter) and sleeps `delay` seconds."""
    exempt = frozenset(int(port) for port in exempt_ports)
    with _lock:
        _started.clear()

    def slowed(address: Any) -> None:
        if isinstance(address, tuple) and len(address) >= 2 and address[1] not in exempt:
            with _lock:
                _started.append(time.perf_counter())
            time.sleep(delay)

    def connect(sock: socket.socket, address: Any) -> None:
        slowed(address)
        _socket.socket.connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        slowed(address)
        return _socket.socket.connect_ex(sock, address)

    socket.socket.connect = connect  # type: ignore[method-assign, assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign, assignment]


def normal_connects() -> list[float]:
    """Undo slow_connects(); return when each slowed connect() began (time.perf_counter:
    CLOCK_MONOTONIC, the same clock in every process of the machine)."""
    for name in ("connect", "connect_ex"):
        if name in socket.socket.__dict__:
            delattr(socket.socket, name)
    with _lock:
        return list(_started)


def note_listeners() -> None:
    """From now on, note the address of every TCP socket the process starts listening on
    (socket.create_server, sock.listen(): a relay of the learner's)."""
    with _lock:
        _listening.clear()

    def listen(sock: socket.socket, *args: Any) -> None:
        _socket.socket.listen(sock, *args)
        name = sock.getsockname()
        if isinstance(name, tuple) and len(name) >= 2:
            with _lock:
                _listening.append((str(name[0]), int(name[1])))

    socket.socket.listen = listen  # type: ignore[method-assign, assignment]


def noted_listeners() -> list[tuple[str, int]]:
    """Stop noting; return the addresses noted since note_listeners()."""
    if "listen" in socket.socket.__dict__:
        delattr(socket.socket, "listen")
    with _lock:
        return list(_listening)


def watch_refused_connects() -> None:
    """From now on, note each connect() that is refused (ConnectionRefusedError), with the
    thread that made it and the connection that thread accepted last (a relay's acceptor
    connecting upstream for the client it just accepted), and which threads wait in
    accept(). Undo with unwatch_refused_connects()."""
    with _lock:
        _in_accept.clear()
        _last_accepted.clear()
        _refused.clear()

    def accept(sock: socket.socket) -> tuple[socket.socket, Any]:
        me = threading.get_ident()
        with _lock:
            _in_accept.add(me)
        try:
            conn, peer = _original_accept(sock)
        finally:
            with _lock:
                _in_accept.discard(me)
        if isinstance(peer, tuple) and len(peer) >= 2:
            with _lock:
                _last_accepted[me] = int(peer[1])
        return conn, peer

    def connect(sock: socket.socket, address: Any) -> None:
        try:
            _socket.socket.connect(sock, address)
        except ConnectionRefusedError:
            me = threading.get_ident()
            with _lock:
                _refused.append((me, _last_accepted.get(me)))
            raise

    socket.socket.accept = accept  # type: ignore[method-assign, assignment]
    socket.socket.connect = connect  # type: ignore[method-assign, assignment]


def unwatch_refused_connects() -> None:
    """Undo watch_refused_connects()."""
    if "connect" in socket.socket.__dict__:
        delattr(socket.socket, "connect")
    socket.socket.accept = _original_accept  # type: ignore[method-assign]


# TCP states in /proc/net/tcp of a socket not yet closed on its own side: ESTABLISHED, and
# CLOSE_WAIT (the peer closed, this side did not).
_OPEN_STATES = {"01": "ESTABLISHED", "08": "CLOSE_WAIT"}


def _open_connections(local_ports: set[int]) -> dict[tuple[int, int], str]:
    """(local port, peer port) -> state, of the open TCP connections on `local_ports`."""
    found: dict[tuple[int, int], str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                lines = rows.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] not in _OPEN_STATES:
                continue
            local = int(fields[1].rsplit(":", 1)[1], 16)
            peer = int(fields[2].rsplit(":", 1)[1], 16)
            if local in local_ports:
                found[(local, peer)] = _OPEN_STATES[fields[3]]
    return found


def refused_connection_left_open() -> str | None:
    """Whether a relay's connect upstream was refused and the relay moved on - the thread
    that made it is back in accept() or has ended - while the connection that thread had
    accepted (the client's, on a port noted by note_listeners) is still open on the
    relay's side: the client then waits on it for an answer that cannot come. None while
    that cannot be told yet (no refusal, or the thread still busy with it)."""
    with _lock:
        refused = list(_refused)
        waiting = set(_in_accept)
        ports = {port for _host, port in _listening}
    alive = {t.ident for t in threading.enumerate()}
    for thread, peer in refused:
        if peer is None or (thread in alive and thread not in waiting):
            continue
        state = _open_connections(ports)
        for (local, remote), how in state.items():
            if remote == peer:
                moved_on = ("went back to accept()" if thread in alive
                            else "ended (an exception it did not catch?)")
                return (f"the relay's connect() to the server was refused, and the thread "
                        f"that made it {moved_on}, while the client's connection it had "
                        f"accepted (relay port {local} <- client port {remote}) is still "
                        f"{how} on the relay's side")
    return None
