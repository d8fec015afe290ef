"""Verification for ph0.5: the learner's HTTP/2 connection handler, served by an asyncio
server in a background thread (harness.py, where the learner's code runs), and driven by a
real HTTP/2 client (the h2 library in client mode) over ONE TCP connection. The raw bytes
the client receives are also split into frames with hyperframe, to measure the HPACK header
blocks on the wire.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, HeadersFrame

WAIT = 2.0
BIG = 300_000   # bytes: well beyond the default 65,535-byte flow-control window
REPEATED_HEADERS = [
    ("content-type", "text/plain; charset=utf-8"),
    ("cache-control", "private, max-age=60"),
    ("x-lab-trace", "lab-ph0-5; region=eu-west; build=2024.11.24-6f1c2a9; tier=gold"),
]


# ---------------------------------------------------------------------------- the server


@pytest.fixture
def server(learner: Any) -> Iterator[Any]:
    """The learner's handler on an asyncio server (harness.py), where the learner's code
    runs; its application answers /slow (held by a gate), /big, /echo and the rest."""
    srv = learner.harness().ServerThread(learner.load("h2server"), BIG,
                                         list(REPEATED_HEADERS), WAIT)
    yield srv
    srv.close()


# ---------------------------------------------------------------------------- the client


def _code(error_code: Any) -> str:
    try:
        return f"{ErrorCodes(int(error_code)).name}, error code {int(error_code)}"
    except ValueError:
        return f"error code {error_code}"


@dataclass
class Stream:
    path: str
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    header_block: int = 0   # bytes of HPACK-encoded header block received on the wire
    method: str = "GET"
    data_on_wire: int = 0   # bytes of DATA frames' content received on the wire


class Client:
    """A real HTTP/2 client (h2, client side) on one blocking TCP connection."""

    def __init__(self, srv: Any, settings: dict[int, int] | None = None) -> None:
        self.srv = srv
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT)
        self.h2 = H2Connection(H2Configuration(client_side=True))
        self.h2.initiate_connection()
        if settings:  # this client's own SETTINGS, beside h2's defaults
            self.h2.update_settings(settings)
        self.pings_acked = 0
        self.settings_acked = 0
        self.grant = True  # give received DATA's window back, as any real client does
        self.streams: dict[int, Stream] = {}
        self.finished: list[str] = []   # paths, in the order their streams ended
        self.raw = bytearray()          # received bytes not yet split into frames
        self.sent = 0                   # bytes sent to the server so far
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        self.sent += len(data)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.fail(f"the server closed the connection ({exc})")

    def get(self, path: str, body: bytes = b"", send: bool = True,
            extra: list[tuple[bytes, bytes]] | None = None, method: str = "") -> int:
        sid = self.h2.get_next_available_stream_id()
        method = method or ("POST" if body else "GET")
        self.streams[sid] = Stream(path, method=method)
        self.h2.send_headers(sid, [(b":method", method.encode()), (b":path", path.encode()),
                                   (b":scheme", b"http"), (b":authority", b"lab.test"),
                                   *(extra or [])], end_stream=not body)
        for start in range(0, len(body), 1000):  # a body in several DATA frames
            self.h2.send_data(sid, body[start:start + 1000],
                              end_stream=start + 1000 >= len(body))
        if send:
            self.flush()
        return sid

    def run_until(self, done: Callable[[], bool], waiting_for: str | Callable[[], str],
                  hint: str = "") -> None:
        """Read and process frames until ``done()``; fail after WAIT seconds without.
        ``waiting_for`` names what is awaited (a callable: worded when it fails)."""
        def what() -> str:
            return waiting_for() if callable(waiting_for) else waiting_for

        while not done():
            try:
                data: bytes | None = self.sock.recv(65536)
            except TimeoutError:
                data = None
            except ConnectionResetError:
                data = b""
            if data is None:  # outside the except block: a clean failure message
                self.fail(f"no {what()} within {WAIT:.0f} s\n{hint}".strip())
            if not data:
                self.fail(f"the server closed the connection while the client waited for "
                          f"{what()}\n{hint}".strip())
            self._measure_frames(data)
            try:
                events = self.h2.receive_data(data)
            except ProtocolError as exc:
                self._head_with_content()
                self.fail(f"the server broke the HTTP/2 protocol: {type(exc).__name__}: {exc}")
            for event in events:
                self._on(event)
            self.flush()

    def _on(self, event: Any) -> None:
        if isinstance(event, ResponseReceived):
            stream = self.streams[event.stream_id]
            stream.headers = {bytes(k).decode(): bytes(v).decode() for k, v in event.headers}
            stream.status = int(stream.headers.get(":status", 0))
        elif isinstance(event, DataReceived):
            self.streams[event.stream_id].body += event.data
            if self.grant:  # give the window back, as any real client does
                self.h2.acknowledge_received_data(event.flow_controlled_length,
                                                  event.stream_id)
        elif isinstance(event, StreamEnded):
            self.streams[event.stream_id].ended = True
            self.finished.append(self.streams[event.stream_id].path)
        elif isinstance(event, PingAckReceived):
            self.pings_acked += 1
        elif isinstance(event, SettingsAcknowledged):
            self.settings_acked += 1
        elif isinstance(event, StreamReset):
            path = self.streams[event.stream_id].path
            if path == "/boom":
                self.fail(f"the server reset the stream for /boom ({_code(event.error_code)}) "
                          "when the application raised; expected a 500 response on that "
                          "stream\nNo response has started yet, so answer with :status 500 "
                          "(and a short body): a reset tells the client nothing about what "
                          "failed.")
            self.fail(f"the server reset the stream for {path} ({_code(event.error_code)})")
        elif isinstance(event, ConnectionTerminated):
            self.fail(f"the server ended the connection (GOAWAY, error code {event.error_code})")

    def _measure_frames(self, data: bytes) -> None:
        """Split the byte stream into frames (hyperframe) and add up each stream's header
        block: the HPACK-compressed size of its response headers on the wire."""
        self.raw += data
        while len(self.raw) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.raw[:9]))
            if len(self.raw) < 9 + length:
                return
            frame.parse_body(memoryview(self.raw[9:9 + length]))
            del self.raw[:9 + length]
            if isinstance(frame, HeadersFrame | ContinuationFrame) \
                    and frame.stream_id in self.streams:
                self.streams[frame.stream_id].header_block += len(frame.data)
            if isinstance(frame, DataFrame) and frame.stream_id in self.streams:
                self.streams[frame.stream_id].data_on_wire += len(frame.data)

    def _head_with_content(self) -> None:
        """Fail, naming it, when a response to HEAD came with content (h2 refuses it)."""
        for stream in self.streams.values():
            if stream.method == "HEAD" and stream.data_on_wire:
                self.fail(
                    f"the response to HEAD {stream.path} carried {stream.data_on_wire:,} "
                    "bytes of content in DATA frames; expected none\nA HEAD response is "
                    "the GET's status and headers without the content (RFC 9110 9.3.2): "
                    "send no DATA, and end the stream on the HEADERS frame. A client never "
                    "reads a HEAD body, so the bytes corrupt the stream (h2 refuses them).")

    def ended(self, *sids: int) -> Callable[[], bool]:
        return lambda: all(self.streams[s].ended for s in sids)

    def fail(self, message: str) -> NoReturn:
        errors = self.srv.problems()
        if errors:
            message = f"{errors[0]}\n({message})"
        pytest.fail(message, pytrace=False)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client(server: Any) -> Iterator[Client]:
    c = Client(server)
    yield c
    c.close()


def early_handler(got: bytes, body: bytes) -> None:
    """Fail, naming the mistake, when /echo saw only a first part of the request body."""
    assert not (len(got) < len(body) and body.startswith(got)), (
        f"/echo answered with only the first {len(got):,} of the {len(body):,} body bytes: "
        "the handler ran before the request was complete\nRequestReceived only means the "
        "headers arrived; DATA frames may follow. Start the handler on StreamEnded (the "
        "client's END_STREAM), when the body is whole.")


def one_connection(server: Any) -> None:
    assert server.connections == 1, (
        f"the server saw {server.connections} TCP connections, expected the client's one")


# ---------------------------------------------------------------------------- the tests


def test_slow_stream_does_not_hold_back_fast_ones(server: Any, client: Client) -> None:
    slow = client.get("/slow", send=False)
    fast = [client.get(f"/fast/{n}", send=False) for n in (1, 2)]
    client.flush()  # all three requests leave in one write, the slow one first
    try:
        client.run_until(
            client.ended(*fast), "response to /fast/1 and /fast/2 while /slow was pending",
            hint="Each stream's handler must run in its own task (asyncio.create_task) so "
                 "the connection loop keeps reading frames and answering the other streams: "
                 "that is HTTP/2 multiplexing. Awaiting the handler inside the read loop "
                 "brings back head-of-line blocking.")
    finally:
        server.release_slow()
    assert not client.streams[slow].ended, (
        "the slow stream ended before it was released: the test's gate did not hold")
    client.run_until(client.ended(slow), "response to /slow after its release")
    assert client.finished[-1] == "/slow" and len(client.finished) == 3, (
        f"streams finished in the order {client.finished}, expected both fast ones first")
    for sid in (*fast, slow):
        stream = client.streams[sid]
        want = b"slow done" if stream.path == "/slow" else f"{stream.path} ok".encode()
        assert stream.status == 200 and bytes(stream.body) == want, (
            f"{stream.path}: status {stream.status}, body {bytes(stream.body)!r}; expected "
            f"200 and {want!r}")
    one_connection(server)


@pytest.mark.parametrize("path, status, size", [
    ("/no-content", 204, 0), ("/empty", 200, 0), ("/two-frames", 200, 2 * 16_384),
])
def test_every_response_ends_its_stream(server: Any, client: Client, path: str, status: int,
                                        size: int) -> None:
    """A response ends only with a frame that carries END_STREAM, whatever its body."""
    sid = client.get(path)
    stream = client.streams[sid]

    def seen() -> str:
        got = ("no HEADERS yet" if stream.status is None else
               f"HEADERS :status {stream.status}, {len(stream.body):,} body bytes")
        return (f"END_STREAM on the {path} response (a {status} with a {size:,}-byte body; "
                f"received so far: {got}, and no END_STREAM)")

    client.run_until(client.ended(sid), seen, hint=(
        "A response ends only with a frame that carries END_STREAM: with no body, on the "
        "HEADERS frame itself (send_headers(..., end_stream=True)); otherwise on the last "
        "DATA frame, whatever its size (a body of whole frames ends too). Until then the "
        "client waits, and the stream counts against the concurrent-stream limit."))
    assert stream.status == status and len(stream.body) == size, (
        f"{path}: status {stream.status}, {len(stream.body):,} body bytes; expected {status} "
        f"and {size:,}")


def test_a_head_response_has_no_content(server: Any, client: Client) -> None:
    """HEAD /two-frames: the status and headers a GET gets, no content, and a
    content-length, if any, that is the GET body's length (RFC 9110 9.3.2, 8.6)."""
    size = 2 * 16_384
    rule = ("A HEAD response is the GET's status and headers without the content (RFC 9110 "
            "9.3.2): no DATA, END_STREAM on the HEADERS frame. Its content-length, if sent, "
            "is the length the GET's body would have (RFC 9110 8.6), never 0 for a body "
            "that is not empty: clients and caches take it as the resource's size.")
    sid = client.get("/two-frames", method="HEAD")
    stream = client.streams[sid]
    client.run_until(client.ended(sid), lambda: (
        f"END_STREAM on the response to HEAD /two-frames (received "
        f"{'no HEADERS yet' if stream.status is None else f':status {stream.status}'})"),
        hint=rule)
    client._head_with_content()
    length = stream.headers.get("content-length")
    assert stream.status == 200 and length in (None, str(size)), (
        f"HEAD /two-frames (a GET gets 200 and {size:,} bytes) was answered with :status "
        f"{stream.status}, content-length: {length}; expected 200, and content-length "
        f"{size} or none\n{rule}")
    after = client.get("/after-head")
    client.run_until(client.ended(after), "a response on the same connection afterwards")


