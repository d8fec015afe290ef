"""Verification for ph0.4: the learner's HTTP/1.1 connection handler, behind a loopback
listener the test runs, driven by a raw socket client that writes exact bytes (pipelined
requests in one write, bodies in pieces) and parses responses with the standard
library's HTTP header parser.
"""

from __future__ import annotations

import fcntl
import http.client
import re
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NoReturn

import pytest

WAIT = 2.0          # upper bound for anything that must happen
QUIET = 0.3         # how long "nothing arrives" is watched for
HANDLER_BUGS = {     # target -> what the test's handler raises for it
    "/boom": RuntimeError("lab: handler bug"),
    "/missing": KeyError("lab: no such key"),
    "/divide": ZeroDivisionError("lab: division by zero"),
}
# A status code HTTPStatus does not list: codes are extensible (RFC 9110 15), and the
# application may answer any three-digit one; the reason phrase is optional text.
UNLISTED_STATUS = 299


# ---------------------------------------------------------------------------- the server


class CountingSocket(socket.socket):
    """The accepted connection as the learner's code gets it: counts the bytes its reads
    take out of the socket (recv(), recv_into() which makefile() uses, recvfrom(),
    recvmsg() and their _into forms), so a test knows how much of what it sent the server
    has read."""

    received = 0

    def _took(self, count: int, flags: int) -> None:
        if not flags & socket.MSG_PEEK:
            self.received += count

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self._took(len(data), flags)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        count = super().recv_into(buffer, nbytes, flags)
        self._took(count, flags)
        return count

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        data, address = super().recvfrom(bufsize, flags)
        self._took(len(data), flags)
        return data, address

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        count, address = super().recvfrom_into(buffer, nbytes, flags)
        self._took(count, flags)
        return count, address

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
        message = super().recvmsg(bufsize, ancbufsize, flags)
        self._took(len(message[0]), flags)
        return message

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> Any:
        message = super().recvmsg_into(buffers, ancbufsize, flags)
        self._took(message[0], flags)
        return message


@dataclass
class Server:
    """A loopback listener; every accepted connection goes to the learner's
    handle_connection() in its own thread. The handler is the test's."""

    module: Any
    listener: socket.socket = field(init=False)
    connections: int = 0
    handled: list[str] = field(default_factory=list)       # "METHOD target", in call order
    bodies: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # by target
    errors: list[str] = field(default_factory=list)
    sockets: list[CountingSocket] = field(default_factory=list)  # as accepted, in order
    slow_started: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = CountingSocket(fileno=conn.detach())
            conn.settimeout(None)
            self.sockets.append(conn)
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.module.handle_connection(conn, self.handler)
        except NotImplementedError as exc:
            self.errors.append(f"handle_connection() is not implemented yet: {exc}")
            conn.close()
        except Exception as exc:  # noqa: BLE001 - surfaced in the test's failure message
            self.errors.append(f"handle_connection() raised {type(exc).__name__}: {exc}")
            conn.close()

    def handler(self, request: Any) -> Any:
        """The application: echoes what it was asked; /slow waits for the test's gate."""
        label = f"{request.method} {request.target}"
        self.handled.append(label)
        self.bodies[request.target] = request.body
        self.headers[request.target] = {str(k).lower(): str(v) for k, v in
                                        dict(request.headers).items()}
        if request.target == "/slow":
            self.slow_started.set()
            self.gate.wait(WAIT)
        if request.target in HANDLER_BUGS:  # the application has a bug: it raises
            raise HANDLER_BUGS[request.target]
        body = f"{label} ({len(request.body)} bytes)".encode()
        status = (int(request.target.removeprefix("/status-"))
                  if re.fullmatch(r"/status-\d{3}", request.target) else 200)
        return self.module.Response(status, {"Content-Type": "text/plain"}, body)

    def wait_for_slow(self) -> bool:
        """Wait until /slow reached the handler; stop early if the learner's code died."""
        for _ in range(int(WAIT / 0.05)):
            if self.slow_started.wait(0.05):
                return True
            if self.errors:
                pytest.fail(self.errors[0], pytrace=False)
        return False

    def close(self) -> None:
        self.gate.set()
        self.stop.set()
        self.listener.close()


@pytest.fixture
def server(learner: Any) -> Iterator[Server]:
    srv = Server(learner.load("http11"))
    yield srv
    srv.close()


# ---------------------------------------------------------------------------- the client


