"""ph7.9 - a small app with four of the OWASP Top 10 in it: SQL injection, broken access
control, command injection and SSRF. It works for honest clients; fix it so that attackers
get nothing. See README.md.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from typing import Any
from urllib.parse import parse_qs

import psycopg
from psycopg.rows import dict_row


def make_app(pg_dsn: str, reports_dir: str, allowed_origins: list[str]) -> Any:
    def reply(start_response: Any, status: str, body: Any) -> list[bytes]:
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(payload)))])
        return [payload]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        with psycopg.connect(pg_dsn, row_factory=dict_row, autocommit=True) as conn:
            token = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
            user = conn.execute("SELECT id FROM users WHERE token = %s", (token,)).fetchone()
            if method == "GET" and path == "/products":
                name = query.get("name", [""])[0]
                rows = conn.execute(  # type: ignore[call-overload]
                    f"SELECT id, name FROM products WHERE name = '{name}' ORDER BY id").fetchall()
                return reply(start_response, "200 OK", rows)
            if path.startswith("/documents"):
                if user is None:
                    return reply(start_response, "401 Unauthorized", {"error": "who are you?"})
                if path == "/documents":
                    owner = query.get("owner_id", [str(user["id"])])[0]
                    rows = conn.execute("SELECT id, title FROM documents WHERE owner_id = %s "
                                        "ORDER BY id", (int(owner),)).fetchall()
                    return reply(start_response, "200 OK", rows)
                doc_id = int(path.removeprefix("/documents/"))
                if method == "PUT":
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                    body = json.loads(environ["wsgi.input"].read(length))["body"]
                    conn.execute("UPDATE documents SET body = %s WHERE id = %s", (body, doc_id))
                row = conn.execute("SELECT id, title, body FROM documents WHERE id = %s",
                                   (doc_id,)).fetchone()
                if row is None:
                    return reply(start_response, "404 Not Found", {"error": "no such document"})
                return reply(start_response, "200 OK", row)
        if method == "GET" and path == "/reports/lines":
            name = query.get("file", [""])[0]
            out = subprocess.run(f"wc -l {name}", shell=True, cwd=reports_dir,
                                 capture_output=True, text=True, check=False).stdout
            return reply(start_response, "200 OK", {"file": name, "lines": int(out.split()[0])})
        if method == "POST" and path == "/fetch":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            url = json.loads(environ["wsgi.input"].read(length))["url"]
            with urllib.request.urlopen(url, timeout=5) as answer:
                return reply(start_response, "200 OK", {"status": answer.status,
                                                        "body": answer.read().decode()})
        return reply(start_response, "404 Not Found", {"error": "not found"})

    return app
