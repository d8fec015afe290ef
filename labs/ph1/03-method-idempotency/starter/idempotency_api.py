"""ph1.3 - idempotent PUT and DELETE, and POST made safe to retry with an Idempotency-Key.

Implement make_app(dsn) -> a WSGI app. See README.md for the exact interface.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def make_app(dsn: str) -> WSGIApp:
    """Return a WSGI app serving PUT/DELETE /users/<id>, POST /orders, GET /orders/<id>."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        # TODO: PUT /users/<id> (create or replace), DELETE /users/<id>,
        # POST /orders with an Idempotency-Key stored in the idempotency_keys table,
        # GET /orders/<id>.
        body = json.dumps({"error": f"not implemented yet: {method} {path}"}).encode()
        start_response("501 Not Implemented", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
        return [body]

    return app
