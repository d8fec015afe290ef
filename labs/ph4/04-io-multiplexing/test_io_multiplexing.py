"""ph4.4 verification: the learner's edge-triggered epoll echo server (server.c), built with
make (-Wall -Wextra -Werror, ASan + UBSan) and run as a real process on loopback.

Nothing here waits for a time to pass to decide. When the test's clients expect bytes and
none come, the server process is inspected in /proc: asleep (state S) in epoll_wait while
bytes sit unread in its socket (/proc/net/tcp rx_queue) or connections sit unaccepted in
its listen queue is the edge-triggered mistake (an event not drained), asleep in
read()/recv() or accept() is a blocking descriptor. Seen a few times in a row, that fails
the test at once with the diagnosis; threads are counted in /proc/<pid>/task.

The server is started with a limit on open files of NOFILE (the test raises its own too), so
that MANY connections at once give it descriptors past 1023: a table of 1024 connections or
select()'s fd_set overflows there (ASan and UBSan make that a crash, named from its report).
Last, a server limited to LOW_NOFILE open files gets QUEUED more clients than it can hold:
once the accepted ones close, the ones left in its listen queue (accept4: EMFILE) must be
accepted and echoed - an edge-triggered listener whose accept loop stops on that error
never hears of them again.
"""

from __future__ import annotations

import os
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from labrunner.testing import (
    LISTEN,
    asleep_throughout,
    cpu_burnt_while_idle,
    epoll_interest,
    open_descriptors,
    open_files_limit,
    process_activity,
    process_resources,
    process_threads,
    program_reading,
    tcp_sockets,
)

BURST = 8 << 20          # 8 MiB in one go: far more than any one read() returns
CLIENTS = 500
MANY = 1100              # at once: past a table of 1024 connections and select's FD_SETSIZE
NOFILE = 4096            # open files the test and the server may use (for MANY, with room)
LOW_NOFILE = 64          # the server's limit in the test that runs it out of descriptors
QUEUED = 20              # connections left in its listen queue there (accept4: EMFILE)
STALLED = 8              # consecutive stalled observations, 25 ms apart, that fail a test
BUSY_CPU = 1.0           # CPU seconds a server with nothing to do may burn, never asleep
DEADLINE = 60.0          # a safety net only: stalls are diagnosed long before
CLOSES_WITHIN = 10.0     # after the last byte of an echo to a half-closed client (a safety
#                          net: a server asleep with it open and nothing to send is seen)
EPOLLOUT, EPOLLET = 0x4, 1 << 31
EPOLL_WAIT = {232, 281, 441}          # epoll_wait, epoll_pwait, epoll_pwait2 (x86-64)
READS = {0: "read()", 45: "recvfrom()/recv()", 19: "readv()"}
ACCEPTS = {43: "accept()", 288: "accept4()"}
SENDS = {1: "write()", 20: "writev()", 44: "sendto()/send()", 46: "sendmsg()"}
ONE_THREAD = ("The point of epoll is that one thread watches every descriptor: no thread per "
              "connection, no worker pool.")
SIGPIPE_ADVICE = (
    "send() or write() on a connection whose peer has gone (a reset after it shut down its "
    "sending side: EPIPE) raises SIGPIPE, and its default action ends the process - every "
    "other connection with it. A server ignores it: send(..., MSG_NOSIGNAL) on every send, "
    "or signal(SIGPIPE, SIG_IGN) at start, then the call fails with EPIPE and you close "
    "that one connection.")
NUL_ADVICE = (
    "An echo server moves bytes, not C strings: what a client sends may hold any byte, 0x00 "
    "too. Keep and send the n bytes recv() returned (memcpy(), send(fd, buf, n, ...)), never "
    "strlen(), strcpy(), strncpy(), strcat() or printf(\"%s\") on them: each stops at the "
    "first 0 byte.")
EINTR_ADVICE = (
    "A process stopped (SIGSTOP, SIGTSTP: Ctrl-Z, a debugger) and continued (SIGCONT: fg, "
    "bg) has the epoll_wait() it slept in fail with EINTR, even with no signal handler "
    "installed (man 7 signal), and so does any signal a handler catches. EINTR is not an "
    "error: call epoll_wait() again, as for read() and accept().")
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=23",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


@pytest.fixture
def binary(learner: Any) -> Path:
    """Built with the c_examples Makefile (once per session: learner.build() keeps it)."""
    return learner.build() / "epoll_echo"  # type: ignore[no-any-return]


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise this process's soft limit on open files to ``want``: any user may, up to the
    hard limit (a non-root shell often starts at 1024). Root may raise a hard limit below
    ``want`` too, unless a container withholds CAP_SYS_RESOURCE. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft, hard
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
        except (ValueError, OSError):
            pass   # not allowed: up to the hard limit only
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return min(want, hard), hard


# The server is given the test's limit on open files by its own first act (setrlimit, then
# exec of the learner's binary), not by inheritance: it holds however the server is started,
# also through learner.popen, whose programs the learner's factory starts with its own.
WITH_NOFILE = 'ulimit -H -n "$2" && ulimit -S -n "$1" && shift 2 && exec "$@"'


