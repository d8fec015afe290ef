"""A stateless web app: every piece of state (sessions, carts, counters) lives in Redis, so
any instance can serve any request and an instance can die without losing anything.

    python app.py            (env: REDIS_URL, INSTANCE; prints "listening on <port>")
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from http.cookies import SimpleCookie
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis

SESSION_TTL = 3600
INSTANCE = os.environ.get("INSTANCE", "?")
r = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)


def reply(start: Any, status: str, doc: Any, headers: list[tuple[str, str]] | None = None
          ) -> list[bytes]:
    body = json.dumps(doc).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("X-Instance", INSTANCE), *(headers or [])])
    return [body]


def session_user(environ: dict[str, Any]) -> tuple[str, str] | None:
    cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
    if "session" not in cookie:
        return None
    sid = cookie["session"].value
    user = r.hget(f"session:{sid}", "user")
    return (sid, user) if user else None


def app(environ: dict[str, Any], start: Any) -> list[bytes]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
    size = int(environ.get("CONTENT_LENGTH") or 0)
    doc = json.loads(environ["wsgi.input"].read(size) or b"{}") if size else {}
    if method == "POST" and path == "/login":
        sid = secrets.token_urlsafe(24)
        # The key and its TTL in one MULTI/EXEC: an instance killed between two separate
        # commands would leave a session that never expires.
        with r.pipeline(transaction=True) as step:
            step.hset(f"session:{sid}", mapping={"user": doc["user"]})
            step.expire(f"session:{sid}", SESSION_TTL)
            step.execute()
        return reply(start, "200 OK", {"user": doc["user"]},
                     [("Set-Cookie", f"session={sid}; HttpOnly; Path=/")])
    if method == "POST" and path == "/counter":
        return reply(start, "200 OK", {"value": r.incr("counter")})
    if method == "GET" and path == "/counter":
        return reply(start, "200 OK", {"value": int(r.get("counter") or 0)})
    who = session_user(environ)
    if who is None:
        return reply(start, "401 Unauthorized", {"error": "log in first"})
    sid, user = who
    if method == "GET" and path == "/me":
        return reply(start, "200 OK", {"user": user})
    if method == "POST" and path == "/cart":
        with r.pipeline(transaction=True) as step:  # the item and the cart's TTL together
            step.rpush(f"cart:{sid}", doc["item"])
            step.expire(f"cart:{sid}", SESSION_TTL)
            step.execute()
        return reply(start, "200 OK", {"added": doc["item"]})
    if method == "GET" and path == "/cart":
        return reply(start, "200 OK", {"items": r.lrange(f"cart:{sid}", 0, -1)})
    return reply(start, "404 Not Found", {"error": "no such route"})


def stateless(environ: dict[str, Any], start: Any) -> list[bytes]:
    """``app``, with Redis unreachable answered 503: every bit of state is there, so there
    is nothing to answer from meanwhile (a copy kept here would be one instance's state)."""
    try:
        return app(environ, start)
    except redis.RedisError:
        return reply(start, "503 Service Unavailable", {"error": "state store unavailable"})


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


if __name__ == "__main__":
    httpd = make_server("127.0.0.1", 0, stateless, server_class=Server, handler_class=Quiet)
    print(f"listening on {httpd.server_port}", flush=True)
    sys.stdout.flush()
    httpd.serve_forever()
