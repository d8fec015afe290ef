"""An HTTP/2 server connection with the h2 library: many streams over one TCP connection.

Implement handle_connection(): drive an h2 H2Connection (server side) from the asyncio
stream, run the handler for each complete request, and send the responses back on
their streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    stream_id: int
    method: str
    path: str
    headers: dict[str, str]   # regular headers, lower-case names (no pseudo-headers);
                              # a name sent twice: its values joined with ", "
    body: bytes = b""


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)  # lower-case names
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Response]]


async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            handler: Handler) -> None:
    """Serve one HTTP/2 (prior knowledge, cleartext) connection until the client ends it."""
    # TODO 1: H2Connection(H2Configuration(client_side=False)); initiate_connection();
    #         write data_to_send().
    # TODO 2: loop: read bytes, conn.receive_data(), handle RequestReceived, DataReceived,
    #         StreamEnded, WindowUpdated, RemoteSettingsChanged, StreamReset,
    #         ConnectionTerminated; write data_to_send().
    # TODO 3: on StreamEnded, answer the stream in its own task: send_headers(), then
    #         send_data() within the flow-control window.
    raise NotImplementedError("handle_connection: serve HTTP/2 streams with h2")
