"""Verification for ph7.6 distributed-tracing.

Two real HTTP services from the learner's code (frontend -> inventory), each with its own
OpenTelemetry TracerProvider exporting over OTLP/HTTP to a collector the test runs
(labrunner.otlp.OtlpTraceReceiver, decoding ExportTraceServiceRequest with
opentelemetry-proto). Between them sits the test's recording proxy, which sees the headers
of the frontend's outgoing call. The test plays the upstream caller: it sends its own
traceparent (a trace id with leading zeros, a tracestate, sampled or not) and checks the
trace the collector received: one trace id end to end, the parent of every span, span
kinds, service names, the header's W3C format, the sampling decision and error status
(also when the proxy itself fails the call: a 502/503/504 of its own, a cut connection, a
200 whose body breaks off, or it never answers: the frontend's call must time out).
"""

from __future__ import annotations

import http.client
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest

from labrunner.otlp import OtlpTraceReceiver, ReceivedSpan
from labrunner.testing import HttpReply, http_request, serve_wsgi

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


# What the proxy (a load balancer in front of inventory) does itself for some skus, without
# asking inventory: answer a 5xx of its own, cut the connection before any answer, or cut it
# in the middle of a 200's body (SHORT: the status line and headers arrived, the body did not).
SHORT = "short"
PROXY_FAILS: dict[str, int | str | None] = {"LB-502": 502, "LB-503": 503, "LB-504": 504,
                                            "LB-CUT": None, "LB-SHORT": SHORT}
SHORT_BODY, SHORT_LENGTH = b'{"sku": "LB-SHORT", ', 100
# For this sku the proxy takes the call and never answers (a hung inventory, a black-holed
# packet) until the test ends. The README asks for a timeout of at most 5 s; the test waits
# 8 s for the frontend's answer: 3 s of slack, so a correct one on a loaded machine is never
# cut; and far from the 10 s an older starter had, so that one fails every time, not by a race.
HANG_SKU, HANG_WAIT = "LB-HANG", 8.0


class RecordingProxy:
    """HTTP proxy on 127.0.0.1:0 in front of ``upstream``: records each request's headers;
    for the skus of PROXY_FAILS it fails the call itself."""

    def __init__(self, upstream: str) -> None:
        self.seen: list[dict[str, str]] = []
        self.closing = threading.Event()
        proxy = self
        host, port = upstream.rsplit(":", 1)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                proxy.seen.append({k.lower(): v for k, v in self.headers.items()})
                sku = self.path.rsplit("/", 1)[-1]
                if sku == HANG_SKU:  # no answer; the connection closes when the test ends
                    self.close_connection = True
                    proxy.closing.wait(60)
                    return
                if sku in PROXY_FAILS:
                    self.fail(PROXY_FAILS[sku])
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                try:
                    conn.request("GET", self.path, headers=dict(self.headers.items()))
                    reply = conn.getresponse()
                    body = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.getheader("Content-Type") or "")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def fail(self, status: int | str | None) -> None:
                self.close_connection = True
                if status is None:  # cut: the connection closes with no answer at all
                    return
                if status == SHORT:  # a 200 whose body stops at a fifth of its length
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(SHORT_LENGTH))
                    self.end_headers()
                    self.wfile.write(SHORT_BODY)
                    return
                body = b'{"error": "no healthy upstream"}'
                self.send_response(cast(int, status))  # a status code: SHORT is the one str
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    host: str
    inventory: str
    proxy: RecordingProxy
    receiver: OtlpTraceReceiver
    providers: list[Any]
    module: Any

    def call(self, path: str, headers: dict[str, str] | None = None,
             timeout: float = 15) -> HttpReply:
        try:
            return http_request(self.host, "GET", path, headers=headers or {},
                                timeout=timeout)
        finally:
            for provider in self.providers:  # whatever span processor: all exported now
                provider.force_flush()

    def status(self, path: str, headers: dict[str, str], timeout: float = 15,
               host: str | None = None) -> int | str:
        """The status of GET ``path``, or what happened instead when there was none."""
        try:
            if host is not None:   # a service called directly, not through the frontend
                try:
                    return http_request(host, "GET", path, headers=headers,
                                        timeout=timeout).status
                finally:
                    for provider in self.providers:
                        provider.force_flush()
            return self.call(path, headers, timeout).status
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except (OSError, http.client.HTTPException) as exc:
            return f"no answer ({type(exc).__name__}: the app raised?)"

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.receiver.snapshot() if s.trace_id == trace_id]


