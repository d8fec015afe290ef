"""ph1.2 - nested /users/<id>/orders with two versions of the representation.

Implement make_app(dsn) -> a WSGI app. See README.md for the exact interface.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

VENDOR_TYPE = "application/vnd.shop+json"


def make_app(dsn: str) -> WSGIApp:
    """Return a WSGI app serving /users/<id>/orders[/<order_id>] in versions 1 and 2."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        # TODO: choose the version (URI prefix /vN, then Accept: application/vnd.shop+json;
        # version=N, then ?version=N, else 1); 404 when the user does not exist; render the
        # v1 or v2 representation from Postgres; Content-Type names the version.
        body = json.dumps({"error": f"not implemented yet: {method} {path}"}).encode()
        start_response("501 Not Implemented", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
        return [body]

    return app
