"""The backend request lifecycle, one stage at a time.

    accept -> parse HTTP -> route -> middleware chain -> handler -> Postgres -> serialize -> send

http.server accepts the connection and parses the request line and headers; everything
after that is ours and explicit. The router picks the handler from method and path (and
answers 404/405 itself); the route decides which middleware wraps the handler; each
middleware is a function ``(request, next) -> response`` that may act before and after
the rest of the chain, or answer at once without calling ``next`` (the auth check does,
so an unauthenticated request never reaches the handler or the database). The handler
runs one parameterized query, and the response is serialized as JSON.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from psycopg_pool import ConnectionPool


@dataclass
class Request:
    method: str
    path: str                       # without the query string
    query: dict[str, str]
    headers: dict[str, str]         # lower-case names
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)  # path parameters, from the router


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


Handler = Callable[[Request], Response]
Middleware = Callable[[Request, Handler], Response]


# ---------------------------------------------------------------------------- serialize


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, {"Content-Type": "application/json", **(headers or {})}, body)


# ---------------------------------------------------------------------------- route


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    protected: bool  # wrapped by the auth middleware


class Router:
    """Matches method + path; ``/users/{id:int}`` style templates become regexes."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, template: str, handler: Handler, protected: bool) -> None:
        regex = re.sub(r"\{(\w+):int\}", r"(?P<\1>[0-9]+)", template)
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex)
        self.routes.append(Route(method, re.compile(f"^{regex}$"), handler, protected))

    def match(self, request: Request) -> tuple[Route, dict[str, str]] | Response:
        allowed = []
        for route in self.routes:
            found = route.pattern.match(request.path)
            if found is None:
                continue
            if route.method == request.method:
                return route, found.groupdict()
            allowed.append(route.method)
        if allowed:  # the resource exists, the method does not
            return json_response(405, {"error": "method not allowed"},
                                 {"Allow": ", ".join(sorted(set(allowed)))})
        return json_response(404, {"error": "no such route"})


# ---------------------------------------------------------------------------- middleware


def _wrap(middleware: Middleware, next_: Handler) -> Handler:
    def handle(request: Request) -> Response:
        return middleware(request, next_)
    return handle


def chain(middlewares: Sequence[Middleware], handler: Handler) -> Handler:
    """Compose ``[m1, m2, ...]`` around ``handler`` so that m1 runs first (outermost):
    m1(before) -> m2(before) -> handler -> m2(after) -> m1(after)."""
    wrapped = handler
    for middleware in reversed(middlewares):  # wrap from the inside out
        wrapped = _wrap(middleware, wrapped)
    return wrapped


def request_id_middleware(request: Request, next_: Handler) -> Response:
    """Give every request an id (the caller's, or a new one) and echo it in the response:
    the thread that ties one request's log lines together across services."""
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    request.headers["x-request-id"] = request_id
    response = next_(request)
    response.headers["X-Request-Id"] = request_id
    return response


def auth_middleware(tokens: Collection[str]) -> Middleware:
    def check(request: Request, next_: Handler) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.lstrip(" ")  # auth-scheme 1*SP token68: RFC 9110 11.4, RFC 6750 2.1
        if scheme.lower() != "bearer" or token not in tokens:
            # Answer here: next_ is never called, so no handler and no query run.
            return json_response(401, {"error": "missing or invalid bearer token"},
                                 {"WWW-Authenticate": "Bearer"})
        return next_(request)
    return check


# ---------------------------------------------------------------------------- handlers


class UserHandlers:
    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def get_user(self, request: Request) -> Response:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT id, name, email FROM users WHERE id = %s",
                               (int(request.params["id"]),)).fetchone()
        if row is None:
            return json_response(404, {"error": "user not found"})
        user_id, name, email = row
        return json_response(200, {"id": user_id, "name": name, "email": email})


def health(request: Request) -> Response:
    return json_response(200, {"status": "ok"})


# ---------------------------------------------------------------------------- the pipeline


