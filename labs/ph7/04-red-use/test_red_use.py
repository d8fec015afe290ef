"""ph7.4 RED and USE: the learner's PromQL, evaluated by a real Prometheus over a service the
test runs with a load it knows exactly, must give the figures of that load.

The test's service runs as two instances (a service scaled out: two instances of one job,
each with a pool of its own and its own share of each route) whose counters grow at
known rates: together 40 requests per second, 7 of them 5xx (500, 503 and a 520) and 4 of
them 404; a duration histogram whose p99 is 0.5 s; pools of 3 and 2 workers, 3.75 busy on
average, 1.5 requests waiting, 0.5 rejected per second. The first instance restarts every
half second (its counters begin again at 0), as a service being deployed or crash-looping
does: a counter is read with rate() per series, which counts each one's resets, never summed
first.
The test computes each instance's samples itself, on a time grid both instances share, and
writes them into the real Prometheus (its remote-write receiver), stamped with their times,
as a scrape at each of those times would have stored them: Prometheus holds exact straight
lines (broken only by the restarts, each right after a sample), at once - no scrape target
to wait about 5 s for Prometheus to pick up. The queries are evaluated at a sample time of
both instances over a window that starts at another: the figures then come out exact, and
the test compares them tightly. A
figure that is right for one instance alone (scalar(), an average or maximum over instances,
a mean of the instances' ratios) is not. Another service with the same metric names is
stored beside it, under a job whose name is the service's with a '-' for its '.': a job
matched as a regex reads it too."""

from __future__ import annotations

import itertools
import math
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import pytest

# Requests per second by (route, code), the whole service. A 5xx is any code 500-599 (RFC
# 9110 15: the first digit is the class, and a code a client does not know reads as x00 of
# its class): the 520 a proxy sends (Cloudflare's "unknown error") fails the request too.
REQUESTS = {("/orders", "200"): 26.0, ("/orders", "404"): 4.0,
            ("/search", "200"): 3.0, ("/search", "500"): 4.0, ("/search", "503"): 2.0,
            ("/search", "520"): 1.0}
FAILURES = sorted(code for _, code in REQUESTS if code.startswith("5"))
# Observations per second per duration bucket (upper bound), and seconds per second of _sum.
BUCKETS = ("0.1", "0.25", "0.5", "1.0", "2.5")
DURATIONS = {"/orders": ((20.0, 10.0, 0.0, 0.0, 0.0), 3.0),
             "/search": ((0.0, 5.0, 4.6, 0.4, 0.0), 3.16)}
# The instances: each one's share of every route, and its pool (workers, busy
# worker-seconds, queued request-seconds and rejections, per second). Unlike shares and
# sizes, so that a figure of one instance, or of the instances averaged, is not the service's.
SHARES = ({"/orders": 0.75, "/search": 0.25}, {"/orders": 0.25, "/search": 0.75})
POOLS = ((3, 2.7, 0.5, 0.1), (2, 1.05, 1.0, 0.4))
# What the counters held when the test began: the service ran before, through a bad spell
# (500 slow /search requests, all of them 500s, on its second instance). A query that reads
# the counters since the start instead of their rate over the window sees it.
HISTORY = {("/search", "500"): 500.0}
HISTORY_SLOW = 500.0  # observations in the 2.5 s bucket, /search


class OtherService(TypedDict):
    requests: dict[tuple[str, str], float]    # as REQUESTS
    pool: tuple[int, float, float, float]     # as one of POOLS


