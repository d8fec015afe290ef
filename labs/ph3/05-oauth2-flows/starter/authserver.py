"""A small OAuth 2.0 authorization server: Authorization Code + PKCE (S256), Client
Credentials, Device Authorization (RFC 8628). See README.md."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

ACCESS_TTL = 300
CODE_TTL = 60
DEVICE_TTL = 600
DEVICE_INTERVAL = 5
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def make_app(clients: dict[str, dict[str, Any]], signing_key: bytes,
             clock: Callable[[], float] = time.time) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: GET /authorize, POST /token, POST /device_authorization, POST /device."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("501 Not Implemented", [("Content-Type", "application/json")])
        return [b'{"error": "the authorization server is not implemented yet"}']

    return app
