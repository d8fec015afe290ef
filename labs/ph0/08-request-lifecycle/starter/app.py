"""The backend request lifecycle, one stage at a time.

    accept -> parse HTTP -> route -> middleware chain -> handler -> Postgres -> serialize -> send

Fill in the stages below and wire them together in start_server(). The Request and
Response classes and the two type aliases are the interface: keep them as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field


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


def chain(middlewares: Sequence[Middleware], handler: Handler) -> Handler:
    """Compose ``[m1, m2, ...]`` around ``handler`` so that m1 runs first (outermost)."""
    raise NotImplementedError("chain: wrap the handler with the middlewares, first = outermost")


def request_id_middleware(request: Request, next_: Handler) -> Response:
    """Keep the caller's X-Request-Id or make one; put it on request and response."""
    raise NotImplementedError("request_id_middleware")


def auth_middleware(tokens: Collection[str]) -> Middleware:
    """A middleware that answers 401 unless 'Authorization: Bearer <token in tokens>'."""
    raise NotImplementedError("auth_middleware")


def get_user(dsn: str, request: Request) -> Response:
    """GET /users/{id}: the row from Postgres as JSON, or 404."""
    raise NotImplementedError("get_user: SELECT id, name, email FROM users WHERE id = %s")


class Server:
    """The running server: ``port`` to connect to, ``close()`` to stop it."""

    port: int

    def close(self) -> None:
        raise NotImplementedError


def start_server(dsn: str, tokens: Collection[str], middlewares: Sequence[Middleware] = (),
                 host: str = "127.0.0.1", port: int = 0) -> Server:
    """Serve the app on ``host:port`` (0 = any free port) in a background thread.

    Routes: GET /health (public) and GET /users/{id} (digits; needs a bearer token).
    Pipeline: route (404 / 405) -> [request_id, *middlewares, auth] -> handler.
    """
    # TODO: http.server.ThreadingHTTPServer + a BaseHTTPRequestHandler that turns each
    #       request into a Request, runs the pipeline, and writes the Response back.
    raise NotImplementedError("start_server: accept, parse, route, run the middleware "
                              "chain and the handler, send the response")
