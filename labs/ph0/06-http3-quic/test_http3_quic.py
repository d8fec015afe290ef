"""Verification for ph0.6: the learner's HTTP/3 server and client, each checked against an
independent peer the test builds from aioquic itself, over real QUIC on UDP loopback:

* the learner's server is driven by the test's HTTP/3 client, which reads the
  negotiated ALPN and 0-RTT acceptance from the handshake;
* the learner's client talks to the test's HTTP/3 server, which records for every
  request whether it arrived before the handshake completed (that is, as 0-RTT data).

Certificates are generated here, at test time, with `cryptography`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote, unquote_plus

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    PingAcknowledged,
    ProtocolNegotiated,
    QuicEvent,
    StreamReset,
)
from aioquic.tls import SessionTicket
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
SERVER_NAME = "h3.lab.test"
WAIT = 3.0       # bound for anything that must happen
T = TypeVar("T")


# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    ca: str
    cert: str
    key: str


def make_certs(directory: Path) -> Certs:
    """A CA and a certificate for SERVER_NAME signed by it, as PEM files."""
    directory.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)

    def build(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    directory.chmod(0o755)   # the learner's process (another uid when grading) reads them
    ca = build(f"test CA {directory.name}", f"test CA {directory.name}", ca_key, ca_key, True)
    cert = build(SERVER_NAME, f"test CA {directory.name}", key, ca_key, False)
    certs = Certs(str(directory / "ca.pem"), str(directory / "cert.pem"),
                  str(directory / "key.pem"))
    Path(certs.ca).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(certs.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(certs.key).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return certs


@pytest.fixture
def certs(learner: Any) -> Certs:
    return make_certs(learner.tmp_folder() / "trusted")


# ---------------------------------------------------------------------------- shared bits


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def bounded(what: str, awaitable: Awaitable[T], seconds: float = WAIT) -> T:
    """Await with a deadline; a learner function that hangs or raises fails clearly."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except NotImplementedError as exc:
        problem = f"{what} is not implemented yet: {exc}"
    except TimeoutError:
        problem = f"{what} did not finish within {seconds:.0f} s"
    except Exception as exc:  # noqa: BLE001 - the learner's error, reported plainly
        problem = f"{what} raised {type(exc).__name__}: {exc}"
    pytest.fail(problem, pytrace=False)  # outside the except: no chained traceback


def bound_port(server: Any) -> int:
    """The UDP port a QuicServer listens on (aioquic's serve() has no accessor for it)."""
    transport = getattr(server, "_transport", None)
    if transport is None:
        pytest.fail("start_server() must return the QuicServer from aioquic's serve()",
                    pytrace=False)
    return int(transport.get_extra_info("sockname")[1])


# /pieces' body, sent as one DATA frame per piece and then an empty DATA frame with the
# stream's FIN: what a server streaming its body does. The middle piece is larger than a
# QUIC packet, so it arrives in several DataReceived events of its own. A body is bytes,
# not text: an "é" is cut in two by the first frame's end, and the middle piece holds a
# PNG signature, bytes that are not UTF-8 at all.
SPLIT_CHARACTER = "é".encode()
NOT_UTF8 = b"\x89PNG\r\n\x1a\n\x00\xff\xfe"
PIECES = (b"first:" + b"a" * 1193 + SPLIT_CHARACTER[:1],
          SPLIT_CHARACTER[1:] + b"b" * 20_000 + NOT_UTF8 + b"b" * 19_988,
          b"c" * 2995 + b":last")


@dataclass(frozen=True)
class Framed:
    """A response with HEADERS frames besides the final response's own (RFC 9114 4.1):
    an interim response (103 Early Hints) before it, or trailers after the body."""

    body: bytes
    interim: bool = False
    trailers: bool = False


@dataclass(frozen=True)
class Bodiless:
    """A response that is its HEADERS frame alone, which ends the stream: no DATA frame at
    all (RFC 9114 4.1: DATA frames are optional), as a 204 No Content or a 304 Not
    Modified is sent."""


@dataclass(frozen=True)
class Closing:
    """No response: the test's server closes the whole connection (CONNECTION_CLOSE with
    H3_INTERNAL_ERROR), as a server shutting down or crashing does."""


Body = bytes | tuple[bytes, ...] | Framed | Bodiless | Closing
CLOSING_ERROR = 0x102  # H3_INTERNAL_ERROR (RFC 9114 8.1)
EARLY_HINTS = [(b":status", b"103"), (b"link", b"</style.css>; rel=preload; as=style")]
TRAILERS = [(b"server-timing", b"app;dur=12"), (b"x-checksum", b"sha256-none")]

# Responses the test's server sends as a HEADERS frame that ends the stream, without any
# DATA frame: path -> (status, what it is).
BODILESS: dict[str, tuple[int, str]] = {
    "/gone": (204, "a 204 No Content"),
    "/unchanged": (304, "a 304 Not Modified"),
}

# Requests whose end (the stream's FIN) comes after their HEADERS, in a DATA frame sent
# in a later datagram: a POST's with its body, a GET's in an empty DATA frame.
LATE_FIN: dict[str, tuple[bytes, bytes, str]] = {
    "/upload": (b"POST", b"name=quic&size=4", "a POST whose end came with its body"),
    "/late-fin": (b"GET", b"", "a GET whose end came in an empty DATA frame after its "
                               "headers"),
    "/trailed-upload": (b"POST", b"name=quic&size=4", "a POST whose end came with "
                        "trailers, a HEADERS frame after its body with no :path"),
}
# Of those, the requests that end with trailers (RFC 9114 4.1: a request may, like a
# response): a HEADERS frame that is not a new request's.
REQUEST_TRAILERS = {"/trailed-upload": [(b"x-checksum", b"sha256-none")]}


# A path with characters outside ASCII: :path is a URI path, ASCII only, so they travel as
# their UTF-8 bytes percent-encoded (RFC 3986 2.1, RFC 3987 3.1).
NON_ASCII_PATH = "/menü/crème-brûlée"
# ASCII in a path stays as it is, percent-encodings included: "%2F" is one segment's "/",
# not a separator, and "%25" a "%" (RFC 3986 2.2); "+", ";", "=", "@" mean themselves.
RESERVED_PATH = "/files/résumé%2Fv2;rev=3+x@y%25"
PATHS = [NON_ASCII_PATH, RESERVED_PATH]
URI_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # ASCII stays as it is
ENCODED_NON_ASCII = re.compile(r"(?:%[89A-Fa-f][0-9A-Fa-f])+")


def iri_path(raw: str) -> str:
    """A :path as the handler gets it (RFC 3987 3.2): its percent-encoded UTF-8 decoded,
    every percent-encoded ASCII character (%2F, %25) left as it came."""
    def decode(run: re.Match[str]) -> str:
        try:
            return unquote(run.group(), errors="strict")
        except UnicodeDecodeError:
            return run.group()
    return ENCODED_NON_ASCII.sub(decode, raw)


def uri_path(path: str) -> bytes:
    """``path`` as :path carries it: its non-ASCII characters percent-encoded UTF-8."""
    return quote(path, safe=URI_SAFE).encode("ascii")


