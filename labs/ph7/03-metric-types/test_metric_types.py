"""ph7.3 Metric types: a counter, a gauge and a histogram, checked by the system that consumes
them - a real Prometheus scrapes the learner's /metrics while the test drives a known load
through the learner's JobMetrics, and the test asks Prometheus what it saw: the counts, the
jobs in progress, and histogram_quantile() against the exact quantiles of the load."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labrunner.testing import http_request, serve_wsgi

# What each metric must be, and why (the first line a learner sees when it is not).
TYPES = {
    "jobs": ("counter", "a count of finished jobs only goes up: make it a Counter, so rate() "
                        "and increase() work and a restart reads as a reset, not a drop"),
    "jobs_in_progress": ("gauge", "jobs in progress go up and down: make it a Gauge"),
    "job_duration_seconds": ("histogram", "durations must be a Histogram: its buckets can be "
                                          "summed across instances and read with "
                                          "histogram_quantile(); a Summary's quantiles "
                                          "cannot be aggregated"),
}
QUANTILE_TOLERANCE = 0.075
# Why a gauge with no sample where 0 was expected is wrong (test_series.py says more).
IDLE_GONE = (" (no series: it was removed when the queue went idle - an idle queue reads 0 "
             "jobs in progress, a value; remove() or clear() turns it into 'no data')")
# Jobs started (then finished) at the same moment on threads of their own, and how long each
# bytecode of the learner's code takes in those threads (so that they interleave).
THREADS, STEP_DELAY = 8, 0.001


def _durations(seed: int = 7, fast: int = 880, stalled: int = 0) -> list[float]:
    """The synthetic load: 1000 jobs from 20 ms to 1.9 s, most of them fast, a slow tail;
    with ``stalled``, a degraded worker: that many of them take 3 to 6 s instead."""
    rng = random.Random(seed)
    mixed = ([round(rng.uniform(0.02, 0.2), 4) for _ in range(fast - stalled)]
             + [round(rng.uniform(0.2, 0.9), 4) for _ in range(100)]
             + [round(rng.uniform(0.9, 1.9), 4) for _ in range(20)]
             + [round(rng.uniform(3.0, 6.0), 4) for _ in range(stalled)])
    rng.shuffle(mixed)
    return mixed


def _lognormal_durations(median: float, sigma: float, seed: int = 7,
                         count: int = 1000) -> list[float]:
    """Durations shaped like real latencies: log-normal around ``median`` seconds, kept
    within the 20 ms - 2 s range, from a fixed seed."""
    rng = random.Random(seed)
    values: list[float] = []
    while len(values) < count:
        value = rng.lognormvariate(math.log(median), sigma)
        if 0.02 <= value <= 1.9:
            values.append(round(value, 4))
    return values


# Most jobs around 90 ms and a long thin tail to 1.9 s. The load above is uniform inside each
# of its three ranges, and linear interpolation is exact on uniform data: buckets far apart
# where the jobs are dense (every 200 ms) read it well and this one badly.
SKEWED_QUEUE = "thumbnails"

# A fast queue (cache refreshes): around 50 ms, narrow. Its p50 and p90 fall below 100 ms,
# where the loads above have few jobs: buckets that start at 100 ms (the first one spans
# 0 - 100 ms) or step 50 ms apart there read them far off, and the uniform and skewed loads
# never show it.
FAST_QUEUE = "cache"


# A degraded worker on a queue of its own: 4 % of its jobs stall for 3 to 6 s, so its p99
# (about 5 s) is far above every normal job. histogram_quantile() never reads above the
# highest finite bucket bound: buckets that stop at the normal range (2 s, or an SLO edge
# of 2.5 s) read this p99 as that bound, and the breach never shows. It may read high (a
# coarse top bucket) but not more than this much low.
DEGRADED_QUEUE, DEGRADED_LOW = "reports", 0.25


def _exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1]


@contextmanager
def _worker(learner: Any, prometheus: Any) -> Iterator[tuple[Any, str, str]]:
    """The learner's JobMetrics, its /metrics served on loopback and scraped by Prometheus
    under a job of this test's own."""
    metrics = learner.load("metrics").JobMetrics()
    with serve_wsgi(metrics.wsgi_app()) as address:
        yield metrics, address, prometheus.scrape(address)