def test_hpack_shrinks_a_repeated_header_block(server: Any, client: Client) -> None:
    first = client.get("/same/1")
    client.run_until(client.ended(first), "first response")
    second = client.get("/same/2")
    client.run_until(client.ended(second), "second response")
    a, b = client.streams[first], client.streams[second]
    for stream in (a, b):
        sent = {k: stream.headers.get(k) for k, _ in REPEATED_HEADERS}
        assert sent == dict(REPEATED_HEADERS), (
            f"{stream.path}: the response headers were {sent}, expected {dict(REPEATED_HEADERS)}"
            "\nSend the handler's headers with the response.")
    assert b.header_block < a.header_block / 2, (
        f"the second response's header block took {b.header_block} bytes on the wire, the "
        f"first {a.header_block}: expected far fewer the second time\nHPACK keeps a dynamic "
        "table per connection: headers sent before are re-sent as 1-2 byte indexes. Use one "
        "H2Connection for the whole connection.")
    one_connection(server)


def test_large_body_respects_flow_control(server: Any, client: Client) -> None:
    big = client.get("/big")
    client.run_until(
        client.ended(big), f"complete {BIG}-byte /big response",
        hint="The body needs several flow-control windows: send DATA frames no larger than "
             "local_flow_control_window() and max_outbound_frame_size, and when the window "
             "is 0 wait for the client's WINDOW_UPDATE (a WindowUpdated event).")
    got = client.streams[big].body
    assert len(got) == BIG, (
        f"/big arrived with {len(got)} bytes, expected {BIG}\nSend DATA frames no larger "
        "than local_flow_control_window() and max_outbound_frame_size; when the window is "
        "0, wait for the client's WINDOW_UPDATE.")