class Server:
    """The learner's server, started through learner.popen (as the learner's uid when
    grading); its /proc is read where it can be seen (see ``read``)."""

    def __init__(self, learner: Any, binary: Path, nofile: int | None = None,
                 asan: str = "", port: int = 0) -> None:
        soft, hard = raise_nofile(NOFILE)
        soft = nofile or soft   # a lower limit of its own, to run it out of descriptors
        self.learner = learner
        self.proc = learner.popen(
            ["/bin/sh", "-c", WITH_NOFILE, "sh", str(soft), str(hard), str(binary), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **SAN_ENV,
                 "ASAN_OPTIONS": ":".join(filter(None, (SAN_ENV["ASAN_OPTIONS"], asan)))})
        self.stderr = bytearray()
        threading.Thread(target=self._drain, daemon=True).start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace")
        m = re.match(r"listening on (\d+)", line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            time.sleep(0.05)
            pytest.fail("the server did not print 'listening on <port>' first (exit status "
                        f"{self.proc.returncode})\n{self.stderr.decode(errors='replace')[-600:]}",
                        pytrace=False)
        self.port = int(m.group(1))
        self.limit = soft   # the server's limit on open files

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr += line

    @property
    def pid(self) -> int:
        return cast(int, self.proc.pid)

    def read(self, helper: Callable[[int], Any]) -> Any:
        """A /proc reading of the server process: here when the test can see it, else
        beside the learner's program (grading runs it as another user, whose /proc the
        test's user cannot read)."""
        return program_reading(self.learner, self.proc, helper)

    def threads(self) -> int:
        return int(self.read(process_threads))

    def descriptors(self) -> list[int]:
        return list(self.read(open_descriptors) or [])

    def fds(self) -> int:
        return len(self.descriptors())

    def exiting(self) -> bool:
        """Its descriptors are closed: a process on its way out (it always holds its
        listening socket while it lives): its /proc unreadable counts too, as it goes."""
        try:
            return not self.descriptors()
        except RuntimeError:
            return True

    def highest_fd(self) -> int:
        return max(self.descriptors(), default=-1)

    def nofile(self) -> int:
        """The server's own soft limit on open files (/proc/<pid>/limits)."""
        return int(self.read(open_files_limit))

    def exited(self) -> str | None:
        if self.proc.poll() is None:
            return None
        time.sleep(0.05)
        output = self.stderr.decode(errors="replace").strip()[-1200:]
        if self.proc.returncode == -signal.SIGPIPE:
            return (f"the server was killed by SIGPIPE (status {self.proc.returncode})\n"
                    f"{SIGPIPE_ADVICE}\n{output}")
        return f"the server exited (status {self.proc.returncode})\n{output}"

    def alive(self, what: str) -> None:
        """Fails the test if the server exited: a process with no descriptors left (it
        always holds its listening socket while it lives) is on its way out, not done."""
        if self.exiting():
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                pass
        gone = self.exited()
        if gone:
            pytest.fail(f"{what}, {gone}", pytrace=False)

    def asleep_in(self) -> int | None:
        """The syscall every thread of the server sleeps in, or None if one is running."""
        awake, _, threads = self.read(process_activity)
        calls = {call for _, _, call in threads}
        if awake != 0 or not threads or -1 in calls or len(calls) != 1:
            return None
        return int(calls.pop())

    def all_asleep(self) -> bool:
        """Every thread of the server sleeps, whatever it sleeps in (a thread per connection
        blocked in send() beside one in accept()): nothing is running."""
        awake, _, threads = self.read(process_activity)
        return awake == 0 and bool(threads)

    def queues(self) -> tuple[int, int]:
        """(bytes unread in the server's connections, connections waiting in its listen
        queue), from /proc/net/tcp: rx_queue of sockets whose local port is the server's."""
        unread = backlog = 0
        for sock in tcp_sockets():
            if sock.local[1] != self.port:
                continue
            if sock.state == LISTEN:
                backlog += sock.rx_queue
            else:
                unread += sock.rx_queue
        return unread, backlog

    def sent_queue(self) -> int:
        """Bytes the server's connections have written that the kernel has not delivered."""
        return sum(sock.tx_queue for sock in tcp_sockets()
                   if sock.local[1] == self.port and sock.state != LISTEN)

    def registrations(self) -> dict[int, int]:
        """{descriptor: events mask} of the connections in the server's epoll sets (read
        from /proc/<pid>/fdinfo), the listening socket left out."""
        listening = {f"socket:[{sock.inode}]" for sock in tcp_sockets()
                     if sock.state == LISTEN and sock.local[1] == self.port}
        interest = self.read(epoll_interest)
        return {int(fd): int(mask) for fd, (mask, what) in dict(interest).items()
                if what not in listening}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(learner: Any, binary: Path) -> Iterator[Server]:
    srv = Server(learner, binary)
    yield srv
    srv.stop()


def swapped(port: int) -> int:
    """The port read in the other byte order."""
    return ((port & 0xFF) << 8) | (port >> 8)


def free_port() -> int:
    """A port free now, below the ephemeral range (no client's connect() takes it meanwhile),
    whose two bytes differ (so it is another port in the other byte order, also free and
    unprivileged): 0 reads the same in both orders, so every other test's port hides a
    missing htons()."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 32000)
        if port >> 8 == port & 0xFF or swapped(port) < 1024:
            continue
        try:
            for candidate in (port, swapped(port)):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    pytest.fail("found no free port to ask the server for (200 tried)", pytrace=False)


def answers_on(port: int) -> bool:
    """Whether an echo server answers on this loopback port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"port?\n")
            got = b""
            while len(got) < 6:
                chunk = sock.recv(6 - len(got))
                if not chunk:
                    break
                got += chunk
            return got == b"port?\n"
    except OSError:
        return False


def test_the_port_given_is_the_port_listened_on(learner: Any, binary: Path) -> None:
    """`epoll_echo <port>`: every other test asks for 0 (any free port), and 0 reads the
    same in both byte orders - a port given names a missing htons()/ntohs()."""
    port = free_port()
    server = Server(learner, binary, port=port)
    try:
        printed = server.port
        on = [p for p in dict.fromkeys((port, swapped(port), printed)) if answers_on(p)]
        if on == [port] and printed == port:
            return
        where = (f"listens on {', '.join(map(str, on))}" if on
                 else f"answers on none of {port}, {swapped(port)}, {printed}")
        if on == [swapped(port)]:
            why = (f"{port} is {port:#06x}; {on[0]} is {on[0]:#06x}, the same two bytes "
                   "swapped: the port went into sin_port in the host's byte order. "
                   "sockaddr_in holds it in network byte order (big-endian): "
                   ".sin_port = htons(port)")
        elif on == [port] and printed == swapped(port):
            why = (f"it listens on {port} as asked but prints {printed} ({port:#06x} with "
                   "its two bytes swapped): sin_port from getsockname() is in network byte "
                   "order - print ntohs(addr.sin_port)")
        else:
            why = "expected it to listen on the port given on its command line and print it"
        pytest.fail(f"`epoll_echo {port}` printed 'listening on {printed}' and {where}: "
                    f"{why}. (Port 0, any free port, reads the same in both byte orders: "
                    "only a port given shows this.)", pytrace=False)
    finally:
        server.stop()


REUSE_ADVICE = (
    "A descriptor number is reused at once: the next connection accepted gets the lowest "
    "number free - the one just closed - and with it that number's slot in your table. "
    "Clear the WHOLE slot where you close a connection (free() its buffer, then memset the "
    "slot to 0: pointer, length, capacity and the end-of-file flag), or the new connection "
    "starts with the old one's state: 'the peer closed', a length or a capacity with no "
    "buffer behind it.")


def test_a_reused_descriptor_starts_a_fresh_connection(server: Server) -> None:
    """A client sends a line, shuts down its sending side and is closed by the server once
    echoed; the next client gets the same descriptor number in the server (the lowest
    free) and must be served as a new connection: its echo, twice, and nothing else."""
    deadline = time.monotonic() + DEADLINE   # its epoll descriptor is made after it prints
    while server.asleep_in() not in EPOLL_WAIT and time.monotonic() < deadline:
        server.alive("starting")
        time.sleep(0.01)
    before = set(server.descriptors())
    first_what = "a client that sends a line, then shuts down its sending side"
    with socket.create_connection(("127.0.0.1", server.port)) as first:
        first.sendall(b"first connection\n")
        first.shutdown(socket.SHUT_WR)
        pump(server, [first], [b"first connection\n"], first_what, half_closed=True)
        rest, kept = server_end(server, first)
        if rest is None:
            pytest.fail(f"{first_what}: the server echoed it, then kept the connection open "
                        f"({kept}): read() returning 0 means the peer sends nothing more - "
                        "finish writing, then close(fd)", pytrace=False)
    wait_for_descriptors(server, len(before), f"after {first_what} was echoed and closed",
                         "Close the descriptor once the echo is written.")
    lowest = min(set(range(len(before) + 1)) - before)   # accept4() takes the lowest free
    second = socket.create_connection(("127.0.0.1", server.port))
    try:
        what = (f"a second client (in the server descriptor {lowest}, the lowest free: the "
                "number the first connection had)")

        def lost(seen: str) -> str:
            try:   # a crash closes the connection a moment before its exit can be seen
                server.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            gone = server.exited()
            return (f"{what}: {seen} - it was served as if it were the closed one"
                    + (f" ({gone})" if gone else "") + f"\n{REUSE_ADVICE}")

        for line in (b"second connection\n", b"and once more\n"):
            try:
                second.sendall(line)
            except OSError as error:
                pytest.fail(lost(f"sending {line!r} failed ({error})"), pytrace=False)
            pump(server, [second], [line], what, lost=lost)
    finally:
        second.close()