def request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: lab.test\r\n"
    for name, value in headers.items():
        head += f"{name.replace('_', '-')}: {value}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class Client:
    """One raw TCP connection; responses are read with http.client's own header parser."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT)
        self.stream: BinaryIO = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self._fail(f"the server closed the connection while the client was still "
                       f"sending ({exc})")

    def read(self, what: str) -> Reply | None:
        """The next response, or None if the server closed the connection instead."""
        try:
            status_line: bytes | None = self.stream.readline(65537)
        except TimeoutError:
            status_line = None
        except ConnectionResetError:
            status_line = b""
        if status_line is None:  # failing outside the except block keeps the message clean
            self._fail(f"no response to {what} within {WAIT:.0f} s\nIf that request "
                       "arrived in the same recv() as the one before it, the bytes after "
                       "the first request must stay in the connection's buffer for the "
                       "next one.")
        if not status_line:
            if self.srv.errors:
                self._fail(f"the connection closed without a response to {what}")
            return None
        parts = status_line.decode("iso-8859-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            self._fail(f"the response to {what} starts with {status_line[:80]!r}, "
                       "expected a status line like 'HTTP/1.1 200 OK'")
        headers = http.client.parse_headers(self.stream)
        length = headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._fail(f"the response to {what} has no valid Content-Length ({length!r})\n"
                       "On a connection that stays open, Content-Length is how the client "
                       "knows where the body ends and the next response begins.")
        body = self.stream.read(int(length))
        return Reply(int(parts[1]), headers, body)

    def expect(self, what: str, body: str) -> Reply:
        reply = self.read(what)
        if reply is None:
            self._fail(f"the server closed the connection instead of answering {what}\n"
                       "HTTP/1.1 connections are persistent: keep reading requests until "
                       "the client closes or sends 'Connection: close'.")
        assert reply.body == body.encode(), (
            f"expected the response to {what} ({body!r}), got {reply.body!r}\n"
            "Responses must come back in request order: a client pairs them by position.")
        return reply

    def closed(self) -> bool:
        """True when the server has closed its end (EOF) within WAIT."""
        try:
            return self.stream.read(1) == b""
        except (TimeoutError, ConnectionResetError):
            return False

    def quiet(self) -> bool:
        """True when nothing at all arrives for QUIET seconds."""
        readable, _, _ = select.select([self.sock], [], [], QUIET)
        return not readable

    def _fail(self, message: str) -> NoReturn:
        if self.srv.errors:
            message = f"{self.srv.errors[0]}\n({message})"
        pytest.fail(message, pytrace=False)

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    c = Client(server)
    yield c
    c.close()


def one_connection(server: Server) -> None:
    assert server.connections == 1, (
        f"the server accepted {server.connections} connections, expected the single one "
        "the client opened")


# ---------------------------------------------------------------------------- the tests


def test_keep_alive_serves_requests_one_after_another(server: Server, client: Client) -> None:
    client.send(request("GET", "/first"))
    reply = client.expect("GET /first", "GET /first (0 bytes)")
    assert reply.status == 200, f"status {reply.status}, expected 200 from the handler"
    client.send(request("GET", "/second"))
    client.expect("GET /second on the same connection", "GET /second (0 bytes)")
    one_connection(server)


def test_pipelined_requests_are_answered_in_order(server: Server, client: Client) -> None:
    client.send(request("GET", "/one") + request("POST", "/two", b"hello")
                + request("GET", "/three"))  # one write: the requests arrive together
    client.expect("pipelined request 1 (GET /one)", "GET /one (0 bytes)")
    client.expect("pipelined request 2 (POST /two)", "POST /two (5 bytes)")
    client.expect("pipelined request 3 (GET /three)", "GET /three (0 bytes)")
    assert server.bodies.get("/two") == b"hello", (
        f"the POST body reached the handler as {server.bodies.get('/two')!r}, expected b'hello'")
    one_connection(server)


def test_body_is_framed_by_content_length(server: Server, client: Client) -> None:
    body = bytes(range(256)) * 800  # 200 KB: more than one recv() can return
    whole = request("POST", "/upload", body) + request("GET", "/after")
    cut1, cut2 = len(whole) // 3, 2 * len(whole) // 3
    for piece in (whole[:cut1], whole[cut1:cut2], whole[cut2:]):
        client.send(piece)
    client.expect("POST /upload", f"POST /upload ({len(body)} bytes)")
    got = server.bodies.get("/upload", b"")
    assert got == body, (
        f"the handler received a {len(got)}-byte body, expected exactly {len(body)} bytes\n"
        "Read until Content-Length bytes of body are buffered, however many recv() calls "
        "that takes, and not a byte more: what follows is the next request.")
    client.expect("GET /after (sent right behind the body)", "GET /after (0 bytes)")


def test_connection_close_ends_the_connection(server: Server, client: Client) -> None:
    client.send(request("GET", "/a") + request("GET", "/b", Connection="close")
                + request("GET", "/c"))
    client.expect("GET /a", "GET /a (0 bytes)")
    last = client.expect("GET /b (Connection: close)", "GET /b (0 bytes)")
    assert (last.headers.get("Connection") or "").lower() == "close", (
        "the response to a 'Connection: close' request must say 'Connection: close' too")
    assert client.closed(), (
        "after answering the 'Connection: close' request the server kept the connection "
        "open (or answered the request behind it)\nClose right after that response.")
    assert "GET /c" not in server.handled, (
        "GET /c, sent after 'Connection: close', was handled: the server must stop there")


def test_slow_first_request_blocks_the_second(server: Server, client: Client) -> None:
    client.send(request("GET", "/slow") + request("GET", "/fast"))
    assert server.wait_for_slow(), (
        f"GET /slow never reached the handler (handled: {server.handled}, errors: "
        f"{server.errors})")
    early = client.quiet()
    server.gate.set()  # let /slow finish
    assert early, (
        "a response arrived while GET /slow was still being handled\nIn HTTP/1.1 the "
        "response to GET /fast may only follow the one to GET /slow: responses carry no "
        "request id, so their order is the only way to match them. That wait is "
        "head-of-line blocking.")
    client.expect("GET /slow", "GET /slow (0 bytes)")
    client.expect("GET /fast (queued behind /slow)", "GET /fast (0 bytes)")
    one_connection(server)


def test_header_names_are_case_insensitive(server: Server, client: Client) -> None:
    # What many clients and proxies send: lower-case names (HTTP/2 gateways always do).
    client.send(b"POST /lower HTTP/1.1\r\nhost: lab.test\r\ncontent-length: 5\r\n\r\nhello"
                + request("GET", "/next"))
    reply = client.read("POST /lower (sent with 'content-length: 5')")
    got = server.bodies.get("/lower")
    assert reply is not None and got == b"hello", (
        f"a request sent with 'content-length: 5' (lower case) reached the handler with body "
        f"{got!r}, expected b'hello'\nHeader names are case-insensitive (RFC 9110 5.1): "
        "compare them lower-cased, or the body is read as the start of the next request.")
    client.expect("GET /next (behind the lower-case request)", "GET /next (0 bytes)")
    client.send(b"GET /bye HTTP/1.1\r\nHOST: lab.test\r\nCONNECTION: Close\r\n\r\n")
    client.expect("GET /bye (CONNECTION: Close)", "GET /bye (0 bytes)")
    assert client.closed(), (
        "'CONNECTION: Close' did not close the connection: header names and the "
        "Connection token are both case-insensitive")


def read_or_none(client: Client, what: str) -> Reply | None:
    """The next response, or None when the connection died instead (said by the caller)."""
    try:
        return client.read(what)
    except pytest.fail.Exception:
        return None


def test_any_three_digit_status_is_sent(server: Server, client: Client) -> None:
    """The application answers 299, a code HTTPStatus does not list: the server writes it
    with whatever reason phrase (even none), and the connection goes on."""
    target = f"/status-{UNLISTED_STATUS}"
    client.send(request("GET", target) + request("GET", "/after"))
    reply = read_or_none(client, f"GET {target}")
    advice = ("Status codes are extensible (RFC 9110 15): the application may answer any "
              "three-digit code, and a client that does not know it reads it by its class. "
              "The reason phrase is optional text (RFC 9112 4: it may be empty): a lookup "
              "(HTTPStatus(code).phrase, a table of your own) must fall back, never raise.")
    if reply is None:
        crashed = f" ({server.errors[0]})" if server.errors else ""
        pytest.fail(
            f"the handler answered status {UNLISTED_STATUS} for GET {target}, and the "
            f"connection was closed without a response{crashed}, expected 'HTTP/1.1 "
            f"{UNLISTED_STATUS} <any reason>'\n{advice}", pytrace=False)
    assert reply.status == UNLISTED_STATUS, (
        f"the handler answered status {UNLISTED_STATUS} for GET {target}, the response said "
        f"{reply.status}, expected {UNLISTED_STATUS}\n{advice}")
    client.expect(f"GET /after (behind the {UNLISTED_STATUS} response)", "GET /after (0 bytes)")


def test_header_bytes_past_ascii_are_served(server: Server, client: Client) -> None:
    """'X-Name: caf\\xe9' (ISO-8859-1, not UTF-8): obs-text, which a field value may carry
    (RFC 9110 5.5) as opaque bytes. The request is served, and the one behind it too."""
    line = b"X-Name: caf\xe9 \xff\xfe"
    client.send(b"GET /latin HTTP/1.1\r\nHost: lab.test\r\n" + line + b"\r\n\r\n"
                + request("GET", "/after"))
    reply = read_or_none(client, "GET /latin")
    advice = ("A header value may hold bytes 0x80-0xFF (obs-text, RFC 9110 5.5: opaque "
              "data); they are not UTF-8. Decode the head as ISO-8859-1 (every byte is one "
              "character: nothing can fail, and the CRLFs stay where they are) or keep it as "
              "bytes; .decode() (UTF-8) or .decode('ascii') raises on them, and one client's "
              "header then kills the connection unanswered.")
    if reply is None or reply.status != 200:
        seen = (f"was answered {reply.status} {reply.body[:80]!r}" if reply is not None else
                "got no response: the connection was closed"
                + (f" ({server.errors[0]})" if server.errors else ""))
        pytest.fail(f"GET /latin with the header line {line!r} (bytes past ASCII in a "
                    f"value) {seen}, expected 200 from the handler\n{advice}", pytrace=False)
    client.expect("GET /after (behind the request with bytes past ASCII)",
                  "GET /after (0 bytes)")
    one_connection(server)


def next_line(client: Client) -> bytes:
    """The next line on the wire (b"(nothing)" when none comes in time): after a head that
    carries no content, the status line of the response behind it."""
    try:
        return client.stream.readline(65537)
    except TimeoutError:
        return b"(nothing)"


def expect_after(client: Client, what: str) -> None:
    """The rest of GET /after's response, its status line read: its own body, in order."""
    headers = http.client.parse_headers(client.stream)
    body = client.stream.read(int(headers.get("Content-Length") or 0))
    assert body == b"GET /after (0 bytes)", (
        f"the response after {what}'s held {body!r}, expected GET /after's "
        "('GET /after (0 bytes)'): responses come back in request order")