def test_request_body_is_reassembled_from_data_frames(server: Any,
                                                      client: Client) -> None:
    body = bytes(range(256)) * 20  # 5,120 bytes, sent as six DATA frames
    sid = client.get("/echo", body)
    client.run_until(client.ended(sid), "/echo response")
    got = bytes(client.streams[sid].body)
    early_handler(got, body)
    assert got == body, (
        f"/echo returned {len(got)} bytes, expected the {len(body)}-byte request body\n"
        "Collect each stream's DATA frames until its StreamEnded event, then call the "
        "handler with the whole body.")


def test_large_upload_needs_the_window_given_back(server: Any, client: Client) -> None:
    body = bytes(range(256)) * 800  # 204,800 bytes: three times the initial window
    sid = client.h2.get_next_available_stream_id()
    client.streams[sid] = Stream("/echo")
    client.h2.send_headers(sid, [(":method", "POST"), (":path", "/echo"), (":scheme", "http"),
                                 (":authority", "lab.test")])
    sent = 0
    while sent < len(body):
        window = min(client.h2.local_flow_control_window(sid),
                     client.h2.max_outbound_frame_size, len(body) - sent)
        if window <= 0:
            before = sent
            client.run_until(
                lambda: client.h2.local_flow_control_window(sid) > 0,
                f"WINDOW_UPDATE after the client had sent {before:,} of {len(body):,} bytes",
                hint="The client may send only as many DATA bytes as the server granted. "
                     "Each DataReceived must be acknowledged (acknowledge_received_data) so h2 "
                     "sends WINDOW_UPDATE; without it every upload stalls at 64 KiB.")
            continue
        client.h2.send_data(sid, body[sent:sent + window], end_stream=sent + window == len(body))
        sent += window
        client.flush()
    client.run_until(client.ended(sid), "/echo response to the 200 KB upload")
    got = bytes(client.streams[sid].body)
    early_handler(got, body)
    assert got == body, (
        f"/echo returned {len(got)} bytes, expected the {len(body)}-byte upload")


def test_a_failing_handler_fails_its_stream_only(server: Any, client: Client) -> None:
    boom = client.get("/boom", send=False)
    fine = client.get("/fine", send=False)
    client.flush()
    client.run_until(
        client.ended(boom, fine), "responses to /boom (the application raises) and /fine",
        hint="When the application raises for one stream, answer that stream with 500 and "
             "keep the connection: the other streams on it are someone else's requests.")
    assert client.streams[boom].status == 500, (
        f"/boom (the application raised): expected status 500 on that stream, saw "
        f"{client.streams[boom].status}")
    assert client.streams[fine].status == 200, (
        f"/fine, beside a failing stream: expected 200, saw {client.streams[fine].status}")
    later = client.get("/later")
    client.run_until(client.ended(later), "a response on the same connection after /boom",
                     hint="One stream's failure must not end the connection.")
    one_connection(server)


