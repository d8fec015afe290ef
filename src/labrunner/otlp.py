"""An OTLP/HTTP trace receiver for verifications: the collector end of OpenTelemetry.

A learner's OpenTelemetry SDK exports spans with the standard OTLP/HTTP exporter
(``OTLPSpanExporter(endpoint=receiver.endpoint)``) to this receiver, which the test runs on
``127.0.0.1:<free port>``. It decodes each ``ExportTraceServiceRequest`` (protobuf, gzip or
not) with ``opentelemetry-proto`` and keeps the spans as plain :class:`ReceivedSpan` records
(hex ids, kind and status names, attributes as Python values), so that a verification checks
what an observability backend would actually receive, from whichever process sent it.

    with OtlpTraceReceiver() as receiver:
        provider = learner_module.make_provider("frontend", receiver.endpoint)
        ...
        spans = receiver.wait_for(3, "the three spans of one request")
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

__all__ = ["OtlpTraceReceiver", "ReceivedSpan"]


@dataclass
class ReceivedSpan:
    trace_id: str              # 32 hex digits
    span_id: str               # 16 hex digits
    parent_span_id: str        # "" for a root span
    name: str
    kind: str                  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER"
    service: str               # the resource's service.name
    start_ns: int
    end_ns: int
    status: str                # "UNSET", "OK", "ERROR"
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    trace_state: str = ""

    def describe(self) -> str:
        parent = self.parent_span_id or "none"
        return (f"{self.service}/{self.name!r} kind={self.kind} trace={self.trace_id} "
                f"span={self.span_id} parent={parent}")


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(any_value, kind)
    if kind == "array_value":
        return [_value(v) for v in value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.values}
    return value


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ExportTraceServiceRequest."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), name=span.name,
                    kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                    service=str(resource.get("service.name", "")),
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    status=Status.StatusCode.Name(span.status.code).removeprefix(
                        "STATUS_CODE_"),
                    attributes={kv.key: _value(kv.value) for kv in span.attributes},
                    events=[event.name for event in span.events],
                    trace_state=span.trace_state))
    return spans


class OtlpTraceReceiver:
    """OTLP/HTTP (protobuf) trace receiver on 127.0.0.1:<free port>; a context manager."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    if self.headers.get("Content-Encoding", "").lower() == "gzip":
                        body = gzip.decompress(body)
                    if self.path.rstrip("/") != "/v1/traces":
                        raise ValueError(f"POST {self.path}: OTLP traces go to /v1/traces")
                    spans = decode(body)
                except Exception as exc:  # noqa: BLE001 - recorded, answered 400
                    with receiver._lock:
                        receiver.errors.append(f"{type(exc).__name__}: {exc}")
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.spans.extend(spans)
                    receiver.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        """The URL to give OTLPSpanExporter(endpoint=...)."""
        return f"http://127.0.0.1:{self._server.server_port}/v1/traces"

    def __enter__(self) -> OtlpTraceReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def wait_for(self, count: int, what: str, timeout: float = 15) -> list[ReceivedSpan]:
        """At least ``count`` spans received (or fail the test naming ``what``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.snapshot()
            if len(spans) >= count:
                return spans
            time.sleep(0.01)
        spans = self.snapshot()
        seen = "\n  ".join(s.describe() for s in spans) or "(none)"
        errors = f"\nundecodable exports: {self.errors[:3]}" if self.errors else ""
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}: the collector "
                    f"received {len(spans)} span(s), expected at least {count}\n  {seen}"
                    f"{errors}\nSpans are exported when they END, by the span processor: "
                    "end every span (use `with tracer.start_as_current_span(...)`), and "
                    "export with OTLPSpanExporter(endpoint=...) through a "
                    "SimpleSpanProcessor (or flush a BatchSpanProcessor).", pytrace=False)
