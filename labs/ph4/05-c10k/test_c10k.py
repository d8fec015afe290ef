"""ph4.5 verification: the learner's event-loop server (server.py) run as its own process,
10,000 clients held open at once from 4 client processes (clients.py; a process may hold
20,000 open files here, so the clients cannot share the server's or the test's process).

The clients first connect 100 each and echo a line on them: a blocked loop or a server that
keeps the lines shows on 400 connections, before 10,000 are made. Then the rest connect.
While the clients connect, the server's threads are counted (/proc/<pid>/task): a third
thread fails at once, as a thread per connection or as worker threads, whichever the count
shows once a hundred connections are in. With all 10,000 connected: the server's open
descriptors (/proc/<pid>/fd) show it holds them all, it runs at most 2 threads, and its
resident memory (/proc/<pid>/status VmRSS) grew by at most 25 KiB per connection. Then every
client sends a line and must get it echoed.

Nothing waits out a time to decide. While the echoes come back the kernel's view is watched
(/proc/net/tcp: bytes each connection holds unread, bytes in flight) together with the
server's threads (/proc/<pid>/task/*: asleep or not, CPU used, sleeps so far):

- a connection whose line stays unread while every server thread went to sleep again and
  again is a blocked loop (a correct loop never sleeps while a socket it watches is
  readable: epoll_wait returns at once), e.g. time.sleep() in a callback;
- a server asleep all along, nothing unread and nothing in flight, the clients asleep too,
  yet echoes missing: the server read the lines and keeps them (waiting for EOF?).

Each must be seen STALLED times in a row; a correct server on a loaded machine is runnable
(state R) or busy, never that. The deadlines are safety nets only.

Before the 10,000, a few connections held by the test send what the big run never does: a
line in two writes (the server has read the first part before the second is sent), two lines
in one write, 24 MiB on a connection that does not read meanwhile while another connection
asks for its echo (a loop blocked in a send, or a send() whose leftover is dropped) and
then half-closes with its echo still queued (it must get the whole echo, then EOF), a
client that resets its connection (RST), and clients that close: the server must close its
side (no socket left in CLOSE_WAIT, its descriptors back where they were). Then flow
control: a client sends 64 MiB and reads nothing; the server must stop reading it (seen
asleep with that client's bytes unread in its receive queue, the client's send() blocked)
with its resident memory grown by a few MiB at most, serve another client meanwhile, and
echo all of it once the client reads. A last line without a newline before the client's EOF
must come back before the server's EOF, and a line of 1 MiB (past asyncio streams'
readline() limit) come back whole.

Last, connections come and go: a fresh server, with memory_probe.py loaded as its
sitecustomize (on SIGUSR1 it reports, after a full collection, the blocks Python holds, the
objects by type and its containers' lengths), serves rounds of short-lived clients. Each
round must give its memory back: a server that keeps something of every connection ever
accepted (its protocol in a set, its task, its buffer by address) grows by a block or more
per connection, round after round; a correct one by a few dozen blocks in all.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest

from labrunner.testing import (
    CLOSE_WAIT,
    ESTABLISHED,
    Activity,
    asleep_throughout,
    connection_socket,
    cpu_burnt_while_idle,
    process_activity,
    process_resources,
    process_threads,
    tcp_sockets,
)

TOTAL, PROCESSES = 10_000, 4
SHARE = TOTAL // PROCESSES
EARLY = 100            # per client process: a first round on 400 connections shows a blocked
#                        loop or kept lines before 10,000 connections are made
PER_CONNECTION_KB = 25
READY = 30.0
CONNECT_WAIT = 120.0   # safety nets: a wrong server is caught long before
ECHO_WAIT = 180.0
OWED_NOTHING = 5.0     # seconds a connection may stay open after its client's EOF with every
#                        byte it is owed acknowledged (a correct loop closes at once)
STALLED = 8            # consecutive observations of server and clients asleep that decide
BLOCKED_SEEN = 3       # observations of the server asleep outside a readiness wait (a
#                        correct loop: never) that decide
WAITS = {7, 23, 232, 270, 271, 281, 441}   # poll, select, epoll_wait, pselect6, ppoll,
#                                            epoll_pwait, epoll_pwait2 (x86-64)
CALLS = {0: "read()", 1: "write()", 35: "nanosleep() (time.sleep)",
         230: "clock_nanosleep() (time.sleep)", 44: "sendto() (a blocking send)",
         45: "recvfrom() (a blocking recv)", 202: "a futex (a lock or a thread wait)"}
THREADS_SEEN = 100     # connections in before a third thread is called per connection or pool
POLL, ECHO_POLL = 0.05, 0.2
CLIENTS = Path(__file__).with_name("clients.py")
PROBE = Path(__file__).with_name("memory_probe.py")
PROBE_PREFIX = "labrunner-probe "
WARM_UP, ROUND, ROUNDS = 500, 1000, 2   # short-lived connections: a first batch, then each
#                                         round between two readings of the server's memory
KEPT_PER_CONNECTION = 0.5   # blocks a closed connection may leave behind, on average: a
#                             correct server settles at +-0.1, the least state kept is 1



class Server:
    """server.py as the learner's program: its first line gives the port; stderr is kept
    (its last lines explain an exit). Graded, it runs as the learner's uid in a /proc the
    verification cannot see: its threads, descriptors, memory and activity are then read by
    labrunner's helpers in the learner's host process, which runs beside it."""

    def __init__(self, learner: Any, env: dict[str, str] | None = None) -> None:
        self.learner = learner
        self.proc = learner.python("server", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=env)
        self.in_sight = Path(f"/proc/{self.proc.pid}/task").is_dir()
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: collections.deque[str] = collections.deque(maxlen=30)
        self.probes: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._drain, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, False),
                         daemon=True).start()
        self.port = 0

    def _drain(self, stream: Any, keep_lines: bool) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode(errors="replace").rstrip()
            if not keep_lines and text.startswith(PROBE_PREFIX):
                self.probes.put(json.loads(text[len(PROBE_PREFIX):]))
                continue
            (self.out.put if keep_lines else self.err.append)(text)
        if keep_lines:
            self.out.put(None)

    def ready(self) -> None:
        try:
            line = self.out.get(timeout=READY)
        except queue.Empty:
            line = None
        m = re.match(r"listening on (\d+)", line or "")
        if not m:
            self.fail(f"server.py did not print 'listening on <port>' (got {line!r})")
        self.port = int(m.group(1))

    def _read(self, helper: Any) -> Any:
        if self.in_sight:
            return helper(self.proc.pid)
        return self.learner.run_helper(helper, self.proc.pid)

    def resources(self) -> tuple[int, int, int]:
        """(threads, open descriptors, resident KiB)."""
        seen = tuple(self._read(process_resources))
        if seen[0] < 0:
            self.fail("the server went out of the verification's sight")
        return seen

    def activity(self) -> Activity:
        awake, cpu, threads = self._read(process_activity)
        if awake < 0:
            self.fail("the server went out of the verification's sight")
        return int(awake), int(cpu), tuple((int(t), int(n), int(c)) for t, n, c in threads)

    def fail(self, message: str) -> NoReturn:
        if self.proc.poll() is None:
            pytest.fail(message, pytrace=False)
        time.sleep(0.2)   # let the drain thread take the traceback's last lines
        last = next((ln for ln in reversed(self.err) if ln.strip()), "")
        pytest.fail(f"the server exited (status {self.proc.returncode}): {last} (during: "
                    f"{message.splitlines()[0]})\nIt must keep serving every "
                    "connection: an error on one connection (a reset, a failed send) closes "
                    "that connection only.\n" + "\n".join(self.err)[-2000:], pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Client:
    """One clients.py process: its lines, read as they come."""

    def __init__(self, port: int, share: int = SHARE, early: int = EARLY) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CLIENTS), str(port), str(share),
                                      str(early)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.put(raw.decode(errors="replace").strip())
        self.lines.put("<exit>")

    def line(self, timeout: float = 0.0) -> str | None:
        try:
            return self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
        except queue.Empty:
            return None

    def say(self, word: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{word}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            pass

    def asleep(self) -> bool:
        return process_activity(self.proc.pid)[0] == 0

    def cpu(self) -> int:
        return process_activity(self.proc.pid)[1]

    def close(self) -> None:
        """Killed: the kernel closes its connections (the test is over; a process still
        connecting would not read a word)."""
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def running_server(learner: Any, env: dict[str, str] | None = None) -> Iterator[Server]:
    srv = Server(learner, env)
    try:
        srv.ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(learner: Any) -> Iterator[Server]:
    with running_server(learner) as srv:
        yield srv


def too_many_threads(threads: int, held: int) -> str:
    if threads - 1 >= held // 2:
        return (f"the server runs {threads} threads for {held} sockets, expected at most 2: "
                "a thread per connection\nA thread costs a stack and a scheduler entry "
                "each; at 10,000 that is what C10K is about. One event loop (asyncio, "
                "selectors/epoll) serves them all from one thread.")
    return (f"the server runs {threads} threads while holding {held} sockets, expected at "
            "most 2: its socket work is handed to worker threads\nA pool of N threads "
            "doing blocking reads serves N connections at a time, and asyncio.to_thread or "
            "run_in_executor per read is thread-per-request again; socket I/O belongs on the "
            "event loop (transport callbacks or awaited streams).")


MIN_BACKLOG = 1024
BULK = 24 << 20        # more than a client's receive and the server's send buffers hold
BULK_LINE = 64


BLOCK = 4096           # a numbered line, then the block's 63 other lines
BLOCK_TAIL = b"".join(f"{'.' * (BULK_LINE - 3)}{j:02d}\n".encode()
                      for j in range(1, BLOCK // BULK_LINE))


def numbered(size: int) -> bytes:
    """``size`` bytes of lines of BULK_LINE, by blocks of BLOCK whose first line is the
    block's number: bytes dropped, repeated or reordered show where they were. One
    formatting call (a million f-strings take seconds on a loaded machine)."""
    blocks = size // BLOCK
    return (b"%063d\n" + BLOCK_TAIL) * blocks % tuple(range(blocks))


class Conn:
    """One connection of the test's own, read with the server watched: the verdict "never"
    is the server asleep, its CPU time unmoved, STALLED times in a row with bytes missing."""

    def __init__(self, server: Server, what: str, rcvbuf: int = 0) -> None:
        self.server = server
        try:
            self.sock = socket.socket()
            if rcvbuf:   # before connect(): the window it advertises is this small from the start
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(10)
            self.sock.connect(("127.0.0.1", server.port))
        except OSError as exc:
            self.died(what)
            pytest.fail(f"{what}: a new connection failed ({exc})", pytrace=False)
        self.sock.settimeout(ECHO_POLL)
        self.local = self.sock.getsockname()

    def died(self, what: str) -> None:
        """A connection refused or reset: the server exiting? (its exit takes a moment) Not
        if it is seen asleep in a readiness wait twice in a row, its CPU time unmoved: a
        process on its way out waits for no socket (asyncio, say, aborted that connection
        after an exception in a callback, and serves on)."""
        deadline, last = time.monotonic() + 5, None
        while time.monotonic() < deadline:
            try:
                self.server.proc.wait(timeout=ECHO_POLL)
            except subprocess.TimeoutExpired:
                pass
            else:
                self.server.fail(what)
            now = self.server._read(process_activity)
            calls = [c for _, _, c in now[2]]
            waiting = now[0] == 0 and bool(calls) and all(c in WAITS for c in calls)
            if waiting and last is not None and now[1] == last:
                return
            last = now[1] if waiting else None
        if self.server.proc.poll() is not None:
            self.server.fail(what)

    def server_side(self) -> Any:
        return connection_socket(("127.0.0.1", self.server.port), self.local)

    def read_exact(self, n: int, what: str, sink: bytearray | None = None,
                   fix: str = "") -> bytes:
        """``fix``: what to do instead, should the server reset the connection."""
        got = bytearray() if sink is None else sink
        stuck, last, blocked, last_cpu = 0, None, 0, -1
        deadline = time.monotonic() + ECHO_WAIT
        while len(got) < n and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(min(1 << 20, n - len(got)))
            except TimeoutError:
                chunk = None
            except OSError as exc:
                self.died(what)
                pytest.fail(f"{what}: the server reset the connection ({exc})"
                            + (f"\n{fix}" if fix else ""), pytrace=False)
            if chunk == b"":
                self.died(what)
                break
            if chunk:
                got += chunk
                stuck = 0
                continue
            if self.server.proc.poll() is not None:
                self.server.fail(what)
            now = self.server.activity()
            calls = [c for _, _, c in now[2]]
            # Every thread asleep outside a readiness wait, its CPU time unmoved since the
            # last look, BLOCKED_SEEN looks in a row: one look can catch the loop's thread
            # handing the GIL over (a futex) while another sits in a call of its own.
            if now[0] == 0 and calls and all(c >= 0 and c not in WAITS for c in calls):
                blocked = blocked + 1 if blocked and now[1] == last_cpu else 1
            else:
                blocked = 0
            last_cpu = now[1]
            if blocked >= BLOCKED_SEEN:
                pytest.fail(blocked_loop(max(set(calls), key=calls.count)) + f"\n(while: "
                            f"{what})", pytrace=False)
            seen = (now[0], now[1], len(got))
            stuck = stuck + 1 if now[0] == 0 and seen == last else 0
            last = seen
            if stuck >= STALLED:
                break
        return bytes(got)

    def kept_open(self) -> str | None:
        """None when the server ends the connection (EOF or reset); else what it did
        instead: sat asleep, its CPU time unmoved, STALLED times in a row with the
        connection open, or kept busy while its end sat in CLOSE_WAIT owing nothing for
        OWED_NOTHING seconds (a loop that spins on the readable EOF it never acts on)."""
        stuck, last, idle_since, cpu_then = 0, None, None, 0
        deadline = time.monotonic() + ECHO_WAIT
        while time.monotonic() < deadline:
            try:
                if self.sock.recv(1 << 16) == b"":
                    return None
                continue
            except TimeoutError:
                pass
            except OSError:
                return None
            now = self.server.activity()
            stuck = stuck + 1 if now[0] == 0 and now[:2] == last else 0
            last = now[:2]
            if stuck >= STALLED:
                return "the server sat asleep with that connection open"
            side = self.server_side()
            done = side is not None and side.state == CLOSE_WAIT and not side.tx_queue
            if done and idle_since is None:
                idle_since, cpu_then = time.monotonic(), now[1]
            elif not done:
                idle_since = None
            if idle_since is not None and time.monotonic() - idle_since >= OWED_NOTHING:
                busy = (now[1] - cpu_then) / 1e9
                return (f"the server kept that connection open, owing it nothing, for "
                        f"{OWED_NOTHING:.0f} s while it used {busy:.1f} s of CPU: a loop "
                        "that spins on the readable EOF (recv() returns b'') and never "
                        "closes")
        return f"the server kept that connection open for {ECHO_WAIT:.0f} s"

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def listen_backlog(port: int) -> int | None:
    """The accept backlog of the TCP socket listening on 127.0.0.1:port (sock_diag netlink:
    a listening socket's wqueue is its backlog, what ss shows as Send-Q); None if unknown."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)  # NETLINK_SOCK_DIAG
    except OSError:
        return None
    with nl:
        req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << 10)
        req += struct.pack("!HH", port, 0) + bytes(44)
        nl.sendall(struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req)
        while True:
            data = nl.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind in (2, 3) or length < 16:  # NLMSG_ERROR, NLMSG_DONE
                    return None
                msg = data[off + 16:off + length]
                if len(msg) >= 72 and struct.unpack_from("!H", msg, 4)[0] == port:
                    return cast(int, struct.unpack_from("=I", msg, 60)[0])
                off += (length + 3) & ~3
            if not data:
                return None


