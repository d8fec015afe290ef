"""An API gateway: one entry point that routes by path, checks the JWT before anything is
forwarded, rate-limits per user, aggregates a dashboard for the frontend (BFF) and sends a
weighted share of one route to a canary."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jwt

HOP_BY_HOP = {"connection", "keep-alive", "te", "trailers", "transfer-encoding", "upgrade",
              "host", "content-length", "authorization", "x-user-id"}


def named_by_connection(values: Iterable[str]) -> set[str]:
    """The fields a message's Connection lists (RFC 9110 7.6.1: 'Connection: close,
    X-Hop' makes X-Hop a field for this hop only): a proxy drops them with Connection
    itself, on the request and on the response. Tokens are case-insensitive."""
    return {name.strip().lower() for value in values for name in value.split(",")}


def framing_error(environ: dict[str, Any]) -> str | None:
    """The status that refuses a request whose body cannot be framed safely, or None.
    RFC 9112 6.1/6.3: Transfer-Encoding with Content-Length is how requests are smuggled
    (a server behind that frames by the other header reads the rest as a new request):
    refuse it, as nginx does (400); a coding list whose last coding is not chunked has no
    length (400); a coding the gateway does not decode, such as 'gzip, chunked', is 501
    (nginx too): unchunked, the body would go on as gzip bytes nobody said were gzip."""
    value = environ.get("HTTP_TRANSFER_ENCODING")
    if value is None:
        return None
    codings = [c.strip().lower() for c in value.split(",")]
    if environ.get("CONTENT_LENGTH") or codings[-1] != "chunked":
        return "400 Bad Request"
    return None if codings == ["chunked"] else "501 Not Implemented"


def request_target(environ: dict[str, Any]) -> str:
    """The path and query to forward: as the client sent them. RFC 9110 7.7: a proxy MUST
    NOT modify the absolute-path and query of the target it forwards. WSGI's PATH_INFO is
    percent-decoded ('/orders/a%2Fb' reads '/orders/a/b', another resource; '%20' a space
    no request line may hold): the target as sent is RAW_URI (gunicorn's name, REQUEST_URI
    in uWSGI); without either, PATH_INFO escaped again (%2F is then lost)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw and raw.startswith("/"):
        return str(raw)
    path = quote((environ.get("PATH_INFO") or "/").encode("latin-1"), safe="/;=:@!$&'()*+,~")
    query = environ.get("QUERY_STRING")
    return path + (f"?{query}" if query else "")


def read_body(environ: dict[str, Any]) -> bytes:
    """The request's body, however it was framed (framing_error said it can be). wsgiref
    hands a chunked body over as it came (no CONTENT_LENGTH): decode it here, or it is
    forwarded empty."""
    stream = environ["wsgi.input"]
    if "HTTP_TRANSFER_ENCODING" in environ:
        return read_chunked(stream)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return stream.read(length) if length else b""


def read_chunked(stream: Any) -> bytes:
    """RFC 9112 7.1: chunks of 'size-in-hex[;extension] CRLF data CRLF', a last chunk of
    size 0, trailer fields, an empty line. Unknown chunk extensions are ignored (7.1.1);
    trailers are not forwarded (the body goes on with a Content-Length, as nginx does)."""
    body = bytearray()
    while (size := int(stream.readline(1024).split(b";")[0], 16)) > 0:
        body += stream.read(size)
        stream.readline()                                  # the CRLF after the data
    while stream.readline(65537) not in (b"\r\n", b"\n", b""):  # trailer fields, if any
        pass
    return bytes(body)