def diagnose(server: Server, waiting: str, all_sent: bool = True,
             short: str = "") -> str | None:
    """Why is nothing moving? None while the server is doing something. all_sent: the
    test has written everything it expects back; short: which connection lacks what."""
    gone = server.exited()
    if gone:
        return f"{waiting}: {gone}"
    call = server.asleep_in()
    if call is None:
        return None
    unread, backlog = server.queues()
    if call in EPOLL_WAIT and backlog:
        return (f"{waiting}: the server sleeps in epoll_wait() while {backlog} connections "
                "wait in its listen queue\nOne event on the listening socket can stand for "
                "many queued connections: accept() until it fails with EAGAIN (and make the "
                "listening socket non-blocking).")
    if call in EPOLL_WAIT and unread:
        return (f"{waiting}: the server sleeps in epoll_wait() while {unread} bytes sit "
                "unread in its sockets\nWith EPOLLET an event is reported once per change, "
                "not while data remains: one read() per event leaves the rest of a burst "
                "unread, and no new event ever comes for it. Read until read() fails with "
                "EAGAIN.")
    if call in EPOLL_WAIT and all_sent and not unread and not server.sent_queue():
        masks = server.registrations()
        if masks and not any(mask & EPOLLOUT for mask in masks.values()):
            return (f"{waiting}: {short}; the server sleeps in epoll_wait() with nothing "
                    "unread and nothing left in the kernel to send, and no connection is "
                    "registered for EPOLLOUT\nsend() on a non-blocking socket writes less "
                    "than asked when the peer reads slowly; the rest waits in your buffer "
                    "and nothing ever wakes you to send it: register EPOLLIN | EPOLLOUT | "
                    "EPOLLET (or add EPOLLOUT while output is pending) and flush on EPOLLOUT.")
        return (f"{waiting}: {short}; the server sleeps in epoll_wait() with nothing unread "
                "and nothing left in the kernel to send: the rest of the echo was dropped, or "
                "sits in your buffer unsent\nsend() on a non-blocking socket can write less "
                "than asked or fail with EAGAIN when the peer reads slowly: keep what was "
                "not written in a per-connection buffer, never discard it, and send it when "
                "EPOLLOUT fires (an EPOLLOUT event without EPOLLIN must flush too).")
    if call in READS:
        return (f"{waiting}: the server's only thread is blocked in {READS[call]}\nA read "
                "loop that runs until EAGAIN needs non-blocking sockets: set O_NONBLOCK on "
                "every accepted descriptor (fcntl, or accept4 with SOCK_NONBLOCK), or the "
                "last read() blocks and every other connection waits.")
    if call in ACCEPTS:
        return (f"{waiting}: the server is blocked in accept()\nMake the listening socket "
                "non-blocking so that the accept loop ends with EAGAIN.")
    return None


def pump(server: Server, socks: list[socket.socket], wanted: list[bytes], what: str,
         all_sent: Callable[[], bool] = lambda: True, half_closed: bool = False,
         lost: Callable[[str], str] | None = None,
         read_when: Callable[[], bool] = lambda: True) -> None:
    """Receive wanted[i] on socks[i], failing fast with a diagnosis when the server sleeps
    while the test still waits. lost: the message when a connection is closed or reset
    before its echo is complete, or the server exits (given what was seen). read_when: the
    clients read nothing until it says so."""
    got = [bytearray() for _ in socks]
    checked = [0] * len(socks)   # got[i][:checked[i]] matches wanted[i]; -1: gone astray
    pending = {i for i, w in enumerate(wanted) if w}
    sel = selectors.DefaultSelector()
    for i in pending:
        sel.register(socks[i], selectors.EVENT_READ, i)
    stalled, deadline = 0, time.monotonic() + DEADLINE
    while pending:
        if not read_when():
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: the client was still sending after {DEADLINE:.0f} s, "
                            "the server taking its bytes too slowly to finish", pytrace=False)
            time.sleep(0.025)
            continue
        progress = False
        for key, _ in sel.select(timeout=0.025):
            i = key.data
            try:
                chunk, reset = socks[i].recv(1 << 20), None
            except ConnectionError as error:   # failed below, not chained to it
                chunk, reset = b"", error
            if reset is not None:
                if lost:
                    pytest.fail(lost(f"connection {i} was reset after {len(got[i])} of "
                                     f"{len(wanted[i])} bytes of its echo ({reset})"),
                                pytrace=False)
                if half_closed:
                    pytest.fail(f"{what}: connection {i} was reset by the server after "
                                f"{len(got[i])} of {len(wanted[i])} bytes of its echo "
                                f"({reset})\nThe client had only shut down its sending side "
                                "(shutdown SHUT_WR) and was still reading: read() returning "
                                "0 means the peer will send no more, not that it stopped "
                                "reading. Finish writing what is pending (on EPOLLOUT), "
                                "then close.", pytrace=False)
                pytest.fail(f"{what}: connection {i} was reset ({reset}) before its echo was "
                            "complete", pytrace=False)
            if not chunk and lost:
                pytest.fail(lost(f"connection {i} was closed by the server after "
                                 f"{len(got[i])} of {len(wanted[i])} bytes of its echo"),
                            pytrace=False)
            if not chunk and half_closed:
                pytest.fail(f"{what}: connection {i} was closed by the server after "
                            f"{len(got[i])} of {len(wanted[i])} bytes of its echo\nThe "
                            "client had only shut down its sending side (shutdown SHUT_WR) "
                            "and was still reading: read() returning 0 means the peer will "
                            "send no more, not that it stopped reading. Finish writing what "
                            "is pending (on EPOLLOUT), then close.", pytrace=False)
            if not chunk:
                pytest.fail(f"{what}: connection {i} was closed by the server after "
                            f"{len(got[i])} of {len(wanted[i])} bytes\nEAGAIN from read() "
                            "means 'nothing more for now', not an error: keep the "
                            "connection open; close only when read() returns 0.",
                            pytrace=False)
            got[i] += chunk
            progress = True
            if checked[i] >= 0:
                checked[i] = astray(what, i, got[i], wanted[i], checked[i])
            if len(got[i]) >= len(wanted[i]):
                pending.discard(i)
                sel.unregister(socks[i])
        if progress:
            stalled = 0
            continue
        short = next(f"connection {i} got {len(got[i])} of {len(wanted[i])} bytes back"
                     for i in sorted(pending))
        for i in sorted(pending):   # the echo stops right before a 0 byte
            if checked[i] >= 0 and (cut := c_string_loss(bytes(got[i]), wanted[i], True)):
                pytest.fail(f"{what}: connection {i} {cut}\n{NUL_ADVICE}", pytrace=False)
        if lost is not None and server.exited():
            pytest.fail(lost("the server exited"), pytrace=False)
        why = diagnose(server, what, all_sent(), short)
        stalled = stalled + 1 if why else 0
        if stalled >= STALLED:
            pytest.fail(why or what, pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {len(pending)} connections still waiting after "
                        f"{DEADLINE:.0f} s", pytrace=False)
    sel.close()
    for i, (g, w) in enumerate(zip(got, wanted, strict=True)):
        assert bytes(g) == w, (f"{what}: connection {i} got different bytes back than it "
                               f"sent ({len(g)} bytes, expected {len(w)})")


# ---------------------------------------------------------------------------- the tests


def astray(what: str, i: int, got: bytearray, wanted: bytes, start: int) -> int:
    """After new bytes of connection ``i``'s echo came (``got[start:]``): how much of it
    matches what was sent (len(got)), or -1 when it has gone astray - judged at the end of
    pump() as before, unless it lost what followed a 0 byte: failed here, naming that."""
    if got[start:] == wanted[start:len(got)]:
        return len(got)
    cut = c_string_loss(bytes(got), wanted, False)
    if cut:
        pytest.fail(f"{what}: connection {i} {cut}\n{NUL_ADVICE}", pytrace=False)
    return -1


def c_string_loss(got: bytes, wanted: bytes, stalled: bool) -> str | None:
    """How an echo ``got`` lost what followed a 0 byte of ``wanted`` (as C string functions
    do), or None: strlen() on what was read keeps no 0 byte and skips the rest of that read;
    strncpy() keeps the 0 byte and pads the rest with zeros; stalled: the echo stopped (no
    more is coming) right before a 0 byte, with none before it."""
    at = first_difference(got, wanted)
    if at >= len(wanted):
        return None
    if at == len(got):
        if stalled and wanted[at] == 0 and 0 not in got:
            return (f"got {at} bytes back, none of them 0, and no more: byte {at} it sent is "
                    "0x00, and the echo stops there")
        return None
    if wanted[at] == 0 and 0 not in got:
        return (f"got its echo without its 0 bytes and what followed them: byte {at} it sent "
                f"is 0x00, the echo goes on there with other bytes, and none of the "
                f"{len(got)} bytes that came back is 0")
    if got[at] == 0 and at > 0 and wanted[at - 1] == 0:
        return (f"got zeros back in place of the bytes that followed a 0 byte it sent (byte "
                f"{at - 1} is 0x00; from byte {at} on the echo holds 0x00 where it sent "
                f"0x{wanted[at]:02x})")
    return None


