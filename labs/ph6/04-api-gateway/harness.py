"""Runs where the learner's gateway runs (in its process when grading): makes every line of
the learner's code take a little while, in the threads the WSGI server starts for its
requests, so that concurrent requests interleave line by line as they would on a loaded
server with many cores. A rate limiter whose check and count are not one atomic step per
user then lets a burst through: several requests read the same count before any of them
writes it back. Guarded by a lock, the others wait and nothing changes but the time taken.
The verdict is the test's: it counts what reached its backend."""

from __future__ import annotations

from labrunner.slow_steps import restore_new_threads as unstretch
from labrunner.slow_steps import slow_new_threads as stretch_lines

__all__ = ["stretch_lines", "unstretch"]
