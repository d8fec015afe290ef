"""Verification for ph7.7 health-checks.

The learner's app runs behind a real HTTP server with the test's own Postgres database and
Redis db. The outages are real: the runner's Postgres server is stopped and started again
(postgres.stop()/start(), so the lab is exclusive), and Redis is reached through the test's
TCP proxy, which can refuse connections (down) or accept them and never answer (a hung
dependency) or let an impostor answer (an error reply, an HTTP server on the port) and cut
the connections it relays; Postgres is reached through one too, whose cut breaks the
connections the app holds while the server stays up. Through each outage
/health/live must stay 200 and /health/ready must answer 503 naming the dependency,
quickly; when the dependency is back (or only a connection broke), /health/ready must
return to 200 by itself.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from labrunner.testing import RelayLink, TcpRelay, serve_wsgi

PROBE_TIMEOUT = 8.0   # seconds a probe may take before the test calls it hung
HUNG_BUDGET = 4.0     # ... when a dependency hangs: the check's own timeout must cut it
                      # (Kubernetes' default probe timeoutSeconds is 1)
STALL = 8             # seconds a stuck server spends on each SELECT: twice HUNG_BUDGET


# What a service says in the dependency's place (mode "answer"): given the bytes a client
# sent so far (it removes what it answers), the reply to send and whether to stay open.
Answer = Callable[[bytearray], tuple[bytes, bool]]


class TcpProxy(TcpRelay):
    """127.0.0.1:<port> relaying to ``target``; mode "up", "down" (accept, close at once),
    "hang" (accept, never answer), "answer" (accept, and an impostor answers: an error
    reply, another protocol) or "slow" (Postgres only: relayed, but the server takes
    STALL seconds over each SELECT). Leaving a mode cuts every relayed connection.

    ``reached()`` counts what clients did towards the dependency (connections accepted plus
    bytes sent to it): it grows when, and only when, the app really talked to it."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__((host, port))
        self.mode = "up"
        self.answer: Answer | None = None
        self.accepted = 0
        self.sent = 0
        self._hung: list[socket.socket] = []

    def reached(self) -> int:
        with self.lock:
            return self.accepted + self.sent

    def connections(self) -> tuple[int, int]:
        """(connections accepted so far, those of them still open)."""
        with self.lock:
            return self.accepted, sum(1 for link in self.links if link.ends < 2)

    def admit(self, client: socket.socket) -> bool:
        with self.lock:
            mode, answer = self.mode, self.answer
            self.accepted += 1
            if mode in ("hang", "answer"):   # held open: never answered, or by the impostor
                self._hung.append(client)
        if mode == "down":
            client.close()
        if mode == "answer" and answer is not None:
            threading.Thread(target=self._impostor, args=(client, answer), daemon=True,
                             name="health-impostor").start()
        return mode in ("up", "slow")

    def _impostor(self, client: socket.socket, answer: Answer) -> None:
        pending = bytearray()
        try:
            while chunk := client.recv(65536):
                with self.lock:
                    self.sent += len(chunk)
                pending += chunk
                reply, stay = answer(pending)
                if reply:
                    client.sendall(reply)
                if not stay:
                    break
        except OSError:
            pass
        finally:
            self.shut(client)

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        with self.lock:
            self.sent += len(chunk)
            slow = link.state.setdefault("slow", self.mode == "slow")
        if slow:
            chunk, answer = stalled_selects(link.state, chunk)
            if answer:
                link.client.sendall(answer)
        return super().upward(link, chunk)

    def set(self, mode: str, answer: Answer | None = None) -> None:
        with self.lock:
            self.mode, self.answer = mode, answer
            hung, self._hung = self._hung, []
        self.cut()   # the outage breaks what was open too
        for sock in hung:
            self.shut(sock)

    def close(self) -> None:
        self.set("down")
        super().close()


class Deps:
    """The two dependencies as the app sees them: each behind a TcpProxy of the test."""

    def __init__(self, pg: TcpProxy, pg_dsn: str, redis: TcpProxy, redis_url: str) -> None:
        self.pg, self.pg_dsn, self.redis, self.redis_url = pg, pg_dsn, redis, redis_url
        self.proxies = {"postgres": pg, "redis": redis}

    def reached(self) -> dict[str, int]:
        return {name: proxy.reached() for name, proxy in self.proxies.items()}


