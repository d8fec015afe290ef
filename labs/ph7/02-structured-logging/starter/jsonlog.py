"""ph7.2 - structured logging: make this app's log one JSON object per line, with the
mandatory fields, levels, the caller's trace id, and no secret ever written.
See README.md for the exact rules.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any


def make_app(log_path: str, service: str, level: str = "INFO") -> Any:
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        status, body = 404, {"error": "not found"}
        if method == "POST" and path == "/login":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            data = json.loads(environ["wsgi.input"].read(length) or b"{}")
            if data.get("password") == "correct horse battery staple":
                status, body = 200, {"user": data.get("username")}
            else:
                status, body = 401, {"error": "bad credentials"}
        elif method == "POST" and path == "/client-events":
            status, body = 202, {"accepted": True}
        elif path == "/debug-me":
            status, body = 200, {"ok": True}
        elif path == "/boom":
            status, body = 500, {"error": "internal error"}
        # TODO: JSON lines with timestamp, level, service, trace_id, span_id, message
        log.write(f"{datetime.now()} {method} {path} {status}\n")
        log.flush()
        payload = json.dumps(body).encode()
        start_response(f"{status} X", [("Content-Type", "application/json")])
        return [payload]

    return app
