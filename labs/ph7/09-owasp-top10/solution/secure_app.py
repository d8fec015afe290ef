"""ph7.9 - the OWASP Top 10 classics, fixed in one small app.

* SQL injection (A03): values travel as query PARAMETERS, never inside the SQL text.
* Broken access control (A01): every request is authorised against the caller's identity
  (who owns this document?), not only authenticated; identifiers from the client never
  choose whose data is read.
* Command injection (A03): no shell; the program and its arguments as a list, the file name
  validated against an allowlist and placed after "--" so it can never be an option.
* SSRF (A10): outgoing fetches only to allowlisted origins (scheme, host, port compared
  exactly after parsing; credentials in the URL refused), redirects followed by hand and
  each hop validated again, so a partner cannot bounce the server to 127.0.0.1 or to the
  cloud metadata address.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import psycopg
from psycopg.rows import dict_row

FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_REDIRECTS = 3


class Refused(Exception):
    pass


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused(f"scheme {parts.scheme!r} not allowed")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise Refused("credentials in the URL are not allowed")
    if not parts.hostname:
        raise Refused("no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # ':99999' or ':abc': urlsplit() only checks the port when asked
        raise Refused(f"no valid port in {parts.netloc!r}") from None
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


def make_app(pg_dsn: str, reports_dir: str, allowed_origins: list[str]) -> Any:
    allowed = {origin_of(o) for o in allowed_origins}

    def reply(start_response: Any, status: str, body: Any) -> list[bytes]:
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(payload)))])
        return [payload]

    def caller(conn: Any, environ: dict[str, Any]) -> int | None:
        token = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
        row = conn.execute("SELECT id FROM users WHERE token = %s", (token,)).fetchone()
        return row["id"] if row else None

    def products(environ: dict[str, Any]) -> tuple[str, Any]:
        name = parse_qs(environ.get("QUERY_STRING", "")).get("name", [""])[0]
        with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
            rows = conn.execute("SELECT id, name FROM products WHERE name = %s ORDER BY id",
                                (name,)).fetchall()
        return "200 OK", rows

    def documents(environ: dict[str, Any], method: str, doc_id: str | None) -> tuple[str, Any]:
        with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
            user = caller(conn, environ)
            if user is None:
                return "401 Unauthorized", {"error": "who are you?"}
            if doc_id is None:  # the caller's own documents, whatever the query says
                rows = conn.execute("SELECT id, title FROM documents WHERE owner_id = %s "
                                    "ORDER BY id", (user,)).fetchall()
                return "200 OK", rows
            if not doc_id.isdigit():
                return "404 Not Found", {"error": "no such document"}
            # the owner is part of the lookup: another user's document does not exist here
            row = conn.execute("SELECT id, title, body FROM documents WHERE id = %s AND "
                               "owner_id = %s", (int(doc_id), user)).fetchone()
            if row is None:
                return "404 Not Found", {"error": "no such document"}
            if method == "PUT":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                try:
                    body = json.loads(environ["wsgi.input"].read(length))["body"]
                except (ValueError, KeyError, TypeError):
                    return "400 Bad Request", {"error": "send {\"body\": ...}"}
                conn.execute("UPDATE documents SET body = %s WHERE id = %s AND owner_id = %s",
                             (str(body), row["id"], user))
                row["body"] = str(body)
            return "200 OK", row

    def line_count(environ: dict[str, Any]) -> tuple[str, Any]:
        name = parse_qs(environ.get("QUERY_STRING", "")).get("file", [""])[0]
        if not FILE_NAME.fullmatch(name) or ".." in name:
            return "400 Bad Request", {"error": "file names are letters, digits, _ . -"}
        done = subprocess.run(["wc", "-l", "--", name], cwd=reports_dir, capture_output=True,
                              text=True, timeout=5, check=False)
        if done.returncode != 0:
            return "404 Not Found", {"error": "no such report"}
        return "200 OK", {"file": name, "lines": int(done.stdout.split()[0])}

    def fetch(environ: dict[str, Any]) -> tuple[str, Any]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        try:
            url = str(json.loads(environ["wsgi.input"].read(length))["url"])
        except (ValueError, KeyError, TypeError):
            return "400 Bad Request", {"error": "send {\"url\": ...}"}
        try:
            for _ in range(MAX_REDIRECTS + 1):
                if origin_of(url) not in allowed:
                    raise Refused(f"{origin_of(url)} is not an allowed origin")
                parts = urlsplit(url)
                conn_class = (http.client.HTTPSConnection if parts.scheme == "https"
                              else http.client.HTTPConnection)
                conn = conn_class(parts.hostname, parts.port, timeout=5)
                try:
                    conn.request("GET", (parts.path or "/") + (f"?{parts.query}"
                                                               if parts.query else ""))
                    answer = conn.getresponse()
                    data = answer.read(65536)
                finally:
                    conn.close()
                if answer.status in (301, 302, 303, 307, 308) and answer.getheader("Location"):
                    url = urljoin(url, answer.getheader("Location"))  # validated next round
                    continue
                return "200 OK", {"status": answer.status,
                                  "body": data.decode("utf-8", "replace")}
            raise Refused("too many redirects")
        except Refused as exc:
            return "400 Bad Request", {"error": f"refused: {exc}"}
        except (OSError, http.client.HTTPException):
            return "502 Bad Gateway", {"error": "the upstream failed"}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if method == "GET" and path == "/products":
            status, body = products(environ)
        elif path == "/documents" and method == "GET":
            status, body = documents(environ, method, None)
        elif path.startswith("/documents/") and method in ("GET", "PUT"):
            status, body = documents(environ, method, path.removeprefix("/documents/"))
        elif method == "GET" and path == "/reports/lines":
            status, body = line_count(environ)
        elif method == "POST" and path == "/fetch":
            status, body = fetch(environ)
        else:
            status, body = "404 Not Found", {"error": "not found"}
        return reply(start_response, status, body)

    return app
