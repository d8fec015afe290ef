"""Verification for ph1.c send_json (the roadmap's C example of Phase 1).

The learner's send_json.c is compiled with -Wall -Wextra -Werror under ASan+UBSan into a
small HTTP server (harness.c) that answers every request with send_json(). A real HTTP
client (http.client) judges the responses. The harness turns the learner's writes on the
client socket into short writes and EINTRs, the same sequence every run, so a builder that
does not loop is caught every time, not only on a busy machine. Every test ends by asking
the server to quit and checking it exits 0 with nothing on stderr - no sanitizer report.
"""

from __future__ import annotations

import errno
import http.client
import os
import queue
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REASONS = {
    200: {"OK"}, 201: {"Created"}, 202: {"Accepted"}, 400: {"Bad Request"},
    401: {"Unauthorized"}, 403: {"Forbidden"}, 404: {"Not Found"},
    405: {"Method Not Allowed"}, 409: {"Conflict"},
    422: {"Unprocessable Content", "Unprocessable Entity"},  # RFC 9110 / RFC 4918 name
    429: {"Too Many Requests"}, 500: {"Internal Server Error"}, 502: {"Bad Gateway"},
    503: {"Service Unavailable"},
}
WAIT = 10.0  # seconds for anything the server should do at once

def server_binary(learner: Any) -> Path:
    """Built once per session (learner.build() keeps it)."""
    return Path(learner.build()) / "send_json_server"


def expected_body(status: int, size: int) -> bytes:
    """What harness.c's make_body() builds."""
    prefix = f'{{"status":{status},"pad":"'.encode()
    size = max(size, len(prefix) + 2)
    pad = bytes(ord("a") + i % 26 for i in range(len(prefix), size - 2))
    return prefix + pad + b'"}'


