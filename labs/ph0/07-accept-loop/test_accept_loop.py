"""Verification for ph0.7: the learner's C accept loop, built with make (-Wall -Wextra
-Werror, AddressSanitizer + UndefinedBehaviorSanitizer) and run as a real process:
concurrent clients over loopback TCP, a restart on the same port while the previous
run's connections sit in TIME_WAIT, SIGTERM, and no sanitizer report on stderr.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labrunner.testing import (
    CLOSE_WAIT,
    Activity,
    asleep_throughout,
    connection_socket,
    listening_ports,
    process_activity,
    process_address_space,
    process_resources,
    program_reading,
)

READY = 3.0      # seconds for the server to print "listening on <port>"
SILENT = 1.0     # seconds a server listening, asleep (in accept) and silent has printed nothing
WAIT = 3.0       # seconds for an echo, or for the process to exit after SIGTERM
STREAM_WAIT = 20.0  # upper bound for a short-write echo to end (EOF ends it long before)
CLIENTS = 50
FINISHED = 40    # connections served one after another in the thread-stack test
THREADS_DONE = 20.0  # seconds for the threads of finished connections to return
KEPT_PER_FINISHED = 256  # KiB of address space each may leave mapped (a stack is 8 MiB)
BUSY_CPU = 1.0   # CPU seconds a server with nothing to do may burn, never seen asleep
# Nor is it a busy loop once it has used less than this share of one CPU over at least
# IDLE_SPAN s: a server that waits a little between two tries (a backoff) is seldom seen
# asleep across a whole reading interval, but uses next to no CPU. (Below BUSY_CPU within
# STREAM_WAIT, a 5 % share, a loop is never caught anyway: this lets none go that would be.)
IDLE_SHARE = 0.025
IDLE_SPAN = 2.0
FD_LIMIT = 32    # RLIMIT_NOFILE of the server that runs out of descriptors
SANITIZER_REPORT = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:")
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    # glibc keeps up to 40 MiB of finished threads' stacks mapped for reuse: connections
    # that overlap (a loaded machine) would leave a correct server's address space grown.
    # Without the cache a detached thread's stack goes when it ends; a thread that is never
    # joined or detached keeps its own either way.
    "GLIBC_TUNABLES": "glibc.pthread.stack_cache_size=0",
}


# ---------------------------------------------------------------------------- the binary


@pytest.fixture
def binary(learner: Any) -> Path:
    """Built with the c_examples Makefile (once per session: learner.build() keeps it)."""
    return learner.build() / "accept_loop"  # type: ignore[no-any-return]


@pytest.fixture
def short_writes_binary(binary: Path) -> Path:
    """The same server.c linked with c_examples/accept_loop/short_writes.c (ld --wrap):
    each send(), sendto() or write() on a socket writes at most half of what it is asked."""
    return binary.parent / "accept_loop_short_writes"


@dataclass
class Server:
    """One run of the learner's server process."""

    proc: subprocess.Popen[bytes]
    port: int = 0
    stderr: bytearray = field(default_factory=bytearray)
    stdout: bytearray = field(default_factory=bytearray)
    learner: Any = None

    def read(self, helper: Any) -> Any:
        """A /proc reading of the server process: here when the test can see it, else
        beside the learner's program (grading runs it as another user)."""
        return program_reading(self.learner, self.proc, helper)

    def descriptors(self) -> int:
        return int(self.read(process_resources)[1])

    def threads(self) -> int:
        return int(self.read(process_resources)[0])

    def __post_init__(self) -> None:
        self._lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True),
                         daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False),
                         daemon=True).start()

    def _pump(self, stream: Any, sink: bytearray, watch: bool) -> None:
        """Drain a pipe (a full pipe would block the server) and spot the ready line."""
        for line in iter(stream.readline, b""):
            sink += line
            if watch and (m := re.match(rb"listening on (\d+)", line)):
                self.port = int(m.group(1))
                self._ready.set()

    def wait_ready(self, what: str) -> None:
        deadline = time.monotonic() + READY
        asleep, silent = Sleep(self), False
        while not silent and time.monotonic() < deadline:
            if self._ready.wait(0.05):
                return
            # Past listen() and asleep (in accept()): it prints nothing until a client comes,
            # and the test needs the port to be one.
            silent = asleep.for_at_least(SILENT) and bool(self.read(listening_ports)) \
                and not self._ready.wait(0.1)
            if self.proc.poll() is not None:
                time.sleep(0.05)  # let the pumps collect the last output
                pytest.fail(
                    f"{what}: the server exited with status {self.proc.returncode} before "
                    f"listening\nstderr: {self.stderr.decode(errors='replace').strip()[-600:]}",
                    pytrace=False)
        seen = (f"listens on {self.read(listening_ports)} and sleeps (in accept()), but "
                "printed no 'listening on <port>'" if silent else
                f"did not print 'listening on <port>' within {READY:.0f} s")
        pytest.fail(f"{what}: the server {seen}\nAfter listen(), print the bound port "
                    "(getsockname) to stdout and fflush(stdout): the test needs to know where "
                    "to connect.", pytrace=False)

    def asleep(self) -> Activity:
        return self.read(process_activity)  # type: ignore[no-any-return]

    def printed_ready(self, timeout: float) -> bool:
        """Whether it has printed 'listening on <port>' (waiting up to ``timeout`` s)."""
        return self._ready.wait(timeout)

    def terminate(self) -> int | None:
        """SIGTERM, then wait; None if the process is still running after WAIT."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def sanitizer_report(self) -> str | None:
        text = self.stderr.decode(errors="replace")
        match = SANITIZER_REPORT.search(text)
        return text[max(0, match.start() - 200):][:1500] if match else None


class Sleep:
    """Whether a process has slept, every thread of it, with no CPU time used, for a while:
    readings of it taken as often as :meth:`for_at_least` is asked."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.first: Activity | None = None
        self.since = time.monotonic()

    def for_at_least(self, span: float) -> bool:
        now = self.server.asleep()
        if now[0] == -1:
            return False
        if self.first is None or not asleep_throughout(self.first, now):
            self.first, self.since = now, time.monotonic()
            return False
        return time.monotonic() - self.since >= span


