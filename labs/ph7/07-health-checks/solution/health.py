"""ph7.7 - health checks: liveness ("is this process able to work at all? if not, restart
it") and readiness ("can it serve traffic right now? if not, take it out of the load
balancer").

Liveness checks nothing outside the process: a database outage must not make Kubernetes
restart every replica (which would not fix the database, and would drop their in-flight
work). Readiness checks the dependencies, each time it is asked, each check bounded by a
short timeout (a probe that hangs is a probe that fails late), and never raises: any
failure is a 503 naming the dependency. Connections are made per check (Postgres) or come
from a pool that reconnects (Redis), so readiness recovers by itself when the dependency
comes back.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any

import psycopg
import redis

CHECK_TIMEOUT = 1  # seconds, per dependency


def hang_up(sock: socket.socket) -> None:
    """The check's deadline: shut the connection's socket down, so that a query still
    waiting for its answer fails at once, as if the other end had hung up."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass   # the other end hung up first


def make_app(pg_dsn: str, redis_url: str) -> Any:
    cache = redis.Redis.from_url(redis_url, socket_timeout=CHECK_TIMEOUT,
                                 socket_connect_timeout=CHECK_TIMEOUT)

    def check_postgres() -> str:
        try:
            # statement_timeout: the server stops a stuck SELECT 1 (and frees its worker);
            # but a pooler (PgBouncer) may queue the query before any server sees it, so the
            # check has a deadline of its own: a timer that shuts the socket down (through a
            # descriptor of its own), and a query still waiting fails at once
            with psycopg.connect(pg_dsn, connect_timeout=max(2, CHECK_TIMEOUT),
                                 options=f"-c statement_timeout={CHECK_TIMEOUT * 1000}") as conn, \
                    socket.socket(fileno=os.dup(conn.fileno())) as sock:
                watchdog = threading.Timer(CHECK_TIMEOUT, hang_up, args=(sock,))
                watchdog.start()
                try:
                    conn.execute("SELECT 1").fetchone()
                finally:
                    watchdog.cancel()
                    watchdog.join()
            return "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return f"down: {type(exc).__name__}"

    def check_redis() -> str:
        try:
            cache.ping()
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return f"down: {type(exc).__name__}"

    def reply(start_response: Any, status: str, body: Any) -> list[bytes]:
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(payload))),
                                ("Cache-Control", "no-store")])
        return [payload]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health/live":
            return reply(start_response, "200 OK", {"status": "alive"})
        if path == "/health/ready":
            checks = {"postgres": check_postgres(), "redis": check_redis()}
            ready = all(v == "ok" for v in checks.values())
            return reply(start_response, "200 OK" if ready else "503 Service Unavailable",
                         {"status": "ready" if ready else "not ready", "checks": checks})
        return reply(start_response, "404 Not Found", {"error": "not found"})

    return app
