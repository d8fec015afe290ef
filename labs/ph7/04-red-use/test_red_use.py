"""ph7.4 RED and USE: the learner's PromQL, evaluated by a real Prometheus over a service the
test runs with a load it knows exactly, must give the figures of that load.

The test's service exports counters that grow at known rates (40 requests per second, 6 of
them 5xx and 4 of them 404; a duration histogram whose p99 is 0.5 s; a pool of 5 workers, 3.75
busy on average, 1.5 requests waiting, 0.5 rejected per second). Each sample carries the
time it was computed for, so Prometheus holds exact straight lines, and the queries are
evaluated at one of its own sample times over a window that starts at another: the figures
then come out exact, and the test compares them tightly."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from labrunner.testing import serve_wsgi

# Requests per second by (route, code).
REQUESTS = {("/orders", "200"): 26.0, ("/orders", "404"): 4.0,
            ("/search", "200"): 4.0, ("/search", "500"): 4.0, ("/search", "503"): 2.0}
# Observations per second per duration bucket (upper bound), and seconds per second of _sum.
BUCKETS = ("0.1", "0.25", "0.5", "1.0", "2.5")
DURATIONS = {"/orders": ((20.0, 10.0, 0.0, 0.0, 0.0), 3.0),
             "/search": ((0.0, 5.0, 4.6, 0.4, 0.0), 3.16)}
POOL_SIZE, BUSY, QUEUE_WAIT, REJECTIONS = 5, 3.75, 1.5, 0.5
# What the counters held when the test began: the service ran before, through a bad spell
# (500 slow /search requests, all of them 500s). A query that reads the counters since the
# start instead of their rate over the window sees it.
HISTORY = {("/search", "500"): 500.0}
HISTORY_SLOW = 500.0  # observations in the 2.5 s bucket, /search
# Another service scraped at the same time, with the same metric names and other figures:
# a query that does not select its job reads both.
OTHER = {"requests": {("/orders", "200"): 100.0}, "pool": (2, 2.0, 9.0, 7.0)}

WANT_RED = {
    "rate": (40.0, "requests per second over all routes and outcomes: sum(rate(...))"),
    "error_ratio": (0.15, "the share of requests the service failed: 5xx only (a 404 is the "
                          "client's mistake, not the service's), over all requests"),
    "p99": (0.5, "one p99 for the service: histogram_quantile over the bucket rates summed by "
                 "le - not an average or maximum of per-route p99s, not the mean (_sum/_count)"),
}
WANT_USE = {
    "utilization": (0.75, "busy worker-seconds per second (rate of pool_busy_seconds_total) "
                          "divided by the workers there are (pool_size)"),
    "saturation": (1.5, "work waiting for a worker: queued request-seconds per second (rate of "
                        "pool_queue_wait_seconds_total), the mean queue length - not how busy "
                        "the workers are"),
    "errors": (0.5, "the pool's own errors: requests it turned away per second (rate of "
                    "pool_rejections_total), not the HTTP 5xx of the service"),
}
TOLERANCE = 0.01


class SyntheticService:
    """Metrics of a service under a steady, known load, computed at each scrape from the
    time since the service started (and stamped with that time)."""

    def __init__(self, other: bool = False) -> None:
        self.started = time.time()
        self.lock = threading.Lock()
        self.other = other

    def collect(self) -> Iterator[Any]:
        with self.lock:
            now = round(time.time(), 3)
        t = now - self.started
        requests = CounterMetricFamily("http_requests", "HTTP requests served.",
                                       labels=["route", "code"])
        mix = OTHER["requests"] if self.other else REQUESTS
        history = {} if self.other else HISTORY
        for (route, code), per_second in mix.items():
            requests.add_metric([route, code], history.get((route, code), 0.0) + per_second * t,
                                timestamp=now)
        yield requests
        durations = HistogramMetricFamily("http_request_duration_seconds",
                                          "HTTP request durations.", labels=["route"])
        for route, (per_bucket, sum_rate) in DURATIONS.items():
            if self.other:  # all fast
                per_bucket, sum_rate = (sum(per_bucket), 0.0, 0.0, 0.0, 0.0), sum_rate / 10
            slow = HISTORY_SLOW if route == "/search" and not self.other else 0.0
            cumulative, buckets = 0.0, []
            for bound, rate in zip(BUCKETS, per_bucket, strict=True):
                cumulative += rate
                buckets.append((bound, cumulative * t + (slow if bound == "2.5" else 0.0)))
            buckets.append(("+Inf", cumulative * t + slow))
            durations.add_metric([route], buckets, sum_rate * t + slow * 2.0, timestamp=now)
        yield durations
        size_now, busy, queue_wait, rejections = (
            OTHER["pool"] if self.other else (POOL_SIZE, BUSY, QUEUE_WAIT, REJECTIONS))
        for name, per_second, text in (
                ("pool_busy_seconds", busy, "Worker-seconds spent busy."),
                ("pool_queue_wait_seconds", queue_wait, "Request-seconds spent queued."),
                ("pool_rejections", rejections, "Requests the pool turned away.")):
            family = CounterMetricFamily(name, text)
            family.add_metric([], per_second * t, timestamp=now)
            yield family
        size = GaugeMetricFamily("pool_size", "Workers in the pool.")
        size.add_metric([], size_now, timestamp=now)
        yield size


def _check(prometheus: Any, learner: Any, job: str, what: str,
           want: dict[str, tuple[float, str]]) -> None:
    raw = prometheus.query(f'pool_size{{job="{job}"}}[10s]')
    stamps = sorted(float(t) for series in raw for t, _ in series["values"])
    end = stamps[-1]
    start = min(t for t in stamps if t >= end - 5.5)
    window = f"{round((end - start) * 1000)}ms"
    queries = learner.function("red_use", what)(job, window)
    assert isinstance(queries, dict), f"{what}() returned {type(queries).__name__}, not a dict"
    for name, (expected, why) in want.items():
        query = queries.get(name)
        assert isinstance(query, str) and query, (
            f"{what}() has no PromQL for {name!r} (keys: {sorted(queries)})")
        assert job in query, (
            f"{what}()[{name!r}] = {query!r} does not select job {job!r}: every service "
            "Prometheus scrapes exports the same metric names (another one runs right now) - "
            'filter every selector on {job="<job>"}, or the figure mixes services')
        assert "irate(" not in query.replace(" ", ""), (
            f"{what}()[{name!r}] = {query!r} uses irate(): it reads only the last two samples "
            "in the range, so the figure jumps with every scrape and says nothing about the "
            f"window ({window}) - use rate() over [window] for a dashboard's and an alert's "
            "figure")
        result = prometheus.query_range(query, end, end, 1)
        assert len(result) == 1, (
            f"{what}()[{name!r}] = {query!r} gave {len(result)} series, expected one number "
            f"for the whole service: aggregate ({why})")
        value = float(result[0]["values"][-1][1])
        assert math.isfinite(value) and abs(value - expected) <= TOLERANCE * expected, (
            f"{what}()[{name!r}] reads {value:.4g}, the load's {name} is {expected:g}: "
            f"{_diagnosis(name, query, value, window) or why}. Query: {query}")


def _diagnosis(name: str, query: str, value: float, window: str) -> str:
    """What the query did, when the figure it gave shows it."""
    compact = query.replace(" ", "")
    ranges = sorted(set(re.findall(r"(?<=[}\w)])\[([^\]:]+)", compact)))
    if ranges and ranges != [window]:
        return (f"the query's range is {ranges}, not the window asked for ({window}): put "
                "the window argument in every range selector")
    if "rate(" not in compact and "increase(" not in compact:
        return ("the query reads the counters' totals since the service started (its bad "
                "spell before the test included), not what happened over the window: take "
                "rate() over [window] of each counter first, then combine")
    if "irate(" in compact:
        return "irate() reads the last two samples only: use rate() over [window]"
    if name == "error_ratio" and abs(value - 0.1) < 0.002:
        return ("only code 500 was counted, not 503: a 5xx is any server failure (500, 502, "
                '503, 504) - match code=~"5.."')
    if name == "utilization" and "/" not in compact:
        return (f"{value:.4g} is how many workers are busy on average, not the share of the "
                "pool that is: divide the busy worker-seconds per second by sum(pool_size)")
    if name == "utilization" and "pool_size" not in compact:
        return (f"the pool's size is not read from pool_size (this pool has {POOL_SIZE} "
                "workers): divide the busy worker-seconds per second by sum(pool_size), so "
                "the query stays right when the pool is resized")
    return ""


@pytest.fixture
def service(prometheus: Any) -> Iterator[str]:
    """The synthetic service, scraped, with at least 6 s of samples in Prometheus."""
    registry, other = CollectorRegistry(), CollectorRegistry()
    registry.register(SyntheticService())  # type: ignore[arg-type]
    other.register(SyntheticService(other=True))  # type: ignore[arg-type]
    with serve_wsgi(make_wsgi_app(registry)) as address, \
            serve_wsgi(make_wsgi_app(other)) as other_address:
        prometheus.scrape(other_address)
        job = prometheus.scrape(address)
        prometheus.wait_for_scrapes(job, count=14)
        yield job


def test_red_and_use_figures(learner: Any, prometheus: Any, service: str) -> None:
    _check(prometheus, learner, service, "red", WANT_RED)
    # USE in the same test: one synthetic service, scraped once, serves both.
    _check(prometheus, learner, service, "use", WANT_USE)
