"""ph7.3 verification, the series themselves, read from the learner's /metrics: a queue's
name is its label value exactly as given (upper case, dots, slashes, dashes, non-ASCII: label
values are data), and a queue with no job running reads 0 jobs in progress - a series that
is there, not one removed when the queue went idle. The types, counts, gauge races and
quantiles are checked in test_metric_types.py (test files do not import each other)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from labrunner.testing import http_request, serve_wsgi

# Queue names as operators write them: two that differ only by - and _, upper case, a dot, a
# slash and a non-ASCII name, each with its own number of jobs started and finished (a job
# still running on each: an idle queue's gauge is test_an_idle_queue_reads_zero's).
QUEUES = {"Emails-EU": (3, 1), "emails_eu": (3, 2), "thumbnails.v2": (4, 3),
          "reports/daily": (1, 0), "счета": (5, 2)}


def _by_queue(address: str, family: str) -> dict[str, float]:
    """The learner's /metrics, read directly: each sample of ``family`` by its queue label
    (the counter's outcomes added up)."""
    reply = http_request(address, "GET", "/metrics")
    out: dict[str, float] = {}
    for f in text_string_to_metric_families(reply.body.decode()):
        for sample in f.samples:
            if sample.name == family:
                queue = sample.labels.get("queue", "")
                out[queue] = out.get(queue, 0.0) + sample.value
    return out


def test_queue_names_are_kept_as_given(learner: Any) -> None:
    metrics = learner.load("metrics").JobMetrics()
    for queue, (started, finished) in QUEUES.items():
        for _ in range(started):
            metrics.started(queue)
        for _ in range(finished):
            metrics.finished(queue, 0.1, True)
    with serve_wsgi(metrics.wsgi_app()) as address:
        running, done = _by_queue(address, "jobs_in_progress"), _by_queue(address, "jobs_total")
    want_running = {q: float(s - f) for q, (s, f) in QUEUES.items()}
    want_done = {q: float(f) for q, (s, f) in QUEUES.items() if f}
    missing = [q for q in QUEUES if q not in running and q not in done]
    assert not missing, (
        f"jobs were started on the queues {list(QUEUES)}, and /metrics has series for the "
        f"queues {sorted(set(running) | set(done))}: no series for {missing}, expected each "
        "queue's name as its label value, unchanged. Label values are data - any Unicode "
        "text, escaped by the client in the exposition; only metric and label NAMES are "
        "limited to [a-zA-Z_][a-zA-Z0-9_]*. A rewritten value (lower-cased, '-' or '.' "
        "made '_', non-ASCII dropped) no longer matches a query on the queue's own name "
        "(jobs_total{queue=\"Emails-EU\"}), and two queues can merge into one series "
        "(Emails-EU and emails_eu). Pass the queue name to labels() as it is.")
    done = {queue: count for queue, count in done.items() if count}  # a series made at 0
    assert (running, done) == (want_running, want_done), (
        f"per queue, /metrics shows jobs_in_progress {running} and jobs_total {done}, "
        f"expected {want_running} and {want_done}: each queue counts its own jobs, under its "
        "name as given")


IDLE = (
    "A queue with no job running has 0 jobs in progress - a value, not a missing series. "
    "A gauge series removed when its count reaches 0 (remove(), clear()) reads as 'no "
    "data': a dashboard shows a gap, `jobs_in_progress == 0` and sum() over the queues find "
    "nothing, and a started() racing the removal counts on a child no longer exported. "
    "Keep the series: dec() to 0 and leave it (Prometheus: avoid missing metrics).")


def test_an_idle_queue_reads_zero_in_progress(learner: Any) -> None:
    metrics = learner.load("metrics").JobMetrics()
    steps: list[tuple[str, dict[str, float]]] = []
    with serve_wsgi(metrics.wsgi_app()) as address:
        for queue in ("email", "email", "sms"):
            metrics.started(queue)
        for queue, shown in (("email", "2 email jobs and 1 sms job started, 1 email job "
                                       "finished"),
                             ("email", "both email jobs finished, the sms job still running"),
                             ("sms", "every job finished")):
            metrics.finished(queue, 0.1, True)
            steps.append((shown, _by_queue(address, "jobs_in_progress")))
    wants = ({"email": 1.0, "sms": 1.0}, {"email": 0.0, "sms": 1.0},
             {"email": 0.0, "sms": 0.0})
    for (shown, got), want in zip(steps, wants, strict=True):
        gone = sorted(set(want) - set(got))
        assert not gone, (
            f"{shown}: /metrics has no jobs_in_progress series for {gone} (it shows {got}), "
            f"expected {want}. " + IDLE)
        assert got == want, (
            f"{shown}: /metrics shows jobs_in_progress {got}, expected {want}")