class Sender:
    """Sends a payload on a socket from a thread of its own (then shuts down the sending
    side, if asked); ``sent`` counts the bytes the kernel has taken."""

    def __init__(self, sock: socket.socket, payload: bytes, shut_wr: bool = False) -> None:
        self.sent = 0
        self.thread = threading.Thread(target=self._send, args=(sock, payload, shut_wr),
                                       daemon=True)
        self.thread.start()

    def _send(self, sock: socket.socket, payload: bytes, shut_wr: bool) -> None:
        view = memoryview(payload)
        try:
            while self.sent < len(view):
                self.sent += sock.send(view[self.sent:self.sent + (1 << 20)])
            if shut_wr:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server went away: pump() reports what it saw

    def done(self) -> bool:
        return not self.thread.is_alive()


def once_sent_or_held(server: Server, sender: Sender, what: str) -> Callable[[], bool]:
    """pump()'s read_when for a client that reads only once it has sent everything, or once
    the server stops taking its bytes (asleep in epoll_wait, nothing sent, STALLED times in
    a row): a server may rightly stop reading while its own output waits. A server that
    stops taking them asleep anywhere else (every thread asleep, none in epoll_wait) is
    blocked in a send to this client, which reads nothing until the server reads on: a
    deadlock, failed when seen, since that server would wait for ever."""
    seen = {"sent": -1, "still": 0, "blocked": 0, "reading": 0}

    def ready() -> bool:
        if not seen["reading"]:
            if sender.done():
                seen["reading"] = 1
            elif sender.sent == seen["sent"] and server.asleep_in() in EPOLL_WAIT:
                seen["still"] += 1
                seen["reading"] = int(seen["still"] >= STALLED)
            elif sender.sent == seen["sent"] and server.all_asleep():
                seen["blocked"] += 1
                if seen["blocked"] >= STALLED:
                    blocked_in_a_send(server, what)
            else:
                seen["sent"], seen["still"], seen["blocked"] = sender.sent, 0, 0
        return bool(seen["reading"])

    return ready


def blocked_in_a_send(server: Server, what: str) -> None:
    """Fails the test: every thread of the server asleep, none in epoll_wait, while a client
    that reads nothing yet still sends."""
    awake, _, tasks = server.read(process_activity)
    calls = sorted({int(call) for _, _, call in tasks})
    named = ", ".join(SENDS.get(c) or READS.get(c) or ACCEPTS.get(c) or f"system call {c}"
                      for c in calls)
    threads = len(tasks)
    if threads > 1:
        pytest.fail(f"{what}: the server runs {threads} threads, all asleep (in {named}), and "
                    "takes no more of the client's bytes: a thread blocked in send() to a "
                    "client that reads only once it has sent everything, while that client "
                    f"waits for the server to read - a deadlock\n{ONE_THREAD} Its sockets "
                    "are non-blocking: a send() the peer cannot take yet returns EAGAIN, and "
                    "the rest waits in a buffer for EPOLLOUT.", pytrace=False)
    pytest.fail(f"{what}: the server's only thread sleeps in {named}, not in epoll_wait(), "
                "and takes no more of the client's bytes: blocked in send() to a client that "
                "reads only once it has sent everything, while that client waits for the "
                "server to read - a deadlock, and every other connection waits too\nMake "
                "every accepted socket non-blocking: a send() the peer cannot take yet "
                "returns EAGAIN; keep the rest in a per-connection buffer and send it on "
                "EPOLLOUT.", pytrace=False)


def test_a_burst_larger_than_one_read_is_echoed_whole(server: Server) -> None:
    payload = os.urandom(BURST)
    what = f"echoing an {BURST >> 20} MiB burst"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sender = Sender(sock, payload)
        pump(server, [sock], [payload], what, sender.done)
        sender.thread.join(10)
        sock.sendall(b"and once more\n")
        pump(server, [sock], [b"and once more\n"], "a second message on the same "
             "connection")
    # The same burst to a client that reads nothing until it has sent it all: the kernel's
    # buffers (a 64 KiB receive buffer here, at most 4 MiB to send on the server's side)
    # take far less than 8 MiB, so the server's send() meets EAGAIN for certain and the rest
    # waits in its buffer. When the client reads, no more input comes to wake the server:
    # only EPOLLOUT tells it to send the rest.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect(("127.0.0.1", server.port))
        sender = Sender(sock, payload)
        late = f"{what} to a client that reads only once it has sent it all"
        pump(server, [sock], [payload], late, sender.done,
             read_when=once_sent_or_held(server, sender, late))


def test_a_stopped_and_continued_server_keeps_serving(server: Server) -> None:
    """Job control (Ctrl-Z then fg, a debugger attaching): SIGSTOP, then SIGCONT, while the
    server sleeps in epoll_wait(). Linux ends that wait with EINTR on SIGCONT, with no
    signal handler installed (signal(7)): the server must call it again, not exit."""
    what = "stopped (SIGSTOP) while asleep in epoll_wait() and continued (SIGCONT)"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"before the stop\n")
        pump(server, [sock], [b"before the stop\n"], "a message before the server was "
             "stopped")
        stop_in_epoll_wait(server)
        continue_idle(server)

        def lost(seen: str) -> str:
            if server.exiting():   # its connections closed as it exits
                try:
                    server.proc.wait(DEADLINE)
                except subprocess.TimeoutExpired:
                    pass
            gone = server.exited()
            return (f"{what}, {gone.rstrip()}\n{EINTR_ADVICE}" if gone else
                    f"{what}, {seen}")

        sock.sendall(b"after the stop\n")
        pump(server, [sock], [b"after the stop\n"], f"a message after the server was {what}",
             lost=lost)
    server.alive(f"{what}, then a client closed")


def stop_in_epoll_wait(server: Server) -> None:
    """SIGSTOP the server once it sleeps in epoll_wait() (it has nothing to do), and wait
    until it is seen stopped: its only thread no longer asleep (state T, counted awake)."""
    stalled, deadline = 0, time.monotonic() + DEADLINE
    while stalled < 2:   # twice in a row: back in epoll_wait after the echo, for sure
        stalled = stalled + 1 if server.asleep_in() in EPOLL_WAIT else 0
        if time.monotonic() > deadline:
            pytest.fail("the server, with nothing to do, never slept in epoll_wait() "
                        f"({DEADLINE:.0f} s)", pytrace=False)
        time.sleep(0.025)
    server.proc.send_signal(signal.SIGSTOP)
    while server.read(process_activity)[0] == 0:
        server.alive("stopped with SIGSTOP")
        if time.monotonic() > deadline:
            pytest.fail(f"the server was not seen stopped after SIGSTOP ({DEADLINE:.0f} s)",
                        pytrace=False)
        time.sleep(0.01)


def continue_idle(server: Server) -> None:
    """SIGCONT the stopped server, and wait until it runs on (back asleep, or gone) before
    a client sends anything: an event already waiting when it resumes is returned by that
    epoll_wait() in place of EINTR, and would hide how it takes EINTR."""
    server.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + DEADLINE
    while not server.exiting() and server.read(process_activity)[0] != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"the server, continued (SIGCONT) with nothing to do, was not seen "
                        f"asleep again ({DEADLINE:.0f} s)", pytrace=False)
        time.sleep(0.01)