class App:
    """route -> [request_id, *middlewares, auth (protected routes)] -> handler."""

    def __init__(self, dsn: str, tokens: Collection[str],
                 middlewares: Sequence[Middleware] = ()) -> None:
        # A small pool: connections are opened once, not per request.
        self.pool = ConnectionPool(dsn, min_size=1, max_size=4,
                                   kwargs={"autocommit": True}, open=True)
        self.middlewares = list(middlewares)
        self.auth = auth_middleware(frozenset(tokens))
        users = UserHandlers(self.pool)
        self.router = Router()
        self.router.add("GET", "/health", health, protected=False)
        self.router.add("GET", "/users/{id:int}", users.get_user, protected=True)

    def __call__(self, request: Request) -> Response:
        matched = self.router.match(request)
        if isinstance(matched, Response):
            return matched  # 404 / 405 straight from the router: no middleware, no handler
        route, request.params = matched
        stack: list[Middleware] = [request_id_middleware, *self.middlewares]
        if route.protected:
            stack.append(self.auth)  # innermost: everything outside it still runs
        try:
            return chain(stack, route.handler)(request)
        except Exception:  # noqa: BLE001 - a bug answers 500 and never leaks a traceback
            return json_response(500, {"error": "internal error"})

    def close(self) -> None:
        self.pool.close()


# ---------------------------------------------------------------------------- accept, parse, send


def joined_headers(lines: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header names in lower case; a field sent on several lines is one value, its lines
    joined with ', ' in order (RFC 9110 5.3). Keeping one line of a field that is no list
    (Authorization: one credential, RFC 9110 11.6.2) would let the app and a proxy in front
    of it read different lines; joined, two credentials are no credential, and auth refuses
    them (RFC 6750 3.1: a repeated parameter is an invalid request)."""
    headers: dict[str, str] = {}
    for name, value in lines:
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, Content-Length framing
    server: _HttpServer

    def _serve(self) -> None:
        if not self._framing_ok():
            return
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(method=self.command, path=url.path, query=dict(parse_qsl(url.query)),
                          headers=joined_headers(self.headers.items()),
                          body=self.rfile.read(length) if length else b"")
        self._send(self.server.app(request))

    def _framing_ok(self) -> bool:
        """Parsing comes before everything: a Content-Length that is not one plain number
        (1*DIGIT, RFC 9112 6.3) leaves the body's end unknown. int() would take '+5' and '-5'
        (and rfile.read(-5) reads to EOF) or raise: answer 400 and close instead.
        http.server does not decode chunked bodies: any Transfer-Encoding is refused, 501
        (RFC 9112 6.1: a coding the server does not implement), or 400 beside a
        Content-Length (RFC 9112 6.3, 11.2: the classic smuggling pair) or when the list
        itself cannot frame a body (chunked not last, or twice: RFC 9112 6.1, 6.3), and the
        connection closed. Framing such a body by Content-Length (0 when absent) would take
        the chunks for the next request. Several Transfer-Encoding lines are one list
        (RFC 9110 5.3): 'gzip' then 'chunked' is 'gzip, chunked', so read them all."""
        lengths = self.headers.get_all("Content-Length") or []
        codings = [coding.strip().lower() for line in self.headers.get_all("Transfer-Encoding")
                   or [] for coding in line.split(",")]
        if codings:
            status, error = (
                (400, "Transfer-Encoding with Content-Length") if lengths else
                (400, "chunked must be the last transfer coding, and only once")
                if codings[-1] != "chunked" or codings.count("chunked") > 1 else
                (501, "Transfer-Encoding is not supported: send Content-Length"))
        elif len(lengths) <= 1 and all(v.strip().isascii() and v.strip().isdigit()
                                       for v in lengths):
            return True
        else:
            status, error = 400, "bad Content-Length"
        self.close_connection = True
        self._send(json_response(status, {"error": error}, {"Connection": "close"}))
        return False

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass  # keep the test output quiet


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        super().__init__(address, _HttpHandler)
        self.app = app


class Server:
    """The running server: ``port`` to connect to, ``close()`` to stop it."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        self.httpd = _HttpServer((host, port), app)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.app.close()


def start_server(dsn: str, tokens: Collection[str], middlewares: Sequence[Middleware] = (),
                 host: str = "127.0.0.1", port: int = 0) -> Server:
    """Serve the app on ``host:port`` (0 = any free port) in a background thread."""
    return Server(App(dsn, tokens, middlewares), host, port)