def test_a_response_to_head_has_no_body(server: Server, client: Client) -> None:
    """HEAD /page, answered by the application like a GET (a body, as WSGI apps do), then GET
    /after pipelined: the server sends HEAD's head alone (RFC 9110 9.3.2), since the client
    reads no content after a HEAD; the next bytes on the wire are GET /after's response."""
    client.send(request("HEAD", "/page") + request("GET", "/after"))
    line = client.stream.readline(65537)
    assert line.startswith(b"HTTP/1.") and line.split(b" ")[1:2] == [b"200"], (
        f"the response to HEAD /page starts with {line[:80]!r}, expected 'HTTP/1.1 200 ...'"
        "\nA server answers HEAD like GET, without the content (RFC 9110 9.3.2).")
    http.client.parse_headers(client.stream)  # HEAD's head: nothing follows it
    nxt = next_line(client)
    assert nxt.startswith(b"HTTP/1."), (
        f"the response to HEAD /page carried a body: where GET /after's status line was "
        f"expected, the client (which reads no content after a HEAD) read {nxt[:80]!r}"
        "\nA response to HEAD is "
        "its head alone (RFC 9110 9.3.2, RFC 9112 6.3): the status line and the headers "
        "GET would have (its Content-Length too), no content, whatever the application "
        "returned. Content sent anyway is read as the start of the next response, and "
        "every response behind it on the connection is garbled.")
    expect_after(client, "HEAD /page")
    assert server.handled[:1] == ["HEAD /page"], (
        f"the handler was called with {server.handled}, expected HEAD /page first")
    one_connection(server)


# Statuses whose response ends at its blank line: status -> (its name, where RFC 9110 says
# it has no content).
NO_CONTENT = {204: ("No Content", "15.3.5"), 304: ("Not Modified", "15.4.5"),
              103: ("Early Hints", "15.2: a 1xx is an interim response, its head alone")}


@pytest.mark.parametrize("status", list(NO_CONTENT))
def test_a_no_content_status_carries_no_body(server: Server, client: Client,
                                            status: int) -> None:
    """The application answers 103 (or 204, or 304) with a body, as a careless app may, then
    GET /after comes pipelined: the server sends the head alone (RFC 9112 6.3: any 1xx, a 204
    or a 304 ends at its blank line, whatever its headers say), without Content-Length for
    1xx and 204 (RFC 9110 8.6); the next bytes on the wire are GET /after's response."""
    target = f"/status-{status}"
    client.send(request("GET", target) + request("GET", "/after"))
    line = client.stream.readline(65537)
    assert line.startswith(b"HTTP/1.") and line.split(b" ")[1:2] == [str(status).encode()], (
        f"the response to GET {target} starts with {line[:80]!r}, expected "
        f"'HTTP/1.1 {status} ...' (the status the application answered)")
    headers = http.client.parse_headers(client.stream)
    name, section = NO_CONTENT[status]
    why = (f"A {status} {name} response has no content (RFC 9110 {section}) and ends "
           "at its blank line whatever its headers say (RFC 9112 6.3: any 1xx, 204, 304): a "
           "client reads no body after it. Whatever the application returned, write the head "
           "alone, as for HEAD; content sent anyway is read as the next response.")
    nxt = next_line(client)
    assert nxt.startswith(b"HTTP/1."), (
        f"the {status} response to GET {target} carried a body: where GET /after's status "
        f"line was expected, the client read {nxt[:80]!r}\n{why}")
    length = headers.get("Content-Length")
    if status != 304:
        assert length is None, (
            f"the {status} response to GET {target} carried 'Content-Length: {length}', "
            "expected no Content-Length: a server MUST NOT send it with 1xx or 204 (RFC 9110 8.6), "
            f"which have no content to measure\n{why}")
    expect_after(client, f"GET {target}")
    one_connection(server)


