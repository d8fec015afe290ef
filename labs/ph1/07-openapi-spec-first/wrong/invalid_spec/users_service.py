"""ph1.7 WRONG (invalid_spec):
A typo in a $ref: the document points at a schema that does not exist.

Spec first: openapi.yaml is the source of truth, and this module *uses* it. Every request is
validated and unmarshalled by openapi-core against the spec before a handler sees it, so the
types, ranges and required members the contract declares are enforced by the contract
itself; the handlers only do what the spec cannot: talk to Postgres.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import psycopg
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest
from openapi_core.deserializing.media_types.exceptions import MediaTypeDeserializeError
from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_core.validation.request.exceptions import (
    ParameterValidationError,
    RequestBodyValidationError,
)
from psycopg.rows import dict_row
from werkzeug.wrappers import Request

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

SPEC = Path(__file__).with_name("openapi.yaml")
USER = re.compile(r"^/users/([^/]+)$")


class Problem(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def rejection(error: Exception) -> Problem:
    """Map what openapi-core found wrong with a request to the status the spec declares."""
    cause = error.__cause__
    if isinstance(error, PathNotFound):
        return Problem(404, "no such resource")
    if isinstance(error, OperationNotFound):
        return Problem(405, "the resource does not support this method")
    if isinstance(error, ParameterValidationError):
        if error.location == "path":  # /users/abc or /users/0 names no user
            return Problem(404, f"{error.name} does not name a user")
        return Problem(400, f"{error.location} parameter {error.name} is invalid")
    if isinstance(error, RequestBodyValidationError):
        if isinstance(cause, MediaTypeNotFound):
            return Problem(415, "send the body as application/json")
        if isinstance(cause, MediaTypeDeserializeError):
            return Problem(400, "the body is not valid JSON")
        return Problem(422, "the body does not match the NewUser schema")
    return Problem(400, str(error))


def storable(text: str) -> bool:
    """What JSON allows and a schema cannot forbid but Postgres text refuses: a NUL
    character, or a lone surrogate ("\\ud800") that is not encodable as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def make_app(dsn: str) -> WSGIApp:
    api = OpenAPI.from_file_path(str(SPEC))

    def connect() -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)

    def handle(environ: dict[str, Any]) -> tuple[int, Any, list[tuple[str, str]]]:
        request = api.unmarshal_request(WerkzeugOpenAPIRequest(Request(environ)))
        for error in request.errors:  # the first reason is enough to refuse
            raise rejection(error)
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == "/users" and method == "GET":
            query = request.parameters.query  # defaults filled in from the spec
            limit, offset = query["limit"], query["offset"]
            with connect() as conn:
                rows = conn.execute("SELECT id, name, email FROM users ORDER BY id "
                                    "LIMIT %s OFFSET %s", (limit + 1, offset)).fetchall()
            following = offset + limit if len(rows) > limit else None
            return 200, {"data": rows[:limit], "next_offset": following}, []
        if path == "/users" and method == "POST":
            body = request.body
            assert isinstance(body, dict)  # the spec admits only a NewUser object here
            if not all(storable(body[key]) for key in ("name", "email")):
                raise Problem(422, "name and email must be text Postgres can store")
            try:
                with connect() as conn:
                    row = conn.execute("INSERT INTO users (name, email) VALUES (%s, %s) "
                                       "RETURNING id, name, email",
                                       (body["name"], body["email"])).fetchone()
            except psycopg.errors.UniqueViolation:
                raise Problem(409, "a user with this email exists") from None
            assert row is not None
            return 201, row, [("Location", f"/users/{row['id']}")]
        match = USER.match(path)
        assert match is not None  # the spec accepted the path, so it is /users/{userId}
        user_id = request.parameters.path["userId"]
        with connect() as conn:
            if method == "GET":
                row = conn.execute("SELECT id, name, email FROM users WHERE id = %s",
                                   (user_id,)).fetchone()
                if row is None:
                    raise Problem(404, f"there is no user {user_id}")
                return 200, row, []
            if conn.execute("DELETE FROM users WHERE id = %s", (user_id,)).rowcount == 0:
                raise Problem(404, f"there is no user {user_id}")
            return 204, None, []

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            status, document, headers = handle(environ)
            media_type = "application/json"
        except Problem as problem:
            status, headers = problem.status, []
            media_type = "application/problem+json"
            document = {"type": "about:blank", "title": HTTPStatus(status).phrase,
                        "status": status, "detail": problem.detail,
                        "instance": environ.get("PATH_INFO", "/")}
        reason = f"{status} {HTTPStatus(status).phrase}"
        if document is None:
            start_response(reason, headers)
            return []
        body = json.dumps(document).encode()
        start_response(reason, [("Content-Type", media_type),
                                ("Content-Length", str(len(body))), *headers])
        return [body]

    return app