def test_five_hundred_connections_on_one_thread(server: Server) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(CLIENTS)]
    try:
        messages = [f"client {i} says hello\n".encode() * (1 + i % 7) for i in range(CLIENTS)]
        for s, m in zip(socks, messages, strict=True):
            s.sendall(m)
        try:
            pump(server, socks, messages, f"{CLIENTS} connections opened at once")
        except pytest.fail.Exception as failure:
            # A thread per connection meets a limit on threads (a sandbox's, the
            # machine's) before 500: name what the server ran, not only what it caused.
            threads = server.threads()
            if threads <= 1:
                raise
            seen = str(failure.msg).split("\n", 1)[0]
            pytest.fail(f"the server ran {threads} threads while serving {CLIENTS} "
                        f"connections, expected 1 ({seen})\n{ONE_THREAD}", pytrace=False)
        masks = server.registrations()
        level = sorted(fd for fd, mask in masks.items() if not mask & EPOLLET)
        assert not level, (
            f"{len(level)} of the {len(masks)} connections in the server's epoll set are "
            f"registered without EPOLLET (events 0x{masks[level[0]]:x} for descriptor "
            f"{level[0]}, read in /proc/<pid>/fdinfo), expected edge-triggered\nThis lab's "
            "server is edge-triggered: add EPOLLET to every accepted connection's events, "
            "and read/accept until EAGAIN, since an edge is reported once per change.")
        threads = server.threads()
        assert threads == 1, (
            f"the server ran {threads} threads while serving {CLIENTS} connections, "
            f"expected 1\n{ONE_THREAD}")
        assert len(masks) >= CLIENTS, (
            f"{len(masks)} of the {CLIENTS} open connections are in an epoll set of the "
            f"server (read in /proc/<pid>/fdinfo), expected all {CLIENTS}: it watches them "
            "with select() or poll(), not epoll\nThis lab's server watches every connection "
            "with epoll (epoll_ctl EPOLL_CTL_ADD for each accepted descriptor). select() takes "
            "a bitmap of FD_SETSIZE = 1024 descriptors (FD_SET on a higher one is undefined "
            "behaviour) and, like poll(), scans every descriptor on every call.")
    finally:
        for s in socks:
            s.close()
    # every client closed: the server must close its ends (read() returns 0)
    stalled, deadline = 0, time.monotonic() + DEADLINE
    while server.fds() > 16:
        gone = server.exited()
        assert gone is None, f"after the clients closed, {gone}"
        asleep = server.asleep_in() in EPOLL_WAIT
        stalled = stalled + 1 if asleep else 0
        if stalled >= STALLED or time.monotonic() > deadline:
            pytest.fail(
                f"after all {CLIENTS} clients closed, the server sleeps in epoll_wait() "
                f"holding {server.fds()} descriptors\nread() returning 0 means the peer "
                "closed: close(fd) then (closing also removes it from the epoll set), or "
                "every finished connection leaks a descriptor until the process hits its "
                "limit.", pytrace=False)
        time.sleep(0.025)
    server.alive(f"after all {CLIENTS} clients closed")
    server.proc.send_signal(signal.SIGKILL)


def server_end(server: Server, sock: socket.socket) -> tuple[bytes | None, str]:
    """What the server sends next on ``sock``, whose client is done and has its whole echo:
    (b"", "") once it closes (EOF, or a reset), its bytes if it sends more; (None, how it
    was seen) when it sleeps in epoll_wait() STALLED times in a row with nothing of its own
    left to send (no event will ever come to make it close), or after CLOSES_WITHIN s."""
    sock.settimeout(0.025)
    stalled, deadline = 0, time.monotonic() + CLOSES_WITHIN
    while time.monotonic() < deadline:
        try:
            return sock.recv(1), ""
        except TimeoutError:
            pass
        except OSError:   # reset: closed, with our unread nothing
            return b"", ""
        idle = server.asleep_in() in EPOLL_WAIT and not server.sent_queue()
        stalled = stalled + 1 if idle else 0
        if stalled >= STALLED:
            return None, ("asleep in epoll_wait() with nothing left to send: no event will "
                          "come to make it close")
    return None, f"{CLOSES_WITHIN:.0f} s"


def wait_for_descriptors(server: Server, at_most: int, what: str, advice: str) -> None:
    """Wait (diagnosing, not timing) until the server holds at most `at_most` descriptors."""
    stalled, deadline = 0, time.monotonic() + DEADLINE
    while server.fds() > at_most:
        gone = server.exited()
        assert gone is None, f"{what}, {gone}"
        # asleep: in epoll_wait, select or poll with nothing to do - or, a thread per
        # connection, each thread in its own blocking call
        stalled = stalled + 1 if server.all_asleep() else 0
        if stalled >= STALLED or time.monotonic() > deadline:
            where = " in epoll_wait()" if server.asleep_in() in EPOLL_WAIT else ""
            pytest.fail(f"{what}, the server sleeps{where} holding {server.fds()} "
                        f"descriptors, expected at most {at_most}\n{advice}", pytrace=False)
        time.sleep(0.025)
    server.alive(what)   # none left at all: it died, closing them


def test_half_closed_clients_get_their_whole_echo(server: Server) -> None:
    payload = os.urandom(4 << 20)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sender = Sender(sock, payload, shut_wr=True)
        pump(server, [sock], [payload], "a client that sends 4 MiB then shuts down its "
             "sending side", sender.done, half_closed=True)
        sender.thread.join(10)
        # The client is done: it sent everything and has its whole echo. The server must end
        # the connection now; a client waiting for that end would otherwise wait forever.
        rest, kept = server_end(server, sock)
        if rest is None:
            pytest.fail(
                f"the server echoed all 4 MiB to a client that had shut down its sending side, "
                f"then kept the connection open ({kept}): read() returning 0 "
                "means the peer sends nothing more - note it, finish writing what is queued, "
                "then close(fd), or that client waits for the end forever and the descriptor "
                "leaks", pytrace=False)
        assert rest == b"", "after the whole echo the server sent more bytes than it got"


def reset(sock: socket.socket) -> None:
    """close() with SO_LINGER 0: the kernel sends RST, the server's next recv() or send()
    on that connection fails."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_reset_connections_are_closed(server: Server) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    for s in socks:
        s.sendall(b"ping\n")
    pump(server, socks, [b"ping\n"] * len(socks), "50 connections about to be reset")
    base = server.fds() - len(socks)   # every connection echoed: each has its descriptor
    for s in socks:  # RST: read() on the server fails
        reset(s)
    wait_for_descriptors(
        server, base, "after 50 clients reset their connections (RST)",
        "A reset connection makes read() fail with ECONNRESET (the event carries "
        "EPOLLERR/EPOLLHUP): an error other than EAGAIN/EINTR ends the connection, so "
        "close(fd) then, as for read() returning 0, or every reset leaks a descriptor.")


# Memory given back: connections that each buffered a few MiB of echo (the client reads only
# once it has sent all) come and go one after another; the server's resident memory must
# come back to where it was. AddressSanitizer keeps freed memory in quarantine (to catch a
# use after free), which looks like a leak: this server runs without it.
LEAK_BURST = 4 << 20
LEAK_CONNECTIONS = 12
LEAK_KIB = 6 << 10    # growth that fails: half a MiB per connection (a leak is its buffer)


def resident_kib(server: Server) -> int:
    return int(server.read(process_resources)[2])


def echo_and_close(server: Server, what: str) -> None:
    """One connection: its burst echoed whole, then the server's close seen (EOF)."""
    payload = os.urandom(LEAK_BURST)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sender = Sender(sock, payload, shut_wr=True)
        pump(server, [sock], [payload], what, sender.done, half_closed=True,
             read_when=once_sent_or_held(server, sender, what))
        sender.thread.join(10)
        rest, kept = server_end(server, sock)
        if rest is None:
            pytest.fail(f"{what}: the server echoed it all, then kept the connection open "
                        f"({kept}): read() returning 0 means the peer sends "
                        "nothing more - finish writing, then close(fd)", pytrace=False)
        assert rest == b"", f"{what}: the server sent more bytes than it got"


def settled_rss(server: Server) -> int:
    """The server's resident KiB once it is back asleep in epoll_wait (done closing)."""
    deadline = time.monotonic() + DEADLINE
    while server.asleep_in() not in EPOLL_WAIT and time.monotonic() < deadline:
        time.sleep(0.025)
    return resident_kib(server)