def test_request_head_in_pieces(server: Server, client: Client) -> None:
    whole = request("GET", "/pieces", X_Trace="abc")
    pieces = [whole[:7], whole[7:30], whole[30:-2], whole[-2:]]  # the last: the empty line
    advice = ("One recv() returns whatever has arrived so far: keep reading until the blank "
              "line that ends the head (\\r\\n\\r\\n) is in the buffer.")
    for n, piece in enumerate(pieces, start=1):
        try:
            client.sock.sendall(piece)
        except OSError:
            pytest.fail(f"a request head sent in four pieces: the server closed the connection "
                        f"before piece {n} of 4 was sent, with the head still incomplete"
                        f"\n{advice}", pytrace=False)
        time.sleep(0.15)  # separate segments: each reaches the server in a recv() of its own
    reply = client.read("GET /pieces (its head sent in four pieces)")
    assert reply is not None and reply.status == 200, (
        f"a request whose head arrived in four pieces got "
        f"{reply.status if reply else 'no response'}, expected 200\n{advice}")


# Connection is a list of tokens (RFC 9110 7.6.1): what a client or a proxy sends besides
# "close" (TE, Upgrade, a hop-by-hop header's name), in one line or in several.
CLOSE_IN_A_LIST = {
    "TE, close": "Connection: TE, close\r\n",
    "close,TE": "Connection: close,TE\r\n",
    "two lines": "Connection: TE\r\nConnection: close\r\n",
}


@pytest.mark.parametrize("case", list(CLOSE_IN_A_LIST))
def test_close_in_a_connection_list_ends_the_connection(server: Server, client: Client,
                                                        case: str) -> None:
    lines = CLOSE_IN_A_LIST[case]
    shown = repr(lines.replace("\r\n", " ").strip())
    client.send(f"GET /list HTTP/1.1\r\nHost: lab.test\r\n{lines}\r\n".encode()
                + request("GET", "/behind"))
    last = client.expect(f"GET /list ({shown})", "GET /list (0 bytes)")
    why = ("Connection is a comma-separated list of case-insensitive tokens (RFC 9110 7.6.1), "
           "and a repeated header is one list: split it at commas, trim each token, and "
           "close when any of them is 'close'. Comparing the whole value with 'close' misses "
           "'TE, close'; the client, told nothing, waits for a close that never comes, or "
           "has its next request answered on a connection it gave up.")
    assert (last.headers.get("Connection") or "").lower() == "close", (
        f"the response to a request with {shown} did not say 'Connection: close' "
        f"(it said {last.headers.get('Connection')!r})\n{why}")
    assert client.closed() and "GET /behind" not in server.handled, (
        f"after answering a request with {shown} the server kept the connection open"
        f"{' and answered GET /behind' if 'GET /behind' in server.handled else ''}, "
        f"expected it closed right after that response\n{why}")


def test_http10_closes_by_default(server: Server, client: Client) -> None:
    client.send(b"GET /old HTTP/1.0\r\nHost: lab.test\r\n\r\n")
    client.expect("GET /old (HTTP/1.0)", "GET /old (0 bytes)")
    assert client.closed(), (
        "an HTTP/1.0 request without 'Connection: keep-alive' was answered and the "
        "connection kept open: HTTP/1.0 closes after each response unless the client asks "
        "to keep it; only HTTP/1.1 is persistent by default")


def test_http10_keep_alive_when_asked(server: Server, client: Client) -> None:
    client.send(b"GET /old1 HTTP/1.0\r\nHost: lab.test\r\nConnection: keep-alive\r\n\r\n")
    client.expect("GET /old1 (HTTP/1.0, Connection: keep-alive)", "GET /old1 (0 bytes)")
    client.send(b"GET /old2 HTTP/1.0\r\nHost: lab.test\r\nConnection: keep-alive\r\n\r\n")
    reply = client.read("a second HTTP/1.0 keep-alive request on the same connection")
    assert reply is not None and reply.body == b"GET /old2 (0 bytes)", (
        "an HTTP/1.0 request with 'Connection: keep-alive' was answered and then the "
        "connection was closed\nHTTP/1.0 closes by default, but a client that sends "
        "'Connection: keep-alive' asks to keep it open: honour the header for 1.0 too, "
        "only its default differs from 1.1.")
    one_connection(server)


# A client that stops sending (it crashed, or gave up) and closes its side: recv() then
# returns b"" at once, every time. What it had sent, and what the server must do.
CUT_OFF = {
    "between two requests": (request("GET", "/done"), "a complete GET /done"),
    "inside a request head": (b"GET /cut HTTP/1.1\r\nHost: lab.test\r\nX-Trace: a",
                              "half a request head (no blank line yet)"),
    "inside a request body": (b"POST /cut HTTP/1.1\r\nHost: lab.test\r\nContent-Length: 10"
                              b"\r\n\r\nhello", "a head with 'Content-Length: 10' and 5 "
                              "bytes of body"),
}
EOF_WAIT = 10.0     # a generous bound for the server's close: it needs no work at all


