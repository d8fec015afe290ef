"""A job worker's metrics with prometheus_client: a counter of finished jobs, a gauge of jobs
in progress and a histogram of job durations, on a registry of their own, served at /metrics
for Prometheus to scrape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

# The worker's jobs take from about 20 ms to 2 s and its SLO speaks of the p99: buckets close
# together over that whole range, so histogram_quantile's linear interpolation inside one
# bucket stays within a few percent of the true quantile.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.35,
                    0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0,
                    2.5, 5.0)


class JobMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("jobs", "Jobs finished, by queue and outcome.",
                            ["queue", "outcome"], registry=self.registry)
        self.in_progress = Gauge("jobs_in_progress", "Jobs started and not finished yet.",
                                 ["queue"], registry=self.registry)
        self.duration = Histogram("job_duration_seconds", "How long a job took, in seconds.",
                                  ["queue"], buckets=DURATION_BUCKETS, registry=self.registry)

    def started(self, queue: str) -> None:
        self.in_progress.labels(queue=queue).inc()

    def finished(self, queue: str, seconds: float, ok: bool) -> None:
        self.in_progress.labels(queue=queue).dec()
        self.jobs.labels(queue=queue, outcome="ok" if ok else "error").inc()
        self.duration.labels(queue=queue).observe(seconds)

    def wsgi_app(self) -> Callable[..., Any]:
        return make_wsgi_app(self.registry)
