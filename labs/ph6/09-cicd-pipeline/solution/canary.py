"""A canary controller: 5 % -> 20 % -> 100 % of the traffic to the new version, rolled back
to 0 % as soon as its error rate crosses the threshold."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class CanaryController:
    def __init__(self, set_weight: Callable[[int], None], steps: Sequence[int] = (5, 20, 100),
                 max_error_rate: float = 0.05, min_requests: int = 200) -> None:
        # Refused before any traffic moves: steps that never reach 100 (or go back) are no
        # rollout, and an error rate over an empty window is 0 / 0 - no judgement at all.
        if not steps or list(steps) != sorted(set(steps)) or steps[0] < 1 or steps[-1] != 100:
            raise ValueError(f"steps must rise strictly from 1.. to 100, not {steps!r}")
        if min_requests < 1:
            raise ValueError(f"min_requests must be at least 1, not {min_requests!r}")
        # The threshold is a fraction of the requests (0.05 is 5 %): 5 (meant as 5 %) or 1.0
        # can never be crossed (errors / requests is at most 1), a negative one always is,
        # and NaN compares false with every rate - each a gate that does not gate.
        if not 0 <= max_error_rate < 1:
            raise ValueError(f"max_error_rate is a fraction in [0, 1), not {max_error_rate!r}")
        self.set_weight = set_weight
        self.steps = list(steps)
        self.max_error_rate = max_error_rate
        self.min_requests = min_requests
        self.index = 0
        # A single step of 100 is the whole rollout at once: promoted as it starts.
        self.status = "promoted" if len(self.steps) == 1 else "running"
        self.weight = self.steps[0]
        # The window of the current step starts at the counters seen when it began.
        self.base_requests = 0
        self.base_errors = 0
        self.last = (0, 0)  # the counters at the previous tick: a lower one is a reset
        self.set_weight(self.weight)

    def absorb_reset(self, requests_total: int, errors_total: int) -> None:
        """A canary that restarts starts its counters again from 0 (a Prometheus counter
        reset: a total lower than the last one seen). What the window counted before the
        reset stays in it, and the new totals add to it - as increase() counts - by moving
        the window's start down by the totals the restart lost."""
        last_requests, last_errors = self.last
        if requests_total < last_requests or errors_total < last_errors:
            self.base_requests -= last_requests
            self.base_errors -= last_errors
        self.last = (requests_total, errors_total)

    def tick(self, requests_total: int, errors_total: int) -> str:
        """Counters are cumulative (like Prometheus counters) for the canary version."""
        if self.status != "running":
            return self.status
        self.absorb_reset(requests_total, errors_total)
        requests = requests_total - self.base_requests
        errors = errors_total - self.base_errors
        if requests < self.min_requests:
            return "hold"
        if errors / requests > self.max_error_rate:
            self.status = "rolled_back"
            self.weight = 0
            self.set_weight(0)
            return "rollback"
        self.index += 1
        self.weight = self.steps[self.index]
        self.base_requests, self.base_errors = requests_total, errors_total
        self.set_weight(self.weight)
        if self.index == len(self.steps) - 1:
            self.status = "promoted"
            return "promoted"
        return "advance"
