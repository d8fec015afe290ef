"""Prometheus' text exposition format written by hand, and PromQL that reads a counter across
resets the way Prometheus means it to be read."""

from __future__ import annotations

import json
import math
from typing import Any


def _escape_help(text: str) -> str:
    # HELP text escapes only the backslash and the line feed.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    # Label values escape the backslash, the double quote and the line feed.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    # Sample values are float64. An integer past its range (10**400) is the float it
    # rounds to, +-Inf (IEEE 754 overflow); float() of it raises, and its digits written
    # out fail Prometheus' ParseFloat, and with it the whole scrape.
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    # A gauge may be NaN (0 hits / 0 lookups) or infinite; int() of either raises.
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number) if number != int(number) or abs(number) >= 1e15 else str(int(number))


def render(families: list[dict[str, Any]]) -> str:
    """The families in the text format (version 0.0.4): for each, its HELP and TYPE lines,
    then its samples together; a counter's samples and lines are named ``<name>_total``."""
    lines: list[str] = []
    for family in families:
        name = family["name"]
        if family["type"] == "counter":
            name += "_total"
        lines.append(f"# HELP {name} {_escape_help(family['help'])}")
        lines.append(f"# TYPE {name} {family['type']}")
        for sample in family["samples"]:
            labels = ",".join(f'{key}="{_escape_label(str(value))}"'
                              for key, value in sample["labels"].items())
            lines.append(f"{name}{{{labels}}} {_number(sample['value'])}" if labels
                         else f"{name} {_number(sample['value'])}")
    return "\n".join(lines) + "\n"


def _string(text: str) -> str:
    r"""A PromQL string literal. PromQL reads Go's escapes, and JSON's are among them (\\,
    \", \n, \u00XX); non-ASCII stays as it is (JSON's \uD83D surrogate halves are no Go
    escape). Pasted between quotes as it is, a job named 'C:\new' selects 'C:', a line
    feed and 'ew', and one with a quote ends the string early: a parse error, or another
    query."""
    return json.dumps(text, ensure_ascii=False)


def total_increase(job: str, window: str) -> str:
    """PromQL: requests served by all workers of ``job`` over the last ``window``.
    increase() per series first (it knows a drop is a restart, not negative traffic), then
    sum - a sum of counters is no counter, and its drops read as resets."""
    return f"sum(increase(http_requests_total{{job={_string(job)}}}[{window}]))"


def per_second(job: str, window: str) -> str:
    """PromQL: requests per second served by all workers of ``job``, averaged over
    ``window``."""
    return f"sum(rate(http_requests_total{{job={_string(job)}}}[{window}]))"