# Another service stored at the same time, with the same metric names and other figures:
# a query that does not select its job reads both. Its job's name is the service's with a
# '-' where the service's has a '.' (JOBS): a job matched as a regex (job=~) reads it too.
JOBS = ("shop.api-{token}", "shop-api-{token}")
OTHER: OtherService = {"requests": {("/orders", "200"): 100.0}, "pool": (2, 2.0, 9.0, 7.0)}
# Every sample is stamped with a multiple of this (tick k: k * GRID s since the epoch), as a
# scrape every GRID s would store them, so the instances' series share sample times the
# queries are evaluated at. 1/8 s, exact in binary: every stamp is a whole number of
# milliseconds, as Prometheus holds it.
GRID = 0.125
# The first instance restarts every RESTART_TICKS ticks (a deploy, a crash loop): right after a
# sample, so every counter it exports begins again at 0 and the next sample holds only what
# it counted since. rate() of each series counts the drop as a reset and stays exact; a sum
# of the instances' counters drops too, and rate() or increase() of that sum takes the other
# instance's whole total for growth.
RESTARTING, RESTART_TICKS = 0, 4
# The window the figures are read over: from the last sample time back to the sample time
# WINDOW_TICKS before it; restarts (every RESTART_TICKS) fall within it, each with the sample
# after it. SAMPLES samples of each series are written, the last one at most a tick ago; the
# first ones are older than the window, as in a Prometheus that scraped the service before.
WINDOW_TICKS, SAMPLES = 11, 14
# The service started this many ticks before its first sample written (the restarting
# instance restarted since, the other one has counted since).
RAN_BEFORE = 40


def figures(instances: Sequence[int]) -> dict[str, float]:
    """RED and USE of these instances together, from the load they run."""
    requests = {key: rate * sum(SHARES[i][key[0]] for i in instances)
                for key, rate in REQUESTS.items()}
    total = sum(requests.values())
    buckets = [sum(DURATIONS[route][0][b] * SHARES[i][route]
                   for route in DURATIONS for i in instances) for b in range(len(BUCKETS))]
    busy, size = (sum(POOLS[i][k] for i in instances) for k in (1, 0))
    return {"rate": total,
            "error_ratio": sum(r for (_, code), r in requests.items()
                               if code.startswith("5")) / total,
            "p99": _quantile(0.99, buckets),
            "utilization": busy / size,
            "saturation": sum(POOLS[i][2] for i in instances),
            "errors": sum(POOLS[i][3] for i in instances)}


def _quantile(q: float, per_bucket: Sequence[float]) -> float:
    """histogram_quantile() of bucket rates: linear within the bucket the rank falls in."""
    rank, below, lower = q * sum(per_bucket), 0.0, 0.0
    for bound, rate in zip(BUCKETS, per_bucket, strict=True):
        if rate and below + rate >= rank:
            return lower + (float(bound) - lower) * (rank - below) / rate
        below, lower = below + rate, float(bound)
    return lower


SERVICE = figures(range(len(POOLS)))
WANT_RED = {
    "rate": (SERVICE["rate"], "requests per second over all routes, outcomes and instances: "
                              "sum(rate(...))"),
    "error_ratio": (SERVICE["error_ratio"],
                    "the share of requests the service failed: 5xx only (a 404 is the "
                    "client's mistake, not the service's), over all requests"),
    "p99": (SERVICE["p99"], "one p99 for the service: histogram_quantile over the bucket rates "
                            "summed by le - not an average or maximum of per-route or "
                            "per-instance p99s, not the mean (_sum/_count)"),
}
WANT_USE = {
    "utilization": (SERVICE["utilization"],
                    "busy worker-seconds per second (rate of pool_busy_seconds_total) divided "
                    "by the workers there are (pool_size), both summed over the instances"),
    "saturation": (SERVICE["saturation"],
                   "work waiting for a worker: queued request-seconds per second (rate of "
                   "pool_queue_wait_seconds_total) summed over the instances, the mean queue "
                   "length - not how busy the workers are"),
    "errors": (SERVICE["errors"], "the pool's own errors: requests it turned away per second "
                                  "(rate of pool_rejections_total), not the HTTP 5xx of the "
                                  "service"),
}
TOLERANCE = 0.01