class ApiGateway:
    def __init__(self, routes: dict[str, str], *, jwt_secret: str, rate_limit: int = 5,
                 window: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 canary: dict[str, Any] | None = None) -> None:
        self.routes = {p.rstrip("/"): url for p, url in routes.items()}
        self.jwt_secret = jwt_secret
        self.rate_limit = rate_limit
        self.window = window
        self.clock = clock
        self.canary = canary
        self._windows: dict[str, tuple[float, int]] = {}   # user -> (window start, count)
        self._lock = threading.Lock()

    # -- the checks, in order: who are you, how often, where to --------------------------

    def authenticate(self, environ: dict[str, Any]) -> str | None:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"],
                                options={"require": ["exp", "sub"]})
        except jwt.PyJWTError:
            return None
        return str(claims["sub"])

    def allow(self, user: str) -> float | None:
        """None if allowed, else the seconds until the user's window resets."""
        now = self.clock()
        with self._lock:
            start, count = self._windows.get(user, (now, 0))
            if now - start >= self.window:
                start, count = now, 0
            if count >= self.rate_limit:
                return self.window - (now - start)
            self._windows[user] = (start, count + 1)
            return None

    def upstream_for(self, path: str) -> str | None:
        best = max((p for p in self.routes if path == p or path.startswith(p + "/")),
                   key=len, default=None)
        if best is None:
            return None
        canary = self.canary
        if canary and best == canary["prefix"].rstrip("/") and \
                random.random() * 100 < canary["percent"]:
            return str(canary["url"])
        return self.routes[best]

    # -- forwarding -----------------------------------------------------------------------

    @staticmethod
    def forward(base: str, method: str, target: str, headers: dict[str, str],
                body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        url = urlsplit(base)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            conn.request(method, target, body=body, headers=headers)
            reply = conn.getresponse()
            return reply.status, reply.reason, reply.getheaders(), reply.read()
        finally:
            conn.close()

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        # HEAD: the headers a GET would get, Content-Length included, and no content
        # (RFC 9110 9.3.2); wsgiref sends whatever body the app returns.
        head = environ["REQUEST_METHOD"] == "HEAD"

        def answer(status: str, doc: Any, extra: list[tuple[str, str]] | None = None
                   ) -> list[bytes]:
            body = json.dumps(doc).encode()
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body))), *(extra or [])])
            return [] if head else [body]

        user = self.authenticate(environ)
        if user is None:
            return answer("401 Unauthorized", {"error": "a valid bearer token is required"},
                          [("WWW-Authenticate", 'Bearer realm="api"')])
        wait = self.allow(user)
        if wait is not None:
            return answer("429 Too Many Requests", {"error": "rate limit exceeded"},
                          [("Retry-After", str(max(1, int(wait + 0.999))))])
        path = environ.get("PATH_INFO") or "/"
        dropped = HOP_BY_HOP | named_by_connection([environ.get("HTTP_CONNECTION", "")])
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_") and k[5:].replace("_", "-").lower() not in dropped}
        # identity asserted by the gateway only; a sub is any string, a header value ASCII:
        # percent-encoded (RFC 3986), '%' and spaces too, one value per sub
        headers["X-User-Id"] = quote(user, safe="")
        if path == "/bff/dashboard":
            return self.dashboard(user, headers, answer)
        upstream = self.upstream_for(path)
        if upstream is None:
            return answer("404 Not Found", {"error": f"no route for {path}"})
        refused = framing_error(environ)
        if refused:
            return answer(refused, {"error": "a body framed by Transfer-Encoding: chunked "
                                             "alone, or by Content-Length alone"})
        body = read_body(environ)
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        try:
            status, reason, out, data = self.forward(
                upstream, environ["REQUEST_METHOD"], request_target(environ), headers, body)
        except OSError as exc:
            return answer("502 Bad Gateway", {"error": f"upstream unreachable: {exc}"})
        # http.client reads no body for HEAD: the service's Content-Length is the one to keep
        length = next((v for k, v in out if k.lower() == "content-length"), None) \
            if head else None
        dropped = HOP_BY_HOP | named_by_connection(v for k, v in out if k.lower() == "connection")
        out = [(k, v) for k, v in out if k.lower() not in dropped]
        start_response(f"{status} {reason}", [*out, ("Content-Length", length or str(len(data)))])
        return [data]

    def dashboard(self, user: str, headers: dict[str, str], answer: Any) -> list[bytes]:
        """Backend for frontend: one call from the app, two upstream calls, one document.
        The sub goes into those URLs escaped: a sub is any StringOrURI (RFC 7519 4.1.2), and
        one holding '/', '&' or '+' pasted as it is names another resource or user."""
        parts = {}
        for key, route, path in (
                ("user", "/users", f"/users/{quote(user, safe='')}"),
                ("orders", "/orders", f"/orders?{urlencode({'user': user})}")):
            base = self.routes.get(route)
            if base is None:
                return answer("502 Bad Gateway", {"error": f"no upstream for {path}"})
            status, _, _, data = self.forward(base, "GET", path, headers, b"")
            if status != 200:
                return answer("502 Bad Gateway", {"error": f"{path} answered {status}"})
            parts[key] = json.loads(data)
        return answer("200 OK", parts)
