"""Runs where the learner's code runs (in its process when grading): notes the threads that
die of an exception, so that a test waiting for a write-behind worker to write learns at
once that the worker is gone (and of what), instead of waiting out its deadline."""

from __future__ import annotations

from labrunner.thread_deaths import thread_deaths, unwatch_thread_deaths, watch_thread_deaths

__all__ = ["thread_deaths", "unwatch_thread_deaths", "watch_thread_deaths"]
