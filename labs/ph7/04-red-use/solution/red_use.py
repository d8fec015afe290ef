"""RED for a service and USE for its worker pool, as PromQL: the queries a dashboard and its
alerts are built on, each reading the right signal the right way."""

from __future__ import annotations


def red(job: str, window: str) -> dict[str, str]:
    """Rate, Errors, Duration of the HTTP service scraped as ``job``, over ``window``."""
    sel = f'job="{job}"'
    return {
        # Requests per second, all routes and outcomes.
        "rate": f"sum(rate(http_requests_total{{{sel}}}[{window}]))",
        # The share of requests the service failed: 5xx only (a 404 is the client's). A
        # service that never failed has no 5xx series at all, and sum() of nothing is
        # nothing, not 0: `or vector(0)` makes its ratio 0 rather than no data.
        "error_ratio": (f'(sum(rate(http_requests_total{{{sel},code=~"5.."}}[{window}]))'
                        f" or vector(0))"
                        f" / sum(rate(http_requests_total{{{sel}}}[{window}]))"),
        # p99 over all routes: sum the buckets' rates by le, then one quantile.
        "p99": (f"histogram_quantile(0.99, sum by (le) "
                f"(rate(http_request_duration_seconds_bucket{{{sel}}}[{window}])))"),
    }


def use(job: str, window: str) -> dict[str, str]:
    """Utilization, Saturation, Errors of the worker pool scraped as ``job``."""
    sel = f'job="{job}"'
    return {
        # Busy worker-seconds per second, as a share of the workers there are.
        "utilization": (f"sum(rate(pool_busy_seconds_total{{{sel}}}[{window}]))"
                        f" / sum(pool_size{{{sel}}})"),
        # Work waiting for a worker: queued request-seconds per second = mean queue length.
        "saturation": f"sum(rate(pool_queue_wait_seconds_total{{{sel}}}[{window}]))",
        # The pool's own errors: requests it turned away, per second.
        "errors": f"sum(rate(pool_rejections_total{{{sel}}}[{window}]))",
    }