def launcher(binary: Path, learner: Any) -> Iterator[Any]:
    started: list[Server] = []

    def start(port: int = 0, what: str = "starting the server",
              descriptors: int | None = None) -> Server:
        # descriptors: the process's RLIMIT_NOFILE (prlimit execs the binary: same pid).
        limit = ["prlimit", f"--nofile={descriptors}:{descriptors}", "--"] \
            if descriptors else []
        # learner.popen: when grading, the learner's binary runs as the learner's uid.
        proc = learner.popen([*limit, str(binary), str(port)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, **SANITIZER_ENV})
        server = Server(proc, learner=learner)
        started.append(server)
        server.wait_ready(what)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def launch(binary: Path, learner: Any) -> Iterator[Any]:
    yield from launcher(binary, learner)


@pytest.fixture
def launch_short_writes(short_writes_binary: Path, learner: Any) -> Iterator[Any]:
    yield from launcher(short_writes_binary, learner)


@pytest.fixture
def launch_thread_refused(binary: Path, learner: Any) -> Iterator[Any]:
    """The same server.c linked with c_examples/accept_loop/thread_refused.c (ld --wrap):
    every other pthread_create() of a thread that has accepted a connection fails (EAGAIN)."""
    yield from launcher(binary.parent / "accept_loop_thread_refused", learner)


