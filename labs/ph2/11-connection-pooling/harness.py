"""Runs where the learner's Database runs (in its process when grading): sends it a burst of
requests from threads released together, every line of the learner's code slowed a little
in those threads, so that they interleave step by step as requests arriving at the same
moment do on a loaded many-core server. A limit on waiting requests that is checked before
the pool is asked (the pool's requests_waiting read, or a counter of the learner's own)
then lets every request of the burst see room and queue. Decided inside the pool, under its
lock (psycopg_pool's max_waiting), the limit holds and nothing changes but the time taken.
The verdict is the test's: it counts the requests waiting in the pool's queue."""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any

from labrunner.slow_steps import slow_tracer


class Burst:
    """``db.query(sql)`` from ``requests`` threads released together; each line of the
    learner's folder preceded by a ``delay`` s sleep (which lets the other threads run)."""

    def __init__(self, module: ModuleType, db: Any, sql: str, requests: int,
                 delay: float) -> None:
        tracer = slow_tracer(module, delay)
        start = threading.Barrier(requests)
        self._outcomes: list[tuple[Any, ...] | None] = [None] * requests

        def one(n: int) -> None:
            try:
                start.wait(30)
                sys.settrace(tracer)  # this thread's calls from here on
                self._outcomes[n] = ("ok", repr(db.query(sql)))
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                self._outcomes[n] = ("error", type(exc).__name__,
                                     isinstance(exc, module.PoolExhausted), str(exc))
            finally:
                sys.settrace(None)

        self._threads = [threading.Thread(target=one, args=(n,), daemon=True,
                                          name=f"burst-request-{n}") for n in range(requests)]
        for thread in self._threads:
            thread.start()

    def ended(self) -> list[tuple[Any, ...]]:
        """The outcomes of the requests that have ended: ("ok", repr of the result) or
        ("error", class name, whether it is the learner's PoolExhausted, message)."""
        return [o for o in self._outcomes if o is not None]

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)
