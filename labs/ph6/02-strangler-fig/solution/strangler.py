"""A strangler-fig gateway: paths move one prefix at a time from the legacy system to the new
service, switched at run time; everything else still goes to the legacy system."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


def as_text(path: str) -> str:
    """PATH_INFO holds the path's bytes, one Latin-1 character each (PEP 3333); the text the
    client meant is those bytes as UTF-8 (RFC 3986 2.5), so a prefix such as /café matches.
    A path that is no UTF-8 stays as it is: no prefix written as text can name it."""
    raw = path.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return path


class Gateway:
    def __init__(self, legacy_url: str, new_url: str) -> None:
        self.upstreams = {"legacy": legacy_url, "new": new_url}
        self._routes: dict[str, str] = {}
        self._lock = threading.Lock()

    # What an HTTP path may carry as it is (RFC 3986 pchar and "/"); anything else is
    # percent-encoded again.
    PATH_SAFE = "/:@!$&'()*+,;=-._~"

    def route_to_new(self, prefix: str) -> None:
        with self._lock:
            self._routes[prefix.rstrip("/")] = "new"

    def route_to_legacy(self, prefix: str) -> None:
        with self._lock:
            self._routes[prefix.rstrip("/")] = "legacy"

    def target_for(self, path: str) -> str:
        with self._lock:
            routes = dict(self._routes)
        best, target = -1, "legacy"
        for prefix, where in routes.items():
            if (path == prefix or path.startswith(prefix + "/")) and len(prefix) > best:
                best, target = len(prefix), where
        return target

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        # PATH_INFO is the DECODED path (%20 is a space, %C3%A9 two latin-1 characters: WSGI
        # hands bytes over as latin-1): route on it, but forward the path as it was sent.
        # Encoding PATH_INFO again gives back every byte but one: %2F (a '/' inside a
        # segment) comes back as a separator. The server's raw request-target (RAW_URI in
        # gunicorn, REQUEST_URI in uWSGI) still holds it; without one, encode again.
        path = environ.get("PATH_INFO") or "/"
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
        if raw.startswith("/"):
            wire_path = raw.partition("?")[0]
        else:
            wire_path = quote(path.encode("latin-1"), safe=self.PATH_SAFE)
        query = environ.get("QUERY_STRING") or ""
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {key[5:].replace("_", "-").title(): value
                   for key, value in environ.items() if key.startswith("HTTP_")}
        headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        upstream = urlsplit(self.upstreams[self.target_for(as_text(path))])
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
        try:
            conn.request(environ["REQUEST_METHOD"], wire_path + ("?" + query if query else ""),
                         body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException) as exc:
            # the upstream refused, hung up (OSError) or did not answer in HTTP
            # (HTTPException: BadStatusLine...): its failure, not ours - 502, never a 500
            start_response("502 Bad Gateway", [("Content-Type", "text/plain")])
            return [f"upstream failed: {type(exc).__name__}: {exc}".encode()]
        finally:
            conn.close()
        out = [(k, v) for k, v in reply.getheaders() if k.lower() not in HOP_BY_HOP]
        if environ["REQUEST_METHOD"] == "HEAD" or reply.status == 304:
            # No content comes with these, whatever Content-Length says: it is the length
            # the GET (the 200) would have had (RFC 9110 9.3.2, 8.6). Relay the upstream's,
            # never the 0 bytes read here.
            declared = reply.getheader("Content-Length")
            if declared is not None:
                out.append(("Content-Length", declared))
        else:
            out.append(("Content-Length", str(len(data))))
        start_response(f"{reply.status} {reply.reason}", out)
        return [data]