PATH_WHY = ("A :path is a URI path (RFC 9114 4.3.1), and a URI is ASCII: a character "
            "outside ASCII travels as its UTF-8 bytes, each percent-encoded (RFC 3986 2.1, "
            "RFC 3987 3.1): \"/café\" is sent as \"/caf%C3%A9\". The client encodes it "
            "(urllib.parse.quote), the server decodes it back before the handler sees it: "
            "both as UTF-8, or the two sides name different paths. ASCII stays as it is on "
            "both sides, a percent-encoded one too: \"/files/a%2Fb\" has one segment, "
            "\"a/b\", and \"/files/a/b\" two (a reserved character and its encoding are "
            "different URIs, RFC 3986 2.2); \"%25\" stays, or \"%252F\" would become that "
            "same \"%2F\"; \"+\", \";\", \"=\", \"@\" mean themselves in a path. Decode only "
            "the %80-%FF runs (RFC 3987 3.2): a plain unquote() decodes %2F and %25 too.")


def path_mojibake(got: str, sent: bytes) -> str:
    """What a server that decoded ``sent`` (a percent-encoded :path) into ``got`` did."""
    text = sent.decode("ascii")
    if got == text:
        return "the :path as it came on the wire, still percent-encoded (never decoded)"
    if got == unquote(text, encoding="latin-1"):
        return "the percent-encoded bytes decoded as Latin-1, not UTF-8"
    if got in (unquote(text), unquote(text).replace("+", " "), unquote_plus(text)):
        return ("every percent-encoding decoded, the ASCII ones (%2F, %25) too"
                + (", and '+' taken for a space (form encoding, not a path's)"
                   if "+" in text and "+" not in got else "")
                + ": the handler can no longer tell a %2F inside a segment from a '/'")
    if got == iri_path(text).replace("+", " "):
        return "'+' taken for a space (form encoding, not a path's: '+' is itself there)"
    return "another path"


def which_pieces(got: bytes) -> str:
    """What a body that is not the whole of PIECES holds, in words."""
    if not got:
        return "an empty body (what the last, empty DATA frame carried)"
    for n, piece in enumerate(PIECES, start=1):
        if got == piece:
            return f"only DATA frame {n} of {len(PIECES)} ({len(got)} bytes)"
    whole = b"".join(PIECES)
    if whole.startswith(got):
        return f"its first {len(got)} bytes only"
    if whole.endswith(got):
        return f"its last {len(got)} bytes only"
    if valid_utf8(got):
        return (f"{len(got)} bytes that went through a text decoding (valid UTF-8, which "
                "the body is not): its bytes that are not UTF-8 (a PNG signature, an é "
                "cut in two by a DATA frame's end) came back replaced (U+FFFD) or dropped")
    return f"{len(got)} bytes that are not a part of it in order"


def valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Gate:
    """The test's server's application: /slow waits until /fast has been handled, or gives
    up after WAIT seconds: a client that sends its requests on independent streams gets
    200 for both; one that waits for each response before the next request makes /slow
    give up with 504. /pieces answers PIECES, a body in several DATA frames."""

    def __init__(self) -> None:
        self.fast_done = asyncio.Event()

    async def handler(self, path: str) -> tuple[int, Body]:
        if path == "/pieces":
            return 200, PIECES
        if path == "/slow":
            try:
                await asyncio.wait_for(self.fast_done.wait(), WAIT)
            except TimeoutError:
                return 504, b"gave up waiting for /fast"
            return 200, b"slow ok"
        if path == "/fast":
            self.fast_done.set()
        if path == "/hinted":
            return 200, Framed(b"/hinted ok", interim=True)
        if path == "/trailed":
            return 200, Framed(b"/trailed ok", trailers=True)
        if path in BODILESS:
            return BODILESS[path][0], Bodiless()
        if path == "/closing":
            return 200, Closing()
        return 200, f"{path} ok".encode()


# ---------------------------------------------------------------------------- the test's client


@dataclass
class Observed:
    """What the test's client saw on one connection."""

    alpn: str | None = None
    early_data_accepted: bool = False
    session_resumed: bool = False
    responses: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # paths, in the order they completed
    reset: dict[str, int] = field(default_factory=dict)  # path -> the server's error code
    headers: dict[str, int] = field(default_factory=dict)  # path -> status of its HEADERS
    closed: str | None = None  # how the server closed the connection, if it did


class ProbeClient(QuicConnectionProtocol):
    """The test's own HTTP/3 client (aioquic), used to probe the learner's server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.seen = Observed()
        self.handshake = asyncio.get_running_loop().create_future()
        self.paths: dict[int, str] = {}
        self.status: dict[int, int] = {}
        self.bodies: dict[int, bytes] = {}
        self.done: dict[str, asyncio.Event] = {}
        self.on_complete: Callable[[str], None] = lambda path: None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.seen.alpn = event.alpn_protocol
            self.seen.early_data_accepted = event.early_data_accepted
            self.seen.session_resumed = event.session_resumed
            if not self.handshake.done():
                self.handshake.set_result(None)
        if isinstance(event, ConnectionTerminated):
            self.seen.closed = f"error code {event.error_code}: {event.reason_phrase!r}"
            if not self.handshake.done():
                self.handshake.set_exception(ConnectionError(event.reason_phrase))
        if isinstance(event, StreamReset) and event.stream_id in self.paths:
            self.seen.reset[self.paths[event.stream_id]] = event.error_code
        for h3_event in self.h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        sid = getattr(event, "stream_id", None)
        if sid not in self.paths:
            return
        if isinstance(event, HeadersReceived):
            self.status[sid] = int(dict(event.headers).get(b":status", b"0"))
            self.seen.headers[self.paths[sid]] = self.status[sid]
        elif isinstance(event, DataReceived):
            self.bodies[sid] = self.bodies.get(sid, b"") + event.data
        if getattr(event, "stream_ended", False):
            path = self.paths[sid]
            self.seen.responses[path] = (self.status.get(sid, 0), self.bodies.get(sid, b""))
            self.seen.order.append(path)
            self.done[path].set()
            self.on_complete(path)

    def get(self, path: str) -> asyncio.Event:
        sid = self._quic.get_next_available_stream_id()
        self.paths[sid] = path
        self.done[path] = asyncio.Event()
        method, body, _ = LATE_FIN.get(path, (b"GET", None, ""))
        self.h3.send_headers(sid, [(b":method", method), (b":scheme", b"https"),
                                   (b":authority", SERVER_NAME.encode()),
                                   (b":path", uri_path(path))], end_stream=body is None)
        if body is not None:  # the request ends later, in a datagram of its own
            self.transmit()
            self.h3.send_data(sid, body, end_stream=path not in REQUEST_TRAILERS)
            if path in REQUEST_TRAILERS:  # ... in its trailers, after the body
                self.transmit()
                self.h3.send_headers(sid, REQUEST_TRAILERS[path], end_stream=True)
        return self.done[path]


async def probe(port: int, certs: Certs, paths: list[str],
                ticket: SessionTicket | None = None,
                on_complete: Callable[[str], None] = lambda path: None,
                unanswered_ok: bool = False,
                sent: Callable[[ProbeClient], Awaitable[None]] | None = None,
                settled: Callable[[], bool] | None = None,
                ) -> tuple[Observed, list[SessionTicket]]:
    """GET ``paths`` concurrently over one connection to the learner's server. With a
    ticket, the requests are sent at once as 0-RTT data. ``unanswered_ok``: a path left
    without a response (its stream reset, the connection closed, or nothing within
    WAIT * 2) is the caller's to judge, from what ``Observed`` holds; ``settled()`` (run
    on a thread: it may block) says the server has done all it will do, so the wait ends
    then, after a PING round trip has brought in what the server sent before it.
    ``sent(client)`` is awaited once the handshake is done, before the wait."""
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=SERVER_NAME)
    config.load_verify_locations(certs.ca)
    config.session_ticket = ticket
    tickets: list[SessionTicket] = []
    async with connect(HOST, port, configuration=config, create_protocol=ProbeClient,
                       session_ticket_handler=tickets.append,
                       wait_connected=ticket is None) as protocol:
        client: ProbeClient = protocol  # type: ignore[assignment]
        client.on_complete = on_complete
        waits = {path: client.get(path) for path in paths}
        client.transmit()
        await bounded("the QUIC handshake with your server", client.handshake)
        if sent is not None:
            await sent(client)
        if unanswered_ok:
            deadline = asyncio.get_running_loop().time() + WAIT * 2
            while not (all(done.is_set() or path in client.seen.reset
                           for path, done in waits.items()) or client.seen.closed) \
                    and asyncio.get_running_loop().time() < deadline:
                if settled is not None and await asyncio.to_thread(settled):
                    # The server's datagrams sent before it answers this PING arrive first.
                    # A connection that ends meanwhile, or a PING left unanswered, is judged
                    # from what was seen.
                    with suppress(ConnectionError, TimeoutError):
                        await asyncio.wait_for(client.ping(), WAIT)
                    break
                await asyncio.sleep(0.02)
            return copy.copy(client.seen), tickets  # before our own close is recorded
        for path, done in waits.items():
            try:
                await asyncio.wait_for(done.wait(), WAIT * 2)
            except TimeoutError:
                pytest.fail(f"your server sent no complete response to {path} within "
                            f"{WAIT * 2:.0f} s", pytrace=False)
        return client.seen, tickets


@contextmanager
def learner_server(learner: Any, certs: Certs) -> Iterator[Any]:
    """The learner's server, started where the learner's code runs (harness.py): /slow
    there waits until the test calls ``release()``, after its client received /fast."""
    server = learner.harness().LearnerServer(learner.load("h3"), certs.cert, certs.key, WAIT)
    try:
        if server.problem:
            pytest.fail(server.problem, pytrace=False)
        yield server
    finally:
        server.close()


def release_on(server: Any, wanted: str) -> Callable[[str], None]:
    """A completion callback for the test's client: release /slow once ``wanted`` is in."""
    def on_complete(path: str) -> None:
        if path == wanted:
            server.release()
    return on_complete