def expect_echo(conn: Conn, sent: bytes, what: str, fix: str) -> None:
    got = conn.read_exact(len(sent), what, fix=fix)
    if got != sent:
        threads_kept(conn.server)
        calls = [c for _, _, c in conn.server.activity()[2]]
        if 45 in calls and any(c in WAITS for c in calls):
            pytest.fail(
                f"{what}: the server answered {got!r}, expected {sent!r}, and one of its "
                "threads waits in a blocking recv() beside the event loop\nTwo readers on one "
                "socket (the loop's transport and a thread) take its bytes from each other, "
                "and a thread per read is thread-per-connection again: socket I/O belongs on "
                "the event loop (transport callbacks or awaited streams).", pytrace=False)
        pytest.fail(f"{what}: the server answered {got!r}, expected {sent!r}\n{fix}",
                    pytrace=False)


def threads_kept(server: Server) -> None:
    threads = server.resources()[0]
    if threads > 2:
        held = sum(1 for s in tcp_sockets() if s.local == ("127.0.0.1", server.port)
                   and s.remote[1] and s.state in (ESTABLISHED, CLOSE_WAIT))
        pytest.fail(too_many_threads(threads, held), pytrace=False)


def test_lines_in_pieces_a_client_that_does_not_read_and_closes(server: Server) -> None:
    base_fds = server.resources()[1]
    backlog = listen_backlog(server.port)
    if backlog is not None and backlog < MIN_BACKLOG:
        pytest.fail(
            f"the server listens with an accept backlog of {backlog}, expected at least "
            f"{MIN_BACKLOG} (listen(4096), create_server(..., backlog=4096))\nThousands of "
            "clients connecting at once overflow a short accept queue: the kernel drops their "
            "SYNs and they retry after 1 s, 3 s, 7 s... (asyncio's default is 100, "
            "socket.listen()'s 128).", pytrace=False)
    a = Conn(server, "a first client connected")
    send_in_two(a, b"hel", b"lo\n")
    expect_echo(a, b"hello\n", "a line sent in two writes ('hel', then 'lo\\n' once the "
                "server had read the first)",
                "TCP is a byte stream: one recv() may hold part of a line, or several. Echo "
                "the bytes as they come (or keep the partial line until its newline): never "
                "add a newline per chunk, never wait for more than arrived.")
    a.sock.sendall(b"one\ntwo\n")
    expect_echo(a, b"one\ntwo\n", "two lines sent in one write",
                "One recv() may hold several lines: echo every one of them (or all the bytes), "
                "not only the first.")
    # Bytes, not text: a character split between two reads, and bytes that are not UTF-8.
    u = Conn(server, "a client connected to send text")
    for first, rest, what in TEXT_LINES:
        if rest:
            send_in_two(u, first, rest)
        else:
            u.sock.sendall(first)
        expect_echo(u, first + rest, what,
                    "TCP carries bytes, and a recv() ends wherever it ends - inside a "
                    "character too: echo the bytes as they are (data_received gets bytes; "
                    "write them back). Decoding each chunk (data.decode()) raises "
                    "UnicodeDecodeError on a character split between two reads, or on bytes "
                    "that are not UTF-8, and asyncio then aborts that connection; "
                    "errors='replace' or 'ignore' changes the bytes instead. A line need "
                    "not be UTF-8 at all.")
    partial_lines_apart(a, u)
    # A client that resets its connection, then one more echo: the server must live on.
    c = Conn(server, "a client connected (to reset its connection)")
    c.sock.sendall(b"bye\n")
    c.close(reset=True)
    d = Conn(server, "a client connected just after another reset its connection (RST)")
    d.sock.sendall(b"still there?\n")
    expect_echo(d, b"still there?\n", "after a client reset its connection (RST)",
                "A reset arrives as ECONNRESET (or EPIPE) on the next recv/send: handle it "
                "by closing that connection only.")
    threads_kept(server)      # two connections open: a thread each shows here
    sleeps_when_idle(server)
    # A client that sends a lot and does not read, beside one that asks for its echo.
    bulk = Conn(server, f"a client connected to send {BULK >> 20} MiB")
    payload = numbered(BULK)
    sent = threading.Event()

    def send_all() -> None:
        try:
            bulk.sock.settimeout(ECHO_WAIT)
            bulk.sock.sendall(payload)
            bulk.sock.shutdown(socket.SHUT_WR)   # all sent: EOF, echoes still owed
        except OSError:
            pass
        sent.set()

    threading.Thread(target=send_all, daemon=True).start()
    deadline = time.monotonic() + READY
    still_since, last_rx, asleep = None, None, 0
    while not sent.is_set() and time.monotonic() < deadline:
        side = bulk.server_side()   # until the server's buffers toward it are full
        if side is not None and side.tx_queue and not side.rx_queue:
            break
        # ... or until the server stopped reading it with its send buffer full (a second
        # without a byte of its receive queue taken, or the server seen asleep meanwhile
        # BLOCKED_SEEN times in a row): paused by flow control, or the loop stuck in that
        # send, which the echo below then names, instead of waiting here for the full
        # READY. A second by the clock: reading the machine's TCP table takes a while with
        # many sockets.
        held = side is not None and side.tx_queue and side.rx_queue \
            and side.rx_queue == last_rx
        still_since = (still_since or time.monotonic()) if held else None
        asleep = asleep + 1 if held and server.activity()[0] == 0 else 0
        last_rx = side.rx_queue if side is not None else None
        if still_since is not None and (time.monotonic() - still_since >= 1.0
                                        or asleep >= BLOCKED_SEEN):
            break
        time.sleep(POLL)
    b = Conn(server, f"a client connected while another sent {BULK >> 20} MiB")
    b.sock.sendall(b"ping\n")
    expect_echo(b, b"ping\n", f"a client asked for its echo while another had sent "
                f"{BULK >> 20} MiB without reading its echoes yet",
                "One slow reader must not hold the others: a blocking send to it stops the "
                "loop. Write without blocking and keep what the socket did not take "
                "(asyncio's transport.write buffers it and sends it when it can).")
    bulk.sock.settimeout(ECHO_POLL)
    back = bytearray()
    bulk.read_exact(len(payload), "the 24 MiB client read its echoes", back)
    reading_resumed(bulk, len(back), len(payload))
    same_echo(payload, back)
    kept = bulk.kept_open()
    if kept is not None:
        pytest.fail(
            f"a client sent {BULK >> 20} MiB without reading, then shut down its sending side "
            "(shutdown(SHUT_WR): EOF) with most of its echo still queued in the server; it "
            "read its whole echo, then waited for the server's EOF and never got it: "
            f"{kept} (CLOSE_WAIT: its descriptor and state kept for good)\nA connection "
            "whose client is done must be closed once what it is owed is sent, the "
            "half-closed one with echo still pending too. "
            "asyncio: return False from eof_received - transport.close() sends what is "
            "buffered before it closes; a protocol that keeps the transport open (returns "
            "True) must close it itself when the write buffer has drained.", pytrace=False)
    # Clients that close: the server closes its side.
    closing = [Conn(server, "20 short-lived clients connected") for _ in range(20)]
    for conn in closing:
        conn.sock.sendall(b"x\n")
        expect_echo(conn, b"x\n", "20 short-lived clients", "Echo each line as it arrives.")
    threads_kept(server)
    for conn in (a, u, b, bulk, d, *closing):
        conn.close()
    left_open(server, base_fds)


