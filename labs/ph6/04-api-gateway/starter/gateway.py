"""An API gateway: routing, JWT check before forwarding, per-user rate limiting, a BFF
dashboard and a weighted canary. See README.md."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


class ApiGateway:
    def __init__(self, routes: dict[str, str], *, jwt_secret: str, rate_limit: int = 5,
                 window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 canary: dict[str, Any] | None = None) -> None:
        self.routes = routes

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        # TODO: 401 without a valid token, 429 over the limit, route (canary), BFF dashboard
        start_response("501 Not Implemented", [("Content-Type", "text/plain")])
        return [b"not implemented"]