# ---------------------------------------------------------------------------- the test's server


@dataclass
class Arrival:
    path: str
    early: bool        # arrived before the handshake completed: 0-RTT data
    connection: int    # which QUIC connection (1, 2, ...)
    raw: bytes = b""   # the :path as it came on the wire


class ProbeServer(QuicConnectionProtocol):
    """The test's own HTTP/3 server (aioquic), used to probe the learner's client.

    It answers a request once its stream has ended (the client's FIN). A GET's HEADERS
    that come without it are followed by a PING: the client reads it, sends what it has
    queued and acknowledges it, so a FIN still missing when the ACK arrives is one the
    client never sent with its request. That request is noted in ``unended`` and answered
    all the same (a server may answer before a request ends, RFC 9114 section 4.1), so the
    test can say so at once instead of both sides waiting for each other."""

    log: list[Arrival]
    alpns: list[str | None]
    unended: list[str]
    refused: list[str]  # why a client closed a connection before its handshake completed
    handler: Callable[[str], Awaitable[tuple[int, Body]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3: H3Connection | None = None
        self.handshake_done = False
        self.connection = len(self.alpns) + 1
        self.alpns.append(None)
        self.paths: dict[int, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.answered: set[int] = set()
        self.pings: dict[int, int] = {}  # PING uid -> the stream whose FIN it waits for

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, PingAcknowledged) and event.uid in self.pings:
            sid = self.pings.pop(event.uid)
            if sid not in self.answered:  # the client is waiting, its request never ended
                self.unended.append(self.paths[sid])
                self.answer(sid)
        if isinstance(event, ProtocolNegotiated):
            self.alpns[self.connection - 1] = event.alpn_protocol
            if event.alpn_protocol in H3_ALPN:
                self.h3 = H3Connection(self._quic)
        if isinstance(event, HandshakeCompleted):
            self.handshake_done = True
        if isinstance(event, ConnectionTerminated) and not self.handshake_done:
            self.refused.append(f"error {event.error_code}: {event.reason_phrase}")
        if self.h3 is None:
            return
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                raw = dict(h3_event.headers).get(b":path", b"")
                path = iri_path(raw.decode("ascii", errors="replace"))
                self.paths[h3_event.stream_id] = path
                self.log.append(Arrival(path, not self.handshake_done, self.connection, raw))
                method = dict(h3_event.headers).get(b":method")
                if not h3_event.stream_ended and method == b"GET":
                    uid = len(self.pings) + 1000 * h3_event.stream_id
                    self.pings[uid] = h3_event.stream_id
                    self._quic.send_ping(uid)
                    self.transmit()
            if isinstance(h3_event, HeadersReceived | DataReceived) and h3_event.stream_ended:
                self.answer(h3_event.stream_id)

    def answer(self, sid: int) -> None:
        if sid in self.answered:
            return
        self.answered.add(sid)
        task = asyncio.create_task(self.respond(sid))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def respond(self, sid: int) -> None:
        status, body = await self.handler(self.paths[sid])
        assert self.h3 is not None
        if isinstance(body, Closing):  # no answer: the whole connection goes
            self._quic.close(error_code=CLOSING_ERROR,
                             reason_phrase="the test's server closes the connection")
            self.transmit()
            return
        if isinstance(body, Bodiless):  # the HEADERS frame carries the stream's FIN
            self.h3.send_headers(sid, [(b":status", str(status).encode())], end_stream=True)
            self.transmit()
            return
        if isinstance(body, Framed):
            if body.interim:
                self.h3.send_headers(sid, EARLY_HINTS)
                self.transmit()
            self.h3.send_headers(sid, [(b":status", str(status).encode())])
            self.h3.send_data(sid, body.body, end_stream=not body.trailers)
            if body.trailers:
                self.transmit()
                self.h3.send_headers(sid, TRAILERS, end_stream=True)
            self.transmit()
            return
        self.h3.send_headers(sid, [(b":status", str(status).encode())])
        # A body given in pieces leaves as one DATA frame each, then an empty one with FIN.
        pieces = [body] if isinstance(body, bytes) else [*body, b""]
        for n, piece in enumerate(pieces, start=1):
            self.h3.send_data(sid, piece, end_stream=n == len(pieces))
            self.transmit()


class TicketStore(dict[bytes, SessionTicket]):
    def add(self, ticket: SessionTicket) -> None:
        self[ticket.ticket] = ticket

    def take(self, label: bytes) -> SessionTicket | None:
        return self.pop(label, None)


@dataclass
class Probe:
    server: QuicServer
    port: int
    log: list[Arrival]
    alpns: list[str | None]
    unended: list[str]  # GETs whose stream the client had not ended while it waited
    refused: list[str]  # why the client closed a connection during its handshake


async def probe_server(certs: Certs, handler: Callable[[str], Awaitable[tuple[int, Body]]]
                       ) -> Probe:
    log: list[Arrival] = []
    alpns: list[str | None] = []
    unended: list[str] = []
    refused: list[str] = []
    protocol = type("BoundProbeServer", (ProbeServer,),
                    {"log": log, "alpns": alpns, "unended": unended, "refused": refused,
                     "handler": staticmethod(handler)})
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(certs.cert, certs.key)
    store = TicketStore()
    server = await serve(HOST, 0, configuration=config, create_protocol=protocol,
                         session_ticket_fetcher=store.take, session_ticket_handler=store.add)
    return Probe(server, bound_port(server), log, alpns, unended, refused)


async def learner_fetch(learner: Any, probe: Probe, certs: Certs, paths: list[str],
                        ticket: Any = None) -> tuple[str, Any]:
    """The learner's fetch(), run to its end where the learner's code runs (harness.py),
    while this loop keeps serving the test's server: ("ok", FetchResult) or (kind,
    problem)."""
    kind, value = await asyncio.to_thread(
        learner.harness().fetch, learner.load("h3"), probe.port, paths, certs.ca,
        SERVER_NAME, ticket, WAIT * 2)
    if probe.unended:
        pytest.fail(
            f"your client sent GET {', '.join(sorted(set(probe.unended)))} and waited for "
            "the response without ending the request stream (no FIN: END_STREAM was not "
            "set with the request); expected each request stream ended with its request\n"
            "A client MUST close its side of the stream after sending a "
            "request (RFC 9114 section 4.1): a server reads the request until the FIN, so "
            "one that waits for it (most do) never answers, and both sides wait for each "
            "other. Send the HEADERS with end_stream=True (a GET has no body).",
            pytrace=False)
    return str(kind), value


async def fetched(learner: Any, probe: Probe, certs: Certs, paths: list[str],
                  ticket: Any = None) -> Any:
    kind, value = await learner_fetch(learner, probe, certs, paths, ticket)
    # A client that closed during the handshake: the server reports it once its draining
    # period is over (3 PTOs, about a second); only a failed fetch waits for it.
    until = time.monotonic() + 2 * WAIT
    while kind != "ok" and not probe.refused and time.monotonic() < until:
        await asyncio.sleep(0.02)
    if kind != "ok" and probe.refused:
        hostname = "hostname" in probe.refused[0]
        pytest.fail(
            f"your client closed the connection during its handshake ({probe.refused[0]}): "
            f"the test's server has a certificate for {SERVER_NAME!r}, the server_name "
            "fetch() was given, signed by cafile's CA"
            + (" - your client checked it against the address it connected to, not against "
               "server_name: set QuicConfiguration(server_name=server_name) (connect() "
               "falls back on the host when the configuration names none). A client "
               "reaches a server by address and verifies it by name: the name is what the "
               "certificate proves" if hostname else "")
            + f"\n{value}", pytrace=False)
    if kind != "ok":
        pytest.fail(str(value), pytrace=False)
    return value


# ---------------------------------------------------------------------------- the learner's server


def test_server_speaks_h3_with_independent_streams(learner: Any, certs: Certs) -> None:
    with learner_server(learner, certs) as server:
        # /slow waits until the test's client has received all of /fast: the server must
        # deliver one stream while another is still open.
        seen, _ = run(probe(server.port, certs, ["/slow", "/fast"],
                            on_complete=release_on(server, "/fast")))
    assert seen.alpn == "h3", (
        f"the handshake negotiated ALPN {seen.alpn!r}, expected 'h3'\nBoth sides must "
        "offer alpn_protocols=H3_ALPN: ALPN is how a QUIC connection says it carries HTTP/3.")
    assert seen.responses.get("/fast") == (200, b"/fast ok"), (
        f"/fast got {seen.responses.get('/fast')}, expected (200, b'/fast ok')")
    assert seen.responses.get("/slow") == (200, b"slow ok"), (
        f"/slow got {seen.responses.get('/slow')}, expected (200, b'slow ok')\n/slow's "
        "handler waits until the client has received /fast: it gave up, so your server "
        "answered the second stream only after the first. Start one task per request "
        "stream.")
    assert seen.order == ["/fast", "/slow"], (
        f"responses completed in the order {seen.order}, expected /fast before /slow")


def test_server_answers_a_failing_handler_with_500(learner: Any, certs: Certs) -> None:
    """/boom's handler raises: its stream must still end in a response (500), and /fast
    on the same connection is answered as usual."""
    with learner_server(learner, certs) as server:
        # Judged once the server has dealt with the failure (its loop idle after /boom's
        # handler raised), not after a deadline: a stream left unanswered shows then.
        seen, _ = run(probe(server.port, certs, ["/boom", "/fast"], unanswered_ok=True,
                            settled=lambda: bool(server.idle_after_failure(["/boom", "/fast"],
                                                                           1.0))))
    boom = seen.responses.get("/boom")
    fast = f"/fast on the same connection got {seen.responses.get('/fast')}"
    why = ("Every request stream must end in a response: catch the handler's exception in "
           "the stream's task and answer 500. One failing request must cost only its own "
           "stream - not the connection, and not a client left waiting that cannot tell a "
           "failure from a slow handler.")
    if seen.closed and boom is None:
        pytest.fail(f"your server closed the connection ({seen.closed}) when /boom's handler "
                    f"raised RuntimeError; expected a 500 response on /boom's stream ({fast})"
                    f"\n{why}", pytrace=False)
    if "/boom" in seen.reset:
        pytest.fail(f"your server reset /boom's stream (error code {seen.reset['/boom']}) "
                    "when its handler raised RuntimeError; expected a 500 response on it "
                    f"({fast})\nNo response has started yet: a 500 tells the client what "
                    f"happened, a reset tells it nothing. {why}", pytrace=False)
    assert boom is not None, (
        f"/boom's handler raised RuntimeError and your server sent nothing on its stream - "
        f"no response, no reset - by the time it had nothing left to do (its event loop "
        f"idle; or within {WAIT * 2:.0f} s) ({fast}): the stream's task ended with the "
        f"exception and the answer was forgotten\n{why}")
    assert boom[0] == 500, (
        f"/boom, whose handler raised RuntimeError, got status {boom[0]}, expected 500 "
        f"(a server error)\n{why}")
    assert seen.responses.get("/fast") == (200, b"/fast ok"), (
        f"{fast}, expected (200, b'/fast ok') beside /boom's 500")


LATE_FIN_WHY = (
    "A request stream ends with its FIN, which may come in its HEADERS frame "
    "(HeadersReceived.stream_ended) or later, with or after its body "
    "(DataReceived.stream_ended, possibly with empty data), or on trailers (a second "
    "HEADERS frame after the body, without :path: not a new request). Remember each "
    "stream's path when its first HEADERS frame arrives, and start its handler when the "
    "stream ends, whichever event says so.")


async def late_ends_handled(client: ProbeClient, server: Any) -> None:
    """Once your server's QUIC stack has acknowledged each LATE_FIN request's end (so its
    quic_event_received() has seen it) and its loop has nothing left to run, the handler
    must have been called for each: the mistake is told then, not after a wait for a
    response that cannot come."""
    late = [sid for sid, path in client.paths.items() if path in LATE_FIN]
    streams = client._quic._streams  # the test's own client: its FINs' delivery

    def acknowledged() -> bool:
        return all(sid not in streams or streams[sid].sender.is_finished for sid in late)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT * 2
    while not acknowledged() and not client.seen.closed and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if not acknowledged():
        return  # judged from the responses, as they come or not
    called = await asyncio.to_thread(server.called_once_idle, WAIT)
    if called is None:
        return
    strays = [path for path in called if path not in client.paths.values()]
    for path, (method, body, how) in LATE_FIN.items():
        if path in REQUEST_TRAILERS and path not in called and strays:
            pytest.fail(
                f"your server took the trailers of {path}, {how}, for the request's "
                f"headers: it called the handler with {strays}, a path no request had, "
                f"and never with {path}; expected the path of the stream's first HEADERS "
                f"frame\n{LATE_FIN_WHY}", pytrace=False)
        if path not in called and path not in client.seen.responses:
            answered = ", ".join(f"{p} {client.seen.responses[p][0]}" for p in
                                 client.seen.order) or "nothing yet"
            pytest.fail(
                f"your server never handled {path}, {how} ({method.decode()}, "
                f"{len(body)}-byte body): the request's end reached it (its QUIC stack "
                "acknowledged the FIN) and it went idle without calling the handler "
                f"for {path} (answered so far: {answered})\n{LATE_FIN_WHY}", pytrace=False)


def test_server_answers_a_request_that_ends_after_its_headers(learner: Any,
                                                             certs: Certs) -> None:
    """A request is complete when its stream ends, and the FIN need not ride on its
    HEADERS frame: a POST's comes with its body or its trailers, and a client may end a
    GET with an empty DATA frame. All must be answered, like /plain beside them."""
    paths = [*LATE_FIN, "/plain"]
    why = LATE_FIN_WHY
    with learner_server(learner, certs) as server:
        seen, _ = run(probe(server.port, certs, paths, unanswered_ok=True,
                            sent=lambda client: late_ends_handled(client, server)))
    plain = f"/plain (FIN on its HEADERS) got {seen.responses.get('/plain')}"
    for path, (method, body, how) in LATE_FIN.items():
        got = seen.responses.get(path)
        if got == (200, f"{path} ok".encode()):
            continue
        if got is None:
            ended = (f"reset its stream (error code {seen.reset[path]})" if path in
                     seen.reset else f"closed the connection ({seen.closed})" if seen.closed
                     else f"sent nothing on its stream for {WAIT * 2:.0f} s")
            pytest.fail(f"your server never answered {path}, {how} ({method.decode()}, "
                        f"{len(body)}-byte body): it {ended}; {plain}\n{why}", pytrace=False)
        if path in REQUEST_TRAILERS and got[0] >= 400:
            pytest.fail(f"your server refused {path}, {how}, with {got[0]}: it took the "
                        "trailers (a HEADERS frame without :path) for a malformed request; "
                        f"expected (200, {f'{path} ok'.encode()!r}); {plain}\n{why}",
                        pytrace=False)
        pytest.fail(f"{path}, {how}, got {got}, expected (200, {f'{path} ok'.encode()!r})"
                    f"; {plain}\n{why}", pytrace=False)
    assert seen.responses.get("/plain") == (200, b"/plain ok"), (
        f"{plain}, expected (200, b'/plain ok')")


# Two connections, each with one request on its first stream (stream 0 on both: stream ids
# are numbered per connection), both open at once.
TWO_CONNECTIONS = ("/first-connection", "/second-connection")


async def two_connections_at_once(server: Any, certs: Certs
                                  ) -> tuple[list[Observed], list[str] | None]:
    """Open two connections to the learner's server; on each, send one GET's HEADERS
    without its end; once the server's QUIC stack has acknowledged both (so its
    quic_event_received() has seen both), end the first connection's request with an empty
    DATA frame, then the second's. Return what each connection saw, and the paths the
    handler was called with once the server had nothing left to do."""
    def configuration() -> QuicConfiguration:
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                   server_name=SERVER_NAME)
        config.load_verify_locations(certs.ca)
        return config

    loop = asyncio.get_running_loop()

    async def until(what: Callable[[], bool]) -> bool:
        deadline = loop.time() + WAIT * 2
        while not what() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return what()

    async with connect(HOST, server.port, configuration=configuration(),
                       create_protocol=ProbeClient) as one, \
            connect(HOST, server.port, configuration=configuration(),
                    create_protocol=ProbeClient) as two:
        clients: list[ProbeClient] = [one, two]  # type: ignore[list-item]
        sids = []
        for client, path in zip(clients, TWO_CONNECTIONS, strict=True):
            sid = client._quic.get_next_available_stream_id()
            client.paths[sid] = path
            client.done[path] = asyncio.Event()
            client.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                         (b":authority", SERVER_NAME.encode()),
                                         (b":path", path.encode())], end_stream=False)
            client.transmit()
            sids.append(sid)

        def senders() -> list[Any]:
            """The streams' senders still kept (a stream done both ways is dropped)."""
            streams = [client._quic._streams.get(sid)
                       for client, sid in zip(clients, sids, strict=True)]
            return [stream.sender for stream in streams if stream is not None]

        # Both HEADERS acknowledged: both requests are open on the server at once.
        await until(lambda: all(s._buffer_start == s._buffer_stop for s in senders()))
        for client, sid in zip(clients, sids, strict=True):
            client.h3.send_data(sid, b"", end_stream=True)
            client.transmit()
        called = None
        if await until(lambda: all(s.is_finished for s in senders())):
            called = await asyncio.to_thread(server.called_once_idle, WAIT)
            for client in clients:  # what the server sent before answering a PING is in
                with suppress(ConnectionError, TimeoutError):
                    await asyncio.wait_for(client.ping(), WAIT)
        for client, path in zip(clients, TWO_CONNECTIONS, strict=True):
            if path not in client.seen.responses and called is None:
                with suppress(TimeoutError):
                    await asyncio.wait_for(client.done[path].wait(), WAIT)
        return [copy.copy(client.seen) for client in clients], called