@pytest.mark.parametrize("where", list(CUT_OFF))
def test_client_closing_ends_the_connection(server: Server, client: Client,
                                            where: str) -> None:
    data, sent = CUT_OFF[where]
    client.send(data)
    client.sock.shutdown(socket.SHUT_WR)  # FIN: the client will send nothing more
    client.sock.settimeout(EOF_WAIT)
    never_closed = (
        f"the client sent {sent} and closed its side (FIN), and {EOF_WAIT:.0f} s later the "
        "server had neither answered nor closed the connection, expected it to close at "
        "once\nrecv() returning b'' means the peer closed: it returns b'' again forever, "
        "immediately. Every loop that calls recv() (waiting for the head's blank line, or "
        "for Content-Length bytes of body) must stop there; one that keeps calling it spins "
        "at 100% CPU and never closes, one thread burnt per such client. Between requests "
        "that is the normal end of a connection; inside a request it is a truncated request "
        "(answer 400, or just close).")
    if not select.select([client.sock], [], [], EOF_WAIT)[0]:
        pytest.fail(never_closed, pytrace=False)
    if where == "between two requests":
        client.expect("GET /done (the client closed its side right after it)",
                      "GET /done (0 bytes)")
    else:
        reply = client.read(f"{sent}, then the client's FIN")
        cut = ("The stream ended inside a request: that request is truncated, not "
               "complete; never hand it to the handler.")
        assert "/cut" not in server.bodies, (
            f"the client sent {sent} and closed its side: the handler was called with "
            f"{server.handled[-1]} ({len(server.bodies.get('/cut', b''))}-byte body), "
            f"expected no call (a 400, or just a close)\n{cut}")
        assert reply is None or reply.status == 400, (
            f"the client sent {sent} and closed its side: the server answered "
            f"{reply.status}, expected a 400 or no answer, then the connection closed\n{cut}")
    assert client.closed(), never_closed


CONTENT_LENGTH_DIGITS = (
    "A Content-Length is 1*DIGIT (RFC 9112 6.3): check it is plain ASCII digits before "
    "int() (which also takes '+5', ' 5' and '1_0'); anything else means the server does not "
    "know where the body ends, so it must refuse the request rather than guess.")
SMUGGLING = (
    "When two hops can frame one request differently, the bytes one of them takes for a "
    "body the other takes for the next request (request smuggling), so RFC 9112 says to "
    "refuse it: ")


@dataclass(frozen=True)
class Malformed:
    data: bytes
    what: str                                   # "a request with <what>"
    why: str                                    # the rule, in the failure message
    statuses: tuple[int, ...] = (400,)          # the answers that refuse it


