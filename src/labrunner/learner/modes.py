"""How the learner's code is hosted: the environment that says so, and the one lock on the
factory's socket (a request and its reply at a time)."""

from __future__ import annotations

import threading

ENV_LEARNER_HOST = "LABRUNNER_LEARNER_HOST"
# Grading: a folder the verification fills for the learner's process (another uid) to read.
ENV_SHARED_DIR = "LABRUNNER_SHARED_DIR"
SPAWN = "spawn"
FACTORY_PREFIX = "fd:"

# One request and its reply at a time on a factory's socket (hosts and programs alike).
FACTORY_LOCK = threading.Lock()