def test_server_keeps_each_connections_streams_apart(learner: Any, certs: Certs) -> None:
    """Stream ids are numbered per connection: every connection's first request is on
    stream 0. Two connections with a request open on stream 0 at once must each get the
    answer to their own request - what the server keeps per stream is kept per
    connection."""
    with learner_server(learner, certs) as server:
        seen, called = run(two_connections_at_once(server, certs))
    why = ("Stream ids are per connection: every client's first request is on stream 0, "
           "so two connections have a stream 0 open at once. Keep what you remember about "
           "a stream (its path) on the connection's protocol object, created in __init__ "
           "(self.paths = {}), never in a dict all connections share - a class attribute "
           "(paths: dict = {} in the class body) or a module global.")
    handled = (f"; the handler was called with {called}" if called is not None else "")
    for observed, path, other in zip(seen, TWO_CONNECTIONS, reversed(TWO_CONNECTIONS),
                                     strict=True):
        got = observed.responses.get(path)
        if got == (200, f"{path} ok".encode()):
            continue
        if got is not None and got[1] == f"{other} ok".encode():
            pytest.fail(f"the request for {path} on one connection was answered with "
                        f"{got}, the answer to {other}, the request open on stream 0 of "
                        f"another connection at the same time{handled}\n{why}",
                        pytrace=False)
        ended = (f"got {got}" if got is not None else
                 f"its stream was reset (error code {observed.reset[path]})"
                 if path in observed.reset else
                 f"the connection was closed ({observed.closed})" if observed.closed else
                 "it got no response")
        pytest.fail(f"the request for {path} (on stream 0, while another connection had "
                    f"its own request open on its stream 0): {ended}{handled}; expected "
                    f"(200, {f'{path} ok'.encode()!r})\n{why}", pytrace=False)