class SyntheticService:
    """Metrics of one instance of a service under a steady, known load: its series at a tick
    of the grid, as a scrape at that time would have stored them."""

    def __init__(self, started: int, instance: int = 0, other: bool = False) -> None:
        self.started = started  # the tick it started at (its counters at 0, but HISTORY)
        self.restarts = not other and instance == RESTARTING
        self.other = other
        self.share = {route: 1.0 for route in DURATIONS} if other else SHARES[instance]
        self.history = not other and instance == len(POOLS) - 1
        self.pool = OTHER["pool"] if other else POOLS[instance]

    def counted(self, tick: int) -> float:
        """Seconds its counters have counted at ``tick``: since it started, or since its last
        restart - every RESTART_TICKS, right after the sample then, which still holds what it
        counted before (the next one holds only what it counted since)."""
        ticks = tick - self.started
        if self.restarts and ticks > 0:
            ticks = (ticks - 1) % RESTART_TICKS + 1
        return ticks * GRID

    def restarted(self, tick: int) -> bool:
        """Whether it restarted right after the sample at ``tick``."""
        ticks = tick - self.started
        return self.restarts and ticks > 0 and ticks % RESTART_TICKS == 0

    def collect(self, tick: int) -> Iterator[tuple[dict[str, str], float]]:
        """Its series at ``tick``: (labels with __name__, value)."""
        t = self.counted(tick)
        mix = OTHER["requests"] if self.other else REQUESTS
        history = HISTORY if self.history else {}
        for (route, code), per_second in mix.items():
            yield ({"__name__": "http_requests_total", "route": route, "code": code},
                   history.get((route, code), 0.0) + per_second * self.share[route] * t)
        for route, (per_bucket, sum_rate) in DURATIONS.items():
            if self.other:  # all fast
                per_bucket, sum_rate = (sum(per_bucket), 0.0, 0.0, 0.0, 0.0), sum_rate / 10
            slow = HISTORY_SLOW if route == "/search" and self.history else 0.0
            share, cumulative = self.share[route], 0.0
            name = "http_request_duration_seconds"
            for bound, rate in zip(BUCKETS, per_bucket, strict=True):
                cumulative += rate * share
                yield ({"__name__": f"{name}_bucket", "route": route, "le": bound},
                       cumulative * t + (slow if bound == "2.5" else 0.0))
            yield ({"__name__": f"{name}_bucket", "route": route, "le": "+Inf"},
                   cumulative * t + slow)
            yield {"__name__": f"{name}_count", "route": route}, cumulative * t + slow
            yield ({"__name__": f"{name}_sum", "route": route},
                   sum_rate * share * t + slow * 2.0)
        size, busy, queue_wait, rejections = self.pool
        for name, per_second in (("pool_busy_seconds_total", busy),
                                 ("pool_queue_wait_seconds_total", queue_wait),
                                 ("pool_rejections_total", rejections)):
            yield {"__name__": name}, per_second * t
        yield {"__name__": "pool_size"}, float(size)


@dataclass
class Running:
    job: str
    other_job: str   # the service beside it, which never failed a request
    end: float       # the time the figures are read at: every instance's last sample
    window: str      # back to another sample time, with restarts within it ("1375ms")


def _evaluate(prometheus: Any, query: str, at: float) -> list[dict[str, Any]]:
    """The query's result at one time; a query Prometheus cannot match across the
    instances fails naming that."""
    try:
        return cast(list[dict[str, Any]], prometheus.query_range(query, at, at, 1))
    except pytest.fail.Exception as exc:
        if not re.search(r"many-to-many|duplicate series|multiple matches", str(exc)):
            raise
        pytest.fail(f"{exc} - the job has {len(POOLS)} instances (a service scaled out), so "
                    "each of its metrics is one series per instance: a one-to-one match "
                    "(on(job), group_left, scalar-like use of a gauge) only works for one "
                    "instance. Aggregate each side with sum() first, then combine",
                    pytrace=False)


