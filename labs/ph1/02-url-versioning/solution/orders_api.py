"""ph1.2 - nested /users/<id>/orders with two versions of the representation.

The version is chosen by the URI prefix (/v2/...), else by the Accept media type
(application/vnd.shop+json;version=2), else by the query (?version=2), else it is 1. The
handlers below know nothing about how it was chosen: they take the version as an argument.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

VERSIONS = (1, 2)
DEFAULT_VERSION = 1  # clients that never asked for a version keep the contract they had
VENDOR_TYPE = "application/vnd.shop+json"

ROUTE = re.compile(r"^(?:/v(?P<prefix>[0-9]+))?/users/(?P<user>[0-9]+)/orders"
                   r"(?:/(?P<order>[0-9]+))?$")
BIGINT_MAX = 2**63 - 1  # ids are bigint: a larger number names no row (404), and cast
                        # to bigint Postgres refuses it as out of range (a 500)


def whole(digits: str) -> int:
    """The number the route's ASCII digits spell; past 19 significant digits only "too big"
    matters (BIGINT_MAX + 1): int() of 4,301 digits raises ValueError (Python's guard
    against quadratic-time conversion), which would be a 500."""
    return int(digits) if len(digits.lstrip("0")) <= 19 else BIGINT_MAX + 1


class HTTPError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def media_ranges(accept: str) -> list[tuple[str, dict[str, str], float]]:
    """Parse an Accept header into (type, params, q), best first (stable for equal q)."""
    ranges = []
    for part in accept.split(","):
        if not part.strip():
            continue
        kind, *raw_params = (p.strip() for p in part.split(";"))
        params = dict(p.split("=", 1) for p in raw_params if "=" in p)
        params = {k.strip().lower(): v.strip().strip('"') for k, v in params.items()}
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        ranges.append((kind.lower(), params, q))
    return sorted((r for r in ranges if r[2] > 0), key=lambda r: -r[2])


def negotiate(environ: dict[str, Any], prefix: str | None) -> int:
    """The version asked for: the URI prefix, else Accept, else ?version=, else 1."""
    if prefix is not None:
        if whole(prefix) not in VERSIONS:
            raise HTTPError("404 Not Found", f"there is no API version {prefix:.20}")
        return whole(prefix)
    accept = environ.get("HTTP_ACCEPT", "")
    if accept:
        chosen = None
        for kind, params, _ in media_ranges(accept):
            if kind == VENDOR_TYPE:
                wanted = params.get("version", str(DEFAULT_VERSION))
                if wanted.isdigit() and int(wanted) in VERSIONS:
                    chosen = int(wanted)
                    break
            elif kind in ("application/json", "application/*", "*/*"):
                chosen = None  # generic JSON: fall through to ?version= or the default
                break
        else:
            raise HTTPError("406 Not Acceptable",
                            f"none of {accept!r} can be served; use {VENDOR_TYPE};version=1|2")
        if chosen is not None:
            return chosen
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "version" in query:
        raw = query["version"][0]
        if not raw.isdigit() or int(raw) not in VERSIONS:
            raise HTTPError("400 Bad Request", f"version={raw!r} is not one of {VERSIONS}")
        return int(raw)
    return DEFAULT_VERSION


def represent(order: dict[str, Any], version: int) -> dict[str, Any]:
    if version == 1:  # v1: the legacy shape, money as a float in the account's currency
        return {"id": order["id"], "user_id": order["user_id"],
                "total": order["total_cents"] / 100}
    return {"id": order["id"], "user_id": order["user_id"],
            "amount": {"cents": order["total_cents"], "currency": order["currency"]},
            "placed_at": order["placed_at"].isoformat()}


def make_app(dsn: str) -> WSGIApp:
    def query(sql: str, *params: Any) -> list[dict[str, Any]]:
        with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    def user_orders(user_id: int, version: int) -> Any:
        # The parent decides whether the collection exists at all.
        if not query("SELECT 1 FROM users WHERE id = %s", user_id):
            raise HTTPError("404 Not Found", f"no user {user_id}")
        rows = query("SELECT * FROM orders WHERE user_id = %s ORDER BY id", user_id)
        items = [represent(row, version) for row in rows]
        if version == 1:
            return items
        return {"data": items, "meta": {"count": len(items)},
                "links": {"self": f"/v2/users/{user_id}/orders"}}

    def one_order(user_id: int, order_id: int, version: int) -> Any:
        # Both ids in the WHERE clause: an order of another user is not under this one.
        rows = query("SELECT * FROM orders WHERE id = %s AND user_id = %s", order_id, user_id)
        if not rows:
            raise HTTPError("404 Not Found", f"user {user_id} has no order {order_id}")
        return represent(rows[0], version)

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        headers: list[tuple[str, str]] = []
        try:
            match = ROUTE.match(environ.get("PATH_INFO", ""))
            if match is None:
                raise HTTPError("404 Not Found", "no such resource")
            if match["prefix"] is None:
                # Without a version in the URI, Accept picks the answer - v1 or v2, and
                # the 406, 400 or 404 too (Accept is read first) - so every answer says so
                # (RFC 9110 12.5.5), or a shared cache serves it to clients asking otherwise.
                headers.append(("Vary", "Accept"))
            version = negotiate(environ, match["prefix"])
            if environ["REQUEST_METHOD"] != "GET":
                raise HTTPError("405 Method Not Allowed", "only GET here")
            user_id = whole(match["user"])
            order_id = None if match["order"] is None else whole(match["order"])
            if user_id > BIGINT_MAX or (order_id or 0) > BIGINT_MAX:
                raise HTTPError("404 Not Found", "no such resource: ids are at most 2^63-1")
            document = (user_orders(user_id, version) if order_id is None
                        else one_order(user_id, order_id, version))
            status = "200 OK"
            headers.append(("Content-Type", f"{VENDOR_TYPE}; version={version}"))
        except HTTPError as err:
            status, document = err.status, {"error": str(err)}
            headers.append(("Content-Type", "application/json"))
            if err.status.startswith("405"):
                headers.append(("Allow", "GET"))
        body = json.dumps(document).encode()
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return app