def test_server_accepts_0rtt_on_resumption(learner: Any, certs: Certs) -> None:
    with learner_server(learner, certs) as server:
        _, tickets = run(probe(server.port, certs, ["/first"]))
        if not tickets:
            pytest.fail("your server issued no session ticket on the first connection\n"
                        "aioquic hands out tickets, and resumes sessions, only when the "
                        "server has a ticket store: serve(..., session_ticket_handler="
                        "store.add, session_ticket_fetcher=store.pop).", pytrace=False)
        second, _ = run(probe(server.port, certs, ["/zero"], ticket=tickets[-1]))
        # The same ticket once more: what an attacker who recorded the first flight sends.
        replay, _ = run(probe(server.port, certs, ["/again"], ticket=tickets[-1]))
    assert second.session_resumed, (
        "the second connection presented the session ticket from the first, but the "
        "server did not resume the session\nA server can only resume sessions whose "
        "tickets it can look up again: pass session_ticket_fetcher and "
        "session_ticket_handler (a ticket store) to serve().")
    assert second.early_data_accepted, (
        "the session was resumed but the server refused the 0-RTT early data")
    assert second.responses.get("/zero") == (200, b"/zero ok"), (
        f"the 0-RTT request got {second.responses.get('/zero')}, expected (200, b'/zero ok')")
    assert not replay.early_data_accepted, (
        "a session ticket presented a second time was accepted again, with its 0-RTT data: "
        "an attacker who captured the first flight can replay it\nEarly data has no "
        "replay protection of its own: make every ticket single-use (the store's fetcher "
        "pops the ticket, it does not just look it up), so a replayed ticket falls back to "
        "a full handshake.")
    assert replay.responses.get("/again") == (200, b"/again ok"), (
        f"the request sent with the replayed ticket got {replay.responses.get('/again')}, "
        "expected (200, b'/again ok') after a full handshake")


