"""HTTP/3 over QUIC with aioquic: a server, a client, independent streams and 0-RTT.

QUIC runs over UDP and builds in what TCP + TLS gave HTTP/2: reliable ordered *streams*,
congestion control and TLS 1.3. Each stream is delivered independently, so a lost
packet delays only the streams whose data it carried - no transport-level head-of-line
blocking. HTTP/3 maps one request/response to one bidirectional stream and compresses
headers with QPACK. After a first connection the server hands out a session ticket;
presenting it next time lets the client send requests in its very first flight, before
the handshake completes (0-RTT). Such early data can be replayed by an attacker, which
is why only idempotent requests belong in it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    ProtocolNegotiated,
    QuicEvent,
)
from aioquic.tls import SessionTicket

Handler = Callable[[str], Awaitable[tuple[int, bytes]]]


@dataclass
class FetchResult:
    alpn: str | None                       # protocol agreed by ALPN ("h3")
    responses: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # path -> status, body
    early_data_accepted: bool = False      # the server took our 0-RTT requests
    session_ticket: SessionTicket | None = None  # present it to resume next time


# ---------------------------------------------------------------------------- server


class _TicketStore:
    """Session tickets the server issued, looked up when a client presents one. Without
    a store a server cannot resume sessions, so it can never accept 0-RTT."""

    def __init__(self) -> None:
        self.tickets: dict[bytes, SessionTicket] = {}

    def add(self, ticket: SessionTicket) -> None:
        self.tickets[ticket.ticket] = ticket

    def pop(self, label: bytes) -> SessionTicket | None:
        return self.tickets.pop(label, None)  # single use: limits 0-RTT replay


_ENCODED_NON_ASCII = re.compile(r"(?:%[89A-Fa-f][0-9A-Fa-f])+")


def iri_path(raw: str) -> str:
    """The :path as the handler gets it (RFC 3987 3.2, URI to IRI). A character outside
    ASCII travels as its UTF-8 bytes percent-encoded (RFC 3986 2.1, RFC 3987 3.1): those
    (%80-%FF) are decoded, "/caf%C3%A9" -> "/café". A percent-encoded ASCII character
    stays as it came: "%2F" is no "/" ("/files/a%2Fb" has one segment, "a/b", and
    "/files/a/b" two: a reserved character and its encoding are different URIs, RFC 3986
    2.2), and "%25" stays, or "%252F" (a "%2F" in a name) would turn into that same "%2F"."""
    def decode(run: re.Match[str]) -> str:
        try:
            return unquote(run.group(), encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            return run.group()  # not UTF-8: left encoded (RFC 3987 3.2)
    return _ENCODED_NON_ASCII.sub(decode, raw)


class _ServerProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, handler: Handler, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = handler
        self.h3: H3Connection | None = None
        self.paths: dict[int, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self.h3 = H3Connection(self._quic)
        if self.h3 is not None:
            for h3_event in self.h3.handle_event(event):
                self.h3_event_received(h3_event)

    def h3_event_received(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived) and event.stream_id not in self.paths:
            # The stream's first HEADERS frame is the request's; a later one holds its
            # trailers (no :path, after the body; RFC 9114 4.1), not a new request.
            headers = dict(event.headers)
            raw = headers.get(b":path", b"/").decode("ascii", errors="replace")
            self.paths[event.stream_id] = iri_path(raw)
        if isinstance(event, HeadersReceived | DataReceived) and event.stream_ended:
            # One task per request stream: a slow handler holds only its own stream.
            task = asyncio.create_task(self.respond(event.stream_id,
                                                    self.paths.pop(event.stream_id)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def respond(self, stream_id: int, path: str) -> None:
        try:
            status, body = await self.handler(path)
        except Exception:  # noqa: BLE001 - a handler bug answers 500, the connection lives
            status, body = 500, b"internal error\n"
        assert self.h3 is not None
        self.h3.send_headers(stream_id, [(b":status", str(status).encode()),
                                         (b"content-length", str(len(body)).encode())])
        self.h3.send_data(stream_id, body, end_stream=True)
        self.transmit()  # we are outside datagram_received: nothing else sends for us


async def start_server(host: str, port: int, *, certfile: str, keyfile: str,
                       handler: Handler) -> QuicServer:
    """An HTTP/3 server on UDP ``host:port`` that answers each request with
    ``await handler(path)`` and accepts 0-RTT from clients resuming a session."""
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(certfile, keyfile)
    store = _TicketStore()
    return await serve(
        host, port, configuration=config,
        create_protocol=lambda *a, **kw: _ServerProtocol(*a, handler=handler, **kw),
        session_ticket_fetcher=store.pop, session_ticket_handler=store.add)


# ---------------------------------------------------------------------------- client


def uri_path(path: str) -> str:
    """``path`` as :path carries it: a URI path is ASCII, so every other character goes
    as its UTF-8 bytes percent-encoded (RFC 3986 2.1, RFC 3987 3.1: "/café" is sent as
    "/caf%C3%A9"); what is already ASCII (reserved characters, "%XX") stays as it is."""
    return quote(path, safe="".join(map(chr, range(0x21, 0x7f))))


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)  # created at once: 0-RTT requests need it
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[HandshakeCompleted] = loop.create_future()
        # When the handshake fails before fetch() awaits this future, connect() itself
        # raises; mark the error as seen so asyncio does not log it a second time.
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.waiters: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.status: dict[int, int] = {}
        self.bodies: dict[int, bytearray] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted) and not self.handshake.done():
            self.handshake.set_result(event)
        elif isinstance(event, ConnectionTerminated):  # fail whoever is still waiting
            error = ConnectionError(f"connection closed: {event.reason_phrase or event.error_code}")
            if not self.handshake.done():  # the handshake failed: only it is awaited
                self.handshake.set_exception(error)
                for future in self.waiters.values():
                    future.cancel()
            for future in self.waiters.values():
                if not future.done():
                    future.set_exception(error)
        for h3_event in self.h3.handle_event(event):
            sid = getattr(h3_event, "stream_id", None)
            if sid not in self.waiters:
                continue
            if isinstance(h3_event, HeadersReceived):
                # Only the final response's HEADERS carry its status: an interim response
                # (1xx, such as 103 Early Hints) comes before it, and trailers (a HEADERS
                # frame after the body, without :status) after it.
                status = dict(h3_event.headers).get(b":status")
                if status is not None and int(status) >= 200 and sid not in self.status:
                    self.status[sid] = int(status)
            elif isinstance(h3_event, DataReceived):
                self.bodies[sid] += h3_event.data
            if getattr(h3_event, "stream_ended", False) and not self.waiters[sid].done():
                self.waiters[sid].set_result((self.status.get(sid, 0), bytes(self.bodies[sid])))

    def request(self, authority: str, path: str) -> asyncio.Future[tuple[int, bytes]]:
        """Send GET ``path`` on a new bidirectional stream; the future gets the response."""
        sid = self._quic.get_next_available_stream_id()
        self.waiters[sid] = asyncio.get_running_loop().create_future()
        self.bodies[sid] = bytearray()
        self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                   (b":authority", authority.encode()),
                                   (b":path", uri_path(path).encode("ascii"))],
                           end_stream=True)
        return self.waiters[sid]


async def fetch(host: str, port: int, paths: Sequence[str], *, cafile: str,
                server_name: str, session_ticket: SessionTicket | None = None) -> FetchResult:
    """GET every path over ONE QUIC connection, each on its own stream, all at once.

    With a ``session_ticket`` from an earlier fetch the session is resumed and the
    requests go out as 0-RTT early data, before the handshake completes.
    """
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                               server_name=server_name)
    config.load_verify_locations(cafile)  # verification stays on: trust only this CA
    config.session_ticket = session_ticket
    tickets: list[SessionTicket] = []
    # Without a ticket we wait for the handshake as usual; with one we do not wait:
    # the requests below then travel in the first flight, as 0-RTT data.
    async with connect(host, port, configuration=config, create_protocol=_ClientProtocol,
                       session_ticket_handler=tickets.append,
                       wait_connected=session_ticket is None) as protocol:
        client: _ClientProtocol = protocol  # type: ignore[assignment]
        futures = {path: client.request(server_name, path) for path in paths}
        client.transmit()  # every request leaves now, each on its own stream
        handshake = await client.handshake
        result = FetchResult(alpn=handshake.alpn_protocol,
                             early_data_accepted=handshake.early_data_accepted)
        responses = await asyncio.gather(*futures.values())  # in flight together
        result.responses = dict(zip(futures, responses, strict=True))
    result.session_ticket = tickets[-1] if tickets else None
    return result
