"""Verification for ph7.1 three-pillars.

The learner's app runs behind a real HTTP server, exports its spans over OTLP/HTTP to a
collector the test runs (labrunner.otlp), writes JSON log lines to a file, and exposes
/metrics, which the test scrapes as Prometheus would (OpenMetrics, parsed with
prometheus_client's own parser). For each request the test knows the trace id (it sends a
traceparent, with leading zeros in the id, as the upstream caller) and looks for it in all
three pillars: the span, the log line (with the span's own span id), and an exemplar on the
request-duration histogram. The error request must show in all three as an error, and the
metric labels must stay bounded (route template and status; no path, no id).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as parse_text

from labrunner.otlp import OtlpTraceReceiver, ReceivedSpan
from labrunner.testing import http_request, read_http_request, serve_wsgi

# prometheus_client's OpenMetrics parser is unannotated; it yields Metric families, as the
# text format's parser (annotated) does
parse_om = cast(Callable[[str], Iterable[Metric]], text_string_to_metric_families)

HISTOGRAM = "http_request_duration_seconds"
COUNTER = "http_requests"
ROUTE = "/orders/{id}"
OM_ACCEPT = "application/openmetrics-text; version=1.0.0, text/plain;q=0.5"


@dataclass
class App:
    host: str
    provider: Any
    receiver: OtlpTraceReceiver
    log: Path
    module: Any
    wsgi: Any

    def get(self, path: str, trace_id: str | None = None, parent_id: str = "",
            tracestate: str = "") -> Any:
        headers = {}
        if trace_id:
            headers["traceparent"] = f"00-{trace_id}-{parent_id or secrets.token_hex(8)}-01"
        if tracestate:
            headers["tracestate"] = tracestate
        reply = http_request(self.host, "GET", path, headers=headers)
        self.provider.force_flush()
        return reply

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        lines = self.log.read_text(errors="replace").splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                joined = [k for k in lines if ran_together(k)]
                assert not joined, (
                    f"two log lines ran together on one line of {self.log.name}: "
                    f"{joined[0][:110]!r} ... {joined[0][-110:]!r} ({len(joined)} such "
                    "line(s)): requests handled at once each wrote a piece of their line "
                    "(e.g. json.dump(), which writes in chunks, then a separate "
                    "write('\\n')) and the pieces interleaved. Write each line in ONE write() "
                    "under a lock all the app's requests share (made once, in make_app, not "
                    "per line), as "
                    "logging's handlers do")
                pytest.fail(f"a log line is not JSON: {line[:150]!r}\nOne JSON object per "
                            "line, so the log can be searched by trace_id", pytrace=False)
            if isinstance(record, dict):
                records.append(record)
        return records

    def scrape(self) -> dict[str, Any]:
        reply = http_request(self.host, "GET", "/metrics", headers={"Accept": OM_ACCEPT})
        assert reply.status == 200, f"GET /metrics: expected 200, saw {reply.status}"
        text = reply.body.decode(errors="replace")
        ctype = reply.header("Content-Type") or ""
        body_matches_type(text, ctype, f"Accept {OM_ACCEPT!r}")
        try:
            families = list(parse_om(text) if "openmetrics" in ctype else parse_text(text))
        except Exception as exc:  # noqa: BLE001 - the learner's exposition, reported
            pytest.fail(f"/metrics (Content-Type {ctype!r}) does not parse with "
                        f"prometheus_client's parser: {exc}\n{text[:300]}", pytrace=False)
        return {"openmetrics": "openmetrics" in ctype,
                "samples": [s for f in families for s in f.samples]}


@contextmanager
def running_app(learner: Any, earlier: str = "") -> Iterator[App]:
    """The learner's app served, logging to a file that holds `earlier` (lines an earlier
    run of the service wrote) when make_app is called."""
    module = learner.load("pillars")
    folder = learner.tmp_folder(learner_writes=True)
    log = folder / "app.log"
    log.write_text(earlier)
    os.chmod(log, 0o666)
    with OtlpTraceReceiver() as receiver:
        try:
            provider = module.make_provider("orders", receiver.endpoint)
        except NotImplementedError as exc:
            pytest.fail(f"make_provider is not written yet ({exc})", pytrace=False)
        wsgi = module.make_app(provider, str(log))
        with serve_wsgi(wsgi) as host:
            yield App(host, provider, receiver, log, module, wsgi)
        provider.shutdown()


@pytest.fixture
def app(learner: Any) -> Iterator[App]:
    with running_app(learner) as served:
        yield served


def body_matches_type(text: str, ctype: str, asked: str) -> None:
    """An OpenMetrics body ends with '# EOF'; the classic format has no such line."""
    om_body = text.rstrip().endswith("# EOF")
    assert om_body or "openmetrics" not in ctype, (
        f"GET /metrics with {asked} answered Content-Type {ctype!r} with a body in the "
        "classic format (no '# EOF' line): the Content-Type names the format of the body "
        "you send - generate it with prometheus_client.openmetrics.exposition")
    assert not om_body or "openmetrics" in ctype, (
        f"GET /metrics with {asked} answered an OpenMetrics body (it ends with '# EOF') "
        f"under Content-Type {ctype!r}: a scraper picks its parser by the Content-Type, and "
        "the classic parser fails on OpenMetrics' exemplars (Prometheus then drops the whole "
        "scrape) - send each format with its own type (openmetrics.CONTENT_TYPE_LATEST with "
        "openmetrics.generate_latest, the classic pair otherwise)")


def ran_together(line: str) -> bool:
    """A line that starts with one whole JSON object and goes on with another."""
    try:
        _, end = json.JSONDecoder().raw_decode(line)
    except ValueError:
        return False
    return line[end:].lstrip().startswith("{")


def new_trace_id() -> str:
    return "00000000" + secrets.token_hex(12)  # leading zeros: ids are 32 hex, zero-padded


def the_span(app: App, trace_id: str, what: str) -> ReceivedSpan:
    spans = [s for s in app.receiver.snapshot() if s.trace_id == trace_id]
    servers = [s for s in spans if s.kind == "SERVER"]
    assert servers or not spans, (
        f"{what}: the request's span in the caller's trace is {spans[-1].describe()}, kind "
        f"{spans[-1].kind}, expected SERVER: the span of a request a service receives is "
        "kind=SpanKind.SERVER (that is what trace views and service maps read)")
    roots = [s for s in app.receiver.snapshot() if s.kind == "SERVER" and not
             s.parent_span_id and s.trace_id != trace_id]
    assert servers or not roots, (
        f"{what}: no span in the caller's trace {trace_id}, but a new trace was started "
        f"({roots[-1].describe()}): extract the caller's traceparent "
        "(TraceContextTextMapPropagator().extract) and start the SERVER span in that context")
    assert len(servers) == 1, (
        f"{what}: the collector has {len(servers)} SERVER span(s) in the caller's trace "
        f"{trace_id}, expected 1 (received: "
        f"{[s.describe() for s in app.receiver.snapshot()][-4:]})\nOpen a SERVER span per "
        "request, continuing the caller's traceparent, exported over OTLP.")
    assert servers[0].service == "orders", (
        f"{what}: the span's resource has service.name {servers[0].service!r}, expected "
        "'orders' (the name given to make_provider): without it every service's spans "
        "show as unknown_service - TracerProvider(resource=Resource.create("
        "{'service.name': ...}))")
    return servers[0]


def the_log_line(app: App, trace_id: str, span: ReceivedSpan, what: str) -> dict[str, Any]:
    records = app.log_records()
    mine = [r for r in records if r.get("trace_id") == trace_id]
    assert records, (
        f"{what}: the log file {app.log.name} is still empty after the request was answered: "
        "write each line as it happens and flush it (a buffered file keeps the lines in the "
        "process until it exits - a crash loses exactly the lines that explain it)")
    latest = [str(r.get("trace_id")) for r in records][-4:]
    assert mine or "0" * 32 not in latest, (
        f"{what}: the log line carries trace_id {'0' * 32} (the log's trace ids: {latest}): it "
        "was written outside any span, where the current span is the invalid one - write the "
        "log line INSIDE the request's span (within the with block), errors too")
    assert mine or trace_id.lstrip("0") not in latest, (
        f"{what}: the log line carries trace_id {trace_id.lstrip('0')}, the request's trace "
        f"is {trace_id}: the leading zeros were dropped - format the ids as 32 and 16 "
        "zero-padded hex digits (format(ctx.trace_id, '032x')), or the search by trace id "
        "finds nothing")
    assert mine, (
        f"{what}: no log line has trace_id {trace_id} (the request's span is in that trace); "
        f"the log's trace ids: {[r.get('trace_id') for r in records][-4:]}\nWrite the log "
        "line INSIDE the span, with the current span's trace id as 32 zero-padded hex "
        "digits: that is what lets you go from a trace to its logs.")
    assert any(r.get("span_id") == span.span_id for r in mine), (
        f"{what}: the log line(s) of trace {trace_id} carry span_id "
        f"{[r.get('span_id') for r in mine]}, expected the request's span {span.span_id}")
    return mine[-1]


def the_exemplar(app: App, trace_id: str, what: str) -> dict[str, Any]:
    scraped = app.scrape()
    samples = scraped["samples"]
    buckets = [s for s in samples if s.name == f"{HISTOGRAM}_bucket"]
    assert buckets, (
        f"/metrics has no histogram {HISTOGRAM} (samples: "
        f"{sorted({s.name for s in samples})[:8]})")
    bad_labels = sorted({k for s in samples for k, v in s.labels.items()
                         if trace_id in str(v) or k in ("trace_id", "path")
                         or str(v).startswith("/orders/") and v != ROUTE})
    assert not bad_labels, (
        f"{what}: metric labels {bad_labels} take unbounded values (a trace id, a raw path): "
        "every distinct label value is a new time series kept by Prometheus. Label with "
        f"the route template ({ROUTE!r}) and the status; put the trace id in an EXEMPLAR.")
    exemplars = [s.exemplar for s in samples if getattr(s, "exemplar", None)]
    on_buckets = [s.exemplar for s in buckets if getattr(s, "exemplar", None)]
    assert scraped["openmetrics"], (
        f"{what}: /metrics answered in the classic text format, which has no exemplars, "
        f"although the scrape asked for {OM_ACCEPT.split(';')[0]}\nServe OpenMetrics when "
        "it is asked for (prometheus_client.openmetrics.exposition.generate_latest).")
    ours = [e for e in on_buckets if e.labels.get("trace_id") == trace_id]
    elsewhere = [s.name for s in samples if getattr(s, "exemplar", None)
                 and s.exemplar.labels.get("trace_id") == trace_id]
    assert ours, (
        f"{what}: the exemplar with trace_id {trace_id} is on {elsewhere} but not on a "
        f"{HISTOGRAM}_bucket: the jump from a latency spike to a slow request starts at the "
        "duration histogram's bucket - observe the duration with exemplar=... too"
        if elsewhere else
        f"{what}: no exemplar on /metrics has trace_id {trace_id}; exemplars seen: "
        f"{[e.labels for e in exemplars][:4]}\nObserve the request duration with "
        "exemplar={'trace_id': <32 hex>, 'span_id': <16 hex>} of the current span.")
    labels = dict(ours[-1].labels)
    assert "span_id" in labels, (
        f"{what}: the exemplar {labels} has no span_id: give both ids of the current span, "
        "exemplar={'trace_id': <32 hex>, 'span_id': <16 hex>}, so the jump lands on the "
        "request's own span")
    return labels


def test_one_trace_id_across_log_metric_and_span(app: App) -> None:
    for path, status in (("/orders/1", 200), ("/orders/999", 404), ("/orders/2", 200)):
        trace_id = new_trace_id()
        reply = app.get(path, trace_id)
        what = f"GET {path} (trace {trace_id})"
        assert reply.status == status, f"{what}: expected {status}, saw {reply.status}"
        span = the_span(app, trace_id, what)
        assert path.rsplit("/", 1)[-1] not in span.name, (
            f"{what}: the span is named {span.name!r}, with the order's id in it: span names "
            "are grouped and indexed like metric labels - name it by the route template "
            f"('GET {ROUTE}') and put the raw path in an attribute (url.path)")
        the_log_line(app, trace_id, span, what)
        exemplar = the_exemplar(app, trace_id, what)  # scraped right after: buckets keep
        assert exemplar["span_id"] == span.span_id, (  # the latest exemplar only
            f"{what}: the exemplar's span_id {exemplar['span_id']} is not the request's "
            f"span {span.span_id}")
        if status == 404:
            assert span.status != "ERROR", (
                f"{what}: the 404's span has status ERROR: a 4xx is the caller's mistake, "
                "not a failure of this server (OpenTelemetry leaves a SERVER span's status "
                "unset for 4xx) - set ERROR for 5xx and exceptions only, or error traces "
                "fill with clients' typos")
            levels = [r.get("level") for r in app.log_records() if r.get("trace_id") == trace_id]
            assert "ERROR" not in levels, (
                f"{what}: the 404 was logged at level ERROR (levels {levels}): a client asking "
                "for an order that does not exist is not the service failing - log it at "
                "WARN or INFO, keep ERROR for the failures someone must look at")


def test_the_callers_span_and_tracestate_are_continued(app: App) -> None:
    trace_id, parent_id = new_trace_id(), "00f067aa0ba902b7"
    vendors = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"  # W3C Trace Context's own example
    reply = app.get("/orders/1", trace_id, parent_id=parent_id, tracestate=vendors)
    what = f"GET /orders/1 with traceparent ...-{parent_id}-01 and tracestate {vendors!r}"
    assert reply.status == 200, f"{what}: expected 200, saw {reply.status}"
    span = the_span(app, trace_id, what)
    assert span.parent_span_id == parent_id, (
        f"{what}: the SERVER span's parent is {span.parent_span_id or 'none'}, expected the "
        f"caller's span {parent_id}: the trace view hangs this request under the caller's "
        "call only through that parent id - start the span in the context extracted from "
        "the traceparent header, not a new one that copies the trace id")
    assert span.trace_state == vendors, (
        f"{what}: the SERVER span carries tracestate {span.trace_state!r}, expected "
        f"{vendors!r}: W3C Trace Context has every participant pass the caller's tracestate "
        "on (vendors keep their sampling and routing state there) - hand the propagator "
        "both headers (traceparent and tracestate), e.g. a carrier of all the request's "
        "headers, not a dict with traceparent alone")


def test_log_lines_of_an_earlier_run_are_kept(learner: Any) -> None:
    """A log file outlives the process that writes it: the service restarts (a deploy, a
    crash) and goes on appending. The lines of the run before are what an incident needs."""
    before = {"timestamp": "2026-01-01T00:00:00+00:00", "level": "ERROR",
              "trace_id": new_trace_id(), "span_id": secrets.token_hex(8),
              "message": "written by the run before this one"}
    with running_app(learner, json.dumps(before) + "\n") as app:
        kept = [r for r in app.log_records() if r == before]
        assert kept, (
            f"the log file {app.log.name} held a line of an earlier run, and after "
            "make_app() it is gone: the file was opened with 'w', which empties it - every "
            "restart would wipe the log. Open it for appending ('a')")
        trace_id = new_trace_id()
        app.get("/orders/1", trace_id)
        the_log_line(app, trace_id, the_span(app, trace_id, "GET /orders/1"), "GET /orders/1")
        records = app.log_records()
        assert records[0] == before, (
            "each write replaced the log file: the earlier run's line, still there after "
            "make_app(), is gone after GET /orders/1 (opened with 'w' for each line?) - "
            "append every line ('a'), never rewrite what is there; the first line is now "
            f"{json.dumps(records[0])[:120]}")


def test_counts_are_exact_with_bounded_labels(app: App) -> None:
    started = time.perf_counter()
    for path in ("/orders/1", "/orders/2", "/orders/1", "/orders/404"):
        app.get(path, new_trace_id())
    wall = time.perf_counter() - started
    samples = app.scrape()["samples"]
    counts = {(s.labels.get("route"), s.labels.get("status")): s.value for s in samples
              if s.name == f"{COUNTER}_total"}
    want = {(ROUTE, "200"): 3.0, (ROUTE, "404"): 1.0}
    assert {k: counts.get(k) for k in want} == want, (
        f"{COUNTER}_total by (route, status) is {counts}, expected {want}\nCount every "
        "request once, labelled route=<template> and status=<code>: a metric answers 'how "
        "many', a log line 'what happened'.")
    observed = sum(s.value for s in samples if s.name == f"{HISTOGRAM}_count")
    assert observed == 4, f"{HISTOGRAM}_count is {observed}, expected 4 (one per request)"
    seconds = sum(s.value for s in samples if s.name == f"{HISTOGRAM}_sum")
    assert 0 < seconds <= wall, (
        f"{HISTOGRAM}_sum is {seconds:g} after 4 requests that took {wall:.3f} s in all, "
        "from the caller's side: observe each request's duration in SECONDS (the unit in "
        "the name; time.perf_counter() differences), measured while the request is handled")


def test_an_error_shows_in_all_three(app: App) -> None:
    trace_id = new_trace_id()
    reply = app.get("/orders/boom", trace_id)
    assert reply.status == 500, f"GET /orders/boom: expected 500, saw {reply.status}"
    span = the_span(app, trace_id, "GET /orders/boom")
    assert span.status == "ERROR", (
        f"the span of the failing request has status {span.status}, expected ERROR: the "
        "trace must show where it failed (span.set_status(Status(StatusCode.ERROR)))")
    record = the_log_line(app, trace_id, span, "GET /orders/boom")
    errors = [r for r in app.log_records()
              if r.get("trace_id") == trace_id and r.get("level") == "ERROR"]
    assert errors and any("RuntimeError" in json.dumps(r) for r in errors), (
        f"the failing request's log lines {record} hold no ERROR line naming the "
        "RuntimeError: the log says WHAT happened, with the exception")
    the_exemplar(app, trace_id, "GET /orders/boom")
    counts = {s.labels.get("status"): s.value for s in app.scrape()["samples"]
              if s.name == f"{COUNTER}_total"}
    assert counts.get("500") == 1.0, (
        f"{COUNTER}_total by status is {counts}, expected one 500: errors must be counted "
        "(the E of RED), or an alert on the error rate never fires")


# Requests handled at once (a threaded server's workers), each line of the learner's code
# slowed so they interleave line by line: (path, status).
AT_ONCE = (("/orders/1", 200), ("/orders/999", 404), ("/orders/boom", 500), ("/orders/2", 200))
LINE_DELAY = 0.005


def test_concurrent_requests_keep_their_own_ids(app: App, learner: Any) -> None:
    traces = [new_trace_id() for _ in AT_ONCE]
    statuses, failures = learner.harness().at_once(
        app.module, app.wsgi, [(path, f"00-{t}-{secrets.token_hex(8)}-01")
                               for (path, _), t in zip(AT_ONCE, traces, strict=True)],
        LINE_DELAY)
    app.provider.force_flush()
    assert not failures, f"requests handled at once failed: {failures}"
    assert list(statuses) == [s for _, s in AT_ONCE], (
        f"{[p for p, _ in AT_ONCE]} handled at once answered {list(statuses)}, expected "
        f"{[s for _, s in AT_ONCE]}")
    records = app.log_records()
    logged = {t: sum(r.get("trace_id") == t for r in records) for t in traces}
    why = ("the ids were kept somewhere all requests share (a dict, a global, an attribute "
           "set when the span opened) and another request overwrote them before this one "
           "logged/observed. Read them from the current span at the moment you use them "
           "(trace.get_current_span().get_span_context()): the OpenTelemetry context is per "
           "thread/task precisely so that concurrent requests do not see each other's")
    for (path, _), trace_id in zip(AT_ONCE, traces, strict=True):
        what = f"GET {path} (trace {trace_id}), handled at once with {len(AT_ONCE) - 1} others"
        span = the_span(app, trace_id, what)
        mine = [r for r in records if r.get("trace_id") == trace_id]
        strays = [r.get("span_id") for r in mine if r.get("span_id") != span.span_id]
        assert mine and not strays, (
            f"{what}: its span is {span.span_id}, but the log has "
            + (f"lines of its trace with span_id {strays}" if strays else
               "no line with its trace id")
            + f" (log lines per request's trace: {list(logged.values())}, in order of "
            f"{[p for p, _ in AT_ONCE]}): {why}")
    samples = app.scrape()["samples"]
    for sample in samples:
        ex = getattr(sample, "exemplar", None)
        if sample.name != f"{COUNTER}_total" or ex is None:
            continue
        status = sample.labels.get("status")
        want = [t for (_, s), t in zip(AT_ONCE, traces, strict=True) if str(s) == status]
        if len(want) == 1:
            assert ex.labels.get("trace_id") == want[0], (
                f"{COUNTER}_total{{status=\"{status}\"}}'s exemplar has trace_id "
                f"{ex.labels.get('trace_id')}, but the only request that answered {status} "
                f"was in trace {want[0]} (requests handled at once): {why}")
    spans = {(s.trace_id, s.span_id) for s in app.receiver.snapshot()}
    for sample in samples:
        ex = getattr(sample, "exemplar", None)
        if ex is not None and ex.labels.get("trace_id") in traces:
            assert (ex.labels["trace_id"], ex.labels.get("span_id")) in spans, (
                f"{sample.name}'s exemplar {dict(ex.labels)} pairs trace "
                f"{ex.labels['trace_id']} with a span_id that is no span of that trace: {why}")


# Accept headers that ask for OpenMetrics without naming it first: with a lower-q classic
# format listed before it, and Prometheus' own scrape header.
OPENMETRICS_ASKED = (
    "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
)


def test_openmetrics_whenever_the_accept_header_lists_it(app: App) -> None:
    for accept in OPENMETRICS_ASKED:
        reply = http_request(app.host, "GET", "/metrics", headers={"Accept": accept})
        ctype = reply.header("Content-Type") or ""
        assert reply.status == 200 and "openmetrics" in ctype, (
            f"GET /metrics with Accept {accept!r} answered {reply.status} with Content-Type "
            f"{ctype!r}: the header lists application/openmetrics-text (preferred: the "
            "classic format has a lower q), so the scrape must get OpenMetrics, the format "
            "that carries exemplars. An Accept header is a list: look for the media type in "
            "each of its comma-separated entries, wherever it stands.")


def test_classic_scrape_and_a_request_without_a_caller(app: App) -> None:
    app.get("/orders/1", new_trace_id())
    for accept in (None, "text/plain; version=0.0.4"):
        headers = {"Accept": accept} if accept else {}
        reply = http_request(app.host, "GET", "/metrics", headers=headers)
        ctype = reply.header("Content-Type") or ""
        asked = f"Accept {accept!r}" if accept else "no Accept header"
        assert reply.status == 200 and "openmetrics" not in ctype, (
            f"GET /metrics with {asked} answered {reply.status} with Content-Type {ctype!r}: "
            "a scraper that does not ask for OpenMetrics gets the classic text format "
            "(prometheus_client.exposition.generate_latest, text/plain; version=0.0.4) - "
            "serve OpenMetrics only when the Accept header asks for it")
        body_matches_type(reply.body.decode(errors="replace"), ctype, asked)
    known = {s.span_id for s in app.receiver.snapshot()}
    reply = app.get("/orders/2")  # no traceparent: the app starts the trace
    assert reply.status == 200, (
        f"GET /orders/2 without traceparent: expected 200, saw {reply.status}")
    fresh = [s for s in app.receiver.snapshot() if s.span_id not in known and s.kind == "SERVER"]
    assert len(fresh) == 1, (
        f"GET /orders/2 without a traceparent left {len(fresh)} new SERVER span(s), expected 1: "
        "a request from no traced caller starts a new trace with its SERVER span")
    span = fresh[0]
    records = app.log_records()
    mine = [r for r in records if r.get("span_id") == span.span_id]
    ids = [(r.get("trace_id"), r.get("span_id")) for r in records][-2:]
    assert mine and all(r.get("trace_id") == span.trace_id for r in mine), (
        f"GET /orders/2 without a traceparent: its span is in trace {span.trace_id}, but the "
        f"log lines' (trace_id, span_id) are {ids}"
        ": take the ids from the current span (trace.get_current_span().get_span_context()), "
        "not from the request's traceparent header - with no caller there is no header, "
        "and the span started a trace of its own")
    exemplar = the_exemplar(app, span.trace_id, "GET /orders/2 without traceparent")
    assert exemplar["span_id"] == span.span_id, (
        f"GET /orders/2 without traceparent: the exemplar's span_id {exemplar['span_id']} is "
        f"not the request's span {span.span_id}")


def test_two_apps_keep_their_own_log_and_metrics(learner: Any) -> None:
    """make_app called twice in one process (two services side by side, an app factory in
    tests): each app writes its own log file and counts its own requests. A logger, a file
    or metrics kept in the module are shared by every app made from it."""
    with running_app(learner) as first, running_app(learner) as second:
        one, two = new_trace_id(), [new_trace_id(), new_trace_id()]
        first.get("/orders/1", one)
        for trace_id in two:
            second.get("/orders/2", trace_id)
        for app, mine, other, which in ((first, [one], two, "first"),
                                        (second, two, [one], "second")):
            traces = [r.get("trace_id") for r in app.log_records()]
            strays = [t for t in traces if t in other]
            assert not strays, (
                f"two apps made by make_app in one process, each with its own log file: the "
                f"{which} app's file holds {len(strays)} line(s) of the other app's requests "
                f"(traces {strays}; its own: {[t for t in traces if t in mine]}): the log "
                "is kept in the module (a module-level logger each make_app adds a handler "
                "to, a global file replaced by the last app), so one app writes into "
                "another's file. Keep the log file with the app make_app returns")
            counts = {s.labels.get("status"): s.value for s in app.scrape()["samples"]
                      if s.name == f"{COUNTER}_total"}
            assert counts.get("200") == float(len(mine)), (
                f"two apps made by make_app in one process: the {which} answered "
                f"{len(mine)} request(s) with 200 and the other "
                f"{len(other)}, and the {which}'s /metrics counts {counts.get('200')}: the "
                "metrics are kept in the module (made at import, in the default REGISTRY, "
                "or cached by name), so every app counts every app's requests. Give each "
                "app its own CollectorRegistry and metrics, made in make_app")


# A request's answer must not wait on the collector: the exporter's own timeout is 10 s
# (and a collector that refuses is retried with backoff for as long), a request here takes
# milliseconds; 3 s leaves a loaded machine a wide margin on both sides.
COLLECTOR_STUCK_BOUND = 3.0


def test_a_stuck_collector_does_not_hold_the_requests(learner: Any) -> None:
    """The collector accepts the connection and never answers (overloaded, a network that
    drops the replies): the service must answer as usual, its spans exported in the
    background (BatchSpanProcessor), never in the request (SimpleSpanProcessor, or a
    force_flush per request), or the telemetry backend's outage becomes the service's."""
    module = learner.load("pillars")
    log = learner.tmp_folder(learner_writes=True) / "app.log"
    log.write_text("")
    os.chmod(log, 0o666)
    stuck = socket.create_server(("127.0.0.1", 0), backlog=64)  # listens, never accepts
    provider = module.make_provider(
        "orders", f"http://127.0.0.1:{stuck.getsockname()[1]}/v1/traces")
    try:
        with serve_wsgi(module.make_app(provider, str(log))) as host:
            trace_id = new_trace_id()
            started = time.perf_counter()
            try:
                reply = http_request(host, "GET", "/orders/1", timeout=COLLECTOR_STUCK_BOUND,
                                     headers={"traceparent": f"00-{trace_id}-"
                                              f"{secrets.token_hex(8)}-01"})
                took = f"answered {reply.status} after {time.perf_counter() - started:.2f} s"
            except TimeoutError:
                reply, took = None, f"no answer after {COLLECTOR_STUCK_BOUND:g} s"
            assert reply is not None and time.perf_counter() - started < \
                COLLECTOR_STUCK_BOUND, (
                f"GET /orders/1 with the OTLP collector stuck (it accepts the connection and "
                f"never answers): {took}, a request takes milliseconds when the collector "
                "answers. The span was exported in the request, which waited the exporter's "
                "timeout (10 s): export in the background, in batches "
                "(BatchSpanProcessor), and never flush in a request - a telemetry backend's "
                "outage must not become the service's")
            assert reply.status == 200, (
                f"GET /orders/1 with the OTLP collector stuck: expected 200, saw {reply.status}")
            logged = [line for line in log.read_text(errors="replace").splitlines()
                      if trace_id in line]
            assert logged, (
                f"GET /orders/1 with the OTLP collector stuck answered, but no log line has its "
                f"trace id {trace_id}: the log line is written whatever the span's export "
                "does")
    finally:
        with collector_answering(stuck):  # the collector is back: the export ends at once
            provider.shutdown()


@contextmanager
def collector_answering(listener: socket.socket) -> Iterator[None]:
    """Answer every export waiting on ``listener`` (and any new one) with an empty 200, the
    OTLP/HTTP success, until the block ends; then close it."""
    listener.settimeout(0.05)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    read_http_request(conn)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                                 b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    server = threading.Thread(target=serve, name="collector-back", daemon=True)
    server.start()
    try:
        yield
    finally:
        done.set()
        server.join(5)
        listener.close()
