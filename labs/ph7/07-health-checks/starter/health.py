"""ph7.7 - health checks: /health/live (liveness) and /health/ready (readiness over
Postgres and Redis). See README.md for what each must and must not check.
"""

from __future__ import annotations

import json
from typing import Any


def make_app(pg_dsn: str, redis_url: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/health/live", "/health/ready"):
            body = json.dumps({"status": "ok"}).encode()  # TODO: real checks for ready
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"error": "not found"}']

    return app