HALF_STEP = 48 << 10    # bytes sent per step: below asyncio's 64 KiB high-water mark, so a
#                         server that ends up holding a step's echo is not paused by it
HALF_MAX = 32 << 20     # a safety net: the kernel's buffers toward a 4 KiB window fill long before
HALF_POLL = 0.01       # between two looks at the queues while they fill: 0.05 s makes it seconds


HALF_TRIES = 4   # connections to try until one meets the EOF with echo held by the server


def half_closed_holding_echo(server: Server, payload: bytes) -> tuple[Conn, int, int | None]:
    """A client that reads nothing sends HALF_STEP bytes at a time until the server surely
    holds part of the echo itself (or stops reading: None), then shuts down its sending
    side; once the server has read the EOF: (the connection, the bytes sent, the echo the
    server surely holds still). What it holds after the EOF it held when the EOF came (the
    echo only drains after it); 0 or less then means the kernel took it all first (its
    send buffer grows as it goes), and the case was not met."""
    conn = Conn(server, "a client connected to half-close with echo pending", rcvbuf=4096)
    sent, held = 0, cast(int | None, 0)
    conn.sock.settimeout(READY)   # a step never blocks long: the server reads it all
    while sent < HALF_MAX and held is not None and held <= 0:
        conn.sock.sendall(payload[sent:sent + HALF_STEP])
        sent += HALF_STEP
        held = server_holds(conn, sent)
    conn.sock.shutdown(socket.SHUT_WR)
    conn.sock.settimeout(ECHO_POLL)
    settled(conn)   # the server has read the EOF (asleep, its CPU time still)
    return conn, sent, (server_holds(conn, sent) if held is not None else None)