def _check(prometheus: Any, learner: Any, running: Running, what: str,
           want: dict[str, tuple[float, str]]) -> None:
    job, end, window = running.job, running.end, running.window
    queries = learner.function("red_use", what)(job, window)
    assert isinstance(queries, dict), f"{what}() returned {type(queries).__name__}, not a dict"
    for name, (expected, why) in want.items():
        query = queries.get(name)
        assert isinstance(query, str) and query, (
            f"{what}() has no PromQL for {name!r} (keys: {sorted(queries)})")
        assert job in query.replace("\\", ""), (  # a regex may escape its dots
            f"{what}()[{name!r}] = {query!r} does not select job {job!r}: every service "
            "Prometheus scrapes exports the same metric names (another one runs right now) - "
            'filter every selector on {job="<job>"}, or the figure mixes services')
        assert "irate(" not in query.replace(" ", ""), (
            f"{what}()[{name!r}] = {query!r} uses irate(): it reads only the last two samples "
            "in the range, so the figure jumps with every scrape and says nothing about the "
            f"window ({window}) - use rate() over [window] for a dashboard's and an alert's "
            "figure")
        result = _evaluate(prometheus, query, end)
        labels = [series["metric"] for series in result]
        per_instance = len(result) > 1 and all("instance" in m for m in labels)
        summed_first = "" if result else _summed_first(query.replace(" ", ""))
        assert len(result) == 1, (
            f"{what}()[{name!r}] = {query!r} gave {len(result)} series {labels}, expected one "
            "number for the whole service: "
            + ("rate() of a subquery with fewer than two points in the window "
               f"({window}) is nothing - and whatever its step, {summed_first}"
               if summed_first else
               "aggregate" + (f" over its {len(POOLS)} instances" if per_instance else "")
               + f" ({why})"))
        value = float(result[0]["values"][-1][1])
        assert math.isfinite(value) and abs(value - expected) <= TOLERANCE * expected, (
            f"{what}()[{name!r}] reads {value:.4g}, the load's {name} is {expected:.4g}: "
            f"{_diagnosis(name, query, value, window) or why}. Query: {query}")


def _diagnosis(name: str, query: str, value: float, window: str) -> str:
    """What the query did, when the figure it gave shows it."""
    compact = query.replace(" ", "")
    ranges = sorted(set(re.findall(r"(?<=[}\w)])\[([^\]:]+)", compact)))
    if ranges and ranges != [window]:
        return (f"the query's range is {ranges}, not the window asked for ({window}): put "
                "the window argument in every range selector")
    if found := _job_diagnosis(compact):
        return found
    if found := _summed_first(compact):
        return found
    if re.search(r"(?<!i)(delta|deriv)\(", compact):
        return (f"delta()/deriv() are for gauges: {RESTARTED}, and they read its counters' "
                "drop as a decrease; rate() (or increase()) counts a drop as a reset and "
                "keeps the growth on both sides of it")
    if "offset" in compact:
        return (f"a difference of totals (now minus offset) loses the growth before a "
                f"restart: {RESTARTED} - use rate() over [window], which counts each "
                "series' resets")
    if "rate(" not in compact and "increase(" not in compact:
        return ("the query reads the counters' totals since the service started (its bad "
                "spell before the test included), not what happened over the window: take "
                "rate() over [window] of each counter first, then combine")
    if "irate(" in compact:
        return "irate() reads the last two samples only: use rate() over [window]"
    if name == "error_ratio" and (found := _error_ratio_diagnosis(value)):
        return found
    if name == "utilization" and "/" not in compact:
        return (f"{value:.4g} is how many workers are busy on average, not the share of the "
                "pool that is: divide the busy worker-seconds per second by sum(pool_size)")
    if name == "utilization" and "pool_size" not in compact:
        return (f"the pool's size is not read from pool_size (the pools have "
                f"{sum(pool[0] for pool in POOLS)} workers): divide the busy worker-seconds "
                "per second by sum(pool_size), so the query stays right when a pool is "
                "resized")
    if name == "saturation" and "pool_busy_seconds" in compact:
        return ("the query reads how busy the workers are (pool_busy_seconds_total): that is "
                "utilization. Saturation is the work waiting for a worker: the rate of "
                "pool_queue_wait_seconds_total, the mean queue length")
    return _one_instance_diagnosis(name, compact, value)


RESTARTED = (f"instance {RESTARTING + 1} restarted within the window (a deploy, a crash: "
             "every counter it exports began again at 0)")