def test_closed_connections_give_their_memory_back(learner: Any, binary: Path) -> None:
    server = Server(learner, binary, asan="quarantine_size_mb=0")
    try:
        what = f"a client that sends {LEAK_BURST >> 20} MiB, shuts down its sending side"
        for _ in range(2):  # the allocator's own first helpings
            echo_and_close(server, what)
        before = settled_rss(server)
        for _ in range(LEAK_CONNECTIONS):
            echo_and_close(server, what)
        grown = settled_rss(server) - before
        assert grown < LEAK_KIB, (
            f"after {LEAK_CONNECTIONS} more connections, one after another, that each sent "
            f"{LEAK_BURST >> 20} MiB, got the echo and were closed by the server, its "
            f"resident memory grew by {grown / 1024:.1f} MiB (from {before / 1024:.1f} "
            "MiB), expected it back to about where it was: each closed connection kept its "
            "output buffer\nClosing a connection releases everything it holds: free() its "
            "buffer in the same place you close() its descriptor (zeroing the slot forgets "
            "the pointer). Otherwise memory grows with every connection ever served, until "
            "the OOM killer ends the one thread serving everyone.")
    finally:
        server.stop()


def in_flight(server: Server, sock: socket.socket) -> int:
    """Bytes on their way to ``sock``: unread in its own socket (rx_queue) or in the
    server's end of that connection, not yet delivered (tx_queue)."""
    port, queued = sock.getsockname()[1], 0
    for row in tcp_sockets():
        local, remote = row.local[1], row.remote[1]
        queued += (row.rx_queue if local == port
                   else row.tx_queue if (local, remote) == (server.port, port) else 0)
    return queued


def echo_held(server: Server, sock: socket.socket, sent: int) -> int:
    """How much of the echo of `sent` bytes the server still holds itself: neither in the
    client's socket nor in the server's, on its way."""
    return sent - in_flight(server, sock)


def settle(server: Server, sender: Sender, what: str) -> None:
    """Until the server has taken what the client sent (with the FIN after a SHUT_WR) - or
    stopped taking it - and sleeps: STALLED observations in a row with nothing moving. A
    server that burns BUSY_CPU s of CPU meanwhile, never seen asleep, while nothing moves
    (the client sending nothing more, the bytes unread in the server's sockets unchanged,
    and the client reading nothing, so nothing can go out) spins: failed when seen."""
    last, still, deadline = None, 0, time.monotonic() + DEADLINE
    reading = server.read(process_activity)
    spun_from = reading[1]   # CPU time when something last moved, or the server slept
    while still < STALLED:
        gone = server.exited()
        if gone:
            pytest.fail(f"{what}: {gone}", pytrace=False)
        now = (sender.sent, sender.done(), server.queues()[0])
        still = still + 1 if now == last and server.all_asleep() else 0
        before, reading = reading, server.read(process_activity)
        if now != last or reading[0] == -1 or asleep_throughout(before, reading):
            spun_from = reading[1]
        last = now
        if (burnt := (reading[1] - spun_from) / 1e9) > BUSY_CPU:
            pytest.fail(
                f"{what}: with nothing coming in and nothing able to go out (the client "
                f"reads nothing yet), the server used {burnt:.1f} s of CPU and was never seen "
                "asleep: a busy loop\nA level-triggered descriptor is reported again as long "
                "as it stays ready: a readable EOF (read() returns 0) every time, EPOLLOUT "
                "whenever there is room. After read() returns 0 stop watching for input on "
                "that connection, watch EPOLLOUT only while output is pending - or, as this "
                "lab asks, register EPOLLIN | EPOLLOUT | EPOLLET and drain each event.",
                pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: the server was still busy after {DEADLINE:.0f} s",
                        pytrace=False)
        time.sleep(0.025)


@pytest.mark.parametrize("shut_wr", [True, False],
                         ids=["half-closed then reset", "reset with its echo pending"])
def test_a_reset_with_its_echo_pending_closes_the_connection(server: Server,
                                                            shut_wr: bool) -> None:
    """A client sends 8 MiB without reading its echo (a 64 KiB receive buffer: most of the
    echo waits in the server's own buffer), shuts down its sending side or not, and once
    the server has taken everything resets the connection (RST). The server's recv() - if
    it still calls it - or its send() now fails: either error must close the descriptor."""
    payload = os.urandom(BURST)
    client = ("a client that sent 8 MiB without reading its echo"
              + (" and shut down its sending side (so the server read EOF)" if shut_wr else ""))
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect(("127.0.0.1", server.port))
        sender = Sender(sock, payload, shut_wr=shut_wr)
        settle(server, sender, client)
        held = echo_held(server, sock, sender.sent)
        base = server.fds() - 1   # all but this connection's descriptor
    finally:
        reset(sock)
    wait_for_descriptors(
        server, base,
        f"after {client} reset the connection (RST) with {held} bytes of its echo still in "
        "the server's buffer",
        "The reset makes the connection's next send() fail with ECONNRESET or EPIPE, and "
        "its next recv() with ECONNRESET"
        + (" - but after read() returned 0 a server may no longer call recv()" if shut_wr
           else "") + ". An error from send() other than EAGAIN/EWOULDBLOCK (and EINTR) "
        "means the connection is dead, not 'not writable yet': close(fd) there, as for a "
        "recv() error. Waiting for EPOLLOUT instead never ends: a dead socket raises no "
        "new edge, so the descriptor and its buffer leak. Every error path of send() and "
        "recv() must release the descriptor.")


# Two connections with echo pending in the server at once. One thread serves both, event by
# event, so what belongs to a connection (its pending output, the end of file its peer sent)
# must be kept in that connection's own slot: a buffer or flag shared by all passes every
# test where one connection at a time has something pending. A and B are each sent BURST
# without reading (a 64 KiB receive buffer), A then shuts down its sending side; once the
# server has taken both, B reads its echo and sends once more, and A reads last.
SHARED_ADVICE = (
    "One thread serves every connection, event by event, so two connections can each have "
    "echo pending at once: what belongs to a connection - the output it still waits for, "
    "whether its peer shut down its side - lives in that connection's own slot, never in "
    "one buffer, flag or static shared by all connections.")


def take_echo(server: Server, sock: socket.socket, size: int) -> tuple[bytes, str]:
    """What the server sends on ``sock`` until ``size`` bytes came (how it ended: ""), or
    how it stopped short: closed or reset, the server gone, or the server asleep in
    epoll_wait() STALLED times in a row with nothing on its way to ``sock``."""
    got, stalled, deadline = bytearray(), 0, time.monotonic() + DEADLINE
    sock.settimeout(0.025)
    try:
        while len(got) < size:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                chunk = None
            except ConnectionError as error:
                return bytes(got), f"it was reset by the server ({error})"
            if chunk == b"":
                return bytes(got), "it was closed by the server"
            if chunk:
                got += chunk
                stalled = 0
                continue
            gone = server.exited()
            if gone:
                return bytes(got), gone
            idle = server.asleep_in() in EPOLL_WAIT and not in_flight(server, sock)
            stalled = stalled + 1 if idle else 0
            if stalled >= STALLED or time.monotonic() > deadline:
                return bytes(got), ("the server sleeps in epoll_wait() with nothing on its "
                                    "way to it")
    finally:
        sock.settimeout(None)
    return bytes(got), ""


def first_difference(a: bytes, b: bytes) -> int:
    """The first index where a and b differ (the shorter one's length if one is a prefix)."""
    at, block = 0, 1 << 12
    while at < min(len(a), len(b)) and a[at:at + block] == b[at:at + block]:
        at += block
    return next((i for i in range(at, min(len(a), len(b), at + block)) if a[i] != b[i]),
                min(len(a), len(b)))


