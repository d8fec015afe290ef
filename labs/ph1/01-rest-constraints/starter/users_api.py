"""ph1.1 - a RESTful /users resource on Postgres: nouns, stateless, cacheable.

Implement make_app(dsn) -> a WSGI app. See README.md for the exact interface.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def make_app(dsn: str) -> WSGIApp:
    """Return a WSGI app serving /users and /users/<id> from the Postgres database at dsn."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        # TODO: GET /users, POST /users, GET/PUT/DELETE /users/<id>, reading Postgres on
        # every request; ETag + Cache-Control on GET; 304 for a matching If-None-Match;
        # 405 with Allow for other methods; 404 for anything else.
        body = json.dumps({"error": f"not implemented yet: {method} {path}"}).encode()
        start_response("501 Not Implemented", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
        return [body]

    return app