@pytest.fixture
def deps(postgres: Any, redis_db: Any) -> Iterator[Deps]:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    info = conninfo_to_dict(postgres.dsn)
    pg = TcpProxy(str(info.get("host") or "127.0.0.1"), int(str(info.get("port") or 5432)))
    pg_dsn = make_conninfo(postgres.dsn, host="127.0.0.1", port=pg.port)
    url = urlsplit(redis_db.url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 6379)
    yield Deps(pg, pg_dsn, proxy, proxy.url_for(redis_db.url))
    proxy.close()
    pg.close()


@pytest.fixture
def host(learner: Any, deps: Deps) -> Iterator[str]:
    make_app = learner.function("health", "make_app")
    with serve_wsgi(make_app(deps.pg_dsn, deps.redis_url)) as address:
        yield address


def probe(host: str, path: str, budget: float = PROBE_TIMEOUT) -> tuple[int, Any, float]:
    """(status, JSON body or None, seconds); status 0 if no answer within ``budget``."""
    address, port = host.rsplit(":", 1)
    started = time.monotonic()
    conn = http.client.HTTPConnection(address, int(port), timeout=budget)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        raw = reply.read()
        status = reply.status
    except (TimeoutError, OSError):
        return 0, None, time.monotonic() - started
    finally:
        conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return status, body, time.monotonic() - started


def _checks(body: Any) -> dict[str, Any] | None:
    """The body's report per dependency: {"postgres": ..., "redis": ...} found under
    "checks" (or at the top level), keys matched by name; None when there is none."""
    if not isinstance(body, dict):
        return None
    found: dict[str, Any] = {}
    for where in (body.get("checks"), body):
        if isinstance(where, dict):
            for key, value in where.items():
                for dep in ("postgres", "redis"):
                    if dep in str(key).lower() and dep not in found:
                        found[dep] = value
    return found or None


def _is_ok(value: Any) -> bool:
    if isinstance(value, dict):
        value = value.get("status", value.get("state"))
    if value is True:
        return True
    return str(value).strip().lower() in ("ok", "up", "healthy", "pass", "ready")


def expect(host: str, path: str, status: int, situation: str, why: str,
           budget: float = PROBE_TIMEOUT, raised: str = "", hung: str = "") -> Any:
    """``raised``: what to say first when the app answers 500 (an exception escaped);
    ``hung``: when it does not answer within ``budget``."""
    got, body, took = probe(host, path, budget)
    if got == 0 and hung:
        pytest.fail(f"{situation}: GET {path} did not answer within {budget:.0f} s, "
                    f"expected {status} at once: {hung}", pytrace=False)
    if got == 0:
        pytest.fail(f"{situation}: GET {path} did not answer within {budget:.0f} s, "
                    f"expected {status} at once: a probe that hangs fails late and ties up a "
                    "worker - bound every dependency check with a short timeout "
                    "(psycopg's connect_timeout, redis' socket_timeout and "
                    "socket_connect_timeout, in seconds; a pool's wait for a connection: "
                    "psycopg_pool's timeout, 30 s by default) and answer 503 when it expires.",
                    pytrace=False)
    if got == 500 and status != 500 and _checks(body):
        pytest.fail(f"{situation}: GET {path} answered 500 with {body}, expected {status}: "
                    "not ready is 503 Service Unavailable (take me out of rotation, try "
                    "again later); 500 says the app itself is broken", pytrace=False)
    if got == 500 and status != 500 and raised:
        pytest.fail(f"{situation}: GET {path} answered 500, expected {status}: {raised}",
                    pytrace=False)
    if got == 500 and status != 500:
        pytest.fail(f"{situation}: GET {path} answered 500, expected {status}: the app "
                    "raised while answering - a failed check must be caught and reported "
                    "('down: <error>' and 503), never escape: 500 says the app itself is "
                    "broken. Catch every failure of a check (redis.TimeoutError is not a "
                    "redis.ConnectionError; psycopg raises OperationalError and others)",
                    pytrace=False)
    if got == 200 and status == 503:
        checks = _checks(body)
        if checks and not all(_is_ok(v) for v in checks.values()):
            pytest.fail(f"{situation}: GET {path} answered 200 with the body {body}, "
                        "expected 503: the body says a check failed but the status says "
                        "ready - the orchestrator and the load balancer read the status "
                        "code, not the body: answer 503 when any check fails",
                        pytrace=False)
    assert got == status, f"{situation}: GET {path} answered {got} {body}, expected {status}: {why}"
    return body