def test_connection_window_runs_out_first(server: Any) -> None:
    """A client that grants each stream 1 MiB: only the CONNECTION's window (65,535 bytes,
    raised by WINDOW_UPDATE on stream 0) ever runs out while /big is sent."""
    client = Client(server, {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    try:
        big = client.get("/big")
        client.run_until(
            client.ended(big),
            lambda: f"complete {BIG}-byte /big response from a client whose stream windows "
                    f"are 1 MiB (it had {len(client.streams[big].body):,} bytes: the "
                    "connection's 65,535-byte window ran out, the stream's had not)",
            hint="The connection has a flow-control window of its own, shared by all streams "
                 "and granted back by WINDOW_UPDATE on stream 0: h2 reports it as "
                 "WindowUpdated with stream_id 0. A sender waiting for its own stream's "
                 "WindowUpdated never wakes: wake every waiting stream on any WindowUpdated "
                 "and re-read local_flow_control_window().")
        assert bytes(client.streams[big].body) == bytes(range(256)) * (BIG // 256) + \
            b"x" * (BIG % 256), "/big arrived complete but its bytes differ from what was sent"
    finally:
        client.close()


def test_handler_runs_when_the_request_is_complete(server: Any, client: Client) -> None:
    """The request body comes in two parts; the first one, and a PING behind it, are
    processed by the server (the PING's ACK proves it) before the second is even sent."""
    body = bytes(range(256)) * 24  # 6,144 bytes
    half = len(body) // 2
    sid = client.h2.get_next_available_stream_id()
    client.streams[sid] = Stream("/echo")
    client.h2.send_headers(sid, [(":method", "POST"), (":path", "/echo"), (":scheme", "http"),
                                 (":authority", "lab.test")])
    client.h2.send_data(sid, body[:half])
    client.h2.ping(b"lab-ph05")
    client.flush()
    client.run_until(lambda: client.pings_acked == 1,
                     "PING ACK (h2 answers a PING by itself: write data_to_send() after "
                     "every receive_data())")
    client.h2.send_data(sid, body[half:], end_stream=True)
    client.flush()
    client.run_until(client.ended(sid), "/echo response to a body sent in two parts")
    got = bytes(client.streams[sid].body)
    early_handler(got, body)
    assert got == body, (
        f"/echo returned {len(got)} bytes, expected the {len(body)}-byte body sent in two "
        "parts")


def test_padded_upload_needs_the_padding_given_back(server: Any, client: Client) -> None:
    """DATA frames may carry padding, and padding counts against the flow-control window
    like data: 400 frames of 2 bytes, each padded to 256 bytes, are 102,400 window bytes
    for 800 bytes of body - more than the initial 65,535."""
    body = bytes(range(200)) * 4  # 800 bytes
    sid = client.h2.get_next_available_stream_id()
    client.streams[sid] = Stream("/echo")
    client.h2.send_headers(sid, [(":method", "POST"), (":path", "/echo"), (":scheme", "http"),
                                 (":authority", "lab.test")])
    sent = 0
    while sent < len(body):
        if client.h2.local_flow_control_window(sid) < 256:
            before = sent
            client.run_until(
                lambda: client.h2.local_flow_control_window(sid) >= 256,
                # the default binds this pass's count (a lambda with a default gets no
                # inferred type from the str | Callable[[], str] parameter)
                cast(Callable[[], str],
                     lambda before=before: "WINDOW_UPDATE for the padding (the server gave "
                     f"back only the data of {before // 2} padded DATA frames: {before} "
                     f"body bytes, {before * 128:,} window bytes)"),
                hint="Padding counts against the window like data. Acknowledge "
                     "event.flow_controlled_length (data + padding), not len(event.data): "
                     "otherwise every padded frame keeps part of the window for good and "
                     "the upload stalls.")
            continue
        client.h2.send_data(sid, body[sent:sent + 2], end_stream=sent + 2 == len(body),
                            pad_length=253)
        sent += 2
        client.flush()
    client.run_until(client.ended(sid), "/echo response to the padded upload")
    got = bytes(client.streams[sid].body)
    assert got == body, (
        f"/echo returned {len(got)} bytes, expected the {len(body)}-byte padded upload "
        "(without its padding)")


def test_stream_window_smaller_than_the_connections(server: Any) -> None:
    """A client that grants each stream only 4,096 bytes (the connection keeps 65,535):
    here the STREAM's window is the one that runs out."""
    client = Client(server, {SettingCodes.INITIAL_WINDOW_SIZE: 4096})
    try:
        big = client.get("/big")
        try:
            client.run_until(client.ended(big), f"complete {BIG}-byte /big response")
        except pytest.fail.Exception as failed:
            got = len(client.streams[big].body)
            flow = [e for e in server.problems() if "low" in e and "ontrol" in e]
            pytest.fail(
                f"/big to a client whose streams have a 4,096-byte window (its connection "
                f"window is 65,535) stopped after {got:,} bytes"
                + (f": your server tried to send more than the stream's window ({flow[0]})"
                   if flow else "")
                + ": a DATA frame may exceed neither the stream's window nor the "
                "connection's - size it with local_flow_control_window(stream_id), the "
                f"smaller of the two, not the connection's window alone\n({failed})",
                pytrace=False)
        assert bytes(client.streams[big].body) == bytes(range(256)) * (BIG // 256) + \
            b"x" * (BIG % 256), "/big arrived complete but its bytes differ from what was sent"
    finally:
        client.close()


SMALL_WINDOW = 1000  # each stream's window at first: /two-frames stops after this many bytes


def test_a_settings_frame_raising_the_window_resumes_the_body(server: Any) -> None:
    """A client grants each stream 1,000 bytes, then raises SETTINGS_INITIAL_WINDOW_SIZE to
    65,535 mid-connection and sends no WINDOW_UPDATE at all: RFC 9113 6.9.2 changes every
    open stream's window by the difference, so the rest of the body may go at once."""
    client = Client(server, {SettingCodes.INITIAL_WINDOW_SIZE: SMALL_WINDOW})
    client.grant = False  # the SETTINGS frame alone must open the window
    try:
        sid = client.get("/two-frames")
        size = 2 * 16_384
        client.run_until(lambda: len(client.streams[sid].body) >= SMALL_WINDOW,
                         f"first {SMALL_WINDOW} bytes of /two-frames (the stream's window)")
        got = len(client.streams[sid].body)
        assert got == SMALL_WINDOW and not client.streams[sid].ended, (
            f"the client's streams have a {SMALL_WINDOW}-byte window, and /two-frames sent "
            f"{got} bytes{' and ended' if client.streams[sid].ended else ''} before any more "
            "was granted: a DATA frame may not exceed local_flow_control_window(stream_id)")
        acked = client.settings_acked
        client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65_535})
        client.flush()
        client.run_until(lambda: client.settings_acked > acked,
                         "SETTINGS ACK for the raised SETTINGS_INITIAL_WINDOW_SIZE")
        client.run_until(
            client.ended(sid), lambda: (
                f"rest of /two-frames ({size - len(client.streams[sid].body):,} of {size:,} "
                f"bytes) after the server acknowledged the client's SETTINGS raising "
                f"SETTINGS_INITIAL_WINDOW_SIZE from {SMALL_WINDOW} to 65,535"),
            hint="The body stalled with window to spare: a SETTINGS frame that raises "
                 "SETTINGS_INITIAL_WINDOW_SIZE adds the difference to every open stream's "
                 "window (RFC 9113 6.9.2) - h2 applies it and reports RemoteSettingsChanged, "
                 "no WindowUpdated. A sender that waits for WINDOW_UPDATE alone stalls until "
                 "the client happens to send one; wake the waiting streams on "
                 "RemoteSettingsChanged too.")
        assert bytes(client.streams[sid].body) == b"f" * size, (
            f"/two-frames arrived with {len(client.streams[sid].body)} bytes, expected {size}")
    finally:
        client.close()


def test_a_window_made_negative_by_settings_waits_for_room(server: Any) -> None:
    """A client grants each stream 1,000 bytes, then lowers SETTINGS_INITIAL_WINDOW_SIZE to
    500 while the server waits with the window spent: the stream's window becomes -500
    (RFC 9113 6.9.2), and the server may send nothing until a WINDOW_UPDATE makes it
    positive again. A sender that waits only while the window is exactly 0 takes -500 for
    room."""
    client = Client(server, {SettingCodes.INITIAL_WINDOW_SIZE: SMALL_WINDOW})
    client.grant = False  # only the test's own WINDOW_UPDATE below grants more
    size, lowered, update = 2 * 16_384, SMALL_WINDOW // 2, 40_000
    try:
        sid = client.get("/two-frames")
        client.run_until(lambda: len(client.streams[sid].body) >= SMALL_WINDOW,
                         f"first {SMALL_WINDOW} bytes of /two-frames (the stream's window)")
        acked = client.settings_acked
        client.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: lowered})
        client.flush()
        client.run_until(lambda: client.settings_acked > acked,
                         "SETTINGS ACK for the lowered SETTINGS_INITIAL_WINDOW_SIZE")
        client.h2.increment_flow_control_window(update, sid)
        client.flush()
        try:
            client.run_until(client.ended(sid), "rest of /two-frames")
        except pytest.fail.Exception as exc:
            stalled = str(exc)
        else:
            stalled = ""
        if stalled:
            pytest.fail(
                f"/two-frames stopped at {len(client.streams[sid].body):,} of {size:,} bytes "
                f"after the client lowered SETTINGS_INITIAL_WINDOW_SIZE from {SMALL_WINDOW} "
                f"to {lowered} (the spent stream window became {lowered - SMALL_WINDOW}) and "
                f"then granted {update:,} more with WINDOW_UPDATE; expected the rest of the "
                "body\nA lowered SETTINGS_INITIAL_WINDOW_SIZE can make a window negative "
                "(RFC 9113 6.9.2): the sender MUST NOT send until WINDOW_UPDATEs make it "
                "positive. Wait while local_flow_control_window() <= 0, not only while it is "
                f"0: a negative window is no room to send.\n({stalled})", pytrace=False)
        assert bytes(client.streams[sid].body) == b"f" * size, (
            f"/two-frames arrived with {len(client.streams[sid].body)} bytes, expected {size}")
    finally:
        client.close()


