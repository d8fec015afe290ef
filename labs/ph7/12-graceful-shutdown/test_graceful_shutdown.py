"""Verification for ph7.12 graceful-shutdown: the learner's C server, built with make
(-Wall -Wextra -Werror, AddressSanitizer + UndefinedBehaviorSanitizer) and run as a real
process. Slow requests are held open by the test itself (each waits for the client's
"END"), so "in flight when SIGTERM arrives" is a fact the test arranged, not a race won
by a sleep: five requests in flight all complete after SIGTERM, new connections are
refused meanwhile, the process exits 0 once drained, and a request that never finishes
does not hold the process past its drain deadline. A preloaded shim (gate_shim.c) arranges
the microsecond-wide races: SIGTERM between accept() and the worker's first line, between
the flag check and the wait, and the drain looking while the last answer is being sent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labrunner.testing import cpu_burnt_while_idle, process_activity, program_reading, thread_times

READY = 5.0       # seconds for "listening on <port>"
WAIT = 5.0        # seconds for an answer, or for the process to react
SLOW = 5          # requests in flight at SIGTERM
EXIT_GRACE = 2.0  # seconds a server that does not drain is given to finish exiting
# CPU seconds the server may use in those EXIT_GRACE s of its drain, while nothing it waits
# for can happen (the test's clients hold every request). A drain that sleeps between looks
# at the counter (the reference: usleep(5000), as Go's http.Server.Shutdown polls with a
# ticker) or blocks on a condition variable uses about 0.01 s, whatever the load: CPU time
# counts only while a thread runs. A drain that spins on the counter (an empty loop, a
# sched_yield() loop) runs whenever it is given the CPU: 1.6-1.8 s of the 2 s measured, and
# still 0.6-0.7 s on the shared 2-core machine at a load average of 15. Far from both.
SPIN_CPU = 0.2
# CPU seconds alone are a weak witness on a busy machine: a spinner gets only its share of
# the cores (0.25 s of the 2 s at a load average of 20, less at 150), and a drain that
# sleeps microseconds between looks (usleep(5) meant as 5 ms) uses less still. What load
# does not change is how the drain waits: how long each of its sleeps lasts. The scheduler
# counts it exactly: two readings of each thread's time on a CPU, time runnable waiting for
# one (/proc/<pid>/task/*/schedstat) and voluntary sleeps (status) during those 2 s give
# the busiest thread's time asleep (the rest of the 2 s) and awake, per sleep. The
# reference sleeps 5 ms per look (5.06-5.6 ms measured, at load averages of 10 to 25), a
# condition variable the whole 2 s at once; a microsecond sleep lasts 0.03-0.06 ms (the
# timer's slack included) however loaded the machine: 1 ms is 5x below the one and 15x
# above the other, with no estimate's noise in between (looks every SAMPLE s only estimated
# it: 0.06-0.11 ms from one run to the next, and by chance more on a crowded machine,
# where a few dozen looks catch a short sleep only now and then). A spin (an empty loop,
# sched_yield(), a timed wait whose deadline has passed) never sleeps: awake the whole 2 s
# for at most a sleep or two, and load only moves that time from running to waiting for a
# CPU, both awake. Where the kernel keeps no schedstats, the test looks at the threads'
# states every SAMPLE s instead and estimates both from the share of looks that found one
# running or runnable.
SAMPLE = 0.02
MAX_AWAKE = 0.2      # seconds awake per voluntary sleep above which the drain never sleeps
MIN_SLEEP = 0.001    # seconds asleep per sleep below which the drain hardly pauses
# An idle server (no client connected, nothing in flight) waits in its accept loop: the
# reference sleeps in ppoll() with no timeout, so two readings 0.2 s apart see it asleep
# throughout and the check ends at once. An accept loop that never blocks (a non-blocking
# accept() retried on EAGAIN, poll/ppoll/select with a zero timeout) burns a core doing
# nothing: IDLE_SPIN_CPU s of CPU, never seen asleep, within IDLE_WITHIN s is a busy loop.
# A loop that wakes up now and then (a poll timeout of 100 ms to look at a flag) is never
# seen asleep throughout either, but uses next to no CPU: undecided after IDLE_WITHIN s,
# it passes. A spinning loop burns about 0.9 s per second alone, still 0.3 s per second on
# the shared 2-core machine at a load average of 15: it crosses 0.3 s within a second or
# two, a correct server never comes near.
IDLE_SPIN_CPU = 0.3
IDLE_WITHIN = 6.0
SANITIZER_REPORT = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:")
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}

@pytest.fixture(scope="session")
def gate_shim_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gate_shim.c (next to this file) built once: preloaded, it holds one step of one
    request until the test opens a FIFO - see its header."""
    shim = tmp_path_factory.mktemp("gate") / "gate_shim.so"
    done = subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(shim),
                           str(Path(__file__).with_name("gate_shim.c")), "-ldl"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the test's gate_shim.c did not build: {done.stderr}")
    return shim


@pytest.fixture
def gate(learner: Any, gate_shim_built: Path) -> tuple[Path, Path]:
    """(the gate shim, its FIFO) in a folder the server can read: it runs as the learner's
    uid when grading (learner.popen), and the built shim's folder is the test's alone."""
    folder = learner.tmp_folder()
    shim = folder / "gate_shim.so"
    shutil.copy2(gate_shim_built, shim)
    fifo = folder / "gate"
    os.mkfifo(fifo)
    os.chmod(fifo, 0o644)   # the server opens it to read; only the test writes
    return shim, fifo


@pytest.fixture
def binary(learner: Any) -> Path:
    """Built with the c_examples Makefile (once per session: learner.build() keeps it)."""
    return learner.build() / "graceful_server"  # type: ignore[no-any-return]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    command: str = "graceful_server"
    port: int = 0
    stderr: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._ready = threading.Event()
        threading.Thread(target=self._pump_out, daemon=True).start()
        self._err_pump = threading.Thread(target=self._pump_err, daemon=True)
        self._err_pump.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            if (m := re.match(rb"listening on (\d+)", line)) and not self._ready.is_set():
                self.port = int(m.group(1))
                self._ready.set()

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            self.stderr += line

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY
        while time.monotonic() < deadline:
            if self._ready.wait(0.05):
                return
            if self.proc.poll() is not None:
                if self._ready.wait(2.0):  # it printed, then exited: its stdout is read last
                    return
                self._err_pump.join(2.0)  # all it wrote to stderr before it exited
                line = self.sanitizer_line()
                pytest.fail(f"`{self.command}` exited with status {self.proc.returncode} "
                            "before listening"
                            + (f": the sanitizers stopped it - {line}" if line else "")
                            + f"\nstderr: {self.err()[-600:]}", pytrace=False)
        pytest.fail(f"the server did not print 'listening on <port>' within {READY:.0f} s: "
                    "after listen(), print the bound port and fflush(stdout)", pytrace=False)

    def err(self) -> str:
        return self.stderr.decode(errors="replace").strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def sanitizer_line(self) -> str | None:
        """The line of stderr where a sanitizer's report begins (what it found), if any."""
        text = self.stderr.decode(errors="replace")
        match = SANITIZER_REPORT.search(text)
        if match is None:
            return None
        end = text.find("\n", match.end())
        return text[text.rfind("\n", 0, match.start()) + 1:end if end >= 0 else None].strip()

    def sanitizer_report(self) -> str | None:
        text = self.stderr.decode(errors="replace")
        match = SANITIZER_REPORT.search(text)
        return text[max(0, match.start() - 200):][:1500] if match else None