def reported(body: Any, down: set[str], up: set[str], situation: str) -> None:
    """The body reports each dependency: those in ``down`` as failed, those in ``up`` ok."""
    checks = _checks(body)
    if checks is None:
        pytest.fail(f"{situation}: the body {body} does not report the checks: expected "
                    '{"checks": {"postgres": "ok" or "down: <error>", "redis": ...}} - '
                    "say which check failed, or the on-call engineer starts by guessing",
                    pytrace=False)
    for dep in sorted(down | up):
        if dep not in checks:
            failed = sorted(d for d, v in checks.items() if not _is_ok(v))
            why = (f"the check stopped after {' and '.join(failed)} failed - run EVERY check "
                   "on every probe and report each one: stopping at the first failure hides "
                   "a second outage from the on-call engineer" if failed else
                   f"readiness must check {dep} too ({'PING' if dep == 'redis' else 'SELECT 1'}"
                   "): the app cannot serve without it")
            pytest.fail(f"{situation}: the body {body} says nothing about {dep}, expected "
                        f"it reported as {'down' if dep in down else 'ok'}: {why}",
                        pytrace=False)
    for dep in sorted(down):
        if _is_ok(checks[dep]):
            pytest.fail(f"{situation}: the body reports {dep} as {checks[dep]!r}, expected "
                        f"it down: {dep} is unreachable in this outage", pytrace=False)
    for dep in sorted(up):
        if not _is_ok(checks[dep]):
            pytest.fail(f"{situation}: the body reports {dep} as {checks[dep]!r}, but {dep} "
                        f"answers (only {', '.join(sorted(down))} is down): report each "
                        "check's own result, not the overall one", pytrace=False)


def stale_report(host: str, body: Any, dep: str, situation: str) -> None:
    """``dep`` is back and ``body`` reports it down: if the very next probe finds it ok, the
    first answered from a connection the outage had broken, not from ``dep`` as it is now."""
    checks = _checks(body)
    if checks is None or dep not in checks or _is_ok(checks[dep]):
        return
    again = _checks(probe(host, "/health/ready")[1])
    if again is not None and _is_ok(again.get(dep)):
        pytest.fail(f"{situation}: the first probe after {dep} came back reported it "
                    f"{checks[dep]!r}, the next one {again[dep]!r}: the check used a "
                    "connection opened before the outage, which the outage had broken (a "
                    "pooled connection handed out unchecked), and reported that instead of "
                    f"{dep} as it is now - a false 'not ready' after every outage or cut. "
                    "Check on a fresh connection, or have the pool test one before handing it "
                    "out (psycopg_pool: check=ConnectionPool.check_connection)", pytrace=False)


def names(body: Any, dependency: str, situation: str) -> None:
    other = {"postgres", "redis"} - {dependency}
    reported(body, {dependency}, other, situation)


def answers_until_ready(host: str, budget: float) -> tuple[list[int], Any]:
    """Probe /health/ready until it answers 200 or ``budget`` seconds have gone: the
    statuses seen, and the last body."""
    deadline = time.monotonic() + budget
    seen: list[int] = []
    while True:
        status, body, _ = probe(host, "/health/ready")
        seen.append(status)
        if status == 200 or time.monotonic() > deadline:
            return seen, body
        time.sleep(0.05)


def wait_ready(host: str, situation: str) -> None:
    seen, body = answers_until_ready(host, 20)
    if seen[-1] == 200:
        return
    pytest.fail(f"{situation}: /health/ready never returned to 200 within 20 s (last "
                f"answers {seen[-3:]}, body {body})\nReadiness must recover by itself: a "
                "connection opened at start-up is broken by the outage; open one per check "
                "(or use a pool that replaces broken connections).", pytrace=False)


