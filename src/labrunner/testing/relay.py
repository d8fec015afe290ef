"""A TCP relay a test puts between the learner's client and a real server, to watch or steer
the bytes on the wire: count them, hold a command until the test is ready, act between two
commands, answer in the server's place.

:class:`TcpRelay` listens on ``127.0.0.1:<free port>`` and forwards every connection to its
target, each direction pumped by a thread of its own. A verification subclasses it and
overrides :meth:`TcpRelay.upward` (client -> server) or :meth:`TcpRelay.downward`
(server -> client): each gets every chunk as it arrives, with the :class:`RelayLink` it came
on, and decides what to send where (the default passes it on). A hook that returns False
ends the link: both of its sockets are shut at once, the way a server going away does it.

When one side ends its direction, the relay ends the same direction on the other side only
(a half-close), so "the client finished sending" reaches the server as it would directly.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any


@dataclass
class RelayLink:
    """One relayed connection: the client's socket, the one to the target, the order it was
    accepted in, and room for what a hook keeps about it (a parse buffer, counters)."""

    index: int
    client: socket.socket
    upstream: socket.socket
    state: dict[str, Any] = field(default_factory=dict)
    ends: int = 0   # directions finished: 2 when the connection is gone both ways


class TcpRelay:
    """127.0.0.1:<free port> forwarding every connection to ``target`` (host, port).
    ``link_class`` may be a subclass of :class:`RelayLink` with fields of a test's own."""

    link_class: type[RelayLink] = RelayLink

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.links: list[RelayLink] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    # ---- hooks -------------------------------------------------------------------------

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        """A chunk the client sent: pass it to the server (override to watch or steer)."""
        link.upstream.sendall(chunk)
        return None

    def downward(self, link: RelayLink, chunk: bytes) -> bool | None:
        """A chunk the server sent: pass it to the client (override to watch or steer)."""
        link.client.sendall(chunk)
        return None

    # ---- the relay ---------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return   # closed
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()   # the server is gone: so is this connection
                continue
            with self.lock:
                link = self.link_class(len(self.links), client, upstream)
                self.links.append(link)
            for up in (True, False):
                threading.Thread(target=self._pump, args=(link, up), daemon=True,
                                 name=f"relay-{link.index}-{'up' if up else 'down'}").start()

    def _pump(self, link: RelayLink, up: bool) -> None:
        source, sink = (link.client, link.upstream) if up else (link.upstream, link.client)
        hook = self.upward if up else self.downward
        ended = False
        try:
            while chunk := source.recv(65536):
                if hook(link, chunk) is False:
                    ended = True
                    break
        except OSError:
            pass
        finally:
            shut = ((sink, socket.SHUT_RDWR), (source, socket.SHUT_RDWR)) if ended else (
                (sink, socket.SHUT_WR), (source, socket.SHUT_RD))
            for sock, how in shut:
                try:
                    sock.shutdown(how)
                except OSError:
                    pass
            with self.lock:
                link.ends += 1

    def wait_closed(self, timeout: float) -> bool:
        """Whether every connection relayed so far ended both ways within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(link.ends == 2 for link in self.links):
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        try:   # wakes the accept() thread (Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self.lock:
            links = list(self.links)
        for link in links:
            link.client.close()
            link.upstream.close()

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