@pytest.fixture
def stack(learner: Any) -> Iterator[Stack]:
    module = learner.load("tracing")
    for name in ("make_provider", "make_frontend", "make_inventory"):
        if not callable(getattr(module, name, None)):
            pytest.fail(f"tracing.py defines no function {name}()", pytrace=False)
    with OtlpTraceReceiver() as receiver:
        try:
            front_provider = module.make_provider("frontend", receiver.endpoint)
            inv_provider = module.make_provider("inventory", receiver.endpoint)
        except NotImplementedError as exc:
            pytest.fail(f"make_provider is not written yet ({exc})", pytrace=False)
        for service, provider in (("frontend", front_provider), ("inventory", inv_provider)):
            reaches_collector(service, provider, receiver)
        receiver.clear()
        with serve_wsgi(module.make_inventory(inv_provider)) as inventory:
            proxy = RecordingProxy(inventory)
            try:
                with serve_wsgi(module.make_frontend(front_provider, proxy.url)) as host:
                    yield Stack(host, inventory, proxy, receiver,
                                [front_provider, inv_provider], module)
            finally:
                proxy.close()
                for provider in (front_provider, inv_provider):
                    provider.shutdown()


def reaches_collector(service: str, provider: Any, receiver: OtlpTraceReceiver) -> None:
    """One span ended through the provider make_provider returned, then flushed: it must be
    at the collector. Checked before any request is served: a provider that exports
    elsewhere (the exporter's default endpoint) keeps retrying there for seconds on every
    request's thread, and every test would only time out."""
    probe = f"labrunner probe {secrets.token_hex(4)}"
    began = time.monotonic()
    provider.get_tracer("labrunner.probe").start_span(probe).end()
    provider.force_flush()
    took = time.monotonic() - began
    if any(s.name == probe for s in receiver.snapshot()):
        return
    refused = (f"; the collector refused {len(receiver.errors)} export(s): "
               f"{receiver.errors[:2]}" if receiver.errors else
               "; no export reached it at all")
    pytest.fail(
        f"make_provider({service!r}, {receiver.endpoint!r}): a span ended through the "
        f"provider and flushed ({took:.1f} s) never reached the collector at "
        f"{receiver.endpoint}{refused}. The exporter must send to the endpoint it is given, "
        "exactly as given - OTLPSpanExporter(endpoint=otlp_endpoint), the full URL with its "
        "/v1/traces: OTLPSpanExporter() with no endpoint sends to its default "
        "(localhost:4318, or the OTEL_EXPORTER_OTLP_* variables), where no collector of "
        "this deployment listens, and a SimpleSpanProcessor then holds each request while "
        "the exporter retries", pytrace=False)


def caller(sampled: bool = True) -> tuple[str, str, dict[str, str]]:
    trace_id = "0000000000" + secrets.token_hex(11)  # leading zeros: format with padding
    parent = secrets.token_hex(8)
    header = f"00-{trace_id}-{parent}-{'01' if sampled else '00'}"
    return trace_id, parent, {"traceparent": header, "tracestate": TRACESTATE}


def listing(spans: list[ReceivedSpan]) -> str:
    return "\n  ".join(s.describe() for s in spans) or "(none)"