def _summed_first(compact: str) -> str:
    """The counters aggregated before rate() (a subquery over their sum)."""
    if re.search(r"(rate|increase|delta|deriv)\((sum|avg|max|min|count)\b", compact):
        return (f"the counters are aggregated before rate(): {RESTARTED}, so their sum "
                "dropped, and rate()/increase() of that sum took the drop for a counter "
                "reset and counted the other instance's whole total as growth. Resets are "
                "per series: rate() each instance's own counter, then sum() the rates - "
                "sum(rate(counter[window]))")
    return ""


# A selector of one of the service's metrics, with its label matchers (if any).
SELECTOR = r"\b((?:http_requests_total|http_request_duration_seconds_\w+|pool_\w+)(\{[^}]*\})?)"


def _job_diagnosis(compact: str) -> str:
    """A selector that reads other jobs than the service's: none named, or a pattern."""
    unfiltered = [sel for sel, matchers in re.findall(SELECTOR, compact)
                  if not re.search(r"\bjob(=|=~)", matchers)]
    if unfiltered:
        return (f"the selector {unfiltered[0]} has no job filter, so it also reads the other "
                "service scraped beside this one (same metric names, other figures): filter "
                'EVERY selector on {job="<job>"} - a denominator as much as a numerator')
    if re.search(r"\bjob=~", compact):
        return (f"the job is matched as a regular expression (job=~): in its name, "
                f"{JOBS[0].format(token='...')!r}, the '.' matches any character, so the "
                f"other service scraped beside this one, job {JOBS[1].format(token='...')!r} "
                "(same metric names, other figures), is read too. Select the job exactly: "
                'job="<job>" (=~ takes a pattern, not a name)')
    return ""


def _error_ratio_diagnosis(value: float) -> str:
    """The error ratio over a denominator other than all requests, or over some 5xx only."""
    total = SERVICE["rate"]
    failed = SERVICE["error_ratio"] * total
    client = sum(rate for (_, code), rate in REQUESTS.items() if code.startswith("4"))
    for reading, what in ((failed / (total - failed), "failed requests over the ones that "
                           "succeeded (the odds of failing)"),
                          (failed / (total - client), "failed requests over the ones that "
                           "were not 4xx")):
        if abs(value - reading) <= TOLERANCE * reading:
            return (f"{value:.4g} is {what}, not over all requests: the share of requests "
                    "the service failed divides the 5xx rate by the rate of EVERY request, "
                    "the 2xx, 4xx and 5xx alike")
    if abs(value - 0.1) < 0.002:
        return ("only code 500 was counted, not 503 or 520: a 5xx is any server failure "
                '(500, 502, 503, 504, ...) - match code=~"5.."')
    return _codes_missed(value)


def _codes_missed(value: float) -> str:
    """The error ratio over some of the 5xx codes only (a list, a narrower pattern)."""
    total = SERVICE["rate"]
    for size in range(1, len(FAILURES)):
        for codes in itertools.combinations(FAILURES, size):
            reading = sum(r for (_, code), r in REQUESTS.items() if code in codes) / total
            if abs(value - reading) <= TOLERANCE * reading:
                missed = [code for code in FAILURES if code not in codes]
                return (f"{value:.4g} counts the 5xx codes {', '.join(codes)} only, not "
                        f"{', '.join(missed)}: a 5xx is any code from 500 to 599 - the first "
                        "digit is the class (RFC 9110 15), and a code a list or a narrower "
                        "pattern leaves out, such as the 520 a proxy answers, fails the "
                        "request as much as a 500. "
                        'Match the class: code=~"5.."')
    return ""


