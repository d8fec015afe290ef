"""ph1.5 - one list of orders, newest first, paged three ways.

offset  LIMIT/OFFSET: jump to any page and show a total, but the window slides when rows
        are inserted or deleted in front of it (repeats, skips), and OFFSET n reads and
        throws away n rows.
cursor  an opaque token that encodes where the last page ended; the client cannot build
        or edit one, so the server may change what is inside.
keyset  the same position in the open: the client sends the (created_at, id) of the last
        row it has; Postgres seeks to it in the index and reads only the next rows.

Cursor and keyset pages start *after a row*, not after a count of rows, so inserts in front
of the reader never shift them. The order is total: ties on created_at are broken by id.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import psycopg
from psycopg.rows import dict_row

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Connect = Callable[[], psycopg.Connection[Any]]
Position = tuple[datetime, int]  # (created_at, id) of the last row of a page

SELECT = "SELECT id, created_at, customer, total_cents FROM orders"
NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"  # matches the index orders_newest_first
MAX_LIMIT = 100
MAX_OFFSET = 2**63 - 1  # what OFFSET takes (a bigint): past it Postgres refuses
BIGINT = 2**63  # ids are bigint: -2**63 .. 2**63 - 1


class BadRequest(Exception):
    pass


def whole_number(raw: str) -> int:
    """A whole number in ASCII digits: int() alone also reads " 5", "+5", "1_0" and "٥" (any
    Unicode digit), spellings no client sends on purpose - refused, not read as a number."""
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(raw)
    return int(raw)


def instant(raw: str) -> datetime:
    """A position's time: ISO 8601 with its UTC offset. A position is an instant; a time
    with no offset (2024-03-04T08:00:00) names none - Postgres would read it in the
    session's TimeZone - so it is refused, as RFC 3339 (5.6) leaves no offset optional."""
    at = datetime.fromisoformat(raw)
    if at.tzinfo is None:
        raise ValueError(f"{raw!r} has no UTC offset")
    return at


def as_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "created_at": row["created_at"].isoformat()}


def encode_cursor(position: Position) -> str:
    raw = json.dumps([position[0].isoformat(), position[1]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_at, row_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(row_id, int) or isinstance(row_id, bool):  # JSON true is no id
            raise TypeError(row_id)
        if not -BIGINT <= row_id < BIGINT:  # no order has it: this API never issued it
            raise ValueError(row_id)
        return instant(created_at), row_id
    except (binascii.Error, ValueError, TypeError):
        raise BadRequest("the cursor is not one this API issued") from None


def page_offset(conn: psycopg.Connection[Any], limit: int, offset: int) -> dict[str, Any]:
    counted = conn.execute("SELECT count(*) AS n FROM orders").fetchone()
    total = counted["n"] if counted else 0
    rows = conn.execute(f"{SELECT} {NEWEST_FIRST} LIMIT %s OFFSET %s", (limit, offset)).fetchall()
    following = offset + limit
    return {"data": [as_json(r) for r in rows], "total_count": total,
            "next_offset": following if following < total else None}


def page_after(conn: psycopg.Connection[Any], limit: int,
               before: Position | None) -> tuple[list[dict[str, Any]], Position | None]:
    """The keyset query behind both cursor and keyset pages. The row-value comparison lets
    Postgres start the index scan at the position; limit + 1 rows tell whether more exist."""
    if before is None:
        rows = conn.execute(f"{SELECT} {NEWEST_FIRST} LIMIT %s", (limit + 1,)).fetchall()
    else:
        rows = conn.execute(f"{SELECT} WHERE (created_at, id) < (%s, %s) {NEWEST_FIRST} "
                            "LIMIT %s", (*before, limit + 1)).fetchall()
    page = rows[:limit]
    last = (page[-1]["created_at"], page[-1]["id"]) if len(rows) > limit else None
    return [as_json(r) for r in page], last


def make_app(connect: Connect) -> WSGIApp:
    def answer(query: dict[str, list[str]]) -> dict[str, Any]:
        def param(name: str) -> str | None:
            return query.get(name, [None])[0]

        try:
            limit = whole_number(param("limit") or "20")
            offset = whole_number(param("offset") or "0")
        except ValueError:
            raise BadRequest("limit and offset must be integers") from None
        if not 1 <= limit <= MAX_LIMIT or not 0 <= offset <= MAX_OFFSET:
            raise BadRequest(f"limit must be 1..{MAX_LIMIT} and offset 0..{MAX_OFFSET}")
        style = param("style") or "offset"
        with connect() as conn:
            conn.row_factory = dict_row
            if style == "offset":
                return page_offset(conn, limit, offset)
            if style == "cursor":
                cursor = param("cursor")
                rows, last = page_after(conn, limit, decode_cursor(cursor) if cursor else None)
                return {"data": rows, "next_cursor": encode_cursor(last) if last else None}
            if style == "keyset":
                before = None
                if param("before_created_at") is not None or param("before_id") is not None:
                    try:
                        before = (instant(param("before_created_at") or ""),
                                  whole_number(param("before_id") or ""))
                    except ValueError:
                        raise BadRequest("before_created_at must be ISO 8601 with a UTC offset "
                                         "and before_id an integer") from None
                rows, last = page_after(conn, limit, before)
                following = None if last is None else {
                    "before_created_at": last[0].isoformat(), "before_id": last[1]}
                return {"data": rows, "next": following}
        raise BadRequest(f"style must be offset, cursor or keyset, not {style!r}")

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        if environ.get("PATH_INFO") != "/orders" or environ["REQUEST_METHOD"] != "GET":
            status, document = "404 Not Found", {"error": "only GET /orders here"}
        else:
            try:
                status, document = "200 OK", answer(parse_qs(environ.get("QUERY_STRING", "")))
            except BadRequest as err:
                status, document = "400 Bad Request", {"error": str(err)}
        body = json.dumps(document).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]

    return app
