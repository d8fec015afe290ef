"""RED for a service and USE for its worker pool, as PromQL. See README.md."""

from __future__ import annotations


def red(job: str, window: str) -> dict[str, str]:
    """Rate, Errors, Duration of the HTTP service scraped as ``job``, over ``window``:
    {"rate": ..., "error_ratio": ..., "p99": ...}, each a PromQL expression."""
    raise NotImplementedError("red(): return the three PromQL expressions")


def use(job: str, window: str) -> dict[str, str]:
    """Utilization, Saturation, Errors of the worker pool scraped as ``job``:
    {"utilization": ..., "saturation": ..., "errors": ...}, each a PromQL expression."""
    raise NotImplementedError("use(): return the three PromQL expressions")
