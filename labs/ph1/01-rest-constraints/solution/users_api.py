"""ph1.1 - a RESTful /users resource on Postgres: nouns, stateless, cacheable.

The app is a plain WSGI callable. It keeps no state between requests: every request opens a
connection, reads or writes Postgres and answers. That is what lets two instances (or two
hundred behind a load balancer) serve the same client interchangeably.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# Caches may keep a representation for 30 s; after that they revalidate with If-None-Match.
CACHE_CONTROL = "max-age=30, must-revalidate"

USER_PATH = re.compile(r"^/users/(\d{1,18})$")


class HTTPError(Exception):
    def __init__(self, status: str, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


def etag_of(body: bytes) -> str:
    """A strong entity tag derived only from the bytes sent: every instance computes the same
    tag for the same representation, and any change to the data changes it."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, where etagc is any visible
# character but DQUOTE - a comma too ("a,b" is one tag). So a list is read tag by tag as
# quoted strings, as Go's net/http (scanETag) and Werkzeug (parse_etags) read it, not split
# on commas: split, '"old,<current>"' would hold the current tag's text in one of its pieces.
ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')


def entity_tags(header: str) -> list[str]:
    return ENTITY_TAG.findall(header)


def if_none_match_hits(header: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: If-None-Match is '*' or a list of tags, compared weakly (W/ ignored)."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.removeprefix("W/") == wanted for tag in entity_tags(header))


def if_match_holds(header: str | None, etag: str) -> bool:
    """RFC 9110 13.1.1: If-Match is '*' (any current representation) or a list of tags,
    compared strongly (8.8.3.2: a W/ tag never matches). No header: nothing to hold."""
    return header is None or header.strip() == "*" or etag in entity_tags(header)


def preconditions_hold(environ: dict[str, Any], etag: str) -> bool:
    """RFC 9110 13.2.2 for PUT and DELETE on a user that exists: If-Match first, then
    If-None-Match, compared weakly, where a match means 'it exists / is this one', so the
    write must not happen (13.1.2)."""
    return (if_match_holds(environ.get("HTTP_IF_MATCH"), etag)
            and not if_none_match_hits(environ.get("HTTP_IF_NONE_MATCH"), etag))


def read_json(environ: dict[str, Any]) -> dict[str, Any]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        data = json.loads(environ["wsgi.input"].read(length) or b"null")
    except ValueError:
        raise HTTPError("400 Bad Request", "the body is not valid JSON") from None
    if (not isinstance(data, dict) or not isinstance(data.get("name"), str)
            or not isinstance(data.get("email"), str)):
        raise HTTPError("422 Unprocessable Entity", "expected {\"name\": str, \"email\": str}")
    if "\x00" in data["name"] + data["email"]:
        # Valid JSON ("\u0000"), but a Postgres text value cannot hold NUL: the client's
        # mistake, refused here - not psycopg's DataError as a 500.
        raise HTTPError("422 Unprocessable Entity", "name and email cannot contain NUL")
    return data


def make_app(dsn: str) -> WSGIApp:
    def connect() -> psycopg.Connection[dict[str, Any]]:
        # One short connection per request: nothing survives the request in this process.
        # (A production service would use a pool; the point here is that no state does.)
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    @contextmanager
    def writing() -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """One transaction that writes; an email another user has is a conflict with the
        collection's state (RFC 9110 15.5.10: 409), the client's to resolve - never the
        UNIQUE index's 500."""
        try:
            with connect() as conn, conn.transaction():
                yield conn
        except psycopg.errors.UniqueViolation:
            raise HTTPError("409 Conflict", "another user has this email") from None

    def get_collection() -> Any:
        with connect() as conn:
            return conn.execute("SELECT id, name, email FROM users ORDER BY id").fetchall()

    def get_user(user_id: int) -> Any:
        with connect() as conn:
            row = conn.execute("SELECT id, name, email FROM users WHERE id = %s",
                               (user_id,)).fetchone()
        if row is None:
            raise HTTPError("404 Not Found", f"no user {user_id}")
        return row

    def create_user(data: dict[str, Any]) -> Any:
        with writing() as conn:
            return conn.execute("INSERT INTO users (name, email) VALUES (%s, %s) "
                                "RETURNING id, name, email",
                                (data["name"], data["email"])).fetchone()

    def check_locked(conn: psycopg.Connection[Any], user_id: int,
                     environ: dict[str, Any]) -> None:
        """Lock the user's row until the write's transaction ends, then check the request's
        If-Match / If-None-Match against it: check and write are one step, so of two writers
        holding the same tag only the first gets through - the lost update ETags exist to
        prevent. No user: 404 whatever the conditions (RFC 9110 13.2.1: a request that
        would fail without its conditions ignores them)."""
        row = conn.execute("SELECT id, name, email FROM users WHERE id = %s FOR UPDATE",
                           (user_id,)).fetchone()
        if row is None:
            raise HTTPError("404 Not Found", f"no user {user_id}")
        if not preconditions_hold(environ, etag_of(json.dumps(row).encode())):
            raise HTTPError("412 Precondition Failed",
                            f"user {user_id} is not in the state If-Match/If-None-Match names")

    def replace_user(user_id: int, data: dict[str, Any], environ: dict[str, Any]) -> Any:
        with writing() as conn:
            check_locked(conn, user_id, environ)
            return conn.execute("UPDATE users SET name = %s, email = %s WHERE id = %s "
                                "RETURNING id, name, email",
                                (data["name"], data["email"], user_id)).fetchone()

    def delete_user(user_id: int, environ: dict[str, Any]) -> None:
        with writing() as conn:
            check_locked(conn, user_id, environ)
            conn.execute("DELETE FROM users WHERE id = %s", (user_id,))

    def cacheable(environ: dict[str, Any], start_response: StartResponse,
                  document: Any) -> list[bytes]:
        """A GET answer: 200 with ETag and Cache-Control, or 304 when the client's copy is
        current. The 304 carries the same validators and no body."""
        body = json.dumps(document).encode()
        tag = etag_of(body)
        headers = [("ETag", tag), ("Cache-Control", CACHE_CONTROL)]
        # RFC 9110 13.2.2: If-Match first, on every method - a GET too ("the origin server
        # MUST NOT perform the requested method", 13.1.1): false is 412, as Go's
        # http.ServeContent and nginx answer a GET. Only then If-None-Match (a 304).
        if not if_match_holds(environ.get("HTTP_IF_MATCH"), tag):
            raise HTTPError("412 Precondition Failed", "If-Match names no current tag")
        if if_none_match_hits(environ.get("HTTP_IF_NONE_MATCH"), tag):
            start_response("304 Not Modified", headers)
            return []
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body))), *headers])
        return [body]

    def send(start_response: StartResponse, status: str, document: Any,
             extra: list[tuple[str, str]] | None = None) -> list[bytes]:
        body = json.dumps(document).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body))), *(extra or [])])
        return [body]

    def route(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == "/users":
            if method in ("GET", "HEAD"):
                return cacheable(environ, start_response, get_collection())
            if method == "POST":
                user = create_user(read_json(environ))
                return send(start_response, "201 Created", user,
                            [("Location", f"/users/{user['id']}")])
            raise HTTPError("405 Method Not Allowed", f"{method} /users",
                            [("Allow", "GET, HEAD, POST")])
        match = USER_PATH.match(path)
        if match is None:
            raise HTTPError("404 Not Found", f"no resource at {path}")
        user_id = int(match.group(1))
        if method in ("GET", "HEAD"):
            return cacheable(environ, start_response, get_user(user_id))
        if method == "PUT":
            return send(start_response, "200 OK",
                        replace_user(user_id, read_json(environ), environ))
        if method == "DELETE":
            delete_user(user_id, environ)
            start_response("204 No Content", [])
            return []
        raise HTTPError("405 Method Not Allowed", f"{method} {path}",
                        [("Allow", "GET, HEAD, PUT, DELETE")])

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            body = route(environ, start_response)
        except HTTPError as err:
            body = send(start_response, err.status, {"error": str(err)}, err.headers)
        # HEAD is GET without the body (RFC 9110 9.3.2): the same status and headers (its
        # Content-Length the GET's), for a client that checks a resource or revalidates a
        # cached copy without downloading it; every general-purpose server supports it
        # wherever GET is (9.1).
        return [] if environ["REQUEST_METHOD"] == "HEAD" else body

    return app