def one(spans: list[ReceivedSpan], service: str, kind: str, what: str,
        everything: list[ReceivedSpan]) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.kind == kind]
    assert len(found) == 1, (
        f"expected one {kind} span from service {service!r} in the trace ({what}), found "
        f"{len(found)}; the collector received:\n  {listing(everything)}\nEach service: a "
        "SERVER span for the request it handles (kind=SpanKind.SERVER); the frontend: a "
        "CLIENT span around its call to inventory; resource service.name set per service.")
    return found[0]


def outgoing_header(stack: Stack) -> dict[str, str]:
    assert stack.proxy.seen, "the frontend never called inventory"
    headers = stack.proxy.seen[-1]
    raw = headers.get("traceparent")
    assert raw is not None, (
        f"the frontend's call to inventory carried no traceparent header (headers: "
        f"{sorted(headers)})\nInject the current context into the outgoing request's "
        "headers (TraceContextTextMapPropagator().inject(headers)): without it the "
        "inventory cannot join the trace.")
    assert TRACEPARENT.fullmatch(raw), (
        f"the frontend sent traceparent {raw!r}, which is not W3C: expected "
        "00-<32 lowercase hex trace id>-<16 hex parent id>-<2 hex flags>, zero-padded\n"
        "Formatting ids by hand ({trace_id:x}) drops leading zeros; let the propagator "
        "write the header.")
    return headers


def test_one_trace_across_two_services(stack: Stack) -> None:
    trace_id, parent, headers = caller()
    reply = stack.call("/checkout/KEY-0042", headers)
    assert reply.status == 200, f"GET /checkout/KEY-0042: expected 200, saw {reply.status}"
    everything = stack.receiver.snapshot()
    spans = stack.trace(trace_id)
    assert spans, (
        f"no span of the caller's trace {trace_id} reached the collector; it received:\n  "
        f"{listing(everything)}\nExtract the incoming traceparent "
        "(propagator.extract(carrier)) and start the SERVER span with context=that: the "
        "request continues the caller's trace instead of starting a new one.")
    header = outgoing_header(stack)
    front = one(spans, "frontend", "SERVER", "the frontend's request", everything)
    client = one(spans, "frontend", "CLIENT", "the frontend's call to inventory", everything)
    assert front.parent_span_id == parent, (
        f"the frontend's SERVER span has parent {front.parent_span_id or 'none'}, expected "
        f"{parent}, the span id in the caller's traceparent")
    by_id = {s.span_id: s for s in spans}
    chain, cursor = [], client
    while cursor.parent_span_id in by_id and cursor is not front:
        cursor = by_id[cursor.parent_span_id]
        chain.append(cursor)
    assert cursor is front, (
        f"the CLIENT span {client.describe()} does not descend from the frontend's SERVER "
        f"span {front.span_id}: start it while the SERVER span is current (nested with)")
    # outgoing_header failed the test unless the header matches
    got_trace, got_parent, flags = cast(re.Match[str],
                                        TRACEPARENT.fullmatch(header["traceparent"])).groups()
    assert got_trace == trace_id, (
        f"the frontend sent trace id {got_trace} to inventory, expected the caller's "
        f"{trace_id}: the whole request is one trace")
    assert got_parent == client.span_id, (
        f"the traceparent sent to inventory names parent {got_parent}, expected the CLIENT "
        f"span {client.span_id}"
        + (" (it names the SERVER span: inject while the CLIENT span is current, inside "
           "its with block)" if got_parent == front.span_id else ""))
    assert flags == "01", f"the caller sampled (flags 01), the frontend sent flags {flags}"
    assert "congo=t61rcWkgMzE" in header.get("tracestate", ""), (
        f"the caller's tracestate {TRACESTATE!r} was not passed on (saw "
        f"{header.get('tracestate')!r}): W3C trace context is traceparent AND tracestate; "
        "the propagator extracts and injects both")
    inv = one(spans, "inventory", "SERVER", "the inventory's request", everything)
    assert inv.parent_span_id == client.span_id, (
        f"the inventory's SERVER span has parent {inv.parent_span_id or 'none'}, expected "
        f"the frontend's CLIENT span {client.span_id}: extract the incoming traceparent in "
        "the inventory too")
    assert front.start_ns <= client.start_ns and client.end_ns <= front.end_ns, (
        "the CLIENT span does not lie within the SERVER span's time: end spans in order")


