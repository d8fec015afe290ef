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
"""

from __future__ import annotations

import collections
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from labrunner.testing import (
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
ESTABLISHED, CLOSE_WAIT = 0x01, 0x08
CLIENTS = Path(__file__).with_name("clients.py")

Activity = tuple[int, int, tuple[tuple[int, int, int], ...]]


class Server:
    """server.py as the learner's program: its first line gives the port; stderr is kept
    (its last lines explain an exit). Graded, it runs as the learner's uid in a /proc the
    verification cannot see: its threads, descriptors, memory and activity are then read by
    labrunner's helpers in the learner's host process, which runs beside it."""

    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.proc = learner.python("server", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.in_sight = Path(f"/proc/{self.proc.pid}/task").is_dir()
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: collections.deque[str] = collections.deque(maxlen=30)
        threading.Thread(target=self._drain, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, False),
                         daemon=True).start()
        self.port = 0

    def _drain(self, stream: Any, keep_lines: bool) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode(errors="replace").rstrip()
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
        return seen  # type: ignore[return-value]

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
        pytest.fail(f"the server exited (status {self.proc.returncode}): {last}\nIt must keep "
                    f"serving every connection; this happened while: "
                    f"{message.splitlines()[0]}\n" + "\n".join(self.err)[-2000:],
                    pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Client:
    """One clients.py process: its lines, read as they come."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CLIENTS), str(port), str(SHARE),
                                      str(EARLY)],
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


@pytest.fixture
def server(learner: Any) -> Iterator[Server]:
    srv = Server(learner)
    try:
        srv.ready()
        yield srv
    finally:
        srv.stop()


def asleep_throughout(before: Activity, after: Activity) -> bool:
    """No thread of the server ran between the two readings, and none is runnable."""
    return before[0] == 0 and after[0] == 0 and before[1] == after[1] and (
        [t[0] for t in before[2]] == [t[0] for t in after[2]])


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