def test_a_request_ended_by_trailers_is_answered(server: Any, client: Client) -> None:
    """A request may end with trailers: HEADERS after its DATA, carrying END_STREAM (RFC
    9113 8.1; gRPC sends them). The request is complete at StreamEnded, whichever frame
    carried the flag, and the trailers are no new request."""
    body = b"checked " * 300  # 2,400 bytes
    sid = client.h2.get_next_available_stream_id()
    client.streams[sid] = Stream("/echo")
    client.h2.send_headers(sid, [(":method", "POST"), (":path", "/echo"), (":scheme", "http"),
                                 (":authority", "lab.test")])
    client.h2.send_data(sid, body)
    client.h2.send_headers(sid, [("x-checksum", "c0ffee")], end_stream=True)
    client.flush()
    advice = ("A request's END_STREAM may come on a HEADERS frame of trailers after its "
              "DATA (RFC 9113 8.1): h2 reports TrailersReceived, then StreamEnded. Start "
              "the handler on StreamEnded, not on the DATA or HEADERS event's stream_ended, "
              "and keep the request the first HEADERS began: trailers are no new request.")
    client.run_until(client.ended(sid), "/echo response to a request ended by trailers "
                     "(HEADERS with END_STREAM after its DATA)", hint=advice)
    got = bytes(client.streams[sid].body)
    assert got == body, (
        f"/echo, a {len(body):,}-byte body followed by trailers, answered with {len(got):,} "
        f"bytes ({got[:40]!r}), expected the body\n{advice}")


