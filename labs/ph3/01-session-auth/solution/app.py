"""Session-based auth: the session lives in Redis, the browser holds only its id in an
HttpOnly, Secure, SameSite cookie. A new id at login (session fixation), a per-session
CSRF token on every state-changing POST, logout deletes the session server-side."""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis

COOKIE = "sid"
SESSION_TTL = 1800  # seconds of idle time before Redis forgets the session
PREFIX = "session:"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _cookie(sid: str, max_age: int) -> tuple[str, str]:
    return ("Set-Cookie", f"{COOKIE}={sid}; Path=/; Max-Age={max_age}; HttpOnly; Secure; "
            "SameSite=Lax")


def cookie_values(header: str, name: str) -> list[str]:
    """Every value the Cookie header gives the cookie `name`, in order. The header is
    "name=value" pairs joined by "; " (RFC 6265 5.4), holding the site's other cookies too
    (analytics, a CSRF cookie, a page script's JSON); names are compared whole (xsid and
    sid_old are other cookies). A pair this cannot read is skipped, never the whole header,
    as Django's parse_cookie and Go's net/http do - SimpleCookie drops every cookie after a
    value holding a quote, and keeps only the last of two cookies of one name."""
    values = []
    for pair in header.split(";"):
        key, eq, value = pair.strip().partition("=")
        if eq and key.strip() == name and value.strip():
            values.append(value.strip())
    return values


def make_app(redis_url: str, users: Mapping[str, str]) -> Callable[..., Iterable[bytes]]:
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    accounts = dict(users)

    def new_session(fields: dict[str, str]) -> str:
        sid = secrets.token_urlsafe(32)  # 256 bits from the OS CSPRNG
        key = PREFIX + sid
        with store.pipeline() as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, SESSION_TTL)
            pipe.execute()
        return sid

    def load(environ: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
        # A browser may send two sid cookies (a stale one of another Path or Domain), in
        # either order: RFC 6265 4.2.2 - servers SHOULD NOT rely on the order of same-named
        # cookies. The session is the one whose id Redis holds; an id the server never
        # issued (or forgot) is no session.
        for sid in cookie_values(environ.get("HTTP_COOKIE", ""), COOKIE):
            data = store.hgetall(PREFIX + sid)
            if data:
                store.expire(PREFIX + sid, SESSION_TTL)  # sliding idle timeout
                return sid, data
        return None, {}

    def csrf_ok(environ: dict[str, Any], session: dict[str, str]) -> bool:
        sent = environ.get("HTTP_X_CSRF_TOKEN", "")
        return bool(sent) and hmac.compare_digest(sent.encode(), session["csrf"].encode())

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        headers: list[tuple[str, str]] = []

        def reply(status: str, document: Any) -> Iterable[bytes]:
            body = json.dumps(document).encode()
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body))),
                                    ("Cache-Control", "no-store"), *headers])
            return [body]

        sid, session = load(environ)

        if (method, path) == ("GET", "/login"):
            if sid is None:  # an anonymous session, to carry the CSRF token
                session = {"csrf": secrets.token_urlsafe(32)}
                sid = new_session(session)
                headers.append(_cookie(sid, SESSION_TTL))
            return reply("200 OK", {"csrf": session["csrf"]})

        if (method, path) == ("POST", "/login"):
            try:
                size = int(environ.get("CONTENT_LENGTH") or 0)
                creds = json.loads(environ["wsgi.input"].read(size) or b"{}")
                name, password = str(creds["username"]), str(creds["password"])
            except (ValueError, KeyError, TypeError):
                return reply("400 Bad Request", {"error": "username and password"})
            known = accounts.get(name)
            if known is None or not hmac.compare_digest(known.encode(), password.encode()):
                return reply("401 Unauthorized", {"error": "wrong username or password"})
            if sid is not None:  # session fixation: the pre-login id dies here
                store.delete(PREFIX + sid)
            csrf = secrets.token_urlsafe(32)
            sid = new_session({"user": name, "csrf": csrf})
            headers.append(_cookie(sid, SESSION_TTL))
            return reply("200 OK", {"user": name, "csrf": csrf})

        if (method, path) == ("GET", "/me"):
            if "user" not in session:
                return reply("401 Unauthorized", {"error": "not logged in"})
            return reply("200 OK", {"user": session["user"]})

        if (method, path) in (("POST", "/transfer"), ("POST", "/logout")):
            if sid is None or "user" not in session:
                return reply("401 Unauthorized", {"error": "not logged in"})
            if not csrf_ok(environ, session):
                return reply("403 Forbidden", {"error": "missing or wrong CSRF token"})
            if path == "/transfer":
                return reply("200 OK", {"ok": True})
            store.delete(PREFIX + sid)
            headers.append(_cookie("", 0))
            return reply("200 OK", {"ok": True})

        return reply("404 Not Found", {"error": "no such route"})

    return app
