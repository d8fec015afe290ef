"""A socket-level HTTP/1.1 server connection: framing, keep-alive, pipelining.

HTTP/1.1 is a text protocol on a byte stream. A request is a head (request line and
headers, ended by an empty line) and a body of exactly Content-Length bytes; nothing
else marks where it ends. The connection stays open for the next request (keep-alive)
unless either side says ``Connection: close``. A client may send several requests
without waiting (pipelining), and because responses carry no request id they must come
back in the same order: one slow response holds up every response behind it. That is
head-of-line blocking, and the reason HTTP/2 multiplexes streams instead.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

# A request head larger than this is refused, not buffered for ever: a client that never
# ends its head (no blank line, or one endless line) would grow the buffer without bound.
# 431 Request Header Fields Too Large (RFC 6585 5), as Node and Go answer; 414 URI Too Long
# while still in the request line (RFC 9112 3, as nginx answers).
MAX_HEAD = 64 * 1024
CHUNK = 65536


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


class BadRequest(Exception):
    """The bytes on the wire are not an HTTP/1.1 request we can frame."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Reader:
    """One connection's receive buffer: requests are cut out of it one at a time, and
    whatever follows a request (the next pipelined one) stays for the next call."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray()

    def _fill(self) -> bool:
        chunk = self.conn.recv(CHUNK)
        self.buffer += chunk
        return bool(chunk)

    def next_request(self) -> Request | None:
        """The next request, or None when the client closed between requests."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > MAX_HEAD:  # the whole head, not each line: many lines add up
                raise _head_too_large(self.buffer)
            if not self._fill():
                if self.buffer.strip():
                    raise BadRequest("connection closed in the middle of a request head")
                return None
        # Its end arrived in the same recv() as the bytes past the limit. The head counts
        # every byte the server buffers for it, CRLFs and the blank line included (as the
        # limit counted while it was incomplete): at most MAX_HEAD, however it arrives.
        if end + 4 > MAX_HEAD:
            raise _head_too_large(self.buffer)
        head = bytes(self.buffer[:end]).decode("iso-8859-1")
        del self.buffer[:end + 4]
        request = _parse_head(head)
        length = _content_length(request.headers)
        while len(self.buffer) < length:
            if not self._fill():
                raise BadRequest("connection closed in the middle of a request body")
        request.body = bytes(self.buffer[:length])
        del self.buffer[:length]  # what remains is the next pipelined request
        return request


def _head_too_large(buffer: bytearray) -> BadRequest:
    if b"\r\n" not in buffer[:MAX_HEAD]:
        return BadRequest("request line too long", 414)
    return BadRequest(f"request head longer than {MAX_HEAD} bytes", 431)


def _parse_head(head: str) -> Request:
    request_line, *header_lines = head.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"malformed request line {request_line!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            # "Content-Length : 5" is refused, never stripped (RFC 9112 5.1): a proxy that
            # reads "Content-Length " as another header would frame the body differently.
            raise BadRequest(f"malformed header line {line!r}")
        name, value = name.lower(), value.strip()
        # A repeated field is one comma-separated list (RFC 9110 5.3): two Content-Length
        # lines then read "5, 0", which the digit check below refuses.
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Request(parts[0], parts[1], parts[2], headers, b"")


def _content_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:  # chunked bodies are out of scope: refuse clearly
        raise BadRequest("Transfer-Encoding is not supported, send Content-Length")
    value = headers.get("content-length", "0")
    if not (value.isascii() and value.isdigit()):  # 1*DIGIT: no sign, no "1_0", no "²"
        raise BadRequest(f"bad Content-Length {value!r}")
    return int(value)


def _keep_alive(request: Request) -> bool:
    # Connection is a comma-separated list of tokens (RFC 9110 7.6.1), case-insensitive,
    # and may come in several lines (joined into one list above): "TE, close" closes.
    tokens = {token.strip().lower() for token in request.headers.get("connection", "").split(",")}
    if "close" in tokens:
        return False
    if request.version == "HTTP/1.0":
        return "keep-alive" in tokens  # 1.0 closes by default
    return True                        # 1.1 keeps the connection by default


def serialize(response: Response, close: bool, to_head: bool = False) -> bytes:
    """Status line, headers with Content-Length (the client's only way to find the end
    of the body on a kept-alive connection), blank line, body. A response to HEAD
    (``to_head``) is the head alone, with the GET's Content-Length and no content (RFC 9110
    9.3.2, RFC 9112 6.3): the client reads no body after a HEAD, so one sent anyway would be
    the start of the next response to it."""
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    headers = {k: v for k, v in response.headers.items()
               if k.lower() not in ("content-length", "connection")}
    # 1xx, 204 and 304 end at the blank line whatever their headers say (RFC 9112 6.3): no
    # content, and no Content-Length for 1xx and 204 (RFC 9110 8.6); a body written anyway
    # is read as the start of the next response.
    no_content = response.status // 100 == 1 or response.status in (204, 304)
    if not no_content:
        headers["Content-Length"] = str(len(response.body))
    if close:
        headers["Connection"] = "close"
    head = f"HTTP/1.1 {response.status} {reason}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + "\r\n").encode("iso-8859-1") + (
        b"" if no_content or to_head else response.body)


def handle_connection(conn: socket.socket, handler: Handler) -> None:
    """Serve requests on one connection, one after another and in order, until the
    client closes it or asks to close it."""
    reader = _Reader(conn)
    with conn:
        try:
            while True:
                try:
                    request = reader.next_request()
                except BadRequest as exc:
                    # After a framing error we cannot know where the next request starts.
                    conn.sendall(serialize(Response(exc.status, {"Content-Type": "text/plain"},
                                                    f"{exc}\n".encode()), close=True))
                    return
                if request is None:
                    return  # the client closed the connection between requests
                close = not _keep_alive(request)
                try:
                    response = handler(request)
                except Exception:  # noqa: BLE001 - a handler bug must not kill the connection
                    response = Response(500, {"Content-Type": "text/plain"}, b"error\n")
                conn.sendall(serialize(response, close, to_head=request.method == "HEAD"))
                if close:
                    return
        except (ConnectionResetError, BrokenPipeError):
            return  # the client went away: nobody is left to answer
