"""ph1.4 - every outcome of a small /projects API mapped to the status code that names it.

Implement make_app(dsn, clock=..., rate_limit=..., window_seconds=...) -> a WSGI app.
See README.md for the exact interface and the status each outcome must get.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def make_app(dsn: str, *, clock: Callable[[], float] = time.time, rate_limit: int = 100,
             window_seconds: int = 60) -> WSGIApp:
    """Return a WSGI app serving POST /projects, GET and DELETE /projects/<id>."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        # TODO: authenticate (401), rate limit with clock() (429 + Retry-After),
        # authorise (403), parse (400), validate (422), then 201/204/200/304/404/409;
        # 503 when the database cannot be reached.
        body = json.dumps({"error": f"not implemented yet: {method} {path}"}).encode()
        start_response("501 Not Implemented", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
        return [body]

    return app
