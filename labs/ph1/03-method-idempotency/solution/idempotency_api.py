"""ph1.3 - idempotent PUT and DELETE, and POST made safe to retry with an Idempotency-Key.

PUT and DELETE name their target, so repeating them converges on one state by construction.
POST creates a new resource each time; a client that retries after a timeout would create
two orders. The Idempotency-Key header lets the client name the *attempt*: the first request
with a key creates the order and stores its response with the key, in one transaction;
every later request with that key gets the stored response and creates nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

USER_PATH = re.compile(r"^/users/(\d{1,18})$")
ORDER_PATH = re.compile(r"^/orders/(\d{1,18})$")
# Stripe's limit. A key is stored and indexed as the primary key: without a limit, a key of a
# few kB fails the index's row size check inside Postgres - a 500 for the client's mistake.
MAX_KEY_LENGTH = 255
INT4_MAX, INT8_MAX = 2**31 - 1, 2**63 - 1  # orders.quantity is integer, user_id bigint


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_json(environ: dict[str, Any]) -> Any:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        return json.loads(environ["wsgi.input"].read(length))
    except ValueError:
        raise HTTPError(400, "the body is not valid JSON") from None


def require(data: Any, fields: dict[str, type]) -> dict[str, Any]:
    if not isinstance(data, dict) or any(
            not isinstance(data.get(name), kind) or isinstance(data.get(name), bool)
            for name, kind in fields.items()):
        raise HTTPError(422, f"expected an object with {', '.join(fields)}")
    if any(kind is str and "\x00" in data[name] for name, kind in fields.items()):
        # Valid JSON ("\u0000"), but a Postgres text value cannot hold NUL: the client's
        # mistake, refused here - not psycopg's DataError as a 500.
        raise HTTPError(422, f"{', '.join(fields)}: text cannot contain NUL")
    if any(kind is str and not is_unicode_text(data[name]) for name, kind in fields.items()):
        # "\ud800" alone is valid JSON syntax but names no character (RFC 8259 8.2): no UTF-8
        # encodes it, so psycopg cannot send it (UnicodeEncodeError) - refused here too.
        raise HTTPError(422, f"{', '.join(fields)}: text holds an unpaired surrogate")
    return {name: data[name] for name in fields}


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` is characters UTF-8 can encode (no lone UTF-16 surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def order_fields(data: Any) -> dict[str, Any]:
    """The order as the table will take it. Every value the database would refuse with an
    error (the CHECK, a number beyond the column's type) is the client's mistake, answered
    422 here - before a transaction exists, so no key is claimed for it."""
    order = require(data, {"user_id": int, "item": str, "quantity": int})
    if not 1 <= order["quantity"] <= INT4_MAX:
        raise HTTPError(422, f"quantity must be a whole number from 1 to {INT4_MAX}")
    if not 1 <= order["user_id"] <= INT8_MAX:
        raise HTTPError(422, f"no user {order['user_id']}")  # no bigint names it
    return order


def fingerprint(method: str, path: str, payload: dict[str, Any]) -> str:
    """What 'the same request' means for a key: same method, path and (canonical) body."""
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def make_app(dsn: str) -> WSGIApp:
    def connect() -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(dsn, row_factory=dict_row)

    def put_user(user_id: int, data: dict[str, Any]) -> tuple[int, Any]:
        # The URL names the row, so the write is an upsert: one row however often it runs.
        with connect() as conn:
            row = conn.execute(
                """INSERT INTO users (id, name, email) VALUES (%s, %s, %s)
                   ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email
                   RETURNING id, name, email, (xmax = 0) AS created""",
                (user_id, data["name"], data["email"])).fetchone()
        assert row is not None
        created = row.pop("created")
        return (201 if created else 200), row

    def delete_user(user_id: int) -> int:
        try:
            with connect() as conn:
                gone = conn.execute("DELETE FROM users WHERE id = %s", (user_id,)).rowcount
        except psycopg.errors.ForeignKeyViolation:
            # Orders reference their user and the schema has no cascade: an order is a
            # record of a purchase (and its key's stored response replays it). The request
            # conflicts with the resource's state (RFC 9110 15.5.10): 409, nothing deleted.
            raise HTTPError(409, f"user {user_id} has orders") from None
        # The state after any number of DELETEs is the same (no row); only the answer
        # tells the client whether this particular call removed it.
        return 204 if gone else 404

    def post_order(key: str, data: dict[str, Any]) -> tuple[int, str]:
        request_hash = fingerprint("POST", "/orders", data)
        with connect() as conn, conn.transaction():
            # Claim the key. If another transaction inserted it and has not finished, this
            # INSERT waits for it: concurrent replays queue here instead of racing.
            claimed = conn.execute(
                """INSERT INTO idempotency_keys (key, request_hash) VALUES (%s, %s)
                   ON CONFLICT (key) DO NOTHING RETURNING key""",
                (key, request_hash)).fetchone()
            if claimed is None:
                stored = conn.execute(
                    """SELECT request_hash, response_status, response_body
                       FROM idempotency_keys WHERE key = %s""", (key,)).fetchone()
                assert stored is not None  # committed together with its response
                if stored["request_hash"] != request_hash:
                    raise HTTPError(422, "this Idempotency-Key was used for another request")
                return stored["response_status"], stored["response_body"]
            try:
                order = conn.execute(
                    """INSERT INTO orders (user_id, item, quantity) VALUES (%s, %s, %s)
                       RETURNING id, user_id, item, quantity, created_at""",
                    (data["user_id"], data["item"], data["quantity"])).fetchone()
            except psycopg.errors.ForeignKeyViolation:
                # Raising rolls the whole transaction back, the key claim included.
                raise HTTPError(422, f"no user {data['user_id']}") from None
            assert order is not None
            body = json.dumps({**order, "created_at": order["created_at"].isoformat()})
            conn.execute(
                """UPDATE idempotency_keys SET response_status = 201, response_body = %s
                   WHERE key = %s""", (body, key))
        return 201, body

    def get_order(order_id: int) -> Any:
        with connect() as conn:
            row = conn.execute("SELECT id, user_id, item, quantity, created_at FROM orders "
                               "WHERE id = %s", (order_id,)).fetchone()
        if row is None:
            raise HTTPError(404, f"no order {order_id}")
        return {**row, "created_at": row["created_at"].isoformat()}

    def route(environ: dict[str, Any]) -> tuple[int, str | None, list[tuple[str, str]]]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if (match := USER_PATH.match(path)) is not None:
            user_id = int(match.group(1))
            if method == "PUT":
                status, user = put_user(user_id, require(read_json(environ),
                                                         {"name": str, "email": str}))
                return status, json.dumps(user), []
            if method == "DELETE":
                return delete_user(user_id), None, []
            raise HTTPError(405, f"{method} {path}")
        if path == "/orders" and method == "POST":
            key = environ.get("HTTP_IDEMPOTENCY_KEY", "").strip()
            if not key:
                raise HTTPError(400, "POST /orders needs an Idempotency-Key header")
            if len(key) > MAX_KEY_LENGTH:
                raise HTTPError(400, f"an Idempotency-Key has at most {MAX_KEY_LENGTH} "
                                     "characters")
            payload = order_fields(read_json(environ))
            status, body = post_order(key, payload)
            order_id = json.loads(body)["id"]
            return status, body, [("Location", f"/orders/{order_id}")]
        if (match := ORDER_PATH.match(path)) is not None and method == "GET":
            return 200, json.dumps(get_order(int(match.group(1)))), []
        raise HTTPError(404, f"no resource at {path}")

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        try:
            if any("\x00" in value for name, value in environ.items()
                   if name.startswith("HTTP_")):
                # RFC 9110 5.5: a field value holding NUL is invalid; reject the message.
                raise HTTPError(400, "a header field holds a NUL character")
            status, body, headers = route(environ)
        except HTTPError as err:
            status, body, headers = err.status, json.dumps({"error": str(err)}), []
        phrase = HTTPStatus(status).phrase
        if body is None:
            start_response(f"{status} {phrase}", headers)
            return []
        data = body.encode()
        start_response(f"{status} {phrase}", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(data))), *headers])
        return [data]

    return app