def test_no_traceparent_starts_a_new_trace_per_request(stack: Stack) -> None:
    ids = []
    for _ in range(2):
        before = {s.span_id for s in stack.receiver.snapshot()}
        assert stack.call("/checkout/KEY-0007").status == 200, "GET /checkout/KEY-0007"
        new = [s for s in stack.receiver.snapshot() if s.span_id not in before]
        fronts = [s for s in new if s.service == "frontend" and s.kind == "SERVER"]
        assert len(fronts) == 1, (
            f"a request without traceparent left {len(fronts)} frontend SERVER spans, "
            f"expected 1:\n  {listing(new)}")
        root = fronts[0]
        assert root.parent_span_id == "", (
            f"without an incoming traceparent the frontend's SERVER span should be a root "
            f"(no parent), saw parent {root.parent_span_id}")
        invs = [s for s in new if s.service == "inventory" and s.kind == "SERVER"]
        assert invs and invs[0].trace_id == root.trace_id, (
            f"the inventory's span is in trace {invs[0].trace_id if invs else 'none'}, the "
            f"frontend's in {root.trace_id}: propagate the context on the outgoing call")
        ids.append(root.trace_id)
    assert ids[0] != ids[1], f"two independent requests shared trace id {ids[0]}"


def test_trace_headers_go_with_their_own_request(stack: Stack) -> None:
    """The trace headers of the call to inventory belong to the request being served: a
    caller's tracestate goes on with that caller's trace and nowhere else - not into the
    next request's call, not onto the new trace a request with an invalid traceparent
    starts (W3C: tracestate is read only with the traceparent it came with)."""
    trace_id, _, headers = caller()
    assert stack.call("/checkout/KEY-0042", headers).status == 200, "GET /checkout/KEY-0042"
    assert stack.call("/checkout/KEY-0042").status == 200, (
        "GET /checkout/KEY-0042 without trace headers")
    sent = outgoing_header(stack)
    assert "tracestate" not in sent and trace_id not in sent["traceparent"], (
        f"a request without trace headers, served after one from a caller with trace "
        f"{trace_id} and tracestate {TRACESTATE!r}, called inventory with traceparent "
        f"{sent['traceparent']!r} and tracestate {sent.get('tracestate')!r}: the previous "
        "request's trace headers went out with this one - the outgoing headers dict is "
        "shared between requests (made once in make_frontend, at module level, or a "
        "mutable default argument), and inject() overwrites only what the current context "
        "has. Make a new dict for each call; under load, concurrent requests also swap "
        "each other's traceparent in it")
    invalid = f"00-{'zz' * 16}-{secrets.token_hex(8)}-01"
    answered = stack.status("/checkout/KEY-0042", {"traceparent": invalid,
                                                   "tracestate": TRACESTATE})
    assert answered == 200, f"GET /checkout/KEY-0042 with an invalid traceparent: {answered}"
    sent = outgoing_header(stack)
    assert "tracestate" not in sent, (
        f"a caller sent an invalid traceparent {invalid!r} with tracestate {TRACESTATE!r}: "
        f"the frontend started a new trace and called inventory with traceparent "
        f"{sent['traceparent']!r} and the caller's tracestate {sent.get('tracestate')!r} - "
        "vendor state of a trace that was not continued, now attached to another. W3C trace "
        "context: tracestate is read only with a valid traceparent and travels with that "
        "trace; let the propagator inject both from the current context, never copy the "
        "incoming header across")


