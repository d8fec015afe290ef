"""ph6.10 - a twelve-factor app, run as the process a platform would run.

The learner's app.py is started by the test with only its environment for configuration:
$PORT, DATABASE_URL (a fresh Postgres database) and REDIS_URL (the test's own Redis database),
none of them on a standard port. Checked from outside, as a platform sees an app: a missing,
empty or bad variable stops it at once with a non-zero status naming the variable, before it
connects to anything (backing services that accept and never answer); two instances
share all state through the backing services; request logs arrive on stdout, one event a line
whatever a request carries (a note's line break), and no file is written; SIGTERM ends it
with status 0, once the request in flight when it came has been answered (a graceful stop,
not an exit under it)."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from labrunner.testing import (
    HttpReply,
    PgStatementProxy,
    asleep_throughout,
    came_true,
    http_request,
    listening_ports,
    process_activity,
    redis_commands,
    signals_caught,
    wait_until,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def holds_a_socket(pid: int) -> bool:
    """Whether process ``pid`` has a socket among its open descriptors (True when they
    cannot be read: then its ports are read, and tell)."""
    try:
        return any(os.readlink(fd).startswith("socket:[")
                   for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return True


PORTS_EVERY = 0.5   # s between two readings of an app's listening ports while it starts

# Run first in every app's process: a TCP socket bound to a port other than $PORT (and 0, any
# free port: a client's) is refused (EACCES), the port written to stderr after
# BOUND_ELSEWHERE; with no usable $PORT, every such bind is. An app that ignores $PORT thus
# never listens on a port the test did not hand out: two checks at once (CI's in-process
# and learner-process workers, grading's parallel submissions) can neither meet on a fixed
# port (one dying of "address in use") nor talk to each other's app, and the mistake is
# named from the port asked for, whichever way the app then went (a traceback, a fallback).
# (Neither line names a variable: a message naming it is what a bad config is judged on.)
BOUND_ELSEWHERE = "labrunner: app.py bound a TCP socket to port"
PORT_WATCH = f"""
import errno as _lr_errno, os as _lr_os, socket as _lr_socket
try:
    _lr_given = int(_lr_os.environ.get("PORT", ""))
except ValueError:
    _lr_given = None

def _lr_bind_given(self, address, _bind=_lr_socket.socket.bind, _given=_lr_given):
    port = address[1] if isinstance(address, tuple) and len(address) >= 2 else 0
    if (self.family in (_lr_socket.AF_INET, _lr_socket.AF_INET6)
            and self.type == _lr_socket.SOCK_STREAM and isinstance(port, int)
            and port not in (0, _given)):
        _lr_os.write(2, ("\\n{BOUND_ELSEWHERE} %s\\n" % port).encode())
        raise PermissionError(_lr_errno.EACCES, "refused by labrunner: not the port given")
    return _bind(self, address)

