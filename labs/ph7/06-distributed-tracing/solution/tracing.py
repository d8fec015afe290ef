"""ph7.6 - distributed tracing across two HTTP services with the OpenTelemetry SDK.

frontend: GET /checkout/<sku> -> calls inventory: GET /stock/<sku>.

Each service has its own TracerProvider (its own resource, service.name) exporting over
OTLP/HTTP. The W3C trace context travels in the traceparent header (and tracestate):
the frontend EXTRACTS the caller's context from its request, so its SERVER span joins the
caller's trace; it starts a CLIENT span for the outgoing call and INJECTS the context while
that span is current, so the inventory's SERVER span is the child of exactly that call.
The sampling decision travels too (the flags): ParentBased, the default, follows it.
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent + tracestate
STOCK = {"KEY-0042": 7, "KEY-0007": 0}


def make_provider(service_name: str, otlp_endpoint: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider


def incoming(environ: dict[str, Any]) -> dict[str, str]:
    """The request's trace headers, as the propagator's carrier."""
    return {name: environ[key] for name, key in (("traceparent", "HTTP_TRACEPARENT"),
                                                 ("tracestate", "HTTP_TRACESTATE"))
            if key in environ}


def respond(start_response: Any, status: str, body: Any) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(payload)))])
    return [payload]


def make_inventory(provider: TracerProvider) -> Any:
    tracer = provider.get_tracer("inventory")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        parent = PROPAGATOR.extract(incoming(environ))
        with tracer.start_as_current_span("GET /stock/{sku}", context=parent,
                                          kind=SpanKind.SERVER,
                                          attributes={"http.request.method": "GET",
                                                      "url.path": path}) as span:
            sku = path.removeprefix("/stock/")
            with tracer.start_as_current_span("stock lookup", attributes={"sku": sku}):
                if sku == "BOOM":
                    status, body = "500 Internal Server Error", {"error": "stock store down"}
                elif sku in STOCK:
                    status, body = "200 OK", {"sku": sku, "in_stock": STOCK[sku]}
                else:
                    status, body = "404 Not Found", {"error": "unknown sku"}
            span.set_attribute("http.response.status_code", int(status[:3]))
            if status.startswith("5"):
                span.set_status(Status(StatusCode.ERROR, body["error"]))
            return respond(start_response, status, body)

    return app


def make_frontend(provider: TracerProvider, inventory_url: str) -> Any:
    tracer = provider.get_tracer("frontend")
    target = urlsplit(inventory_url)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        parent = PROPAGATOR.extract(incoming(environ))
        with tracer.start_as_current_span("GET /checkout/{sku}", context=parent,
                                          kind=SpanKind.SERVER,
                                          attributes={"http.request.method": "GET",
                                                      "url.path": path}) as server:
            sku = path.removeprefix("/checkout/")
            with tracer.start_as_current_span("GET /stock/{sku}",
                                              kind=SpanKind.CLIENT) as client:
                headers: dict[str, str] = {}
                PROPAGATOR.inject(headers)  # the CLIENT span is current: it is the parent
                # timeout: an inventory that never answers is a failed call after 3 s
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=3)
                try:
                    conn.request("GET", f"{target.path.rstrip('/')}/stock/{sku}",
                                 headers=headers)
                    reply = conn.getresponse()
                    data = json.loads(reply.read() or b"{}")
                finally:
                    conn.close()
                client.set_attribute("http.response.status_code", reply.status)
                if reply.status >= 500:
                    client.set_status(Status(StatusCode.ERROR, f"inventory {reply.status}"))
            if reply.status >= 500:
                server.set_status(Status(StatusCode.ERROR, "inventory failed"))
                return respond(start_response, "502 Bad Gateway", {"error": "inventory"})
            if reply.status == 404:
                return respond(start_response, "404 Not Found", {"error": "unknown sku"})
            return respond(start_response, "200 OK", {"sku": sku, "available":
                                                      data["in_stock"] > 0})

    return app