def test_server_ends_a_response_with_an_empty_body(learner: Any, certs: Certs) -> None:
    """/nothing's handler returns (204, b""): a response with no body must still end its
    stream - with the HEADERS frame (end_stream=True) or an empty DATA frame - or the
    client waits for the rest of a response that is already whole."""
    paths = ["/nothing", "/fast"]
    with learner_server(learner, certs) as server:
        # Judged once the server has nothing left to do after both handlers were called.
        seen, _ = run(probe(server.port, certs, paths, unanswered_ok=True,
                            settled=lambda: set(paths) <= set(
                                server.called_once_idle(1.0) or [])))
    got = seen.responses.get("/nothing")
    fast = f"/fast on the same connection got {seen.responses.get('/fast')}"
    why = ("A response ends when its stream ends (RFC 9114 4.1), and an empty body is no "
           "exception: send the HEADERS frame with end_stream=True, or send_data(stream_id, "
           "b\"\", end_stream=True) - a loop over the body's chunks that ends the stream "
           "on the last chunk never ends it when there is none.")
    if got is None and "/nothing" in seen.headers:
        pytest.fail(f"your server sent /nothing's HEADERS (status {seen.headers['/nothing']})"
                    " but never ended its stream: the handler returned (204, b''), an empty "
                    "body, and no FIN followed, by the time the server had nothing left to "
                    f"do; expected (204, b'') ({fast})\n{why}", pytrace=False)
    assert got == (204, b""), (
        f"/nothing, whose handler returned (204, b''), got {got}, expected (204, b'') "
        f"({fast})\n{why}")
    assert seen.responses.get("/fast") == (200, b"/fast ok"), (
        f"{fast}, expected (200, b'/fast ok') beside /nothing's 204")


def test_server_decodes_a_non_ascii_path(learner: Any, certs: Certs) -> None:
    """The test's client asks for NON_ASCII_PATH and RESERVED_PATH, sent as :path in
    percent-encoded UTF-8: the handler (which answers f"{path} ok") must get each path as
    the client meant it - its UTF-8 decoded, its ASCII (%2F, %25, +) as it came."""
    with learner_server(learner, certs) as server:
        seen, _ = run(probe(server.port, certs, PATHS))
    for path in PATHS:
        sent = uri_path(path)
        status, body = seen.responses[path]
        want = f"{path} ok".encode()
        if body != want and body.endswith(b" ok") and valid_utf8(body):
            got = body[:-3].decode()
            pytest.fail(f"the test's client asked for {path!r}, sent as :path {sent!r}, and "
                        f"your server's handler was called with {got!r}: "
                        f"{path_mojibake(got, sent)}; expected {path!r}\n{PATH_WHY}",
                        pytrace=False)
        assert (status, body) == (200, want), (
            f"{path!r} (sent as :path {sent!r}) got {(status, body)}, expected "
            f"(200, {want!r})\n{PATH_WHY}")


def test_server_resumes_each_clients_ticket(learner: Any, certs: Certs) -> None:
    """Two clients connect, each gets its own session ticket; then each resumes with its
    ticket and sends 0-RTT. The store must hold every ticket it issued until it is used,
    not just one."""
    with learner_server(learner, certs) as server:
        tickets: list[SessionTicket] = []
        for path in ("/client-one", "/client-two"):
            _, issued = run(probe(server.port, certs, [path]))
            if not issued:
                pytest.fail(f"your server issued no session ticket on the connection for "
                            f"{path}\nServe with a ticket store: serve(..., "
                            "session_ticket_handler=store.add, session_ticket_fetcher="
                            "store.pop).", pytrace=False)
            tickets.append(issued[-1])
        resumed = [run(probe(server.port, certs, [f"{path}-again"], ticket=ticket))
                   [0] for path, ticket in zip(("/client-one", "/client-two"), tickets,
                                               strict=True)]
    why = ("A ticket store keeps every ticket the server issued, each under its own label "
           "(ticket.ticket), until that ticket is presented (then popped: single use): many "
           "clients hold tickets at once, and a store with one slot forgets all of them "
           "but one.")
    for which, other, seen in (("first", "second", resumed[0]),
                               ("second", "first", resumed[1])):
        did = ("resumed the session but refused its 0-RTT data" if seen.session_resumed
               else "did not resume the session")
        assert seen.session_resumed and seen.early_data_accepted, (
            f"the {which} of two clients presented the session ticket your server had "
            f"issued it, after the {other} client had got its own, and the server {did}; "
            f"expected both clients to resume with 0-RTT: the store lost the {which} "
            f"client's ticket\n{why}")
        path = f"/client-{'one' if which == 'first' else 'two'}-again"
        assert seen.responses.get(path) == (200, f"{path} ok".encode()), (
            f"the {which} client's resumed request {path} got {seen.responses.get(path)}, "
            f"expected (200, {f'{path} ok'.encode()!r})")


# ---------------------------------------------------------------------------- the learner's client


