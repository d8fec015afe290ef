"""Runs where the learner's code runs (in its process when grading): makes connection setup
take long enough to see. On loopback a TCP connect() takes microseconds, so a clock started
after it would look the same as one started before; while slow_connects() is on, every
connect() the process makes to a port other than the test's own waits `delay` seconds first,
and the moment each began is noted. A measurement that starts its clock before connecting
includes that wait; one that starts it after does not.

Only connections made through Python's socket module are slowed (http.client, urllib, a
relay of the learner's): grpc opens its connections in its own C core.

It can also hold a relay's pump at the moment it writes a value it shares with the other
pumps (hold_shared_writes): a thread switch can come between reading a count and writing it
back, and held there, a count updated without a lock loses what another pump added meanwhile.

It also tells, while a measurement against a server that is down runs, when the relay has
dealt with its refused connect upstream and left the client's connection open (read from
/proc/net/tcp): the test then fails at once instead of waiting out its deadline."""

from __future__ import annotations

import _socket
import dis
import socket
import threading
import time
from types import FrameType
from typing import Any

from labrunner.thread_deaths import thread_deaths, unwatch_thread_deaths, watch_thread_deaths

__all__ = ["arm_shared_writes", "hold_shared_writes", "normal_connects", "note_listeners",
           "noted_listeners", "refused_and_moved_on", "released_shared_writes",
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


def noted_listeners(stop: bool = True) -> list[tuple[str, int]]:
    """The addresses noted since note_listeners(); noting ends there unless ``stop`` is
    False (a look while the measurement still runs)."""
    if stop and "listen" in socket.socket.__dict__:
        delattr(socket.socket, "listen")
    with _lock:
        return list(_listening)


# ---- a pump held at its write of shared state -----------------------------------------

# A write of a value other threads can see: an attribute, an item, a global, a nonlocal.
_SHARED_WRITES = {dis.opmap[name] for name in
                  ("STORE_ATTR", "STORE_SUBSCR", "STORE_GLOBAL", "STORE_DEREF")}
_pumping = threading.local()   # .yes: this thread has received bytes (a relay's pump)
_writes: dict[str, Any] = {}
_original_recv = socket.socket.recv
_original_recv_into = socket.socket.recv_into


def hold_shared_writes(filename: str, wait: float) -> None:
    """From now on, in threads started from now on, watch the code of `filename`. Once
    arm_shared_writes() is called, the first time a thread that has received bytes (a
    relay's pump) is about to write a shared value (an attribute, an item, a global or a
    nonlocal) at a place of the code, it waits there - its new value already computed from
    what it read - until another such thread has written one, or `wait` seconds. That is a
    thread switch between read and write, made certain: a count updated under a lock keeps
    the other pump out (it waits on the lock) and loses nothing; one updated without a lock
    loses what the other pump added meanwhile. Undo with released_shared_writes()."""
    with _lock:
        _writes.clear()
        _writes.update(armed=False, holder=None, other=None, sites=set(), after=set(),
                       held=0, overtaken=0)

    def recv(sock: socket.socket, *args: Any) -> bytes:
        data = _original_recv(sock, *args)
        if data:
            _pumping.yes = True
        return data

    def recv_into(sock: socket.socket, *args: Any) -> int:
        size = _original_recv_into(sock, *args)
        if size:
            _pumping.yes = True
        return size

    def local_trace(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            me = threading.get_ident()
            if me in _writes["after"]:   # this thread's write is done: the held one may go
                with _lock:
                    _writes["after"].discard(me)
                    if _writes["other"] is not None:
                        _writes["other"].set()
            if frame.f_code.co_code[frame.f_lasti] in _SHARED_WRITES and getattr(
                    _pumping, "yes", False):
                _shared_write(frame, wait)
        return local_trace

    def global_trace(frame: FrameType, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.endswith(filename):
            return None
        frame.f_trace_opcodes = True
        return local_trace

    socket.socket.recv = recv  # type: ignore[method-assign, assignment]
    socket.socket.recv_into = recv_into  # type: ignore[method-assign, assignment]
    threading.settrace(global_trace)


def _shared_write(frame: FrameType, wait: float) -> None:
    me = threading.get_ident()
    site = (frame.f_code, frame.f_lasti)
    with _lock:
        if not _writes["armed"]:
            return
        if _writes["holder"] is not None:
            if _writes["holder"] != me:   # another pump writes while one is held
                _writes["after"].add(me)
                _writes["overtaken"] += 1
            return
        if site in _writes["sites"]:
            return
        _writes["sites"].add(site)
        _writes["holder"] = me
        _writes["held"] += 1
        other = _writes["other"] = threading.Event()
    other.wait(wait)
    with _lock:
        _writes["holder"] = None
        _writes["other"] = None


def arm_shared_writes(armed: bool = True) -> None:
    """Start holding (see hold_shared_writes), or stop: a pump held now goes on."""
    with _lock:
        _writes["armed"] = armed
        other = _writes.get("other")
        if not armed and other is not None:
            other.set()


def released_shared_writes() -> dict[str, int]:
    """Undo hold_shared_writes(); return how many writes were held and how many writes of
    other threads came while one was held."""
    threading.settrace(None)
    for name in ("recv", "recv_into"):
        if name in socket.socket.__dict__:
            delattr(socket.socket, name)
    with _lock:
        _writes["armed"] = False
        other = _writes.get("other")
        if other is not None:
            other.set()
        return {"held": int(_writes.get("held", 0)), "overtaken": int(_writes.get("overtaken", 0))}


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