MALFORMED = {
    "request line": Malformed(
        b"THIS IS NOT HTTP\r\n\r\n", "a request line that is not 'METHOD target HTTP/1.x'",
        "A request line is exactly 'METHOD target HTTP/1.x'."),
    "header without colon": Malformed(
        b"GET /x HTTP/1.1\r\nHost lab.test\r\n\r\n", "a header line without ':'",
        "Every header line is 'name: value'."),
    "content-length not a number": Malformed(
        b"POST /x HTTP/1.1\r\nHost: lab.test\r\nContent-Length: abc\r\n\r\n",
        "'Content-Length: abc'", CONTENT_LENGTH_DIGITS),
    "negative content-length": Malformed(
        b"POST /x HTTP/1.1\r\nHost: lab.test\r\nContent-Length: -5\r\n\r\nhello",
        "'Content-Length: -5'", CONTENT_LENGTH_DIGITS),
    "signed content-length": Malformed(
        b"POST /x HTTP/1.1\r\nHost: lab.test\r\nContent-Length: +5\r\n\r\nhello",
        "'Content-Length: +5'", CONTENT_LENGTH_DIGITS),
    "space before the colon": Malformed(
        b"POST /x HTTP/1.1\r\nHost: lab.test\r\nContent-Length : 5\r\n\r\nhello",
        "whitespace between a header name and its colon ('Content-Length : 5')",
        SMUGGLING + "a server MUST answer 400 to whitespace between a field name and the "
        "colon (RFC 9112 5.1), never strip it: a proxy that reads 'Content-Length ' as some "
        "other header frames this request with no body."),
    "tab before the colon": Malformed(
        b"POST /x HTTP/1.1\r\nHost: lab.test\r\nContent-Length\t: 5\r\n\r\nhello",
        "a tab between a header name and its colon ('Content-Length\\t: 5')",
        SMUGGLING + "a server MUST answer 400 to whitespace between a field name and the "
        "colon (RFC 9112 5.1), a tab as much as a space: never strip it."),
    "two content-lengths": Malformed(
        b"POST /x HTTP/1.1\r\nHost: lab.test\r\nContent-Length: 5\r\nContent-Length: 0"
        b"\r\n\r\nhello",
        "two different Content-Length headers (5, then 0)",
        SMUGGLING + "differing Content-Length values are an unrecoverable framing error "
        "(RFC 9112 6.3): one hop keeps the first, another the last. A repeated header is one "
        "comma-separated list ('5, 0'), not a value that overwrites the one before."),
    "transfer-encoding and content-length": Malformed(
        b"POST /x HTTP/1.1\r\nHost: lab.test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\nhello",
        "both 'Transfer-Encoding: chunked' and 'Content-Length: 5'",
        SMUGGLING + "Transfer-Encoding overrides Content-Length (RFC 9112 6.3), and this "
        "server does not decode chunked bodies: framing the body by Content-Length while a "
        "proxy decodes chunks is the classic CL.TE smuggling. Refuse any Transfer-Encoding "
        "(400, or 501 Not Implemented).", (400, 501)),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_400(server: Server, client: Client, case: str) -> None:
    bad = MALFORMED[case]
    client.send(bad.data)
    try:
        reply = client.read(f"a request with {bad.what}")
    except pytest.fail.Exception:  # the connection died: say why below
        reply = None
    expected = " or ".join(str(status) for status in bad.statuses)
    if reply is None:
        crashed = f" ({server.errors[0]})" if server.errors else ""
        pytest.fail(
            f"a request with {bad.what} got no response: the connection was closed"
            f"{crashed}; expected {expected}, then the connection closed\n{bad.why} "
            "Validate what you parse and answer with an error, or the connection dies with "
            "an exception instead of an answer.", pytrace=False)
    handled = (f" (the handler got {server.handled[0]} with a "
               f"{len(server.bodies.get('/x', b''))}-byte body)" if server.handled else "")
    assert reply.status in bad.statuses, (
        f"a request with {bad.what} got {reply.status}{handled}, expected {expected} (and "
        f"then the connection closed)\n{bad.why}")
    assert client.closed(), "close the connection after a 400: the framing is lost"


# The characters str.splitlines() breaks at besides CRLF, in the order a failure names
# them: those a "split at \n" misses first, the bare CR and LF last.
NOT_LINE_ENDS = {
    "vertical tab": "\x0b", "form feed": "\x0c", "file separator": "\x1c",
    "group separator": "\x1d", "record separator": "\x1e", "next line (NEL)": "\x85",
    "bare CR": "\r", "bare LF": "\n",
}


def hiding_a_length(server: Server, client: Client, line: str,
                    what: str) -> tuple[Any, dict[str, str], bytes]:
    """GET /first with ``line`` among its headers (a Content-Length a proxy in front would
    not see), then GET /second on the same connection: (the answer to the first, the
    headers its handler got, the body it got)."""
    client.send(f"GET /first HTTP/1.1\r\nHost: lab.test\r\n{line}\r\n\r\n"
                .encode("iso-8859-1") + request("GET", "/second"))
    reply = client.read(f"GET /first (with {what})")
    return reply, server.headers.get("/first", {}), server.bodies.get("/first", b"")


@pytest.mark.parametrize("name", list(NOT_LINE_ENDS))
def test_only_crlf_ends_a_header_line(server: Server, client: Client, name: str) -> None:
    """'X-Note: a<char>Content-Length: 5' is one header line to a proxy that ends lines at
    CRLF: a server that also breaks lines at <char> sees a Content-Length the proxy does
    not, and eats the start of the next request as a body (request smuggling)."""
    char = NOT_LINE_ENDS[name]
    line = f"X-Note: a{char}Content-Length: 5"
    shown = repr(line)
    reply, got, body = hiding_a_length(server, client, line, f"the header line {shown}")
    if body or "content-length" in got:
        pytest.fail(
            f"the header line {shown} was split at the {name} ({char!r}): the handler got "
            f"GET /first with headers {sorted(got)} and a {len(body)}-byte body {body!r}, "
            "expected one X-Note header and no body (or a 400)\n"
            "HTTP/1.1 header lines end with CRLF only (RFC 9112 2.2). str.splitlines() also "
            "breaks at \\n, \\r, \\v, \\f, \\x1c-\\x1e and \\x85: this server then "
            "sees a Content-Length that a proxy in front of it does not, and eats the first "
            "bytes of the proxy's next request (GET /second) as a body: request smuggling. "
            "Split the head at '\\r\\n' only; a bare CR or LF inside a header may be "
            "refused with 400.", pytrace=False)
    if reply is None:
        pytest.fail(f"the connection closed without an answer to GET /first (header line "
                    f"{shown}): expected 200 (the {name} is part of the X-Note value) or "
                    "400 (refused)", pytrace=False)
    if reply.status == 400:
        return  # refusing a control character in a header value is safe too
    client.expect("GET /second (behind a request whose header line held a "
                  f"{name})", "GET /second (0 bytes)")


@pytest.mark.parametrize("target", list(HANDLER_BUGS))
def test_handler_error_is_a_500_and_the_connection_goes_on(server: Server, client: Client,
                                                           target: str) -> None:
    """The handler is the application: it has bugs. Its exception is the server's problem
    to answer (500), not the client's to guess from a dropped connection, and the framing of
    the requests behind it is intact: they are still answered."""
    error = HANDLER_BUGS[target]
    raised = f"the handler raised {type(error).__name__} for GET {target}"
    client.send(request("GET", target) + request("GET", "/after"))
    try:
        reply = client.read(f"GET {target} (the handler raised)")
    except pytest.fail.Exception:  # the connection died: say why below
        reply = None
    if reply is None:
        crashed = f" ({server.errors[0]})" if server.errors else ""
        pytest.fail(
            f"{raised}: the connection was closed without a response{crashed}, expected "
            "500 Internal Server Error\nAn exception from the handler must not escape "
            "handle_connection(): catch it around the handler call (any Exception) and "
            "answer 500. A dropped connection tells the client nothing, and it may retry "
            "a request that already did its work.", pytrace=False)
    assert reply.status == 500, (
        f"{raised}: the response was {reply.status} {reply.body[:80]!r}, expected 500 "
        "Internal Server Error: the request was well-formed, the server failed on it")
    after = client.read("GET /after (pipelined behind the request whose handler raised)")
    assert after is not None and after.body == b"GET /after (0 bytes)", (
        f"{raised} and answered 500, then GET /after, pipelined behind it, got "
        f"{'no response: the connection was closed' if after is None else after.body!r}"
        ", expected 'GET /after (0 bytes)'\nA handler error does not break the framing "
        "(the request was read in full, the server knows where the next one starts): answer "
        "500 and go on serving the connection. Closing it drops requests the client has "
        "already sent, which it cannot safely resend if they are not idempotent.")
    one_connection(server)


# A line that begins with a space or a tab continues the header line before it (obs-fold,
# RFC 9112 5.2): it is never a header of its own.
FOLDS = {"a space": " ", "a tab": "\t"}


@pytest.mark.parametrize("fold", list(FOLDS))
def test_a_folded_line_is_not_a_header_of_its_own(server: Server, client: Client,
                                                   fold: str) -> None:
    line = f"X-Note: a\r\n{FOLDS[fold]}Content-Length: 5"
    shown = repr(line)
    reply, got, body = hiding_a_length(server, client, line,
                                       f"the folded header lines {shown}")
    if body or "content-length" in got:
        pytest.fail(
            f"the header lines {shown} were read as two headers: the handler got GET /first "
            f"with headers {sorted(got)} and a {len(body)}-byte body {body!r}, expected a 400 "
            "(or one X-Note header and no body)\nA line that starts with a space or a tab "
            "is not a new header: it continues the line before it (obs-fold, RFC 9112 5.2, "
            "which says a server refuses it with 400 or joins it to that line). Stripping "
            "the line, or the name's leading whitespace, turns it into a Content-Length "
            "that a proxy in front of you reads as part of X-Note: this server then eats the "
            "start of the proxy's next request (GET /second) as a body: request smuggling. "
            "Refuse whitespace at either end of a header name.", pytrace=False)
    if reply is None:
        pytest.fail(f"the connection closed without an answer to GET /first (header lines "
                    f"{shown}): expected 400 (refused), or 200 with the folded line joined "
                    "to X-Note", pytrace=False)
    if reply.status == 400:
        assert client.closed(), "close the connection after a 400: the framing is lost"
        return
    client.expect(f"GET /second (behind a request with a line folded with {fold})",
                  "GET /second (0 bytes)")


# A request head is buffered until its blank line arrives; a head that never ends must not
# be buffered for ever (one client would grow the server's memory without bound). The
# README's limit is 64 KiB for the whole head: past it, 431 Request Header Fields Too Large
# (RFC 6585 5: Node and Go) or 400 (nginx, Apache); 414 URI Too Long (RFC 9112 3, nginx)
# while the request line has not ended.
HEAD_LIMIT = 64 * 1024
READ_CAP = 2 * HEAD_LIMIT   # a server that has read this much without refusing never will
PIECE = 8 * 1024            # the client sends a piece only once the server read the last one
STALL = 10.0                # a generous bound for reading one piece, or answering
PER_HEAD = ("Count the whole head (the request line and every header line) against the "
            "limit after each recv(), until its blank line arrives.")


@dataclass(frozen=True)
class EndlessHead:
    start: bytes
    filler: bytes               # repeated after start, never followed by a blank line
    what: str                   # "<what> that never ends"
    why: str                    # what a server that misses it got wrong
    statuses: tuple[int, ...] = (431, 400)


ENDLESS_HEADS = {
    "request line": EndlessHead(
        b"GET /", b"a" * 64, "a request line (GET /aaaa...)",
        "A line with no end is buffered whole: limit the head, not just its parsed parts.",
        (431, 414, 400)),
    "header line": EndlessHead(
        b"GET /big HTTP/1.1\r\nHost: lab.test\r\nCookie: ", b"a" * 64,
        "a header line (Cookie: aaaa...)",
        "A line with no end is buffered whole: limit the head, not just its parsed parts."),
    "many header lines": EndlessHead(
        b"GET /big HTTP/1.1\r\nHost: lab.test\r\n", b"X-Pad: " + b"a" * 55 + b"\r\n",
        "a head of 64-byte header lines (X-Pad: aaaa...)",
        "Each line is short: a limit on each line alone never fires, thousands of lines "
        "add up just the same (http.server also caps the number of lines)."),
}


def read_or_answered(server: Server, client: Client, sent: int, what: str) -> bool:
    """Wait until the server has read all `sent` bytes (False) or the client has something
    to read: an answer, or the close (True)."""
    deadline = time.monotonic() + STALL
    while time.monotonic() < deadline:
        if select.select([client.sock], [], [], 0.005)[0]:
            return True
        if server.errors:
            pytest.fail(f"{server.errors[0]}\n(while sending {what} that never ends)",
                        pytrace=False)
        if server.sockets and server.sockets[0].received >= sent:
            return False
    read = server.sockets[0].received if server.sockets else 0
    pytest.fail(f"the client sent {sent} bytes of {what} that never ends: the server read "
                f"{read} of them, then neither read more nor answered within {STALL:.0f} s, "
                f"expected 431 (or 400) and a close once the head passed {HEAD_LIMIT} bytes",
                pytrace=False)


def closed_or_reset(client: Client) -> bool:
    """True when the server has closed within WAIT. A server that closes before it has
    read all the client sent makes its kernel reset the connection (RFC 1122 4.2.2.13),
    after the answer it sent: a close too."""
    try:
        return client.stream.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("case", list(ENDLESS_HEADS))
def test_a_head_past_the_limit_is_refused(server: Server, client: Client, case: str) -> None:
    head = ENDLESS_HEADS[case]
    stream = head.start + head.filler * (READ_CAP // len(head.filler) + 1)
    sent, answered = 0, False
    while sent < READ_CAP and not answered:
        try:
            client.sock.sendall(stream[sent:sent + PIECE])
        except OSError:  # the server closed: what it answered (if anything) is read below
            break
        sent += PIECE
        answered = read_or_answered(server, client, sent, head.what)
    read = server.sockets[0].received if server.sockets else 0
    expected = " or ".join(str(status) for status in head.statuses)
    if read >= READ_CAP:
        pytest.fail(
            f"the server read {read // 1024} KiB of {head.what} that never ends and "
            f"{'only then answered' if answered else 'was still reading'}, expected "
            f"{expected} "
            f"and a close once the head passed {HEAD_LIMIT // 1024} KiB\nA head that is "
            "buffered until its blank line arrives, with no limit, lets one client grow the "
            f"server's memory without bound (a memory denial of service). {head.why} "
            f"{PER_HEAD}", pytrace=False)
    reply = client.read(f"{head.what} that never ends (after {read} bytes read)")
    assert reply is not None and reply.status in head.statuses, (
        f"the server stopped reading {head.what} that never ends after {read} bytes and "
        f"{'closed without an answer' if reply is None else f'answered {reply.status}'}, "
        f"expected {expected} (Request Header Fields Too Large), then the close\nTell the "
        "client why: a bare close looks like a network failure, which it may retry.")
    assert closed_or_reset(client), (
        f"the server answered {reply.status} to {head.what} that never ends and kept the "
        "connection open: the rest of that head is still coming, close the connection")


def test_a_big_head_under_the_limit_is_served(server: Server, client: Client) -> None:
    cookie = "a" * (32 * 1024)  # nginx's default for a whole head; browsers send a few KiB
    client.send(request("GET", "/cookie", Cookie=cookie) + request("GET", "/next"))
    reply = client.read("GET /cookie (with a 32 KiB Cookie header)")
    assert reply is not None and reply.status == 200, (
        f"a request whose head is 32 KiB (a big Cookie) got "
        f"{'no answer' if reply is None else reply.status}, expected 200: the limit is "
        f"{HEAD_LIMIT // 1024} KiB for the whole head, big cookies are everyday requests")
    client.expect("GET /next (behind the 32 KiB head)", "GET /next (0 bytes)")


# A head past the limit whose blank line arrives in the same read as the bytes past the
# limit: a server that checks the limit only while the blank line is still missing never
# sees it. Each is written in one sendall() while the server is held in GET /slow's handler,
# so that it is all waiting in the socket when the server reads again.
@dataclass(frozen=True)
class WholeHead:
    head: bytes                 # the request head, its blank line included
    what: str


def cookie_head(size: int) -> bytes:
    """GET /big with a Cookie that makes the head (before its blank line) `size` bytes."""
    start = b"GET /big HTTP/1.1\r\nHost: lab.test\r\nCookie: "
    return start + b"a" * (size - len(start)) + b"\r\n\r\n"


WHOLE_HEADS = {
    "blank line just past the limit": WholeHead(
        cookie_head(HEAD_LIMIT + 64),
        f"a head of {HEAD_LIMIT + 64} bytes (a long Cookie), its blank line 64 bytes past "
        "the limit"),
    "many header lines": WholeHead(
        b"GET /big HTTP/1.1\r\nHost: lab.test\r\n"
        + (b"X-Pad: " + b"a" * 55 + b"\r\n") * (80 * 1024 // 64) + b"\r\n",
        "a head of 80 KiB (64-byte X-Pad lines)"),
}


def queued(sock: socket.socket) -> int:
    """How many bytes wait in the socket's receive queue, not read yet (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


@pytest.mark.parametrize("case", list(WHOLE_HEADS))
def test_a_whole_head_past_the_limit_is_refused(server: Server, client: Client,
                                                case: str) -> None:
    whole = WHOLE_HEADS[case]
    send_held(server, client, whole.head)  # one write: the head, its blank line included
    reply = client.read(f"{whole.what}, sent whole in one write")
    expected = "431 (or 400)"
    if reply is not None and reply.status not in (431, 400):
        handled = " (the handler got GET /big)" if "GET /big" in server.handled else ""
        pytest.fail(
            f"{whole.what}, sent whole in one write, got {reply.status}{handled}, expected "
            f"{expected} and a close: the head is longer than {HEAD_LIMIT // 1024} KiB\nIts "
            "blank line arrived in the same recv() as the bytes past the limit: a limit "
            "checked only while the blank line is still missing never sees such a head, "
            "and a client gets any head it likes past the limit by sending it in one piece "
            "(a big enough read takes it whole). Check the head's length when its blank "
            "line is found too, not only while it is missing.", pytrace=False)
    assert reply is not None, (
        f"{whole.what}, sent whole in one write: the server closed without an answer, "
        f"expected {expected}\nTell the client why: a bare close looks like a network "
        "failure, which it may retry.")
    assert closed_or_reset(client), (
        f"the server answered {reply.status} to {whole.what} and kept the connection open: "
        "close it after refusing a head (RFC 6585 5 lets the client retry with a smaller "
        "one, on a new connection)")


# The limit's boundary: the head counts every byte the server buffers for it, CRLFs and
# the blank line included, and a head of at most HEAD_LIMIT bytes is served however it
# arrives. Each case: the head's size, blank line included, and how it is sent - whole
# (one write, queued while the server is held in GET /slow) or in two parts (up to the last
# header's CRLF, then, once the server has read that, the blank line).
BOUNDARY_HEADS = {f"{size} bytes, {how}": (size, how)
                  for size in (HEAD_LIMIT - 1, HEAD_LIMIT, HEAD_LIMIT + 1)
                  for how in ("whole", "in two parts")}
BOUNDARY_RULE = (
    f"The limit is {HEAD_LIMIT} bytes for the whole head - the request line and every header "
    "line with their CRLFs, and the blank line that ends them - however it arrives: count "
    "the same bytes while the blank line is missing and once it is found, or a head is "
    "served in one piece and refused in two (or the other way round), and a limit of "
    f"'{HEAD_LIMIT // 1024} KiB' means one size at one check and another at the next.")


def sized_head(size: int) -> bytes:
    """GET /big whose head, blank line included, is `size` bytes (a long Cookie)."""
    return cookie_head(size - 4)


def send_held(server: Server, client: Client, data: bytes) -> None:
    """Write `data` while the server is held in GET /slow's handler, wait until it all
    waits in the socket, then let the server go on: it reads `data` at once, whole."""
    client.send(request("GET", "/slow"))
    assert server.wait_for_slow(), (
        f"GET /slow never reached the handler (handled: {server.handled}, errors: "
        f"{server.errors})")
    conn = server.sockets[0]
    read_before = conn.received
    client.send(data)
    deadline = time.monotonic() + WAIT
    while (queued(conn) < len(data) and conn.received == read_before
           and time.monotonic() < deadline):
        time.sleep(0.002)  # the loopback delivers it at once; wait for it, then release
    server.gate.set()
    client.expect("GET /slow", "GET /slow (0 bytes)")


@pytest.mark.parametrize("case", list(BOUNDARY_HEADS))
def test_the_head_limit_is_one_size_however_the_head_arrives(server: Server, client: Client,
                                                             case: str) -> None:
    size, how = BOUNDARY_HEADS[case]
    head, served = sized_head(size), size <= HEAD_LIMIT
    what = f"GET /big with a head of {size} bytes (blank line included) sent {how}"
    if how == "whole":
        send_held(server, client, head)
    else:  # the server reads the first part alone: the limit checked while incomplete
        client.send(head[:-2])
        if not read_or_answered(server, client, len(head) - 2, f"{what}: its first part"):
            try:
                client.sock.sendall(head[-2:])
            except OSError:  # the server closed: what it answered is read below
                pass
    reply = client.read(what)
    got = "a close without an answer" if reply is None else f"{reply.status}"
    if served:
        assert reply is not None and reply.status == 200 and "GET /big" in server.handled, (
            f"{what} got {got}, expected 200: {size} bytes is "
            f"{'under' if size < HEAD_LIMIT else 'exactly'} the {HEAD_LIMIT}-byte limit\n"
            f"{BOUNDARY_RULE}")
    else:
        assert reply is not None and reply.status in (431, 400), (
            f"{what} got {got}"
            f"{' (the handler got GET /big)' if 'GET /big' in server.handled else ''}, "
            f"expected 431 (or 400) and a close: {size} bytes is one past the "
            f"{HEAD_LIMIT}-byte limit\n{BOUNDARY_RULE}")
        assert closed_or_reset(client), (
            f"the server answered {reply.status} to {what} and kept the connection open: "
            "close it after refusing a head")
