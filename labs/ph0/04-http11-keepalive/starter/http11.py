"""A socket-level HTTP/1.1 server connection: framing, keep-alive, pipelining.

Implement handle_connection() with the socket module only (no http.server).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    method: str
    target: str               # e.g. "/users/1?full=yes"
    version: str              # "HTTP/1.1" or "HTTP/1.0"
    headers: dict[str, str]   # names lower-cased
    body: bytes


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


Handler = Callable[[Request], Response]


def handle_connection(conn: socket.socket, handler: Handler) -> None:
    """Serve requests on one connection, one after another and in order, until the
    client closes it or asks to close it."""
    # TODO 1: buffer recv() data; cut out the head (up to b"\r\n\r\n") and then exactly
    #         Content-Length bytes of body; keep the rest for the next request.
    # TODO 2: call handler(request) and send "HTTP/1.1 <status> <reason>", the headers,
    #         Content-Length, a blank line and the body (no body for a HEAD request).
    # TODO 3: loop for the next request (keep-alive); stop after "Connection: close",
    #         when the client closes, or after answering a malformed request with 400.
    raise NotImplementedError("handle_connection: parse requests from the socket and "
                              "answer them in order on the same connection")