LIVE_WHY = ("liveness says 'restart me'; a dependency outage is not fixed by restarting "
            "this process (every replica would restart at once): /health/live checks "
            "nothing outside the process")


def test_baseline(host: str, deps: Deps) -> None:
    expect(host, "/health/live", 200, "everything up", "the process is fine")
    body = expect(host, "/health/ready", 200, "everything up", "both dependencies answer")
    assert body is not None, "/health/ready should answer JSON"
    reported(body, set(), {"postgres", "redis"}, "everything up")
    for _ in range(3):
        before = deps.reached()
        expect(host, "/health/live", 200, "everything up", "the process is fine")
        touched = [dep for dep, n in deps.reached().items() if n != before[dep]]
        assert not touched, (
            f"GET /health/live talked to {' and '.join(touched)} (connected or sent a "
            f"command), expected it to touch no dependency: {LIVE_WHY}")
    for attempt in range(1, 5):
        before = deps.reached()
        expect(host, "/health/ready", 200, "everything up", "both dependencies answer")
        silent = [dep for dep, n in deps.reached().items() if n == before[dep]]
        assert not silent, (
            f"probe {attempt} of 4 in a row: /health/ready answered 200 without talking to "
            f"{' or '.join(silent)} (no connection, no byte sent): the answer was "
            "remembered (or never checked), expected every probe to check again - a cached "
            "'ready' keeps sending traffic to an instance whose database went down a moment "
            "ago")


def test_a_dsn_in_uri_form(learner: Any, postgres: Any, deps: Deps) -> None:
    """pg_dsn is a libpq connection string, which comes in two forms: key=value pairs (what
    the other tests pass) or a URI, the form DATABASE_URL and most platforms hand an app."""
    uri = deps.pg.url_for(postgres.dsn)
    assert uri.startswith("postgresql://")
    make_app = learner.function("health", "make_app")
    situation = "pg_dsn given as a URI (postgresql://user:password@host:port/db)"
    with serve_wsgi(make_app(uri, deps.redis_url)) as address:
        body = expect(address, "/health/ready", 200, situation,
                      "Postgres is up, and the same database given as key=value pairs "
                      "checks ok - a libpq connection string is key=value pairs or a URI, "
                      "and text appended to it (' connect_timeout=2') or a split on spaces "
                      "and '=' only works for the first: pass the settings as keyword "
                      "arguments (psycopg.connect(dsn, connect_timeout=2)), which libpq "
                      "merges into either form")
    reported(body, set(), {"postgres", "redis"}, situation)


def test_a_check_leaves_no_transaction_open(host: str, postgres: Any) -> None:
    """psycopg opens a transaction with the first statement unless the connection is in
    autocommit: a connection kept between probes that ran SELECT 1 and never committed sits
    'idle in transaction' - a server session pinned by a pooler in transaction mode, a
    session killed by idle_in_transaction_session_timeout (the next probe then reports a
    false 'down'), an alarm on every dashboard."""
    for _ in range(2):
        expect(host, "/health/ready", 200, "everything up", "both dependencies answer")
    with postgres.connect(autocommit=True) as conn:
        open_ = conn.execute(
            "SELECT count(*), max(now() - state_change) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state LIKE 'idle in transaction%'").fetchone()
    assert open_ is not None
    assert open_[0] == 0, (
        f"after two readiness probes answered 200, {open_[0]} session(s) of the app sit 'idle "
        f"in transaction' on Postgres (for {open_[1]}): the check ran SELECT 1 on a connection "
        "it keeps and never ended the transaction psycopg began - open the connection with "
        "autocommit=True, or end it (a with block on the connection commits and closes)")


RECONNECT_BUDGET = 5.0   # seconds readiness may take to replace a broken connection
# (dependency, its label, how a check gets a connection that survives one breaking)
RECONNECTS = (
    ("postgres", "Postgres", "open a connection per check (psycopg.connect(...) in a with "
     "block, with its timeouts), or use a pool that replaces broken connections"),
    ("redis", "Redis", "keep a redis.Redis client (its connection pool drops a broken "
     "connection and connects again), not one socket opened once"),
)