def test_client_speaks_h3_with_independent_streams(learner: Any, certs: Certs) -> None:
    gate = Gate()

    async def scenario() -> tuple[Any, Probe]:
        probe = await probe_server(certs, gate.handler)
        try:
            return await fetched(learner, probe, certs, ["/slow", "/fast"]), probe
        finally:
            probe.server.close()

    result, probe = run(scenario())
    assert probe.alpns == ["h3"], (
        f"the server saw {len(probe.alpns)} connection(s) with ALPN {probe.alpns}, expected "
        "one connection offering 'h3' (alpn_protocols=H3_ALPN)")
    assert result.alpn == "h3", f"FetchResult.alpn is {result.alpn!r}, expected 'h3'"
    assert result.responses.get("/slow") == (200, b"slow ok"), (
        f"/slow got {result.responses.get('/slow')}, expected (200, b'slow ok')\nThe "
        "server's /slow handler waits for /fast: it gave up, so /fast was only requested "
        "after /slow had finished. Send every request on its own stream first, then wait "
        "for the responses.")
    assert result.responses.get("/fast") == (200, b"/fast ok"), (
        f"/fast got {result.responses.get('/fast')}, expected (200, b'/fast ok')")


def test_client_reassembles_a_body_sent_in_pieces(learner: Any, certs: Certs) -> None:
    gate = Gate()

    async def scenario() -> Any:
        probe = await probe_server(certs, gate.handler)
        try:
            return await fetched(learner, probe, certs, ["/pieces"])
        finally:
            probe.server.close()

    result = run(scenario())
    whole = b"".join(PIECES)
    status, got = result.responses.get("/pieces", (None, b""))
    if (status, got) != (200, whole):  # not assert: pytest would diff 44 KB (minutes on CI)
        pytest.fail(
            f"/pieces got status {status} and {which_pieces(got)}, expected 200 and the whole "
            f"{len(whole)}-byte body, which the server sent as {len(PIECES)} DATA frames and "
            "an empty one ending the stream\nA QUIC stream is a byte stream delivered in "
            "pieces: one response body comes as many DataReceived events on its stream. "
            "Append each event's data to that stream's body, and take the body only when an "
            "event has stream_ended set.", pytrace=False)


def test_client_takes_the_final_responses_status(learner: Any, certs: Certs) -> None:
    """A response may hold HEADERS frames besides its own (RFC 9114 4.1): an interim
    response (103 Early Hints) before it, trailers after its body. The status is the
    final response's; the others change neither status nor body."""
    gate = Gate()

    async def scenario() -> Any:
        probe = await probe_server(certs, gate.handler)
        try:
            return await fetched(learner, probe, certs, ["/hinted", "/trailed"])
        finally:
            probe.server.close()

    result = run(scenario())
    why = ("Only the final response's HEADERS frame carries its status: an interim one "
           "(:status 1xx) may come before it, and trailers (no :status, after the body) "
           "may end the stream. Take the status from the first HEADERS whose :status is "
           "200 or more, and keep collecting the body until stream_ended.")
    shapes = {"/hinted": "an interim 103 Early Hints, then the final 200 response",
              "/trailed": "a 200 response whose stream ended with trailers (a HEADERS "
                          "frame after the body, with no :status)"}
    for path, shape in shapes.items():
        want = (200, f"{path} ok".encode())
        got = result.responses.get(path)
        if got == want:
            continue
        status = got[0] if got else None
        seen = ("the 103 Early Hints was taken for the response's status" if status == 103
                else "the trailers were taken for the response's headers (they carry no "
                     ":status)" if path == "/trailed" and status != 200
                else "the body was lost or cut" if status == 200 else
                "a status the server never sent")
        pytest.fail(f"{path} got {got}: {seen}; expected {want}, the server sent {shape}"
                    f"\n{why}", pytrace=False)


def test_client_takes_a_response_that_ends_on_its_headers(learner: Any,
                                                          certs: Certs) -> None:
    """A response need not have a body: a 204 or a 304 is its HEADERS frame alone, and that
    frame carries the stream's FIN (HeadersReceived.stream_ended), with no DATA frame
    after it. Such a response is complete then, with an empty body, like /fast beside it."""
    gate = Gate()
    paths = [*BODILESS, "/fast"]

    async def scenario() -> tuple[str, Any]:
        probe = await probe_server(certs, gate.handler)
        try:
            return await learner_fetch(learner, probe, certs, paths)
        finally:
            probe.server.close()

    kind, value = run(scenario())
    sent = ", ".join(f"{path} with {what}" for path, (_, what) in BODILESS.items())
    why = ("A response is complete when its stream ends, and the FIN may come on its "
           "HEADERS frame (HeadersReceived.stream_ended) when it has no body: no DATA frame, "
           "no DataReceived event, ever. Finish a response on whichever event has "
           "stream_ended set, and start each stream's body empty, not on its first DATA.")
    if kind == "not implemented":
        pytest.fail(str(value), pytrace=False)
    if kind != "ok":
        ended = "never finished" if kind == "timed out" else "failed on them"
        pytest.fail(f"{value}: the server answered {sent}, each a HEADERS frame that ended "
                    f"the stream without any DATA frame (and /fast with a body), and your "
                    f"client {ended}\n{why}", pytrace=False)
    for path, (status, what) in BODILESS.items():
        got = value.responses.get(path)
        assert got == (status, b""), (
            f"{path} got {got}, expected ({status}, b''): the server sent {what}, a HEADERS "
            f"frame that ended the stream, without any DATA frame\n{why}")
    assert value.responses.get("/fast") == (200, b"/fast ok"), (
        f"/fast got {value.responses.get('/fast')}, expected (200, b'/fast ok') beside "
        f"{sent}")


def normal_uri(raw: bytes) -> bytes:
    """``raw`` normalized as RFC 3986 6.2.2 allows: hex digits upper-case, percent-encoded
    unreserved characters (letters, digits, -._~) decoded; nothing else."""
    def one(code: re.Match[bytes]) -> bytes:
        char = bytes.fromhex(code.group()[1:].decode())
        return char if re.fullmatch(rb"[A-Za-z0-9._~-]", char) else code.group().upper()
    return re.sub(rb"%[0-9A-Fa-f]{2}", one, raw)


def client_path_mistake(raw: bytes) -> str:
    """What a client that sent ``raw`` as :path for one of PATHS did, in words."""
    if not raw.isascii():
        return ("as raw UTF-8 bytes" if raw in [p.encode() for p in PATHS]
                else "with bytes outside ASCII")
    text = raw.decode("ascii")
    latin1 = ENCODED_NON_ASCII.sub(lambda run: unquote(run.group(), encoding="latin-1"), text)
    if latin1 in PATHS:
        return "percent-encoded Latin-1 bytes, not UTF-8"
    if unquote(text, errors="replace") in PATHS:
        return ("its ASCII percent-encoded too (% as %25, or ;, =, +, @ encoded): ASCII "
                "stays as it is - %2F sent as %252F is another path, and a reserved "
                "character and its encoding are different URIs (RFC 3986 2.2)")
    return "not the path's percent-encoded UTF-8"


