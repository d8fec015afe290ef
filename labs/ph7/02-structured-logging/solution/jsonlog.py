"""ph7.2 - structured logging: one JSON object per line, mandatory fields, levels, trace
correlation from the W3C traceparent header, and redaction of secrets.

Every line is built as a dict and written with json.dumps, so nothing a client sends (a
quote, a newline, a fake JSON object in a username) can break a line or forge one; a
traceback is a string field of its line, not lines of its own. Secrets are removed twice:
the app never puts a password or a credential header in a field, and a redaction pass
over every field scrubs anything that looks like one (a token in a query string).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import traceback
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

LEVELS = {"DEBUG": 10, "INFO": 20, "WARN": 30, "ERROR": 40, "FATAL": 50}
# A key names a secret when, in any case and with "-" read as "_", it is one of these words
# or ends in "_" and one of them: Authorization, Set-Cookie, X-Api-Key, client_secret,
# refresh_token, db_password.
SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey",
                "authorization", "cookie")
PATTERNS = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 [REDACTED]"),
    (re.compile(r"(?i)\b(password|passwd|secret|token|api_key|apikey|access_token)=[^&\s\"]*"),
     r"\1=[REDACTED]"),
]
# version-traceid-parentid-flags (W3C trace-context 3.2). Version 00 is exactly these four
# fields; a higher version is read as far as version 00's fields go and may carry more after
# a dash (3.2.4, "Versioning of traceparent"), so a caller on a newer version still joins the
# trace; version ff is invalid.
TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?$")


def sensitive(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return any(name == word or name.endswith("_" + word) for word in SECRET_WORDS)


def redact(value: Any, key: str = "") -> Any:
    """Every field, at any depth (dicts in lists in dicts...): a secret's key hides its
    value, whatever it holds; strings lose what looks like a credential."""
    if sensitive(key):
        return "[REDACTED]"
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) == 2 and isinstance(value[0], str):
            # A header as WSGI and ASGI give them, a (name, value) pair: its name names its
            # value as a key does (so do Sentry's scrubbers for headers sent as pairs).
            return [value[0], redact(value[1], value[0])]
        return [redact(v) for v in value]
    if isinstance(value, str):
        for pattern, replacement in PATTERNS:
            value = pattern.sub(replacement, value)
    return value


class JsonLogger:
    def __init__(self, path: str, service: str, level: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the app
        self.service = service
        self.threshold = LEVELS[level]
        self.lock = threading.Lock()

    def log(self, level: str, message: str, trace: tuple[str, str], **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        record = {
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "service": self.service,
            "trace_id": trace[0],
            "span_id": trace[1],
            "message": message,
            **redact(fields),
        }
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self.lock:  # one write per line: threads never interleave within a line
            self.file.write(line + "\n")
            self.file.flush()


def trace_of(environ: dict[str, Any]) -> tuple[str, str]:
    """The caller's trace id (traceparent) or a new one; a new span id for this request."""
    match = TRACEPARENT.match(environ.get("HTTP_TRACEPARENT", "").strip())
    version, trace_id, extra = match.group(1, 2, 4) if match else ("ff", "", None)
    if version == "ff" or (version == "00" and extra) or trace_id == "0" * 32:
        trace_id = secrets.token_hex(16)   # no traceparent, or an invalid one: a new trace
    return trace_id, secrets.token_hex(8)


def safe_path(environ: dict[str, Any]) -> str:
    path = environ.get("PATH_INFO", "/")
    query = environ.get("QUERY_STRING", "")
    if not query:
        return path
    pairs = [(k, "[REDACTED]" if sensitive(k) else v)
             for k, v in parse_qsl(query, keep_blank_values=True)]
    return f"{path}?{urlencode(pairs)}"


def make_app(log_path: str, service: str, level: str = "INFO") -> Any:
    logger = JsonLogger(log_path, service, level)

    def handle(environ: dict[str, Any], trace: tuple[str, str]) -> tuple[int, Any]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if method == "POST" and path == "/login":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            try:
                body = json.loads(environ["wsgi.input"].read(length) or b"{}")
                username, password = str(body["username"]), str(body["password"])
            except (ValueError, KeyError, TypeError):
                logger.log("WARN", "login request unreadable", trace)
                return 400, {"error": "username and password required"}
            if password == "correct horse battery staple":
                logger.log("INFO", "login succeeded", trace, user=username)
                return 200, {"user": username}
            logger.log("WARN", "login failed", trace, user=username)
            return 401, {"error": "bad credentials"}
        if method == "POST" and path == "/client-events":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            try:
                event = json.loads(environ["wsgi.input"].read(length) or b"{}")
                name, context = event["event"], event.get("context", {})
                if not isinstance(name, str) or not isinstance(context, dict):
                    raise TypeError
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.log("WARN", "client event unreadable", trace)
                return 400, {"error": "event (a string) and context (an object) required"}
            logger.log("INFO", "client event", trace, event=name, context=context)
            return 202, {"accepted": True}
        if method == "GET" and path == "/debug-me":
            logger.log("DEBUG", "cache lookup", trace, cache="users", hit=False)
            return 200, {"ok": True}
        if method == "GET" and path == "/boom":
            raise RuntimeError("the widget store is on fire")
        return 404, {"error": "not found"}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trace = trace_of(environ)
        started = time.perf_counter()
        try:
            status, body = handle(environ, trace)
        except Exception as exc:  # noqa: BLE001 - logged, answered 500
            logger.log("ERROR", "unhandled exception", trace, error=type(exc).__name__,
                       exception="".join(traceback.format_exception(exc)))
            status, body = 500, {"error": "internal error"}
        level = "ERROR" if status >= 500 else "WARN" if status >= 400 else "INFO"
        logger.log(level, "request", trace, method=environ["REQUEST_METHOD"],
                   path=safe_path(environ), status=status,
                   duration_ms=round((time.perf_counter() - started) * 1000, 3))
        payload = json.dumps(body).encode()
        start_response(f"{status} {'OK' if status < 400 else 'Error'}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(payload)))])
        return [payload]

    return app
