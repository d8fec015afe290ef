"""Verification for ph0.2: graceful close, half-close and abortive close on real loopback
TCP connections. The test holds the other end of each connection and reports what a peer
really sees (EOF, reset, late data); TIME_WAIT is read from the kernel's /proc/net/tcp.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from labrunner.testing import TCP_STATES, TcpSocket, own_cpu_seconds, tcp_sockets

LATE_WRITES = 3                                     # the peer's late data comes in this many writes
# The peer's data after the half-close: bytes, not text. Each write ends inside a two-byte
# UTF-8 character (the next write brings its second byte), and bytes that are no UTF-8 at
# all (0x00, 0xff) run through it: a TCP stream carries bytes, whatever they are.
_LINE = "late reply, sent after your FIN: café\n".encode() + b"\x00\xff\x80\n"
LATE = _LINE * 64
_PIECE = -(-len(LATE) // LATE_WRITES)
LATE = LATE[:_PIECE - 1] + "é".encode() + LATE[_PIECE - 1:]  # é across the first boundary
assert LATE[_PIECE - 1:_PIECE + 1] == "é".encode()
WAIT = 6.0                                          # generous bound for anything that must happen
PAUSE = 2.5   # the peer's silence before its last write: only ever slows a right answer
# CPU seconds the learner's side may use while its peer is silent for PAUSE s. A drain
# asleep in recv() uses next to none (0.00-0.01 s measured, most of it this test's own
# readings), whatever the load: CPU time counts only while a thread runs, and a blocked one
# does not. A drain that polls a non-blocking socket runs whenever it is given the CPU:
# 1.0-1.5 s of the 2.5 s measured on the shared, loaded 2-core machine (load average
# about 15), in this process or in the learner's own. Far from both.
SPIN_CPU = 0.25
# A TimeoutError counts as a drain that gave up (not a close that never sent its FIN) when
# the learner's function ran on this long after the peer read its FIN: a function that only
# sends its FIN as it gives up ends within milliseconds of the peer's read; a drain with a
# 2 s timeout runs 2 s and more after it.
DRAINING = 1.0


# ---------------------------------------------------------------------------- helpers


@dataclass
class Pair:
    """Both ends of one established loopback connection, and their addresses (kept
    because the learner's code closes its socket)."""

    client: socket.socket  # the connect()ing end
    server: socket.socket  # the accept()ed end
    client_addr: tuple[str, int]
    server_addr: tuple[str, int]

    def client_end(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(local, remote) of the client's end, as the kernel lists it."""
        return self.client_addr, self.server_addr

    def server_end(self) -> tuple[tuple[str, int], tuple[str, int]]:
        return self.server_addr, self.client_addr


@contextmanager
def connected() -> Iterator[Pair]:
    # The listener stays open for the whole test: while it holds the port nobody else can
    # listen there, so no new connection can reuse (and end) this one's TIME_WAIT.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=WAIT)
        server, _ = listener.accept()
        server.settimeout(WAIT)
        yield Pair(client, server, client.getsockname(), server.getsockname())
        client.close()
        server.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    with connected() as established:
        yield established


class Background:
    """Runs one learner function in a thread so the test can play the peer meanwhile."""

    def __init__(self, what: str, fn: Callable[..., Any], *args: Any,
                 blocked: str = "") -> None:
        self.what = what
        self.blocked = blocked  # what a recv() timing out means for this function
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.took = 0.0  # seconds the function ran, once it has ended
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by check()/wait()
            self.error = exc
        finally:
            self.took = time.monotonic() - self.started

    def check(self) -> None:
        """Fail now if the learner's function already raised."""
        if self.error is not None:
            if isinstance(self.error, UnicodeError):
                pytest.fail(f"{self.what} raised {type(self.error).__name__} ({self.error}): it "
                            "decoded the bytes it read as text\nA TCP connection carries bytes, "
                            "not characters: the peer's data need not be UTF-8, and one recv() "
                            "can end in the middle of a character the next one completes. "
                            "Keep the bytes as they came (b''.join(chunks)).", pytrace=False)
            if isinstance(self.error, NotImplementedError):
                pytest.fail(f"{self.what} is not implemented yet: {self.error}", pytrace=False)
            if isinstance(self.error, TimeoutError) and self.blocked:
                pytest.fail(f"{self.what} gave up after {WAIT:.0f} s blocked in recv() (the "
                            f"socket's timeout): {self.blocked}", pytrace=False)
            pytest.fail(f"{self.what} raised {type(self.error).__name__}: {self.error}",
                        pytrace=False)

    def ended(self, after: str) -> BaseException | None:
        """For a peer that reset the connection: wait (WAIT) for the function to end, fail
        when it has not ("... did not return within WAIT s <after>"); the OSError it raised,
        if any (the reset reaching a recv or send, for the test to judge); any other error
        fails as check() says."""
        self.thread.join(WAIT)
        if self.thread.is_alive():
            pytest.fail(f"{self.what} did not return within {WAIT:.0f} s {after}",
                        pytrace=False)
        if self.error is not None and not isinstance(self.error, OSError):
            self.check()
        return self.error

    def wait(self) -> Any:
        self.thread.join(WAIT)
        if self.thread.is_alive():
            pytest.fail(f"{self.what} did not return within {WAIT:.0f} s: it is still "
                        "blocked, probably in recv() waiting for data that never comes",
                        pytrace=False)
        self.check()
        return self.result


def crash(sock: socket.socket) -> None:
    """Close with an RST, not a FIN (SO_LINGER on, 0 s): a peer that crashed."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def peer_reads(sock: socket.socket, running: Background) -> str:
    """What the test's end sees next: 'eof', 'reset', 'data' or 'nothing' (for WAIT s)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        running.check()
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                return "data" if sock.recv(65536) else "eof"
            except ConnectionResetError:
                return "reset"
    return "nothing"


def _socket(local: tuple[str, int], remote: tuple[str, int]) -> TcpSocket | None:
    """One connection end as the kernel sees it (None: no socket)."""
    return next((sock for sock in tcp_sockets()
                 if sock.local == local and sock.remote == remote), None)


def tcp_state(local: tuple[str, int], remote: tuple[str, int]) -> str | None:
    """The kernel's state for one connection end, from /proc/net/tcp (None: no socket)."""
    sock = _socket(local, remote)
    return None if sock is None else TCP_STATES.get(sock.state, f"{sock.state:02X}")


def _queued(sock: socket.socket, request: int) -> int | None:
    """One queue of one socket this process holds, from the kernel (ioctl): bytes not yet
    acknowledged (TIOCOUTQ) or not yet read (FIONREAD); None once it is closed. Unlike
    /proc/net/tcp it does not grow with every other connection on the machine."""
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", raw)[0])


def wait_until_read(pair: Pair, running: Background) -> None:
    """Until the learner's end (the client's) has read everything the test's end sent."""
    wait_until_taken(pair.server, pair.client, running)


def wait_until_taken(sender: socket.socket, receiver: socket.socket,
                     running: Background) -> None:
    """Until the learner's end ``receiver`` has read everything the test's ``sender`` sent:
    delivered (the sender has no unacknowledged bytes) and taken out of the receive queue by
    recv(). Returns early when the learner's function is over; never fails by itself."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and running.thread.is_alive():
        sent = _queued(sender, termios.TIOCOUTQ)
        received = _queued(receiver, termios.FIONREAD)
        if sent is None or received is None or (sent == 0 and received == 0):
            return
        time.sleep(0.005)


def cpu_spent(learner: Any) -> float:
    """CPU seconds used so far by the process the learner's code runs in: this one (its
    functions run in a thread here), or, with the learner's code in a process of its own
    (grading), that one, read there (``run_helper``: its /proc/self)."""
    return float(learner.run_helper(own_cpu_seconds))


def expect_asleep_while_silent(what: str, cpu: float, silence: float, waiting: str) -> None:
    """Fail, naming a busy loop, when the learner's side burnt CPU while its peer sent
    nothing at all for ``silence`` s."""
    assert cpu < SPIN_CPU, (
        f"while the peer sent nothing for {silence:.1f} s ({waiting}), the process running "
        f"{what} used {cpu:.2f} s of CPU, expected next to none: it polled the socket in a "
        "busy loop (a non-blocking recv() tried again at once after BlockingIOError: "
        "setblocking(False), settimeout(0), MSG_DONTWAIT) instead of waiting\nA blocking "
        "recv() sleeps in the kernel until data or the FIN arrives, at no CPU cost; a "
        "spinning drain burns a core for as long as the peer takes, and a server draining "
        "a few slow peers that way has no CPU left for anyone else.")


def wait_for_state(local: tuple[str, int], remote: tuple[str, int], want: str) -> str | None:
    """Poll the kernel table briefly: the last segments are processed asynchronously.
    ``want`` "" waits for the socket to be gone."""
    deadline = time.monotonic() + WAIT
    state = tcp_state(local, remote)
    while state != (want or None) and time.monotonic() < deadline:
        time.sleep(0.01)
        state = tcp_state(local, remote)
    return state


SEEN = {
    "reset": "a reset (RST): the connection was aborted, not closed",
    "nothing": f"nothing at all for {WAIT:.0f} s: no FIN was sent",
    "data": "unexpected data",
    "eof": "an orderly EOF (your FIN)",
}


@dataclass
class Exchange:
    seen: str        # what the peer saw when the learner closed
    returned: Any    # what graceful_close() returned
    quiet_cpu: float = 0.0  # CPU seconds the learner's side used in the peer's pause
    refused: str = ""  # the error the peer's late write met (a reset from the learner's end)


def graceful_exchange(learner: Any, pair: Pair, pause: float = 0.0) -> Exchange:
    """The learner half-closes its client end; the test's end reads the FIN, answers with
    LATE in LATE_WRITES writes (each one only once the learner has read the one before,
    so no single recv() can return them all; with ``pause``, the last one only after that
    many seconds of silence), and closes."""
    closing = learner.load("closing")
    running = Background(
        "graceful_close()", closing.graceful_close, pair.client,
        blocked="it waited for the peer's FIN before sending its own, while the peer waited "
                "for yours\nThe active closer sends its FIN first (sock.shutdown("
                "socket.SHUT_WR)), then reads until recv() returns b''.")
    seen = peer_reads(pair.server, running)
    seen_at = time.monotonic()
    quiet_cpu, refused = 0.0, ""
    if seen == "eof":
        piece = -(-len(LATE) // LATE_WRITES)
        try:
            for start in range(0, len(LATE), piece):
                if pause and start + piece >= len(LATE):
                    # silence is not a FIN: a right answer just waits, asleep in recv()
                    before = cpu_spent(learner)
                    time.sleep(pause)
                    quiet_cpu = cpu_spent(learner) - before
                pair.server.sendall(LATE[start:start + piece])  # after the learner's FIN
                wait_until_read(pair, running)
        except OSError as exc:  # reported through what graceful_close() returns
            refused = type(exc).__name__
    pair.server.close()
    running.thread.join(WAIT)
    # Still running well after the peer read its FIN (a learner that waits for the peer's
    # FIN first sends its own only once it gives up: it ends right after the peer sees it)
    draining = running.started + running.took - seen_at > DRAINING
    if isinstance(running.error, TimeoutError) and seen == "eof" and draining:
        pytest.fail(
            f"graceful_close() raised TimeoutError after {running.took:.1f} s: it had sent its "
            "FIN (the peer read it) and was draining"
            + (f", and gave up while the peer was silent for {pause:.1f} s before the rest of "
               "its answer" if pause else "")
            + ": a timeout on the drain (settimeout(), or a socket timeout shorter than the "
            "peer takes) turned the peer's silence into an error\nSilence is neither an error "
            "nor the end of the stream: only the peer's FIN (recv() returning b'') ends it. A "
            "blocking recv() waits for it asleep, at no CPU cost.", pytrace=False)
    if isinstance(running.error, ConnectionResetError):
        pytest.fail(
            "graceful_close() raised ConnectionResetError, but the peer never reset: it read "
            "your FIN, sent its late data and closed normally\nYour own end answered that "
            "data with RST because its read direction was already shut (shutdown(SHUT_RDWR), "
            "or close() before draining). Shut only the write side: "
            "sock.shutdown(socket.SHUT_WR), then recv() until b''.", pytrace=False)
    return Exchange(seen, running.wait(), quiet_cpu, refused)


def _utf8(data: bytes | bytearray) -> bool:
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def expect_bytes_kept(what: str, got: Any, want: bytes, whose: str) -> None:
    """Fail, naming the mistake, when the bytes came back as text or were changed by a
    round trip through text (a decode with errors='replace' or 'ignore': what comes back
    is all UTF-8, and what was sent is not)."""
    if isinstance(got, str):
        pytest.fail(f"{what} text (str), expected {whose} as bytes\nA TCP connection carries "
                    "bytes: return them as they came, without decoding.", pytrace=False)
    if (isinstance(got, bytes | bytearray) and got and got != want and _utf8(got)
            and not _utf8(want)):
        pytest.fail(f"{what} {len(got)} bytes, expected the {len(want)} bytes of {whose}: the "
                    "bytes that are no UTF-8 were replaced or dropped, so they went through a "
                    "decode to text\nA TCP connection carries bytes, not characters: keep them "
                    "as they came (b''.join(chunks)).", pytrace=False)


def expect_not_the_last_read(what: str, got: Any, want: bytes, whose: str) -> None:
    """Fail, naming a drain that overwrites instead of collecting, when what came back is
    the end of ``want`` alone: what the last recv() returned."""
    if isinstance(got, bytes | bytearray) and got and len(got) < len(want) and \
            want.endswith(got):
        pytest.fail(
            f"{what} the last {len(got)} of the {len(want)} bytes of {whose}, without the "
            f"first {len(want) - len(got)}: only what the last recv() returned - each read "
            "replaced the ones before it (data = chunk, not data += chunk)\nOne recv() "
            "returns whatever has arrived so far, a piece of the stream, never the whole of "
            "it: collect every piece (chunks.append(chunk)) and join them once the peer's "
            "FIN (b'') ends the stream.", pytrace=False)


def client_reads(pair: Pair, running: Background) -> tuple[bytes, bool, bool]:
    """What the client reads within WAIT while ``running`` serves it: (the bytes, whether
    EOF ended them, whether a reset did)."""
    reply, ended, reset = b"", False, False
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not ended:
        running.check()
        try:
            chunk = pair.client.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            reset = True
            break
        ended = not chunk
        reply += chunk
    return reply, ended, reset


def expect_no_reset(reset: bool, reply: bytes, want: bytes) -> None:
    """Fail, naming an abortive close, when the client's read of the answer ended in RST."""
    if reset:
        lost = (f"here the last {len(want) - len(reply)} bytes of the answer never arrived"
                if len(reply) < len(want) else
                "here the whole answer had left before it, by luck of timing")
        pytest.fail(
            f"the client read {len(reply)} of the {len(want)} bytes of the answer, then its "
            "recv() raised ConnectionResetError instead of returning b'' (EOF): "
            "serve_until_eof() ended the connection with RST (an abortive close, SO_LINGER "
            "with a zero timeout), not with a FIN\nA reset throws away whatever is still in "
            f"the send buffer ({lost}), and the client sees an error instead of the end of "
            "the answer. Nor does it save anything: TIME_WAIT is the price of the active "
            "closer, the side whose FIN comes first, and here the client's came first. "
            "Close with close() (FIN).", pytrace=False)


def expect_fin(exchange: Exchange) -> None:
    assert exchange.seen == "eof", (
        f"after graceful_close() the peer saw {SEEN[exchange.seen]}; expected an orderly "
        "EOF\nsock.shutdown(socket.SHUT_WR) sends your FIN right away and keeps the socket "
        "open for reading; wait for the peer's FIN only after sending yours.")


# ---------------------------------------------------------------------------- graceful


def test_graceful_close_sends_fin(learner: Any, pair: Pair) -> None:
    expect_fin(graceful_exchange(learner, pair))


def test_data_after_half_close_still_arrives(learner: Any, pair: Pair) -> None:
    exchange = graceful_exchange(learner, pair)
    expect_fin(exchange)
    got = exchange.returned
    piece = -(-len(LATE) // LATE_WRITES)
    assert not (isinstance(got, bytes) and got and len(got) < len(LATE)
                and LATE.startswith(got)), (
        f"graceful_close() returned the first {len(got)} of the {len(LATE)} bytes the peer "
        f"sent after your FIN: it stopped reading too early\nThe peer sent them in "
        f"{LATE_WRITES} writes of {piece} bytes. A recv() that returns fewer bytes than you "
        "asked for is not the end of the stream; only b'' (the peer's FIN) is: keep "
        "calling recv() until it returns b''.")
    if got == b"":
        pytest.fail(
            f"graceful_close() returned b'', none of the {len(LATE)} bytes the peer sent after "
            "reading your FIN"
            + (f" (the peer's send of them failed: {exchange.refused}, your end had answered "
               "them with RST)" if exchange.refused else "")
            + ": it stopped reading as soon as its FIN was out - it closed the socket "
            "(close(), or shutdown then close without draining) or shut its read side "
            "(shutdown(SHUT_RD) ends reading, not writing: recv() returns b'' at once, and "
            "close() sends the FIN)\nA half-close ends only your direction: "
            "shutdown(socket.SHUT_WR) sends the FIN, and the peer's direction stays open until "
            "its own FIN - read until recv() returns b''.", pytrace=False)
    expect_not_the_last_read("graceful_close() returned", got, LATE,
                             "what the peer sent after your FIN")
    expect_bytes_kept("graceful_close() returned", got, LATE,
                      "what the peer sent after your FIN")
    assert got == LATE, (
        f"graceful_close() returned {len(got or b'')} bytes, expected the {len(LATE)} bytes "
        "the peer sent after your FIN\nA half-closed connection still delivers the other "
        "direction: read until recv() returns b''. close() or shutdown(SHUT_RDWR) throws "
        "that data away (the kernel answers it with RST).")
    assert pair.client.fileno() == -1, (
        "graceful_close() left the socket open: close it once the peer's FIN arrived")


def test_a_pause_is_not_the_end(learner: Any, pair: Pair) -> None:
    exchange = graceful_exchange(learner, pair, pause=PAUSE)
    expect_fin(exchange)
    got = exchange.returned
    if isinstance(got, bytes) and len(got) < len(LATE) and LATE.startswith(got):
        pytest.fail(
            f"graceful_close() returned the first {len(got)} of the {len(LATE)} bytes the "
            f"peer sent after your FIN: the peer was silent for {PAUSE} s before its last "
            "write, and graceful_close() took the silence for the end\nOnly the peer's FIN "
            "(recv() returning b'') ends its stream; a recv() timeout says nothing about "
            "what is still coming - do not turn one into the end of the data.", pytrace=False)
    assert got == LATE, (
        f"graceful_close() returned {len(got or b'')} bytes, expected the {len(LATE)} bytes "
        f"the peer sent after your FIN (the last part after {PAUSE} s of silence)")
    expect_asleep_while_silent("graceful_close()", exchange.quiet_cpu, PAUSE,
                               "after your FIN and part of its answer, before the rest")


# A long answer after the FIN: many times any socket buffer, more than a drain that stops
# at a size limit (1 MiB, a fixed buffer) takes. Bytes 0-255 over and over, so a prefix of
# it says where the drain stopped.
LONG = bytes(range(256)) * 32768  # 8 MiB


def test_a_long_answer_is_drained_whole(learner: Any, pair: Pair) -> None:
    """Huge data: after the learner's FIN the peer sends 8 MiB, then its FIN. The stream
    ends with the FIN, whatever its length: graceful_close() returns all of it."""
    closing = learner.load("closing")
    running = Background("graceful_close()", closing.graceful_close, pair.client)
    expect_fin(Exchange(peer_reads(pair.server, running), None))
    refused = ""
    try:
        pair.server.sendall(LONG)
    except OSError as exc:  # the learner's end closed with the rest unread: RST
        refused = type(exc).__name__
    pair.server.close()
    got = running.wait()
    if isinstance(got, bytes | bytearray) and len(got) < len(LONG) and LONG.startswith(got):
        pytest.fail(
            f"graceful_close() returned the first {len(got)} of the {len(LONG)} bytes the "
            "peer sent after your FIN: it stopped reading before the peer's FIN (a size "
            "limit, a fixed buffer) and closed with the rest unread"
            + (f" (the peer's send failed: {refused}, your end reset the connection)"
               if refused else "")
            + "\nThe peer's stream ends with its FIN (recv() returning b''), however long it "
            "is: keep reading until then. Closing with unread data makes the kernel answer "
            "with RST, so the peer sees an error instead of a clean end.", pytrace=False)
    assert got == LONG, (
        f"graceful_close() returned {len(got or b'')} bytes, expected the {len(LONG)} bytes "
        "the peer sent after your FIN")


def test_peer_reset_during_drain_still_closes(learner: Any, pair: Pair) -> None:
    """The error path: the peer aborts (RST) while graceful_close() drains. recv() raises
    ConnectionResetError; the socket must be closed all the same."""
    closing = learner.load("closing")
    running = Background("graceful_close()", closing.graceful_close, pair.client)
    seen = peer_reads(pair.server, running)
    expect_fin(Exchange(seen, None))
    crash(pair.server)  # RST: the peer crashed instead of answering
    error = running.ended("after the peer reset the connection")
    fd = pair.client.fileno()
    assert fd == -1, (
        f"the peer reset the connection while graceful_close() was draining; graceful_close() "
        f"{'raised ' + type(error).__name__ if error else 'returned'} and left the socket "
        f"open (file descriptor {fd}), expected it closed\nrecv() raises "
        "ConnectionResetError when the peer aborts: close the socket in a finally block "
        "(try: shutdown, drain / finally: close), or every aborted peer leaks a descriptor.")


@dataclass
class PeerFirst:
    """The peer finished first: it sent ``data`` (perhaps nothing) and its FIN before
    graceful_close() was called, so the learner's end sits in CLOSE_WAIT."""

    data: bytes
    what: str


PEER_FIRST = {
    "data_then_fin": PeerFirst(b"the peer's last words, sent before its FIN\n" * 40,
                               "its last data, then its FIN"),
    "fin_only": PeerFirst(b"", "its FIN, with no data"),
}


@pytest.mark.parametrize("case", PEER_FIRST.values(), ids=PEER_FIRST.keys())
def test_graceful_close_after_the_peers_fin(learner: Any, pair: Pair,
                                            case: PeerFirst) -> None:
    """The other order of a graceful close: the peer's FIN came first (our end in
    CLOSE_WAIT, as for a server whose client has finished). graceful_close() still returns
    what the peer sent and was not read, still sends an orderly FIN (the peer is waiting for
    it, in FIN_WAIT2), and closes; TIME_WAIT then falls to the peer, the active closer."""
    closing = learner.load("closing")
    if case.data:
        pair.server.sendall(case.data)
    pair.server.shutdown(socket.SHUT_WR)  # the peer's FIN, before the learner's call
    state = wait_for_state(*pair.client_end(), want="CLOSE_WAIT")
    assert state == "CLOSE_WAIT", f"the test's FIN did not arrive: the learner's end is {state}"
    running = Background("graceful_close()", closing.graceful_close, pair.client)
    seen = peer_reads(pair.server, running)
    got = running.wait()
    assert seen == "eof", (
        f"the peer had sent {case.what} (your end in CLOSE_WAIT) when graceful_close() was "
        f"called; the peer then saw {SEEN[seen]}, expected an orderly EOF (your FIN)\nA peer "
        "that has sent its FIN has finished sending, not gone away: it still reads, waiting "
        "in FIN_WAIT2 for your FIN. Send it (shutdown(SHUT_WR), then close()); an RST here "
        "turns a clean end into an error on the peer's side, and saves nothing: TIME_WAIT "
        "falls to the side whose FIN came first, here the peer's.")
    expect_bytes_kept("graceful_close() returned", got, case.data,
                      "what the peer sent before its FIN")
    assert got == case.data, (
        f"the peer had sent {len(case.data)} bytes and its FIN before graceful_close() was "
        f"called, not yet read; graceful_close() returned {got!r:.80}, expected those "
        f"{len(case.data)} bytes\nThey are the end of the peer's stream, which graceful_close() "
        "drains until b'': what was already waiting in the receive buffer is part of it. "
        "Throwing it away loses the peer's last words (a server's final answer, an error "
        "report) without a trace.")
    assert pair.client.fileno() == -1, (
        "graceful_close() left the socket open after the peer's FIN: close it")
    mine = wait_for_state(*pair.client_end(), want="")
    assert mine is None, (
        f"your end is in state {mine} after graceful_close(), expected no socket: the peer "
        "closed first, so your FIN was the second one (CLOSE_WAIT, LAST_ACK, gone) and "
        "TIME_WAIT is the peer's to hold")


def test_active_closer_passes_through_time_wait(learner: Any, pair: Pair) -> None:
    expect_fin(graceful_exchange(learner, pair))
    mine = wait_for_state(*pair.client_end(), want="TIME_WAIT")
    assert mine == "TIME_WAIT", (
        f"your end of the connection is in state {mine or 'gone'}, expected TIME_WAIT "
        "(read from /proc/net/tcp)\nThe side that sends the first FIN and then receives the "
        "peer's FIN waits 2*MSL in TIME_WAIT; a socket that vanished at once was reset.")
    theirs = tcp_state(*pair.server_end())
    assert theirs != "TIME_WAIT", (
        "the peer's end is in TIME_WAIT too: only the active closer (first FIN) should be")


# ---------------------------------------------------------------------------- abortive


def abort(learner: Any, pair: Pair) -> str:
    closing = learner.load("closing")
    running = Background("abortive_close()", closing.abortive_close, pair.client)
    running.wait()
    return peer_reads(pair.server, running)


def test_abortive_close_resets_the_peer(learner: Any, pair: Pair) -> None:
    seen = abort(learner, pair)
    assert seen == "reset", (
        f"after abortive_close() the peer saw {SEEN[seen]}; expected 'connection reset'\n"
        "Set SO_LINGER to struct.pack('ii', 1, 0) before close(): with a zero linger time "
        "the kernel sends RST instead of FIN.")
    assert pair.client.fileno() == -1, "abortive_close() must close the socket"


def test_abortive_close_skips_time_wait(learner: Any, pair: Pair) -> None:
    seen = abort(learner, pair)
    pair.server.close()
    if seen == "reset":
        state = tcp_state(*pair.client_end())  # a reset end is gone at once
    else:  # it was an orderly close after all: let the FIN exchange finish and look
        state = wait_for_state(*pair.client_end(), want="TIME_WAIT")
    assert state is None, (
        f"after abortive_close() your end is in state {state}, expected no socket at all\n"
        f"(the peer saw {SEEN[seen]}). RST ends the connection at once: no FIN_WAIT, no "
        "TIME_WAIT. That is why servers must not use it as a shortcut for a normal close: "
        "unsent data is lost.")


# ---------------------------------------------------------------------------- passive side


def test_server_answers_after_client_half_close(learner: Any, pair: Pair) -> None:
    requests: list[bytes] = []

    def answer(request: bytes) -> bytes:
        return b"%d bytes: " % len(request) + request.upper()

    def handler(request: bytes) -> bytes:
        requests.append(request)
        return answer(request)

    closing = learner.load("closing")
    running = Background("serve_until_eof()", closing.serve_until_eof, pair.server, handler)
    # bytes, not text: a UTF-8 character and bytes that are no UTF-8 in every line, and
    # lines of 26 bytes, so the reads end anywhere, inside a character too
    head, rest = b"report for:\n", "line of the request: é".encode() + b"\x00\xff\n"
    rest *= 5000
    pair.client.sendall(head)
    # The request is not over until the client's FIN: nothing may come back before it.
    # The client then pauses: serve_until_eof() waits, asleep in recv().
    before = cpu_spent(learner)
    readable, _, _ = select.select([pair.client], [], [], PAUSE)
    quiet_cpu = cpu_spent(learner) - before
    running.check()
    assert not readable, (
        "serve_until_eof() answered (or closed) after the first part of the request\n"
        "The client marks the end of its request with its FIN: read until recv() returns "
        "b'' before calling the handler.")
    expect_asleep_while_silent("serve_until_eof()", quiet_cpu, PAUSE,
                               "after the first part of its request, before the rest")
    pair.client.sendall(rest)
    pair.client.shutdown(socket.SHUT_WR)  # the client's half-close ends the request
    reply, ended, reset = client_reads(pair, running)
    expect_no_reset(reset, reply, answer(head + rest))
    if not ended:
        pytest.fail(f"the client read {len(reply)} bytes of the answer and then waited "
                    f"{WAIT:.0f} s for serve_until_eof()'s FIN, which never came\nThe "
                    "client reads the answer until EOF: send it, then close the socket "
                    "(its FIN ends the answer).", pytrace=False)
    running.wait()
    if len(requests) == 1:
        expect_not_the_last_read("the handler was called with", requests[0], head + rest,
                                 "the request")
    if len(requests) == 1 and len(requests[0]) < len(head + rest):
        pytest.fail(f"the handler was called with the first {len(requests[0])} of the "
                    f"{len(head + rest)} bytes of the request\nThe client marks the end of "
                    "its request with its FIN: read until recv() returns b'' before calling "
                    "the handler.", pytrace=False)
    if requests and requests != [head + rest]:
        expect_bytes_kept("the handler was called with", requests[0], head + rest,
                          "the request")
    want = answer(head + rest)
    assert reply == want, (
        f"the client read {len(reply)} bytes after its half-close, expected {len(want)} "
        f"(the handler's answer to the whole {len(head + rest)}-byte request)\n"
        "After the client's FIN your half of the connection is still open for sending.")
    assert requests == [head + rest], (
        "the handler was called with a partial request: read until EOF, then call it once")
    fd = pair.server.fileno()
    assert fd == -1, (
        f"serve_until_eof() returned with its socket still open (file descriptor {fd}); "
        "the client saw EOF because shutdown() sent the FIN, but the descriptor was never "
        "released\nshutdown() ends a direction; only close() frees the socket: a server "
        "that forgets it runs out of file descriptors after enough connections.")


def test_handler_error_still_closes(learner: Any, pair: Pair) -> None:
    """The error path of the passive side: the handler raises. Whether serve_until_eof()
    lets the error through or not, its socket must be closed, and the client must see
    the end of the connection instead of waiting forever."""
    def handler(request: bytes) -> bytes:
        raise RuntimeError("the application failed on this request")

    closing = learner.load("closing")
    running = Background("serve_until_eof()", closing.serve_until_eof, pair.server, handler)
    pair.client.sendall(b"a request whose handler fails\n")
    pair.client.shutdown(socket.SHUT_WR)
    running.thread.join(WAIT)
    if running.thread.is_alive():
        pytest.fail(f"serve_until_eof() did not return within {WAIT:.0f} s after the client's "
                    "FIN (its handler raises)", pytrace=False)
    error = running.error
    if error is not None and not isinstance(error, RuntimeError | OSError):
        running.check()
    fd = pair.server.fileno()
    seen = peer_reads(pair.client, Background("nothing", lambda: None)) if fd != -1 else ""
    assert fd == -1, (
        f"the handler raised RuntimeError and serve_until_eof() "
        f"{'let it through' if error else 'returned'} with its socket still open (file "
        f"descriptor {fd}); the client saw {SEEN.get(seen, seen)}\nClose the socket in a "
        "finally block (try: read, answer / finally: close): otherwise every failing "
        "request leaks a descriptor and leaves its client waiting for a FIN.")


def test_a_reset_mid_request_is_no_request(learner: Any, pair: Pair) -> None:
    """The error path mid-request: the client sends part of its request, then resets (it
    crashed). Its request never ended (no FIN): the handler is not called, with the part
    that came or with nothing, and the socket is closed."""
    requests: list[bytes] = []

    def handler(request: bytes) -> bytes:
        requests.append(request)
        return b"an answer to a request that never ended\n"

    closing = learner.load("closing")
    running = Background("serve_until_eof()", closing.serve_until_eof, pair.server, handler)
    part = b"the first part of a request whose client crashes before the rest\n"
    pair.client.sendall(part)
    wait_until_taken(pair.client, pair.server, running)  # read: the server waits for more
    crash(pair.client)  # RST, not FIN: the client crashed in the middle of its request
    error = running.ended("after the client reset the connection in the middle of its "
                          "request")
    assert not requests, (
        f"the client sent {len(part)} bytes of its request, then reset the connection (RST, "
        f"no FIN); serve_until_eof() called the handler with {requests[0]!r:.70}, expected "
        "no call: it took the reset for the end of the request\nOnly the client's FIN "
        "(recv() returning b'') ends a request; a reset (recv() raising "
        "ConnectionResetError) means it never finished. A handler run on what came before "
        "acts on a truncated request (half an order, a cut-off command).")
    fd = pair.server.fileno()
    assert fd == -1, (
        f"the client reset the connection mid-request; serve_until_eof() "
        f"{'raised ' + type(error).__name__ if error else 'returned'} and left its socket "
        f"open (file descriptor {fd}), expected it closed")


def test_an_empty_request_is_answered(learner: Any, pair: Pair) -> None:
    """A variant of the request: none at all. The client half-closes at once (a request with
    no body, `printf '' | nc -N`): the server's first recv() returns b''. That is the
    client's FIN - it has finished sending, and it still reads - not a client that has gone:
    the handler is called with b'' and its answer sent."""
    requests: list[bytes] = []
    want = b"an answer to an empty request\n"

    def handler(request: bytes) -> bytes:
        requests.append(request)
        return want

    closing = learner.load("closing")
    running = Background("serve_until_eof()", closing.serve_until_eof, pair.server, handler)
    pair.client.shutdown(socket.SHUT_WR)  # the whole request: nothing, then the FIN
    reply, ended, reset = client_reads(pair, running)
    running.wait()
    assert requests == [b""] and reply == want, (
        f"the client half-closed without sending anything (an empty request: its FIN at "
        f"once); the handler was called {len(requests)} time(s) "
        f"{'with ' + repr(requests) if requests else ''}and the client read {reply!r}"
        f"{', then a reset' if reset else ', then EOF' if ended else ''}, expected the "
        f"handler called once with b'' and its answer {want!r}\nA first recv() that returns "
        "b'' is the client's FIN: it has finished its request (here, an empty one) and its "
        "read side is still open, waiting for the answer. It is not a client that has gone "
        "away (that one resets: recv() raises).")


def test_client_reset_before_the_answer_still_closes(learner: Any, pair: Pair) -> None:
    """The error path at the last step: the client resets after its request was read, while
    the handler runs. Sending the answer then fails (EPIPE or ECONNRESET); the socket must
    be closed all the same - the send is inside the try whose finally closes it too."""
    called, answer = threading.Event(), threading.Event()

    def handler(request: bytes) -> bytes:
        called.set()
        answer.wait(WAIT)  # the client aborts meanwhile
        return b"an answer nobody will read\n"

    closing = learner.load("closing")
    running = Background("serve_until_eof()", closing.serve_until_eof, pair.server, handler)
    pair.client.sendall(b"a request whose client gives up\n")
    pair.client.shutdown(socket.SHUT_WR)
    assert called.wait(WAIT), (
        f"serve_until_eof() did not call the handler within {WAIT:.0f} s of the client's FIN")
    crash(pair.client)  # RST: the client crashed before it got the answer
    deadline = time.monotonic() + WAIT  # the reset ends the server's end: it leaves the table
    while tcp_state(*pair.server_end()) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    answer.set()
    error = running.ended("after its handler returned on a connection the client had reset")
    fd = pair.server.fileno()
    assert fd == -1, (
        f"the client reset the connection while the handler ran; sending the answer "
        f"{'raised ' + type(error).__name__ + ' (' + str(error) + ')' if error else 'failed'}"
        f" and serve_until_eof() left its socket open (file descriptor {fd}), expected it "
        "closed\nThe send can fail as well as the read and the handler (a client that gives "
        "up, a proxy's timeout): send the answer inside the try whose finally closes the "
        "socket, or each client that aborts late leaks a descriptor.")


def test_a_large_answer_is_sent_whole(learner: Any, pair: Pair) -> None:
    """A small send buffer on the server's end: one send() takes only part of a large
    answer (it returns how many bytes it took); the client must get all of it."""
    want = b"0123456789abcdef" * 32768  # 512 KiB
    pair.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    closing = learner.load("closing")
    running = Background("serve_until_eof()", closing.serve_until_eof, pair.server,
                         lambda request: want)
    pair.client.sendall(b"send me the large answer\n")
    pair.client.shutdown(socket.SHUT_WR)
    reply, ended, reset = client_reads(pair, running)
    running.wait()
    expect_no_reset(reset, reply, want)
    assert reply == want, (
        f"the client read {len(reply)} of the {len(want)} bytes of the answer"
        + (", then your FIN" if ended else "")
        + (": only part of it was sent - send() may take fewer bytes than it is given (it "
           "returns how many); use sendall()\nHere the server's send buffer is small, so one "
           "send() takes only what fits; sendall() loops until everything is sent."
           if want.startswith(reply) else
           ": the bytes differ from the handler's answer - send exactly what it returned"))


# ---------------------------------------------------------------------------- two at once

# What the test's end sends on each of two connections served at the same time, in two
# parts; the first parts are interleaved (each read before the other connection's is sent).
PARTS = {
    "A": (b"first part, sent on connection A\n", b"second part, sent on connection A\n"),
    "B": (b"first part, sent on connection B\n" * 3, b"second part, sent on connection B\n"),
}


def expect_own_bytes(what: str, got: Any, name: str) -> None:
    """Fail, naming state shared between calls, when what the learner's code read on one
    connection holds bytes the test sent on the other."""
    want = b"".join(PARTS[name])
    other = next(key for key in PARTS if key != name)
    if isinstance(got, bytes | bytearray) and any(part in got for part in PARTS[other]):
        pytest.fail(
            f"{what} {len(got)} bytes, among them bytes sent on connection {other}; expected "
            f"the {len(want)} bytes of connection {name} alone: the two calls running at once "
            "kept what they read in one shared buffer (a module-level list or bytearray, a "
            "mutable default argument such as chunks=[])\nEach call reads its own "
            "connection: keep what it reads in a variable made inside the call (chunks = [] "
            "in the function's body), or a server serving two clients at once hands one "
            "client's bytes to the other.", pytrace=False)
    assert got == want, (
        f"{what} {got!r:.120}, expected the {len(want)} bytes sent on connection {name}: "
        f"{want!r}")


def test_two_drains_at_once_keep_their_own_bytes(learner: Any) -> None:
    """graceful_close() on two connections at the same time: each returns the bytes of its
    own peer, whose late data comes interleaved with the other's."""
    closing = learner.load("closing")
    returned: dict[str, Any] = {}
    with connected() as first, connected() as second:
        pairs = {"A": first, "B": second}
        running = {name: Background(f"graceful_close() on connection {name}",
                                    closing.graceful_close, pair.client)
                   for name, pair in pairs.items()}
        for name, pair in pairs.items():
            expect_fin(Exchange(peer_reads(pair.server, running[name]), None))
        for name, pair in pairs.items():
            pair.server.sendall(PARTS[name][0])
            wait_until_taken(pair.server, pair.client, running[name])
        for name, pair in pairs.items():
            pair.server.sendall(PARTS[name][1])
            pair.server.close()  # the peer's FIN ends what graceful_close() returns
            returned[name] = running[name].wait()
    for name, got in returned.items():
        expect_own_bytes(f"graceful_close() on connection {name} returned", got, name)


def test_two_requests_at_once_keep_their_own_bytes(learner: Any) -> None:
    """serve_until_eof() serving two clients at the same time: each handler gets its own
    client's request, whose parts come interleaved with the other's, and each client its
    own answer."""
    closing = learner.load("closing")
    requests: dict[str, list[bytes]] = {"A": [], "B": []}
    replies: dict[str, bytes] = {}

    def handler_of(name: str) -> Callable[[bytes], bytes]:
        def handler(request: bytes) -> bytes:
            requests[name].append(request)
            return b"answer to: " + request
        return handler

    with connected() as first, connected() as second:
        pairs = {"A": first, "B": second}
        running = {name: Background(f"serve_until_eof() on connection {name}",
                                    closing.serve_until_eof, pair.server, handler_of(name))
                   for name, pair in pairs.items()}
        for name, pair in pairs.items():
            pair.client.sendall(PARTS[name][0])
            wait_until_taken(pair.client, pair.server, running[name])
        for name, pair in pairs.items():
            pair.client.sendall(PARTS[name][1])
            pair.client.shutdown(socket.SHUT_WR)  # the client's FIN ends its request
            replies[name] = client_reads(pair, running[name])[0]
            running[name].wait()
    for name, got in requests.items():
        assert len(got) == 1, (
            f"the handler of connection {name} was called {len(got)} times, expected once")
        expect_own_bytes(f"the handler of connection {name} was called with", got[0], name)
        want = b"answer to: " + b"".join(PARTS[name])
        assert replies[name] == want, (
            f"the client of connection {name} read {replies[name]!r:.120}, expected the "
            f"answer to its own request: {want!r}")


# ---------------------------------------------------------------------------- reset first


@dataclass
class ResetFirst:
    """One of the learner's functions called on a connection the peer has already reset:
    its very first call on the socket fails (shutdown() with ENOTCONN, recv() with
    ECONNRESET), before anything that is usually guarded by a try."""

    what: str
    call: Callable[[Any, socket.socket], Any]
    mine: Callable[[Pair], socket.socket]    # the learner's end
    theirs: Callable[[Pair], socket.socket]  # the test's end, which resets


RESET_FIRST = {
    "graceful_close": ResetFirst(
        "graceful_close()", lambda closing, sock: closing.graceful_close(sock),
        lambda pair: pair.client, lambda pair: pair.server),
    "serve_until_eof": ResetFirst(
        "serve_until_eof()", lambda closing, sock: closing.serve_until_eof(
            sock, lambda request: b"an answer nobody will read"),
        lambda pair: pair.server, lambda pair: pair.client),
}


@pytest.mark.parametrize("case", RESET_FIRST.values(), ids=RESET_FIRST.keys())
def test_peer_reset_before_the_call_still_closes(learner: Any, pair: Pair,
                                                 case: ResetFirst) -> None:
    """The error path at the first step: the peer aborted before the learner's function
    was called. Whatever raises, and wherever, the socket must be closed."""
    closing = learner.load("closing")
    mine, theirs = case.mine(pair), case.theirs(pair)
    crash(theirs)  # RST: the peer crashed before the learner's code ran
    readable, _, _ = select.select([mine], [], [], WAIT)  # the RST has arrived
    assert readable, f"the test's reset did not reach the other end within {WAIT:.0f} s"
    running = Background(case.what, case.call, closing, mine)
    error = running.ended("on a connection the peer had already reset")
    fd = mine.fileno()
    assert fd == -1, (
        f"the peer had reset the connection before {case.what} was called; {case.what} "
        f"{'raised ' + type(error).__name__ + ' (' + str(error) + ')' if error else 'returned'}"
        f" and left the socket open (file descriptor {fd}), expected it closed\nAny call on a "
        "reset socket can fail, the first one too (shutdown() raises ENOTCONN, recv() "
        "ECONNRESET): put every step inside the try whose finally closes the socket, or "
        "each peer that aborts early leaks a descriptor.")
