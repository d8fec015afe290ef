"""Verification for ph7.7 health-checks.

The learner's app runs behind a real HTTP server with the test's own Postgres database and
Redis db. The outages are real: the runner's Postgres server is stopped and started again
(postgres.stop()/start(), so the lab is exclusive), and Redis is reached through the test's
TCP proxy, which can refuse connections (down) or accept them and never answer (a hung
dependency) and cut the connections it relays. Through each outage /health/live must stay
200 and /health/ready must answer 503 naming the dependency, quickly; when the dependency
is back, /health/ready must return to 200 by itself.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from labrunner.testing import serve_wsgi

PROBE_TIMEOUT = 8.0   # seconds a probe may take before the test calls it hung
HUNG_BUDGET = 4.0     # ... when a dependency hangs: the check's own timeout must cut it
                      # (Kubernetes' default probe timeoutSeconds is 1)


class TcpProxy:
    """127.0.0.1:<port> relaying to ``target``; mode "up", "down" (accept, close at once)
    or "hang" (accept, never answer). Leaving "up" cuts every relayed connection."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "up"
        self.lock = threading.Lock()
        self.pairs: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                mode = self.mode
                self.pairs.append(client)
            if mode == "down":
                client.close()
            elif mode == "up":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                with self.lock:
                    self.pairs.append(upstream)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            # "hang": keep the socket open and never read or answer

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def set(self, mode: str) -> None:
        with self.lock:
            self.mode = mode
            pairs, self.pairs = self.pairs, []
        for s in pairs:  # the outage breaks what was open too
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.set("down")
        self.listener.close()


@pytest.fixture
def redis_proxy(redis_db: Any) -> Iterator[tuple[TcpProxy, str]]:
    url = urlsplit(redis_db.url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 6379)
    netloc = url.netloc.rsplit("@", 1)
    hostport = f"127.0.0.1:{proxy.port}"
    proxied = urlunsplit(url._replace(netloc=f"{netloc[0]}@{hostport}" if len(netloc) == 2
                                      else hostport))
    yield proxy, proxied
    proxy.close()


@pytest.fixture
def host(learner: Any, postgres: Any, redis_proxy: tuple[TcpProxy, str]) -> Iterator[str]:
    make_app = learner.function("health", "make_app")
    with serve_wsgi(make_app(postgres.dsn, redis_proxy[1])) as address:
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


def expect(host: str, path: str, status: int, situation: str, why: str,
           budget: float = PROBE_TIMEOUT) -> Any:
    got, body, took = probe(host, path, budget)
    if got == 0:
        pytest.fail(f"{situation}: GET {path} did not answer within {budget:.0f} s, "
                    f"expected {status}\nA probe that hangs fails late and ties up a "
                    "worker: bound every dependency check with a short timeout "
                    "(connect_timeout, socket_timeout) and answer 503 when it expires.",
                    pytrace=False)
    assert got == status, f"{situation}: GET {path} answered {got} {body}, expected {status}: {why}"
    return body


def names(body: Any, dependency: str, situation: str) -> None:
    assert dependency in json.dumps(body or {}).lower(), (
        f"{situation}: the 503 body {body} does not name {dependency}: say which check "
        "failed ({\"checks\": {\"postgres\": \"down: ...\", \"redis\": \"ok\"}}), or the "
        "on-call engineer starts by guessing")


def wait_ready(host: str, situation: str) -> None:
    deadline = time.monotonic() + 20
    seen: list[int] = []
    while time.monotonic() < deadline:
        status, body, _ = probe(host, "/health/ready")
        seen.append(status)
        if status == 200:
            return
        time.sleep(0.05)
    pytest.fail(f"{situation}: /health/ready never returned to 200 within 20 s (last "
                f"answers {seen[-3:]}, body {body})\nReadiness must recover by itself: a "
                "connection opened at start-up is broken by the outage; open one per check "
                "(or use a pool that replaces broken connections).", pytrace=False)


LIVE_WHY = ("liveness says 'restart me'; a dependency outage is not fixed by restarting "
            "this process (every replica would restart at once): /health/live checks "
            "nothing outside the process")


def test_baseline(host: str) -> None:
    expect(host, "/health/live", 200, "everything up", "the process is fine")
    body = expect(host, "/health/ready", 200, "everything up", "both dependencies answer")
    assert body is not None, "/health/ready should answer JSON"


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


def test_redis_down_then_back(host: str, redis_proxy: tuple[TcpProxy, str]) -> None:
    proxy = redis_proxy[0]
    expect(host, "/health/ready", 200, "before the outage", "both dependencies answer")
    proxy.set("down")
    situation = "Redis unreachable (connections refused and cut)"
    body = expect(host, "/health/ready", 503, situation,
                  "a dependency the app needs is unreachable: check Redis too (PING)")
    names(body, "redis", situation)
    expect(host, "/health/live", 200, situation, LIVE_WHY)
    proxy.set("up")
    wait_ready(host, "Redis reachable again")


def test_a_hung_dependency_is_a_quick_503(host: str, redis_proxy: tuple[TcpProxy, str]) -> None:
    proxy = redis_proxy[0]
    expect(host, "/health/ready", 200, "before the outage", "both dependencies answer")
    proxy.set("hang")
    situation = "Redis accepting connections but never answering"
    body = expect(host, "/health/ready", 503, situation,
                  "a dependency that does not answer within the check's timeout is down",
                  budget=HUNG_BUDGET)
    names(body, "redis", situation)
    expect(host, "/health/live", 200, situation, LIVE_WHY)
    proxy.set("up")
    wait_ready(host, "Redis answering again")
