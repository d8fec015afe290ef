"""A small OAuth 2.0 authorization server: Authorization Code + PKCE (S256), Client
Credentials, Device Authorization (RFC 8628). A WSGI app; state in memory; an injected
clock."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import jwt

ACCESS_TTL = 300
CODE_TTL = 60
DEVICE_TTL = 600
DEVICE_INTERVAL = 5
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 7636 4.1: code_verifier = 43*128unreserved, unreserved = ALPHA / DIGIT / "-" / "." /
# "_" / "~" (ASCII only: a str.isalnum() or \w would let any Unicode letter in)
VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


@dataclass
class Code:
    client_id: str
    redirect_uri: str
    challenge: str
    user: str
    expires: float


@dataclass
class Device:
    client_id: str
    user_code: str
    expires: float
    interval: int = DEVICE_INTERVAL
    last_poll: float | None = None
    user: str | None = None
    used: bool = False


def single_valued(query: str) -> tuple[dict[str, str], set[str]]:
    """The parameters, and the names sent more than once: RFC 6749 3.1 and 3.2, "request
    and response parameters MUST NOT be included more than once" - which of two values
    counts is not for the server to guess (a proxy may read the first, a library the last)."""
    parsed = parse_qs(query, keep_blank_values=True, errors="strict")
    return {k: v[0] for k, v in parsed.items()}, {k for k, v in parsed.items() if len(v) > 1}


def login_challenge(user: str | None) -> tuple[str, str]:
    """RFC 9110 11.6.1: a 401 MUST carry WWW-Authenticate. RFC 6750 3: no error code when
    the request carried no credentials; invalid_token when it carried one that is no good
    (an X-User naming no one)."""
    if user is None:
        return ("WWW-Authenticate", 'Bearer realm="authserver"')
    return ("WWW-Authenticate", 'Bearer realm="authserver", error="invalid_token", '
            'error_description="the session names no user"')


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def make_app(clients: dict[str, dict[str, Any]], signing_key: bytes,
             clock: Callable[[], float] = time.time) -> Callable[..., Iterable[bytes]]:
    registry = {cid: dict(c) for cid, c in clients.items()}
    codes: dict[str, Code] = {}
    devices: dict[str, Device] = {}
    lock = threading.Lock()

    def token_for(sub: str, client_id: str) -> dict[str, Any]:
        now = int(clock())
        access = jwt.encode({"sub": sub, "client_id": client_id, "iat": now,
                             "exp": now + ACCESS_TTL, "jti": secrets.token_urlsafe(12)},
                            signing_key, algorithm="HS256")
        return {"access_token": access, "token_type": "Bearer", "expires_in": ACCESS_TTL}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")

        def reply(status: str, document: Any, *extra: tuple[str, str]) -> Iterable[bytes]:
            body = json.dumps(document).encode()
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body))),
                                    ("Cache-Control", "no-store"), *extra])
            return [body]

        def error(status: str, code: str, *extra: tuple[str, str]) -> Iterable[bytes]:
            return reply(status, {"error": code}, *extra)

        def redirect(uri: str, params: dict[str, str]) -> Iterable[bytes]:
            # RFC 6749 3.1.2: a registered URI's own query "MUST be retained when adding
            # additional query parameters"; urlencode escapes a state holding & = # or
            # spaces, so the client reads back exactly what it sent (4.1.2)
            parts = urlsplit(uri)
            query = "&".join(q for q in (parts.query, urlencode(params)) if q)
            start_response("302 Found", [("Location", urlunsplit(parts._replace(query=query))),
                                         ("Content-Length", "0")])
            return [b""]

        if (method, path) == ("GET", "/authorize"):
            try:
                q, repeated = single_valued(environ.get("QUERY_STRING", ""))
            except UnicodeDecodeError:
                return error("400 Bad Request", "invalid_request")
            client = registry.get(q.get("client_id", ""))
            uri = q.get("redirect_uri", "")
            # Never redirect to a URI that is not registered, exactly: an open redirector
            # would hand codes to an attacker. Two client_ids or redirect_uris are neither
            # valid (RFC 6749 4.1.2.1: no redirect).
            if (client is None or uri not in client.get("redirect_uris", [])
                    or repeated & {"client_id", "redirect_uri"}):
                return error("400 Bad Request", "invalid_request")
            state = {"state": q["state"]} if "state" in q and "state" not in repeated else {}
            if repeated:  # the client and its redirect_uri are valid: tell the client there
                return redirect(uri, {"error": "invalid_request", **state})
            user = environ.get("HTTP_X_USER")
            if not user:
                return error("401 Unauthorized", "login_required", login_challenge(user))
            if q.get("response_type") != "code":
                return redirect(uri, {"error": "unsupported_response_type", **state})
            if not q.get("code_challenge") or q.get("code_challenge_method") != "S256":
                return redirect(uri, {"error": "invalid_request", **state})
            code = secrets.token_urlsafe(32)
            with lock:
                codes[code] = Code(q["client_id"], uri, q["code_challenge"], user,
                                   clock() + CODE_TTL)
            return redirect(uri, {"code": code, **state})

        if method == "POST" and path in ("/token", "/device_authorization", "/device"):
            size = int(environ.get("CONTENT_LENGTH") or 0)
            try:  # a body or a %-escape that is not UTF-8: a malformed request, not a 500
                form, repeated = single_valued(environ["wsgi.input"].read(size).decode())
            except UnicodeDecodeError:
                return error("400 Bad Request", "invalid_request")
            if repeated:  # RFC 6749 3.2, 5.2: a parameter repeated is invalid_request
                return error("400 Bad Request", "invalid_request")
        else:
            return error("404 Not Found", "not_found")

        if path == "/device_authorization":
            client = registry.get(form.get("client_id", ""))
            if client is None or not client.get("device"):
                return error("400 Bad Request", "unauthorized_client")
            device_code = secrets.token_urlsafe(32)
            user_code = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
            with lock:
                devices[device_code] = Device(form["client_id"], user_code,
                                              clock() + DEVICE_TTL)
            return reply("200 OK", {"device_code": device_code, "user_code": user_code,
                                    "verification_uri": "/device", "expires_in": DEVICE_TTL,
                                    "interval": DEVICE_INTERVAL})

        if path == "/device":
            user = environ.get("HTTP_X_USER")
            if not user:
                return error("401 Unauthorized", "login_required", login_challenge(user))
            with lock:
                found = [d for d in devices.values()
                         if hmac.compare_digest(d.user_code, form.get("user_code", ""))]
                # a user_code that names no live device (mistyped, expired, absent) is the
                # user's mistake: 400, and nothing is approved
                if not found or found[0].expires <= clock():
                    return error("400 Bad Request", "invalid_request")
                found[0].user = user
            return reply("200 OK", {"approved": True})

        grant = form.get("grant_type")
        if not grant:  # RFC 6749 5.2: a required parameter is missing
            return error("400 Bad Request", "invalid_request")
        if grant == "authorization_code":
            with lock:
                code = codes.pop(form.get("code", ""), None)  # single use, whatever happens
            verifier = form.get("code_verifier", "")
            if (code is None or code.expires <= clock()
                    or code.client_id != form.get("client_id")
                    or code.redirect_uri != form.get("redirect_uri")
                    or not VERIFIER.fullmatch(verifier)
                    or not hmac.compare_digest(s256(verifier), code.challenge)):
                return error("400 Bad Request", "invalid_grant")
            return reply("200 OK", token_for(code.user, code.client_id))

        if grant == "client_credentials":
            # RFC 6749 2.3.1 and 5.2: credentials that fail to authenticate the client, a
            # header that is no Basic at all, bad base64 or no colon included, are 401
            # invalid_client with a WWW-Authenticate challenge - never a 500, never a 400
            scheme, _, encoded = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            try:
                cid, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except ValueError:
                cid, secret = "", ""
            client = registry.get(cid) if scheme.lower() == "basic" else None
            if (client is None or "secret" not in client
                    or not hmac.compare_digest(client["secret"].encode(), secret.encode())):
                return error("401 Unauthorized", "invalid_client",
                             ("WWW-Authenticate", 'Basic realm="token"'))
            return reply("200 OK", token_for(cid, cid))

        if grant == DEVICE_GRANT:
            now = clock()
            with lock:
                device = devices.get(form.get("device_code", ""))
                if device is None or device.used or device.client_id != form.get("client_id"):
                    return error("400 Bad Request", "invalid_grant")
                if device.expires <= now:
                    return error("400 Bad Request", "expired_token")
                too_soon = device.last_poll is not None and now - device.last_poll < device.interval
                device.last_poll = now
                if too_soon:
                    device.interval += 5  # RFC 8628 3.5: for this and every later request
                    return error("400 Bad Request", "slow_down")
                if device.user is None:
                    return error("400 Bad Request", "authorization_pending")
                device.used = True
                user = device.user
            return reply("200 OK", token_for(user, device.client_id))

        # RFC 6749 5.2: a grant type this server does not support (password, refresh_token,
        # a typo) is refused as such - it is never taken for one of the grants above
        return error("400 Bad Request", "unsupported_grant_type")

    return app