@dataclass(frozen=True)
class OddValue:
    """A header value that is no ASCII, and what the handler must see of it."""

    what: str
    raw: bytes
    seen: str


ODD_VALUES = [
    OddValue("a Latin-1 byte, 0xE9 (obs-text)", b"caf\xe9", "caf\xe9"),
    OddValue("UTF-8, 0xC3 0xA9", b"caf\xc3\xa9", "caf\xc3\xa9"),
]


@pytest.mark.parametrize("odd", ODD_VALUES, ids=["latin-1", "utf-8"])
def test_a_header_value_is_octets(server: Any, client: Client, odd: OddValue) -> None:
    """x-note's value is bytes that are no ASCII: the handler gets it decoded as
    ISO-8859-1, one character per byte (RFC 9110 5.5, PEP 3333), and the connection goes
    on serving."""
    rule = ("A field value is octets (RFC 9110 5.5: obs-text, 0x80-0xFF, is allowed), not "
            "UTF-8: decode it as ISO-8859-1, one character per byte, as WSGI does (PEP "
            "3333) - every value then arrives intact, and none can raise in your read loop. "
            "A strict .decode() crashes the connection and every stream on it for one "
            "client's header; errors='replace' and UTF-8-first guesses change the octets.")
    sid = client.get("/note", extra=[(b"x-note", odd.raw)])
    failed = ""
    try:
        client.run_until(client.ended(sid), f"response to a request whose x-note header is "
                         f"{odd.raw!r} ({odd.what})", hint=rule)
    except pytest.fail.Exception as exc:
        failed = str(exc)
    if failed:  # outside the except block: a clean failure message
        strict = ("your server decoded the value strictly (UTF-8 or ASCII) and crashed: "
                  if "UnicodeDecodeError" in failed else "")
        pytest.fail(f"a request whose x-note header is {odd.raw!r} ({odd.what}) got no "
                    f"response: {strict}{failed.splitlines()[0]}; expected the handler to see "
                    f"{ascii(odd.seen)} and a 200\n{rule}", pytrace=False)
    got = bytes(client.streams[sid].body).decode("ascii", "replace")
    assert got == ascii(odd.seen), (
        f"a request's x-note header was {odd.raw!r} ({odd.what}); the handler saw {got}, "
        f"expected {ascii(odd.seen)}\n{rule}")
    after = client.get("/after-note")
    client.run_until(client.ended(after), "a response on the same connection afterwards",
                     hint=rule)


TAGS = ["first", "second", "third"]  # one field name, three field lines, in this order


def test_a_repeated_field_keeps_every_value(server: Any, client: Client) -> None:
    """x-tag comes three times (another field between them): the handler sees one x-tag
    whose value is the three, in order, joined with commas (RFC 9110 5.3)."""
    extra = [(b"x-tag", TAGS[0].encode()), (b"accept", b"text/plain"),
             *((b"x-tag", tag.encode()) for tag in TAGS[1:])]
    sid = client.get("/fields", extra=extra)
    client.run_until(client.ended(sid), "response to a request with x-tag sent three times")
    got = bytes(client.streams[sid].body).decode("ascii", "replace")
    want = ascii(", ".join(TAGS))
    values = [part.strip() for part in got.strip("'").split(",")]
    kept = (f"only its {'last' if values == TAGS[-1:] else 'first'} value: the fields went "
            "into the dict one by one, each replacing (or skipped for) the one before"
            if values in (TAGS[-1:], TAGS[:1]) else "")
    assert values == TAGS, (
        f"the client sent x-tag three times ({', '.join(TAGS)}); the handler saw x-tag = "
        f"{got}{', ' + kept if kept else ''}, expected {want}\nA field name may come more "
        "than once; its values are one list, in order, and a server that hands the "
        "application a single value per name joins them with ', ' (RFC 9110 5.3) - dropping "
        "all but one changes what the request says (h2 already joins a cookie's crumbs "
        "with '; ', RFC 9113 8.2.3).")
    names = client.get("/names", extra=[(b"accept", b"text/plain")])
    client.run_until(client.ended(names), "response to /names on the same connection")
    got_names = bytes(client.streams[names].body).decode("ascii", "replace").split(",")
    pseudo = [name for name in got_names if name.startswith(":")]
    assert not pseudo and "accept" in got_names, (
        f"a request with one regular field (accept) reached the handler with header names "
        f"{got_names}; expected only regular fields, ['accept'], and never the pseudo-headers "
        f"{pseudo}\nThe pseudo-headers (:method, :path, :scheme, :authority) are the "
        "request line's parts, not fields (RFC 9113 8.3): they go to Request.method and "
        "Request.path, and Request.headers holds the regular fields only - an application "
        "that copies or forwards its headers would send ':path' as a header.")