# ---------------------------------------------------------------------------- helpers


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def recv_exactly(sock: socket.socket, size: int, deadline: float | None = None) -> bytes:
    """Up to ``size`` bytes; fewer if the peer closes, resets, or ``deadline`` passes."""
    deadline = deadline or time.monotonic() + WAIT
    data = bytearray()
    while len(data) < size and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(size - len(data))
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def echo_once(port: int, message: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(message)
        return recv_exactly(sock, len(message))


def stop_cleanly(server: Server) -> None:
    """SIGTERM must end the process with status 0 and no sanitizer report."""
    status = server.terminate()
    if status is None:
        server.kill()
        pytest.fail(f"the server was still running {WAIT:.0f} s after SIGTERM\nInstall a "
                    "SIGTERM handler that sets a flag, with sigaction() and without "
                    "SA_RESTART so that a blocked accept() returns -1/EINTR; then leave the "
                    "loop and return 0. A signal that lands while the loop is not blocked in "
                    "accept() (or in another thread) is only noticed at the next connection: "
                    "ppoll()/pselect() with the signal blocked elsewhere closes that window.",
                    pytrace=False)
    report = server.sanitizer_report()
    assert report is None, f"the sanitizers reported an error:\n{report}"
    assert status == 0, (
        f"after SIGTERM the server exited with status {status}, expected 0"
        + ("\nNegative means killed by the signal: the default action of SIGTERM ends the "
           "process abruptly. Handle it and return from main()." if status < 0 else
           f"\nstderr: {server.stderr.decode(errors='replace').strip()[-400:]}"))


def bind_needs_reuseaddr(port: int) -> bool:
    """Does bind() to ``port`` (any address, as the server binds) without SO_REUSEADDR fail
    with EADDRINUSE now - a connection on the port (in TIME_WAIT once both ends have closed)
    holds it? Asked of the kernel directly (a probe socket, bound and closed at once: it
    never listens, so it leaves nothing behind), not by reading the whole socket table."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


# ---------------------------------------------------------------------------- the tests


def test_echoes_fifty_concurrent_clients(launch: Any) -> None:
    server = launch()
    clients = [connect(server.port) for _ in range(CLIENTS)]  # all open at once
    try:
        messages = [f"client {n:02d} ".encode() * (1 + n * 37) for n in range(CLIENTS)]
        for sock, message in zip(clients, messages, strict=True):
            sock.sendall(message)
        deadline = time.monotonic() + WAIT  # one deadline for all: a serial server fails fast
        echoed = [recv_exactly(sock, len(msg), deadline)
                  for sock, msg in zip(clients, messages, strict=True)]
        threads = server.threads()  # while all 50 connections are still open
    finally:
        for sock in clients:
            sock.close()
    good = sum(got == want for got, want in zip(echoed, messages, strict=True))
    silent = sum(not got for got in echoed)
    cut = CLIENTS - good - silent
    mixed = [n for n, got in enumerate(echoed) if others_in(got, n)]
    assert not mixed, (
        f"{len(mixed)} of {CLIENTS} concurrent clients got bytes of another client's message "
        f"in their echo (client {mixed[0]:02d} got {echoed[mixed[0]][:60]!r}...)\n"
        f"{SHARED_BUFFER_ADVICE}")
    if silent and threads > CLIENTS // 2:
        advice = (f"The server ran {threads} threads for the {CLIENTS} open connections, yet "
                  f"{silent} clients were never answered: the threads exist but do not serve "
                  "their own connection. A thread that reads its descriptor through a pointer "
                  "to the accept loop's variable (&client) gets whichever connection was "
                  "accepted LAST, so several threads share one descriptor and others are never "
                  "read: pass the descriptor by value, pthread_create(..., (void *)(intptr_t)"
                  "client).")
    elif silent:
        advice = ("With all clients connected at once, a loop that serves one connection to "
                  "the end before accepting the next leaves the others waiting: hand each "
                  "accepted connection to its own thread (pthread_create).")
    else:
        advice = ("Echo in a loop until recv() returns 0: one recv() returns whatever has "
                  "arrived so far, not the whole message.")
    shared = silent and threads > CLIENTS // 2
    assert good == CLIENTS, (
        (f"{silent} of {CLIENTS} concurrent clients got nothing back although the server ran "
         f"{threads} threads for them: the threads do not each serve their own connection "
         f"(a descriptor handed over as &client?)\n{advice}") if shared else
        f"{good} of {CLIENTS} concurrent clients got their bytes echoed back, expected all "
        f"({silent} got nothing, {cut} only part)\n{advice}")
    stop_cleanly(server)


# What a server whose connections' threads share one buffer is told.
SHARED_BUFFER_ADVICE = (
    "The connections' threads share one buffer (a static or global array?): a recv() on one "
    "connection overwrites bytes another connection's thread has not sent yet. Give each "
    "connection its own buffer: a local array in the thread's function, or one malloc'd per "
    "connection.")


def others_in(got: bytes, n: int) -> bool:
    """Whether client ``n``'s echo holds another client's tag ('client NN ')."""
    return any(int(tag) != n for tag in re.findall(rb"client (\d\d) ", got))


def cut_at_zero(got: bytes, sent: bytes) -> bool:
    """Whether an echo is short of what was sent and its zero bytes are what went missing:
    what a server that treats the bytes as a C string (strlen, printf "%s") sends back:
    cut just before a zero byte, or several KiB of random bytes without a single zero (an
    echo cut short for another reason holds them as often as what was sent)."""
    return 0 < len(got) < len(sent) and (
        got == sent[:len(got)] and sent[len(got)] == 0
        or len(got) >= 4096 and 0 not in got and sent.count(0) > len(sent) // 1024)


TEXT_ADVICE = (
    "TCP carries bytes, not text: strlen(), strcpy() and printf(\"%s\") stop at the first "
    "zero byte. Echo exactly the n bytes recv() returned, whatever their values.")


def test_echoes_every_byte_value(launch: Any) -> None:
    """A message with a zero byte in it, and every other byte value: an echo server passes
    bytes through, whatever they are; one that handles them as a C string cuts them."""
    server = launch()
    message = b"a zero byte:\x00, then every byte value: " + bytes(range(256)) * 4
    with connect(server.port) as sock:
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)  # our FIN: the server closes once it has echoed all
        got = recv_exactly(sock, len(message) + 1)
    if cut_at_zero(got, message):
        pytest.fail(
            f"a {len(message)}-byte message holding zero bytes came back with {len(got)} "
            f"bytes, cut where a zero byte was ({got[-20:]!r} were the last); expected every "
            f"byte back\n{TEXT_ADVICE}", pytrace=False)
    assert got == message, (
        f"a {len(message)}-byte message holding every byte value (0 to 255) came back as "
        f"{len(got)} bytes{' (different content)' if len(got) == len(message) else ''}, "
        "expected it unchanged: an echo server passes bytes through as they are")
    stop_cleanly(server)


def test_echoes_a_large_stream_completely(launch: Any) -> None:
    server = launch()
    payload = os.urandom(1 << 20)  # 1 MiB: many recv()/send() rounds on the server
    with connect(server.port) as sock:
        # Send from a thread while reading here: the echo flows back while we write.
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = recv_exactly(sock, len(payload))
        sender.join(WAIT)
    assert not cut_at_zero(got, payload), (
        f"a 1 MiB stream of random bytes came back with {len(got)} bytes, its zero bytes "
        f"and what follows them missing; expected all of it, unchanged\n{TEXT_ADVICE}")
    assert got == payload, (
        f"a 1 MiB stream came back with {len(got)} bytes"
        f"{' (different content)' if len(got) == len(payload) else ''}, expected all of "
        "it, unchanged\nEcho in a loop until recv() returns 0, and send every byte each "
        "recv() returned (send() may write less than asked).")
    stop_cleanly(server)


def test_short_writes_are_completed(launch_short_writes: Any) -> None:
    """send() may write fewer bytes than asked (a signal after some bytes went out, a send
    timeout, a full buffer on a non-blocking socket). This build makes every send() on a
    socket write at most half of what it is asked: only a server that loops on the count
    it returns, from where the last call stopped, echoes the stream intact."""
    server = launch_short_writes()
    payload = os.urandom(1 << 18)
    with connect(server.port) as sock:
        def send_then_finish() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # our FIN: the server closes after the echo
        sender = threading.Thread(target=send_then_finish, daemon=True)
        sender.start()
        got = recv_exactly(sock, len(payload) + 1, time.monotonic() + STREAM_WAIT)
        sender.join(WAIT)
    if got != payload:
        common = min(len(got), len(payload))
        differ = next((i for i in range(common) if got[i] != payload[i]), common)
        if len(got) < len(payload) and got == payload[:len(got)]:
            seen = f"stopped after {len(got)} of {len(payload)} bytes"
        else:
            seen = (f"came back with {len(got)} bytes, differing from what was sent from "
                    f"byte {differ} on")
        pytest.fail(
            f"with send() writing only part of what it is asked (this build makes every "
            f"send()/write() on a socket write at most half), a {len(payload) >> 10} KiB "
            f"echo {seen}; expected every byte back, in order\nsend() returns how many bytes "
            "it wrote, and that may be fewer than you asked (a signal, a send timeout, a "
            "full buffer): loop until all n bytes are out, each call starting where the "
            "last one stopped: send(fd, buf + sent, n - sent, MSG_NOSIGNAL).", pytrace=False)
    stop_cleanly(server)


def test_sigterm_exits_zero_without_sanitizer_reports(launch: Any) -> None:
    server = launch()
    assert echo_once(server.port, b"finished connection\n") == b"finished connection\n", (
        "the server did not echo a single message back")
    idle = connect(server.port)  # a connection still open when SIGTERM arrives
    idle.sendall(b"still here\n")
    assert recv_exactly(idle, 11) == b"still here\n", "the second connection was not echoed"
    try:
        stop_cleanly(server)
    finally:
        idle.close()


@pytest.fixture
def launch_signal_before_wait(binary: Path, learner: Any) -> Iterator[Any]:
    """The same server.c linked with c_examples/accept_loop/signal_before_wait.c: once a
    thread has accepted a connection, its next accept()/poll()/ppoll()/select()/pselect()/
    epoll_wait()/epoll_pwait() first sends the process SIGTERM (once), and says so on stderr."""
    yield from launcher(binary.parent / "accept_loop_signal_before_wait", learner)


SENT_BEFORE = re.compile(rb"signal_before_wait: SIGTERM sent before (\w+)\(\)")


def test_a_sigterm_as_the_loop_goes_back_to_wait_stops_it(
        launch_signal_before_wait: Any) -> None:
    """A supervisor's SIGTERM may land at any moment: also after the loop has checked its
    stop flag and before it sleeps again in accept(). This build sends it there, once one
    client has been accepted. A handler that only sets the flag then runs too late for
    that check, and a plain accept() sleeps on until the next client: the one SIGTERM is
    lost. Keeping the signal blocked outside the wait (ppoll/pselect with a mask), or
    waking the wait from the handler (self-pipe, signalfd), stops the server at once."""
    server = launch_signal_before_wait()
    # One client, accepted; its echo may or may not come before the stop ends the process.
    client = connect(server.port)
    try:
        server.proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        client.close()
    sent = SENT_BEFORE.search(bytes(server.stderr))
    if sent and server.proc.poll() is None:
        server.kill()
        call = sent.group(1).decode()
        pytest.fail(
            f"a SIGTERM that arrived as the loop went back to wait for the next client "
            f"(after it accepted one, right before its {call}()) did not stop the server: "
            f"still running {WAIT:.0f} s later; expected it to exit with status 0\nThe "
            f"handler set the flag after the loop had checked it, and {call}() then slept "
            "on until the next client: a supervisor's one SIGTERM is lost, and it kills the "
            "server later, mid-request. Keep SIGTERM blocked (pthread_sigmask) and unblock it "
            "only inside the wait, atomically: ppoll() or pselect() on the listening socket "
            "with the mask that unblocks it, then accept() the connection it reports; or make "
            "the handler wake the wait (a self-pipe polled beside the listening socket, or "
            "signalfd).", pytrace=False)
    # Exited (stop_cleanly checks how), or never went back to one of those waits after
    # accepting, so nothing was sent: then a SIGTERM of the test's own.
    stop_cleanly(server)


def test_reset_connections_are_closed(launch: Any) -> None:
    """Clients that end with a reset (RST: SO_LINGER 0) instead of a FIN: recv() fails with
    ECONNRESET, and the connection's descriptor must be closed on that path too."""
    server = launch()
    before = server.descriptors()  # listening, no connection yet
    assert echo_once(server.port, b"warm-up\n") == b"warm-up\n", "the server did not echo"
    deadline = time.monotonic() + WAIT
    while server.descriptors() > before and time.monotonic() < deadline:
        time.sleep(0.02)  # the warm-up connection's close (a FIN) may still be on its way
    resets = 5
    clients = [connect(server.port) for _ in range(resets)]
    for n, sock in enumerate(clients):
        sock.sendall(b"reset me %d\n" % n)
        assert recv_exactly(sock, 11) == b"reset me %d\n" % n, "the server did not echo"
    for sock in clients:  # SO_LINGER with a zero timeout: close() sends RST, not FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    deadline = time.monotonic() + WAIT
    while (held := server.descriptors() - before) > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held <= 0, (
        f"{resets} clients reset their connections (RST) and {held} of their descriptors are "
        f"still open in the server {WAIT:.0f} s later: when recv() fails (-1, ECONNRESET) the "
        "connection is over as surely as when it returns 0 - close(fd) on every way out of "
        "the echo loop, or each reset leaks a descriptor until accept() fails with EMFILE")
    stop_cleanly(server)


def threads_back_to(server: Server, baseline: int) -> int:
    """The server's thread count, read until it is back to ``baseline`` (every connection's
    thread has returned) or THREADS_DONE has passed (a loaded machine may take a while to
    run forty threads to their end; a correct server is seen back at once)."""
    deadline = time.monotonic() + THREADS_DONE
    while (threads := server.threads()) > baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    return threads


def test_finished_connections_leave_no_stack_behind(launch: Any) -> None:
    """Forty connections one after another, each echoed and closed - every other one by a
    reset (RST), the error way out of the echo loop. Once their threads have returned
    (/proc lists no more threads than before), the server's address space must be what it
    was: a thread neither detached nor joined keeps its stack (8 MiB by default) mapped
    after it returns, until a pthread_join that never comes - a leak that the thread count
    never shows, and that ends in pthread_create failing with EAGAIN."""
    server = launch()
    baseline = server.threads()  # listening, no connection yet
    assert echo_once(server.port, b"warm-up\n") == b"warm-up\n", "the server did not echo"
    threads_back_to(server, baseline)  # the first stack may be made now, and reused later
    before = int(server.read(process_address_space))
    for n in range(FINISHED):
        with connect(server.port) as sock:
            message = b"connection %02d\n" % n
            sock.sendall(message)
            assert recv_exactly(sock, len(message)) == message, "the server did not echo"
            if n % 2:  # SO_LINGER with a zero timeout: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    threads = threads_back_to(server, baseline)
    grown = int(server.read(process_address_space)) - before
    assert threads <= baseline, (
        f"{FINISHED} clients closed their connections and {THREADS_DONE:.0f} s later the server "
        f"still runs {threads - baseline} threads more than before them: a connection's "
        "thread must return once recv() says the client is gone (0 for a FIN, -1 for a "
        "reset)")
    assert grown <= FINISHED * KEPT_PER_FINISHED, (
        f"{FINISHED} connections were served one after another and closed (half of them by "
        f"a reset), and their threads have returned; meanwhile the server's address space "
        f"grew by {grown / 1024:.0f} MiB ({grown // FINISHED} KiB per connection, allowed "
        f"{KEPT_PER_FINISHED}): the finished threads' stacks are still mapped. A thread "
        "that is neither detached nor joined keeps its stack after it returns, until "
        "pthread_join - one stack leaked per connection, until pthread_create fails with "
        "EAGAIN. Create the threads detached (pthread_attr_setdetachstate "
        "PTHREAD_CREATE_DETACHED, passed to pthread_create) or call "
        "pthread_detach(pthread_self()) first thing in the thread, so that every way out "
        "of it is covered")
    stop_cleanly(server)


def _exit_note(server: Server) -> str:
    """'the server exited with status N (stderr ...)' once it has, else ''."""
    try:
        status = server.proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        return ""
    tail = server.stderr.decode(errors="replace").strip()[-300:]
    return f"the server exited with status {status} (stderr ends: {tail!r})"


def busy_cpu(read: Callable[[], Activity], limit: float, within: float,
             every: float = 0.2) -> float | None:
    """:func:`cpu_burnt_while_idle` (the CPU seconds burnt once more than ``limit`` without
    the server's being seen asleep between two readings; None once it is seen so, or after
    ``within`` s undecided), that also ends, with None, for a server that has used less than
    IDLE_SHARE of one CPU over IDLE_SPAN s or more: one that waits a little between two tries
    (a backoff) is seldom asleep across a whole reading interval, yet no busy loop."""
    first = last = read()
    start = time.monotonic()
    while time.monotonic() - start < within:
        time.sleep(every)
        now = read()
        if now[0] == -1 or asleep_throughout(last, now):
            return None
        burnt = (now[1] - first[1]) / 1e9
        if burnt > limit:
            return burnt
        spent = time.monotonic() - start
        if spent >= IDLE_SPAN and burnt < IDLE_SHARE * spent:
            return None
        last = now
    return None


def waits_while_full(server: Server, clients: int) -> None:
    """At its limit of descriptors, with clients queued, the server can do nothing until one
    leaves: seen asleep all along between two readings, it waits as it should; BUSY_CPU s
    of CPU burnt without once being seen so is a busy loop (ppoll reports the queued
    connection again at once, accept fails with EMFILE again, and again); next to no CPU
    used over IDLE_SPAN s is a backoff between tries. None of these within STREAM_WAIT:
    nothing is decided."""
    burnt = busy_cpu(lambda: server.read(process_activity), BUSY_CPU, STREAM_WAIT)
    if burnt is not None and server.proc.poll() is None:
        pytest.fail(
            f"with RLIMIT_NOFILE {FD_LIMIT} and {clients} clients, the server holds all "
            "the descriptors it may and clients wait in its queue: nothing can happen "
            f"until one leaves, yet it used {burnt:.1f} s of CPU and was never seen "
            "asleep - a busy loop\npoll() reports the queued connection again at once "
            "and accept() fails with EMFILE again, and again (with a perror each time). "
            "After such an error, wait a little (a short sleep or poll timeout) before "
            "accepting again.", pytrace=False)


def test_running_out_of_descriptors_costs_no_connection(launch: Any) -> None:
    """With RLIMIT_NOFILE 32 and more clients than that, accept() fails with EMFILE: that
    concerns the pending connection, not the listening socket. The server must keep its
    open connections and accept the waiting ones once descriptors are free again."""
    server = launch(descriptors=FD_LIMIT)
    steady = connect(server.port)
    crowd: list[socket.socket] = []
    try:
        steady.sendall(b"steady 1\n")
        assert recv_exactly(steady, 9) == b"steady 1\n", "the server did not echo"
        for _ in range(FD_LIMIT + 8):  # more clients than it can hold
            try:
                crowd.append(connect(server.port))
            except OSError:   # refused: the server is gone already
                break
        for n, sock in enumerate(crowd):
            try:
                sock.sendall(b"crowd %02d\n" % n)
            except OSError:   # the server is gone already: the message below says so
                pass
        deadline = time.monotonic() + 10 * WAIT  # until its descriptors run out (or it exits)
        while server.proc.poll() is None and time.monotonic() < deadline:
            if server.descriptors() >= FD_LIMIT:
                break
            time.sleep(0.02)
        if server.proc.poll() is None:
            waits_while_full(server, len(crowd) + 1)
        half = len(crowd) // 2
        for sock in crowd[:half]:  # their descriptors free up: the waiting ones fit now
            sock.close()
        try:
            steady.sendall(b"steady 2\n")
            kept = recv_exactly(steady, 9) == b"steady 2\n"
        except OSError:   # the server is gone: its end reset the connection
            kept = False
        lost = [] if kept else ["the client connected all along"]
        deadline = time.monotonic() + 3 * WAIT
        lost += [f"crowd {n:02d}" for n, sock in enumerate(crowd[half:], half)
                 if recv_exactly(sock, 9, deadline) != b"crowd %02d\n" % n]
    finally:
        for sock in (steady, *crowd):
            sock.close()
    if lost:
        pytest.fail(
            f"with RLIMIT_NOFILE {FD_LIMIT} and {len(crowd) + 1} clients, accept() ran out of "
            f"descriptors (EMFILE); after {half} clients left, {len(lost)} got no echo "
            f"({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}), expected every one; "
            f"{_exit_note(server) or 'the server is still running'}\nA failed accept() "
            "concerns one pending connection or a momentary shortage (EMFILE, ENFILE, "
            "ENOBUFS, ENOMEM, ECONNABORTED, EPROTO), not the listening socket: report it and "
            "go on accepting. Ending the loop (or exit()) drops every live connection and "
            "refuses every later client.", pytrace=False)
    stop_cleanly(server)


def test_restarts_on_the_same_port_right_after_stop(launch: Any) -> None:
    first = launch()
    port = first.port
    sock = connect(port)
    sock.sendall(b"ping\n")
    assert recv_exactly(sock, 5) == b"ping\n", "the server did not echo"
    stop_cleanly(first)  # the server's end of `sock` is closed by the exit: server FIN first
    assert sock.recv(1) == b"", "after the server exited, its connection did not end (EOF)"
    sock.close()         # our FIN: the server's end now sits in TIME_WAIT on `port`
    deadline = time.monotonic() + WAIT
    while not (held := bind_needs_reuseaddr(port)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held, (f"test setup: port {port} could be bound without SO_REUSEADDR right after "
                  "the connection closed: no TIME_WAIT socket holds it")
    second = launch(port, what=f"restarting on port {port} with a TIME_WAIT connection "
                                "on it (bind needs SO_REUSEADDR)")
    assert second.port == port, f"restarted on port {second.port}, expected {port}"
    ports = second.read(listening_ports)
    if ports and port not in ports:
        swapped = int.from_bytes(port.to_bytes(2, "big"), "little")
        pytest.fail(
            f"started as 'accept_loop {port}', the server printed 'listening on {port}' but "
            f"listens on {ports}"
            + (f": {swapped} is {port} with its two bytes swapped - sin_port holds the port in "
               "network byte order: addr.sin_port = htons(port) (with port 0 the kernel picks "
               "and stores the port itself, which hid it)" if swapped in ports else
               ": bind() the port given in argv[1]"), pytrace=False)
    assert echo_once(port, b"again\n") == b"again\n", "the restarted server did not echo"
    stop_cleanly(second)


REFUSED_THREAD = re.compile(rb"thread_refused: pthread_create refused")


def echoed_or_ended(sock: socket.socket, message: bytes) -> str:
    """'echoed' (the message came back), 'ended' (EOF or reset first) or 'hung' (neither
    within WAIT)."""
    sock.sendall(message)
    got = bytearray()
    deadline = time.monotonic() + WAIT
    while len(got) < len(message) and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(len(message) - len(got))
        except TimeoutError:
            break
        except OSError:   # reset
            return "ended"
        if not chunk:
            return "ended"
        got += chunk
    return "echoed" if bytes(got) == message else "hung"


def test_a_connection_whose_thread_was_refused_is_closed(launch_thread_refused: Any) -> None:
    """At the process's thread limit pthread_create() fails (EAGAIN) and no thread will
    serve the connection just accepted: the server must close it (the client sees its end
    and can retry) or serve it some other way, and go on accepting - not keep a descriptor
    nobody reads, with its client waiting for ever."""
    server = launch_thread_refused()
    outcomes: list[str] = []
    for n in range(4):  # the 1st and 3rd pthread_create() fail, the 2nd and 4th start
        with connect(server.port) as sock:
            outcomes.append(echoed_or_ended(sock, b"client %d\n" % n))
        if server.proc.poll() is not None or outcomes[-1] == "hung":
            break
    refused = len(REFUSED_THREAD.findall(bytes(server.stderr)))
    hung = [n for n, outcome in enumerate(outcomes) if outcome == "hung"]
    assert not (refused and hung), (
        f"pthread_create() failed (EAGAIN, as at the process's thread limit) {refused} "
        f"time(s), and client {hung[0]} got neither its echo nor the end of its connection "
        f"within {WAIT:.0f} s (clients 0-3: {', '.join(outcomes)}): the server kept the "
        "accepted descriptor open with no thread to read it - its client waits for ever, "
        "and each such connection leaks a descriptor. When pthread_create() fails, "
        "close(client) (the client sees the end and can retry) and go on accepting")
    assert server.proc.poll() is None, (
        f"pthread_create() failed (EAGAIN, as at the process's thread limit) and the server "
        f"{_exit_note(server) or 'exited'} (clients 0-{len(outcomes) - 1}: "
        f"{', '.join(outcomes)}): a failed pthread_create() concerns one connection - close "
        "it and go on accepting; ending the loop drops every live connection and refuses "
        "every later client")
    assert outcomes[1::2] == ["echoed", "echoed"], (
        f"with every other pthread_create() failing, clients 1 and 3 (whose threads started) "
        f"saw {' and '.join(outcomes[1::2])}, expected their echo")
    stop_cleanly(server)


def test_a_second_server_on_a_port_in_use_fails(launch: Any, binary: Path,
                                                learner: Any) -> None:
    """SO_REUSEADDR lets a restart bind over TIME_WAIT connections; bind() must still fail
    (EADDRINUSE) while a server listens on the port. SO_REUSEPORT would let a second copy
    listen beside the first, and the kernel would split the clients between them."""
    first = launch()
    port = first.port
    proc = learner.popen([str(binary), str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, **SANITIZER_ENV})
    second = Server(proc, learner=learner)
    try:
        deadline = time.monotonic() + REFUSE_WAIT
        while proc.poll() is None and time.monotonic() < deadline:
            if second.printed_ready(0.05):
                break
        status = proc.poll()
        listening = second.printed_ready(0)
    finally:
        second.kill()
    assert not listening or second.port == port, (
        f"a second server started as `accept_loop {port}` while the first listens on {port} "
        f"printed 'listening on {second.port}': asked for a port that is taken, it picked "
        "another one, where no client looks - it must fail instead (bind() EADDRINUSE: a "
        "message on stderr and a non-zero exit status), so that the operator sees it")
    assert not listening, (
        f"a second server started as `accept_loop {port}` while the first still listens on "
        f"{port} printed 'listening on {second.port}': it listens on the same port beside the "
        "first, and the kernel now splits the clients between two servers - a copy started "
        "by mistake (or any program of the same user) silently takes half of them. That is "
        "SO_REUSEPORT (also what SO_REUSEADDR | SO_REUSEPORT in one setsockopt() sets: 2 | 15 "
        "is 15 - options are numbers, not flags); SO_REUSEADDR alone lets a restart bind over "
        "TIME_WAIT connections and still makes bind() fail (EADDRINUSE) while a server "
        "listens: set SO_REUSEADDR only")
    assert status is not None and status > 0, (
        f"a second server started as `accept_loop {port}` while the first still listens on "
        f"{port}: expected bind() to fail (EADDRINUSE) and a non-zero exit, saw "
        + ("it still running" if status is None else f"status {status}")
        + f"\nstderr: {second.stderr.decode(errors='replace').strip()[-400:]}")
    assert echo_once(port, b"first\n") == b"first\n", (
        "after a second server failed to start on its port, the first did not echo")
    stop_cleanly(first)


# argv[1] values that name no port, and what a lax parse makes of each.
NOT_A_PORT = [
    ("http", "a word: atoi() reads it as 0, and port 0 is any free port"),
    ("0abc", "a number with characters after it: atoi() and sscanf(\"%d\") stop at the 'a' "
             "and read 0, any free port"),
    ("65536", "past 65535: htons((uint16_t)65536) is 0, any free port"),
    ("-65536", "negative: (uint16_t)-65536 is 0, any free port"),
    ("", "empty (a script's `accept_loop \"$PORT\"` with PORT unset): strtol() "
         "reads no digit, returns 0 and leaves end at argv[1], where *end is already the "
         "'\\0' - unless end != argv[1] is checked, that is port 0, any free port"),
]
REFUSE_WAIT = 10.0  # seconds; a refusing server exits at once, only a silent hang waits this


@pytest.mark.parametrize("arg, why", NOT_A_PORT,
                         ids=[arg or "empty" for arg, _ in NOT_A_PORT])
def test_an_argument_that_is_no_port_is_refused(binary: Path, learner: Any, arg: str,
                                                why: str) -> None:
    """A mistyped or out-of-range port must stop the server before it listens: a
    supervisor (systemd, a deploy script) then sees it fail, instead of a server that
    serves on a port nobody asked for, where no client and no health check looks."""
    proc = learner.popen([str(binary), arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **SANITIZER_ENV})
    started = f"`accept_loop {shlex.quote(arg)}`" + ("" if arg else " (an empty argument)")
    server = Server(proc, learner=learner)
    try:
        deadline = time.monotonic() + REFUSE_WAIT
        while proc.poll() is None and time.monotonic() < deadline:
            if server.printed_ready(0.05):
                break
        status = proc.poll()
        if server.printed_ready(0):
            seen = f"printed 'listening on {server.port}' and serves there"
        elif status is None:
            ports = server.read(listening_ports)
            seen = (f"listens on {ports}" if ports else
                    f"neither exited nor listened within {REFUSE_WAIT:.0f} s")
        elif status == 0:
            seen = "exited with status 0, as if nothing had gone wrong"
        else:
            seen = ""
    finally:
        server.kill()
    assert not seen, (
        f"started as {started}, the server {seen}; expected it to "
        f"refuse the argument: a usage message on stderr and a non-zero exit status, before "
        f"listening on anything\n'{arg}' is {why}. A mistyped port must make the start fail "
        "where the operator sees it. Parse with strtol(argv[1], &end, 10) and accept it only if "
        "end != argv[1], *end == '\\0', errno == 0 and 0 <= value <= 65535.")
    assert status is not None and status > 0, (
        f"started as {started}, the server ended with status {status} "
        f"(negative: killed by a signal), expected a plain non-zero exit\nstderr: "
        f"{server.stderr.decode(errors='replace').strip()[-400:]}")
    report = server.sanitizer_report()
    assert report is None, (
        f"started as {started}, the sanitizers reported:\n{report}")


STILL = 0.03       # seconds a server's unread byte count must hold still to count as stalled
CHUNK = 1 << 16    # bytes the leaving client sends between two looks at the server


def server_side(port: int, client_port: int) -> tuple[int, int] | None:
    """The server's end of one connection: (state, bytes received that the server has not
    read yet; a FIN that arrived counts as one), looked up by its address pair alone
    (sock_diag, as ss asks: never the whole table, a fifth of a second on a loaded machine),
    or None when there is no such connection. Never a TIME_WAIT socket: an earlier
    connection's, from a client port loopback reused (queues 0)."""
    sock = connection_socket(("127.0.0.1", port), ("127.0.0.1", client_port))
    return None if sock is None else (sock.state, sock.rx_queue)


def stalled_side(server: Server, client_port: int) -> tuple[int, int] | None:
    """The server's end of the connection when it has stopped reading: the same unread
    byte count (beyond a FIN) twice, STILL seconds apart, with the server asleep all along
    (no thread of it runnable, its CPU time unmoved). A server that is only slow - its
    send buffer not yet full - moves on between the two looks, or, descheduled on a loaded
    machine, is runnable; a stalled one sleeps, blocked in send(), its send buffer full of
    echo the client does not read."""
    before = server.asleep()
    first = server_side(server.port, client_port)
    if first is None or first[1] <= 1:
        return None
    time.sleep(STILL)
    second = server_side(server.port, client_port)
    return (second if second == first and asleep_throughout(before, server.asleep())
            else None)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes this socket has sent (or queued) that its peer has not acknowledged yet."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                              struct.pack("i", 0)))[0])


def leave_mid_echo(server: Server) -> bool:
    """One client sends without reading its echo until the server stalls (blocked in
    send(), its buffers full), half-closes (FIN) and, once the FIN has reached the server
    while it is still stalled with bytes to echo (CLOSE_WAIT), resets (RST). True when it
    got there: the server's blocked send() then fails with EPIPE.

    Why stalled, not just behind: a server that is merely slow may echo everything it
    holds into a roomy send buffer, read the FIN and close in the moment between the last
    look and the RST; then no send() ever meets the reset, and a server that dies of
    SIGPIPE would survive the check."""
    leaver = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    leaver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # fixed: no autotuning
    leaver.settimeout(WAIT)
    leaver.connect(("127.0.0.1", server.port))
    client_port = leaver.getsockname()[1]
    leaver.setblocking(False)
    chunk = os.urandom(CHUNK)
    armed = False
    deadline = time.monotonic() + STREAM_WAIT
    try:
        while time.monotonic() < deadline and server.proc.poll() is None:
            try:
                leaver.send(chunk)  # a chunk at a time: little is in flight when it stalls
            except BlockingIOError:  # every buffer on the way is full
                time.sleep(0.005)
            side = server_side(server.port, client_port)
            if (side is not None and side[1] >= CHUNK
                    and stalled_side(server, client_port) is not None):
                break
        leaver.shutdown(socket.SHUT_WR)  # our FIN, behind any data still on its way
        deadline = min(deadline, time.monotonic() + WAIT)
        while time.monotonic() < deadline and server.proc.poll() is None:
            side = server_side(server.port, client_port)
            if side is not None and side[0] == CLOSE_WAIT:
                if side[1] <= 1:
                    break  # it caught up: only the FIN is left to read, try again
                if stalled_side(server, client_port) is not None:
                    armed = True
                    break
            elif (side is not None and unacknowledged(leaver) > 1
                    and stalled_side(server, client_port) is not None):
                # Our last data and FIN wait for room in the stalled server's full receive
                # buffer: read a little echo, so that it sends, reads and makes room.
                try:
                    leaver.recv(1 << 14)
                except BlockingIOError:
                    pass
            time.sleep(0.01)
    except OSError:
        pass  # the server closed or died: the caller says so
    leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    leaver.close()  # RST: in CLOSE_WAIT, the server's next send() gets EPIPE
    return armed


def test_a_client_that_leaves_mid_echo_costs_only_its_connection(launch: Any) -> None:
    """A client leaves (FIN, then RST) while the server still has bytes to echo to it: the
    server's next send() fails with EPIPE - and, without MSG_NOSIGNAL (or SIGPIPE
    ignored), raises SIGPIPE, whose default action ends the whole process."""
    server = launch()
    bystander = connect(server.port)  # another client, connected all along
    bystander.sendall(b"before\n")
    assert recv_exactly(bystander, 7) == b"before\n", "the server did not echo"
    before = server.descriptors()
    for _attempt in range(3):  # the buffers' sizes are the kernel's: try until one lands
        if leave_mid_echo(server) or server.proc.poll() is not None:
            break
    deadline = time.monotonic() + STREAM_WAIT
    while server.proc.poll() is None and time.monotonic() < deadline:
        if server.descriptors() <= before:
            break  # the server closed the connection and lives on
        time.sleep(0.02)
    status = server.proc.poll()
    try:
        bystander.sendall(b"after\n")
        echoed = recv_exactly(bystander, 6)
    except OSError:
        echoed = b""
    finally:
        bystander.close()
    if status is None and echoed != b"after\n":
        # Its /proc entry goes (the descriptor count above reads as gone) a moment before
        # its exit status can be collected: a server dying of SIGPIPE can still look alive.
        try:
            status = server.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            status = None
    if status is not None:
        killed = (f"was killed by {signal.Signals(-status).name}" if status < 0
                  else f"exited with status {status}")
        pytest.fail(
            f"a client that closed its connection while the server was still echoing to it "
            f"took the whole server down: the process {killed}, and the other client's "
            "connection went with it; expected only that connection to end\n"
            "send() to a peer that has gone fails with EPIPE and, by default, also raises "
            "SIGPIPE, whose default action kills the process. A peer that leaves is an "
            "ordinary error: send(fd, buf, n, MSG_NOSIGNAL) (or ignore SIGPIPE once in "
            "main()), take the -1/EPIPE as the end of that connection, close it, and keep "
            "serving the others.", pytrace=False)
    assert echoed == b"after\n", (
        f"after another client left mid-echo, a client connected all along got {echoed!r} "
        "back, expected b'after\\n': one client leaving must cost only its own connection")
    stop_cleanly(server)


OTHER = b"<another client's bytes> "  # a run random bytes hold with no real chance
STALL_CAP = 16 << 20  # bytes sent without a stall: the server buffers without bound, fine


def send_until_stalled(server: Server, sock: socket.socket) -> bytes:
    """Send on a non-blocking ``sock`` without reading the echo until the server's end of
    it stops reading: its thread is then blocked in send(), part of its last recv()'d
    buffer not yet written. Returns every byte sent (a server that never stalls - it keeps
    what it cannot send yet in memory of its own - is let go at STALL_CAP)."""
    client_port = sock.getsockname()[1]
    chunk = os.urandom(CHUNK)
    sent = bytearray()
    deadline = time.monotonic() + STREAM_WAIT
    while (time.monotonic() < deadline and server.proc.poll() is None
           and len(sent) < STALL_CAP):
        try:
            sent += chunk[:sock.send(chunk)]
            continue
        except BlockingIOError:  # every buffer on the way is full: has the server stopped?
            pass
        side = server_side(server.port, client_port)
        if (side is not None and side[1] >= CHUNK
                and stalled_side(server, client_port) is not None):
            break
        time.sleep(0.005)
    return bytes(sent)


def echo_beside(port: int, payload: bytes) -> bytes:
    """``payload`` echoed on a connection of its own, sent from a thread while read here."""
    with connect(port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = recv_exactly(sock, len(payload))
        sender.join(WAIT)
    return got


def test_each_connection_echoes_only_its_own_bytes(launch: Any) -> None:
    """One client sends without reading until its connection's thread is blocked in send()
    with bytes of its buffer still to write; another client then has 256 KiB echoed; then
    the first reads its echo. Each must get back exactly what it sent: a buffer shared by
    the connections' threads (static, global) is overwritten by the second connection's
    recv() while the first thread's send() still needs it."""
    server = launch()
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):  # fixed sizes: no autotuning
        stalled.setsockopt(socket.SOL_SOCKET, option, 1 << 16)
    stalled.settimeout(WAIT)
    try:
        stalled.connect(("127.0.0.1", server.port))
        stalled.setblocking(False)
        sent = send_until_stalled(server, stalled)
        other = OTHER * ((1 << 18) // len(OTHER))
        other_got = echo_beside(server.port, other)
        stalled.shutdown(socket.SHUT_WR)  # our FIN: the server closes once it has echoed all
        got = recv_exactly(stalled, len(sent) + 1, time.monotonic() + STREAM_WAIT)
    finally:
        stalled.close()
    if got != sent and OTHER in got:
        at = got.index(OTHER)
        pytest.fail(
            f"a client whose echo was held up (it read nothing while sending "
            f"{len(sent) >> 10} KiB) got another client's bytes back at byte {at} of its "
            f"echo, sent while its connection's thread waited in send(); expected exactly "
            f"its own bytes\n{SHARED_BUFFER_ADVICE}", pytrace=False)
    assert got == sent, (
        f"a client that read nothing while sending {len(sent) >> 10} KiB, then read its echo, "
        f"got {len(got)} bytes back{' (different content)' if len(got) == len(sent) else ''}, "
        "expected every byte it sent, in order")
    assert other_got == other, (
        f"while another connection's echo was held up, a client sending 256 KiB got "
        f"{len(other_got)} bytes back"
        f"{' (different content)' if len(other_got) == len(other) else ''}, expected all "
        "of it, unchanged: one connection waiting must not disturb another")
    stop_cleanly(server)