def test_a_half_closed_client_gets_its_pending_echo_then_eof(server: Server) -> None:
    """A client that reads nothing sends HALF_STEP bytes at a time until the kernel's buffers
    toward it are full and the server holds part of the echo itself (its receive queue read
    to the end, not paused), then shuts down its sending side. The server reads that EOF
    with echo still pending: it must send it all, then close. A server that closes only
    when nothing is pending at the EOF, and keeps the connection otherwise, never closes."""
    payload = numbered(HALF_MAX)
    for attempt in range(1, HALF_TRIES + 1):
        conn, sent, held = half_closed_holding_echo(server, payload)
        if held is None or held > 0 or attempt == HALF_TRIES:
            break
        conn.close()   # the server's echo all went to the kernel before the EOF: again
    back = bytearray()
    conn.read_exact(sent, "the half-closed client read its echoes", back)
    same_echo(payload[:sent], back)
    kept = conn.kept_open()
    if kept is not None:
        pytest.fail(
            f"a client sent {sent} bytes without reading until the server "
            + (f"held {held} bytes of its echo itself" if held else "stopped reading")
            + " (the kernel's buffers toward it full), then shut down its "
            "sending side (EOF); it read its whole echo and never got the server's EOF: "
            f"{kept}\nThe EOF arrived with echo still pending, and the server kept the "
            "connection open for it but never closed it once it was sent (CLOSE_WAIT: a "
            "descriptor and its state kept for good, one per such client). asyncio: return "
            "False from eof_received - transport.close() sends what is buffered, then "
            "closes; a protocol that returns True must close the transport itself once its "
            "write buffer has drained.", pytrace=False)
    conn.close()


TAIL = b"last words, no newline"
LONG_LINE = 1 << 20    # one line, far longer than a read (asyncio reads 256 KiB at most) and
#                        than asyncio streams' readline()/readuntil() limit (64 KiB)


