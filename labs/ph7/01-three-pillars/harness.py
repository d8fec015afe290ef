"""Runs where the learner's WSGI app runs (in its process when grading): hands it several
requests from threads released together, the way a threaded server's workers do, and makes
each line of the learner's code take a little while in those threads, so that the requests
interleave line by line as on a loaded server. Ids kept anywhere shared by the requests (a
dict or a global set when a span opens) are then overwritten by another request before they
are logged; ids read from the current span (context-local) stay each request's own. The
verdict is the test's: it reads the log lines and the metrics."""

from __future__ import annotations

import io
import sys
import threading
from types import ModuleType
from typing import Any

from labrunner.slow_steps import slow_tracer


def at_once(module: ModuleType, app: Any, requests: list[tuple[str, str]],
            delay: float) -> tuple[list[int | None], list[str]]:
    """GET each (path, traceparent) of ``requests`` through ``app`` from its own thread, all
    released together, each line of the learner's folder preceded by a ``delay`` s sleep.
    Returns the statuses (in order) and the failures, as text."""
    tracer = slow_tracer(module, delay)
    start = threading.Barrier(len(requests))
    statuses: list[int | None] = [None] * len(requests)
    failures: list[str] = []

    def one(k: int, path: str, traceparent: str) -> None:
        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            statuses[k] = int(status.split()[0])
            return lambda data: None

        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL":
                   "HTTP/1.1", "HTTP_TRACEPARENT": traceparent, "wsgi.input": io.BytesIO(),
                   "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http",
                   "wsgi.version": (1, 0), "wsgi.multithread": True,
                   "wsgi.multiprocess": False, "wsgi.run_once": False}
        try:
            start.wait(30)
            sys.settrace(tracer)  # this thread's calls from here on
            body = app(environ, start_response)
            b"".join(body)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failures.append(f"GET {path}: {type(exc).__name__}: {exc}")
        finally:
            sys.settrace(None)

    workers = [threading.Thread(target=one, args=(k, path, parent), name=f"request-{k}")
               for k, (path, parent) in enumerate(requests)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    return statuses, failures
