"""ph1.6 - an accounts API whose every error is an RFC 7807 problem document.

Implement make_app(dsn) -> a WSGI app. See README.md for the exact interface.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

ACCOUNT = re.compile(r"^/accounts/([0-9]{1,19})$")  # accounts.id: a bigint


def make_app(dsn: str) -> WSGIApp:
    """Return a WSGI app serving GET /accounts/<id> and POST /accounts/<id>/withdrawals."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        match = ACCOUNT.match(path)
        if match and environ["REQUEST_METHOD"] == "GET":
            with psycopg.connect(dsn, row_factory=dict_row) as conn:
                row = conn.execute("SELECT id, owner, balance_cents FROM accounts "
                                   "WHERE id = %s", (int(match.group(1)),)).fetchone()
            if row is not None:
                body = json.dumps(row).encode()
                start_response("200 OK", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])
                return [body]
        # TODO: withdrawals, and every error as application/problem+json with type, title,
        # status, detail and instance (see README.md); a catch-all 500 that leaks nothing.
        body = json.dumps({"error": "not found"}).encode()
        start_response("404 Not Found", [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return app