def test_span_names_are_routes_not_paths(stack: Stack) -> None:
    """Two requests for different skus: the same operations, so the same span names. The
    OpenTelemetry HTTP semantic conventions name an HTTP span "{method} {route}" with the
    route TEMPLATE (GET /checkout/{sku}), or "{method}" alone, and say instrumentation MUST
    NOT default to the URI path: a name with an id in it is a name per sku."""
    names: dict[str, list[tuple[str, str, str]]] = {}
    for sku in ("KEY-0042", "KEY-0007"):
        trace_id, _, headers = caller()
        assert stack.call(f"/checkout/{sku}", headers).status == 200, f"GET /checkout/{sku}"
        spans = stack.trace(trace_id)
        one(spans, "frontend", "SERVER", f"GET /checkout/{sku}", stack.receiver.snapshot())
        names[sku] = sorted((s.service, s.kind, s.name) for s in spans)
        for service, kind, name in names[sku]:
            assert sku not in name, (
                f"GET /checkout/{sku}: the {service} {kind} span is named {name!r} - the "
                f"request's sku is in the span's name, so every sku makes a span name of its "
                "own (unbounded cardinality: the tracing backend's list of operations, its "
                "per-operation latency and error rates, a search by name all split into one "
                "entry per id). The OpenTelemetry HTTP semantic conventions name an HTTP "
                "span '{method} {route}' with the route template - 'GET /checkout/{sku}', "
                "'GET /stock/{sku}' - and MUST NOT default to the URI path: name the span by "
                "the route (a plain string, not an f-string of the path) and keep the id in "
                "an attribute (url.path, or sku)")
    first, second = names["KEY-0042"], names["KEY-0007"]
    assert first == second, (
        f"two requests that take the same path through the code (GET /checkout/KEY-0042, "
        f"then KEY-0007) left spans of different names:\n  {first}\n  {second}\nA span "
        "name names the operation, not the request: the same route gives the same name "
        "(OpenTelemetry: the most general string that identifies a class of spans), and "
        "whatever tells one request from the next goes in attributes")


def test_unsampled_caller_is_respected(stack: Stack) -> None:
    trace_id, _, headers = caller(sampled=False)
    assert stack.call("/checkout/KEY-0042", headers).status == 200, "GET /checkout/KEY-0042"
    recorded = stack.trace(trace_id)
    assert not recorded, (
        f"the caller sent flags 00 (not sampled), yet {len(recorded)} span(s) of its trace "
        f"were exported:\n  {listing(recorded)}\nThe sampling decision is made once, at the "
        "root, and travels in the flags: use the default ParentBased sampler, not ALWAYS_ON.")
    header = outgoing_header(stack)
    # outgoing_header failed the test unless the header matches
    got_trace, _, flags = cast(re.Match[str],
                               TRACEPARENT.fullmatch(header["traceparent"])).groups()
    assert (got_trace, flags) == (trace_id, "00"), (
        f"the frontend passed on trace {got_trace} flags {flags}, expected {trace_id} flags "
        "00: an unsampled trace is still propagated, with its decision")


def test_a_failing_call_marks_spans_as_errors(stack: Stack) -> None:
    trace_id, _, headers = caller()
    reply = stack.call("/checkout/BOOM", headers)
    assert reply.status == 502, f"GET /checkout/BOOM: expected 502, saw {reply.status}"
    spans = stack.trace(trace_id)
    everything = stack.receiver.snapshot()
    inv = one(spans, "inventory", "SERVER", "the failing inventory request", everything)
    client = one(spans, "frontend", "CLIENT", "the call that got a 500", everything)
    misplaced = [s for s in spans if s.status == "ERROR" and s.kind == "INTERNAL"]
    assert (inv.status, client.status) == ("ERROR", "ERROR"), (
        f"inventory answered 500: its SERVER span has status {inv.status}, the frontend's "
        f"CLIENT span {client.status}; expected ERROR for both (span.set_status("
        "Status(StatusCode.ERROR))), so the trace shows where it failed"
        + (f" - the ERROR was set on the INTERNAL span(s) "
           f"{[f'{s.service}/{s.name}' for s in misplaced]}: set it on the span of the "
           "request itself (the SERVER span you started with kind=SERVER, not whatever "
           "trace.get_current_span() is at that moment)" if misplaced else ""))
    front = one(spans, "frontend", "SERVER", "the request it answered 502", everything)
    assert front.status == "ERROR", (
        f"the frontend answered 502 Bad Gateway, yet its SERVER span has status "
        f"{front.status}, expected ERROR: the HTTP semantic conventions set ERROR on a SERVER "
        "span whose response is a 5xx - the request failed for its caller, whatever the "
        "cause, and a search for the frontend's failed requests (service=frontend, "
        "status=error) must find it. Set it while the span is open (inside its with block: "
        "set_status on an ended span is ignored)")