def test_readiness_reconnects_when_its_connection_breaks(host: str, deps: Deps) -> None:
    """Each dependency stays up, but the connections the app has open to it are cut (what a
    server restart, a failover or a firewall's idle timeout does to them): the next probes
    must find their way back to 200 by themselves, quickly."""
    for name, label, fix in RECONNECTS:
        proxy = deps.proxies[name]
        expect(host, "/health/ready", 200, f"before the app's {label} connections are cut",
               "both dependencies answer")
        accepted, held = proxy.connections()
        proxy.cut()
        seen, body = answers_until_ready(host, RECONNECT_BUDGET)
        if seen[-1] == 200:
            continue
        opened = proxy.connections()[0] - accepted
        situation = f"{label} up, the app's {held} open connection(s) to it cut by the test"
        answered = "/".join(str(status) for status in sorted(set(seen)))
        if opened == 0:
            pytest.fail(f"{situation}: /health/ready answered {answered} to all {len(seen)} "
                        f"probes in {RECONNECT_BUDGET:.0f} s ({body}) and opened no new "
                        f"connection to {label}, expected 200 again at once ({label} itself "
                        "is up): the readiness check reuses one connection opened earlier (at "
                        "start-up, or at its first check) and never reconnects after it broke "
                        f"- {fix}", pytrace=False)
        pytest.fail(f"{situation}: /health/ready still answered {seen[-1]} {body} after "
                    f"{RECONNECT_BUDGET:.0f} s ({len(seen)} probes, {opened} new connection(s) "
                    f"to {label}), expected 200: {label} is up and accepts new connections",
                    pytrace=False)


def test_postgres_stopped_and_started(host: str, postgres: Any) -> None:
    expect(host, "/health/ready", 200, "before the outage", "both dependencies answer")
    postgres.stop()
    try:
        situation = "Postgres stopped"
        body = expect(host, "/health/ready", 503, situation,
                      "readiness says 'do not send me traffic': without its database the "
                      "app cannot serve, the load balancer must route elsewhere (and 500 "
                      "would say the app itself is broken)")
        names(body, "postgres", situation)
        expect(host, "/health/live", 200, situation, LIVE_WHY)
        expect(host, "/health/ready", 503, f"{situation}, asked again",
               "readiness is checked on every probe, not remembered")
    finally:
        postgres.start()
    wait_ready(host, "Postgres started again")
    expect(host, "/health/live", 200, "Postgres started again", "the process is fine")


def test_redis_down_then_both_then_back(host: str, deps: Deps) -> None:
    expect(host, "/health/ready", 200, "before the outage", "both dependencies answer")
    deps.redis.set("down")
    situation = "Redis unreachable (connections refused and cut)"
    body = expect(host, "/health/ready", 503, situation,
                  "a dependency the app needs is unreachable: check Redis too (PING)")
    names(body, "redis", situation)
    expect(host, "/health/live", 200, situation, LIVE_WHY)
    deps.pg.set("down")
    situation = "Postgres and Redis both unreachable"
    body = expect(host, "/health/ready", 503, situation,
                  "no dependency answers: the instance cannot serve")
    reported(body, {"postgres", "redis"}, set(), situation)
    deps.pg.set("up")
    situation = "Postgres back, Redis still unreachable"
    body = expect(host, "/health/ready", 503, situation,
                  "Redis is still unreachable: the instance still cannot serve")
    stale_report(host, body, "postgres", situation)
    names(body, "redis", situation)
    deps.redis.set("up")
    wait_ready(host, "Redis reachable again")


