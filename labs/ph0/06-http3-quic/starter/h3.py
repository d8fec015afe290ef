"""HTTP/3 over QUIC with aioquic: a server, a client, independent streams and 0-RTT.

Implement start_server() and fetch() with aioquic (aioquic.asyncio.serve / connect,
aioquic.h3.connection.H3Connection).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aioquic.asyncio.server import QuicServer
from aioquic.tls import SessionTicket

Handler = Callable[[str], Awaitable[tuple[int, bytes]]]


@dataclass
class FetchResult:
    alpn: str | None                       # protocol agreed by ALPN ("h3")
    responses: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # path -> status, body
    early_data_accepted: bool = False      # the server took our 0-RTT requests
    session_ticket: SessionTicket | None = None  # present it to resume next time


async def start_server(host: str, port: int, *, certfile: str, keyfile: str,
                       handler: Handler) -> QuicServer:
    """An HTTP/3 server on UDP ``host:port`` that answers each request with
    ``await handler(path)`` and accepts 0-RTT from clients resuming a session.
    Return the QuicServer that aioquic's serve() gives you."""
    # TODO: QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN), load_cert_chain();
    #       a QuicConnectionProtocol subclass with an H3Connection that answers each
    #       request stream in its own task; a session ticket store for resumption.
    raise NotImplementedError("start_server: serve HTTP/3 with aioquic")


async def fetch(host: str, port: int, paths: Sequence[str], *, cafile: str,
                server_name: str, session_ticket: SessionTicket | None = None) -> FetchResult:
    """GET every path over ONE QUIC connection, each on its own stream, all at once.

    With a ``session_ticket`` from an earlier fetch the session is resumed and the
    requests go out as 0-RTT early data, before the handshake completes.
    """
    # TODO: QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=...),
    #       load_verify_locations(cafile), session_ticket; connect(); send all requests,
    #       then collect the responses, the ALPN, early_data_accepted and the new ticket.
    raise NotImplementedError("fetch: an HTTP/3 client with aioquic")
