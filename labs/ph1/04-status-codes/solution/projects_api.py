"""ph1.4 - every outcome of a small /projects API mapped to the status code that names it.

The checks run in a fixed order, each with its own code, so a client can act on the code
alone: authenticate (401), rate limit (429), authorise (403), parse (400), validate (422),
then the operation itself (201/204/200/304, 404, 409). A database that cannot be reached
is 503 - the request was fine, the service is not - never a 500.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

PROJECT_PATH = re.compile(r"^/projects/(\d{1,18})$")
MAX_NAME = 100


class Outcome(Exception):
    """A finished request: a status, an optional JSON body and extra headers."""

    def __init__(self, status: int, body: Any = None, headers: list[tuple[str, str]] | None = None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or []


def error(status: int, detail: str, headers: list[tuple[str, str]] | None = None) -> Outcome:
    return Outcome(status, {"error": HTTPStatus(status).phrase, "detail": detail}, headers)


def none_match(header: str | None, tag: str) -> bool:
    """Whether an If-None-Match header names the current tag (RFC 9110 13.1.2): it is "*"
    (any current representation) or a list of entity-tags, compared weakly - W/"x" matches
    "x" (caches and proxies weaken tags, nginx does when it compresses). A comma may sit
    inside a tag, so the tags are taken whole, not split on commas."""
    if header is None:
        return False
    return header.strip() == "*" or tag in re.findall(r'(?:W/)?("[^"]*")', header)


def if_match(header: str | None, tag: str) -> bool:
    """Whether an If-Match header holds (RFC 9110 13.1.1): absent, "*" (the resource
    exists), or a list naming the current tag, compared strongly - a weak W/"x" never
    matches, since "the same bytes" is what a client changing the resource relies on."""
    if header is None:
        return True
    return header.strip() == "*" or ("", tag) in re.findall(r'(W/)?("[^"]*")', header)


def etag_of(row: dict[str, Any]) -> str:
    return '"' + hashlib.sha256(json.dumps(row).encode()).hexdigest()[:16] + '"'


def make_app(dsn: str, *, clock: Callable[[], float] = time.time, rate_limit: int = 100,
             window_seconds: int = 60) -> WSGIApp:
    def connect() -> psycopg.Connection[dict[str, Any]]:
        # A fresh connection per request: when the database comes back after an outage, the
        # next request simply works again.
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row, connect_timeout=5)

    def authenticate(conn: psycopg.Connection[dict[str, Any]],
                     environ: dict[str, Any]) -> tuple[str, str]:
        # "<scheme> <credentials>"; the scheme name is case-insensitive (RFC 9110 11.1), and
        # any scheme but Bearer is no token of ours (RFC 6750 2.1).
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        row = None
        if scheme.lower() == "bearer" and token:
            row = conn.execute("SELECT token, role FROM api_tokens WHERE token = %s",
                               (token.strip(),)).fetchone()
        if row is None:
            raise error(401, "send Authorization: Bearer <token>",
                        [("WWW-Authenticate", 'Bearer realm="projects"')])
        return row["token"], row["role"]

    def throttle(conn: psycopg.Connection[dict[str, Any]], token: str) -> None:
        """Fixed windows of window_seconds, aligned to multiples of it, counted in Postgres
        so that every instance shares the same budget."""
        now = clock()
        start = math.floor(now / window_seconds) * window_seconds
        row = conn.execute(
            """INSERT INTO request_counts (token, window_start, count) VALUES (%s, %s, 1)
               ON CONFLICT (token, window_start)
               DO UPDATE SET count = request_counts.count + 1 RETURNING count""",
            (token, start)).fetchone()
        assert row is not None
        if row["count"] > rate_limit:
            retry = max(1, math.ceil(start + window_seconds - now))
            raise error(429, f"more than {rate_limit} requests in {window_seconds} s",
                        [("Retry-After", str(retry))])

    def read_project(environ: dict[str, Any]) -> str:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        try:
            data = json.loads(environ["wsgi.input"].read(length))
        except ValueError:
            raise error(400, "the body is not valid JSON") from None
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise error(422, f"name must be a non-empty string of at most {MAX_NAME} characters")
        if "\x00" in name:  # valid JSON ("\u0000"), but no Postgres text holds NUL: invalid
            raise error(422, "name cannot contain a NUL character")
        return name

    def handle(environ: dict[str, Any]) -> Outcome:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with connect() as conn:
            # Who is asking comes first, whatever the path: a 404 to an anonymous client
            # would tell it which paths and ids exist. Then the count, for every request.
            token, role = authenticate(conn, environ)
            throttle(conn, token)
            match = PROJECT_PATH.match(path)
            if path != "/projects" and match is None:
                return error(404, f"no resource at {path}")
            if path == "/projects":
                if method != "POST":
                    return error(405, "POST only", [("Allow", "POST")])
                if role != "writer":
                    return error(403, "your token may read, not write")
                name = read_project(environ)
                try:
                    row = conn.execute("INSERT INTO projects (name) VALUES (%s) "
                                       "RETURNING id, name", (name,)).fetchone()
                except psycopg.errors.UniqueViolation:
                    return error(409, f"a project named {name!r} exists")
                assert row is not None
                return Outcome(201, row, [("Location", f"/projects/{row['id']}")])
            assert match is not None
            project_id = int(match.group(1))
            if method == "GET":
                row = conn.execute("SELECT id, name FROM projects WHERE id = %s",
                                   (project_id,)).fetchone()
                if row is None:
                    return error(404, f"no project {project_id}")
                tag = etag_of(row)
                if none_match(environ.get("HTTP_IF_NONE_MATCH"), tag):
                    # A 304 carries the ETag a 200 would have (RFC 9110 15.4.5): the cache
                    # refreshes the stored response it names.
                    return Outcome(304, None, [("ETag", tag)])
                return Outcome(200, row, [("ETag", tag)])
            if method == "DELETE":
                if role != "writer":
                    return error(403, "your token may read, not delete")
                with conn.transaction():
                    row = conn.execute("SELECT id, name FROM projects WHERE id = %s FOR UPDATE",
                                       (project_id,)).fetchone()
                    if row is None:
                        return error(404, f"no project {project_id}")
                    # Preconditions on a change (RFC 9110 13.2.2): a false If-Match, or an
                    # If-None-Match that matches, is 412 (304 is for GET and HEAD only), and
                    # nothing is deleted.
                    tag = etag_of(row)
                    if (not if_match(environ.get("HTTP_IF_MATCH"), tag)
                            or none_match(environ.get("HTTP_IF_NONE_MATCH"), tag)):
                        return error(412, f"project {project_id} is no longer the one you "
                                     "named", [("ETag", tag)])
                    conn.execute("DELETE FROM projects WHERE id = %s", (project_id,))
                return Outcome(204)
            return error(405, "GET or DELETE", [("Allow", "GET, DELETE")])

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            outcome = handle(environ)
        except Outcome as raised:
            outcome = raised
        except psycopg.OperationalError:
            # Could not reach or lost the database: the client may retry later.
            outcome = error(503, "the database is unavailable", [("Retry-After", "5")])
        status = f"{outcome.status} {HTTPStatus(outcome.status).phrase}"
        if outcome.body is None:  # 204 and 304 have no body by definition
            start_response(status, outcome.headers)
            return []
        body = json.dumps(outcome.body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body))), *outcome.headers])
        return [body]

    return app