def foreign_bytes(got: bytes, at: int, others: dict[str, bytes]) -> tuple[str, int] | None:
    """(the other connection, where) if ``got`` holds bytes another connection sent: 32-byte
    samples from ``at`` on, every 4 KiB over 256 KiB (a server reads at most some KiB at a
    time, so what another connection sent comes in runs longer than that)."""
    for where in range(at, min(len(got) - 32, at + (256 << 10)) + 1, 4 << 10):
        sample = got[where:where + 32]
        other = next((o for o, payload in others.items() if sample in payload), None)
        if other is not None:
            return other, where
    return None


def mixed_up(server: Server, socks: dict[str, socket.socket], name: str, got: bytes,
             at: int, sent: dict[str, bytes]) -> str | None:
    """Whether connection ``name``, whose echo ``got`` goes wrong at byte ``at``, got bytes
    another connection sent - or that other one got its bytes: what the others have to
    read is read too, and searched."""
    others = {o: payload for o, payload in sent.items() if o != name}
    foreign = foreign_bytes(got, at, others)
    if foreign is not None:
        return (f"connection {name} got bytes connection {foreign[0]} sent (at byte "
                f"{foreign[1]} of its echo), expected its own")
    for other, payload in others.items():
        theirs, _ = take_echo(server, socks[other], len(payload))
        mine = foreign_bytes(theirs, first_difference(theirs, payload), {name: sent[name]})
        if mine is not None:
            return (f"connection {name}'s echo went wrong at byte {at}, and connection "
                    f"{other} got bytes connection {name} sent (at byte {mine[1]} of its "
                    "echo)")
    return None


def own_echo(server: Server, socks: dict[str, socket.socket], name: str, want: bytes,
             sent: dict[str, bytes], what: str) -> None:
    """Connection ``name`` must get ``want`` back, exactly: else the test fails naming the
    other connection whose bytes it got, or how it stopped short (``sent``: every
    connection's payload)."""
    got, ended = take_echo(server, socks[name], len(want))
    if got == want:
        return
    at = first_difference(got, want)
    mixed = mixed_up(server, socks, name, got, at, sent)
    if mixed:
        pytest.fail(f"{what}: {mixed}\n{SHARED_ADVICE}", pytrace=False)
    if got != want[:len(got)]:
        pytest.fail(f"{what}: connection {name} got different bytes back than it sent, from "
                    f"byte {at} of {len(want)} on", pytrace=False)
    short = (f"{what}: connection {name} got {len(got)} of {len(want)} bytes back, then "
             f"{ended}")
    if ended.startswith("it was"):
        pytest.fail(f"{short} - yet its client had shut down nothing, while connection A "
                    f"had shut down its sending side\n{SHARED_ADVICE} A connection ends "
                    "for its own end of file or error only.", pytrace=False)
    pytest.fail(diagnose(server, short) or short, pytrace=False)


def test_two_connections_with_echo_pending_at_once_keep_their_own(server: Server) -> None:
    sent = {"A": os.urandom(BURST), "B": os.urandom(BURST)}
    what = (f"two clients at once each sent {BURST >> 20} MiB without reading its echo, A "
            "then shut down its sending side")
    socks: dict[str, socket.socket] = {}
    try:
        for name in sent:
            socks[name] = socket.socket()
            socks[name].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            socks[name].connect(("127.0.0.1", server.port))
        senders = {name: Sender(socks[name], sent[name], shut_wr=name == "A")
                   for name in sent}
        for name in sent:   # the server has taken both (or stopped taking them) and sleeps
            settle(server, senders[name], what)
        own_echo(server, socks, "B", sent["B"], sent, f"{what}; B read its echo first")
        socks["B"].sendall(b"and once more\n")
        own_echo(server, socks, "B", b"and once more\n", sent,
                 f"{what}; B got its echo, then sent once more")
        own_echo(server, socks, "A", sent["A"], sent, f"{what}; A read its echo last")
    finally:
        for sock in socks.values():
            sock.close()


def test_more_than_1024_connections_each_get_their_own_echo(server: Server) -> None:
    """MANY connections open at once: the server's descriptors go past 1023, where a table
    of 1024 connections indexed by descriptor ends, and select()'s fd_set too."""
    soft, hard = raise_nofile(NOFILE)
    if min(soft, server.nofile()) < MANY + 64:
        pytest.fail(
            f"this machine lets the verification open {soft} files and the server "
            f"{server.nofile()} (hard limit {hard}, which the verification may not raise): "
            f"{MANY} connections at once need {MANY + 64} on each side\nNot your server's "
            "fault: raise the hard limit on open files (ulimit -Hn, LimitNOFILE=) for the "
            "user running labrunner.", pytrace=False)
    what = f"{MANY} connections open at once"

    def lost(seen: str) -> str:
        if server.exiting():   # its connections reset as it exits: its report is coming
            server.proc.wait(DEADLINE)
        if server.exited() is None:
            held, top = server.fds(), server.highest_fd()
            return (
                f"{what}: {seen}, the server holding {held} descriptors, the highest {top}"
                + (": it drops connections past 1024 (a fixed table of 1024 connections)"
                   if top < 1024 or held < 1024 + 16 else "")
                + "\n" + table_of_1024(server))
        time.sleep(0.05)   # the drain thread's last lines
        report = [line for line in server.stderr.decode(errors="replace").splitlines()
                  if re.search(r"ERROR: AddressSanitizer|runtime error|is located|SUMMARY|"
                               r"overflow detected", line)]
        culprit = ("select()'s fd_set, FD_SETSIZE 1024" if re.search(
            r"fd_mask|fd_set|fdelt", " ".join(report)) else "a fixed table of 1024 connections")
        return (f"{what}: the server crashed (exit status {server.proc.returncode}) once its "
                f"descriptors went past 1023 ({culprit}): {seen}\n{table_of_1024(server)}\n"
                + ("\n".join(report) or server.stderr.decode(errors="replace")[-1200:]))

    socks: list[socket.socket] = []
    try:
        refused: OSError | None = None
        while len(socks) < MANY and refused is None:
            try:
                socks.append(socket.create_connection(("127.0.0.1", server.port)))
            except OSError as exc:
                refused = exc
        if refused is not None:
            if server.exited() is None and not server.exiting():
                raise refused
            pytest.fail(lost(f"connection {len(socks)} could not connect ({refused})"),
                        pytrace=False)
        messages = [f"connection {i} of {MANY}\n".encode() for i in range(MANY)]
        for sock, message in zip(socks, messages, strict=True):
            sock.sendall(message)
        pump(server, socks, messages, what, lost=lost)
        top = server.highest_fd()
        assert top >= 1024, (
            f"{what}, each echoed: the server's highest descriptor is {top}, expected "
            f"{MANY} connections to hold descriptors past 1023 at once\nAn echo server "
            "keeps each connection open until its client closes it.")
    finally:
        for sock in socks:
            sock.close()


def table_of_1024(server: Server) -> str:
    return (
        "A descriptor is the lowest number free, up to the limit on open files (the "
        f"verification gave the server {server.limit}), so more than 1024 connections at "
        "once get descriptors of 1024 and above. A fixed table of 1024 connections "
        "(conns[1024], the fd used as index into a fixed array) overflows or refuses there, "
        "and so does select()'s fd_set (FD_SETSIZE is 1024: FD_SET, FD_ISSET on a higher "
        "descriptor is undefined behaviour). Size the table dynamically: grow it (realloc) "
        "when a descriptor does not fit, or key it by a map; and watch descriptors with "
        "epoll only, which has no such bound.")