def test_a_client_error_is_not_a_server_error(stack: Stack) -> None:
    trace_id, _, headers = caller()
    reply = stack.call("/checkout/NO-SUCH-SKU", headers)
    assert reply.status == 404, f"GET /checkout/NO-SUCH-SKU: expected 404, saw {reply.status}"
    spans = stack.trace(trace_id)
    everything = stack.receiver.snapshot()
    servers = [one(spans, service, "SERVER", "a request for an unknown sku", everything)
               for service in ("inventory", "frontend")]
    wrong = [f"{s.service} SERVER span {s.status}" for s in servers if s.status == "ERROR"]
    assert not wrong, (
        f"a request for an unknown sku (inventory answered 404) left {', '.join(wrong)}: a "
        "4xx is the CLIENT's mistake, not a failure of the server - the HTTP semantic "
        "conventions leave a SERVER span's status UNSET for 4xx and set ERROR for 5xx only "
        "(compare with >= 500, not >= 400), or every bad request reads as an outage")


def test_every_upstream_failure_is_a_failed_call(stack: Stack) -> None:
    """Not only inventory's own 500: the load balancer in front of it answers 502, 503 or
    504, or the connection breaks before any answer or in the middle of a 200's body. The
    CLIENT span records a failed call each time (HTTP semantic conventions: a status >= 500,
    or no complete response at all)."""
    for sku, status in PROXY_FAILS.items():
        what = (f"the answer from inventory was cut in the middle of its body (200 OK, "
                f"Content-Length: {SHORT_LENGTH}, {len(SHORT_BODY)} bytes, then the "
                "connection closed)" if status == SHORT else
                f"the load balancer in front of inventory answered {status}" if status else
                "the connection to inventory was cut before any answer")
        trace_id, _, headers = caller()
        answered = stack.status(f"/checkout/{sku}", headers)
        spans = stack.trace(trace_id)
        client = one(spans, "frontend", "CLIENT", f"the call on which {what}",
                     stack.receiver.snapshot())
        assert client.status == "ERROR", (
            f"{what}: the frontend's CLIENT span has status {client.status}, expected ERROR "
            f"(the frontend answered {answered})"
            + (" - the CLIENT span is the whole call, from the request to the END of the "
               "response: a body that breaks off (IncompleteRead) or never comes is a failed "
               "call. Read the body inside the CLIENT span's with block, not after "
               "getresponse() has returned and the span has ended" if status == SHORT else
               " - every 5xx is a failed call, not only 500: compare status >= 500 (a "
               "proxy, a load balancer or a gateway answers 502, 503, 504 for a callee that "
               "is down)" if status else " - a call that got no answer failed: if you catch "
               "the error, set the CLIENT span's status to ERROR (and record the exception) "
               "before answering"))
        if isinstance(status, int):
            assert answered == 502, (
                f"{what}: GET /checkout/{sku} was answered {answered}, expected 502 Bad "
                "Gateway: the frontend's upstream failed (any 5xx), so is its answer - never "
                "read the failure's body as if it were stock")


