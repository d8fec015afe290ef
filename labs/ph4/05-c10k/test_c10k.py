"""ph4.5 verification: the learner's event-loop server (server.py) run as its own process,
10,000 clients held open at once from 4 client processes (clients.py; a process may hold
20,000 open files here, so the clients cannot share the server's or the test's process).

While all 10,000 are connected: the server's open descriptors (/proc/<pid>/fd) show it holds
them all, /proc/<pid>/task counts at most 2 threads, and its resident memory
(/proc/<pid>/status VmRSS) grew by at most 25 KiB per connection. Then every client sends a
line and must get it echoed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labrunner.testing import process_resources, wait_until

TOTAL, PROCESSES = 10_000, 4
PER_CONNECTION_KB = 25
READY = 30.0
CLIENTS = Path(__file__).with_name("clients.py")


class Resources:
    """The server's threads, descriptors and resident memory. Graded, the server runs as the
    learner's uid in a /proc the verification cannot see: then they are read by
    process_resources in the learner's host process, which runs beside the server."""

    def __init__(self, learner: Any, proc: subprocess.Popen[bytes]) -> None:
        self.learner, self.proc = learner, proc
        self.in_sight = Path(f"/proc/{proc.pid}/task").is_dir()

    def now(self) -> tuple[int, int, int]:
        if self.in_sight:
            seen = process_resources(self.proc.pid)
        else:
            seen = tuple(self.learner.run_helper(process_resources, self.proc.pid))
        if seen[0] < 0:
            gone = self.proc.poll()
            pytest.fail("the server exited" + (f" with status {gone}" if gone is not None
                                               else " or went out of the verification's sight")
                        + ": it must keep serving every connection", pytrace=False)
        return seen  # type: ignore[return-value]


class Lines:
    """A process's stdout, line by line, with a timeout per line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            with self.cond:
                self.lines.append(raw.decode(errors="replace").strip())
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<exit>")
            self.cond.notify_all()

    def next(self, timeout: float) -> str | None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.lines, timeout):
                return None
            return self.lines.pop(0)


@pytest.fixture
def server(learner: Any) -> Iterator[tuple[subprocess.Popen[bytes], int, Resources]]:
    proc = learner.python("server", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    resources = Resources(learner, proc)
    out = Lines(proc)
    line = out.next(READY)
    m = re.match(r"listening on (\d+)", line or "")
    if not m:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        pytest.fail(f"server.py did not print 'listening on <port>' (got {line!r})\n"
                    f"{proc.stderr.read().decode(errors='replace')[-1200:]}", pytrace=False)
    yield proc, int(m.group(1)), resources
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_ten_thousand_connections_at_once(server: Any) -> None:
    proc, port, resources = server
    base = resources.now()[2]
    share = TOTAL // PROCESSES
    clients = [subprocess.Popen([sys.executable, str(CLIENTS), str(port), str(share)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL) for _ in range(PROCESSES)]
    outs = [Lines(c) for c in clients]
    try:
        for i, out in enumerate(outs):
            line = out.next(120)
            if line != f"connected {share}":
                gone = proc.poll()
                pytest.fail(
                    f"client process {i + 1} could not connect its {share} clients: "
                    f"{line or 'no answer within 120 s'}"
                    + (f" - the server exited with status {gone}" if gone is not None else "")
                    + "\nAccept with a deep backlog (listen(4096)) from an event loop that "
                    "never blocks; select() cannot watch descriptors above 1024.",
                    pytrace=False)
        try:  # the kernel completes connections before the server accepts them
            wait_until(lambda: proc.poll() is not None or resources.now()[1] >= TOTAL,
                       "the server to accept every connection", 120)
        except BaseException:
            pass
        threads, fds_now, rss = resources.now()
        grown = rss - base
        assert fds_now >= TOTAL, (
            f"with {TOTAL} clients connected the server holds {fds_now} descriptors: it does "
            "not accept them all (select() cannot watch descriptors above 1024)")
        assert threads <= 2, (
            f"the server runs {threads} threads holding {TOTAL} connections, expected at "
            "most 2\nA thread per connection costs a stack and a scheduler entry each; at "
            "10,000 that is what C10K is about. One event loop (asyncio, selectors/epoll) "
            "serves them all from one thread.")
        assert grown <= TOTAL * PER_CONNECTION_KB, (
            f"the server's resident memory grew by {grown // 1024} MiB for {TOTAL} "
            f"connections ({grown // TOTAL} KiB each), expected at most {PER_CONNECTION_KB} "
            "KiB per connection\nKeep per-connection state small: no big buffers per "
            "connection, no thread stacks.")
        for c in clients:
            assert c.stdin is not None
            c.stdin.write(b"go\n")
            c.stdin.flush()
        echoed = 0
        for out in outs:
            line = out.next(180) or ""
            m = re.match(r"echoed (\d+)", line)
            echoed += int(m.group(1)) if m else 0
        after = resources.now()[0]
        assert after <= 2, (
            f"after echoing, the server runs {after} threads, expected at most 2\nHanding "
            "reads or writes to worker threads (asyncio.to_thread, an executor) brings the "
            "threads back; socket I/O belongs on the event loop.")
        assert echoed == TOTAL, (
            f"{echoed} of {TOTAL} connected clients got their line echoed, expected all\n"
            "Every connection must be served while the others stay open: echo each line as "
            "it arrives (do not wait for EOF), and never block the loop (no time.sleep, no "
            "blocking socket calls in a callback).")
    finally:
        for c in clients:
            try:
                assert c.stdin is not None
                c.stdin.write(b"close\n")
                c.stdin.close()
            except OSError:
                pass
        for c in clients:
            try:
                c.wait(30)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
