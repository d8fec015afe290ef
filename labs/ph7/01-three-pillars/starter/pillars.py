"""ph7.1 - the three pillars, correlated: every request must leave a JSON log line, metric
samples and a span that all carry the same trace id. The app works; it is not observable
yet. See README.md for the names and formats the verification reads.
"""

from __future__ import annotations

import json
from typing import Any

ORDERS = {"1": {"id": 1, "total": 42.5}, "2": {"id": 2, "total": 7.0}}


def make_provider(service_name: str, otlp_endpoint: str) -> Any:
    raise NotImplementedError("make_provider: a TracerProvider exporting over OTLP/HTTP")


def make_app(provider: Any, log_path: str) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b""]  # TODO: the metrics, with the trace id as an exemplar
        order = ORDERS.get(path.removeprefix("/orders/"))
        status, body = (200, order) if order else (404, {"error": "no such order"})
        # TODO: a span per request, a JSON log line and metrics inside it
        payload = json.dumps(body).encode()
        start_response(f"{status} X", [("Content-Type", "application/json")])
        return [payload]

    return app