def _one_instance_diagnosis(name: str, compact: str, value: float) -> str:
    """The figure is what a query right for one instance only gives over several."""
    scaled_out = (f"this service runs as {len(POOLS)} instances under one job (a service "
                  "scaled out: each metric is one series per instance), and a figure for the "
                  "service aggregates over all of them with sum()")
    if math.isnan(value) and "scalar(" in compact:
        return (f"NaN: scalar() of more than one series is NaN - {scaled_out}; scalar() is "
                "no aggregation, it only unwraps a vector that has a single series")
    alone = [figures([i])[name] for i in range(len(POOLS))]
    readings = [(sum(alone) / len(alone), "the mean of the instances' own figures (avg())"),
                (max(alone), "the largest instance's own figure (max())"),
                (sum(alone), "the sum of the instances' own figures, each a ratio of its own")]
    readings += [(figure, f"instance {i + 1}'s figure alone") for i, figure in enumerate(alone)]
    if name == "utilization":
        busy, sizes = sum(pool[1] for pool in POOLS), [pool[0] for pool in POOLS]
        readings += [(busy / (sum(sizes) / len(sizes)), "the busy worker-seconds over the "
                      "instances' mean pool size (avg(pool_size))"),
                     (busy / max(sizes), "the busy worker-seconds over the largest pool "
                      "(max(pool_size))"),
                     (busy / min(sizes), "the busy worker-seconds over the smallest pool "
                      "(min(pool_size))")]
    want = SERVICE[name]
    for reading, what in readings:
        if (abs(reading - want) > TOLERANCE * want
                and abs(value - reading) <= TOLERANCE * abs(reading)):
            return f"{value:.4g} is {what}, not the service's - {scaled_out}"
    return ""


@pytest.fixture
def service(prometheus: Any) -> Iterator[Running]:
    """The synthetic service's instances, and another service beside it, their samples
    stored in Prometheus up to the last tick of the grid that has passed."""
    token = secrets.token_hex(3)
    ours, other = (name.format(token=token) for name in JOBS)
    last = math.floor(time.time() / GRID)
    first = last - SAMPLES + 1
    services = [(ours, f"instance-{i + 1}:8080", SyntheticService(first - RAN_BEFORE, i))
                for i in range(len(POOLS))]
    services.append((other, "instance-1:8080",
                     SyntheticService(first - RAN_BEFORE, other=True)))
    series: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
    for job, instance, synthetic in services:
        for tick in range(first, last + 1):
            for labels, value in synthetic.collect(tick):
                key = tuple(sorted({**labels, "job": job, "instance": instance}.items()))
                series.setdefault(key, []).append((round(tick * GRID * 1000), value))
    restarting = services[RESTARTING][2]
    assert any(restarting.restarted(tick) for tick in range(last - WINDOW_TICKS + 1, last)), (
        "no restart within the window: RESTART_TICKS, WINDOW_TICKS?")
    prometheus.write(series)
    yield Running(ours, other, last * GRID, f"{round(WINDOW_TICKS * GRID * 1000)}ms")


def test_red_and_use_figures(service: Running, learner: Any, prometheus: Any) -> None:
    _check(prometheus, learner, service, "red", WANT_RED)
    # USE in the same test: one synthetic service, stored once, serves both.
    _check(prometheus, learner, service, "use", WANT_USE)
    never_failed_reads_zero(prometheus, learner, service)


def never_failed_reads_zero(prometheus: Any, learner: Any, running: Running) -> None:
    """The service beside this one has served only 2xx: it exports no series with a 5xx
    code at all (a counter's labelled child exists from its first increment). Its error
    ratio is 0 - one number, as for any service - not no series: sum() over nothing is
    nothing, and nothing divided by its request rate is nothing too."""
    query = learner.function("red_use", "red")(running.other_job, running.window)["error_ratio"]
    result = _evaluate(prometheus, query, running.end)
    values = [float(series["values"][-1][1]) for series in result]
    assert len(values) == 1 and abs(values[0]) < 1e-9, (   # 1 - x may leave a residue
        f"red()['error_ratio'] of a service that never failed a request (job "
        f"{running.other_job!r}: {OTHER['requests'][('/orders', '200')]:g} requests per "
        "second, all 2xx, so no series with a 5xx code exists) gave "
        + ("no series (empty)" if not values else f"{values}") + ", expected one number, "
        "0: the share of requests it failed. sum() over no series is no series, not 0, and "
        "so is that divided by the request rate: a dashboard shows 'no data' for the "
        "healthiest service, and an alert on the ratio cannot tell it from one that is not "
        "scraped at all. Make the missing numerator 0 - (sum(rate(...{code=~\"5..\"}[w])) "
        f"or vector(0)) / sum(rate(...[w])). Query: {query}")