def test_a_stream_reset_before_its_end_spares_the_others(server: Any,
                                                         client: Client) -> None:
    """The client gives up an upload halfway (headers and part of the body sent, no
    END_STREAM, then RST_STREAM): no handler runs for it, and the connection goes on
    serving the other streams."""
    upload = client.h2.get_next_available_stream_id()
    client.streams[upload] = Stream("/echo")
    client.h2.send_headers(upload, [(b":method", b"POST"), (b":path", b"/echo"),
                                    (b":scheme", b"http"), (b":authority", b"lab.test")])
    client.h2.send_data(upload, b"the first half of an upload the client gives up")
    client.h2.ping(b"lab-half")
    client.flush()
    client.run_until(lambda: client.pings_acked == 1, "PING ACK behind the half upload")
    client.h2.reset_stream(upload, error_code=ErrorCodes.CANCEL)
    later = client.get("/after-half-upload")
    failure = ""
    try:
        client.run_until(client.ended(later), "a response on the same connection")
    except pytest.fail.Exception as exc:
        failure = str(exc).splitlines()[0]
    if failure:
        pytest.fail(
            "the client reset a stream whose request was not complete yet (headers and part "
            "of its body sent, no END_STREAM: no handler had started); the next request on "
            f"the connection got no answer: {failure}\nA RST_STREAM can "
            "come for a stream that has no task (its request still arriving, or already "
            "answered): cancel its task if there is one (tasks.pop(sid, None)), and never "
            "let one stream's reset end the connection and every other stream on it.",
            pytrace=False)
    problems = server.problems()
    assert not problems, (
        f"after the client reset a stream whose request was not complete yet: {problems[0]}")


def test_a_reset_stream_cancels_its_handler(server: Any, client: Client) -> None:
    """The client cancels a request (RST_STREAM) while its handler is still working: the
    work must stop, not run on for nobody."""
    held = client.get("/held")
    client.h2.ping(b"lab-held")
    client.flush()
    client.run_until(lambda: client.pings_acked == 1, "PING ACK behind the /held request")
    client.h2.reset_stream(held, error_code=ErrorCodes.CANCEL)
    client.h2.ping(b"lab-rst!")
    client.flush()
    client.run_until(lambda: client.pings_acked == 2, "PING ACK behind the RST_STREAM")
    deadline = time.monotonic() + WAIT
    while "/held" not in server.cancelled_paths() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "/held" in server.cancelled_paths(), (
        "the client reset the /held stream (RST_STREAM, CANCEL) and the server processed it "
        f"(it answered the PING behind it), yet /held's handler was still running {WAIT:.0f} "
        "s later: on StreamReset cancel that stream's task - the client will never read "
        "the answer, and the work (a query, a call) runs on for nobody")
    later = client.get("/after-reset")
    client.run_until(client.ended(later), "a response on the same connection after a reset")


def _close(client: Client) -> None:
    client.sock.close()


def _reset(client: Client) -> None:
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()  # SO_LINGER 0: the close sends RST, the server's read fails


def _break_protocol(client: Client) -> None:
    # A DATA frame on stream 0 (length 0, type DATA, no flags): h2 refuses it with a
    # ProtocolError; the server answers GOAWAY and the connection is over.
    client.sock.sendall(b"\x00\x00\x00" b"\x00" b"\x00" b"\x00\x00\x00\x00")
    client.sent += 9


def _goaway(client: Client) -> None:
    # GOAWAY, NO_ERROR: "I open no more streams" - and h2 on the server's side then
    # closes its connection state: nothing more can be sent there (python-hyper/h2#1181).
    client.h2.close_connection()
    client.flush()


GOAWAY = "sent GOAWAY (NO_ERROR)"
CLOSED, RESET = "closed the TCP connection", "reset the TCP connection (RST)"
CONNECTION_ENDS = {
    CLOSED: _close,
    GOAWAY: _goaway,
    "broke the protocol (a DATA frame on stream 0)": _break_protocol,
    RESET: _reset,
}
GOAWAY_ENDS = (
    "\nA client's GOAWAY (ConnectionTerminated) ends the connection for an h2 server: RFC "
    "9113 6.8 would let the streams in flight finish, but h2 closes its state the moment "
    "it receives one and sends nothing more (python-hyper/h2#1181), so no answer can go "
    "out. Ignoring the event, or waiting for the streams to finish, keeps handlers running "
    "and the socket open for nobody: cancel the stream tasks and close the connection.")


