"""A real HTTP server around a WSGI app (served where the app lives), and a real client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

import pytest

from .beside import _beside, _entered, _lives_elsewhere


def _serve_wsgi_there(app: Any, http11: bool) -> tuple[str, Callable[[], Any]]:
    return _entered(serve_wsgi(app, http11=http11))



class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep output clean
        pass

    def get_environ(self) -> dict[str, str]:
        environ = super().get_environ()
        # wsgiref percent-decodes PATH_INFO, so `/a%2Fb` and `/a/b` look alike: the
        # request-target as sent rides along under the names gunicorn (RAW_URI) and uWSGI
        # (REQUEST_URI) give it, for apps that must tell them apart (a proxy forwarding a
        # path untouched).
        environ["RAW_URI"] = environ["REQUEST_URI"] = self.path
        return environ


class _ServerHandler11(ServerHandler):
    http_version = "1.1"  # wsgiref answers HTTP/1.0 by default

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        # wsgiref serves one request per connection (typeshed does not declare .headers)
        self.headers["Connection"] = "close"  # type: ignore[attr-defined]


class _QuietHandler11(_QuietHandler):
    """Answers with an HTTP/1.1 status line (and ``Connection: close``)."""

    def handle(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.parse_request():
            return
        handler = _ServerHandler11(self.rfile, self.wfile,  # type: ignore[arg-type]
                                   self.get_stderr(), self.get_environ(), multithread=True)
        handler.request_handler = self  # type: ignore[attr-defined]
        handler.run(self.server.get_app())  # type: ignore[attr-defined]


@contextmanager
def serve_wsgi(app: Callable[..., Any], *, http11: bool = False) -> Iterator[str]:
    """Serve a WSGI app on 127.0.0.1:<free port> in a thread; yield ``"127.0.0.1:<port>"``.

    Each request runs on a daemon thread of its own (an app that hangs cannot keep the test
    process alive), and the server logs nothing. wsgiref answers HTTP/1.0; with
    ``http11=True`` the status line says HTTP/1.1 (and every answer carries
    ``Connection: close``, since wsgiref still serves one request per connection). The
    server is shut down when the block ends.

    An app that lives in the learner's own process (grading) is served there, so the
    server's calls into it (environ, start_response, the body it reads) stay local."""
    if _lives_elsewhere(app):
        address, stop = _beside(app, _serve_wsgi_there, http11)
        try:
            yield str(address)
        finally:
            stop()
        return
    handler = _QuietHandler11 if http11 else _QuietHandler
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer,
                         handler_class=handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class HttpReply:
    """A response as received: status, headers and the whole body."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        """The body parsed as JSON; a body that is not JSON fails the test."""
        try:
            return json.loads(self.body)
        except ValueError:
            pytest.fail(f"expected a JSON body, saw {self.body[:200]!r}", pytrace=False)


def http_request(host: str, method: str, path: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, *, document: Any = None,
                 content_type: str | None = "application/json",
                 timeout: float = 15) -> HttpReply:
    """Send one request to ``host`` (``"127.0.0.1:<port>"``) on a fresh connection.

    ``document`` (when not None) is sent as the JSON-encoded body instead of ``body``. A
    request with a body carries ``Content-Type: <content_type>`` unless ``content_type`` is
    None; ``headers`` are added last and win."""
    if document is not None:
        body = json.dumps(document).encode()
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        implied = {"Content-Type": content_type} if body is not None and content_type else {}
        conn.request(method, path, body=body, headers={**implied, **(headers or {})})
        resp = conn.getresponse()
        return HttpReply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def read_http_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """One request read off ``conn`` by hand, for a test that plays a server no WSGI server
    can be (one that hangs up, answers what is not HTTP, or answers only when told): its
    head (request line and headers, without the blank line) and its body (Content-Length
    bytes, b"" without one). A peer that closes early leaves what it sent."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := conn.recv(65536)):
        body += chunk
    return head, body


# --------------------------------------------------------------------------------------


def call(host: str, method: str, path: str, body: Any = None,
         headers: Mapping[str, str] | None = None, *,
         content_type: str | None = "application/json", timeout: float = 20) -> HttpReply:
    """One request to a learner's app, the way most HTTP labs send them: ``body`` as given
    when it is bytes, else (a dict, a list, a string, a number) encoded as JSON; a body goes
    with ``Content-Type: <content_type>`` unless that is None (a test of an app's answer to
    a request without one); ``headers`` win."""
    if body is None or isinstance(body, bytes):
        return http_request(host, method, path, body, headers, content_type=content_type,
                            timeout=timeout)
    return http_request(host, method, path, None, headers, document=body,
                        content_type=content_type, timeout=timeout)
