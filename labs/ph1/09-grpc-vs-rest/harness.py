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

from labrunner.thread_deaths import thread_deaths, unwatch_thread_deaths, watch_thread_deaths

__all__ = ["normal_connects", "note_listeners", "noted_listeners", "refused_and_moved_on",
           "slow_connects", "thread_deaths", "unwatch_thread_deaths",
           "unwatch_refused_connects", "watch_refused_connects", "watch_thread_deaths"]

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


def refused_and_moved_on() -> tuple[list[tuple[int, str]], list[int]]:
    """The relay's connects upstream that were refused, whose thread then moved on - it is
    back in accept() or has ended - each as (the client port of the connection that thread
    had accepted, how it moved on); and the ports the relay listens on (note_listeners).
    Whether those client connections are still open the test reads in /proc/net/tcp: one
    still open there is a client waiting for an answer that cannot come."""
    with _lock:
        refused = list(_refused)
        waiting = set(_in_accept)
        ports = sorted({port for _host, port in _listening})
    alive = {t.ident for t in threading.enumerate()}
    moved_on = [(peer, "went back to accept()" if thread in alive
                 else "ended (an exception it did not catch?)")
                for thread, peer in refused
                if peer is not None and not (thread in alive and thread not in waiting)]
    return moved_on, ports
