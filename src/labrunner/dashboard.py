"""`labrunner dashboard`: the roadmap page of a workspace, served on loopback, live.

The page is rendered afresh from the progress store on every request, and a server-sent
event stream tells an open page to reload as soon as a run records an attempt, so the page
can sit beside `labrunner watch`. Only 127.0.0.1 is bound: the page shows one learner's work.
"""

from __future__ import annotations

import html
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .catalog import Catalog, Lab
from .roadmap_page import ProgressView, learner_page, progress_view, state_json
from .store import ProgressStore
from .workspace import Workspace

# How often an open event stream looks for new attempts, and how often it proves it is alive.
POLL_SECONDS = 0.3
KEEPALIVE_SECONDS = 15.0


def readme_link_for_file(workspace: Workspace, page: Path) -> Callable[[Lab], str | None]:
    """Links from a written page to each lab's README: the workspace copy, relative to the
    page when the page sits in the workspace, else an absolute file: URL."""

    def link(lab: Lab) -> str | None:
        readme = workspace.lab_dir(lab) / "README.md"
        if not readme.is_file():
            readme = lab.path / "README.md"
            if not readme.is_file():
                return None
        try:
            return os.path.relpath(readme, page.parent.resolve()).replace(os.sep, "/")
        except ValueError:
            return readme.resolve().as_uri()

    return link


def write_page(catalog: Catalog, workspace: Workspace, page: Path) -> Path:
    """Write the learner's page to ``page`` (atomically: a browser never sees half)."""
    store = workspace.store()
    try:
        view = progress_view(catalog, store.status(), store.attempts(),
                             readme_link_for_file(workspace, page))
        text = learner_page(view, revision=store.revision())
    finally:
        store.close()
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".{page.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, page)
    return page


class Dashboard:
    """The page, its state as JSON, each lab's README, and the event stream."""

    def __init__(self, catalog: Catalog, workspace: Workspace) -> None:
        self.catalog = catalog
        self.workspace = workspace
        self.store = ProgressStore(workspace.store_path)
        self.stopping = threading.Event()
        self.labs = {lab.id: lab for lab in catalog.labs}

    def _readme_href(self, lab: Lab) -> str:
        return f"readme/{urllib.parse.quote(lab.id)}"

    def _view(self) -> tuple[ProgressView, str]:
        """The progress and its revision, read together (one snapshot of the store)."""
        with self.store.lock:
            if self.stopping.is_set():
                raise ConnectionAbortedError("the dashboard is stopping")
            status, attempts = self.store.status(), self.store.attempts()
            revision = self.store.revision()
        return progress_view(self.catalog, status, attempts, self._readme_href), revision

    def page(self) -> str:
        view, revision = self._view()
        return learner_page(view, revision=revision, live=True)

    def state(self) -> str:
        return state_json(*self._view())

    def revision(self) -> str:
        with self.store.lock:
            return "" if self.stopping.is_set() else self.store.revision()

    def readme(self, lab_id: str) -> str | None:
        lab = self.labs.get(lab_id)
        if lab is None:
            return None
        for candidate in (self.workspace.lab_dir(lab) / "README.md", lab.path / "README.md"):
            if candidate.is_file():
                text = candidate.read_text(encoding="utf-8", errors="replace")
                return ("<!doctype html><meta charset=utf-8>"
                        '<meta name=viewport content="width=device-width,initial-scale=1">'
                        f"<title>{html.escape(lab.id)} {html.escape(lab.title)}</title>"
                        '<p><a href="../">← roadmap</a></p>'
                        f'<pre style="white-space:pre-wrap">{html.escape(text)}</pre>')
        return None

    def close(self) -> None:
        self.stopping.set()   # every read after the close sees this, not a closed store
        self.store.close()


def _send(handler: BaseHTTPRequestHandler, status: int, body: str, content_type: str) -> None:
    data = body.encode("utf-8")
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.send_header("Cache-Control", "no-store")
    handler.end_headers()
    handler.wfile.write(data)


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "labrunner-dashboard"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # the terminal shows the URL, not a request log

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            try:
                self._route(urllib.parse.urlsplit(self.path).path)
            except ConnectionAbortedError:   # a request that came as the dashboard stopped
                _send(self, HTTPStatus.SERVICE_UNAVAILABLE, "stopping", "text/plain")

        def _route(self, path: str) -> None:
            if path in ("/", "/index.html"):
                _send(self, HTTPStatus.OK, dashboard.page(), "text/html; charset=utf-8")
            elif path == "/state.json":
                _send(self, HTTPStatus.OK, dashboard.state(), "application/json")
            elif path == "/events":
                self._events()
            elif path.startswith("/readme/"):
                page = dashboard.readme(urllib.parse.unquote(path[len("/readme/"):]))
                if page is None:
                    _send(self, HTTPStatus.NOT_FOUND, "no such lab", "text/plain")
                else:
                    _send(self, HTTPStatus.OK, page, "text/html; charset=utf-8")
            else:
                _send(self, HTTPStatus.NOT_FOUND, "not found", "text/plain")

        def _events(self) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            sent = ""
            quiet_since = time.monotonic()
            try:
                while not dashboard.stopping.is_set():
                    revision = dashboard.revision()
                    if revision != sent:
                        self.wfile.write(f"event: progress\ndata: {revision}\n\n".encode())
                        self.wfile.flush()
                        sent, quiet_since = revision, time.monotonic()
                    elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
                        self.wfile.write(b": keep-alive\n\n")
                        self.wfile.flush()
                        quiet_since = time.monotonic()
                    dashboard.stopping.wait(POLL_SECONDS)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                pass  # the page was closed, or the dashboard is stopping

    return Handler


def serve(dashboard: Dashboard, port: int = 0) -> ThreadingHTTPServer:
    """Start serving on 127.0.0.1 in a background thread; the caller shuts it down."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(dashboard))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dashboard", daemon=True).start()
    return server


def stop(server: ThreadingHTTPServer, dashboard: Dashboard) -> None:
    dashboard.close()
    server.shutdown()
    server.server_close()


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}/"


def browser_available() -> bool:
    """Open a browser only where one can show a window: a console browser started from here
    would take over the learner's terminal."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or os.environ.get("BROWSER"))