def _series(prometheus: Any, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in prometheus.query(expr)}


def test_each_metric_has_the_right_type(learner: Any) -> None:
    metrics = learner.load("metrics").JobMetrics()
    metrics.started("email")
    metrics.finished("email", 0.1, True)
    with serve_wsgi(metrics.wsgi_app()) as address:
        reply = http_request(address, "GET", "/metrics")
    assert reply.status == 200, f"GET /metrics answered {reply.status}, expected 200"
    try:
        families = {f.name: f.type for f in text_string_to_metric_families(
            reply.body.decode())}
    except Exception as exc:  # noqa: BLE001 - the parser's complaint is the message
        pytest.fail(f"/metrics does not parse as Prometheus' text format: {exc}",
                    pytrace=False)
    for name, (wanted, why) in TYPES.items():
        if name not in families and f"{name}_total" in families:  # not a counter's family
            name = f"{name}_total"
        assert name in families, (
            f"no metric {name!r} in /metrics (saw: {', '.join(sorted(families)) or 'none'}): "
            f"{why}; register it on JobMetrics.registry")
        assert families[name] == wanted, (
            f"{name} is exposed as a {families[name]}, expected a {wanted}: {why}")


def _exposed(address: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The learner's own /metrics, read directly: each sample of ``family`` by its labels."""
    reply = http_request(address, "GET", "/metrics")
    return {tuple(sorted(sample.labels.items())): sample.value
            for f in text_string_to_metric_families(reply.body.decode())
            for sample in f.samples if sample.name == family}


def test_each_instance_counts_only_its_own_jobs(learner: Any) -> None:
    """Two JobMetrics in one process (two workers, or the tests of one app) each count on
    their own registry: metrics made once at import, on a module's or the class's registry
    and shared by every instance, mix their jobs together."""
    module = learner.load("metrics")
    first, second = module.JobMetrics(), module.JobMetrics()
    for _ in range(3):
        first.started("email")
        first.finished("email", 0.1, True)
    second.started("email")
    with serve_wsgi(first.wsgi_app()) as one, serve_wsgi(second.wsgi_app()) as other:
        counts = (_exposed(one, "jobs_total").get((("outcome", "ok"), ("queue", "email"))),
                  _exposed(other, "jobs_total").get((("outcome", "ok"), ("queue", "email"))))
        levels = (_exposed(one, "jobs_in_progress").get((("queue", "email"),)),
                  _exposed(other, "jobs_in_progress").get((("queue", "email"),)))
    assert not (levels[0] is None and counts[0] == 3 and levels[1] == 1), (
        "two JobMetrics() in one process: the first finished its 3 email jobs, and its "
        'jobs_in_progress{queue="email"} is missing, expected 0' + IDLE_GONE)
    assert counts[1] in (None, 0) and counts[0] == 3 and levels == (0, 1), (
        f"two JobMetrics() in one process: the first finished 3 email jobs, the second "
        f"started 1 and finished none, and their /metrics show jobs_total "
        f"{counts[0]} and {counts[1]}, jobs_in_progress {levels[0]} and {levels[1]}, "
        "expected 3 and 0 (or no series), 0 and 1: the instances share their metrics"
        + (" - the second one's started() moved the FIRST one's gauge (it has no series of "
           "its own), so a labels() child made by the first was reused: a cache of "
           "children (a dict of labels(...) by queue) kept on the class or the module is "
           "shared by every instance; keep it on self, or call labels() each time"
           if levels == (1, None) else "")
        + ". Create the registry and the metrics in __init__ (self.registry = "
        "CollectorRegistry(), each metric with registry=self.registry), not once at import "
        "on a module's or the class's registry, which every instance then counts into, "
        "and keep anything made from them (their labels() children) on self too.")


def test_outcome_follows_any_true_or_false_value(learner: Any) -> None:
    """finished()'s ok is a truth value: a job runner may pass 1 and 0 (an exit status
    test, a database flag) as well as True and False."""
    metrics = learner.load("metrics").JobMetrics()
    for ok in (True, 1, False, 0):
        metrics.started("email")
        metrics.finished("email", 0.1, ok)
    with serve_wsgi(metrics.wsgi_app()) as address:
        seen = _exposed(address, "jobs_total")
    got = {dict(labels).get("outcome", ""): value for labels, value in seen.items()}
    assert got == {"ok": 2, "error": 2}, (
        f"finished() was called with ok = True, 1, False and 0, and jobs_total shows "
        f"{ {k: int(v) for k, v in got.items()} }, expected ok: 2, error: 2: the outcome "
        "was decided by comparing ok with True or False (`ok is True`, `ok == False`...), "
        "so a true value that is not the bool True (or a false one that is not False) was "
        "counted under the wrong outcome. Decide by its truth: \"ok\" if ok else \"error\".")


def test_a_job_of_zero_seconds_is_observed(learner: Any) -> None:
    """A job can finish within one tick of the clock that timed it (a cache hit, a no-op;
    time.time() ticks every 15.6 ms on Windows): its duration reads 0.0 s. It finished all
    the same: counted, the gauge down, and its duration observed (in the lowest bucket) -
    a 0 taken for "no duration" leaves _count short of jobs_total and the quantiles high."""
    metrics = learner.load("metrics").JobMetrics()
    for seconds in (0.0, 0, 0.25):
        metrics.started("email")
        metrics.finished("email", seconds, True)
    with serve_wsgi(metrics.wsgi_app()) as address:
        count = _exposed(address, "job_duration_seconds_count").get((("queue", "email"),))
        done = _exposed(address, "jobs_total").get((("outcome", "ok"), ("queue", "email")))
        level = _exposed(address, "jobs_in_progress").get((("queue", "email"),))
    shown = (f'jobs_total{{queue="email",outcome="ok"}} = {done}, jobs_in_progress = '
             f"{level}, job_duration_seconds_count = {count}")
    # Only the signatures of a 0 taken for "no duration": other mistakes are other tests'.
    assert not (done == 1 and level == 2), (
        f"3 email jobs started and finished, two of them in 0.0 s and 0 s, one in 0.25 s, and "
        f"/metrics shows {shown}, expected 3, 0 and 3: finished() dropped the jobs of 0 "
        "seconds (`if not seconds: return`, `if seconds <= 0`...). A duration of 0 is a "
        "value - the job ran within one tick of the clock - not a missing one: count the job, "
        "bring the gauge down and observe its 0")
    assert not (count == 1 and done == 3), (
        f"3 email jobs finished, two of them in 0.0 s and 0 s, one in 0.25 s, and /metrics "
        f"shows {shown}, expected _count 3: the durations of 0 were not observed "
        "(`if seconds:` reads 0 as no duration). A job that ran within one tick of the "
        "clock took 0 s, a value: observe it, or _count falls short of jobs_total and every "
        "quantile reads high. Observe every finished job's duration, 0 included")


def test_counter_and_gauge_follow_the_jobs(learner: Any, prometheus: Any) -> None:
    with _worker(learner, prometheus) as (metrics, address, job):
        # 37 email jobs succeed and 5 fail, 11 sms jobs succeed; 3 more email jobs are still
        # running when Prometheus scrapes.
        plan = [("email", True)] * 37 + [("email", False)] * 5 + [("sms", True)] * 11
        for queue, _ok in plan:
            metrics.started(queue)
        for _ in range(3):
            metrics.started("email")
        level = _exposed(address, "jobs_in_progress").get((("queue", "email"),))
        assert level == 45, (
            f"45 email jobs started and none finished yet, and /metrics shows "
            f'jobs_in_progress{{queue="email"}} = {level}, expected 45: the gauge is how many '
            "jobs are in progress - inc() when one starts, dec() when one finishes"
            + (" (set(1) / set(0) records one job's state, not how many are running)"
               if level == 1 else ""))
        for index, (queue, ok) in enumerate(plan):
            metrics.finished(queue, 0.05 + index / 1000, ok)
        prometheus.wait_for_scrapes(job)

        seen = _series(prometheus, f'jobs_total{{job="{job}"}}', "queue", "outcome")
        want = {("email", "ok"): 37, ("email", "error"): 5, ("sms", "ok"): 11}
        mistake = _outcome_mistake(seen, want)
        assert mistake is None, mistake
        for key, count in want.items():
            got = seen.get(key)
            assert got == count, (
                f'Prometheus saw jobs_total{{queue="{key[0]}",outcome="{key[1]}"}} = {got}, '
                f"expected {count}: count each job once, when it finishes, with its outcome "
                "(the 3 jobs still running must not be counted yet)")
        # a series made ahead at 0 (as Prometheus advises: no missing series) is no count
        extra = sorted(key for key in set(seen) - set(want) if seen[key])
        assert not extra, f"unexpected jobs_total series {extra}: outcome is 'ok' or 'error'"
        observed = _series(prometheus, f'job_duration_seconds_count{{job="{job}"}}', "queue")
        for queue, finished, failed in (("email", 42, 5), ("sms", 11, 0)):
            got = observed.get((queue,))
            assert got == finished, (
                f'job_duration_seconds_count{{queue="{queue}"}} = {got}, but {finished} {queue} '
                f"jobs finished ({failed} of them failed)"
                + (": only the successful jobs' durations were observed - a failed job "
                   "took time too; observe every finished job's duration, whatever its "
                   "outcome (a latency histogram without the failures hides the slow errors)"
                   if got == finished - failed and failed else
                   ": observe each finished job's duration once, in finished()"))

        running = _series(prometheus, f'jobs_in_progress{{job="{job}"}}', "queue")
        assert running.get(("email",)) == 3, (
            f"Prometheus saw jobs_in_progress{{queue=\"email\"}} = {running.get(('email',))}, "
            "expected 3: 45 email jobs started and 42 finished (5 of them failed) - the gauge "
            "goes down when a job finishes, failed ones too")

        for _ in range(2):
            metrics.finished("email", 0.1, False)
        metrics.finished("email", 0.1, True)
        prometheus.wait_for_scrapes(job)
        running = _series(prometheus, f'jobs_in_progress{{job="{job}"}}', "queue")
        assert running.get(("email",)) == 0, (
            f"after the last 3 email jobs finished (2 failed), Prometheus saw "
            f"jobs_in_progress{{queue=\"email\"}} = {running.get(('email',))}, expected 0: "
            "decrement the gauge on every way out of a job, the failing ones included"
            + (IDLE_GONE if running.get(("email",)) is None else ""))
        errors = _series(prometheus, f'jobs_total{{job="{job}",outcome="error"}}', "queue")
        assert errors.get(("email",)) == 7, (
            f"Prometheus saw {errors.get(('email',))} failed email jobs, expected 7")


def _outcome_mistake(seen: dict[tuple[str, ...], float],
                     want: dict[tuple[str, str], int]) -> str | None:
    """What the jobs_total series Prometheus saw (by queue and outcome) say about the outcome
    label, when they show a known mistake with it; None otherwise."""
    shown = ", ".join(f'jobs_total{{queue="{q}"' + (f',outcome="{o}"}}' if o else "}")
                      + f" = {v:g}" for (q, o), v in sorted(seen.items()))
    outcomes = {outcome for _, outcome in seen}
    if "" in outcomes:
        ok, failed = want[("email", "ok")], want[("email", "error")]
        return (f"Prometheus saw {shown}: a series with no outcome label, so the {failed} "
                f"failed email jobs are counted together with the {ok} that succeeded and no "
                "query can tell them apart. The contract (README) is one counter, jobs_total, with "
                "the labels queue and outcome: the error ratio is sum(rate(jobs_total"
                "{outcome=\"error\"}[5m])) / sum(rate(jobs_total[5m])), and dashboards and "
                "alerts read it from that series, not from a counter of failures beside it. "
                "Count each finished job once with outcome=\"ok\" or outcome=\"error\"")
    if len(outcomes) == 1 and outcomes != {"ok"}:
        return (f"Prometheus saw {shown}: every finished job under one outcome value, "
                f"{next(iter(outcomes))!r}, so the failed ones are merged with the ones that "
                "succeeded and jobs_total{outcome=\"error\"} finds nothing. Count each "
                "finished job once with outcome=\"ok\" or outcome=\"error\", as finished()'s "
                "ok argument says")
    if outcomes - {"ok", "error"}:
        return (f"Prometheus saw {shown}: outcome takes the values "
                f"{sorted(outcomes)}, expected exactly 'ok' and 'error' (the values a query "
                "selects on: jobs_total{outcome=\"error\"})")
    for queue in sorted({q for q, _ in want}):
        ok, failed = want.get((queue, "ok"), 0), want.get((queue, "error"), 0)
        got_ok, got_failed = seen.get((queue, "ok"), 0), seen.get((queue, "error"), 0)
        if not failed or (got_ok, got_failed) == (ok, failed):
            continue
        where = f'jobs_total{{queue="{queue}",outcome='
        seen_here = f'{where}"ok"}} = {got_ok:g} and {where}"error"}} = {got_failed:g}'
        if (got_ok, got_failed) == (ok + failed, failed):
            return (f"Prometheus saw {seen_here}, expected {ok} and {failed}: outcome=\"ok\" "
                    f"counts every finished {queue} job, the {failed} failed ones too, so each "
                    f"failure is counted twice - sum(jobs_total) reads {ok + 2 * failed} jobs "
                    f"where {ok + failed} finished, and the error ratio reads "
                    f"{failed}/{ok + 2 * failed}. The values of one label split the jobs: "
                    "count each finished job once, under \"ok\" or under \"error\" (the "
                    "total is their sum)")
        if (got_ok, got_failed) == (ok + failed, 0):
            return (f"Prometheus saw {seen_here}, expected {ok} and {failed}: the {failed} "
                    f"failed {queue} jobs were counted under outcome=\"ok\" with the {ok} that "
                    "succeeded, so the error ratio reads 0 while jobs fail. Take the outcome "
                    "from finished()'s ok argument: \"ok\" if it is true, else \"error\"")
        if (got_ok, got_failed) == (failed, ok):
            return (f"Prometheus saw {seen_here}, expected {ok} and {failed}: the outcomes are "
                    "swapped - a job that finished with ok=True is outcome=\"ok\"")
    return None


def test_gauge_is_right_when_threads_start_and_finish_jobs_at_once(learner: Any) -> None:
    """A worker runs its jobs on threads of their own: started() and finished() are called
    by many threads at once. The harness calls them from THREADS threads released together,
    each step of the learner's code taking a little while, so that the threads interleave
    as on a loaded many-core machine; the gauge must still count every job."""
    harness, module = learner.harness(), learner.load("metrics")
    metrics = module.JobMetrics()
    email = (("queue", "email"),)
    with serve_wsgi(metrics.wsgi_app()) as address:
        for call, args, want in (("started", ("email",), THREADS),
                                 ("finished", ("email", 0.1, True), 0)):
            harness.at_once(module, metrics, call, args, THREADS, STEP_DELAY)
            level = _exposed(address, "jobs_in_progress").get(email, "no sample")
            assert level != "no sample" or want, (
                f"{THREADS} threads each called {call}('email') at the same moment, all the "
                "jobs finished, and /metrics has no jobs_in_progress{queue=\"email\"} "
                f"sample, expected 0{IDLE_GONE}")
            assert level == want, (
                f"{THREADS} threads each called {call}('email') at the same moment, and "
                f'/metrics shows jobs_in_progress{{queue="email"}} = {level}, expected '
                f"{want}: updates were lost. A worker's threads start and finish jobs "
                "concurrently; a read-modify-write of a shared count (running[q] += 1 then "
                "gauge.set(running[q]), or the gauge's value read back and set to value + 1) "
                "lets two threads read the same count and both write count + 1. Use the "
                "gauge's own inc() and dec(): prometheus_client makes each one atomic")
        done = _exposed(address, "jobs_total").get(
            (("outcome", "ok"), *email), "no sample")
        assert done == THREADS, (
            f"{THREADS} email jobs finished at once, all ok, and /metrics shows "
            f'jobs_total{{queue="email",outcome="ok"}} = {done}, expected {THREADS}: count '
            "each job with the counter's own inc(), which is atomic across threads")


def test_gauge_is_right_in_every_interleaving_of_two_jobs(learner: Any) -> None:
    """Two threads update one queue's gauge: one is held before each line of the learner's
    code in turn while the other runs its whole call, then goes on. A gauge set() from a
    count taken earlier - even one taken under a lock - can be written after a newer count
    and put the older one back; inc() and dec() change the value in one step."""
    harness, module = learner.harness(), learner.load("metrics")
    metrics = module.JobMetrics()
    plan: list[tuple[str, str, Any, int]] = []  # call, queue, where held, gauge wanted
    for call, running_before, want in (("started", 0, 2), ("finished", 2, 0)):
        scratch = f"count-{call}"
        for _ in range(running_before or 1):
            metrics.started(scratch)
        args: tuple[Any, ...] = (scratch,) if call == "started" else (scratch, 0.1, True)
        for k in range(1, harness.steps_of(module, metrics, call, args) + 1):
            queue = f"{call}-{k}"
            for _ in range(running_before):
                metrics.started(queue)
            args = (queue,) if call == "started" else (queue, 0.1, True)
            held = harness.held_while_other_runs(module, metrics, call, args, k)
            assert not held["errors"], (
                f"{call}() on two threads at once raised {held['errors'][0]}")
            plan.append((call, queue, held, want))
    with serve_wsgi(metrics.wsgi_app()) as address:
        levels = _exposed(address, "jobs_in_progress")
    named = sorted({dict(labels).get("queue", "") for labels in levels})
    busy = [queue for _, queue, _, want in plan if want and (("queue", queue),) not in levels]
    assert not busy, (
        f"/metrics has no jobs_in_progress series for the queues {busy[:3]}, each with 2 "
        f"jobs running; it has queues {named[:3]}...: a queue's name is its label value as "
        "given (see test_series.py)")
    for call, queue, held, want in plan:
        level = levels.get((("queue", queue),), "no sample")
        assert level != "no sample" or want != 0, (
            f"two threads called {call}() for one queue with 2 jobs running, both finished, "
            f"and /metrics has no jobs_in_progress sample for it, expected 0{IDLE_GONE}")
        assert level == want, (
            f"two threads called {call}() for one queue"
            + (" with 2 jobs running" if call == "finished" else "")
            + f"; one was held before line {held['line']} of your code ({held['text']!r}) "
            f"while the other ran its whole call, then went on, and /metrics shows "
            f"jobs_in_progress = {level}, expected {want}: the held thread wrote the gauge "
            "from a count it had taken before the other's update (a count kept under a "
            "lock, then set() after leaving it, puts the older number back over the newer). "
            "Let the gauge change itself: inc() and dec() are one atomic step")


def test_histogram_quantiles_match_the_load(learner: Any, prometheus: Any) -> None:
    durations, degraded = _durations(), _durations(seed=11, stalled=40)
    skewed, fast = _lognormal_durations(0.09, 0.8), _lognormal_durations(0.05, 0.3)
    with _worker(learner, prometheus) as (metrics, _address, job):
        for queue, load in (("email", durations), (DEGRADED_QUEUE, degraded),
                            (SKEWED_QUEUE, skewed), (FAST_QUEUE, fast)):
            for seconds in load:
                metrics.started(queue)
                metrics.finished(queue, seconds, True)
        prometheus.wait_for_scrapes(job)
        selector = f'job="{job}",queue="email"'

        buckets = prometheus.query(f"job_duration_seconds_bucket{{{selector}}}")
        if not buckets:
            quantiles = prometheus.query(f"job_duration_seconds{{{selector}}}")
            kind = "a Summary (quantile series)" if quantiles else "no series at all"
            pytest.fail(
                f"Prometheus has no job_duration_seconds_bucket series, it has {kind}: "
                "histogram_quantile() needs a Histogram's cumulative buckets",
                pytrace=False)
        count = _series(prometheus, f"job_duration_seconds_count{{{selector}}}")
        assert count.get(()) == len(durations), (
            f"job_duration_seconds_count is {count.get(())}, expected {len(durations)}: "
            "observe every finished job's duration once")
        total = _series(prometheus, f"job_duration_seconds_sum{{{selector}}}").get((), 0.0)
        assert math.isclose(total, sum(durations), rel_tol=1e-6), (
            f"job_duration_seconds_sum is {total:.3f}, expected {sum(durations):.3f} (the "
            "durations in seconds): observe seconds, the base unit the name promises, "
            "not milliseconds")

        bounds = sorted({float(b["metric"]["le"]) for b in buckets})
        for q in (0.5, 0.9, 0.99):
            estimate, exact, error = _quantile_read(prometheus, selector, durations, q)
            assert error <= QUANTILE_TOLERANCE, (
                f"histogram_quantile({q}) reads {estimate:.3f} s, the load's exact p{q * 100:g} "
                f"is {exact:.3f} s ({error:.0%} off, at most {QUANTILE_TOLERANCE:.1%} "
                f"allowed): Prometheus interpolates linearly inside a bucket, so buckets "
                f"{[b for b in bounds if b != math.inf]} are too coarse where these jobs fall "
                "(20 ms - 2 s) - put bucket bounds close together over that range")
        _skewed_quantiles_match(prometheus, job, skewed, bounds)
        _fast_quantiles_match(prometheus, job, fast, bounds)
        _degraded_p99_shows(prometheus, job, degraded, bounds)


def _quantile_read(prometheus: Any, selector: str, values: list[float],
                   q: float) -> tuple[float, float, float]:
    """What histogram_quantile(q) over the buckets ``selector`` picks reads, the exact q-th
    quantile of ``values`` (what was observed), and how far off the reading is (relative)."""
    expr = (f"histogram_quantile({q}, "
            f"sum by (le) (job_duration_seconds_bucket{{{selector}}}))")
    estimate = _series(prometheus, expr).get((), math.nan)
    exact = _exact_quantile(values, q)
    return estimate, exact, abs(estimate - exact) / exact


def _skewed_quantiles_match(prometheus: Any, job: str, skewed: list[float],
                            bounds: list[float]) -> None:
    finite = [b for b in bounds if b != math.inf]
    for q in (0.5, 0.9, 0.99):
        estimate, exact, error = _quantile_read(
            prometheus, f'job="{job}",queue="{SKEWED_QUEUE}"', skewed, q)
        dense = [b for b in finite if b <= 0.3]
        assert error <= QUANTILE_TOLERANCE, (
            f"on a load shaped like real latencies (most jobs around 90 ms, a long tail to "
            f"1.9 s), histogram_quantile({q}) reads {estimate:.3f} s, the exact p{q * 100:g} "
            f"is {exact:.3f} s ({error:.0%} off, at most {QUANTILE_TOLERANCE:.1%} allowed): "
            f"your buckets up to 0.3 s are {dense or 'none'}, and Prometheus interpolates "
            "linearly inside a bucket as if its jobs were spread evenly - true of an even "
            "load, not of one bunched at the bucket's low end. Buckets evenly spaced across "
            "20 ms - 2 s are too coarse where most jobs are: space them closer where the "
            "values are dense (tens of ms apart below 0.3 s), wider in the tail")


def _fast_quantiles_match(prometheus: Any, job: str, fast: list[float],
                          bounds: list[float]) -> None:
    low = [b for b in bounds if b <= 0.1]
    for q in (0.5, 0.9, 0.99):
        estimate, exact, error = _quantile_read(
            prometheus, f'job="{job}",queue="{FAST_QUEUE}"', fast, q)
        assert error <= QUANTILE_TOLERANCE, (
            f"on a fast queue (most jobs 35 - 75 ms, all within the 20 ms - 2 s range), "
            f"histogram_quantile({q}) reads {estimate:.3f} s, the exact p{q * 100:g} is "
            f"{exact:.3f} s ({error:.0%} off, at most {QUANTILE_TOLERANCE:.1%} allowed): "
            f"your bucket bounds up to 0.1 s are {low or 'none'}, so these jobs share one or "
            "two wide buckets and Prometheus spreads them evenly across each (the first "
            "bucket from 0). The range starts at 20 ms: buckets must be close together "
            "there too (about 25 ms apart below 0.2 s), not only where the test's other "
            "loads put their jobs")


def _degraded_p99_shows(prometheus: Any, job: str, degraded: list[float],
                        bounds: list[float]) -> None:
    estimate, exact, _ = _quantile_read(
        prometheus, f'job="{job}",queue="{DEGRADED_QUEUE}"', degraded, 0.99)
    finite = [b for b in bounds if b != math.inf]
    assert estimate >= exact * (1 - DEGRADED_LOW), (
        f"a degraded worker (40 of 1000 jobs stalled for 3 to 6 s) has an exact p99 of "
        f"{exact:.2f} s, and histogram_quantile(0.99) reads {estimate:.3f} s "
        f"({(exact - estimate) / exact:.0%} low, at most {DEGRADED_LOW:.0%} allowed): your "
        f"highest finite bucket is {max(finite, default=math.nan):g} s, and a quantile "
        "that falls in +Inf reads as that bound however slow the tail - the p99 alert "
        "never fires when it matters. Buckets must cover the values the metric can take, "
        "above the normal range and the SLO too: add bounds beyond 2 s (2.5, 5, 10 ...)")