# (dependency, its label, proxy mode, the situation, what bounds the check there)
HANGS: tuple[tuple[str, str, str, str, str], ...] = (
    ("redis", "Redis", "hang", "accepting connections but never answering", ""),
    ("postgres", "Postgres", "hang", "accepting connections but never answering", ""),
    ("postgres", "Postgres", "slow", f"logging clients in at once, then taking {STALL} s over "
     "SELECT 1 (a stuck server: overloaded, swapping, waiting on its disk)",
     "the connection was made in milliseconds, so connect_timeout never fired, and the "
     "query itself ran unbounded - bound it too: statement_timeout (options='-c "
     "statement_timeout=1000' on connect, or SET statement_timeout), or a deadline of the "
     "check's own"),
    ("postgres", "Postgres", "queue", "behind a pooler (PgBouncer) whose pool is exhausted: it "
     "logs clients in by itself and queues their queries until a server connection frees up "
     "(query_wait_timeout: 120 s by default)",
     "the login came at once (the pooler does it itself) and SELECT 1 waited in the "
     "pooler's queue, never reaching a server - statement_timeout is the server's, and "
     "starts counting only when a server runs the query, so it never fired. Bound the check "
     "on the client, with a deadline of its own that does not rely on the other end: a "
     "threading.Timer that shuts the connection's socket down after a second "
     "(socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR): the query "
     "then fails at once), or the check in a thread whose result you stop waiting for (not "
     "inside `with ThreadPoolExecutor()`: leaving it waits for the thread)"),
)


def test_a_hung_dependency_is_a_quick_503(host: str, deps: Deps) -> None:
    expect(host, "/health/ready", 200, "before the outage", "both dependencies answer")
    for name, label, mode, how, bound in HANGS:
        proxy = deps.proxies[name]
        if mode == "queue":
            proxy.set("answer", postgres_queueing_queries)
        else:
            proxy.set(mode)
        situation = f"{label} {how}"
        body = expect(host, "/health/ready", 503, situation,
                      "a dependency that does not answer within the check's timeout is down",
                      budget=HUNG_BUDGET, hung=bound)
        names(body, name, situation)
        expect(host, "/health/live", 200, situation, LIVE_WHY)
        proxy.set("up")
        wait_ready(host, f"{label} answering again")


def resp_commands(pending: bytearray) -> Iterator[bytes]:
    """Take each complete RESP command (*N then N bulk strings) off ``pending``: its name."""
    while pending.startswith(b"*") and b"\r\n" in pending:
        head, _, rest = bytes(pending).partition(b"\r\n")
        args: list[bytes] = []
        for _ in range(int(head[1:])):
            size, sep, rest = rest.partition(b"\r\n")
            if not sep or len(rest) < int(size[1:]) + 2:
                return   # the command is not all here yet
            args.append(rest[:int(size[1:])])
            rest = rest[int(size[1:]) + 2:]
        del pending[:len(pending) - len(rest)]
        yield args[0].upper() if args else b""


def redis_replying(error: str) -> Answer:
    """A Redis that lets a client log in and pick its db, then answers every command with
    the error reply ``error``."""
    def answer(pending: bytearray) -> tuple[bytes, bool]:
        return b"".join(b"+OK\r\n" if name in (b"AUTH", b"SELECT", b"CLIENT") else
                        f"-{error}\r\n".encode() for name in resp_commands(pending)), True
    return answer


def http_server(pending: bytearray) -> tuple[bytes, bool]:
    """Another service on the port: an HTTP server, refusing what it cannot parse."""
    return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11"
            b"\r\nConnection: close\r\n\r\nBad Request"), False


def _pg(kind: bytes, payload: bytes) -> bytes:
    return kind + (len(payload) + 4).to_bytes(4, "big") + payload


PG_READY = _pg(b"Z", b"I")
PG_LOGGED_IN = (_pg(b"R", (0).to_bytes(4, "big"))          # AuthenticationOk
                + b"".join(_pg(b"S", f"{k}\0{v}\0".encode()) for k, v in (
                    ("server_version", "16.4"), ("client_encoding", "UTF8"),
                    ("standard_conforming_strings", "on"), ("DateStyle", "ISO, MDY"),
                    ("integer_datetimes", "on"), ("TimeZone", "UTC")))
                + _pg(b"K", (4242).to_bytes(4, "big") + (7).to_bytes(4, "big")) + PG_READY)
SSL_OR_GSS_REQUEST = (80877103, 80877104)
SELECT = re.compile(rb"\s*(select|with)\b", re.IGNORECASE)