def test_connections_queued_while_out_of_descriptors_are_accepted_later(
        learner: Any, binary: Path) -> None:
    """The server's limit on open files is LOW_NOFILE: QUEUED more clients than it can hold
    connect at once, so accept4() fails with EMFILE and they wait in the listen queue. Once
    the accepted ones close, the queued ones must be accepted and echoed."""
    server = Server(learner, binary, nofile=LOW_NOFILE)
    socks: list[socket.socket] = []
    try:
        room = LOW_NOFILE - server.fds()
        total = room + QUEUED
        for _ in range(total):
            try:
                socks.append(socket.create_connection(("127.0.0.1", server.port)))
            except OSError:   # refused: the server exiting?
                exit_after_broken_connection(server, total)
                raise
        lines = [f"connection {i}\n".encode() for i in range(total)]
        for sock, line in zip(socks, lines, strict=True):
            try:
                sock.sendall(line)
            except OSError:   # reset: the server exiting?
                exit_after_broken_connection(server, total)
                raise
        echoed = echoed_or_queued(server, socks, lines)
        waits_while_full(server, server.queues()[1])
        for i in echoed:
            socks[i].close()      # descriptors free again on the server's side
        rest = [i for i in range(total) if i not in echoed]
        why = f"""the server's limit on open files is {LOW_NOFILE}: {total} clients connected \
at once, it accepted {len(echoed)}, and accept4() failed (EMFILE) for the other \
{len(rest)}, which waited in its listen queue; then the {len(echoed)} closed, freeing \
their descriptors"""
        stalled, deadline = 0, time.monotonic() + DEADLINE
        while server.queues()[1] and time.monotonic() < deadline:
            if server.exited():
                pytest.fail(f"{why}, and {server.exited()}", pytrace=False)
            stalled = stalled + 1 if server.asleep_in() in EPOLL_WAIT else 0
            if stalled >= STALLED:
                pytest.fail(
                    f"{why}: the server now sleeps in epoll_wait() with "
                    f"{server.queues()[1]} connections still in its listen queue, never "
                    "accepted\nWith EPOLLET on the listening socket an event comes once per "
                    "NEW connection: an accept loop that stops on an error other than EAGAIN "
                    "(EMFILE, ENFILE, ENOBUFS, ENOMEM) leaves the queue undrained with no edge "
                    "to wake it. Keep the listening socket level-triggered (epoll reports the "
                    "non-empty queue again), or retry the accept once a descriptor is freed; "
                    "never stop listening for good on such an error.", pytrace=False)
            time.sleep(0.025)
        pump(server, [socks[i] for i in rest], [lines[i] for i in rest],
             f"{why}; the queued connections then waited for their echo")
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def waits_while_full(server: Server, queued: int) -> None:
    """Out of descriptors, with connections queued and every accepted one echoed, nothing
    can happen until a client leaves: a server seen asleep all along between two readings
    waits as it should; one that burns BUSY_CPU s of CPU without once being seen so is
    spinning (a level-triggered listener reports the queue again at once, accept4 fails
    with EMFILE again, and again). Neither within DEADLINE: nothing is decided."""
    burnt = cpu_burnt_while_idle(lambda: server.read(process_activity), BUSY_CPU, DEADLINE)
    if burnt is not None:
        pytest.fail(
            f"the server's limit on open files is {LOW_NOFILE}: it holds as many, every "
            f"client it accepted has its echo and {queued} wait in its listen queue, so "
            f"nothing can happen until one leaves - yet it used {burnt:.1f} s of CPU and "
            "was never seen asleep: a busy loop\nA level-triggered listener reports the "
            "non-empty queue again at once, and accept4() fails with EMFILE again, and "
            "again (with a perror each time). Stop watching the listener while out of "
            "descriptors (EPOLL_CTL_MOD with no events, or EPOLL_CTL_DEL) and watch it "
            "again once you close a connection.", pytrace=False)


def exit_after_broken_connection(server: Server, clients: int) -> None:
    """A connection refused, reset or closed: the server may be exiting, out of descriptors.
    It gets up to 5 s to end; if it did, the test fails naming that exit."""
    try:
        server.proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    out_of_descriptors_exit(server, clients)


def out_of_descriptors_exit(server: Server, clients: int) -> None:
    gone = server.exited()
    if gone:
        pytest.fail(
            f"the server's limit on open files is {LOW_NOFILE}; {clients} clients connected "
            f"at once and {gone}\nRunning out of descriptors (accept4() failing with EMFILE "
            "or ENFILE) is transient: leave the connection in the queue, keep serving the "
            "others, and accept it once a descriptor is free - never exit or stop listening "
            "on it.", pytrace=False)


def spinning(server: Server, clients: int, echoed: int, burnt: float) -> None:
    unread, queued = server.queues()
    full = server.fds() >= LOW_NOFILE
    pytest.fail(
        f"{clients} clients connected at once to a server allowed {LOW_NOFILE} open files: "
        f"it holds {server.fds()} descriptors, {queued} connections wait in its listen "
        f"queue and {unread} bytes sit unread in its sockets, {echoed} clients echoed - and "
        f"it used {burnt:.1f} s of CPU without an echo coming back or once being seen "
        "asleep: a busy loop\n"
        + ("Out of descriptors, accept4() fails with EMFILE, and a level-triggered listener "
           "reports the non-empty queue again at once: accept, EMFILE, again and again, "
           "while the connections already accepted wait for their echo. Stop watching the "
           "listener while out of descriptors (EPOLL_CTL_MOD with no events, or "
           "EPOLL_CTL_DEL) and watch it again once you close a connection; read and echo "
           "what the accepted connections sent." if full else
           "Wait in epoll_wait() for what is ready, read each ready connection until "
           "EAGAIN and echo what it sent."), pytrace=False)


def echoed_or_queued(server: Server, socks: list[socket.socket],
                     lines: list[bytes]) -> set[int]:
    """Read echoes until every connection is echoed or waits in the listen queue (the server
    out of descriptors); returns the echoed ones. A server that burns BUSY_CPU s of CPU
    without an echo coming back or once being seen asleep spins (out of descriptors, a
    level-triggered listener reported again and again): failed when seen."""
    got = [b""] * len(socks)
    echoed: set[int] = set()
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        sel.register(sock, selectors.EVENT_READ, i)
    stalled, deadline = 0, time.monotonic() + DEADLINE
    last = server.read(process_activity)
    spun_from = last[1]    # CPU time when an echo last came, or the server was seen asleep
    try:
        # In this order: once the server is full (no more accepts), the queue it leaves is
        # final, and every connection not in it must have been echoed.
        while not (server.fds() >= LOW_NOFILE
                   and len(echoed) + server.queues()[1] >= len(socks)):
            out_of_descriptors_exit(server, len(socks))
            if time.monotonic() > deadline:
                pytest.fail(f"{len(socks)} clients connected to a server allowed {LOW_NOFILE} "
                            f"open files: after {DEADLINE:.0f} s {len(echoed)} were echoed and "
                            f"{server.queues()[1]} queued, the rest neither", pytrace=False)
            ready = sel.select(timeout=0.025)
            why = None if ready else diagnose(
                server, f"{len(socks)} clients connected at once to a server allowed "
                f"{LOW_NOFILE} open files, {len(echoed)} echoed so far")
            stalled = stalled + 1 if why else 0
            if stalled >= STALLED:
                # stalled counts passes in a row with a diagnosis: why is one here
                pytest.fail(cast(str, why), pytrace=False)
            now = server.read(process_activity)
            if ready or now[0] == -1 or asleep_throughout(last, now):
                spun_from = now[1]
            last = now
            if (now[1] - spun_from) / 1e9 > BUSY_CPU:
                spinning(server, len(socks), len(echoed), (now[1] - spun_from) / 1e9)
            for key, _ in ready:
                i = key.data
                try:
                    chunk = socks[i].recv(4096)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    if server.exiting():   # its connections closed as it exits
                        exit_after_broken_connection(server, len(socks))
                    out_of_descriptors_exit(server, len(socks))
                    pytest.fail(f"connection {i} was closed by the server before its echo "
                                f"(the server's limit on open files is {LOW_NOFILE}, "
                                f"{len(socks)} clients connected at once)", pytrace=False)
                got[i] += chunk
                if len(got[i]) >= len(lines[i]):
                    echoed.add(i)
                    sel.unregister(socks[i])
    finally:
        sel.close()
    return echoed