class Server:
    """The harness process: its port, and its stdout lines as they come."""

    def __init__(self, learner: Any, binary: Path, short_writes: bool) -> None:
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1",
               "UBSAN_OPTIONS": "print_stacktrace=1",
               "SEND_JSON_SHORT_WRITES": "1" if short_writes else "0"}
        # learner.popen: when grading, the learner's binary runs as the learner's uid.
        self.proc = learner.popen([str(binary)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                         daemon=True).start()
        self._stderr_reader = threading.Thread(
            target=self._pump, args=(self.proc.stderr, self.errors.append), daemon=True)
        self._stderr_reader.start()
        first = self.next_line("the server to print its port")
        assert first.startswith("PORT "), f"the harness printed {first!r} instead of its port"
        self.port = int(first.split()[1])

    @staticmethod
    def _pump(stream: Any, sink: Any) -> None:
        for raw in stream:
            sink(raw.decode(errors="replace").rstrip("\n"))

    def next_line(self, what: str) -> str:
        try:
            return self.lines.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"waited {WAIT:.0f} s for {what}: send_json() never returned (a loop "
                        "that retries forever?)", pytrace=False)

    def sent(self) -> tuple[int, int]:
        """The (status, return value) of the last send_json() call."""
        line = self.next_line("send_json() to return")
        _, status, rc = line.split()
        return int(status), int(rc)

    def get(self, path: str) -> tuple[http.client.HTTPResponse, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response, response.read()
        except (http.client.HTTPException, OSError) as exc:
            seen = str(exc)
            if "HTTP/1.1" in seen and not seen.lstrip("'\"").startswith("HTTP/1.1"):
                cause = ("bytes arrived twice (the status line starts with a repeat): after a "
                         "short write, go on from where it stopped (buf += n), not from the "
                         "start")
            else:
                cause = ("bytes are missing: write() may write fewer bytes than asked; loop "
                         "until every byte is written")
            pytest.fail(f"GET {path}: the bytes on the wire are not a whole HTTP response: "
                        f"{cause} ({type(exc).__name__}: {seen[:80]})", pytrace=False)
        finally:
            conn.close()

    def finish(self) -> None:
        """Ask the server to quit; it must exit 0 with nothing on stderr."""
        self.get("/quit")
        try:
            code = self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("the server did not exit after GET /quit", pytrace=False)
        self._stderr_reader.join(WAIT)  # it ends at EOF, once everything was read
        report = "\n".join(self.errors).strip()
        assert code == 0 and not report, (
            f"the server exited with {code} and printed on stderr (ASan/UBSan):\n"
            f"{report[:2000]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running(learner: Any, short_writes: bool = True) -> Iterator[Server]:
    """The harness with the learner's send_json(); short_writes: have every write on the
    client socket cut short or interrupted (harness.c)."""
    server = Server(learner, server_binary(learner), short_writes)
    try:
        yield server
    finally:
        server.kill()


# Codes the README does not list: the phrase is the code's own (RFC 9110's) or a generic one
# of its class - never another class's ("HTTP/1.1 207 Client Error" contradicts itself too).
# No 1xx, 204 or 304: those carry no body, and the harness always sends one.
UNLISTED = (207, 299, 308, 399, 418, 451, 499, 507, 599)
CLASS_PHRASES = {2: {"Success", "OK"}, 3: {"Redirection", "Redirect"}, 4: {"Client Error"},
                 5: {"Server Error"}}


def phrases_for(status: int) -> set[str]:
    own = {s.phrase for s in http.HTTPStatus if s.value == status}
    return own | CLASS_PHRASES[status // 100]


# ---- the verification -------------------------------------------------------------------

def test_unlisted_statuses_get_a_phrase_of_their_class(learner: Any) -> None:
    with running(learner, short_writes=False) as server:
        for status in UNLISTED:
            response, _ = server.get(f"/{status}?bytes=64")
            assert response.status == status, (
                f"GET /{status}: expected an HTTP/1.1 {status} status line, saw "
                f"{response.status}")
            assert response.reason in phrases_for(status), (
                f"status {status} (not in the list you were given): saw the reason phrase "
                f"{response.reason!r}, expected its own or one of its class "
                f"({', '.join(sorted(phrases_for(status)))}): a generic phrase follows the "
                f"code's class (status / 100: 2xx success, 3xx redirection, 4xx client "
                "error, 5xx server error), never another class's")


def test_reason_phrase_matches_status(learner: Any) -> None:
    with running(learner, short_writes=False) as server:  # the status line alone
        for status, reasons in REASONS.items():
            response, body = server.get(f"/{status}?bytes=64")
            assert response.status == status and response.version == 11, (
                f"GET /{status}: expected an HTTP/1.1 {status} status line, saw "
                f"HTTP/{response.version / 10:.1f} {response.status}")
            assert response.reason in reasons, (
                f"status {status}: expected the reason phrase {sorted(reasons)[0]!r}, saw "
                f"{response.reason!r}: 'HTTP/1.1 {status} OK' contradicts itself; the phrase "
                "must match the code")
            assert response.getheader("Content-Type") == "application/json", (
                f"status {status}: expected Content-Type: application/json, saw "
                f"{response.getheader('Content-Type')!r}")
            length = response.getheader("Content-Length")
            assert length == str(len(expected_body(status, 64))), (
                f"status {status}: Content-Length: {length} for a "
                f"{len(expected_body(status, 64))}-byte body: count the body's bytes "
                "(strlen(body)); sizeof(body) is the size of the pointer")
            assert body == expected_body(status, 64), (
                f"status {status}: the body differs from the one passed to send_json(): "
                f"{body[:80]!r}")
            assert server.sent() == (status, 0), f"status {status}: send_json() must return 0"
        server.finish()


def raw_response(port: int, path: str) -> bytes:
    """Every byte the server sends for ``path``, up to its close (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data)


def test_message_is_exactly_its_framing(learner: Any) -> None:
    """http.client reads Content-Length bytes and stops: what follows them goes unseen
    there, but on a persistent connection it is parsed as the next response."""
    with running(learner, short_writes=False) as server:
        for size in (64, 1000):
            raw = raw_response(server.port, f"/200?bytes={size}")
            server.sent()
            head, blank, body = raw.partition(b"\r\n\r\n")
            assert blank, (
                f"GET /200?bytes={size}: no empty line (CRLF CRLF) ends the header block: "
                f"{raw[:200]!r}\nEvery header line ends with \\r\\n, and one more \\r\\n "
                "ends the header block")
            bare = [line for line in head.split(b"\r\n") if b"\n" in line]
            assert not bare, (
                f"GET /200?bytes={size}: a header line ends with a bare \\n, not \\r\\n: "
                f"{bare[0]!r}\nHTTP/1.1 lines end with CRLF (RFC 9112)")
            want = expected_body(200, size)
            extra = body[len(want):] if body.startswith(want) else b""
            assert body == want, (
                f"GET /200?bytes={size} (Content-Length: {len(want)}): the connection carried "
                f"{len(body)} bytes after the header block, expected exactly {len(want)}"
                + (f"; {len(extra)} more after the body: {extra[:20]!r}" if extra else "")
                + "\nThe body is exactly Content-Length bytes and nothing follows it: it has no "
                "terminator (no CRLF, no NUL). On a persistent connection (keep-alive, a "
                "proxy's upstream) extra bytes are read as the start of the next response: "
                "'bad status line'.")
        server.finish()


@pytest.mark.parametrize("size", [100, 70_000, 1_000_000])
def test_body_survives_partial_writes(learner: Any, size: int) -> None:
    with running(learner) as server:
        response, body = server.get(f"/200?bytes={size}")
        _, rc = server.sent()
        assert rc == 0, (
            f"send_json() returned {rc} on a healthy connection while sending {size} bytes: a "
            "write() was cut short or failed with EINTR and it gave up; loop on short writes "
            "and retry EINTR")
        length = response.getheader("Content-Length")
        assert length == str(size), (
            f"a {size}-byte body: expected Content-Length: {size}, saw {length!r}")
        want = expected_body(200, size)
        assert len(body) == size and body == want, (
            f"a {size}-byte body arrived as {len(body)} bytes"
            + ("" if len(body) != size else " with different content")
            + ": write() may write fewer bytes than asked (and fail with EINTR); loop until "
            "every byte is written")
        server.finish()


def test_vanished_client_is_an_error(learner: Any) -> None:
    with running(learner, short_writes=False) as server:  # the error path alone
        # A client that asks for 4 MB and resets the connection at once.
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"GET /200?bytes=4000000 HTTP/1.1\r\nHost: test\r\n\r\n")
        sock.close()
        _, rc = server.sent()
        assert rc == -1, (
            f"send_json() to a client that reset the connection returned {rc}, expected -1: "
            "write() failing with EPIPE or ECONNRESET means the response was not delivered; "
            "only EINTR is worth retrying")
        response, body = server.get("/201?bytes=80")
        assert response.status == 201 and body == expected_body(201, 80), (
            "after a client vanished, the next request was not answered correctly")
        server.sent()
        server.finish()


# Errors of write() that look transient but are not EINTR: the call failed and nothing says
# the same call will do better at once. EAGAIN (== EWOULDBLOCK on Linux): a non-blocking
# socket's send buffer is full, or SO_SNDTIMEO expired; ENOBUFS: the kernel is out of buffers.
NOT_EINTR = ("EAGAIN", "ENOBUFS")


def test_only_eintr_is_retried(learner: Any) -> None:
    with running(learner) as server:
        for name in NOT_EINTR:
            # The harness fails one write() of this response with `name` instead of EINTR.
            with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
                sock.sendall(f"GET /200?bytes=10000&errno={getattr(errno, name)} HTTP/1.1\r\n"
                             "Host: test\r\n\r\n".encode())
                while sock.recv(65536):  # whatever comes, until the server closes
                    pass
            _, rc = server.sent()
            assert rc == -1, (
                f"a write() of the response failed with {name} (not EINTR) and send_json() "
                f"returned {rc}, expected -1: only EINTR means 'call write() again'; any "
                "other error is final for this call and goes to the caller (EAGAIN: the "
                "socket is non-blocking and its send buffer is full, or SO_SNDTIMEO expired "
                "- retrying spins at 100% CPU while the peer does not read, and never ends "
                "if it never does; an event loop waits for POLLOUT instead)")
        server.finish()