def stalled(query: bytes) -> bytes:
    """``query`` as a stuck server runs it: the same rows, after STALL seconds of work."""
    if not SELECT.match(query):
        return query   # BEGIN, SET ...: at once
    inner = query.rstrip().rstrip(b";")
    return b"SELECT q.* FROM (" + inner + b") AS q, pg_sleep(%d)" % STALL


def stalled_selects(state: dict[str, Any], chunk: bytes) -> tuple[bytes, bytes]:
    """The client's bytes with each SELECT (simple Query, or the Parse of an extended one)
    made to take STALL seconds on the server, the rest as it came; and the relay's own
    answer to the client (a request for TLS or GSS encryption is declined here, so the
    messages stay readable). ``state`` keeps the link's unparsed bytes and whether the
    startup phase (untyped messages) is over."""
    pending = state.setdefault("pending", bytearray())
    pending += chunk
    out, answer = bytearray(), b""
    while len(pending) >= 5:
        typed = state.get("typed", False)
        size = int.from_bytes(pending[1:5] if typed else pending[:4], "big") + typed
        if len(pending) < size:
            break
        message = bytes(pending[:size])
        del pending[:size]
        if not typed and int.from_bytes(message[4:8], "big") in SSL_OR_GSS_REQUEST:
            answer += b"N"   # "not here": the client goes on in the clear (sslmode=prefer)
            continue
        if not typed:   # the startup message: typed messages from here on
            state["typed"] = True
        elif message[:1] == b"Q":
            message = _pg(b"Q", stalled(message[5:-1]) + b"\0")
        elif message[:1] == b"P":
            name, query, rest = message[5:].split(b"\0", 2)
            message = _pg(b"P", name + b"\0" + stalled(query) + b"\0" + rest)
        out += message
    return bytes(out), answer


def postgres_failing_queries(code: str, message: str) -> Answer:
    """Something on Postgres' port that logs every client in (as PgBouncer does itself, with
    its own auth_file, before it needs a server connection) and then answers every query,
    simple or extended, with the ErrorResponse ``code`` ``message``."""
    error = _pg(b"E", f"SERROR\0VERROR\0C{code}\0M{message}\0\0".encode()) + PG_READY

    def answer(pending: bytearray) -> tuple[bytes, bool]:
        out = b""
        while len(pending) >= 5:
            if pending[0] == 0:   # an untyped startup-phase message: length, then a code
                size = int.from_bytes(pending[:4], "big")
                if len(pending) < max(size, 8):
                    break
                code_ = int.from_bytes(pending[4:8], "big")
                del pending[:size]
                out += b"N" if code_ in SSL_OR_GSS_REQUEST else PG_LOGGED_IN
                continue
            kind, size = bytes(pending[:1]), int.from_bytes(pending[1:5], "big")
            if len(pending) < size + 1:
                break
            del pending[:size + 1]
            if kind == b"X":      # Terminate
                return out, False
            if kind in (b"Q", b"S"):   # a simple query, or the Sync ending an extended one
                out += error
        return out, True
    return answer


CANCEL_REQUEST = 80877102


def postgres_queueing_queries(pending: bytearray) -> tuple[bytes, bool]:
    """A pooler whose pool is exhausted: it logs every client in by itself (as PgBouncer
    does, before it needs a server connection) and queues each query - nothing answers it
    while the test lasts. A cancel request for a queued query is dropped (connection
    closed): nothing is running on a server to cancel."""
    out = b""
    while len(pending) >= 8 and pending[0] == 0:   # startup-phase messages: length, code
        size = int.from_bytes(pending[:4], "big")
        if len(pending) < size:
            break
        code = int.from_bytes(pending[4:8], "big")
        del pending[:size]
        if code == CANCEL_REQUEST:
            return out, False
        out += b"N" if code in SSL_OR_GSS_REQUEST else PG_LOGGED_IN
    if pending[:1] == b"X":   # Terminate: the client gives up
        return out, False
    pending.clear()   # queued: the pooler holds the query, waiting for a server connection
    return out, True


