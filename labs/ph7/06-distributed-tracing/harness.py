"""Harness for ph7.6: serves one of the learner's WSGI apps the way a sync worker
(gunicorn's default) or any worker pool does - request after request on the SAME thread.
It runs where the learner's code runs (a process of its own when grading:
learner.harness()); the test decides from the spans its own collector receives.

The test's other servers start a thread per request, where a context left attached by one
request dies with its thread; here it would stay on the thread for the next request."""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class OneThreadServer:
    """``app`` on 127.0.0.1:<free port>: one request at a time, all on one thread."""

    def __init__(self, app: Any) -> None:
        self.server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
        self.address = f"127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