def test_client_percent_encodes_a_non_ascii_path(learner: Any, certs: Certs) -> None:
    """fetch(PATHS): each :path the test's server receives must be ASCII, the path's UTF-8
    bytes percent-encoded and its ASCII (%2F, %25, ;, +) as given, and each response comes
    back under the path as given."""
    gate = Gate()

    async def scenario() -> tuple[tuple[str, Any], list[Arrival]]:
        probe = await probe_server(certs, gate.handler)
        try:
            return await learner_fetch(learner, probe, certs, PATHS), probe.log
        finally:
            probe.server.close()

    (kind, value), log = run(scenario())
    wants = [uri_path(path) for path in PATHS]
    for raw in sorted({arrival.raw for arrival in log}):
        if normal_uri(raw) not in [normal_uri(want) for want in wants]:
            pytest.fail(f"fetch({PATHS!r}) sent :path {raw!r}, {client_path_mistake(raw)}; "
                        f"expected {wants[0]!r} and {wants[1]!r} (the UTF-8 "
                        f"percent-encoded, the ASCII as given)\n{PATH_WHY}", pytrace=False)
    if kind != "ok":
        pytest.fail(str(value), pytrace=False)
    expected = {path: (200, f"{path} ok".encode()) for path in PATHS}
    got = {path: value.responses.get(path) for path in PATHS}
    assert got == expected, (
        f"fetch({PATHS!r}) returned responses {value.responses}, expected {expected}: "
        "each response is under the path as given")


def test_client_fails_when_the_server_closes_the_connection(learner: Any,
                                                            certs: Certs) -> None:
    """The test's server closes the connection (CONNECTION_CLOSE, H3_INTERNAL_ERROR) instead
    of answering /closing, as a server shutting down does: no response can come any more,
    so fetch() must end with an error at once - not wait for ever, not make one up."""
    gate = Gate()

    async def scenario() -> tuple[str, Any]:
        probe = await probe_server(certs, gate.handler)
        try:
            return await learner_fetch(learner, probe, certs, ["/closing"])
        finally:
            probe.server.close()

    kind, value = run(scenario())
    if kind == "not implemented":
        pytest.fail(str(value), pytrace=False)
    assert kind != "timed out", (
        "the test's server closed the connection (CONNECTION_CLOSE, H3_INTERNAL_ERROR) "
        "instead of answering /closing, and fetch() was still waiting for a response that "
        "can no longer come, once its connection had ended (or after "
        f"{WAIT * 2:.0f} s)\nOn ConnectionTerminated (after the "
        "handshake too, not only when it fails), fail every request still waiting - "
        "future.set_exception(ConnectionError(...)) - so fetch() raises at once: a client "
        f"that waits for ever on a closed connection hangs its caller.\n{value}")
    assert kind == "error", (
        "the test's server closed the connection (CONNECTION_CLOSE, H3_INTERNAL_ERROR) "
        "instead of answering /closing, yet fetch() returned responses "
        f"{getattr(value, 'responses', value)}: a response for /closing that never came\n"
        "A connection that closes before a response is complete is a failed fetch: raise "
        "(ConnectionError), never report a status or a body the server did not send.")


def test_client_resumes_with_0rtt(learner: Any, certs: Certs) -> None:
    gate = Gate()

    async def scenario() -> tuple[Any, Any, Probe]:
        probe = await probe_server(certs, gate.handler)
        try:
            first = await fetched(learner, probe, certs, ["/first"])
            if getattr(first, "session_ticket", None) is None:
                pytest.fail("FetchResult.session_ticket is None after the first fetch: keep "
                            "the ticket the server sends (connect(..., "
                            "session_ticket_handler=...)) and return it", pytrace=False)
            second = await fetched(learner, probe, certs, ["/zero"], first.session_ticket)
            return first, second, probe
        finally:
            probe.server.close()

    first, second, probe = run(scenario())
    arrivals = [a for a in probe.log if a.path == "/zero"]
    assert len(probe.alpns) == 2, (
        f"the server saw {len(probe.alpns)} connections, expected 2 (one per fetch)")
    assert arrivals and arrivals[0].connection == 2, (
        f"/zero did not arrive on the second connection (log: {probe.log})")
    assert arrivals[0].early, (
        "/zero arrived after the handshake had completed: it was not sent as 0-RTT\nWith a "
        "ticket, connect(..., wait_connected=False) and send the requests at once: they "
        "then leave in the first flight, before the server's reply.")
    assert second.early_data_accepted, (
        "the server took /zero as early data, but FetchResult.early_data_accepted is "
        "False: read it from the HandshakeCompleted event")
    assert second.responses.get("/zero") == (200, b"/zero ok"), (
        f"/zero got {second.responses.get('/zero')}, expected (200, b'/zero ok')")
    assert not first.early_data_accepted, (
        "the first fetch reports early_data_accepted=True without a ticket: impossible")


def test_client_reports_refused_0rtt(learner: Any, certs: Certs) -> None:
    """A ticket presented to a server that cannot resume it (another instance, a ticket
    store that forgot it): the server refuses the early data, the client's requests are
    sent again after the handshake, and FetchResult must say the 0-RTT was not accepted."""
    gate = Gate()

    async def scenario() -> tuple[Any, Probe]:
        issuer = await probe_server(certs, gate.handler)
        other = await probe_server(certs, gate.handler)  # same certificate, its own tickets
        try:
            first = await fetched(learner, issuer, certs, ["/first"])
            if getattr(first, "session_ticket", None) is None:
                pytest.fail("FetchResult.session_ticket is None after the first fetch: keep "
                            "the ticket the server sends and return it", pytrace=False)
            return await fetched(learner, other, certs, ["/zero"], first.session_ticket), other
        finally:
            issuer.server.close()
            other.server.close()

    result, other = run(scenario())
    assert result.responses.get("/zero") == (200, b"/zero ok"), (
        f"/zero got {result.responses.get('/zero')} from a server that refused the 0-RTT "
        "data, expected (200, b'/zero ok'): the request must still be answered")
    early = [a.path for a in other.log if a.early]
    assert not early and not result.early_data_accepted, (
        "fetch() reports early_data_accepted=True, but the server did not know the ticket "
        "and refused the early data (/zero arrived only after the handshake)\nSending "
        "0-RTT data is an offer: read whether the server took it from the handshake "
        "(HandshakeCompleted.early_data_accepted), never assume it from having a ticket.")


def test_client_refuses_an_untrusted_certificate(learner: Any, certs: Certs,
                                                 tmp_path: Path) -> None:
    impostor = make_certs(tmp_path / "impostor")  # same name, another CA
    gate = Gate()

    async def scenario() -> tuple[str, Any, Probe]:
        probe = await probe_server(impostor, gate.handler)
        try:
            kind, value = await learner_fetch(learner, probe, certs, ["/secret"])
        finally:
            probe.server.close()
        return kind, value, probe

    kind, value, probe = run(scenario())
    if kind == "not implemented":
        pytest.fail(str(value), pytrace=False)
    assert kind == "error", (
        f"fetch() {'hung' if kind == 'timed out' else 'succeeded'} against a server whose "
        "certificate comes from a CA it was not told to trust\nLoad cafile with "
        "configuration.load_verify_locations() and keep verify_mode at CERT_REQUIRED: QUIC "
        "always runs TLS 1.3, and TLS without verification is no protection.")
    sent = [arrival.path for arrival in probe.log]
    assert not sent, (
        f"fetch() failed, but only after sending {sent} to a server it must not trust: "
        "verify the certificate before any request leaves")
