"""ph4.1 verification: the learner's server.py, run as its own process in each of its three
models, against 200 slow clients driven from two client processes (clients.py).

A client is slow because the test holds it: it sends the first lines of a request and then
nothing until the test releases it, so "200 at once" is a fact, not a timing hope. What the
server does with them is read from the kernel and from /proc, never from the server's word:

- the kernel shows each server-side socket (looked up by its address pair through
  sock_diag, as ss does): accepted or still in the listen backlog (inode 0), and whether
  the server has read what its client sent (rx_queue 0), i.e. whether some thread or
  coroutine is serving it right now;
- /proc/<pid>/task counts the server's threads: read here when this process can see it,
  else (grading runs the server as the learner's uid, in a /proc hidden from the
  verification's) by the helper process_threads in the learner's host process;
- each client records what came back and whether the server closed the connection.

Every wait below ends at once for a correct server. A wrong one is given up on as soon as
nothing can change any more: the server asleep all along (every thread in state S, its CPU
time unmoved: /proc/<pid>/task/*) and the client processes asleep too, STALLED times in a
row over STALLED_FOR seconds or more. A correct server with work waiting for it is never
asleep (at worst runnable, state R, on a loaded machine); FAIL_WAIT is only a safety net.
Likewise a server seen asleep while a client it must refuse at once waits in its listen
backlog (a connection there wakes a thread blocked in accept()) is waiting for something
else first - room in its queue - and is given up on at once.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from labrunner.testing import (
    CLOSE_WAIT,
    ESTABLISHED,
    Activity,
    asleep_throughout,
    came_true,
    connection_socket,
    cpu_burnt_while_idle,
    process_activity,
    process_threads,
)

CLIENTS = 200          # slow clients held at once
WORKERS, QUEUE = 8, 16  # the bounded pool's size and queue bound, passed on its command line
DROPPED = 4            # clients that disconnect mid-request (half FIN, half RST)
CLIENT_PROCESSES = 2
READY = 30.0           # for the server to print its port
FAIL_WAIT = 30.0       # a safety net: a stuck server is seen asleep long before
STALLED = 8            # consecutive observations of server and clients asleep that end a wait
STALLED_FOR = 0.5      # ... spanning at least this many seconds (an observation takes ~1 ms)
BACKLOG_STALLED = 3    # consecutive observations of the server asleep with the same client
                       # in its listen backlog that end a wait for a refusal
REPLY_WAIT = 120.0     # for a client process to answer a command
HERE = Path(__file__).parent




# ---------------------------------------------------------------------------------------
# The server under test


class Server:
    """server.py <model>, as the learner's program; stdout and stderr drained (a full pipe
    would stall it), the port from its first line."""

    def __init__(self, learner: Any, *args: str, prelude: str = "") -> None:
        self.learner = learner
        self.name = "server.py " + " ".join(args)
        # The cyclic garbage collector off: a connection the server never closes stays
        # open, rather than closed whenever the collector happens to run (an asyncio
        # transport left unclosed sits in a reference cycle).
        self.proc = learner.python("server", *args, gc=False, prelude=prelude,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: collections.deque[str] = collections.deque(maxlen=40)
        threading.Thread(target=self._drain, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, False),
                         daemon=True).start()
        self.port = 0
        self.max_threads = 0
        self.client_pids: list[int] = []
        # Graded, the server runs as the learner's uid, in a /proc the verification cannot
        # see: its threads are counted by process_threads in the learner's host process.
        self.in_sight = Path(f"/proc/{self.proc.pid}/task").is_dir()

    def ready(self) -> None:
        """Wait for its "listening on <port>"."""
        try:
            line = self.out.get(timeout=READY)
        except queue.Empty:
            line = None
        m = re.match(r"listening on (\d+)", line or "")
        if not m:
            self.stop()
            self.fail(f"{self.name} did not print 'listening on <port>' (got {line!r}): "
                      "keep main() as given")
        self.port = int(m.group(1))

    def _drain(self, stream: Any, keep_lines: bool) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode(errors="replace").rstrip()
            (self.out.put if keep_lines else self.err.append)(text)
        if keep_lines:
            self.out.put(None)

    def threads(self) -> int:
        if self.in_sight:
            count = process_threads(self.proc.pid)
        else:
            count = int(self.learner.run_helper(process_threads, self.proc.pid))
        if count < 0:
            if self.gone() is not None:
                self.fail("the server must keep running")
            pytest.fail(f"the verification could not count the threads of {self.name} "
                        f"(pid {self.proc.pid}): /proc/{self.proc.pid}/task is out of sight",
                        pytrace=False)
        self.max_threads = max(self.max_threads, count)
        return count

    def activity(self) -> Activity:
        """(threads awake, CPU ns used, each thread's sleeps): see process_activity."""
        if self.in_sight:
            seen = process_activity(self.proc.pid)
        else:
            seen = self.learner.run_helper(process_activity, self.proc.pid)
        awake, cpu, threads = seen
        return int(awake), int(cpu), tuple((int(t), int(n), int(c)) for t, n, c in threads)

    def clients_asleep(self) -> bool:
        """Every client process asleep: none has anything left to read or to report."""
        return all(process_activity(pid)[0] == 0 for pid in self.client_pids)

    def gone(self) -> int | None:
        status: int | None = self.proc.poll()
        return status

    def fail(self, message: str) -> NoReturn:
        status = self.proc.poll()
        if status is not None:
            time.sleep(0.2)   # let the drain thread take the traceback's last lines
            err = "\n".join(self.err)
            last = next((ln for ln in reversed(self.err) if ln.strip()), "")
            message = (f"{self.name} stopped (exit status {status}: {last}) while the "
                       f"verification was checking: {message.splitlines()[0]}\n"
                       f"{err[-2500:]}")
        pytest.fail(message, pytrace=False)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) inside the block, continued (SIGCONT) after it: what
        clients do meanwhile waits in the kernel (connections in the listen backlog), as
        if every thread of the server were slow at once. Where /proc shows the server, the
        block starts once every thread is stopped (state T); graded, it is out of sight, and
        the stop is only given a moment to land (the signal goes through the learner's
        host)."""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            if self.in_sight:
                deadline = time.monotonic() + FAIL_WAIT
                while (not all_stopped(self.proc.pid) and self.gone() is None
                       and time.monotonic() < deadline):
                    time.sleep(0.005)
            else:
                time.sleep(0.2)
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def all_stopped(pid: int) -> bool:
    """Every thread of process ``pid`` stopped by a signal (state T), as /proc shows it."""
    try:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in Path(f"/proc/{pid}/task").iterdir()]
    except (OSError, IndexError):
        return False
    return bool(states) and all(state == "T" for state in states)


# ---------------------------------------------------------------------------------------
# The clients, in processes of their own


@dataclass(frozen=True)
class Client:
    proc: int
    index: int
    port: int          # the client's own port: the server-side socket's remote port

    @property
    def path(self) -> str:
        return f"/c/{self.index}"


class ClientProcess:
    server: Server

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "clients.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.replies: queue.Queue[str | None] = queue.Queue()
        self.err: collections.deque[str] = collections.deque(maxlen=20)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.replies.put(raw.decode(errors="replace"))
        self.replies.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self.err.append(raw.decode(errors="replace").rstrip())

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(command) + "\n").encode())
            self.proc.stdin.flush()
            line = self.replies.get(timeout=REPLY_WAIT)
        except (OSError, queue.Empty):
            line = None
        reply = json.loads(line) if line else {"error": "no answer"}
        if "error" in reply:
            what = next(iter(command))
            # Refused or reset: the server may be on its way out (a traceback to print,
            # its interpreter to finish): give it time to be seen gone.
            if came_true(lambda: self.server.gone() is not None, 5):
                self.server.fail(f"the server must accept the clients ({reply['error']})")
            pytest.fail(f"the verification's client process failed to {what} connections: "
                        f"{reply['error']}\n" + "\n".join(self.err), pytrace=False)
        return reply

    def close(self) -> None:
        """Killed: the kernel closes its connections (the test is over, nothing to say)."""
        self.proc.kill()
        self.proc.wait()


@dataclass
class Seen:
    data: str
    closed: str | None   # None: still open; "eof": the server closed it; "reset"

    @property
    def status(self) -> int | None:
        m = re.match(r"HTTP/1\.[01] (\d{3}) ", self.data)
        return int(m.group(1)) if m else None

    @property
    def body(self) -> str:
        return self.data.partition("\r\n\r\n")[2]


class Load:
    """Slow clients spread over CLIENT_PROCESSES processes."""

    def __init__(self) -> None:
        self.procs = [ClientProcess() for _ in range(CLIENT_PROCESSES)]
        self.count = [0] * CLIENT_PROCESSES
        self.port = 0

    def attach(self, server: Server) -> None:
        self.port = server.port
        for proc in self.procs:
            proc.server = server
        server.client_pids = [proc.proc.pid for proc in self.procs]

    def open(self, n: int, send: str = "head") -> list[Client]:
        """n new connections; "head": each sends the start of a request and holds."""
        opened: list[Client] = []
        shares = [n // len(self.procs) + (i < n % len(self.procs)) for i in range(len(self.procs))]
        for p, share in enumerate(shares):
            if share:
                ports = self.procs[p].ask({"open": share, "send": send,
                                           "port": self.port})["ports"]
                opened += [Client(p, self.count[p] + i, port) for i, port in enumerate(ports)]
                self.count[p] += share
        return opened

    def _each(self, clients: list[Client], command: dict[str, Any]) -> None:
        for p, proc in enumerate(self.procs):
            mine = [c.index for c in clients if c.proc == p]
            if mine:
                proc.ask({**command, next(iter(command)): mine})

    def finish(self, clients: list[Client]) -> None:
        """Release them: each sends the rest of its request."""
        self._each(clients, {"finish": []})

    def drop(self, clients: list[Client], how: str) -> None:
        self._each(clients, {"drop": [], "how": how})

    def seen(self) -> dict[Client, Seen]:
        out: dict[Client, Seen] = {}
        for p, proc in enumerate(self.procs):
            for i, (data, closed) in enumerate(proc.ask({"state": True})["conns"]):
                out[Client(p, i, 0)] = Seen(data, closed)
        return out

    def seen_by(self, clients: list[Client]) -> list[Seen]:
        state = self.seen()
        return [state[Client(c.proc, c.index, 0)] for c in clients]

    def close(self) -> None:
        for proc in self.procs:
            proc.close()


@pytest.fixture
def start(learner: Any) -> Iterator[Callable[..., tuple[Server, Load]]]:
    """start(*args, prelude=""): the client processes (starting beside the server, to save
    a second on a loaded machine), then server.py *args (after ``prelude``, code of the
    test's run first in its process); both stopped when the test ends."""
    made: list[tuple[Server, Load]] = []
    loads: list[Load] = []

    def starter(*args: str, prelude: str = "") -> tuple[Server, Load]:
        loads.append(Load())
        server = Server(learner, *args, prelude=prelude)
        made.append((server, loads[-1]))
        if not server.in_sight:   # have the learner's host start beside server and clients
            learner.run_helper(process_threads, 1)
        server.ready()
        loads[-1].attach(server)
        return server, loads[-1]

    yield starter
    for load in loads:
        load.close()
    for server, _ in made:
        server.stop()


# ---------------------------------------------------------------------------------------
# What the kernel shows of the server's side of each connection


@dataclass
class ServerSide:
    state: int
    rx_queue: int     # bytes the client sent that the server has not read yet
    inode: int        # 0: not accepted (still in the listen backlog) or already closed

    @property
    def accepted(self) -> bool:
        return self.inode != 0 and self.state in (ESTABLISHED, CLOSE_WAIT)

    @property
    def being_read(self) -> bool:
        return self.accepted and self.state == ESTABLISHED and self.rx_queue == 0


def server_side(port: int, client_port: int) -> ServerSide | None:
    """The server-side socket of the connection from the client at ``client_port`` to the
    server at ``port`` (both on 127.0.0.1), looked up by that address pair alone (sock_diag):
    never the whole table (a fifth of a second with a loaded machine's thousands of
    sockets), never a TIME_WAIT socket (an earlier connection's, from a client port loopback
    reused, would stand for the live one). None when there is no such connection."""
    sock = connection_socket(("127.0.0.1", port), ("127.0.0.1", client_port))
    return None if sock is None else ServerSide(sock.state, sock.rx_queue, sock.inode)


def threads_word(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def reading(side: ServerSide) -> bool:
    return side.being_read


def count(server: Server, clients: list[Client], what: Callable[[ServerSide], bool]) -> int:
    return sum(1 for c in clients
               if (side := server_side(server.port, c.port)) is not None and what(side))


def settle(server: Server, condition: Callable[[], bool], watch_threads: bool = False,
           dying: str = "the server must keep running",
           backlog: list[Client] | None = None) -> bool:
    """Poll until ``condition()`` holds (True), or until it cannot come any more (False):
    the server asleep throughout an observation (no thread runnable, CPU time unmoved) while
    the client processes sleep too, STALLED times in a row over STALLED_FOR s or more, with
    the server's CPU time unmoved all along. Nothing is then on its way to anyone: a
    correct server would be running. FAIL_WAIT is a safety net. Fail at once if the server
    process dies. With watch_threads, the thread count is sampled as it goes; ``dying`` is
    what the server's death is reported against.

    With ``backlog`` (clients that connected and must be accepted at once), also False as
    soon as the server is seen asleep throughout BACKLOG_STALLED observations in a row while
    the same one of them waits in its listen backlog at each: a connection in the backlog
    wakes a thread blocked in accept() (runnable at once), so a server that sleeps with one
    there waits for something else first - a timer, room in its queue. The clients' own
    wakes (a 503 arriving) do not matter here."""
    deadline = time.monotonic() + FAIL_WAIT
    stalled, frozen, since = 0, 0, 0.0
    idle: list[Client] = []   # the same client seen waiting, at each observation in a row
    taken: set[Client] = set()
    while True:
        if server.gone() is not None:
            server.fail(dying)
        if watch_threads:
            server.threads()
        clients_asleep = server.clients_asleep()   # before condition() wakes them
        before = server.activity()
        if condition():
            return True
        after = server.activity()
        if not (clients_asleep and asleep_throughout(before, after)):
            stalled = 0
        elif stalled and after[1] == frozen:
            stalled += 1
        else:
            stalled, frozen, since = 1, after[1], time.monotonic()
        if backlog:
            waiting = asleep_with_a_client_waiting(server, backlog, taken)
            if waiting is None:
                idle = []
            elif idle[-1:] != [waiting]:
                idle = [waiting]
            else:
                idle.append(waiting)
        if (stalled >= STALLED and time.monotonic() - since >= STALLED_FOR
                or len(idle) >= BACKLOG_STALLED
                or time.monotonic() > deadline):
            return False
        time.sleep(0.02)


def asleep_with_a_client_waiting(server: Server, backlog: list[Client],
                                 taken: set[Client]) -> Client | None:
    """One of ``backlog`` waiting in the server's listen backlog while no thread of the
    server ran (two readings around the look, a few ms apart), or None. The last clients
    are looked at first (the backlog is taken in the order the connections came), and none
    of ``taken``: those seen out of the backlog already (accepted, or closed), which
    never go back to it - added to as they are seen."""
    before = server.activity()
    waiting = None
    for c in reversed(backlog):
        if c in taken or (side := server_side(server.port, c.port)) is None:
            continue
        if in_backlog(side):
            waiting = c
            break
        taken.add(c)
    return waiting if asleep_throughout(before, server.activity()) else None


def in_backlog(side: ServerSide) -> bool:
    """Connected, not accepted yet: the connection waits in the server's listen backlog."""
    return side.state == ESTABLISHED and side.inode == 0


def served(load: Load, server: Server, clients: list[Client], model: str) -> None:
    """After releasing ``clients``: each must get 200 with its own path, then EOF."""
    settle(server, lambda: all(s.closed for s in load.seen_by(clients)))
    seen = load.seen_by(clients)
    bad = [(c, s) for c, s in zip(clients, seen, strict=True)
           if s.status != 200 or s.body != f"hello {c.path}\n"]
    if bad:
        c, s = bad[0]
        got = (f"{s.data[:120]!r}" if s.data else "nothing") + (
            f", then the connection {'closed' if s.closed == 'eof' else 'was reset'}"
            if s.closed else ", the connection still open")
        server.fail(
            f"{len(bad)} of {len(clients)} released clients were not answered 200 "
            f"(the {model} server): {c.path} got {got}\nOnce a slow client sends the rest "
            "of its request it must get 'HTTP/1.1 200' with 'hello <path>' (handle() "
            "does it), and its connection closed.")


def dropped_closed(load: Load, server: Server, gone: list[Client], model: str) -> None:
    """Clients that left mid-request: the server must have closed its side (no CLOSE_WAIT)."""
    if not settle(server, lambda: count(server, gone, lambda s: s.state == CLOSE_WAIT) == 0):
        left = count(server, gone, lambda s: s.state == CLOSE_WAIT)
        server.fail(
            f"the {model} server never closed {left} connections whose clients closed them "
            "mid-request (they sit in CLOSE_WAIT)\nWhen read_request() raises ClientGone "
            "(or readuntil() IncompleteReadError), close your side, on every way out (a "
            "finally): each forgotten connection keeps a descriptor, and under load the "
            "server runs out of them. The verification runs the server with the cyclic "
            "garbage collector off: an asyncio connection left unclosed is freed only when "
            "the collector happens to run, which is no release at all.")


def hold(load: Load, server: Server, n: int) -> list[Client]:
    """n slow clients, each having sent the start of its request."""
    return load.open(n, "head")


# ---------------------------------------------------------------------------------------
# 1. A thread per connection


BURST = 8           # clients that arrive at once, for threads slow to start
SLOW_START = 0.2    # s each new thread of the server waits before running its target
# Run in the server's process before server.py: every thread started there sleeps
# SLOW_START s before its run() (then runs untraced, at full speed), as on a busy machine
# where the accept loop gets the CPU first. A thread that takes its connection from a
# variable the accept loop goes on assigning then finds the next connection there.
SLOW_THREAD_START = f"""
import sys, threading, time
def _slow_start(frame, event, arg):
    sys.settrace(None)
    time.sleep({SLOW_START})
threading.settrace(_slow_start)
"""


def read_or_ended(server: Server, load: Load, clients: list[Client]) -> None:
    """Wait until every one of ``clients`` is being read, or one was answered or closed
    (or nothing can change any more: see settle). The server's threads sleep SLOW_START
    first: asleep then, a server is not stuck yet."""
    def done() -> bool:
        ended = any(s.data or s.closed for s in load.seen_by(clients))
        return ended or count(server, clients, reading) == len(clients)

    if not came_true(done, SLOW_START + 2):
        settle(server, done)


def test_each_thread_serves_the_connection_it_was_started_for(
        start: Callable[..., tuple[Server, Load]]) -> None:
    """BURST clients connect while the server is paused, so they wait in the listen
    backlog and the accept loop takes them one right after the other; each new thread is
    slow to start (SLOW_THREAD_START). Each must still serve its own client: read its
    request, answer it with its own path."""
    server, load = start("threads", prelude=SLOW_THREAD_START)
    # One client first, alone: the server is up and serving before it is paused (a
    # server on its way out would otherwise be stopped half-dead).
    probe = hold(load, server, 1)
    read_or_ended(server, load, probe)
    if load.seen_by(probe)[0].closed and came_true(lambda: server.gone() is not None, 5):
        server.fail("the server must keep running")
    with server.paused():
        burst = hold(load, server, BURST)
    read_or_ended(server, load, burst)
    seen = load.seen_by(burst)
    ended = [c for c, s in zip(burst, seen, strict=True) if s.data or s.closed]
    read = count(server, burst, reading)
    threads = server.threads()
    if ended:
        first = seen[burst.index(ended[0])]
        what = (f"{len(ended)} of them had their connection "
                f"{'answered' if first.data else 'closed'} by the server with their "
                f"request incomplete (first {ended[0].path})")
    elif read < BURST and threads > BURST:
        what = f"only {read} of them were being read"
    elif read < BURST:
        server.fail(
            f"with {BURST} slow clients connected, the thread-per-connection server was "
            f"reading {read} of them at once (running {threads_word(threads)}), expected all "
            f"{BURST}\n" + serial_hint(threads))
    if ended or read < BURST:
        server.fail(
            f"{BURST} clients connected at once to the thread-per-connection server, whose "
            f"new threads were slow to start (each waited {SLOW_START} s before running its "
            f"target, as on a busy machine): {what}, with {threads_word(threads)} running"
            "\nA thread must serve the connection it was started for: hand it over when the "
            "thread is made - threading.Thread(target=serve, args=(conn,)). A lambda or an "
            "inner function that reads the loop's variable conn when the thread runs finds "
            "whatever the accept loop has put there since (the next connection, then served "
            "by several threads), and the socket it was meant for, no longer referenced, is "
            "closed unanswered.")
    load.finish(burst)
    served(load, server, burst, "thread-per-connection, threads slow to start")


def test_thread_per_connection_serves_200_slow_clients_at_once(
        start: Callable[..., tuple[Server, Load]]) -> None:
    server, load = start("threads")
    gone = hold(load, server, DROPPED)
    if not settle(server, lambda: count(server, gone, reading) == DROPPED):
        read = count(server, gone, reading)
        threads = server.threads()
        server.fail(
            f"with {DROPPED} slow clients connected, the thread-per-connection server was "
            f"reading {read} of them at once (running {threads_word(threads)}), expected all "
            f"{DROPPED}\n" + serial_hint(threads))
    load.drop(gone[: DROPPED // 2], "fin")
    load.drop(gone[DROPPED // 2:], "rst")

    held = hold(load, server, CLIENTS)
    all_read = settle(server, lambda: count(server, held, reading)
                      == CLIENTS)
    threads = server.threads()
    read = count(server, held, reading)
    if not all_read:
        server.fail(
            f"with {CLIENTS} slow clients connected, the thread-per-connection server was "
            f"reading {read} of them at once (running {threads_word(threads)}), expected all "
            f"{CLIENTS}\n" + serial_hint(threads))
    if threads < CLIENTS + 1:
        server.fail(
            f"with {CLIENTS} slow clients held open, the thread-per-connection server ran "
            f"{threads} threads, expected at least {CLIENTS + 1} (one per connection, plus "
            "the one accepting)\nThis model gives every accepted connection a thread of "
            "its own (threading.Thread(target=..., args=(conn,)).start()) and the accept "
            "loop goes straight back to accept(); a capped pool is the second model.")
    load.finish(held)
    served(load, server, held, "thread-per-connection")
    if not settle(server, lambda: server.threads() <= 3):
        server.fail(
            f"after all {CLIENTS + DROPPED} connections ended, the thread-per-connection "
            f"server still runs {server.threads()} threads, expected at most 3\nA "
            "connection's thread must end with its connection, also when the client left "
            "mid-request (catch ClientGone and return); threads that never end are a leak "
            "the next burst adds to.")
    dropped_closed(load, server, gone, "thread-per-connection")


def serial_hint(threads: int) -> str:
    if threads <= 2:
        return ("It serves one connection at a time: handle() runs in the accept loop, so "
                "the first slow client holds everyone behind it. Start a thread per "
                "accepted connection and go straight back to accept().")
    return ("A fixed number of threads serves a fixed number of clients; this model "
            "gives every connection a thread of its own.")


# ---------------------------------------------------------------------------------------
# 2. A bounded pool with a queue, 503 when it is full


def test_bounded_pool_queues_then_rejects_with_503(
        start: Callable[..., tuple[Server, Load]], learner: Any) -> None:
    gate = learner.tmp_folder() / "refusing"
    server, load = start("pool", "--workers", str(WORKERS), "--queue", str(QUEUE),
                         prelude=HOLD_THREADS_STARTED_WHILE.format(gate=str(gate)))
    bound = WORKERS + 2   # the workers, the main thread, and one more if accept has its own

    def threads_bounded(stage: str) -> None:
        threads = server.threads()
        if threads > bound:
            server.fail(
                f"with {stage}, the pool server had {threads} threads; a bounded pool of "
                f"{WORKERS} workers must stay at <= {WORKERS} + main (+1 accepting)\nStart "
                f"the {WORKERS} workers once and hand them connections through a queue; a "
                "thread per connection, however counted, is the first model again, with "
                "no bound on memory or scheduling.")

    # Clients that leave mid-request: every worker must come back from them.
    gone = hold(load, server, WORKERS)
    if not settle(server, lambda: count(server, gone, reading) == WORKERS,
                  watch_threads=True):
        threads_bounded(f"{WORKERS} clients connected")
        read = count(server, gone, reading)
        server.fail(
            f"with {WORKERS} slow clients connected and {WORKERS} workers, the pool server "
            f"was reading {read} of them at once (running {threads_word(server.threads())})\n"
            f"Start {WORKERS} worker threads that each take a connection from the queue "
            "(queue.Queue.get()) and serve it with handle(), while the accept loop only "
            "accepts and queues.")
    threads_bounded(f"{WORKERS} clients held")
    load.drop(gone[: WORKERS // 2], "fin")
    load.drop(gone[WORKERS // 2:], "rst")

    # Every worker busy with a slow client.
    busy = hold(load, server, WORKERS)
    if not settle(server, lambda: count(server, busy, reading) == WORKERS,
                  watch_threads=True):
        read = count(server, busy, reading)
        got = sum(1 for s in load.seen_by(busy) if s.data)
        server.fail(
            f"after {WORKERS} clients disconnected mid-request ({WORKERS // 2} closed, "
            f"{WORKERS // 2} reset), only {read} of the next {WORKERS} clients were taken "
            f"up by a worker ({got} were answered instead; the server runs "
            f"{threads_word(server.threads())})\nA worker that meets a client error must go back "
            "to the queue: catch ClientGone and OSError around handle() inside the worker's "
            "loop, and give back whatever marks the worker busy in a finally. Otherwise "
            "each client that leaves early costs the pool a worker for good.")
    threads_bounded(f"{WORKERS} workers busy")
    busy = reset_after_full_request(load, server, busy)
    threads_bounded(f"{WORKERS} workers busy again")

    # The queue fills: accepted, waiting, not answered.
    waiting = hold(load, server, QUEUE)

    def queued_or_answered() -> bool:
        answered = any(s.data or s.closed for s in load.seen_by(waiting))
        return answered or count(server, waiting, lambda s: s.accepted) == QUEUE

    settle(server, queued_or_answered)
    answered = [s for s in load.seen_by(waiting) if s.data or s.closed]
    if answered:
        server.fail(
            f"with {WORKERS} workers busy and an empty queue of {QUEUE}, {len(answered)} of "
            f"the next {QUEUE} clients were answered at once ({answered[0].data[:40]!r}), "
            f"expected them to wait in the queue\nReject only when the queue is full: "
            f"{WORKERS} busy + {QUEUE} waiting is the capacity. A busy count that is not "
            "given back when a client leaves mid-request (give it back in a finally) or a "
            "queue that does not count makes the pool refuse work it has room for.")
    accepted = count(server, waiting, lambda s: s.accepted)
    if accepted != QUEUE:
        server.fail(
            f"with {WORKERS} workers busy, the pool server accepted {accepted} of the next "
            f"{QUEUE} clients, expected all {QUEUE} into its queue\nThe accept loop keeps "
            "accepting; a connection that finds every worker busy waits in the queue (up "
            f"to --queue {QUEUE}), and only beyond that is it refused.")
    threads_bounded(f"{WORKERS + QUEUE} clients held")

    # Beyond capacity: 503 at once, and the connection closed.
    gate.touch()   # a thread the server starts now (but one) is held at its start
    extra = load.open(CLIENTS - WORKERS - QUEUE, "none")
    settle(server, lambda: all(s.closed for s in load.seen_by(extra)), watch_threads=True,
           backlog=extra)
    gate.unlink()
    refusals_cost_no_thread(server, len(extra), bound)
    threads_bounded(f"{CLIENTS} clients held open")
    seen = load.seen_by(extra)
    rejected = sum(1 for s in seen if s.status == 503)
    open_held = count(server, busy + waiting + extra, lambda s: s.accepted)
    if rejected < len(extra):
        silent = sum(1 for s in seen if not s.data)
        refused_late(server, extra, rejected)
        server.fail(
            f"with {WORKERS} workers busy and {QUEUE} clients queued, {rejected} of "
            f"{len(extra)} further clients got 503 Service Unavailable, expected all "
            f"{len(extra)} ({silent} got nothing; the server holds {open_held} connections, "
            f"expected {WORKERS + QUEUE}" + (
                f": one more per worker, as if the {WORKERS} connections being served held "
                "no place" if open_held == 2 * WORKERS + QUEUE else "") + ")\n" + (
                "The place is given back when the connection is done, not when a worker "
                "takes it off the queue. " if open_held == 2 * WORKERS + QUEUE else "") + (
                "The queue never fills: a queue.Queue() without maxsize, or a check that "
                "lets one more in (>= vs >), hoards connections it cannot serve. "
                if open_held > WORKERS + QUEUE else "")
            + f"Bound what the pool takes in to workers + queue ({WORKERS + QUEUE}): take a "
            "slot without waiting (threading.BoundedSemaphore.acquire(blocking=False), given "
            "back when the connection is done) and, with none free, answer BUSY at once from "
            "the accept loop.")
    still_open = sum(1 for s in seen if not s.closed)
    if still_open or open_held > WORKERS + QUEUE:
        server.fail(
            f"{still_open or len(extra)} rejected clients got their 503 but the server kept "
            f"their connections open (it holds {open_held}, expected {WORKERS + QUEUE})\n"
            "A rejected connection is answered and closed: kept open (or queued anyway) it "
            "still costs a descriptor, and a worker when its turn comes.")
    early = [s for s in load.seen_by(busy + waiting) if s.data or s.closed]
    if early:
        server.fail(
            f"{len(early)} clients that were being served or queued got "
            f"{early[0].data[:40]!r} before they finished their requests\nOnly connections "
            "beyond the queue get 503; the queued ones wait for a worker.")

    reject_survives_resets(load, server)

    # Released: every served and every queued client gets its answer.
    load.finish(busy + waiting)
    served(load, server, busy + waiting, "pool")
    threads_bounded(f"the {WORKERS + QUEUE} held clients released")
    again = hold(load, server, 1)
    load.finish(again)
    served(load, server, again, "pool (after the burst)")


# Run in the pool server's process before server.py: while the gate file exists, each
# thread started (but the first) is held at its start for good, before its target runs:
# a refusal handed to a thread of its own is then never sent, and the thread stays to be
# counted, however quickly it would have ended.
HOLD_THREADS_STARTED_WHILE = """
import os, sys, threading
_started = []
def _held_start(frame, event, arg):
    sys.settrace(None)
    if os.path.exists({gate!r}):
        _started.append(1)
        if len(_started) > 1:
            threading.Event().wait()
threading.settrace(_held_start)
"""


def refusals_cost_no_thread(server: Server, refused: int, bound: int) -> None:
    """Fail if the pool started threads to refuse the clients beyond its capacity."""
    threads = server.threads()
    if threads > bound:
        server.fail(
            f"with {WORKERS} workers busy and {QUEUE} clients queued, {refused} further "
            f"clients came and the pool server grew to {threads} threads (at most {bound}): it "
            "starts a thread to refuse a client (a thread or an executor task per 503)\n"
            "Overload is when the pool must cost least: a thread per refused connection is "
            "the first model again, at the worst moment, with no bound on threads or "
            "memory. Send BUSY and close the connection from the accept loop itself: it is "
            "a few bytes into an empty socket buffer, it does not block.")


def refused_late(server: Server, extra: list[Client], rejected: int,
                 situation: str = f"with {WORKERS} workers busy and {QUEUE} clients "
                                  "queued") -> None:
    """Clients beyond capacity still in the listen backlog: the accept loop is not
    accepting - it waits for room in the full queue instead of refusing at once."""
    backlog = count(server, extra, in_backlog)
    if backlog:
        server.fail(
            f"{situation}, {rejected} of {len(extra)} further clients got 503 and "
            f"{backlog} {'was' if backlog == 1 else 'were'} not even accepted yet (still in "
            f"the listen backlog): the accept loop waited for room in the queue before "
            f"answering 503, instead of answering at once\nIt waits for room - a queue.put() "
            f"or a semaphore's acquire() that blocks or waits with a timeout (however short), "
            f"a sleep-and-retry - and accepts no one meanwhile: every client behind it waits "
            f"too, each refusal costs that wait again, and a burst of them adds up (or lasts "
            f"as long as the busy workers take). Refuse at once instead: take a slot without "
            f"waiting (acquire(blocking=False), put_nowait()) and, with none free, answer BUSY "
            f"from the accept loop.")


def reset_after_full_request(load: Load, server: Server, busy: list[Client]) -> list[Client]:
    """While every worker serves one of ``busy``, WORKERS clients send a whole request, wait
    in the queue, and reset their connections (RST). Released, the busy clients are answered
    and each worker takes a reset connection: the kernel kept the request that came before
    the RST, so it is read whole, and sending the answer fails (ConnectionResetError, an
    OSError that is not ClientGone). Then WORKERS new slow clients must all be taken up at
    once: every worker survived. Returns them (the workers busy again)."""
    before = server.threads()
    resets = load.open(WORKERS, "full")
    # Queued (accepted, no worker free to read them) with the whole request arrived, before
    # the RST: a client reset before that would be a mid-request one. (A server that does
    # not queue them is named by the queue's own check below.)
    settle(server, lambda: count(server, resets, lambda s: s.accepted and s.rx_queue > 0)
           == WORKERS)
    load.drop(resets, "rst")
    # Each server side is gone once the kernel has taken its RST in: only then does a
    # worker's answer meet the reset, not a connection still open.
    settle(server, lambda: count(server, resets, lambda s: s.accepted) == 0)
    load.finish(busy)
    served(load, server, busy, "pool")
    again = hold(load, server, WORKERS)
    if not settle(server, lambda: count(server, again, reading) == WORKERS):
        read = count(server, again, reading)
        now = server.threads()
        died = (f"{before - now} of the workers died on a connection reset after a full "
                "request" if now < before else "the workers never came back from a "
                "connection reset after a full request")
        server.fail(
            f"after {WORKERS} clients reset their connections right after sending a whole "
            f"request, {died}: only {read} of the next {WORKERS} clients were taken up by a "
            f"worker (the server runs {threads_word(now)}, {before} before)\nA worker reads "
            "such a request whole (the kernel keeps what arrived before the RST), then "
            "sending the answer raises ConnectionResetError (BrokenPipeError on a later "
            "send): an OSError, not ClientGone. Escaping the worker's loop, it ends the "
            "worker's thread, and the pool has lost a worker for good, without a word. A "
            "worker must survive any client error: catch OSError (ClientGone and OSError) "
            "around a client's handling, inside the worker's loop.")
    return again


RESET_BEYOND = 16   # clients beyond capacity that reset their connection at once
RESET_REJECTED = (
    f"{RESET_BEYOND} clients beyond capacity connected and reset at once (RST before their "
    "503 could be written), after which the pool server must still answer the next client "
    "503: writing to a connection its client reset raises ConnectionResetError "
    "(BrokenPipeError) - catch OSError around the 503's send in the accept loop and close "
    "the connection in a finally, or one client's RST takes the whole server down")


def reject_survives_resets(load: Load, server: Server) -> None:
    """With the workers busy and the queue full, RESET_BEYOND clients connect and reset at
    once while the server is paused: the accept loop takes each from accept() already
    reset, and sending its 503 fails (ConnectionResetError).
    The next client must still get 503: refusing work survives any client, or load
    shedding is a one-packet denial of service."""
    with server.paused():   # the resets wait in the backlog: each is accepted already reset
        load.open(RESET_BEYOND, "rst")
        probe = load.open(1, "none")   # accepted after them
    settle(server, lambda: all(s.closed for s in load.seen_by(probe)), dying=RESET_REJECTED)
    seen = load.seen_by(probe)[0]
    if seen.status != 503 or seen.closed != "eof":
        try:   # reset: its listening socket is gone, the process on its way out (its traceback)
            server.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        got = (f"{seen.data[:60]!r}" if seen.data else "nothing") + (
            f", then the connection {'closed' if seen.closed == 'eof' else 'was reset'}"
            if seen.closed else ", its connection still open")
        server.fail(f"the next client got {got}; expected 503 and its connection closed: "
                    f"{RESET_REJECTED}. The accept loop stopped accepting.")


NO_QUEUE_WORKERS = 2   # the pool run with --queue 0: no waiting room at all
BEYOND = 4             # clients that come while every worker is busy
NO_QUEUE = f"with --queue 0 (no waiting room) and all {NO_QUEUE_WORKERS} workers busy"


def test_bounded_pool_with_queue_0_refuses_at_once_beyond_the_workers(
        start: Callable[..., tuple[Server, Load]]) -> None:
    """--queue 0: no waiting room. NO_QUEUE_WORKERS slow clients occupy the workers; each of
    the BEYOND clients after them must get 503 at once, its connection closed. Released, the
    busy ones are served, and the workers, free again, take the next client."""
    server, load = start("pool", "--workers", str(NO_QUEUE_WORKERS), "--queue", "0")
    busy = hold(load, server, NO_QUEUE_WORKERS)
    settle(server, lambda: count(server, busy, reading) == NO_QUEUE_WORKERS
           or any(s.data or s.closed for s in load.seen_by(busy)))
    workers_take_up(load, server, busy)
    extra = load.open(BEYOND, "none")
    settle(server, lambda: all(s.closed for s in load.seen_by(extra)), backlog=extra)
    no_waiting_room(load, server, busy, extra)
    load.finish(busy)
    served(load, server, busy, "pool, --queue 0")
    again = hold(load, server, 1)
    load.finish(again)
    served(load, server, again, "pool, --queue 0, after refusing the clients beyond it")


def workers_take_up(load: Load, server: Server, busy: list[Client]) -> None:
    """Fail unless each of ``busy`` (one per worker) is being read by a worker."""
    read = count(server, busy, reading)
    if read == len(busy):
        return
    answered = [s for s in load.seen_by(busy) if s.data or s.closed]
    if answered:
        server.fail(
            f"with --queue 0 and {len(busy)} idle workers, {len(answered)} of the first "
            f"{len(busy)} clients were answered ({answered[0].data[:40]!r}) before their "
            "requests were complete, expected each taken up by a worker\n--queue 0 leaves no "
            "waiting room, but each idle worker still takes a connection: the capacity is "
            "workers + queue_size. A bound of queue_size alone refuses work the pool has "
            "room for.")
    server.fail(
        f"with --queue 0 and {len(busy)} slow clients connected, the pool server was "
        f"reading {read} of them at once (running {threads_word(server.threads())}), "
        f"expected all {len(busy)}, one per worker\nStart the workers once, each taking a "
        "connection from the queue and serving it, while the accept loop only accepts and "
        "hands connections over.")


def no_waiting_room(load: Load, server: Server, busy: list[Client],
                    extra: list[Client]) -> None:
    """Fail unless each of ``extra``, coming while every worker is busy with ``busy`` and
    with no waiting room, got 503 at once and had its connection closed."""
    seen = load.seen_by(extra)
    rejected = sum(1 for s in seen if s.status == 503)
    held = count(server, extra, lambda s: s.accepted)
    if rejected < len(extra):
        refused_late(server, extra, rejected, NO_QUEUE)
        if held:
            first = (f"all {held} further clients were accepted and held unanswered, "
                     "expected 503 at once for each: its waiting room is unbounded, and "
                     "queue.Queue(maxsize=0) is an infinite queue, not an empty one"
                     if held == len(extra) else
                     f"{held} of {len(extra)} further clients were accepted and held "
                     f"unanswered ({rejected} got 503), expected 503 at once for each: a "
                     f"waiting room of {held} where --queue 0 asks for none")
            server.fail(
                f"{NO_QUEUE}, {first}\n--queue 0 means that a connection finding every "
                "worker busy is refused at once. queue.Queue(maxsize=queue_size) is no bound "
                "for it: maxsize <= 0 means no limit, put_nowait() never raises queue.Full, "
                "and the pool hoards connections it cannot serve. Bound what the pool takes "
                "in to workers + queue_size instead: a threading.BoundedSemaphore(workers + "
                "queue_size) taken with acquire(blocking=False) by the accept loop and given "
                "back when a connection is done.")
        got = next((s.data[:40] for s in seen if s.status != 503 and s.data), "nothing")
        server.fail(
            f"{NO_QUEUE}, {rejected} of {len(extra)} further clients got 503 Service "
            f"Unavailable, expected all {len(extra)} (another got {got!r})\nA connection "
            "beyond capacity gets BUSY from the accept loop, then its connection closed.")
    still_open = sum(1 for s in seen if not s.closed)
    if still_open or held:
        server.fail(
            f"{NO_QUEUE}, {still_open or held} rejected clients got their 503 but the server "
            "kept their connections open\nA rejected connection is answered and closed: "
            "kept open (or queued anyway) it still costs a descriptor.")
    early = [s for s in load.seen_by(busy) if s.data or s.closed]
    if early:
        server.fail(
            f"{NO_QUEUE}, {len(early)} of the clients being served got "
            f"{early[0].data[:40]!r} before they finished their requests\nOnly connections "
            "beyond capacity get 503; those a worker took are served.")


# The pool's count of connections taken in, with a worker's give-back interleaved with the
# accept loop's take, one bytecode at a time: a worker held at its k-th step after a client
# is released, while the accept loop takes the next one in; every k in turn.

RACE_WORKERS, RACE_QUEUE = 1, 1   # capacity 2: one served, one waiting
# The given helpers run untraced: the steps counted are the pool's own (the worker's loop,
# whatever wraps handle() and gives its slot back).
GIVEN = ("read_request", "handle", "path_of", "answer", "response")
OPENAT = {"x86_64": 257, "aarch64": 56}.get(platform.machine(), -2)
# Run in the pool server's process before server.py: each thread but the main one (the
# accept loop's) counts the bytecodes it runs in the pool's code since the round written
# in ARM began, and at the k-th it opens the FIFO HOLD for reading: asleep in openat()
# until the test opens it for writing. The accept loop itself runs untraced.
STEP_HOLD = """
import os, sys, threading
from labrunner.slow_steps import step_tracer
_state = threading.local()
def _on_step(frame):
    if frame.f_code.co_name in {given!r}:
        return
    try:
        with open({arm!r}) as f:
            k = int(f.read())
    except (OSError, ValueError):
        return
    if getattr(_state, "k", None) != k:
        _state.k, _state.steps = k, 0
    _state.steps += 1
    if _state.steps == k:
        os.close(os.open({hold!r}, os.O_RDONLY))
_folder = os.path.dirname(os.path.abspath(sys.argv[1])) + "/"
threading.settrace(step_tracer(_folder, _on_step, opcodes=True))
"""


def worker_held(server: Server) -> bool:
    """A thread of the server asleep in openat(): the worker, held at its step."""
    return any(call == OPENAT for _, _, call in server.activity()[2])


def switches(server: Server) -> int:
    """The voluntary context switches of the server's threads so far: a thread that slept,
    woke and slept again has made one more."""
    return sum(n for _, n, _ in server.activity()[2])


def quiet(server: Server) -> None:
    """Wait until no thread of the server runs between two readings (FAIL_WAIT at most)."""
    deadline = time.monotonic() + FAIL_WAIT
    while time.monotonic() < deadline:
        before = server.activity()
        time.sleep(0.01)
        if asleep_throughout(before, server.activity()):
            return


def race_round(server: Server, load: Load, arm: Path, fifo: Path, k: int,
               busy: Client) -> Client | None:
    """``busy`` is being read by the worker. Arm step k, release ``busy``; if the worker is
    held at its k-th step, a new client comes (queued: the pool holds 1 of 2), the accept
    loop takes it in, then the worker goes on and must take it up. Returns the new client
    (being read), or None when the worker ran fewer than k steps (every k was tried)."""
    arm.write_text(str(k))
    load.finish([busy])
    settle(server, lambda: worker_held(server) or bool(load.seen_by([busy])[0].closed))
    quiet(server)
    if not worker_held(server):
        return None
    woken = switches(server)
    new = hold(load, server, 1)
    # The accept loop woke for it (accept() returned) and sleeps again: it is done with it.
    settle(server, lambda: switches(server) > woken)
    quiet(server)
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))   # the worker goes on
    went_on = settle(server, lambda: not worker_held(server))
    quiet(server)
    seen = load.seen_by([busy, *new])
    if not went_on or seen[0].status != 200 or seen[1].data or seen[1].closed:
        server.fail(
            f"with --workers {RACE_WORKERS} --queue {RACE_QUEUE}, a client came while the "
            f"worker, done with the one before, was held at its step {k}: it was "
            + ("answered " + repr(seen[1].data[:40]) if seen[1].data else "closed unanswered"
               if seen[1].closed else "never taken up")
            + f" (the one before got {seen[0].data[:40]!r}), expected it queued, then "
            "served by the worker\nWhile one connection is served and the queue is empty, "
            "the pool has room for one more, whatever step the worker is at.")
    return new[0]


def test_bounded_pool_count_survives_a_release_racing_an_accept(
        start: Callable[..., tuple[Server, Load]], learner: Any) -> None:
    """The count of connections taken in, raised by the accept loop and lowered by the
    workers, must come out right whatever step a worker is at when the accept loop takes a
    connection in: a `busy -= 1` is a read then a write, and a `busy += 1` between the two
    is lost. Every k in turn; then the pool must hold exactly its capacity."""
    folder = learner.tmp_folder()
    arm, fifo = folder / "arm", folder / "hold"
    os.mkfifo(fifo, 0o644)
    server, load = start("pool", "--workers", str(RACE_WORKERS), "--queue", str(RACE_QUEUE),
                         prelude=STEP_HOLD.format(given=GIVEN, arm=str(arm), hold=str(fifo)))
    busy = hold(load, server, 1)
    if not settle(server, lambda: count(server, busy, reading) == 1):
        return   # no worker serving: the other pool tests name that
    current: Client | None = busy[0]
    k = 0
    while current is not None:
        k += 1
        current = race_round(server, load, arm, fifo, k, current)
    arm.unlink()
    # The last round's client answered, the worker idle: one client for it, one queued.
    again = hold(load, server, 1)
    settle(server, lambda: count(server, again, reading) == 1)
    again += hold(load, server, 1)
    extra = load.open(1, "none")
    settle(server, lambda: all(s.closed for s in load.seen_by(extra)))
    queued, refused = load.seen_by(again)[1], load.seen_by(extra)[0]
    if queued.data or queued.closed or refused.status != 503:
        too_many = refused.status != 503
        server.fail(
            f"with --workers {RACE_WORKERS} --queue {RACE_QUEUE}, after a worker's end of "
            f"a connection was interleaved with the accept loop taking one in ({k - 1} "
            "steps, each in turn), the pool "
            + ("took in a third connection, expected 503: its count of connections taken "
               "in lost the accept loop's update" if too_many else
               "refused a client it had room for: its count of connections taken in lost "
               "a worker's update")
            + "\n`busy += 1` / `busy -= 1` on a shared int is a read, then a write: "
            "another thread's update between the two is lost, and the pool's bound drifts. "
            "Use a threading.BoundedSemaphore (acquire(blocking=False) / release()), or "
            "hold one lock around every read and write of the count.")
    load.finish(again)
    served(load, server, again, "pool, after the interleavings")


# ---------------------------------------------------------------------------------------
# 3. asyncio: one thread


def test_asyncio_serves_200_slow_clients_on_one_thread(
        start: Callable[..., tuple[Server, Load]]) -> None:
    server, load = start("asyncio")

    def one_thread(stage: str) -> None:
        if server.max_threads > 1:
            server.fail(
                f"the asyncio server ran {server.max_threads} threads ({stage}), expected "
                "1\nAn event loop serves every connection from its one thread: "
                "run_in_executor/to_thread per connection brings thread-per-request back "
                "(capped by the executor's size). Await the streams instead, and give "
                "start_server the listening socket (sock=listener): a host name makes it "
                "resolve in an executor thread.")

    gone = hold(load, server, DROPPED)
    settle(server, lambda: count(server, gone, reading) == DROPPED,
           watch_threads=True)
    one_thread(f"{DROPPED} clients connected")
    read = count(server, gone, reading)
    if read < DROPPED:
        early(load, server, gone)
        server.fail(
            f"with {DROPPED} slow clients connected, the asyncio server was reading {read} "
            f"of them at once, expected all {DROPPED}\n" + BLOCKED_LOOP)
    load.drop(gone[: DROPPED // 2], "fin")
    load.drop(gone[DROPPED // 2:], "rst")
    idle_after_clients_left(server)

    held = hold(load, server, CLIENTS)
    settle(server, lambda: count(server, held, reading) == CLIENTS,
           watch_threads=True)
    one_thread(f"{CLIENTS} slow clients held open")
    read = count(server, held, reading)
    if read < CLIENTS:
        early(load, server, held)
        server.fail(
            f"with {CLIENTS} slow clients connected, the asyncio server was reading {read} "
            f"of them at once, expected all {CLIENTS}\n" + BLOCKED_LOOP)
    load.finish(held)
    served(load, server, held, "asyncio")
    server.threads()
    one_thread(f"after answering {CLIENTS} clients")
    dropped_closed(load, server, gone, "asyncio")
    oversized_heads_closed(load, server)


SPIN_LIMIT = 1.0   # CPU seconds an idle server may burn before it is called a busy loop


def idle_after_clients_left(server: Server) -> None:
    """Its only clients gone (half closed, half reset, mid-request), the asyncio server has
    nothing to do: it must go to sleep, not burn its one thread in a loop that never
    waits - every other connection would wait behind it for ever."""
    burnt = cpu_burnt_while_idle(server.activity, SPIN_LIMIT, within=FAIL_WAIT / 3)
    if burnt is not None:
        server.fail(
            f"after its {DROPPED} clients left mid-request (half closed, half reset), the "
            f"asyncio server burnt {burnt:.1f} s of CPU with no connection left to serve: a "
            "coroutine loops without ever waiting, and holds the event loop - no other "
            "client is read again\nAt the end of a stream, reader.readline() and read() "
            "return b'' at once, every time: a loop that reads until the blank line and "
            "never checks for b'' spins for ever once the client has closed. Stop at b'' "
            "(the client left: close), or await reader.readuntil(HEAD_END), which raises "
            "IncompleteReadError.")


OVERSIZED = 2   # clients whose request head grows to clients.HUGE (1 MiB) and never ends


def oversized_heads_closed(load: Load, server: Server) -> None:
    """A request head that outgrows the StreamReader's limit (64 KiB by default) never
    becomes a request: readuntil() raises LimitOverrunError, and the connection must be
    closed on that way out too (read_request() ends such a client at MAX_HEAD in the other
    two models)."""
    huge = load.open(OVERSIZED, "huge")
    if settle(server, lambda: all(s.closed for s in load.seen_by(huge))):
        return
    left = sum(1 for s in load.seen_by(huge) if not s.closed)
    # Read to the last byte the client sent (nothing left in the receive queue): the server
    # is still reading, waiting for a blank line that never comes.
    still_reading = count(server, huge, reading)
    why = ("it read all of it and went on waiting for the blank line: nothing limits a "
           "request head, so any client makes the server buffer as much as it sends - stop "
           "at a limit (readuntil() raises LimitOverrunError past the StreamReader's 64 KiB; "
           "read_request() ends such a client at MAX_HEAD) and close"
           if still_reading else
           "it stopped reading (the head outgrew the StreamReader's limit and readuntil() "
           "raised LimitOverrunError, a ValueError) and that way out skipped the close - "
           "close the writer in a finally, on every way out, not only in the except "
           "clauses for the errors you expected")
    server.fail(
        f"{left} of {OVERSIZED} clients whose request head grew to 1 MiB of header lines "
        f"without ever ending were never closed by the asyncio server: {why}\nEach such "
        "connection holds a descriptor and its buffered bytes for good - a cheap way for "
        "anyone to exhaust the server.")


def early(load: Load, server: Server, clients: list[Client]) -> None:
    """Fail if the server answered or closed clients whose request head is not complete."""
    seen = load.seen_by(clients)
    done = [x for x in seen if x.data or x.closed]
    if done:
        first = next((x.data[:40] for x in done if x.data), "")
        got = f": got {first!r}" if first else ""
        server.fail(
            f"{len(done)} of {len(clients)} slow clients were "
            f"{'answered' if first else 'closed'} before their request was complete (they "
            f"had sent only its first lines, no blank line yet{got})"
            "\nA request head ends at the blank line (\\r\\n\\r\\n): await "
            "reader.readuntil(HEAD_END). One read() returns whatever has arrived so far - "
            "here only the request line - and a client whose head spans several segments "
            "gets answered too early or not at all.")


BLOCKED_LOOP = (
    "Something blocks the event loop: a blocking call in a coroutine (handle() or "
    "read_request() on a blocking socket, socket.recv, time.sleep) stops every other "
    "connection until it returns, and a slow client never lets it. Use "
    "asyncio.start_server(handle_async, sock=listener) and await reader.readuntil().")