def test_a_call_that_never_answers_fails_in_time(stack: Stack) -> None:
    """The load balancer takes the call and never answers (a hung inventory, a black-holed
    packet). Without a timeout the frontend waits forever: its CLIENT and SERVER spans never
    end, nothing is exported, and the trace of the failing call does not exist."""
    trace_id, _, headers = caller()
    began = time.monotonic()
    try:
        answered = stack.status(f"/checkout/{HANG_SKU}", headers, timeout=HANG_WAIT)
        took = time.monotonic() - began
        spans, everything = stack.trace(trace_id), stack.receiver.snapshot()
    finally:
        stack.proxy.closing.set()  # a frontend still waiting is let go (its call is cut)
    what = "the load balancer in front of inventory took the call and never answered"
    client = [s for s in spans if s.service == "frontend" and s.kind == "CLIENT"]
    assert client or isinstance(answered, int), (
        f"{what}: the frontend had not answered after {took:.0f} s and no CLIENT span of "
        "the call had ended: its call to inventory waits forever - it has no timeout "
        "(or one far too long). Give it one of a few seconds (at most 5 s: "
        "HTTPConnection(host, port, timeout=3), urlopen(url, timeout=3)): a call that never "
        "answers is a failed call, and its CLIENT span must end with ERROR so the trace shows "
        "where the time went.")
    span = one(spans, "frontend", "CLIENT", f"the call on which {what}", everything)
    assert span.status == "ERROR", (
        f"{what}: the frontend's call timed out after {took:.1f} s (it answered {answered}), "
        f"but its CLIENT span has status {span.status}, expected ERROR: a call that timed "
        "out failed - if you catch the timeout, set the CLIENT span's status to ERROR (and "
        "record the exception) before answering")


# Traceparent headers a caller (a misconfigured proxy, an old or a newer tracer, an attacker)
# may send, as (what it is, the header built from a trace id and a parent span id, whether
# W3C trace context has the frontend continue that trace). An invalid header is ignored:
# the request is served, in a new trace of its own (W3C: "restart the trace"); a header of
# a later version than 00 is read for its first four fields (forward compatibility).
MALFORMED: list[tuple[str, Any, bool]] = [
    ("not a traceparent at all", lambda t, p: "not-a-traceparent", False),
    ("a trace id that is not hex", lambda t, p: f"00-{'zz' * 16}-{p}-01", False),
    ("a trace id in uppercase hex", lambda t, p: f"00-{t.upper()}-{p}-01", False),
    ("a trace id two digits short", lambda t, p: f"00-{t[2:]}-{p}-01", False),
    ("an all-zero parent id", lambda t, p: f"00-{t}-{'0' * 16}-01", False),
    ("version ff (forbidden)", lambda t, p: f"ff-{t}-{p}-01", False),
    ("version 00 with a fifth field", lambda t, p: f"00-{t}-{p}-01-extra", False),
    ("a later version (cc) with a fifth field", lambda t, p: f"cc-{t}-{p}-01-future", True),
]


# Each service receives the caller's header, and each must validate it: the frontend from
# outside, inventory called directly (a hand parser in inventory alone would pass if only the
# frontend were ever sent a bad header - in production anything can call it).
RECEIVERS = {"frontend": "/checkout/KEY-0042", "inventory": "/stock/KEY-0042"}


