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
import urllib.parse
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self


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

    def url_for(self, url: str) -> str:
        """``url`` (``redis://user:pw@host:port/0``...) pointed at this relay, the rest kept."""
        parts = urllib.parse.urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@{self.address}" if userinfo else self.address
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    # ---- hooks -------------------------------------------------------------------------

    def admit(self, client: socket.socket) -> bool:
        """A client connected: relay it (True, the default), or not (False: the hook keeps
        or closes ``client`` itself - a dependency that is down, or one that hangs)."""
        return True

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
            if not self.admit(client):
                continue
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

    def cut(self) -> None:
        """Break every connection relayed so far, both ways, as an outage does."""
        with self.lock:
            links = list(self.links)
        for link in links:
            self.shut(link.client)
            self.shut(link.upstream)

    @staticmethod
    def shut(sock: socket.socket) -> None:
        """End ``sock`` both ways and close it (a peer blocked on it wakes up)."""
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def close(self) -> None:
        try:   # wakes the accept() thread (Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self.cut()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


class Outage(TcpRelay):
    """A relay the test takes down and brings back: :meth:`go_down` cuts every connection
    relayed so far and closes each new one as soon as it is accepted (the server gone, as
    the client sees it mid-run); :meth:`come_back` relays new connections again."""

    down = False

    def admit(self, client: socket.socket) -> bool:
        if self.down:
            self.shut(client)
            return False
        return True

    def go_down(self) -> None:
        self.down = True
        self.cut()

    def come_back(self) -> None:
        self.down = False