_lr_socket.socket.bind = _lr_bind_given
"""


class App:
    def __init__(self, learner: Any, env: dict[str, str], prelude: str = "") -> None:
        self.port = int(env["PORT"]) if env.get("PORT", "").isdigit() else None
        # As a platform runs it: stdout is a pipe, and nothing asks Python to leave its
        # output unbuffered (the runner's own PYTHONUNBUFFERED is not the platform's).
        self.proc = learner.python("app", env={**env, "PYTHONUNBUFFERED": ""},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   prelude=PORT_WATCH + prelude)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.out),
                                             (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()
        # Graded, app.py runs as the learner's uid in a /proc the verification cannot see:
        # its listening ports are read beside it, in the learner's host process.
        self.learner = learner
        self.in_sight = Path(f"/proc/{self.proc.pid}").is_dir()

    def caught(self) -> list[int]:
        if self.in_sight:
            return signals_caught(self.proc.pid)
        return list(self.learner.run_helper(signals_caught, self.proc.pid))

    def activity(self) -> Any:
        if self.in_sight:
            return process_activity(self.proc.pid)
        return self.learner.run_helper(process_activity, self.proc.pid)

    def ports(self) -> set[int]:
        if self.in_sight:
            # the kernel's socket tables take a fifth of a second to read on a loaded
            # machine: not read for an app that holds no socket at all
            return set(listening_ports(self.proc.pid)) if holds_a_socket(self.proc.pid) else set()
        return set(self.learner.run_helper(listening_ports, self.proc.pid))

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in iter(stream.readline, b""):
            sink.append(line.decode(errors="replace").rstrip("\n"))

    def unread(self) -> int:
        """Bytes the app wrote to its stdout and stderr pipes that the readers have not
        taken yet; -1 when that cannot be told (then nothing is decided on it)."""
        total = 0
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                total += struct.unpack("i", fcntl.ioctl(stream.fileno(), termios.FIONREAD,
                                                        b"\0\0\0\0"))[0]
            except (AttributeError, OSError, ValueError):
                return -1
        return total

    def output(self) -> str:
        return "\n".join(self.out + self.err)

    def bound_elsewhere(self) -> int | None:
        """The first port other than $PORT the app bound a TCP socket to (PORT_WATCH refused
        it), or None."""
        said = [line for line in list(self.err) if line.startswith(BOUND_ELSEWHERE)]
        return int(said[0].rsplit(" ", 1)[1]) if said else None

    def fail_if_bound_elsewhere(self) -> None:
        if (port := self.bound_elsewhere()) is not None:
            pytest.fail(
                f"app.py ignored $PORT={self.port}: it went to listen on port {port} "
                "instead, a port the platform did not give it (refused here, so that no "
                "other app is met there) - the platform chooses the port and passes it in "
                "the environment (factor VII): bind the port read from $PORT, never a "
                "number of your own or a default", pytrace=False)

    def ready(self) -> None:
        # Which ports the app listens on is read from the kernel's socket tables, a fifth of
        # a second with the thousands of sockets a loaded machine holds: read while $PORT
        # does not answer yet every PORTS_EVERY s (an app listening elsewhere is seen that
        # much later), and once it answers, to make sure it is this app that does.
        read_at = [0.0]

        def up() -> bool:
            self.fail_if_bound_elsewhere()
            if self.proc.poll() is not None:
                for reader in self.readers:   # its last words, a traceback, are in the pipes
                    reader.join(10)
                self.fail_if_bound_elsewhere()
                pytest.fail(f"app.py exited with status {self.proc.returncode} instead of "
                            f"serving on $PORT={self.port}:\n{self.output()[-1500:]}")
            answers = self.port is not None and listening(self.port)
            if not answers and time.monotonic() - read_at[0] < PORTS_EVERY:
                return False
            read_at[0] = time.monotonic()
            ports = self.ports()
            if ports and self.port not in ports:
                pytest.fail(f"app.py listens on {sorted(ports)}, not on $PORT={self.port}: "
                            "the platform chooses the port and passes it in the environment")
            return answers and self.port in ports

        wait_until(up, f"app.py to listen on 127.0.0.1:$PORT ({self.port}) - the port comes "
                   "from the environment", timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def env(postgres: Any, redis_db: Any) -> dict[str, str]:
    return {"PORT": str(free_port()), "DATABASE_URL": postgres.dsn, "REDIS_URL": redis_db.url}


@pytest.fixture
def apps(learner: Any) -> Iterator[list[App]]:
    started: list[App] = []
    yield started
    for app in started:
        app.stop()


# (variable, its value: None for absent); an empty value is an unset one (a manifest's
# DATABASE_URL= that nobody filled in), so it counts as missing too
BAD = [("DATABASE_URL", None), ("REDIS_URL", None), ("PORT", None), ("PORT", "eighty"),
       ("DATABASE_URL", ""), ("REDIS_URL", ""), ("PORT", ""),
       ("PORT", "0"), ("PORT", "65536"), ("PORT", "-1")]
EMPTY_IS_MISSING = (" - an empty value is no value (DATABASE_URL= in a manifest is a variable "
                    "nobody filled in; psycopg.connect('') quietly falls back to libpq's "
                    "defaults): count it as missing, `not env.get(name)`, not `name not in "
                    "env`")
NOT_A_PORT = (" - a TCP port is 1..65535: PORT=0 asks the kernel for ANY free port, so the "
              "app would serve where the platform's router sends nothing (and nothing fails); "
              "beyond that range bind() dies with a traceback, not a config error. Check the "
              "range when reading the config (1 <= port <= 65535)")


def started_with(learner: Any, apps: list[App], monkeypatch: pytest.MonkeyPatch,
                 env: dict[str, str], name: str, value: str | None) -> tuple[App, str]:
    """app.py started with ``env`` but ``name`` set to ``value`` (None: left out), none of
    its config inherited from the test's own environment; and that change, in words."""
    for var in ("PORT", "DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    env = dict(env)
    if value is None:
        del env[name]
    else:
        env[name] = value
    app = App(learner, env)
    apps.append(app)
    return app, f"{name} missing" if value is None else f"{name}={value!r}"


def why_bad(value: str | None) -> str:
    if value == "":
        return EMPTY_IS_MISSING
    if value is not None and value.lstrip("-").isdigit():
        return NOT_A_PORT
    return ""


# Learner folders (with their app.py's text) whose every case of BAD was decided at once by
# all_refused_at_once, in this session: the later cases have nothing left to start.
REFUSED_AT_ONCE: set[tuple[str, bytes]] = set()


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_config_fails_fast(learner: Any, apps: list[App], monkeypatch: pytest.MonkeyPatch,
                               request: pytest.FixtureRequest, name: str,
                               value: str | None) -> None:
    """One case of BAD: app.py must exit at once, non-zero, naming the variable. The first
    case, once passed, starts all the others at once (each on a port of its own, with backing
    services that never answer, so no app can meet another): when each of them exits so,
    having touched nothing, that decides them all and their own tests start nothing. Any
    other sight decides nothing, and each case is then checked on its own, as a case run
    alone (a wrong's failing case, run first by `dev check`) always is."""
    code = (str(learner.dir), Path(learner.path("app.py")).read_bytes())
    if code in REFUSED_AT_ONCE and (name, value) != BAD[0]:
        return   # (its database and Redis are not even made: `env` is asked for below)
    env = request.getfixturevalue("env")
    refuses_to_start(learner, env, apps, monkeypatch, name, value)
    if (name, value) == BAD[0] and all_refused_at_once(learner, apps, monkeypatch):
        REFUSED_AT_ONCE.add(code)


def all_refused_at_once(learner: Any, apps: list[App], monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every case of BAD but the first started at the same time, each with a PORT of its
    own and services that accept and never answer: whether each app exited with a non-zero
    status naming its variable, with no app listening and no connection made meanwhile
    (which proves more than one case at a time with the real services would: it touched
    nothing). Any other sight decides nothing here (apps started at once may meet: a port, a
    table): each case is then checked by its own test. Leaves no app running."""
    postgres, redis = SilentService(), SilentService()
    services = {"DATABASE_URL": f"postgresql://lab:lab@127.0.0.1:{postgres.port}/lab",
                "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
    started: list[tuple[str, App]] = []
    try:
        for name, value in BAD[1:]:
            app, _ = started_with(learner, apps, monkeypatch,
                                  {"PORT": str(free_port()), **services}, name, value)
            started.append((name, app))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (postgres.accepted or redis.accepted):
            running = [app for _, app in started if app.proc.poll() is None]
            if not running or any(app.ports() for app in running):
                break
            time.sleep(0.05)
        touched = bool(postgres.accepted or redis.accepted)
        codes = [app.proc.poll() for _, app in started]   # None: not exited of itself
    finally:
        for _, app in started:
            app.stop()
        postgres.close()
        redis.close()
    for _, app in started:
        for reader in app.readers:
            reader.join(10)
    return not touched and len(codes) == len(BAD) - 1 and all(
        code not in (0, None) and name in app.output() and app.bound_elsewhere() is None
        for code, (name, app) in zip(codes, started, strict=True))


def refuses_to_start(learner: Any, env: dict[str, str], apps: list[App],
                     monkeypatch: pytest.MonkeyPatch, name: str, value: str | None) -> None:
    app, what = started_with(learner, apps, monkeypatch, env, name, value)
    why = why_bad(value)
    hides = (why or " - a default or a lazy read hides a broken deployment until the first "
             "request needs the value")

    def serving_anyway(exited: bool = False) -> None:
        serving = [] if exited else sorted(app.ports())
        if (port := app.bound_elsewhere()) is not None:
            serving = [port]   # refused by PORT_WATCH: the port it would have listened on
        if serving:
            pytest.fail(f"with {what}, app.py started serving anyway (listening on "
                        f"{serving}): expected it to refuse to start{hides}")

    deadline = time.monotonic() + 20
    while app.proc.poll() is None and time.monotonic() < deadline:
        serving_anyway()
        time.sleep(0.05)
    if app.proc.poll() is None:
        pytest.fail(f"with {what}, app.py is still running after 20 s: expected it to exit "
                    f"at once with a non-zero status naming the variable (fail fast){why}")
    assert app.proc.returncode != 0, (
        f"with {what}, app.py exited with status 0: a non-zero status tells the platform the "
        f"start failed (and to report it) - 0 means 'done, all is well'{why}")
    for reader in app.readers:
        reader.join(10)
    serving_anyway(exited=True)
    assert name in app.output(), (
        f"with {what}, app.py exited with status {app.proc.returncode} without naming "
        f"{name}{why}; its output ended with: {app.output()[-400:]!r}. Say which variable "
        "is missing or wrong - did it fall back to a default and fail later on?")


class SilentService:
    """A backing service that accepts connections and never answers (a database hung in a
    failover, a firewall dropping replies): what it was sent is counted, nothing returned."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


# (variable, value: None for absent) with the backing services left in the environment hung
EARLY = [("PORT", "eighty"), ("PORT", "0"), ("REDIS_URL", None)]


@pytest.mark.parametrize(("name", "value"), EARLY, ids=[f"{n}={v}" for n, v in EARLY])
def test_bad_config_is_refused_before_any_backing_service(
        learner: Any, apps: list[App], monkeypatch: pytest.MonkeyPatch, name: str,
        value: str | None) -> None:
    """Fail fast: every variable is read and checked before the app connects to anything.
    Here the database and Redis the environment names accept a connection and never answer
    (hung, as in a failover): an app that connects before checking its config hangs there,
    and the variable that is wrong is never named."""
    postgres, redis = SilentService(), SilentService()
    try:
        env = {"PORT": str(free_port()),
               "DATABASE_URL": f"postgresql://lab:lab@127.0.0.1:{postgres.port}/lab",
               "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
        app, what = started_with(learner, apps, monkeypatch, env, name, value)
        came_true(lambda: (app.proc.poll() is not None or postgres.accepted
                           or redis.accepted), 20)
        touched = [url for url, service in (("DATABASE_URL", postgres), ("REDIS_URL", redis))
                   if service.accepted]
    finally:
        postgres.close()
        redis.close()
    assert not touched, (
        f"with {what}, app.py connected to {' and '.join(touched)} before refusing to start: "
        f"expected it to exit at once naming {name}, having touched nothing. Read and check "
        f"every variable first, then connect: here the service does not answer (hung, as in "
        f"a failover), so the app hangs on it and the broken variable is never reported - "
        f"fail fast means before anything slow")
    assert app.proc.poll() is not None and app.proc.returncode != 0, (
        f"with {what}, app.py did not exit with a non-zero status within 20 s "
        f"(status {app.proc.poll()}): expected it to refuse to start at once")


def request_data_never_breaks_a_log_line(app: App) -> None:
    """Logs are an event stream, one event per line: a note whose text holds a line break
    must not split its request's log line (the platform's log router reads each line as an
    event, and request data that starts a line of its own forges one). Ends ``app`` (its
    whole stdout is read once it exited)."""
    tag = f"note-{uuid.uuid4().hex[:8]}"
    text = f"{tag}-first\n{tag}-second status=200 forged"
    created = http_request(f"127.0.0.1:{app.port}", "POST", "/notes", document={"text": text})
    assert created.status == 201, f"POST /notes answered HTTP {created.status}"
    app.proc.send_signal(signal.SIGTERM)
    if not came_true(lambda: app.proc.poll() is not None, 15):
        app.stop()
    for reader in app.readers:
        reader.join(10)
    split = [line for line in app.out if f"{tag}-second" in line and f"{tag}-first" not in line]
    assert not split, (
        f"a note's text held a line break ({text!r}), and the app's stdout has a line of its "
        f"own starting there: {split[0][:120]!r} - request data split a log line in two, so "
        f"the log router reads a second event the app never logged (a client can forge one). "
        f"One event per line: escape what an event carries (json.dumps does, as does %r)")


def two_instances(learner: Any, env: dict[str, str], apps: list[App]) -> tuple[App, App]:
    """Two instances of the app from the same config, on different ports, both ready."""
    first = App(learner, env)
    apps.append(first)
    first.ready()
    second = App(learner, {**env, "PORT": str(free_port())})
    apps.append(second)
    second.ready()
    return first, second


IDLE_SPAN = 1.0        # s an app must stay idle with its pipes read before it is judged
IDLE_CPU_SHARE = 0.05  # of a core: a thread that writes, answers or exits uses more


def idle_between(before: Any, after: Any) -> bool:
    """Two :func:`process_activity` readings of one process: every thread asleep at both,
    the same threads, and less than IDLE_CPU_SHARE of a core used between them (a server's
    poll and a pool's timers wake now and then; nothing runs)."""
    return (before[0] == 0 and after[0] == 0
            and [t[0] for t in before[2]] == [t[0] for t in after[2]]
            and (after[1] - before[1]) / 1e9 < IDLE_CPU_SHARE * 0.1)


HELD_IN_PROCESS = (
    " - it answered from what it held in its own memory since an earlier read (kept up to "
    "date with its own writes, blind to the other's). Processes share nothing (factor VI): "
    "any instance serves any request, so every read goes to the backing service")


def test_two_instances_share_state_through_backing_services(
        learner: Any, env: dict[str, str], apps: list[App], postgres: Any,
        redis_db: Any) -> None:
    """Two instances from one config, checked in turn (one pair started for all: each start
    costs seconds): every write on one is read on both, no file is written, each request is
    logged on stdout as it happens, concurrent visits on both are each counted, and request
    data never breaks a log line (this last ends the first instance)."""
    before = {p.name for p in Path(learner.dir).iterdir()}
    first, second = two_instances(learner, env, apps)
    a, b = f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"
    name = {a: "the first instance", b: "the second"}
    # Each instance reads before anything is written (whatever it keeps of a read, it has
    # it now), then every write on one instance is read back on both: an instance that
    # answers from what it holds in its own memory (a count or a list loaded once, kept up
    # to date with its own writes only) shows the other's writes late or never.
    seen = [http_request(host, "GET", "/visits").json().get("visits") for host in (a, b)]
    assert seen == [0, 0], f"before any visit, GET /visits answered {seen}: expected [0, 0]"
    for visits, host in enumerate((a, a, b), start=1):
        assert http_request(host, "POST", "/visits").status == 200
        counts = [http_request(h, "GET", "/visits").json().get("visits") for h in (a, b)]
        assert counts == [visits, visits], (
            f"after {visits} visit(s) posted (the last to {name[host]}), GET /visits on the "
            f"two instances answered {counts}: expected [{visits}, {visits}]. The count lives "
            f"in Redis (REDIS_URL), shared by every instance"
            + (HELD_IN_PROCESS if counts[0] != counts[1] else ""))
    texts: list[str] = []
    for host in (a, b):
        for reader in (a, b):
            http_request(reader, "GET", "/notes")
        texts.append(f"note-{uuid.uuid4().hex[:8]}")
        created = http_request(host, "POST", "/notes", document={"text": texts[-1]})
        assert created.status == 201, f"POST /notes answered HTTP {created.status}"
        with postgres.connect() as conn:
            stored = [r[0] for r in conn.execute("SELECT text FROM notes")]
        for reader in (a, b):
            listed = [n.get("text") for n in http_request(reader, "GET", "/notes").json()]
            assert all(t in listed for t in texts) and all(t in stored for t in texts), (
                f"notes {texts} posted (the last to {name[host]}): {name[reader]} lists "
                f"{listed}, the database at DATABASE_URL holds {stored}: expected every one "
                "in both - the notes live in the Postgres the environment names"
                + (HELD_IN_PROCESS if all(t in stored for t in texts) else ""))
    after = {p.name for p in Path(learner.dir).iterdir()} - before - {"__pycache__"}
    assert not after, (f"the app wrote {sorted(after)} in its folder: a twelve-factor app "
                       "writes no log files; the platform captures stdout")
    def logged(lines: list[str]) -> int:
        return sum("/visits" in line for line in list(lines))

    # The lines come once the app writes them out; an app that holds them in a buffer is
    # seen idle with nothing left to do (every thread asleep at each reading, under
    # IDLE_CPU_SHARE of a core used: its pool's and server's timers only) for IDLE_SPAN s
    # while its pipes hold nothing the test has not read: they are not coming until the
    # buffer fills or the process exits. The deadline is for an app never seen so.
    deadline = time.monotonic() + 15
    idle = ""
    before = first.activity()
    since = time.monotonic()
    while time.monotonic() < deadline and max(logged(first.out), logged(first.err)) < 3:
        time.sleep(0.1)
        now = first.activity()
        if not (idle_between(before, now) and first.unread() == 0):
            since = time.monotonic()
        elif time.monotonic() - since >= IDLE_SPAN:
            time.sleep(0.1)   # what the readers took from the pipes is in the lists now
            if max(logged(first.out), logged(first.err)) < 3:
                idle = (", though the app has answered them and sleeps with nothing left to "
                        "do, its pipes holding nothing unread: the lines sit in the app's "
                        "own buffer. stdout to a pipe is block-buffered: print() keeps the "
                        "lines in the process until 8 KB pile up or it exits - call "
                        "sys.stdout.flush() after each line (or print(..., flush=True))")
            break
        before = now
    assert logged(first.out) >= 3, (
        f"the first instance served 3 requests to /visits; its stdout has {logged(first.out)} "
        f"line(s) mentioning them, its stderr {logged(first.err)}{idle}: expected one line "
        "per request on stdout, flushed as it happens - logs are an event stream the "
        "platform reads from stdout (logging writes to stderr unless told otherwise). "
        f"stdout ends with {first.out[-3:]}")
    concurrent_visits_are_each_counted(first, second, redis_db, counted=3)
    request_data_never_breaks_a_log_line(first)


# s after SIGTERM a request in flight is held unanswered (at Postgres) unless the app exited
# before: an app that exits under it does so at once (sys.exit/os._exit in the handler) or
# within a second (request threads that are daemons, gone with the process).
DRAIN_HOLD = 5


# Run first in the app's process: at its exit (after main() returned and the non-daemon
# threads ended, before the interpreter tears anything down; registered first, so it runs
# after the app's own atexit handlers) it writes to stderr how many TCP connections to the
# Redis port it still holds (labrunner.proc_sockets: its descriptors in the kernel's table).
# Redis has no goodbye message to read at a proxy (redis-py's close() just closes the
# socket), so what is still open at exit is read where it is held.
REDIS_AT_EXIT = "labrunner: redis connections open at exit:"
REDIS_WATCH = """
import atexit as _lr_atexit, os as _lr_os
from labrunner.proc_sockets import process_tcp_sockets as _lr_sockets

def _lr_redis_at_exit(port={port}):
    held = sum(1 for sock in _lr_sockets() if sock.remote[1] == port)
    _lr_os.write(2, ('\\n{marker} %d\\n' % held).encode())

_lr_atexit.register(_lr_redis_at_exit)
"""


def redis_held_at_exit(app: App) -> int | None:
    """What REDIS_WATCH reported when the app exited (None: it never ran - the process
    did not exit through Python's normal exit)."""
    for reader in app.readers:
        reader.join(10)
    said = [line for line in app.err if line.startswith(REDIS_AT_EXIT)]
    return int(said[-1].rsplit(" ", 1)[1]) if said else None


class HeldPostgres(PgStatementProxy):
    """A proxy in front of Postgres that holds the first message carrying ``marker`` (the
    text of a note being stored) until ``release`` is set: a request in flight, on demand.
    (psycopg, unlike redis-py, has no read timeout to run out meanwhile.)"""

    def __init__(self, host: str, port: int, **options: Any) -> None:
        super().__init__(host, port, **options)
        self.marker = f"drain-{uuid.uuid4().hex}".encode()
        self.arrived, self.release = threading.Event(), threading.Event()

    def on_message(self, link: Any, kind: bytes, body: bytes) -> None:
        if kind == b"X":   # Terminate: what libpq's PQfinish (conn.close()) sends last
            link.state["terminated"] = True

    def unclosed(self) -> tuple[int, int]:
        """(connections opened, of which ended without Terminate), once every one is gone
        (the app exited: the kernel closes what it left open, with no Terminate)."""
        came_true(lambda: all(link.ends >= 2 for link in self.links), 10)
        with self.lock:
            opened = [link for link in self.links if link.state.get("started")]
        return len(opened), sum(1 for link in opened if not link.state.get("terminated"))

    def upward(self, link: Any, chunk: bytes) -> bool | None:
        if self.marker in chunk and not self.arrived.is_set():
            self.arrived.set()
            self.release.wait(60)
        return super().upward(link, chunk)


def test_sigterm_ends_the_process_cleanly(learner: Any, env: dict[str, str], postgres: Any,
                                          apps: list[App]) -> None:
    """SIGTERM while a POST /notes is in flight (its INSERT held at a proxy in front of
    Postgres): a graceful stop stops accepting, lets that request finish (the proxy lets the
    INSERT go on once the app exited or DRAIN_HOLD s went by), closes the pools, exits 0."""
    redis_port = urlsplit(env["REDIS_URL"]).port
    watch = REDIS_WATCH.format(port=redis_port, marker=REDIS_AT_EXIT)
    with HeldPostgres.for_dsn(postgres.dsn) as held:
        app = App(learner, {**env, "DATABASE_URL": held.dsn_for(postgres.dsn)}, prelude=watch)
        apps.append(app)
        app.ready()
        host = f"127.0.0.1:{app.port}"
        assert http_request(host, "GET", "/visits").status == 200
        answer: list[Any] = []

        def post() -> None:
            try:
                answer.append(http_request(host, "POST", "/notes", timeout=90,
                                           document={"text": held.marker.decode()}))
            except (OSError, http.client.HTTPException) as exc:   # ended without an answer
                answer.append(exc)

        poster = threading.Thread(target=post, daemon=True)
        poster.start()
        wait_until(held.arrived.is_set, "POST /notes to reach Postgres through the app")
        app.proc.send_signal(signal.SIGTERM)
        came_true(lambda: app.proc.poll() is not None, DRAIN_HOLD)
        # DRAIN_HOLD s after SIGTERM, the request in flight still held: a new request must
        # find the app no longer accepting (refused, reset, or 503), not served.
        probe: HttpReply | Exception | None = None
        if app.proc.poll() is None:
            try:
                probe = http_request(host, "GET", "/visits", timeout=5)
            except (OSError, http.client.HTTPException) as exc:
                probe = exc
        held.release.set()
        poster.join(60)
        code = exit_status_after_sigterm(app)
        opened, unclosed = held.unclosed()
    assert code == 0, (
        f"after SIGTERM app.py exited with status {code}"
        + (" (killed by the signal: no handler)" if code == -signal.SIGTERM else "")
        + ": expected 0 - handle SIGTERM, stop the server, close the pools, exit 0")
    got = answer[0] if answer else "no answer within 60 s"
    if not (isinstance(got, HttpReply) and got.status == 201):
        seen = f"HTTP {got.status} {got.body[:100]!r}" if isinstance(got, HttpReply) else got
        pytest.fail(
            f"app.py exited 0 after SIGTERM, but the POST /notes it was serving when the "
            f"signal came got {seen!s}: the process ended under it. A graceful stop (factor "
            "IX) stops accepting new requests, lets the ones in flight finish, closes the "
            "connections, then exits - not sys.exit()/os._exit() in the signal handler, and "
            "not request threads that are daemons (ThreadingHTTPServer's default), which die "
            "with the process: set server.daemon_threads = False so server_close() waits for "
            "them", pytrace=False)
    if isinstance(probe, HttpReply) and probe.status < 500:
        pytest.fail(
            f"{DRAIN_HOLD} s after SIGTERM, while the POST /notes in flight was still being "
            f"served, a new GET /visits was answered HTTP {probe.status} "
            f"{probe.body[:100]!r}: expected it refused (or a 503) - the app still accepted "
            "new requests. A graceful stop stops accepting FIRST (the platform is already "
            "sending new traffic elsewhere), then lets the requests in flight finish: call "
            "server.shutdown() (and server_close(), which closes the listening socket and "
            "then waits for the request threads) at once, not after the requests in flight "
            "are done - an app that waits for in-flight requests while accepting new ones "
            "may never stop under steady traffic", pytrace=False)
    # Each Postgres connection the app opened must end with a Terminate ('X') from the
    # client (what conn.close() / pool.close() send): a connection the process leaves open
    # at exit is cut by the kernel, and the server logs "unexpected EOF on client
    # connection" - a pool not closed, a connection never closed.
    assert not unclosed, (
        f"app.py exited 0 after SIGTERM, but {unclosed} of the {opened} Postgres "
        "connection(s) it opened ended without a Terminate message (seen at a proxy in front "
        "of Postgres): the process exited with them still open and the kernel cut them, "
        "expected every one closed first - a graceful stop closes its backing services' "
        "connections: pool.close(), and close any connection opened outside the pool "
        "(`with psycopg.connect(...)`, a thread of yours stopped and its connection closed); "
        "never os._exit(), which skips every close. Postgres logs each cut one as "
        "'unexpected EOF on client connection'")
    # The same for Redis: every connection closed by the app before it exits.
    still = redis_held_at_exit(app)
    assert still == 0, (
        f"app.py exited 0 after SIGTERM still holding {still} connection(s) to Redis "
        f"(REDIS_URL, port {redis_port}) - read from its own open sockets as it exited, "
        "after main() had returned: the kernel cut them at exit, expected every one closed "
        "first. A graceful stop releases each backing service (factor IX): close the Redis "
        "client (client.close() closes its connection pool only when the client made it, "
        "as Redis.from_url does; a client given a ConnectionPool leaves it open - "
        "disconnect that pool too)" if still is not None else
        f"app.py exited 0 after SIGTERM but never reached Python's normal exit (its atexit "
        f"handlers did not run): stderr ends {app.err[-3:]}")



def kept_alive(host: str) -> http.client.HTTPConnection | None:
    """A connection that has been answered a GET /visits and that the app keeps open for
    the next request (HTTP/1.1 keep-alive); None when the app closed it after its answer
    (an HTTP/1.0 server, or Connection: close), then nothing of the sort is left to check."""
    conn = http.client.HTTPConnection(host, timeout=20)
    conn.request("GET", "/visits")
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 200, f"GET /visits answered HTTP {reply.status}, expected 200"
    if reply.will_close:
        conn.close()
        return None
    return conn


Answer = tuple[int, bool, bytes] | Exception   # (status, says Connection: close, body)


def answer_on(conn: http.client.HTTPConnection) -> Answer:
    """The answer to the request just sent on ``conn``, or how the connection ended
    without one."""
    try:
        reply = conn.getresponse()
        body = reply.read()
        return reply.status, bool(reply.will_close), body
    except (OSError, http.client.HTTPException) as exc:
        return exc


def closed_by_app(conn: http.client.HTTPConnection) -> bool:
    """Whether the app has closed (or reset) its end of ``conn``: end of stream waiting."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0]) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


KEPT_ALIVE_AT_STOP = (
    "a graceful stop ends the kept-alive HTTP connections too: close the ones waiting "
    "idle for their next request as the stop begins, and answer what is still in flight "
    "with `Connection: close` (so the client does not send another request on a "
    "connection about to go), as Go's Server.Shutdown and nginx's graceful quit do - or "
    "keep no connection alive at all (HTTP/1.0, BaseHTTPRequestHandler's default)")


def test_sigterm_ends_kept_alive_connections(learner: Any, env: dict[str, str], postgres: Any,
                                             apps: list[App]) -> None:
    """An app that keeps HTTP/1.1 connections alive, SIGTERM while a POST /notes is in
    flight as the SECOND request of a kept-alive connection (held at Postgres), with two
    more kept-alive connections idle: the one in flight must get its answer (with
    Connection: close), the idle ones must be closed (one left untouched; on the other a
    GET /visits sent once the app stopped listening must find it closed, or be answered
    with Connection: close), and the app must exit 0 - not wait forever for an idle
    connection's next request."""
    with HeldPostgres.for_dsn(postgres.dsn) as held:
        app = App(learner, {**env, "DATABASE_URL": held.dsn_for(postgres.dsn)})
        apps.append(app)
        app.ready()
        host = f"127.0.0.1:{app.port}"
        idle, asked, busy = (kept_alive(host) for _ in range(3))
        if idle is None or asked is None or busy is None:
            return   # the app keeps no connection alive: test_sigterm_ends_the_process_cleanly
        body = json.dumps({"text": held.marker.decode()})
        busy.request("POST", "/notes", body, {"Content-Type": "application/json"})
        in_flight: list[Answer] = []
        poster = threading.Thread(target=lambda: in_flight.append(answer_on(busy)), daemon=True)
        poster.start()
        wait_until(held.arrived.is_set, "POST /notes to reach Postgres through the app")
        app.proc.send_signal(signal.SIGTERM)
        came_true(lambda: app.proc.poll() is not None or not listening(int(app.port or 0)),
                  DRAIN_HOLD)
        try:
            asked.request("GET", "/visits")
        except OSError:
            pass   # already closed: answer_on() reports it
        came_true(lambda: closed_by_app(asked) or asked.sock is None
                  or bool(select.select([asked.sock], [], [], 0)[0]), 2)
        held.release.set()
        late = answer_on(asked)
        poster.join(60)
        came_true(lambda: app.proc.poll() is not None, 1)
        stuck = asleep_for(app, STUCK_ASLEEP, 15) if app.proc.poll() is None else None
        idle_open = app.proc.poll() is None and not closed_by_app(idle)
    judge_kept_alive(in_flight[0] if in_flight else "no answer within 60 s", late, idle_open,
                     stuck)
    assert exit_status_after_sigterm(app) == 0, (
        "after SIGTERM app.py did not exit with status 0: expected 0 - "
        "test_sigterm_ends_the_process_cleanly says more")


def judge_kept_alive(in_flight: Answer | str, late: Answer, idle_open: bool,
                     stuck: float | None) -> None:
    if not (isinstance(in_flight, tuple) and in_flight[0] == 201):
        seen = f"HTTP {in_flight[0]} {in_flight[2][:100]!r}" if isinstance(in_flight, tuple) \
            else repr(in_flight)
        pytest.fail(
            f"SIGTERM came while a POST /notes was in flight as the second request of a "
            f"kept-alive connection, and it got {seen}: expected its answer (201) - the stop "
            "cut a connection that was busy, taking it for an idle one. A connection is idle "
            "only while it waits for its next request: once a request has begun on it, it is "
            "in flight and the stop lets it finish", pytrace=False)
    if idle_open:
        when = f"slept {stuck:.0f} s with nothing else to do" if stuck else "not exited 15 s"
        pytest.fail(
            f"after SIGTERM, with the request in flight answered, app.py had {when} while a "
            "kept-alive connection it had answered before the signal was still open, idle: "
            "the stop waits for that connection's next request, which may never come (the "
            f"platform SIGKILLs the app at its deadline) - {KEPT_ALIVE_AT_STOP}", pytrace=False)
    if isinstance(late, tuple) and not late[1]:
        pytest.fail(
            f"after SIGTERM (the app no longer listening), a GET /visits sent on a connection "
            f"kept alive from before was answered HTTP {late[0]} without `Connection: close`: "
            "expected the connection closed at the stop, or the answer to say it closes - "
            "the client takes it for reusable and its next request meets a closed "
            f"connection (RFC 9112 9.6). {KEPT_ALIVE_AT_STOP}", pytrace=False)
    assert isinstance(in_flight, tuple)
    if not in_flight[1]:
        pytest.fail(
            "after SIGTERM, the POST /notes in flight on a kept-alive connection was answered "
            "201 without `Connection: close` (and with HTTP/1.1): the client takes the "
            "connection for reusable, while the app is about to close it - its next request "
            "races the close and is lost (RFC 9112 9.6: the last response on a connection "
            f"says `close`). {KEPT_ALIVE_AT_STOP}", pytrace=False)

# s an app that got SIGTERM, and whose request in flight has been answered, may sleep with
# every thread asleep and no CPU time used before it counts as stuck: it has nothing left to
# wait for (serve_forever's poll wakes it every 0.5 s; a stop in progress runs).
STUCK_ASLEEP = 3.0


def asleep_for(app: App, span: float, within: float) -> float | None:
    """Seconds until the app exits (None when it does), or until it has slept ``span`` s
    without a thread of it running (returns the span); ``within`` s at most, then None."""
    start = time.monotonic()
    first, since = app.activity(), time.monotonic()
    while time.monotonic() - start < within:
        if app.proc.poll() is not None:
            return None
        time.sleep(0.25)
        now = app.activity()
        if now[0] == -1:
            return None
        if not asleep_throughout(first, now):
            first, since = now, time.monotonic()
        elif time.monotonic() - since >= span:
            return time.monotonic() - since
    return None


def exit_status_after_sigterm(app: App) -> int:
    slept = asleep_for(app, STUCK_ASLEEP, 15)
    try:
        code = app.proc.wait(0.5)  # asleep_for waited for the exit (15 s at most)
    except subprocess.TimeoutExpired:
        if signal.SIGTERM in app.caught():
            when = (f"had slept {slept:.0f} s with nothing left to do (every thread asleep, "
                    "no CPU time used)" if slept else "had not exited 15 s")
            pytest.fail(
                f"app.py has a SIGTERM handler, yet it {when} after SIGTERM and the request in "
                "flight was over: the "
                "handler never lets serve_forever() return - server.shutdown() called in the "
                "handler waits for serve_forever, which runs in that same main thread, "
                "forever. Start shutdown() in another thread (or set a flag the loop reads)",
                pytrace=False)
        if slept:
            pytest.fail(f"app.py has not exited after SIGTERM: it slept {slept:.0f} s with "
                        "nothing left to do (every thread asleep, no CPU time used), and it "
                        "has no handler for SIGTERM that could have ignored it...: the "
                        "platform would SIGKILL it mid-request", pytrace=False)
        pytest.fail("app.py did not exit within 15 s of SIGTERM (and has no handler for it "
                    "that could have ignored it...): the platform would SIGKILL it "
                    "mid-request", pytrace=False)
    return int(code)


def concurrent_visits_are_each_counted(first: App, second: App, redis_db: Any,
                                       counted: int) -> None:
    """Two instances, each with several requests in flight at once: the shared count (at
    ``counted`` before) must move by exactly one per POST, whichever instance serves it - an
    increment read, added to and written back by the app loses the visits counted in
    between."""
    hosts = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
    per_thread, threads = 10, 8
    answers: list[Any] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def visitor(host: str) -> None:
        start.wait(30)
        for _ in range(per_thread):
            reply = http_request(host, "POST", "/visits")
            with lock:
                answers.append(reply.json().get("visits") if reply.status == 200 else reply.status)

    with redis_commands(redis_db) as commands:
        workers = [threading.Thread(target=visitor, args=(hosts[n % 2],), daemon=True)
                   for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
    total = per_thread * threads
    count = http_request(hosts[0], "GET", "/visits").json().get("visits")
    repeated = sorted({a for a in answers if answers.count(a) > 1}, key=str)
    names = [c[0] for c in commands]
    atomic = {"INCR", "INCRBY", "HINCRBY", "EVAL", "EVALSHA", "FCALL", "EXEC"}
    assert count == counted + total and not repeated, (
        f"{total} concurrent POST /visits on two instances took the count from {counted} to "
        f"{count}, expected {counted + total} (answers repeated: {repeated[:5]}): visits were "
        f"lost - reading the count, adding one and writing it back lets two requests read the "
        f"same value. Let Redis do the increment atomically (INCR)")
    assert atomic & set(names), (
        f"{total} concurrent POST /visits were counted right this time, but the app sent "
        f"Redis only {sorted(set(names))}: a read, then a write of the new value, loses the "
        f"visits counted in between by another instance - use INCR, atomic in Redis")
