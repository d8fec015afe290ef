"""ph1.7 WRONG (crashes_on_bad_input): code-first, hand-parsed input, the spec only as docs.

It answers every request the README shows correctly; but int("abc"), a limit of "x" or an
id beyond bigint raise, and the WSGI server turns that into a 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

USER = re.compile(r"^/users/([^/]+)$")


def make_app(dsn: str) -> WSGIApp:
    def connect() -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    def problem(status: int, detail: str, path: str) -> tuple[int, Any, str]:
        return status, {"type": "about:blank", "title": HTTPStatus(status).phrase,
                        "status": status, "detail": detail, "instance": path}, \
            "application/problem+json"

    def handle(environ: dict[str, Any]) -> tuple[int, Any, str]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == "/users" and method == "GET":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            limit = int(query.get("limit", ["20"])[0])  # WRONG: "x" raises ValueError
            offset = int(query.get("offset", ["0"])[0])
            with connect() as conn:
                rows = conn.execute("SELECT id, name, email FROM users ORDER BY id "
                                    "LIMIT %s OFFSET %s", (limit + 1, offset)).fetchall()
            following = offset + limit if len(rows) > limit else None
            return 200, {"data": rows[:limit], "next_offset": following}, "application/json"
        if path == "/users" and method == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            try:
                body = json.loads(environ["wsgi.input"].read(length))
            except ValueError:
                return problem(400, "the body is not valid JSON", path)
            if not isinstance(body, dict) or "email" not in body or "name" not in body:
                return problem(422, "name and email are required", path)
            try:
                with connect() as conn:
                    row = conn.execute("INSERT INTO users (name, email) VALUES (%s, %s) "
                                       "RETURNING id, name, email",
                                       (body["name"], body["email"])).fetchone()
            except psycopg.errors.UniqueViolation:
                return problem(409, "a user with this email exists", path)
            return 201, row, "application/json"
        match = USER.match(path)
        if match is None:
            return problem(404, "no such resource", path)
        user_id = int(match.group(1))  # WRONG: "abc" raises; 10**20 overflows bigint
        with connect() as conn:
            if method == "GET":
                row = conn.execute("SELECT id, name, email FROM users WHERE id = %s",
                                   (user_id,)).fetchone()
                if row is None:
                    return problem(404, f"there is no user {user_id}", path)
                return 200, row, "application/json"
            if conn.execute("DELETE FROM users WHERE id = %s", (user_id,)).rowcount == 0:
                return problem(404, f"there is no user {user_id}", path)
            return 204, None, ""

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        status, document, media_type = handle(environ)
        headers = []
        if status == 201:
            headers.append(("Location", f"/users/{document['id']}"))
        reason = f"{status} {HTTPStatus(status).phrase}"
        if document is None:
            start_response(reason, headers)
            return []
        body = json.dumps(document).encode()
        start_response(reason, [("Content-Type", media_type),
                                ("Content-Length", str(len(body))), *headers])
        return [body]

    return app
