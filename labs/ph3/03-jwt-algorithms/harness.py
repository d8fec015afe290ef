"""Harness for ph3.3: watches which comparison the learner's verify() calls for HS256, with
labrunner.compare_watch, where the learner's code runs (a process of its own when grading:
learner.harness()). The test decides from what was recorded: whether compare_digest saw the
signature at all."""

from __future__ import annotations

from labrunner.compare_watch import CompareWatch, watch

__all__ = ["CompareWatch", "watch"]
