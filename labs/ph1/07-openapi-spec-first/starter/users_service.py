"""ph1.7 - the implementation of openapi.yaml, written after it and checked against it.

Implement make_app(dsn) -> a WSGI app that keeps the contract in openapi.yaml.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

SPEC = Path(__file__).with_name("openapi.yaml")  # the contract, next to this file


def make_app(dsn: str) -> WSGIApp:
    """Return a WSGI app implementing openapi.yaml over the users table at dsn."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        # TODO: listUsers, createUser, getUser, deleteUser exactly as openapi.yaml says.
        body = json.dumps({"error": f"not implemented yet: {method} {path}"}).encode()
        start_response("501 Not Implemented", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
        return [body]

    return app
