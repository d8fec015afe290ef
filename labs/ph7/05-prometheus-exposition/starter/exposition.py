"""Prometheus' text exposition format written by hand, and PromQL that reads a counter across
resets. See README.md."""

from __future__ import annotations

from typing import Any


def render(families: list[dict[str, Any]]) -> str:
    """The families in the text format (version 0.0.4)."""
    raise NotImplementedError("render(): write each family's # HELP and # TYPE lines and "
                              "its samples")


def total_increase(job: str, window: str) -> str:
    """PromQL: requests served by all workers of ``job`` over the last ``window``."""
    raise NotImplementedError("total_increase(): return a PromQL expression")


def per_second(job: str, window: str) -> str:
    """PromQL: requests per second served by all workers of ``job``, over ``window``."""
    raise NotImplementedError("per_second(): return a PromQL expression")
