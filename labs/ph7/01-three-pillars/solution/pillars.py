"""ph7.1 - the three pillars, correlated: every request leaves a log line (what happened),
metric samples (how many, how fast) and a span (where the time went), all carrying one
trace id, so an operator can jump from a latency spike (metric exemplar) to the trace, and
from the trace to its log lines.

The span is opened first; the log line and the metric observations are made INSIDE it, so
they read the trace and span ids of the current span. Metrics keep bounded labels (the
route template and the status, never a raw path or an id): the trace id goes on the
metric as an exemplar, which OpenMetrics exposes next to the bucket it fell in.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics

PROPAGATOR = TraceContextTextMapPropagator()
ORDERS = {"1": {"id": 1, "total": 42.5}, "2": {"id": 2, "total": 7.0}}
ROUTE = "/orders/{id}"


def make_provider(service_name: str, otlp_endpoint: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    # exported in the background, in batches: a request never waits on the collector (a
    # collector down or slow would otherwise hold every request for the exporter's timeout)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider


def make_app(provider: TracerProvider, log_path: str) -> Any:
    service = provider.resource.attributes.get("service.name", "unknown")
    tracer = provider.get_tracer("pillars")
    registry = CollectorRegistry()
    requests = Counter("http_requests", "HTTP requests handled", ["route", "status"],
                       registry=registry)
    duration = Histogram("http_request_duration_seconds", "HTTP request duration",
                         ["route"], registry=registry)
    log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the app
    lock = threading.Lock()

    def log(level: str, message: str, **fields: Any) -> None:
        ctx = trace.get_current_span().get_span_context()  # the current span's ids
        record = {"timestamp": datetime.now(UTC).isoformat(), "level": level,
                  "service": service, "trace_id": format(ctx.trace_id, "032x"),
                  "span_id": format(ctx.span_id, "016x"), "message": message, **fields}
        with lock:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def metrics(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        accept = environ.get("HTTP_ACCEPT", "")
        if "application/openmetrics-text" in accept:  # the format that carries exemplars
            body, ctype = openmetrics.generate_latest(registry), openmetrics.CONTENT_TYPE_LATEST
        else:
            body, ctype = classic.generate_latest(registry), classic.CONTENT_TYPE_LATEST
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        # every request header, as the propagator names them: traceparent and tracestate
        carrier = {key[5:].lower().replace("_", "-"): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        started = time.perf_counter()
        with tracer.start_as_current_span(f"GET {ROUTE}", context=PROPAGATOR.extract(carrier),
                                          kind=SpanKind.SERVER) as span:
            order_id = path.removeprefix("/orders/")
            try:
                if order_id == "boom":
                    raise RuntimeError("the order store is on fire")
                order = ORDERS.get(order_id)
                status, body = (200, order) if order else (404, {"error": "no such order"})
            except Exception as exc:  # noqa: BLE001 - logged, counted, traced
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                log("ERROR", "unhandled exception", error=type(exc).__name__,
                    exception=traceback.format_exc())
                status, body = 500, {"error": "internal error"}
            elapsed = time.perf_counter() - started
            ctx = span.get_span_context()
            exemplar = {"trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x")}
            requests.labels(ROUTE, str(status)).inc(exemplar=exemplar)
            duration.labels(ROUTE).observe(elapsed, exemplar=exemplar)
            span.set_attribute("http.response.status_code", status)
            log("ERROR" if status >= 500 else "WARN" if status >= 400 else "INFO", "request",
                method="GET", route=ROUTE, path=path, status=status,
                duration_ms=round(elapsed * 1000, 3))
        payload = json.dumps(body).encode()
        start_response(f"{status} X", [("Content-Type", "application/json"),
                                       ("Content-Length", str(len(payload)))])
        return [payload]

    return app
