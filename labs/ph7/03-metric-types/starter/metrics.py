"""A job worker's metrics with prometheus_client, on a registry of their own, served at
/metrics for Prometheus to scrape. See README.md for what each metric must be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app


class JobMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # TODO: jobs (finished jobs by queue and outcome), jobs_in_progress (by queue),
        # job_duration_seconds (by queue), all registered on self.registry.

    def started(self, queue: str) -> None:
        """A job of ``queue`` starts."""
        # TODO

    def finished(self, queue: str, seconds: float, ok: bool) -> None:
        """A job of ``queue`` that started earlier finishes after ``seconds``, successfully
        or not."""
        # TODO

    def wsgi_app(self) -> Callable[..., Any]:
        return make_wsgi_app(self.registry)