def test_a_last_line_without_newline_and_a_long_line(server: Server) -> None:
    """Lines the other tests never send. A last line with no newline before the client's
    EOF: its bytes are a line too (readline() returns them at EOF), echo them, then close.
    A line of 1 MiB in one write, the client reading meanwhile: echo it all - a line is as
    long as it is, not as long as a read buffer or a reader's limit."""
    last = Conn(server, "a client connected to send a last line without a newline")
    last.sock.sendall(TAIL)
    last.sock.shutdown(socket.SHUT_WR)
    got = last.read_exact(len(TAIL), "a last line without a newline, then the client's EOF")
    if got != TAIL:
        pytest.fail(
            f"a client sent a last line with no newline ({TAIL!r}), then shut down its "
            f"sending side (EOF): the server answered {got!r} and closed, expected {TAIL!r} "
            "before its EOF\nThe bytes after the last newline are a line too, the last "
            "one (readline() returns them at EOF): a server that keeps a partial line until "
            "its newline echoes what it kept when the EOF comes (eof_received), and a "
            "readuntil() loop takes them from IncompleteReadError.partial.", pytrace=False)
    kept = last.kept_open()
    if kept is not None:
        pytest.fail(f"a client sent a last line without a newline, then EOF; it got its echo "
                    f"and never the server's EOF: {kept}", pytrace=False)
    last.close()
    long_line_echoed(server)