@pytest.mark.parametrize("service", list(RECEIVERS))
def test_a_malformed_traceparent_is_ignored_not_trusted(stack: Stack, service: str) -> None:
    """The caller's traceparent is input like any other: one that is not W3C must neither
    fail the request nor be joined; one of a later version is read for what version 00
    defines. Sent to each service in turn."""
    path = RECEIVERS[service]
    for what, build, joins in MALFORMED:
        trace_id, parent = "0000000000" + secrets.token_hex(11), "00" + secrets.token_hex(7)
        header = build(trace_id, parent)
        before = {s.span_id for s in stack.receiver.snapshot()}
        answered = stack.status(path, {"traceparent": header, "tracestate": TRACESTATE},
                                host=stack.inventory if service == "inventory" else None)
        assert answered == 200, (
            f"a caller sent traceparent {header!r} ({what}) to {service}: GET {path} was "
            f"answered {answered}, expected 200 - a header your code cannot parse crashed "
            "the request. The caller's headers are input: W3C trace context says to ignore "
            "an invalid traceparent (and start a new trace), and a later version's header "
            "carries extra fields after the four of version 00. Let "
            "TraceContextTextMapPropagator().extract() parse it (it validates and never "
            "raises) rather than splitting it by hand")
        new = [s for s in stack.receiver.snapshot() if s.span_id not in before]
        front = one(new, service, "SERVER", f"a request with traceparent {header!r}", new)
        if joins:
            assert (front.trace_id, front.parent_span_id) == (trace_id, parent), (
                f"a caller sent traceparent {header!r} ({what}) to {service}: its SERVER span "
                f"is in trace {front.trace_id} with parent {front.parent_span_id or 'none'}, "
                f"expected trace {trace_id}, parent {parent} - a later version keeps the "
                "four fields of version 00 in front: read them (the propagator does)")
        else:
            assert front.parent_span_id == "" and front.trace_id != trace_id, (
                f"a caller sent traceparent {header!r} ({what}) to {service}, which is not "
                f"valid W3C trace context, yet {service}'s SERVER span joined it (trace "
                f"{front.trace_id}, parent {front.parent_span_id or 'none'}): expected a new "
                "trace, a root span with no parent. A receiver that cannot trust the header "
                "restarts the trace (W3C: lowercase hex only, ids of exactly 32 and 16 "
                "digits, not all zeros, version ff forbidden, version 00 has four fields): "
                "let TraceContextTextMapPropagator().extract() validate it, don't parse it "
                "by hand")


# The test plays a caller, then another: the two requests reach the same worker thread.
ONE_THREAD = {"frontend": "/checkout/KEY-0042", "inventory": "/stock/KEY-0042"}


@pytest.mark.parametrize("service", list(ONE_THREAD))
def test_a_request_leaves_no_context_on_its_thread(stack: Stack, learner: Any,
                                                   service: str) -> None:
    """A sync worker or a thread pool serves request after request on one thread. The first
    carries the caller's traceparent, the second none: the second must start a new trace.
    A context attached for a request (context.attach) and never detached stays on the thread,
    and the next request served there silently continues the previous caller's trace."""
    path = ONE_THREAD[service]
    app = (stack.module.make_frontend(stack.providers[0], stack.proxy.url)
           if service == "frontend" else stack.module.make_inventory(stack.providers[1]))
    server = learner.harness().OneThreadServer(app)
    try:
        trace_id, parent, headers = caller()
        first = stack.status(path, headers, host=server.address)
        assert first == 200, f"GET {path} from {service} on one thread: expected 200, saw {first}"
        before = {s.span_id for s in stack.receiver.snapshot()}
        second = stack.status(path, {}, host=server.address)
        assert second == 200, (
            f"GET {path} from {service}, the second request on its thread: expected 200, "
            f"saw {second}")
    finally:
        server.close()
    new = [s for s in stack.receiver.snapshot() if s.span_id not in before]
    span = one(new, service, "SERVER", "the second request, sent without traceparent", new)
    assert span.parent_span_id == "" and span.trace_id != trace_id, (
        f"two requests to {service} served one after the other on one thread (as a sync "
        f"worker or a thread pool serves them): the first carried the caller's traceparent "
        f"(trace {trace_id}, parent {parent}), the second none - yet the second's SERVER "
        f"span is in trace {span.trace_id} with parent {span.parent_span_id or 'none'}, "
        "expected a new root. The first request's context stayed attached to the thread "
        "(context.attach() with no context.detach(token)), so whatever that thread serves "
        "next continues an earlier caller's trace. Start the SERVER span with "
        "context=<the extracted context> in a with block (it restores the previous context "
        "when the block ends), or detach the token in a finally")
