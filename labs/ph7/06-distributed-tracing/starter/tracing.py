"""ph7.6 - distributed tracing across two HTTP services with the OpenTelemetry SDK.

frontend: GET /checkout/<sku> -> calls inventory: GET /stock/<sku>. The services work;
they are not traced. Add: a TracerProvider per service exporting over OTLP/HTTP, a SERVER
span per request joined to the caller's trace (traceparent), a CLIENT span for the call
to inventory with the W3C context injected into its headers. See README.md.
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

STOCK = {"KEY-0042": 7, "KEY-0007": 0}


def make_provider(service_name: str, otlp_endpoint: str) -> Any:
    raise NotImplementedError("make_provider: a TracerProvider that exports over OTLP/HTTP")


def respond(start_response: Any, status: str, body: Any) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(payload)))])
    return [payload]


def make_inventory(provider: Any) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sku = environ.get("PATH_INFO", "").removeprefix("/stock/")
        if sku == "BOOM":
            return respond(start_response, "500 Internal Server Error", {"error": "down"})
        if sku in STOCK:
            return respond(start_response, "200 OK", {"sku": sku, "in_stock": STOCK[sku]})
        return respond(start_response, "404 Not Found", {"error": "unknown sku"})

    return app


def make_frontend(provider: Any, inventory_url: str) -> Any:
    target = urlsplit(inventory_url)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        sku = environ.get("PATH_INFO", "").removeprefix("/checkout/")
        # timeout: an inventory that never answers is a failed call after 3 s
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=3)
        try:
            conn.request("GET", f"{target.path.rstrip('/')}/stock/{sku}")
            reply = conn.getresponse()
            data = json.loads(reply.read() or b"{}")
        finally:
            conn.close()
        if reply.status >= 500:
            return respond(start_response, "502 Bad Gateway", {"error": "inventory"})
        if reply.status == 404:
            return respond(start_response, "404 Not Found", {"error": "unknown sku"})
        return respond(start_response, "200 OK", {"sku": sku, "available": data["in_stock"] > 0})

    return app