@pytest.fixture
def launch(learner: Any, binary: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(drain_ms: int | None = 30000, leak_check: bool = True,
              gate: tuple[Path, str, Path] | None = None) -> Server:
        env = {**os.environ, **SANITIZER_ENV}
        if not leak_check:  # an exit without LeakSanitizer's pass at exit is immediate
            env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
        if gate is not None:  # (shim, what to hold, FIFO)
            env["LD_PRELOAD"] = str(gate[0])
            env["SHUTDOWN_TEST_HOLD"], env["SHUTDOWN_TEST_GATE"] = gate[1], str(gate[2])
            env["ASAN_OPTIONS"] += ":verify_asan_link_order=0"
        # learner.popen: when grading, the learner's binary runs as the learner's uid.
        argv = [str(binary), "0"] + ([] if drain_ms is None else [str(drain_ms)])
        proc = learner.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        server = Server(proc, command=" ".join(["graceful_server"] + argv[1:]))
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        if server.alive():
            server.proc.kill()
            server.proc.wait()


# ---------------------------------------------------------------------------- a request


class Slow:
    """One slow request, held in flight until the test calls finish()."""

    def __init__(self, port: int, ident: str) -> None:
        self.ident = ident
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.buffer = b""
        self.sock.sendall(f"BEGIN {ident}\n".encode())
        started = self.line()
        assert started == f"STARTED {ident}", (
            f"request {ident}: expected 'STARTED {ident}' after 'BEGIN {ident}', saw "
            f"{started!r}: answer STARTED as soon as the request line arrived")

    @classmethod
    def already_sent(cls, sock: socket.socket, ident: str) -> Slow:
        """The request whose BEGIN the test sent on ``sock`` itself (a connection that may
        wait in the backlog), its STARTED not read yet."""
        request = cls.__new__(cls)
        request.ident, request.sock, request.buffer = ident, sock, b""
        return request

    def line(self) -> str | None:
        """The next line, or None on EOF, reset or timeout."""
        deadline = time.monotonic() + WAIT
        while b"\n" not in self.buffer and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except (TimeoutError, ConnectionResetError):
                return None
            if not chunk:
                return None
            self.buffer += chunk
        if b"\n" not in self.buffer:
            return None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def finish(self) -> str | None:
        try:
            self.sock.sendall(b"END\n")
        except OSError:
            return None
        return self.line()

    def close(self) -> None:
        self.sock.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # The listener closed while this probe sat in its accept queue: not refused yet
        # as far as this probe can tell; the next probe will know.
        return False
    return False


def killed_by(status: int | None, name: str = "SIGTERM") -> str:
    if status is not None and status < 0:
        return (f" (killed by signal {-status}: the default action of {name} ends the "
                "process at once, in-flight requests and all; install a handler with "
                "sigaction() that sets an atomic flag)")
    return ""


def sigterm(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)


# ---------------------------------------------------------------------------- the tests


def test_idle_server_exits_zero_on_sigterm(learner: Any, launch: Any) -> None:
    server = launch()
    done = Slow(server.port, "warmup")
    assert done.finish() == "DONE warmup", "a request was not answered DONE <id> after END"
    done.close()
    # Nothing to do now: no client connected, nothing in flight. The accept loop must wait
    # asleep for the next connection (or the signal), not spin looking for one.
    burnt = cpu_burnt_while_idle(
        lambda: program_reading(learner, server.proc, process_activity), IDLE_SPIN_CPU,
        IDLE_WITHIN)
    if burnt is not None and server.alive():
        pytest.fail(
            f"an idle server (no client connected, nothing in flight) used {burnt:.2f} s of "
            "CPU and was never seen asleep between two looks 0.2 s apart, expected it asleep "
            "in its accept loop's wait: the accept loop spins - a non-blocking accept() "
            "retried at once on EAGAIN, or poll/ppoll/select with a zero timeout, returns "
            "straight away and goes round again\nBlock until there is something to do: "
            "ppoll() on the listening socket with no timeout (NULL) and the old signal mask, "
            "so a connection or the stop signal wakes it. A server that burns a core while "
            "idle takes it from every other process on the machine, all day long.",
            pytrace=False)
    sigterm(server)
    status = server.wait_exit(WAIT)
    if status is None and refused(server.port):
        pytest.fail(
            f"an idle server was still running {WAIT:.0f} s after SIGTERM with nothing in "
            "flight, although it had stopped accepting (new connections refused): it saw "
            "the signal, and its drain waits out the deadline (30000 ms here) instead of "
            "ending as soon as the in-flight count is 0 - a loop condition that goes on "
            "while requests are in flight OR the deadline has not passed, or one that looks "
            "at the clock only\nDrain while "
            "in_flight > 0 AND now < deadline: whichever comes first ends it. A supervisor "
            "waits the whole grace period for a server with nothing left to do (every "
            "rolling update, every scale-down).",
            pytrace=False)
    if status is None:
        pytest.fail(
            f"an idle server was still running {WAIT:.0f} s after SIGTERM\nThe accept loop "
            "never saw the flag: with SA_RESTART (or signal(), which implies it) a blocked "
            "accept() is restarted by the kernel instead of returning EINTR, and a signal "
            "delivered to another thread does not interrupt it at all. Leave SA_RESTART out "
            "and keep the signal blocked outside one wait (ppoll/pselect with the old mask).",
            pytrace=False)
    report = server.sanitizer_report()
    assert report is None, f"the sanitizers reported an error:\n{report}"
    assert status == 0, (
        f"after SIGTERM with nothing in flight the server exited with status {status}, "
        f"expected 0{killed_by(status)}\nstderr: {server.err()[-400:]}")


@dataclass
class Drain:
    """What the server's threads did while it drained: its busiest thread's time awake
    (running or waiting for a CPU) and asleep, and its voluntary sleeps, as the scheduler
    counted them - or, without schedstats, as estimated from looks every SAMPLE s."""
    cpu: float = 0.0     # CPU seconds used (every thread)
    wall: float = 0.0    # seconds watched
    wakes: int = 0       # voluntary sleeps (context switches) of the busiest thread
    awake: float = 0.0   # seconds it ran or waited for a CPU
    looks: int = 0       # readings taken (2 when counted by the scheduler), 0: not watched
    how: str = "counted by the scheduler"

    def asleep_per_wake(self) -> float:
        """Seconds asleep per voluntary sleep."""
        return max(0.0, self.wall - self.awake) / max(1, self.wakes)

    def awake_per_wake(self) -> float:
        """Seconds running or runnable per voluntary sleep."""
        return self.awake / max(1, self.wakes)


def watch_drain(learner: Any, server: Server, seconds: float) -> Drain:
    """How the server's threads spend ``seconds`` of its drain (or until it exits)."""
    try:
        first = program_reading(learner, server.proc, thread_times)
    except RuntimeError:   # no schedstats in this kernel: estimate from looks
        return sampled_drain(learner, server, seconds)
    drain = Drain()
    if first[0] < 0:
        return drain   # gone already
    end = time.monotonic() + seconds
    while time.monotonic() < end and server.alive():
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    last = program_reading(learner, server.proc, thread_times)
    if last[0] < 0:
        return drain   # gone before the end: not watched (the exit is asserted first)
    before = {tid: (ran, waited, sleeps) for tid, ran, waited, sleeps in first[1]}
    spent = [(ran - before.get(tid, (0, 0, 0))[0], waited - before.get(tid, (0, 0, 0))[1],
              sleeps - before.get(tid, (0, 0, 0))[2]) for tid, ran, waited, sleeps in last[1]]
    ran, waited, sleeps = max(spent, key=lambda t: (t[0] + t[1], t[2]))
    drain.looks, drain.wall = 2, (last[0] - first[0]) / 1e9
    drain.cpu = sum(t[0] for t in spent) / 1e9
    drain.awake, drain.wakes = (ran + waited) / 1e9, sleeps
    return drain


def sampled_drain(learner: Any, server: Server, seconds: float) -> Drain:
    """:func:`watch_drain` where the kernel keeps no schedstats: look at the threads every
    SAMPLE s; the share of looks that found one running or runnable, times the time watched,
    estimates the time awake (every thread's voluntary sleeps counted)."""
    drain = Drain(how="estimated from looks")
    first = program_reading(learner, server.proc, process_activity)
    if first[1] < 0:
        return drain
    started = last_time = time.monotonic()
    last, awake_looks = first, 0
    while time.monotonic() - started < seconds:
        time.sleep(SAMPLE)
        reading = program_reading(learner, server.proc, process_activity)
        if reading[1] < 0:
            break
        drain.looks += 1
        awake_looks += reading[0] != 0
        last, last_time = reading, time.monotonic()
    before = dict((tid, sleeps) for tid, sleeps, _ in first[2])
    drain.wakes = sum(sleeps - before.get(tid, 0) for tid, sleeps, _ in last[2])
    drain.cpu = (last[1] - first[1]) / 1e9
    drain.wall = last_time - started
    drain.awake = awake_looks / max(1, drain.looks) * drain.wall
    return drain


def test_five_in_flight_complete_new_refused_then_exit_zero(learner: Any,
                                                            launch: Any) -> None:
    server = launch(leak_check=False)  # leaks are checked by the idle test
    port = server.port
    slow = [Slow(port, f"req-{n}") for n in range(SLOW)]  # all five in flight, all STARTED
    try:
        sigterm(server)
        # Stop accepting: a listening socket still open would let the kernel complete the
        # handshake into a backlog nobody accepts from; closed, connect() is refused.
        deadline = time.monotonic() + WAIT
        while not refused(port):
            if not server.alive() or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        # Give a server that returns from main() without draining the time to finish
        # exiting (its worker threads keep answering until the exit completes): a drained
        # server is still here after this wait whatever the load, since nothing it waits
        # for has happened yet. Meanwhile it drains with nothing to do: it must wait
        # asleep, not spin on the counter.
        drain = watch_drain(learner, server, EXIT_GRACE)
        status = server.wait_exit(0.05)
        assert status is None, (
            f"the server exited (status {status}) while {SLOW} requests were still in "
            f"flight{killed_by(status)}\nAfter SIGTERM, drain: wait until the in-flight "
            "counter is 0 before returning from main(); returning ends every thread.")
        cpu, wall = drain.cpu, drain.wall
        watched = drain.looks > 0   # not when it was gone before the first look
        seen = (f"its busiest thread slept {drain.wakes} times in {wall:.1f} s of its "
                f"drain, running or waiting for a CPU for {drain.awake:.2f} s of it "
                f"({drain.how}; {cpu:.2f} s of CPU)")
        assert not watched or drain.awake_per_wake() <= MAX_AWAKE, (
            f"after SIGTERM, with {SLOW} requests in flight that none could finish (the "
            f"test's clients held them), {seen}: expected it asleep between looks at the "
            "counter, or in one long wait on a condition variable - the drain spins, never "
            "sleeping (an empty loop, sched_yield(), or a timed wait whose deadline has "
            "already passed: pthread_cond_timedwait measures CLOCK_REALTIME unless the "
            "condition variable was given CLOCK_MONOTONIC with pthread_condattr_setclock, so "
            "a monotonic time is decades in its past and the wait returns ETIMEDOUT at "
            "once)\nWait between looks: sleep a few ms (usleep(5000)), or wait on a "
            "condition variable until the deadline, on the clock the deadline was taken "
            "from. A spinning drain takes a core from the requests it waits for.")
        assert not watched or drain.asleep_per_wake() >= MIN_SLEEP, (
            f"after SIGTERM, with {SLOW} requests in flight that none could finish (the "
            f"test's clients held them), {seen}: about "
            f"{drain.asleep_per_wake() * 1e6:.0f} us asleep each time, expected a few ms "
            "between looks at the counter - the drain hardly pauses: a sleep of "
            "microseconds (usleep(5), or nanosleep with tv_nsec = 5000, meant as 5 ms: "
            "usleep counts microseconds, tv_nsec nanoseconds)\nSleep a few ms between "
            "looks (usleep(5000), nanosleep of 5000000 ns), or wait on a condition variable "
            "until the deadline.")
        assert not watched or cpu < SPIN_CPU, (
            f"after SIGTERM, with {SLOW} requests in flight that none could finish (the "
            f"test's clients held them), the server used {cpu:.2f} s of CPU in {wall:.1f} s "
            "of its drain, expected next to none: the drain spins, looking at the in-flight "
            "counter again and again (an empty loop body, or sched_yield(), which returns at "
            "once when nothing else is runnable)\nWait between looks: sleep a little "
            "(nanosleep/usleep of a few ms, as Go's http.Server.Shutdown polls with a "
            "ticker), or block on a condition variable the workers signal when the count "
            "drops. A spinning drain takes a whole core from the requests it waits for, "
            "during the very grace period they have to finish in.")
        assert refused(port), (
            f"{WAIT:.0f} s after SIGTERM a new connection to port {port} was still accepted, "
            "expected it refused\nStop accepting by close()-ing the listening socket when "
            "the flag is set: a socket left listening (even if accept() is never called "
            "again) lets clients connect into the backlog and hang, and accepting them to "
            "close them at once fails their requests instead of sending them elsewhere.")
        answers = []
        for n, request in enumerate(slow):
            answers.append(request.finish())
            if n < SLOW - 1:
                status = server.proc.poll()
                assert status is None, (
                    f"the server exited (status {status}) after {n + 1} of the {SLOW} "
                    f"in-flight requests completed, expected it to wait for all"
                    f"{killed_by(status)}: drain until the in-flight count is 0")
        want = [f"DONE req-{n}" for n in range(SLOW)]
        assert answers == want, (
            f"after SIGTERM the {SLOW} requests in flight got {answers}, expected {want}\n"
            "A request already accepted must still be answered during shutdown (None means "
            "the connection was cut): count requests in flight (atomic) and wait for 0.")
        status = server.wait_exit(WAIT)
        assert status is not None, (
            f"every request had completed but the server was still running {WAIT:.0f} s "
            "later: once the in-flight counter reaches 0, return 0 from main()")
        report = server.sanitizer_report()
        assert report is None, f"the sanitizers reported an error:\n{report}"
        assert status == 0, (
            f"after draining, the server exited with status {status}, expected 0"
            f"{killed_by(status)}\nstderr: {server.err()[-400:]}")
    finally:
        for request in slow:
            request.close()


# The drain deadline of the stuck-request test, and how late after it the process may end:
# the reference looks at the clock every 5 ms and exits within a few ms of its deadline. A
# drain that sleeps a whole second between looks (sleep(1)) ends at the first look past the
# deadline, 2 s after the signal: 0.8 s late, every time (later still under load).
DRAIN_MS = 1200
LATE = 0.6   # a loaded machine adds to the exit; sleep(1) is 0.8 s late at best
# How much earlier than DRAIN_MS after the signal a server may end its drain: a coarse
# clock's tick (CLOCK_MONOTONIC_COARSE: 4 ms). A deadline in whole seconds (time(),
# DRAIN_MS / 1000) ends 0.2 to 1.2 s early, every time.
EARLY = 0.05


def test_a_stuck_request_does_not_hold_shutdown_past_the_deadline(launch: Any) -> None:
    server = launch(drain_ms=DRAIN_MS, leak_check=False)  # leaks are checked by the idle test
    up = time.monotonic()
    stuck = Slow(server.port, "stuck")      # never finished by the client
    quick = Slow(server.port, "quick")
    try:
        # The server has been running longer than its drain deadline when the signal comes
        # (a lower bound on elapsed time, not a race): the deadline counts from the SIGTERM,
        # so a deadline taken at start-up would already have passed.
        time.sleep(max(0.0, up + 1.8 - time.monotonic()))
        sent = time.monotonic()   # the server's drain cannot begin before this
        sigterm(server)
        signalled = time.monotonic()
        # Two requests are in flight and the deadline is DRAIN_MS after the signal: whatever
        # the load, the server is still there 0.5 s after it.
        status = server.wait_exit(0.5)
        assert status is None, (
            f"the server exited (status {status}) {time.monotonic() - signalled:.2f} s after "
            f"SIGTERM with 2 requests in flight, before its drain deadline of {DRAIN_MS} ms: "
            f"it had been running {signalled - up:.1f} s - the deadline counts from the "
            "signal (compute now + DRAIN_MS when the flag is seen, after the accept loop); a "
            "deadline taken at start-up has already passed, and one in whole seconds "
            "(time(), DRAIN_MS / 1000) ends up to a second early - it is milliseconds"
            f"{killed_by(status)}")
        answer = quick.finish()
        assert answer == "DONE quick", (
            "after SIGTERM, a request in flight was not answered: drain before exiting")
        status = server.wait_exit(DRAIN_MS / 1000 + WAIT)
        took = time.monotonic() - signalled
        # A lower bound, not a race: the drain began after `sent`, and the stuck request
        # holds it until its deadline, so a correct server exits DRAIN_MS after `sent` at
        # the earliest (EARLY covers a coarse clock's tick).
        lasted = time.monotonic() - sent
        assert status is None or lasted >= DRAIN_MS / 1000 - EARLY, (
            f"with one request still in flight the server exited {lasted:.2f} s after "
            f"SIGTERM, {DRAIN_MS / 1000 - lasted:.2f} s BEFORE its drain deadline of "
            f"{DRAIN_MS} ms: it cut a request the grace period still had time for\nThe "
            "deadline is in milliseconds: time() counts whole seconds and DRAIN_MS / 1000 "
            "in integers drops the rest (1200 ms becomes 1 s, ended at the next tick of "
            "the second: anywhere up to a second early). Take CLOCK_MONOTONIC "
            "(clock_gettime) at the signal, add DRAIN_MS in ms (or in ns, in 64 bits), and "
            "wait while now < deadline.")
        assert status is not None, (
            f"one request never finished and the server was still running {took:.1f} s "
            f"after SIGTERM with a drain deadline of {DRAIN_MS} ms (argv[2])\nDrain with a "
            "deadline: a client that never completes must not keep the process alive; a "
            "supervisor sends SIGKILL after its grace period anyway (Kubernetes: "
            "terminationGracePeriodSeconds). Wait while in_flight > 0 AND now < deadline.")
        assert took <= DRAIN_MS / 1000 + LATE, (
            f"with one request that never finished, the server exited {took:.2f} s after "
            f"SIGTERM: {took - DRAIN_MS / 1000:.2f} s past its drain deadline of {DRAIN_MS} "
            f"ms, expected within {LATE} s of it\nThe drain looks at the clock too seldom: "
            "it sleeps a long step (a whole second?) between looks, and notices the "
            "deadline (and the last answer) only at the next look. The deadline is the "
            "grace period the supervisor gives before SIGKILL: sleep a few ms between "
            "looks, or no longer than the time left (pthread_cond_timedwait until the "
            "deadline, with the workers signalling the condition).")
        assert status == 0, (
            f"after the drain deadline the server exited with status {status}, expected 0"
            f"{killed_by(status)}\nstderr: {server.err()[-400:]}")
        assert stuck.line() is None, "the stuck request got an answer it never asked for"
    finally:
        stuck.close()
        quick.close()


def hang_up_after_started(port: int) -> str:
    gone = Slow(port, "gone")  # STARTED: accepted and counted
    gone.close()
    return "a client that hung up after STARTED, before sending END"


def health_check_connect_close(port: int) -> str:
    socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    return ("a TCP health check (a load balancer's probe) that connected and closed without "
            "sending a byte")


@pytest.mark.parametrize("hang_up", [hang_up_after_started, health_check_connect_close],
                         ids=["after-STARTED", "health-check"])
def test_a_connection_its_client_dropped_does_not_hold_the_drain(launch: Any,
                                                                  hang_up: Any) -> None:
    """A connection the client closes before its request is done ends the request too:
    the in-flight count goes down on that way out as well, or the drain waits for it until
    the deadline (30 s here) - every shutdown then takes the whole grace period."""
    server = launch(leak_check=False)  # leaks are checked by the idle test
    dropped = hang_up(server.port)
    kept = Slow(server.port, "kept")   # accepted after the dropped one (one accept loop)
    try:
        sigterm(server)
        assert kept.finish() == "DONE kept", (
            "after SIGTERM the request in flight was not answered DONE: drain before exiting")
        status = server.wait_exit(WAIT)
        assert status is not None, (
            f"{dropped}, then SIGTERM came and the one request left in flight was answered; "
            f"the server was still running {WAIT:.0f} s later, its drain deadline 30 s away, "
            "expected it to exit at once: the dropped connection was never counted down, so "
            "the drain waits for a request that is gone\nDecrement the in-flight counter on "
            "every way out of a worker - the read that returns 0 (EOF) or an error included, "
            "not only after DONE: one decrement at the end of the worker, after close(fd).")
        assert status == 0, (
            f"after draining, the server exited with status {status}, expected 0"
            f"{killed_by(status)}\nstderr: {server.err()[-400:]}")
    finally:
        kept.close()


# ------------------------------------------------- races arranged with the test's gate


def held(server: Server, what: str) -> bool:
    """True once the gate reports it holds ``what`` (within WAIT)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if f"[test-gate] holding {what}".encode() in server.stderr:
            return True
        if not server.alive():
            return False
        time.sleep(0.01)
    return False


def open_gate(fifo: Path, *, wait: bool = True) -> None:
    """Let the held step go on: open the FIFO for writing once the gate has it open for
    reading (ENXIO until then: the gate prints its line just before it opens)."""
    deadline = time.monotonic() + (WAIT if wait else 0)
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def test_a_request_accepted_before_sigterm_is_drained_even_if_its_thread_has_not_run(
        launch: Any, gate: tuple[Path, Path]) -> None:
    gate_shim, fifo = gate
    server = launch(leak_check=False, gate=(gate_shim, "worker", fifo))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    try:
        sock.sendall(b"BEGIN early\n")
        assert held(server, "worker"), (
            "the server did not create a thread for an accepted connection within "
            f"{WAIT:.0f} s (the test holds the first thread's start, to send SIGTERM between "
            "accept() and the worker's first line)")
        sigterm(server)  # accepted, its thread created but not yet running
        status = server.wait_exit(EXIT_GRACE / 2)
        assert status is None, (
            f"the server exited (status {status}) after SIGTERM although it had accepted a "
            "connection whose worker thread had not started yet: that request was never "
            "counted as in flight, so the drain saw 0 and cut it - count a request in "
            "main() right after accept() returns, before creating its thread (a thread "
            "that counts itself is invisible to the drain until the scheduler runs it)"
            f"{killed_by(status)}")
        open_gate(fifo)
        request = Slow.__new__(Slow)
        request.ident, request.sock, request.buffer = "early", sock, b""
        assert request.line() == "STARTED early", (
            "the request accepted before SIGTERM was not answered STARTED once its thread "
            "ran: drain lets requests already accepted finish")
        assert request.finish() == "DONE early", (
            "the request accepted before SIGTERM was not answered DONE: drain before exiting")
        status = server.wait_exit(WAIT)
        assert status == 0, (
            f"after draining, the server exited with status {status}, expected 0"
            f"{killed_by(status)}")
    finally:
        open_gate(fifo, wait=False)
        sock.close()


def test_a_request_counts_as_in_flight_until_its_answer_is_out(
        launch: Any, gate: tuple[Path, Path]) -> None:
    gate_shim, fifo = gate
    server = launch(leak_check=False, gate=(gate_shim, "done", fifo))
    request = Slow(server.port, "last")
    try:
        sigterm(server)
        deadline = time.monotonic() + WAIT
        while not refused(server.port) and server.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            request.sock.sendall(b"END\n")
        except ConnectionError as error:
            pytest.fail(
                f"after SIGTERM the server dropped the request in flight ({error}) before it "
                "had sent its last line: keep serving the connections already accepted "
                "until their answers are out; stop only accepting new ones",
                pytrace=False)
        if held(server, "DONE"):  # the worker is about to send DONE: the test holds it there
            status = server.wait_exit(EXIT_GRACE / 2)
            assert status is None, (
                f"the server exited (status {status}) while its last request's answer "
                "'DONE last' was still being sent: the request stopped counting as in "
                "flight before its answer was out, so the drain saw 0 and main() returned "
                "- decrement the in-flight counter after the answer is sent (and the "
                f"socket closed), not when END is read{killed_by(status)}")
        open_gate(fifo)
        assert request.line() == "DONE last", (
            "after SIGTERM the request in flight was not answered 'DONE last': drain "
            "until its answer is out")
        status = server.wait_exit(WAIT)
        assert status == 0, (
            f"after draining, the server exited with status {status}, expected 0"
            f"{killed_by(status)}")
    finally:
        open_gate(fifo, wait=False)
        request.close()


NO_THREAD = b"[test-gate] pthread_create fails with EAGAIN"


def unlucky_outcome(server: Server, sock: socket.socket) -> str | None:
    """What became of the connection whose thread the gate refused: None once it is closed
    (or served to its end, if the server made its thread on a retry), else what was seen."""
    request = Slow.__new__(Slow)
    request.ident, request.sock, request.buffer = "unlucky", sock, b""
    first = request.line()
    if first is None:
        return None
    if first != "STARTED unlucky":
        return f"it answered {first!r}"
    done = request.finish()
    return None if done == "DONE unlucky" else f"it answered STARTED, then {done!r}"


def test_a_connection_whose_thread_could_not_be_made_is_not_counted_for_ever(
        launch: Any, gate: tuple[Path, Path]) -> None:
    """pthread_create() fails now and then (EAGAIN: a process at its thread limit, no
    memory for a stack). The gate makes the first one after an accept fail: that connection
    can only be closed (or served by a retry), and it is then no longer in flight - a +1
    never given back keeps every later drain waiting for a request that does not exist,
    until the deadline cuts the real ones too. And the server goes on serving."""
    gate_shim, fifo = gate
    server = launch(leak_check=False, gate=(gate_shim, "nothread", fifo))
    unlucky = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    try:
        unlucky.sendall(b"BEGIN unlucky\n")
        seen = unlucky_outcome(server, unlucky)
        assert seen is None, (
            f"the connection whose pthread_create() failed (EAGAIN) was neither closed nor "
            f"served: {seen}; expected it closed (or served, if a retry made its thread)")
    finally:
        unlucky.close()
    failed = NO_THREAD in server.stderr
    try:
        later = Slow(server.port, "later")
    except OSError as error:
        pytest.fail(
            f"after one pthread_create() failed (EAGAIN) for an accepted connection, the "
            f"server no longer served new ones ({type(error).__name__}: {error}), expected it "
            "to go on accepting\nA failed pthread_create() concerns that one connection: "
            "close it, give back its in-flight count, and keep accepting - a passing "
            "shortage must not stop the server.", pytrace=False)
    answer = later.finish()
    later.close()
    assert answer == "DONE later", (
        f"after one pthread_create() failed, the next request was answered {answer!r}, "
        "expected 'DONE later'")
    sigterm(server)  # nothing in flight: the drain has nothing to wait for
    status = server.wait_exit(WAIT)
    if status is None and failed:
        pytest.fail(
            f"with nothing in flight (the one connection whose pthread_create() failed "
            f"with EAGAIN was closed, the other answered) the server was still draining "
            f"{WAIT:.0f} s after SIGTERM, with a drain deadline of 30 s: the connection "
            "counted +1 after accept() was never counted down when its thread could not be "
            "made\nGive the count back on every path that ends a request: when "
            "pthread_create() fails, close the descriptor AND decrement in_flight.",
            pytrace=False)
    assert status is not None, (
        f"with nothing in flight the server was still running {WAIT:.0f} s after SIGTERM: "
        "once the in-flight counter is 0, return 0 from main()")
    assert status == 0, (
        f"after SIGTERM with nothing in flight the server exited with status {status}, "
        f"expected 0{killed_by(status)}\nstderr: {server.err()[-400:]}")


# How long the test watches an accept loop that has run out of descriptors (a connection
# waiting in the backlog, accept() failing with EMFILE): a loop that retries at once never
# sleeps, awake the whole time (MAX_AWAKE per sleep is 0.2 s); the reference backs off 5,
# 10, 20... ms, each a sleep the scheduler counts.
NOFILE_WATCH = 0.5
NO_DESCRIPTOR = re.compile(rb"\[test-gate\] RLIMIT_NOFILE (\d+): no descriptor free")
EMFILE_FIRST = b"[test-gate] accept fails with EMFILE"
EMFILE_FAILURES = re.compile(rb"\[test-gate\] accept failed with EMFILE (\d+) times")
EMFILE_RULE = (
    "accept() fails with EMFILE when the process has no descriptor left (ENFILE: the "
    "system), and the connection stays in the backlog: ppoll() says 'readable' again at "
    "once, so a loop that just goes round again spins a core until some request closes "
    "its socket. Back off before the next accept() - a few ms, doubling (Go's http.Server: "
    "5 ms up to 1 s; nginx stops accepting for 500 ms) in a wait the stop signal still "
    "ends (ppoll(NULL, 0, &pause, &old_mask)) - or stop accepting until a request ends; "
    "never leave the loop: the shortage passes when a connection closes.")


def test_accept_out_of_descriptors_backs_off_and_goes_on(
        learner: Any, launch: Any, gate: tuple[Path, Path]) -> None:
    """The gate lowers the server's RLIMIT_NOFILE as it accepts its first connection, to
    the descriptors in use: the next connection waits in the backlog and accept() fails
    with EMFILE, for real, until the first request's socket is closed."""
    gate_shim, fifo = gate
    server = launch(leak_check=False, gate=(gate_shim, "nofile", fifo))
    first = Slow(server.port, "first")
    second = socket.socket()
    second.settimeout(WAIT)
    try:
        deadline = time.monotonic() + WAIT   # the line is written before the thread starts
        while (limited := NO_DESCRIPTOR.search(server.stderr)) is None and server.alive() \
                and time.monotonic() < deadline:     # and read by the test's pump thread
            time.sleep(0.01)
        assert limited, ("the gate did not lower RLIMIT_NOFILE when the server accepted its "
                         f"first connection (stderr: {server.err()[-300:]})")
        what = ("with every descriptor in use (RLIMIT_NOFILE "
                f"{limited.group(1).decode()}) and a second connection waiting in the "
                "backlog, so that accept() failed with EMFILE")
        try:
            second.connect(("127.0.0.1", server.port))
            second.sendall(b"BEGIN second\n")
            reset = ""
        except OSError as error:   # the listener closed with it in the backlog: judged below
            reset = f" (reset before its request went out: {error})"
        # the connection is in the backlog: watch once accept() has failed (a server that
        # stops accepting before it fails, knowing its limit, is watched after 1 s)
        deadline = time.monotonic() + 1.0
        while EMFILE_FIRST not in server.stderr and time.monotonic() < deadline:
            time.sleep(0.01)
        watch = watch_drain(learner, server, NOFILE_WATCH)
        alive = server.alive()
        seen = (f"its busiest thread slept {watch.wakes} times in {watch.wall:.2f} s, running "
                f"or waiting for a CPU for {watch.awake:.2f} s of it ({watch.how}; "
                f"{watch.cpu:.2f} s of CPU)")
        assert not alive or watch.looks == 0 or watch.awake_per_wake() <= MAX_AWAKE, (
            f"{what}, {seen}: expected it asleep between tries - the accept loop spins, "
            f"retrying accept() at once\n{EMFILE_RULE}")
        assert not alive or watch.looks == 0 or watch.asleep_per_wake() >= MIN_SLEEP, (
            f"{what}, {seen}: about {watch.asleep_per_wake() * 1e6:.0f} us asleep each "
            "time, expected a few ms between tries - the accept loop hardly pauses (a sleep "
            f"of microseconds: usleep counts microseconds, tv_nsec nanoseconds)\n{EMFILE_RULE}")
        answer = first.finish()
        assert answer == "DONE first", (
            f"{what}, the first request was answered {answer!r} after END, expected "
            f"'DONE first'{killed_by(server.proc.poll())}")
        waiting = Slow.already_sent(second, "second")
        started = None if reset else waiting.line()
        failures = EMFILE_FAILURES.search(server.stderr)
        tried = f" ({failures.group(1).decode()} failures)" if failures else ""
        assert started == "STARTED second", (
            f"{what}{tried}, the first request then ended and closed its socket, freeing a "
            "descriptor; the waiting connection got "
            + (f"{started!r}" if started else f"no answer (closed, or nothing){reset}")
            + f" within {WAIT:.0f} s, expected 'STARTED second' - the server stopped "
            "accepting on EMFILE"
            + (f" (it exited, status {server.proc.poll()})" if not server.alive() else "")
            + f"\n{EMFILE_RULE}")
        assert waiting.finish() == "DONE second", (
            "the connection accepted once a descriptor was free was not answered "
            "'DONE second' after END")
        sigterm(server)
        status = server.wait_exit(WAIT)
        assert status == 0, (
            f"after SIGTERM with nothing in flight the server "
            f"{'was still running' if status is None else f'exited with status {status}'} "
            f"{WAIT:.0f} s later, expected exit 0{killed_by(status)}")
    finally:
        first.close()
        second.close()


def test_a_sigterm_between_the_flag_check_and_the_wait_is_not_lost(
        launch: Any, gate: tuple[Path, Path]) -> None:
    gate_shim, fifo = gate
    # The gate sends SIGTERM when the thread that accepted the first connection next calls
    # a wait (poll, ppoll, accept...), on entry: after the loop has read its flag as false,
    # before the call has blocked. A supervisor's signal lands there whenever it comes
    # while the loop goes round; here it lands there every time.
    server = launch(leak_check=False, gate=(gate_shim, "signal", fifo))
    request = Slow(server.port, "first")
    try:
        deadline = time.monotonic() + WAIT
        while (sent := re.search(rb"\[test-gate\] SIGTERM before (\w+)", server.stderr)) is None:
            if not server.alive() or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        answer = request.finish()
        assert answer == "DONE first", (
            f"the request in flight when SIGTERM came was answered {answer!r}, expected "
            "'DONE first': drain lets requests already accepted finish")
        if sent is None:  # the accepting thread waits in a call the gate does not know
            sigterm(server)
        call = sent.group(1).decode() if sent else "its wait"
        status = server.wait_exit(WAIT)
        assert status is not None, (
            f"SIGTERM arrived just before the accept loop called {call}() (after it had "
            f"read its flag as false) and the server was still running {WAIT:.0f} s later, "
            "with nothing in flight: a lost wakeup - the handler set the flag, then "
            f"{call}() blocked waiting for a connection that never comes\nChecking a flag "
            "and then waiting leaves a window: keep SIGTERM blocked (pthread_sigmask) "
            "everywhere except inside the wait, which unblocks it atomically (ppoll, "
            "pselect or epoll_pwait with the old mask), or make the handler wake the wait "
            "(a self-pipe, signalfd) - not pthread_sigmask(unblock) then poll(), not a "
            "blocking accept().")
        assert status == 0, (
            f"after draining, the server exited with status {status}, expected 0"
            f"{killed_by(status)}\nstderr: {server.err()[-400:]}")
    finally:
        request.close()


# ------------------------------------------------- the other stop signal, the first moment


def test_sigint_drains_like_sigterm(launch: Any) -> None:
    """SIGINT (Ctrl-C, and what some supervisors send) is a stop signal too: the same
    handler, the same drain - not the default action, not an exit on the spot."""
    server = launch(leak_check=False)  # leaks are checked by the idle test
    request = Slow(server.port, "ctrl-c")
    try:
        server.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + WAIT
        while not refused(server.port) and server.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        status = server.proc.poll()
        assert status is None, (
            f"the server exited (status {status}) on SIGINT while a request was in flight"
            f"{killed_by(status, 'SIGINT')}\nSIGINT (Ctrl-C) stops the server like SIGTERM: "
            "install the same handler for both (and block both outside the wait), so it "
            "stops accepting and drains instead of cutting the request.")
        answer = request.finish()
        status = server.wait_exit(WAIT)
        after = "was still running" if status is None else f"exited with status {status}"
        assert answer == "DONE ctrl-c", (
            f"the request in flight when SIGINT came was answered {answer!r}, expected "
            f"'DONE ctrl-c' (the server {after}{killed_by(status, 'SIGINT')})\nSIGINT stops "
            "the server like SIGTERM: stop accepting, drain, then exit 0.")
        assert status is not None, (
            f"after SIGINT the request in flight completed and the server was still running "
            f"{WAIT:.0f} s later: SIGINT must end the accept loop like SIGTERM (the same "
            "handler, and SIGINT in the mask that only the wait unblocks)")
        assert refused(server.port), "after SIGINT new connections were not refused"
        assert status == 0, (
            f"after SIGINT and its drain the server exited with status {status}, expected 0"
            f"{killed_by(status, 'SIGINT')}\nstderr: {server.err()[-400:]}")
    finally:
        request.close()


def test_a_sigterm_the_moment_the_server_is_ready_is_not_lost(
        launch: Any, gate: tuple[Path, Path]) -> None:
    """The gate sends SIGTERM right after the server's fflush(stdout) of 'listening on
    <port>': a supervisor may stop a process at any moment once it says it is up. The
    handler must already be in place, and the signal kept (blocked, then taken in the
    wait), not ignored or left to its default action."""
    gate_shim, fifo = gate
    server = launch(leak_check=False, gate=(gate_shim, "ready", fifo))
    deadline = time.monotonic() + WAIT
    while b"[test-gate] SIGTERM after fflush" not in server.stderr:
        if not server.alive() or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    sent = b"[test-gate] SIGTERM after fflush" in server.stderr
    if not sent:  # the port went out without fflush(stdout): signal it now, as it is up
        sigterm(server)
    when = ("just after it flushed 'listening on <port>'" if sent
            else "as soon as it printed 'listening on <port>'")
    status = server.wait_exit(WAIT)
    assert status is not None, (
        f"SIGTERM came {when} and the server was still running {WAIT:.0f} s later, with "
        "nothing in flight: the signal was lost (ignored while the server started, or set "
        "before the handler and never seen by the accept loop)\nA supervisor may stop a "
        "process the moment it says it is up: install the handler and block the stop "
        "signals before listening and printing the port; a signal that comes early then "
        "waits, pending, for the accept loop's wait.")
    assert status == 0, (
        f"SIGTERM came {when} and the server exited with status {status}, expected 0"
        f"{killed_by(status)}\nThe handler was not installed yet when the server said it "
        "was ready: install it (sigaction) before listening and printing the port - a "
        "supervisor may stop a process at any moment once it is up.\n"
        f"stderr: {server.err()[-400:]}")


# ----------------------------------------------------------------- DRAIN_MS left out


def test_without_drain_ms_the_default_drain_holds_a_request(launch: Any) -> None:
    """`graceful_server 0`, no DRAIN_MS: the drain still waits, up to its default of
    10000 ms. A request in flight at SIGTERM keeps the server there well past half a
    second (a lower bound far below the default, not a race), is answered, then exit 0."""
    server = launch(drain_ms=None, leak_check=False)  # leaks are checked by the idle test
    request = Slow(server.port, "default")
    try:
        sigterm(server)
        signalled = time.monotonic()
        status = server.wait_exit(0.5)
        assert status is None, (
            f"started without DRAIN_MS, the server exited (status {status}) "
            f"{time.monotonic() - signalled:.2f} s after SIGTERM with a request in flight: "
            "the default drain deadline is 10000 ms (10 s) - without argv[2] the server "
            "must still wait for the requests it accepted, up to 10 s, not cut them (a "
            f"default of 10 read as milliseconds, or 0){killed_by(status)}")
        answer = request.finish()
        assert answer == "DONE default", (
            f"started without DRAIN_MS, the request in flight at SIGTERM was answered "
            f"{answer!r}, expected 'DONE default': the default drain waits for it")
        status = server.wait_exit(WAIT)
        assert status == 0, (
            f"started without DRAIN_MS, after its drain the server "
            f"{'was still running' if status is None else f'exited with status {status}'} "
            f"{WAIT:.0f} s later, expected exit 0{killed_by(status)}")
    finally:
        request.close()


def test_drain_ms_zero_cuts_at_once(launch: Any) -> None:
    """`graceful_server 0 0`: a drain of 0 ms (terminationGracePeriodSeconds: 0, a supervisor
    that gives no grace) - a request in flight at SIGTERM does not hold the process: it stops
    accepting and exits 0 at once. Not the default of 10 s, not "no deadline". The test waits
    WAIT s for the exit (far above a loaded machine's exit, far below the default)."""
    server = launch(drain_ms=0, leak_check=False)  # leaks are checked by the idle test
    request = Slow(server.port, "zero")
    try:
        sigterm(server)
        signalled = time.monotonic()
        status = server.wait_exit(WAIT)
        assert status is not None, (
            f"started with DRAIN_MS 0, the server was still running {WAIT:.0f} s after "
            "SIGTERM with a request in flight, expected it to exit at once: 0 is a drain "
            "deadline of 0 ms (a supervisor that gives no grace), not \"not given\" (the "
            "default of 10000 ms) nor \"no deadline\"\nTell a missing argv[2] from a 0 "
            "by argc (or strtol's end pointer), not by the value: `if (!drain_ms) drain_ms = "
            "10000` makes 0 mean 10 s.")
        assert status == 0, (
            f"started with DRAIN_MS 0, the server exited with status {status} "
            f"{time.monotonic() - signalled:.2f} s after SIGTERM, expected 0"
            f"{killed_by(status)}\nstderr: {server.err()[-400:]}")
    finally:
        request.close()


# A grace period of an hour (long batch requests: terminationGracePeriodSeconds: 3600), the
# longest DRAIN_MS the README allows. In milliseconds it fits an int; in microseconds or
# nanoseconds (3.6e9, 3.6e12) it does not: computed in int it overflows (UBSan stops the
# process at once, or unchecked it wraps to a deadline already past).
HOUR_MS = 3600000


def test_an_hour_long_drain_deadline_holds_a_request(launch: Any) -> None:
    """`graceful_server 0 3600000`: the deadline an hour away, a request in flight at
    SIGTERM is waited for (well past half a second: a lower bound, not a race), answered,
    then exit 0 - the deadline's arithmetic holds at the top of DRAIN_MS's range."""
    server = launch(drain_ms=HOUR_MS, leak_check=False)  # leaks are checked by the idle test
    request = Slow(server.port, "hour")
    try:
        sigterm(server)
        signalled = time.monotonic()
        status = server.wait_exit(0.5)
        report = server.sanitizer_report()
        assert status is None, (
            f"with DRAIN_MS {HOUR_MS} (an hour) the server exited (status {status}) "
            f"{time.monotonic() - signalled:.2f} s after SIGTERM with a request in flight, "
            "expected it to wait for the request: the deadline's arithmetic overflowed - "
            f"{HOUR_MS} ms is {HOUR_MS * 1000} us and {HOUR_MS * 1000000} ns, past an "
            "int's 2147483647, so drain_ms * 1000 in int wraps (a deadline already past) or "
            "is stopped by UBSan. Compute the deadline in 64 bits ((long long)drain_ms * "
            "1000, int64_t) or in double ms, or as a timespec (tv_sec += drain_ms / 1000, "
            f"tv_nsec += drain_ms % 1000 * 1000000){killed_by(status)}"
            + (f"\nthe sanitizers reported:\n{report}" if report else ""))
        answer = request.finish()
        assert answer == "DONE hour", (
            f"with DRAIN_MS {HOUR_MS}, the request in flight at SIGTERM was answered "
            f"{answer!r}, expected 'DONE hour': the drain waits for it")
        status = server.wait_exit(WAIT)
        report = server.sanitizer_report()
        assert report is None, (
            f"with DRAIN_MS {HOUR_MS} (an hour) the sanitizers reported an error after "
            f"SIGTERM - the drain deadline's arithmetic? {HOUR_MS} ms is {HOUR_MS * 1000} us, "
            "past an int's 2147483647: compute it in 64 bits ((long long)drain_ms * 1000, "
            f"int64_t) or in double ms\n{report}")
        assert status == 0, (
            f"with DRAIN_MS {HOUR_MS}, after its drain the server "
            f"{'was still running' if status is None else f'exited with status {status}'} "
            f"{WAIT:.0f} s later, expected exit 0 once nothing was in flight"
            f"{killed_by(status)}")
    finally:
        request.close()
