"""An HTTP/2 server connection with the h2 library: many streams over one TCP connection.

HTTP/2 cuts every request and response into binary frames (HEADERS, DATA, ...) tagged
with a stream id, so responses interleave on one connection and a slow one no longer
holds back the others (at the HTTP level: a lost TCP segment still stalls them all).
Headers are HPACK-compressed against a table both ends keep for the connection, so a
header block repeated on the next stream shrinks to a few index bytes. Each stream and
the connection have a flow-control window: a sender may only send as many DATA bytes as
the receiver has granted.

h2 is "sans-IO": it turns bytes into events and calls into bytes, and leaves the socket
and the concurrency to us. Here: one asyncio task reads the socket and feeds h2; one
task per stream runs the handler and sends its response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError


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


def _fields(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The regular fields by name. A name that comes more than once is one field whose
    values are combined in order, with ", " (RFC 9110 5.3): dropping all but one changes
    what the request says. (A cookie is joined with "; " instead, RFC 9113 8.2.3: h2
    already does it with the crumbs a client split it into for HPACK.)"""
    fields: dict[str, str] = {}
    for name, value in headers:
        if name.startswith(":"):
            continue
        if name in fields:
            value = f"{fields[name]}, {value}"
        fields[name] = value
    return fields


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.h2 = H2Connection(H2Configuration(client_side=False))
        self.requests: dict[int, Request] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        # Signalled whenever the peer grants more window (for a stream or the connection).
        self.window_opened = asyncio.Event()

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def run(self) -> None:
        self.h2.initiate_connection()  # our SETTINGS frame: the server preface
        await self.flush()
        try:
            while data := await self.reader.read(65536):
                try:
                    events = self.h2.receive_data(data)
                except ProtocolError:
                    await self.flush()  # h2 queued a GOAWAY explaining the error
                    return
                for event in events:
                    if not self.dispatch(event):
                        await self.flush()
                        return
                await self.flush()
        finally:
            for task in self.tasks.values():
                task.cancel()

    def dispatch(self, event: object) -> bool:
        """Act on one h2 event; False when the connection is over."""
        if isinstance(event, RequestReceived):
            # A field value is octets, not UTF-8 (RFC 9110 5.5: obs-text, 0x80-0xFF, is
            # allowed): decode ISO-8859-1, one character per byte, as WSGI does (PEP 3333),
            # so every value arrives intact and none can raise here and drop the connection.
            headers = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
                       for k, v in event.headers]
            pseudo = {k: v for k, v in headers if k.startswith(":")}
            regular = _fields(headers)
            self.requests[event.stream_id] = Request(
                event.stream_id, pseudo.get(":method", ""), pseudo.get(":path", ""), regular)
        elif isinstance(event, DataReceived):
            self.requests[event.stream_id].body += event.data
            # Give the window back, or the client stalls once it has sent 64 KiB.
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            # The request is complete: answer it in its own task so this loop keeps
            # reading and the other streams keep moving (multiplexing).
            request = self.requests.pop(event.stream_id)
            self.tasks[event.stream_id] = asyncio.create_task(self.respond(request))
        elif isinstance(event, StreamReset):
            task = self.tasks.pop(event.stream_id, None)
            if task is not None:
                task.cancel()
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            # A WINDOW_UPDATE grants more window, and so does a SETTINGS frame that raises
            # SETTINGS_INITIAL_WINDOW_SIZE: it changes every open stream's window by the
            # difference (RFC 9113 6.9.2; h2 applies it and says RemoteSettingsChanged).
            self.window_opened.set()
        elif isinstance(event, ConnectionTerminated):
            # The client's GOAWAY. RFC 9113 6.8 would let the streams in flight finish, but
            # h2 closes its side on receiving one (python-hyper/h2#1181): no response can
            # be sent any more, so the connection is over and run() cancels their tasks.
            return False
        return True

    async def respond(self, request: Request) -> None:
        sid = request.stream_id
        try:
            response = await self.handler(request)
        except Exception:  # noqa: BLE001 - one failing handler must not end the connection
            response = Response(500, [("content-type", "text/plain")], b"internal error\n")
        # A HEAD response is the GET's status and headers, content-length included (the
        # length the GET's body would have), and no content (RFC 9110 9.3.2, 8.6): the
        # HEADERS frame ends the stream.
        body = b"" if request.method == "HEAD" else response.body
        try:
            headers = [(":status", str(response.status)), *response.headers,
                       ("content-length", str(len(response.body)))]
            self.h2.send_headers(sid, headers, end_stream=not body)
            await self.flush()
            await self.send_body(sid, body)
        except StreamClosedError:
            pass  # the client reset the stream meanwhile
        finally:
            self.tasks.pop(sid, None)

    async def send_body(self, sid: int, body: bytes) -> None:
        """DATA frames within the flow-control window and the maximum frame size."""
        view = memoryview(body)
        while view:
            window = self.h2.local_flow_control_window(sid)
            if window <= 0:
                self.window_opened.clear()
                await self.window_opened.wait()  # the client will send WINDOW_UPDATE
                continue
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            self.h2.send_data(sid, view[:size].tobytes(), end_stream=size == len(view))
            view = view[size:]
            await self.flush()


async def handle_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            handler: Handler) -> None:
    """Serve one HTTP/2 (prior knowledge, cleartext) connection until the client ends it."""
    try:
        await _Connection(reader, writer, handler).run()
    finally:
        writer.close()
