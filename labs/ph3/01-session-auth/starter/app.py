"""Session-based auth with Redis: see README.md for the routes and the rules."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

COOKIE = "sid"
SESSION_TTL = 1800  # seconds of idle time before Redis forgets the session
PREFIX = "session:"


def make_app(redis_url: str, users: Mapping[str, str]) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: GET/POST /login, GET /me, POST /transfer, POST /logout."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("501 Not Implemented", [("Content-Type", "text/plain")])
        return [b"make_app(): sessions are not implemented yet"]

    return app