LOGIN_ONLY = ("the login succeeded, every query fails: a check that only connects (or looks "
              "at the connection's status) reports ok while the app can serve nothing. A "
              "login proves only that something on the port speaks the startup protocol (a "
              "pooler logs clients in by itself): run SELECT 1 and read its answer")

# (dependency, its label, how it misbehaves, the impostor, what its client raises then,
# why that is not ready; "" for the general reason)
WRONG_ANSWERS = (
    ("redis", "Redis", "answering PING with -MASTERDOWN (a replica during a failover)",
     redis_replying("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set "
                    "to 'no'."), "an error reply is a redis.ResponseError", ""),
    ("redis", "Redis", "answering PING with -NOPERM (an ACL user without +ping)",
     redis_replying("NOPERM User health has no permissions to run the 'ping' command"),
     "a refused command is a redis.NoPermissionError (a ResponseError)", ""),
    ("redis", "Redis", "replaced on its port by an HTTP server",
     http_server, "a reply in another protocol is a redis.InvalidResponse ('Protocol Error')",
     ""),
    ("postgres", "Postgres", "replaced on its port by an HTTP server",
     http_server, "a reply in another protocol is a psycopg.OperationalError", ""),
    ("postgres", "Postgres", "behind a pooler (PgBouncer) that logs clients in by itself while "
     "the server behind it is gone: every query fails with 'pgbouncer cannot connect to "
     "server'", postgres_failing_queries("08P01", "pgbouncer cannot connect to server"),
     "a failed query raises a psycopg.Error", LOGIN_ONLY),
    ("postgres", "Postgres", "logging clients in, then cancelling every query (57014, "
     "statement timeout: the server is stuck)",
     postgres_failing_queries("57014", "canceling statement due to statement timeout"),
     "a cancelled query raises psycopg.errors.QueryCanceled", LOGIN_ONLY),
)


def test_a_dependency_answering_wrongly_is_a_503(host: str, deps: Deps) -> None:
    """The dependency is reachable but does not answer as it should: an error reply, or
    another protocol on its port. That is "down" for readiness too, never a 500."""
    expect(host, "/health/ready", 200, "before the outage", "both dependencies answer")
    for name, label, how, impostor, raises, why in WRONG_ANSWERS:
        proxy = deps.proxies[name]
        proxy.set("answer", impostor)
        situation = f"{label} {how}"
        body = expect(host, "/health/ready", 503, situation,
                      why or f"{label} is there but does not answer PING/SELECT 1 properly: "
                      "not ready", raised=(
                          f"the {name} check let an exception escape: {raises}, which it "
                          "did not catch (ConnectionError and TimeoutError cover only a "
                          "refused, cut or hung connection, not the only ways a dependency "
                          "fails). "
                          "Catch every failure of the check (except Exception) and report it "
                          "as 'down: <error>' with 503; a 500 says the app itself is broken "
                          "and hides which dependency failed."))
        names(body, name, situation)
        proxy.set("up")
        wait_ready(host, f"{label} answering properly again")


def test_starts_while_dependencies_are_down(learner: Any, deps: Deps) -> None:
    deps.pg.set("down")
    deps.redis.set("down")
    make_app = learner.function("health", "make_app")
    try:
        app = make_app(deps.pg_dsn, deps.redis_url)
    except Exception as exc:  # noqa: BLE001 - whatever it raised is the finding
        first = (str(exc).splitlines() or [""])[0]
        pytest.fail("make_app() raised while Postgres and Redis were unreachable, expected "
                    "an app that starts and answers /health/live 200 and /health/ready 503: "
                    "dependencies come and go, an app that cannot start without them "
                    "crash-loops instead of saying 'not ready' - connect in the checks (or "
                    f"lazily), not in make_app\n(it raised {type(exc).__name__}: {first})",
                    pytrace=False)
    situation = "started while Postgres and Redis were unreachable"
    with serve_wsgi(app) as address:
        expect(address, "/health/live", 200, situation, LIVE_WHY)
        body = expect(address, "/health/ready", 503, situation,
                      "no dependency answers: the instance cannot serve")
        reported(body, {"postgres", "redis"}, set(), situation)
        deps.pg.set("up")
        deps.redis.set("up")
        wait_ready(address, "Postgres and Redis reachable after the start")
