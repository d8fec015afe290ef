"""A canary controller: 5 % -> 20 % -> 100 % of the traffic to the new version, rolled back
to 0 % as soon as its error rate crosses the threshold. See README.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class CanaryController:
    def __init__(self, set_weight: Callable[[int], None], steps: Sequence[int] = (5, 20, 100),
                 max_error_rate: float = 0.05, min_requests: int = 200) -> None:
        self.set_weight = set_weight
        self.status = "running"
        # TODO: send the first step's weight, remember where the current step's window begins

    def tick(self, requests_total: int, errors_total: int) -> str:
        """Counters are cumulative for the canary version. Return "hold", "advance",
        "promoted", "rollback" (and "promoted" / "rolled_back" once finished)."""
        raise NotImplementedError("tick(): decide hold / advance / promote / rollback")