def long_line_echoed(server: Server) -> None:
    conn = Conn(server, f"a client connected to send a line of {LONG_LINE >> 20} MiB")
    line = (b"0123456789abcdef" * (LONG_LINE // 16))[:-1] + b"\n"

    out = conn.sock.dup()   # a timeout of its own: the test reads on the original meanwhile
    out.settimeout(ECHO_WAIT)

    def send() -> None:
        with out, contextlib.suppress(OSError):   # ended meanwhile: the read says so
            out.sendall(line)

    threading.Thread(target=send, daemon=True).start()
    what = (f"a line of {LONG_LINE >> 20} MiB in one write (its newline at the end, the "
            "client reading its echo meanwhile)")
    limit = ("A line is as long as the client makes it, not as long as a read or a "
             "reader's limit: asyncio streams' readline() and readuntil() raise past their "
             "limit (64 KiB by default) and a cap on the partial line ends the connection "
             "likewise. Echo the bytes as they come (or keep the partial line, whatever "
             "its length, until its newline).")
    got = conn.read_exact(len(line), what, fix=limit)
    if got != line:
        ended = "and ended the connection" if conn.server_side() is None else "and stopped"
        pytest.fail(f"{what}: the server echoed {len(got)} bytes of it {ended}, expected all "
                    f"{len(line)}\n{limit}", pytrace=False)
    conn.close()


def server_holds(conn: Conn, sent: int) -> int | None:
    """Once the server has taken everything sent (its receive queue empty) and sits asleep
    with nothing moving: the bytes of echo it surely holds itself (sent, less what waits in
    its socket's send queue and in the client's receive queue - bytes the client received
    but has not acknowledged are in both, so this is a floor: 0 or less while the kernel
    may hold it all); None when the server stopped taking the client's bytes (paused: a
    smaller high-water mark).
    Bytes the client sent that are not yet acknowledged (in flight on a loaded machine, its
    tx_queue) are in none of these queues: it waits for them, or the server, asleep before
    they arrive, would seem to hold them."""
    last, deadline = None, time.monotonic() + READY
    while time.monotonic() < deadline:
        time.sleep(HALF_POLL)
        side = connection_socket(("127.0.0.1", conn.server.port), conn.local)
        mine = connection_socket(conn.local, ("127.0.0.1", conn.server.port))
        if side is None or mine is None:   # a row skipped by a busy table: look again
            continue
        now = (side.rx_queue, side.tx_queue, mine.rx_queue, mine.tx_queue,
               conn.server.activity()[:2])
        if now == last and now[4][0] == 0:
            if side.rx_queue:
                return None
            if not mine.tx_queue:
                return sent - side.tx_queue - mine.rx_queue
        last = now
    return None


def settled(conn: Conn) -> None:
    """Until the server is seen asleep twice in a row, its CPU time unmoved."""
    last, deadline = None, time.monotonic() + READY
    while time.monotonic() < deadline:
        time.sleep(POLL)
        now = conn.server.activity()[:2]
        if now == last and now[0] == 0:
            return
        last = now


def same_echo(payload: bytes, back: bytearray) -> None:
    if back != payload:
        at = next((i for i in range(0, len(back), BULK_LINE)
                   if back[i:i + BULK_LINE] != payload[i:i + BULK_LINE]), len(back))
        pytest.fail(
            f"a client that sent {len(payload)} bytes (lines of {BULK_LINE}) got "
            f"{len(back)} back, different from byte {at} on (expected "
            f"{payload[at:at + 20]!r}, got {bytes(back[at:at + 20])!r}): the bytes a send() "
            "did not take were dropped\nA non-blocking send() takes what fits in the "
            "socket's buffer and returns how much: keep the rest and write it when the socket "
            "is writable (asyncio's transport.write does this for you).", pytrace=False)


def partial_lines_apart(a: Conn, u: Conn) -> None:
    """Two clients' partial lines at once: each connection's bytes are its own."""
    send_in_two(a, b"left ", b"")
    send_in_two(u, b"right ", b"")
    for conn, rest, line in ((a, b"one\n", b"left one\n"), (u, b"two\n", b"right two\n")):
        conn.sock.sendall(rest)
        expect_echo(conn, line, "two clients each sent half a line (b'left ', then b'right ' "
                    "on another connection), then the rest: each echo holds its own "
                    "connection's bytes only",
                    "A partial line kept until its newline belongs to its connection (self."
                    "buffer = bytearray() in connection_made), never to one buffer shared by "
                    "every connection (a class attribute, a module global).")


def reading_resumed(bulk: Conn, got: int, sent: int) -> None:
    """Echoes missing, the server asleep owing nothing with the client's bytes unread in its
    receive queue: it stopped reading that client (backpressure) and never read it again."""
    side = bulk.server_side()
    if got < sent and side is not None and side.rx_queue and not side.tx_queue:
        pytest.fail(
            f"a client that sent {sent} bytes without reading, then read its echoes, got "
            f"{got} back, and the server stopped there: asleep, nothing left to send, "
            f"{side.rx_queue} bytes from that client unread in its receive queue - it paused "
            "reading that client and never resumed\nPausing a client that does not read "
            "while its echoes pile up is backpressure; once they drained, read it again "
            "(asyncio: pause_reading() in pause_writing(), resume_reading() in "
            "resume_writing()).", pytrace=False)


# Lines the server must echo byte for byte: (first write, second write once the server has
# read the first - or b"" for one write, what the line is).
TEXT_LINES = [
    (b"h\xc3", b"\xa9llo w\xc3\xb6rld\n",
     "a line of UTF-8 text sent in two writes split inside a character (b'h\\xc3', then "
     "b'\\xa9llo w\\xc3\\xb6rld\\n' - '\u00e9' is b'\\xc3\\xa9' - once the server had read "
     "the first)"),
    (b"\xff\xfe not UTF-8: \x80\x00\xc0\n", b"",
     "a line whose bytes are not UTF-8 (b'\\xff\\xfe not UTF-8: \\x80\\x00\\xc0\\n')"),
]


def send_in_two(conn: Conn, first: bytes, rest: bytes) -> None:
    """``first``, then ``rest`` once the server has read ``first`` (its receive queue is
    empty): the server gets them in two reads."""
    conn.sock.sendall(first)
    side, deadline = conn.server_side(), time.monotonic() + READY
    while side is not None and side.rx_queue and time.monotonic() < deadline:
        time.sleep(POLL)
        side = conn.server_side()
    with contextlib.suppress(OSError):   # reset meanwhile: the echo's read says so
        conn.sock.sendall(rest)


def sleeps_when_idle(server: Server) -> None:
    """With nothing sent, a loop sleeps in its readiness wait: seen asleep all along between
    two readings passes; a second of CPU burnt without once sleeping like that fails."""
    burnt = cpu_burnt_while_idle(server.activity, 1.0, CONNECT_WAIT, ECHO_POLL)
    if burnt is not None:
        pytest.fail(
            f"with every client idle the server used {burnt:.1f} s of CPU and was never seen "
            "asleep, expected it to sleep until a socket is ready\nA loop that polls (recv on "
            "every non-blocking socket in turn, select or epoll with a timeout of 0) burns a "
            "core doing nothing, and at 10,000 sockets each pass is 10,000 system calls: "
            "wait in epoll (selectors, asyncio) for the sockets that are ready.", pytrace=False)


def left_open(server: Server, base_fds: int) -> None:
    """Until the server holds no socket in CLOSE_WAIT (the client closed, the server not):
    seen asleep STALLED times, or having burnt a second of CPU, with them still there."""
    stalled, last, start_cpu = 0, None, server.activity()[1]
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        waiting = sum(1 for s in tcp_sockets() if s.local == ("127.0.0.1", server.port)
                      and s.state == CLOSE_WAIT)
        now = server.activity()
        if server.proc.poll() is not None:
            server.fail("clients were closing their connections")
        if not waiting:
            return
        busy = now[1] - start_cpu > 1_000_000_000
        stalled = stalled + 1 if now[0] == 0 and (now[1], waiting) == last else 0
        last = (now[1], waiting)
        if stalled >= STALLED or busy or time.monotonic() > deadline:
            fds = server.resources()[1]
            how = ("spinning on them (a second of CPU used meanwhile: a closed socket stays "
                   "readable, recv() returning b'' each time)" if busy else "asleep")
            pytest.fail(
                f"after 24 clients closed their connections the server still holds {waiting} "
                f"of them open (CLOSE_WAIT; {fds} descriptors, {base_fds} before), {how}, "
                "expected it to close each one\nA client that closes sends EOF: recv() "
                "returns b'' (asyncio: eof_received, which should return False, then "
                "connection_lost). Close the socket then; each one left open is a descriptor "
                "leaked, and with 10,000 clients coming and going the server runs out.",
                pytrace=False)
        time.sleep(ECHO_POLL)


FLOOD = 64 << 20       # from a client that reads nothing: far more than the kernel's buffers
#                        on both sides of a connection hold (about 9 MiB here)
HELD_MAX_KB = 8 << 10  # what the server's resident memory may grow by meanwhile: a correct
#                        one holds its transport's write buffer (64 KiB) and a read or two


class Flood:
    """FLOOD bytes sent on a thread, on a duplicate of the connection's socket (a timeout of
    its own: the test reads on the original meanwhile); ``sent`` counts what send() took."""

    def __init__(self, conn: Conn) -> None:
        self.payload = numbered(FLOOD)
        self.sock = conn.sock.dup()
        self.sock.settimeout(ECHO_WAIT)
        self.sent, self.error = 0, ""
        self.done = threading.Event()
        threading.Thread(target=self._send, daemon=True).start()

    def _send(self) -> None:
        view = memoryview(self.payload)
        try:
            while self.sent < len(view):
                self.sent += self.sock.send(view[self.sent:self.sent + (1 << 20)])
        except OSError as exc:
            self.error = repr(exc)
        self.done.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):   # wakes the thread, should it still be sending
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def test_a_client_that_does_not_read_is_not_read(server: Server) -> None:
    """Flow control: a client sends FLOOD and reads nothing. Its echoes back up; the server
    must stop reading it (its memory bounded, the client's send() blocked: TCP's window
    pushes back), serve another client meanwhile, and echo it all once the client reads."""
    base_rss = server.resources()[2]
    slow = Conn(server, f"a client connected to send {FLOOD >> 20} MiB without reading")
    flood = Flood(slow)
    try:
        pushed_back(server, slow, flood, base_rss)
        other = Conn(server, "a client connected while the server had stopped reading another")
        other.sock.sendall(b"ping\n")
        expect_echo(other, b"ping\n", "a client asked for its echo while the server had "
                    "stopped reading another client, one that did not read its echoes",
                    "Stop reading that one connection only (its transport.pause_reading()): "
                    "the loop goes on serving every other.")
        back = bytearray()
        slow.read_exact(len(flood.payload), f"the {FLOOD >> 20} MiB client read its echoes",
                        back)
        reading_resumed(slow, len(back), len(flood.payload))
        same_echo(flood.payload, back)
        other.close()
    finally:
        flood.close()
        slow.close()


def pushed_back(server: Server, slow: Conn, flood: Flood, base_rss: int) -> None:
    """Until the server is seen, STALLED times in a row, asleep with that client's bytes
    unread in its receive queue and the client's send() taking nothing more: it stopped
    reading it. Its memory is read all along: past HELD_MAX_KB it kept reading instead."""
    stalled, last = 0, None
    deadline = time.monotonic() + ECHO_WAIT
    while stalled < STALLED:
        if server.proc.poll() is not None:
            server.fail(f"a client sent {FLOOD >> 20} MiB and read nothing")
        if server.resources()[2] - base_rss > HELD_MAX_KB:
            buffered(server.resources()[2] - base_rss, flood)
        now = server.activity()
        seen = (now[1], flood.sent)
        side = slow.server_side() if now[0] == 0 and seen == last else None
        unread = side.rx_queue if side is not None else 0
        stalled = stalled + 1 if unread else 0
        last = seen
        if flood.done.is_set() and not flood.error and now[0] == 0 and side is not None \
                and not unread:
            grown = server.resources()[2] - base_rss
            if grown > HELD_MAX_KB:
                buffered(grown, flood)
            never_blocked(grown)
        if time.monotonic() > deadline:
            pytest.fail(f"a client that read nothing sent {flood.sent >> 20} MiB of "
                        f"{FLOOD >> 20} in {ECHO_WAIT:.0f} s and the server was never seen "
                        "asleep with its bytes unread", pytrace=False)
        time.sleep(POLL)
    if server.resources()[2] - base_rss > HELD_MAX_KB:
        buffered(server.resources()[2] - base_rss, flood)


def never_blocked(grown: int) -> NoReturn:
    pytest.fail(
        f"a client that read nothing sent all {FLOOD >> 20} MiB without its send() ever "
        f"blocking (the server's memory grew by {max(grown, 0) >> 10} MiB), expected TCP to "
        "push back once the server stopped reading it\nA server that keeps reading a client "
        "that does not read its echoes holds them for it, without limit. Stop reading it "
        "while its echoes are unsent (asyncio: transport.pause_reading() in "
        "pause_writing()): its bytes then wait in the kernel, and TCP's window stops the "
        "client.", pytrace=False)


def buffered(grown: int, flood: Flood) -> NoReturn:
    pytest.fail(
        f"the server kept reading from a client that did not read its echoes: it buffered "
        f"{grown >> 10} MiB (its resident memory grew that much while the client sent "
        f"{flood.sent >> 20} MiB and read nothing), expected at most {HELD_MAX_KB >> 10} "
        "MiB\nEvery byte such a client sends then waits in the server's memory for an echo "
        "it never reads: one client can exhaust the server. Pause reading a client while "
        "its transport's buffer is full: asyncio calls the protocol's pause_writing() past "
        "the write buffer's high-water mark (transport.pause_reading() there, "
        "resume_reading() in resume_writing()); with streams, await writer.drain() after "
        "each write. Its bytes then wait in the kernel, and TCP's window stops the client.",
        pytrace=False)


def test_ten_thousand_connections_at_once(server: Server) -> None:
    _, base_fds, base_rss = server.resources()
    clients = [Client(server.port) for _ in range(PROCESSES)]
    try:
        connect(server, clients, base_fds, EARLY)
        echo(server, clients, EARLY * PROCESSES)
        for c in clients:
            c.say("more")
        connect(server, clients, base_fds, SHARE)
        accepted(server, base_fds)
        threads, fds, rss = server.resources()
        grown = rss - base_rss
        assert fds >= TOTAL, (
            f"with {TOTAL} clients connected the server holds {fds} descriptors: it does "
            "not accept them all (select() cannot watch descriptors above 1024)")
        if threads > 2:
            pytest.fail(too_many_threads(threads, fds - base_fds), pytrace=False)
        assert grown <= TOTAL * PER_CONNECTION_KB, (
            f"the server's resident memory grew by {grown // 1024} MiB for {TOTAL} "
            f"connections ({grown // TOTAL} KiB each), expected at most {PER_CONNECTION_KB} "
            "KiB per connection\nKeep per-connection state small: no big buffers per "
            "connection, no thread stacks.")
        echo(server, clients, TOTAL)
    finally:
        for c in clients:
            c.close()


def connect(server: Server, clients: list[Client], base_fds: int, share: int) -> None:
    """Until every client process has ``share`` connected; the threads counted all along."""
    connected: set[int] = set()
    deadline = time.monotonic() + CONNECT_WAIT
    while len(connected) < len(clients):
        for i, c in enumerate(clients):
            line = c.line() if i not in connected else None
            if line is None:
                continue
            if line != f"connected {share}":
                if server.proc.poll() is not None:
                    server.fail(f"client process {i + 1} was connecting its {share} clients")
                pytest.fail(
                    f"client process {i + 1} could not connect its {share} clients: {line}\n"
                    "Accept with a deep backlog (listen(4096)) from an event loop that never "
                    "blocks; select() cannot watch descriptors above 1024.", pytrace=False)
            connected.add(i)
        threads = int(server._read(process_threads))   # cheap: the descriptors only if
        if threads < 0 or server.proc.poll() is not None:   # there is a third thread
            server.fail("the clients were connecting (select() cannot watch descriptors "
                        "above 1024)")
        held = server.resources()[1] - base_fds if threads > 2 else 0
        if threads > 2 and (held >= THREADS_SEEN or threads > THREADS_SEEN
                            or len(connected) == len(clients)):
            pytest.fail(too_many_threads(threads, held), pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(
                f"{len(connected)} of {len(clients)} client processes connected their "
                f"{share} clients within {CONNECT_WAIT:.0f} s (the server holds "
                f"{server.resources()[1] - base_fds} sockets)\nAccept with a deep backlog "
                "(listen(4096)) from an event loop that never blocks.", pytrace=False)
        time.sleep(POLL)


def accepted(server: Server, base_fds: int) -> None:
    """The kernel completes connections before the server accepts them: until it holds them
    all, or sleeps on with its descriptors unchanged."""
    stalled, last = 0, None
    deadline = time.monotonic() + CONNECT_WAIT
    while time.monotonic() < deadline:
        before = server.activity()
        fds = server.resources()[1]
        if fds >= TOTAL:
            return
        after = server.activity()
        seen = (fds, after[1])
        stalled = stalled + 1 if asleep_throughout(before, after) and seen == last else 0
        if stalled >= STALLED:
            return
        last = seen
        time.sleep(POLL)


def echo(server: Server, clients: list[Client], total: int) -> None:
    """Every client sends its lines; until each process reports its echoes, or the server is
    seen stuck (blocked loop, lines kept), or the safety net."""
    for c in clients:
        c.say("go")
    reports: dict[int, int] = {}
    deadline = time.monotonic() + ECHO_WAIT
    blocked: list[int] = []
    frozen: tuple[int, tuple[int, ...]]  # (the server's CPU, the waiting clients' CPU)
    stuck, frozen = 0, (0, ())
    verdict = ""
    while len(reports) < len(clients):
        for i, c in enumerate(clients):
            line = c.line() if i not in reports else None
            if line is not None:
                m = re.match(r"echoed (\d+)", line)
                reports[i] = int(m.group(1)) if m else 0
        if len(reports) == len(clients):
            break
        if server.proc.poll() is not None:
            server.fail("the clients were waiting for their echoes")
        now = server.activity()
        waiting = [c for i, c in enumerate(clients) if i not in reports]
        # A blocked loop: every thread asleep, none of them in a readiness wait.
        calls = [call for _, _, call in now[2]]
        if now[0] == 0 and calls and all(c >= 0 and c not in WAITS for c in calls):
            blocked += calls
            if len(blocked) >= BLOCKED_SEEN * len(calls):
                verdict = blocked_loop(max(set(blocked), key=blocked.count))
                break
        # Lines kept: the server and the clients asleep all along, echoes missing.
        seen = (now[1], tuple(c.cpu() for c in waiting))
        if not (now[0] == 0 and all(c.asleep() for c in waiting)):
            stuck = 0
        elif stuck and seen == frozen:
            stuck += 1
        else:
            stuck, frozen = 1, seen
        if stuck >= STALLED:
            unread, in_flight = queues(server.port)
            if unread:
                verdict = blocked_loop(-1, unread)
                break
            if not in_flight:
                verdict = "kept"
                break
            stuck = 0
        if time.monotonic() > deadline:
            verdict = "slow"
            break
        time.sleep(ECHO_POLL)
    for i, c in enumerate(clients):
        if i not in reports:
            c.say("stop")
            m = re.match(r"echoed (\d+)", c.line(60) or "")
            reports[i] = int(m.group(1)) if m else 0
    echoed = sum(reports.values())
    if verdict and verdict not in ("kept", "slow"):
        pytest.fail(verdict + f"\n({echoed} of {total} lines were echoed.)", pytrace=False)
    after_threads = server.resources()[0]
    if after_threads > 2:
        pytest.fail(too_many_threads(after_threads, total), pytrace=False)
    if echoed < total and verdict == "kept":
        pytest.fail(
            f"{echoed} of {total} connected clients got their line echoed: the server read "
            "every line and went idle without answering the rest\nEcho each line as it "
            "arrives (data_received -> transport.write). A server that waits for EOF (or for "
            "more data) before it answers never answers a client that keeps its connection "
            "open.", pytrace=False)
    assert echoed == total, (
        f"{echoed} of {total} connected clients got their line echoed within "
        f"{ECHO_WAIT:.0f} s, expected all\nEvery connection must be served while the "
        "others stay open: echo each line as it arrives (do not wait for EOF), and never "
        "block the loop (no time.sleep, no blocking socket calls in a callback).")


def blocked_loop(call: int, unread: int = 0) -> str:
    where = (f"asleep in {CALLS.get(call, f'system call {call}')}" if call >= 0 else
             f"asleep while {unread} of its connections hold lines it has not read")
    return (f"the event loop is blocked: with clients waiting for their echoes the server "
            f"was seen {where}, not waiting for readiness (epoll_wait)\nA callback that "
            "sleeps (time.sleep) or makes a blocking call (a blocking recv/send) stops every "
            "connection until it returns: the loop runs nothing else meanwhile. Echo at once "
            "in data_received; wait with 'await asyncio.sleep()' in a coroutine, never "
            "time.sleep() on the loop.")


def queues(port: int) -> tuple[int, int]:
    """(the server's connections holding bytes it has not read, bytes on their way to the
    clients): read once, when everything has been seen asleep (the table is slow to read
    with 20,000 sockets on a loaded machine)."""
    unread = in_flight = 0
    for s in tcp_sockets():
        if s.local == ("127.0.0.1", port) and s.remote[1]:
            unread += bool(s.inode and s.rx_queue and s.state in (ESTABLISHED, CLOSE_WAIT))
            in_flight += s.tx_queue
        elif s.remote == ("127.0.0.1", port):
            in_flight += s.rx_queue
    return unread, in_flight


def test_closed_connections_are_forgotten(learner: Any) -> None:
    """Clients come and go, 200 at a time: the server's memory must follow the connections
    open, not those ever accepted. Read inside it (memory_probe.py, on a signal, after a full
    collection): the blocks Python holds must come back after each round of short-lived
    connections, round after round."""
    probe_dir = learner.tmp_folder()
    shutil.copy(PROBE, probe_dir / "sitecustomize.py")
    env = {"PYTHONPATH": f"{learner.dir}{os.pathsep}{probe_dir}"}
    with running_server(learner, env) as srv:
        client = Client(srv.port, 0, 0)
        try:
            base_fds = srv.resources()[1]
            short_lived(srv, client, WARM_UP, base_fds)
            start = before = probe(srv)
            for _ in range(ROUNDS):
                short_lived(srv, client, ROUND, base_fds)
                after = probe(srv)
                kept = after["blocks"] - before["blocks"]
                if kept <= ROUND * KEPT_PER_CONNECTION:
                    return   # a round that gave its memory back: nothing is kept
                before = after
        finally:
            client.close()
    pytest.fail(
        f"the server keeps every closed connection's state: after each round of {ROUND} "
        "clients that connected, echoed a line and closed it held more memory blocks (none "
        f"open at either reading), {kept} more after the last ({kept / ROUND:.1f} per closed "
        f"connection), expected as many as before{grown(start, after, ROUND * ROUNDS)}\nA "
        "set, dict or list that remembers each connection (its protocol or transport to "
        "close at shutdown, its task, its buffer or counters by address or id) must forget "
        "it when the connection closes (connection_lost: discard it; a task set: "
        "add_done_callback(tasks.discard)). Otherwise memory grows with every connection "
        "ever accepted, not with those open, until the process is killed.", pytrace=False)


def short_lived(server: Server, client: Client, count: int, base_fds: int) -> None:
    """``count`` clients connect, echo a line and close; until the server has closed its side
    of each (its descriptors back where they were), or sleeps on with them unchanged."""
    client.say(f"cycle {count}")
    line, deadline = None, time.monotonic() + ECHO_WAIT
    while line is None or line.startswith("connected"):
        if server.proc.poll() is not None:
            server.fail("short-lived clients came and went")
        if time.monotonic() > deadline:
            pytest.fail(f"{count} short-lived clients (connect, send a line, read its echo, "
                        f"close) did not finish within {ECHO_WAIT:.0f} s", pytrace=False)
        line = client.line(POLL)
    m = re.match(r"cycled (\d+)", line)
    if not m or int(m.group(1)) < count:
        pytest.fail(f"of {count} short-lived clients (connect, send a line, read its echo, "
                    f"close) {m.group(1) + ' got their echo' if m else line}, expected all"
                    "\nEvery connection must be served, however briefly it lives.",
                    pytrace=False)
    stalled, last = 0, None
    deadline = time.monotonic() + CONNECT_WAIT
    while stalled < STALLED and time.monotonic() < deadline:
        fds, asleep = server.resources()[1], server.activity()[0] == 0
        if fds <= base_fds and asleep:
            return
        stalled = stalled + 1 if asleep and fds == last else 0
        last = fds
        time.sleep(POLL)


def probe(server: Server) -> dict[str, Any]:
    """What memory_probe.py reports from inside the server (on SIGUSR1)."""
    server.proc.send_signal(signal.SIGUSR1)
    try:
        return server.probes.get(timeout=ECHO_WAIT)
    except queue.Empty:
        server.fail("the verification asked the server what it holds (SIGUSR1, handled by "
                    "the probe it loads as sitecustomize): no answer within "
                    f"{ECHO_WAIT:.0f} s; keep SIGUSR1 at its handler and PYTHONPATH as given")


def grown(first: dict[str, Any], last: dict[str, Any], closed: int) -> str:
    """What grew with the connections closed: containers by length (the learner's own by
    name, when one did), then objects by type."""
    def growth(field: str) -> list[tuple[int, str, int]]:
        return sorted(((n - first[field].get(name, 0), name, first[field].get(name, 0))
                       for name, n in last[field].items()
                       if n - first[field].get(name, 0) >= closed // 2), reverse=True)
    sizes = growth("sizes")
    named = [g for g in sizes if not g[1].startswith("a ")]
    seen = [f"{name}: {was} -> {was + more} entries" for more, name, was in named or sizes]
    seen += [f"{name} objects +{more}" for more, name, _ in growth("kinds")[:4]]
    return f" (grew: {'; '.join(seen[:5])})" if seen else ""