@pytest.mark.parametrize("how", list(CONNECTION_ENDS))
def test_the_connection_ending_cancels_its_handlers(server: Any, client: Client,
                                                    how: str) -> None:
    """A stream's work belongs to its connection: however the connection ends, the
    handlers still running for its streams are cancelled, not left to run for nobody.
    Once the ending is in the server's hands (every byte the client sent, and the EOF or
    the reset, reached its reader), with nothing left to wait for outside, a few hundred
    event-loop rounds are enough to cancel /held's task (and close, after a GOAWAY):
    rounds, not seconds, so no margin depends on the machine's load."""
    client.get("/held")
    client.h2.ping(b"lab-held")
    client.flush()
    client.run_until(lambda: client.pings_acked == 1, "PING ACK behind the /held request")
    CONNECTION_ENDS[how](client)
    seen = server.settle(client.sent, ended=how in (CLOSED, RESET))
    if seen["fed"] < seen["sent"] or (how in (CLOSED, RESET) and not seen["ended"]):
        pytest.fail(f"test setup: the server's reader got {seen['fed']} of the "
                    f"{seen['sent']} bytes the client sent (its end seen: {seen['ended']}) "
                    f"within {WAIT:.0f} s", pytrace=False)
    after = (f"the client {how} while /held's handler was running; your server had "
             f"{'read it' if how not in (CLOSED, RESET) else 'seen it'}, and "
             f"{seen['rounds']} rounds of its event loop later, with nothing left to wait "
             "for,")
    if how == GOAWAY and not seen["cancelled"]:
        stopped = ("the connection was closed but" if seen["closing"]
                   else "the connection was still open and")
        pytest.fail(f"{after} {stopped} /held's handler was still running; expected it "
                    f"cancelled and the connection closed{GOAWAY_ENDS}", pytrace=False)
    if how == GOAWAY and not seen["closing"]:
        pytest.fail(f"{after} /held's handler was cancelled but the connection was still "
                    f"open; expected it closed{GOAWAY_ENDS}", pytrace=False)
    assert seen["cancelled"], (
        f"{after} that handler was still running: its task outlived the connection\n"
        "When the connection ends - EOF, a reset, a protocol error, any way out of your "
        "read loop - cancel every stream task still running (in a finally): nobody is "
        "left to read those answers, and the abandoned work (a query, a lock, a call) "
        "would run on for nobody, one more per client that goes away.")
    if how == GOAWAY:
        try:
            left = client.sock.recv(65536)
            while left:
                left = client.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the client sent GOAWAY, the server cancelled /held's handler, and "
                        f"{WAIT:.0f} s later the connection was still open{GOAWAY_ENDS}",
                        pytrace=False)
        except ConnectionResetError:
            pass  # closed with unread bytes: closed all the same
        problems = server.problems()
        assert not problems, f"after the client's GOAWAY: {problems[0]}{GOAWAY_ENDS}"


SHARED_STATE = (
    "\nEvery HTTP/2 connection numbers its own streams (each client's first request is "
    "stream 1): a stream id means something only inside its connection. Keep the requests "
    "being received and the tasks answering them in the connection's own object, created "
    "per handle_connection() call - not in a class attribute (`tasks = {}` in the class "
    "body is one dict for every instance) or a module-level dict or set.")


def test_connections_keep_their_streams_apart(server: Any) -> None:
    """Two clients on two TCP connections, each with its own stream 1 (and 3): a request
    half received on A while B sends and is answered on its stream 1; then A closes while
    B's /held is still running. Neither connection may see, lose or cancel the other's."""
    a, b = Client(server), Client(server)
    try:
        body_a, body_b = b"A" * 3000, b"B" * 2000
        sid_a = a.h2.get_next_available_stream_id()
        a.streams[sid_a] = Stream("/echo")
        a.h2.send_headers(sid_a, [(":method", "POST"), (":path", "/echo"), (":scheme", "http"),
                                  (":authority", "lab.test")])
        a.h2.send_data(sid_a, body_a[:1000])
        a.h2.ping(b"lab-half")
        a.flush()
        a.run_until(lambda: a.pings_acked == 1, "PING ACK behind the first part of A's body")
        sid_b = b.get("/echo", body_b)
        assert sid_b == sid_a, f"test setup: streams {sid_a} and {sid_b}, expected both 1"
        try:
            b.run_until(b.ended(sid_b), f"connection B's /echo response on its stream {sid_b}")
            a.h2.send_data(sid_a, body_a[1000:], end_stream=True)
            a.flush()
            a.run_until(a.ended(sid_a), f"connection A's /echo response on its stream {sid_a}")
        except pytest.fail.Exception as failed:
            pytest.fail(
                f"connection A had sent the headers and 1,000 of the 3,000 body bytes of a "
                f"request on its stream {sid_a} when connection B sent a whole request on its "
                f"own stream {sid_b}; then A's request failed: {failed}{SHARED_STATE}",
                pytrace=False)
        got = {"A": bytes(a.streams[sid_a].body), "B": bytes(b.streams[sid_b].body)}
        assert got == {"A": body_a, "B": body_b}, (
            f"two connections each sent /echo on their stream {sid_a}: A's answer was "
            f"{len(got['A']):,} bytes starting {got['A'][:8]!r}, B's {len(got['B']):,} "
            f"starting {got['B'][:8]!r}; expected each its own body (A: 3,000 x 'A', B: "
            f"2,000 x 'B'): one connection's DATA went into the other's request"
            f"{SHARED_STATE}")
        held = b.get("/held")
        b.h2.ping(b"lab-b-hd")
        b.flush()
        b.run_until(lambda: b.pings_acked == 1, "PING ACK behind B's /held request")
        a.close()
        deadline = time.monotonic() + WAIT
        while server.finished < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.finished >= 1, (
            f"connection A was closed by its client, and {WAIT:.0f} s later your "
            "handle_connection() for it had not returned: on EOF (read() returns b'') leave "
            "the read loop")
        b.h2.ping(b"lab-b-af")  # a round trip on B: a cancellation sent by A's end has run
        b.flush()
        b.run_until(lambda: b.pings_acked == 2, "PING ACK on B after A had closed")
        assert "/held" not in server.cancelled_paths(), (
            f"connection A closed, and connection B's /held handler (its stream {held}, "
            f"still running) was cancelled with it; expected only A's own streams to be "
            f"cancelled: B's client still waits for that answer{SHARED_STATE}")
        server.release_slow()
        b.run_until(b.ended(held), "B's /held response after its release (A had closed)")
        assert bytes(b.streams[held].body) == b"slow done", (
            f"B's /held answered {bytes(b.streams[held].body)!r}, expected b'slow done'")
    finally:
        a.close()
        b.close()
