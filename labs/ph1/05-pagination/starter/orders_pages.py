"""ph1.5 - one list of orders, newest first, paged three ways (offset, cursor, keyset).

Implement make_app(connect) -> a WSGI app. See README.md for the exact interface.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Connect = Callable[[], psycopg.Connection[Any]]


def make_app(connect: Connect) -> WSGIApp:
    """Return a WSGI app serving GET /orders?style=offset|cursor|keyset&limit=..."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        query = environ.get("QUERY_STRING", "")
        # TODO: style=offset (limit, offset; total_count), style=cursor (opaque cursor,
        # next_cursor), style=keyset (before_created_at + before_id, next). Newest first,
        # ties broken by id. Get every connection from connect() and close it.
        body = json.dumps({"error": f"not implemented yet: GET /orders?{query}"}).encode()
        start_response("501 Not Implemented", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
        return [body]

    return app
