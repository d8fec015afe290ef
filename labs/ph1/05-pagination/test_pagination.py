"""Verification for ph1.5 pagination.

The learner's make_app(connect) runs behind a threaded wsgiref server on 127.0.0.1:0 and is
paged with real HTTP requests. Between page fetches the test inserts rows in front of the
reader (a newer order, and one tied on created_at with the last row seen).

The plan check does not trust the learner: every connection the app gets from `connect()`
has Postgres' auto_explain loaded and reporting the *executed* plan of every statement, with
actual row counts, as a notice that a proxy in this process reads on the wire (the
connection itself is opened in the learner's process). A keyset page must read its rows through the
index, without a Sort, and read no more rows than it returns (+1).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlencode

import pytest
from psycopg.conninfo import make_conninfo

from labrunner.testing import PgStatementProxy, http_request, serve_wsgi

SCHEMA = """
CREATE TABLE orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at  timestamptz NOT NULL,
    customer    text NOT NULL,
    total_cents integer NOT NULL
);
CREATE INDEX orders_newest_first ON orders (created_at DESC, id DESC);
"""
BASE = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
SMALL = 23  # rows in the walking tests, in tie groups of 3 (page boundaries fall inside)
PAGE = 5
BIG = 20_000  # rows in the plan test
DEEP = 15_000  # the keyset page starts after this many rows


# ---- requests to the learner's app (served with labrunner.testing.serve_wsgi) ------------

def get(host: str, params: dict[str, Any]) -> tuple[int, Any]:
    reply = http_request(host, "GET", "/orders?" + urlencode(params))
    try:
        return reply.status, json.loads(reply.body)
    except ValueError:
        return reply.status, reply.body


def page(host: str, params: dict[str, Any]) -> dict[str, Any]:
    status, doc = get(host, params)
    assert status == 200 and isinstance(doc, dict) and isinstance(doc.get("data"), list), (
        f"GET /orders?{urlencode(params)}: expected 200 with {{\"data\": [...]}}, saw "
        f"{status} {str(doc)[:200]}")
    return doc


# ---- the connection factory handed to the learner: plans reported by the server ---------

# The TimeZone of every session the learner's app opens: not UTC, as on many servers, so a
# time without a UTC offset that reaches Postgres is read 5 h 30 away from UTC.
SESSION_ZONE = "Asia/Kolkata"
# Startup options of every connection the learner's app opens: its TimeZone, auto_explain
# loaded, and the executed plan of each statement (with actual rows) sent to the client as a
# NOTICE.
EXPLAIN_EVERY_STATEMENT = " ".join(f"-c {setting}" for setting in (
    f"TimeZone={SESSION_ZONE}",
    "session_preload_libraries=auto_explain", "auto_explain.log_min_duration=0",
    "auto_explain.log_analyze=on", "auto_explain.log_format=json",
    "auto_explain.log_level=notice"))


class Explained:
    """What the learner's connections run, as the server planned it: they reach Postgres
    through a proxy in this process that reads the server's notices on the wire, so the
    plans come from the server, whatever the learner's code does with its connection. The
    connect() the app is handed runs in the learner's process (harness.py): the queries
    stay there, only their plans are read here."""

    def __init__(self, dsn: str) -> None:
        self.proxy = PgStatementProxy.for_dsn(dsn)
        self.dsn = make_conninfo(self.proxy.dsn_for(dsn), options=EXPLAIN_EVERY_STATEMENT)

    def take(self) -> list[dict[str, Any]]:
        """The plans of the statements run since the last take()."""
        return [json.loads(text.split("plan:", 1)[1])
                for text in self.proxy.take_notices() if "plan:" in text]


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


# ---- fixtures and data ------------------------------------------------------------------

@pytest.fixture
def db(postgres: Any) -> Any:
    with postgres.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    return postgres


@pytest.fixture
def connect(db: Any) -> Iterator[Explained]:
    explained = Explained(db.dsn)
    with explained.proxy:
        yield explained


@pytest.fixture
def host(learner: Any, connect: Explained) -> Iterator[str]:
    make_app = learner.function("orders_pages", "make_app")
    with serve_wsgi(make_app(learner.harness().connector(connect.dsn))) as address:
        yield address


def seed_small(db: Any) -> list[int]:
    """SMALL orders in tie groups of three; return their ids newest first (the true order)."""
    rows = []
    for i in range(SMALL):
        # Real timestamps have fractions of a second: a position kept to the second (or to
        # the minute) compares wrongly.
        group = i // 3
        at = BASE + timedelta(minutes=group, microseconds=137_531 * group + 17)
        rows.append((at, f"c{i}", i))
    with db.connect(autocommit=True) as conn:
        # one INSERT per row, in this order (ids follow it), sent in one pipeline
        conn.cursor().executemany("INSERT INTO orders (created_at, customer, total_cents) "
                                  "VALUES (%s, %s, %s)", rows)
        return [r[0] for r in conn.execute(
            "SELECT id FROM orders ORDER BY created_at DESC, id DESC").fetchall()]


def seed_big(conn: Any) -> None:
    """BIG orders, three to a minute, and fresh statistics: the plan tests' table, big
    enough that a plan reading it from the top shows."""
    conn.execute(
        "INSERT INTO orders (created_at, customer, total_cents) "
        "SELECT %s::timestamptz + (g / 3) * interval '1 minute', 'c' || g, g "
        "FROM generate_series(1, %s) g", (BASE, BIG))
    conn.execute("ANALYZE orders")


def insert_in_front(db: Any, last_seen_id: int) -> None:
    """What other users do between two page fetches: a brand-new order, and one with the
    same created_at as the last row the reader saw (a higher id sorts it in front of it)."""
    with db.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO orders (created_at, customer, total_cents) "
                     "VALUES (%s, 'newcomer', 1)", (BASE + timedelta(days=1),))
        conn.execute("INSERT INTO orders (created_at, customer, total_cents) "
                     "SELECT created_at, 'tied', 2 FROM orders WHERE id = %s", (last_seen_id,))


def ids(doc: dict[str, Any]) -> list[int]:
    return [row.get("id") for row in doc["data"]]


def not_restarting(style: str, seen: list[int], doc: dict[str, Any]) -> None:
    if seen and ids(doc) and ids(doc)[0] == seen[-1]:
        pytest.fail(
            f"{style} page {len(seen) // PAGE + 1} starts with order {seen[-1]}, the last row "
            "of the page before: the position is compared inclusively (<=); a page must "
            "start strictly after the last row seen: (created_at, id) < (...)", pytrace=False)


NEXT_FIELD = {"offset": "next_offset", "cursor": "next_cursor", "keyset": "next"}


def next_params(style: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The query of the page a response links to next, or None when it says it is the last
    (a null, absent or empty next field)."""
    following = doc.get(NEXT_FIELD[style])
    if following is None or following == "" or following == {}:
        return None
    if style == "keyset":
        return {"style": style, "limit": PAGE, **following}
    return {"style": style, "limit": PAGE, NEXT_FIELD[style].removeprefix("next_"): following}


def delete_last_seen(db: Any, last_seen_id: int) -> None:
    """What other users do between two page fetches: the last order the reader saw is
    deleted (cancelled) before the reader asks for the next page."""
    with db.connect(autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE id = %s", (last_seen_id,))


def walk(host: str, db: Any, style: str,
         between: Callable[[Any, int], None] = insert_in_front) -> list[int]:
    """Page through all orders with `style`, changing the table between fetches (by default
    inserting in front)."""
    seen: list[int] = []
    params: dict[str, Any] = {"style": style, "limit": PAGE}
    for _ in range(2 * SMALL):  # a bound, in case the next-page link never ends
        doc = page(host, params)
        not_restarting(style, seen, doc)
        seen += ids(doc)
        if style == "cursor":
            if not doc.get("next_cursor"):
                return seen
            params = {"style": style, "limit": PAGE, "cursor": doc["next_cursor"]}
        else:
            following = doc.get("next")
            if not following:
                return seen
            assert isinstance(following, dict) and {"before_created_at", "before_id"} <= set(
                following), (
                f"keyset page: expected next = {{\"before_created_at\": ..., \"before_id\": ...}}"
                f", saw {following!r}")
            params = {"style": style, "limit": PAGE, **following}
        if doc["data"]:
            between(db, doc["data"][-1]["id"])
    pytest.fail(f"{style} pages never ended after {2 * SMALL} pages: the next-page link "
                "does not move forward", pytrace=False)


# ---- the verification -------------------------------------------------------------------

def test_offset_pages_shift_under_inserts(host: str, db: Any) -> None:
    truth = seed_small(db)
    first = page(host, {"style": "offset", "limit": PAGE, "offset": 0})
    assert ids(first) == truth[:PAGE], (
        f"offset page 1: expected ids {truth[:PAGE]} (created_at DESC, id DESC), saw "
        f"{ids(first)}")
    assert first.get("total_count") == SMALL, (
        f"offset page 1: expected total_count {SMALL}, saw {first.get('total_count')!r}")
    insert_in_front(db, ids(first)[-1])
    second = page(host, {"style": "offset", "limit": PAGE, "offset": PAGE})
    repeated = [i for i in ids(second) if i in ids(first)]
    assert repeated == truth[PAGE - 2:PAGE], (
        f"offset page 2 after two inserts in front: expected it to repeat ids "
        f"{truth[PAGE - 2:PAGE]} (OFFSET {PAGE} now lands two rows earlier), saw page "
        f"{ids(second)}: is the offset style really LIMIT/OFFSET?")


@pytest.mark.parametrize("style", ["cursor", "keyset"])
def test_positions_keep_fractions_of_a_second(host: str, db: Any, style: str) -> None:
    """No ties here: every order has its own created_at, ten of them within one second."""
    with db.connect(autocommit=True) as conn:
        for i in range(12):
            conn.execute("INSERT INTO orders (created_at, customer, total_cents) "
                         "VALUES (%s, %s, %s)",
                         (BASE + timedelta(milliseconds=83 * i + 5), f"f{i}", i))
        truth = [r[0] for r in conn.execute(
            "SELECT id FROM orders ORDER BY created_at DESC, id DESC").fetchall()]
    seen: list[int] = []
    params: dict[str, Any] = {"style": style, "limit": PAGE}
    for _ in range(10):
        doc = page(host, params)
        not_restarting(style, seen, doc)
        seen += ids(doc)
        following = next_params(style, doc)
        if following is None:
            break
        params = following
    missing = [i for i in truth if i not in seen]
    assert not missing, (
        f"{style} pages over 12 orders created within one second (no two alike) skipped "
        f"orders {missing}: the position lost the fraction of a second, so rows just after "
        "the last one seen compare as already read; keep created_at exactly (microseconds, "
        "e.g. isoformat()) in the cursor or link")
    assert seen == truth, f"{style} pages: expected {truth}, saw {seen}"


@pytest.mark.parametrize("style", ["cursor", "keyset"])
def test_pages_are_stable_under_inserts(host: str, db: Any, style: str) -> None:
    truth = seed_small(db)
    seen = walk(host, db, style)
    repeated = sorted({i for i in seen if seen.count(i) > 1})
    assert not repeated, (
        f"{style} pages repeated orders {repeated} while rows were inserted in front: a page "
        "must start after the last row seen, not after a count of rows")
    skipped = [i for i in truth if i not in seen]
    assert not skipped, (
        f"{style} pages skipped orders {skipped}: rows tied on created_at with the last row "
        "seen are lost unless the position includes the id (created_at, id)")
    assert seen == truth, (
        f"{style} pages: expected exactly the {SMALL} orders that existed when paging began, "
        f"newest first {truth}, saw {seen}")


@pytest.mark.parametrize("style", ["cursor", "keyset"])
def test_pages_survive_deleting_the_last_row_seen(host: str, db: Any, style: str) -> None:
    truth = seed_small(db)
    seen = walk(host, db, style, between=delete_last_seen)
    missing = [i for i in truth if i not in seen]
    pages = (len(seen) + PAGE - 1) // PAGE
    assert not missing, (
        f"{style} pages skipped orders {missing} when the last order of each page was deleted "
        f"before the next page was asked for (the walk gave {len(seen)} of {SMALL} orders in "
        f"{pages} pages): the position must be the last row's values (created_at, id), "
        "compared with (created_at, id) < (x, y), not a reference to that row - looked up by "
        "its id, a deleted row leaves no position, and the rest of the list is lost")
    repeated = sorted({i for i in seen if seen.count(i) > 1})
    assert not repeated and seen == truth, (
        f"{style} pages with the last row of each page deleted: expected {truth}, saw {seen}")


def test_last_page_links_nowhere(host: str, db: Any) -> None:
    """Exactly two full pages of orders, paged in each style: page 1 must link to page 2,
    and page 2, which ends at the last order, must say there is no next page. Knowing that
    takes one row more than the page (limit + 1) or the total, not "the page is full"."""
    with db.connect(autocommit=True) as conn:
        for i in range(2 * PAGE):
            conn.execute("INSERT INTO orders (created_at, customer, total_cents) "
                         "VALUES (%s, %s, %s)", (BASE + timedelta(minutes=i), f"e{i}", i))
    for style, field in NEXT_FIELD.items():
        first = page(host, {"style": style, "limit": PAGE})
        second_params = next_params(style, first)
        assert second_params is not None, (
            f"{style} page 1 of {2 * PAGE} orders (limit {PAGE}) has {field} = "
            f"{first.get(field)!r}: {PAGE} more orders follow, so it must link to them")
        second = page(host, second_params)
        assert len(second["data"]) == PAGE, (
            f"{style} page 2 of {2 * PAGE} orders (limit {PAGE}): expected the last {PAGE} "
            f"orders, saw {len(second['data'])} rows")
        beyond = next_params(style, second)
        if beyond is not None:
            after = page(host, beyond)
            pytest.fail(
                f"{style} page 2 of {2 * PAGE} orders (limit {PAGE}) ends at the last order "
                f"yet has {field} = {second.get(field)!r}; expected null\nFollowing it gives "
                f"a page of {len(after['data'])} rows: every list whose length is a multiple "
                "of the limit ends with a needless round trip to an empty page, and a client "
                "cannot tell 'more' from 'maybe more'. A full page does not mean more rows "
                "exist: fetch limit + 1 rows and link onwards only if the extra one came back "
                "(offset: only if offset + limit < total_count).", pytrace=False)


def no_rows_here(host: str, params: dict[str, Any], situation: str, total: int) -> None:
    """A page with no rows to show is an answer: 200, data [], and no next page."""
    status, doc = get(host, params)
    style = params["style"]
    field = NEXT_FIELD[style]
    query = f"GET /orders?{urlencode(params)}"
    assert status == 200 and isinstance(doc, dict), (
        f"{query}: expected 200 with no orders and {field} null, saw {status} "
        f"{str(doc)[:120]}: {situation}, so this page has no rows - and that is an answer, "
        "not an error: an empty page is {\"data\": [], ...}; code that reads the page's last "
        "row (or the total from its first) must first ask whether there is one")
    assert doc.get("data") == [] and next_params(style, doc) is None, (
        f"{query}: {situation}; expected data [] and {field} null, saw data "
        f"{str(doc.get('data'))[:80]} and {field} = {doc.get(field)!r}")
    if style == "offset":
        assert doc.get("total_count") == total, (
            f"{query}: {situation}; expected total_count {total}, saw "
            f"{doc.get('total_count')!r}: the total counts the orders, not this page's rows")


def test_a_page_with_no_rows_is_empty(host: str, db: Any) -> None:
    """No orders at all, then a link followed after the rest of the list was deleted: each
    style answers 200 with an empty page that links nowhere, never a 500."""
    for style in NEXT_FIELD:
        no_rows_here(host, {"style": style, "limit": PAGE}, "there are no orders at all", 0)
    for style in NEXT_FIELD:
        with db.connect(autocommit=True) as conn:
            conn.execute("TRUNCATE orders")
            for i in range(2 * PAGE):
                conn.execute("INSERT INTO orders (created_at, customer, total_cents) "
                             "VALUES (%s, %s, %s)", (BASE + timedelta(minutes=i), f"e{i}", i))
        following = next_params(style, page(host, {"style": style, "limit": PAGE}))
        assert following is not None, (
            f"{style} page 1 of {2 * PAGE} orders (limit {PAGE}) links nowhere: "
            f"{PAGE} more orders follow")
        with db.connect(autocommit=True) as conn:
            conn.execute("DELETE FROM orders WHERE created_at < %s",
                         (BASE + timedelta(minutes=PAGE),))
        no_rows_here(host, following, f"the {PAGE} orders after page 1 were deleted after "
                     "page 1 was read", PAGE)


@pytest.mark.parametrize("style", ["offset", "cursor", "keyset"])
def test_the_default_limit_is_20(host: str, db: Any, style: str) -> None:
    truth = seed_small(db)
    doc = page(host, {"style": style})
    field = NEXT_FIELD[style]
    got = len(doc["data"])
    assert got == 20, (
        f"GET /orders?style={style} (no limit): expected a page of 20 orders, the documented "
        f"default limit, saw {got} of the {SMALL}: a client that sends no limit gets 20 "
        "(limit is 1..100, default 20) - not the most a page may hold, nor the whole table")
    assert ids(doc) == truth[:20], (
        f"GET /orders?style={style} (no limit): expected ids {truth[:20]}, saw {ids(doc)}")
    assert next_params(style, doc) is not None, (
        f"GET /orders?style={style} (no limit): 20 of {SMALL} orders, yet {field} = "
        f"{doc.get(field)!r}: {SMALL - 20} more orders follow")


def test_bad_cursor_is_400(host: str, db: Any) -> None:
    seed_small(db)
    status, doc = get(host, {"style": "cursor", "limit": PAGE, "cursor": "not-a-cursor!"})
    assert status == 400, (
        f"GET /orders?style=cursor&cursor=not-a-cursor!: expected 400, saw {status} "
        f"{str(doc)[:150]}: a cursor the API did not issue is the client's error")


# ---- forged cursors: the encoding is valid, what it holds is not ---------------------------
# A cursor comes back from the client, so it is untrusted input: a token edited or forged by
# the client must be refused (400) whatever layer is wrong - not only when it fails to decode.
# The forgeries keep the learner's own encoding (base64 / base64url, padded or not, or hex)
# and change only the content: values of the wrong type or unparseable, or another shape.

FORGED_DOCUMENTS: list[tuple[Any, str]] = [
    (5, "a bare number"), (None, "null"), ([], "an empty list"), ("yesterday", "a string"),
    ({"a": 1, "b": 2}, "an object with unknown keys"),
    (["yesterday", 5], "a pair whose time is not a time"),
]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def without_offset(value: Any) -> Any:
    """A time with a UTC offset, as the same wall-clock time in UTC with the offset dropped
    (what a client that assumes UTC writes); anything else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return value
    return value if at.tzinfo is None else at.astimezone(UTC).replace(tzinfo=None).isoformat()


def out_of_range_day(value: Any) -> Any:
    """A time with its date made February 30th (the same shape, no such day); anything
    else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return value
    return re.sub(r"^\d{4}-\d{2}-\d{2}", "2024-02-30", value)


def map_leaves(doc: Any, change: Callable[[Any], Any]) -> Any:
    if isinstance(doc, list):
        return [map_leaves(item, change) for item in doc]
    if isinstance(doc, dict):
        return {key: map_leaves(value, change) for key, value in doc.items()}
    return change(doc)


def numbers_as(doc: Any, number: int) -> Any:
    """The document with each of its numbers replaced by `number`."""
    return map_leaves(doc, lambda v: number if is_number(v) else v)


def content_forgeries(text: str) -> list[tuple[str, str]]:
    """(forged content, what was changed) for the decoded text of an issued cursor."""
    try:
        doc = json.loads(text)
    except ValueError:
        garbled = re.sub(r"\d", "x", text)
        return [(garbled, "its digits replaced by 'x'")] if garbled != text else []
    numbers_as_text = map_leaves(doc, lambda v: "x" if is_number(v) else v)
    strings_as_junk = map_leaves(doc, lambda v: "yesterday" if isinstance(v, str) else v)
    strings_as_numbers = map_leaves(doc, lambda v: 5 if isinstance(v, str) else v)
    # Values of a near type: JSON true is a number to Python's int() and isinstance(v, int),
    # "7" and 7.5 become 7 under int() - each read as an id the API never issued.
    numbers_as_true = map_leaves(doc, lambda v: True if is_number(v) else v)
    numbers_as_digits = map_leaves(doc, lambda v: str(v) if is_number(v) else v)
    numbers_with_fraction = map_leaves(doc, lambda v: v + 0.5 if is_number(v) else v)
    naive_time = map_leaves(doc, without_offset)
    # Values no issued cursor holds, in range for JSON and Python but not for the columns:
    # ids no bigint holds (an overflow as a 500 once they reach Postgres as a bigint, or a
    # page for a position the API never issued), and a date with a day out of range (Postgres
    # refuses it: a 500, when the time was only checked by its pattern).
    past_bigint = [(numbers_as(doc, n), what)
                   for n, what in ((2**63, "2**63, one past bigint's 2**63 - 1"),
                                   (10**30, "10**30, past bigint"),
                                   (-2**63 - 1, "-2**63 - 1, below bigint's -2**63"))]
    day_out_of_range = map_leaves(doc, out_of_range_day)
    forged = [(numbers_as_text, "its numbers replaced by \"x\""),
              (naive_time, "its time given without a UTC offset: a wall-clock time names no "
               "instant - read by Postgres in the session's TimeZone "
               f"({SESSION_ZONE} here, 5 h 30 from UTC) - and RFC 3339 makes the offset part "
               "of every date-time"),
              (strings_as_junk, "its strings replaced by \"yesterday\""),
              (strings_as_numbers, "its strings replaced by the number 5"),
              (numbers_as_true, "its numbers replaced by true, a boolean: not an id, though "
               "Python's int() and isinstance(v, int) both take it for 1"),
              (numbers_as_digits, "its numbers replaced by strings of their digits: a "
               "string is not the id the API issued, though int() reads it as one"),
              (numbers_with_fraction, "its numbers given a fraction (.5): no id has one, "
               "though int() quietly drops it"),
              *FORGED_DOCUMENTS,
              *((d, f"its numbers replaced by {what}: no order has that id, so the API "
                 "never issued this cursor - an id past bigint either overflows on its way "
                 "to Postgres (a 500) or is compared as a position no cursor holds; check "
                 "that the id fits a bigint (-2**63 .. 2**63 - 1)") for d, what in past_bigint),
              (day_out_of_range, "its date changed to February 30th: a string shaped like a "
               "time is not a time - parse it (datetime.fromisoformat) rather than check its "
               "pattern and let Postgres refuse it (a 500)")]
    return [(json.dumps(d), what) for d, what in forged if d != doc]


def cursor_codec(cursor: str) -> tuple[Callable[[str], bytes], Callable[[bytes], str]] | None:
    """(decode, encode) of the issued cursor's own encoding - hex, or base64 / base64url,
    padded or not - or None when it is neither."""
    if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", cursor):
        return bytes.fromhex, cast(Callable[[bytes], str], lambda raw: raw.hex())
    if not re.fullmatch(r"[A-Za-z0-9+/_-]+=*", cursor):
        return None
    url_safe = not re.search(r"[+/]", cursor)
    padded = cursor.endswith("=")

    def decode(token: str) -> bytes:
        token = token + "=" * (-len(token) % 4)
        return (base64.urlsafe_b64decode if url_safe else base64.b64decode)(token)

    def encode(raw: bytes) -> str:
        token = (base64.urlsafe_b64encode if url_safe else base64.b64encode)(raw).decode()
        return token if padded else token.rstrip("=")

    return decode, encode


def cursor_text(cursor: str) -> tuple[str, Callable[[bytes], str]] | None:
    """What an issued cursor holds, as text, and how to encode an edited one the same way;
    None when it is neither base64 nor hex of UTF-8 text (signed or encrypted: nothing to
    edit)."""
    codec = cursor_codec(cursor)
    if codec is None:
        return None
    decode, encode = codec
    try:
        return decode(cursor).decode(), encode
    except (ValueError, UnicodeDecodeError):
        return None


def forged_cursors(cursor: str) -> list[tuple[str, str]]:
    """(forged cursor, description) in the issued cursor's own encoding; [] when there is
    nothing to edit."""
    held = cursor_text(cursor)
    if held is None:
        return []
    text, encode = held
    return [(encode(content.encode()), f"the issued cursor {cursor!r} decodes to {text!r}; "
             f"this one decodes to {content!r} ({what})")
            for content, what in content_forgeries(text)]


def test_forged_cursor_is_400(host: str, db: Any) -> None:
    seed_small(db)
    cursor = page(host, {"style": "cursor", "limit": PAGE}).get("next_cursor")
    assert isinstance(cursor, str) and cursor, (
        f"cursor page 1: expected a next_cursor string, saw {cursor!r}")
    for forged, how in forged_cursors(cursor):
        status, doc = get(host, {"style": "cursor", "limit": PAGE, "cursor": forged})
        assert status == 400, (
            f"GET /orders?style=cursor&cursor={forged}: expected 400, saw {status} "
            f"{str(doc)[:120]}: {how}. A cursor comes back from the client, so it is "
            "untrusted input: one the API did not issue is refused with 400 whatever is "
            "wrong inside it - validate what it holds (types, a parseable time, the shape), "
            "not only that it decodes")


# Ids at and below zero fit a bigint but are no order's (identity ids start at 1); a cursor
# holding one is still a position: (t, 0) sorts after every order of instant t, so the page
# after it starts with the orders older than t. Answered as that page, or refused (400) as a
# cursor the API never issued - never read as "no position" (the first page), never a 500.
IDS_BELOW_ONE = [0, -1, -2**63]


def id_replaced(doc: Any, old: int, new: int) -> Any:
    """The document with each number equal to `old` (the id) replaced by `new`."""
    return map_leaves(doc, lambda v: new if is_number(v) and v == old else v)


def test_a_cursor_id_below_one_is_a_position_or_400(host: str, db: Any) -> None:
    seed_small(db)
    limit = PAGE - 1  # page 1 ends inside a tie group: the id decides where page 2 starts
    first = page(host, {"style": "cursor", "limit": limit})
    cursor = first.get("next_cursor")
    assert isinstance(cursor, str) and cursor and first["data"], (
        f"cursor page 1: expected orders and a next_cursor string, saw {cursor!r}")
    held = cursor_text(cursor)
    if held is None:
        return  # sealed: the client cannot edit it
    text, encode = held
    try:
        issued = json.loads(text)
    except ValueError:
        return
    last_id = ids(first)[-1]
    with db.connect(autocommit=True) as conn:
        row = conn.execute("SELECT created_at FROM orders WHERE id = %s", (last_id,)).fetchone()
        assert row is not None
        at = row[0]
        for below in IDS_BELOW_ONE:
            content = json.dumps(id_replaced(issued, last_id, below))
            if content == text or json.loads(content) == issued:
                return  # the id is not a number in it
            expected = [r[0] for r in conn.execute(
                "SELECT id FROM orders WHERE (created_at, id) < (%s, %s) "
                "ORDER BY created_at DESC, id DESC LIMIT %s", (at, below, limit)).fetchall()]
            params = {"style": "cursor", "limit": limit, "cursor": encode(content.encode())}
            status, doc = get(host, params)
            what = (f"the issued cursor {cursor!r} decodes to {text!r}; this one to {content!r}, "
                    f"the id {last_id} replaced by {below}")
            assert status in (200, 400), (
                f"GET /orders?{urlencode(params)}: expected 200 or 400, saw {status} "
                f"{str(doc)[:120]}: {what}. An id below 1 fits a bigint, and no order has "
                "it: as a position it sorts after every order of that instant, or the cursor "
                "is refused as one the API never issued (400) - never a crash")
            if status == 200:
                got = ids(doc)
                first_page = " - the first page: the id was read as no position at all" if (
                    got == ids(first)) else ""
                assert got == expected, (
                    f"GET /orders?{urlencode(params)}: {what}; expected the orders after the "
                    f"position ({at.isoformat()}, {below}): {expected}, or 400, saw "
                    f"{got}{first_page}. A cursor is a position, whatever id it holds: an id "
                    "the API never issued is compared as it is or refused (400), never read "
                    "as something else")


@pytest.mark.parametrize(("before_created_at", "before_id"), [
    ("yesterday", "7"), ("2024-03-01T12:00:00+00:00", "x"), ("2024-03-01T12:00:00+00:00", ""),
])
def test_bad_keyset_position_is_400(host: str, db: Any, before_created_at: str,
                                    before_id: str) -> None:
    seed_small(db)
    params = {"style": "keyset", "limit": PAGE, "before_created_at": before_created_at,
              "before_id": before_id}
    status, doc = get(host, params)
    assert status == 400, (
        f"GET /orders?{urlencode(params)}: expected 400, saw {status} {str(doc)[:120]}: the "
        "position comes from the client; a time that is not ISO 8601 or an id that is not an "
        "integer is the client's error (400), never a crash (500)")


def test_a_keyset_time_without_offset_is_400(host: str, db: Any) -> None:
    """A position is an instant. 2024-03-01T12:03:00 names none: Postgres reads a time
    without an offset in the session's TimeZone (here not UTC), Python's astimezone() in the
    server's; each server setting gives the same link another page. Refused with 400."""
    seed_small(db)
    following = page(host, {"style": "keyset", "limit": PAGE}).get("next")
    assert isinstance(following, dict) and "before_created_at" in following, (
        f"keyset page 1: expected next = {{\"before_created_at\": ..., \"before_id\": ...}}, "
        f"saw {following!r}")
    issued = following["before_created_at"]
    naive = without_offset(issued)
    params = {"style": "keyset", "limit": PAGE, "before_created_at": naive,
              "before_id": following["before_id"]}
    status, doc = get(host, params)
    rows = ids(doc) if status == 200 and isinstance(doc, dict) else None
    assert status == 400, (
        f"GET /orders?{urlencode(params)}: expected 400, saw {status} "
        + (f"with orders {rows}" if rows is not None else str(doc)[:120])
        + f": before_created_at {naive!r} has no UTC offset (the API issued {issued!r}). A "
        "position is an instant, and a time without an offset names none: Postgres reads it "
        f"in the session's TimeZone ({SESSION_ZONE} here, 5 h 30 from UTC), astimezone() in "
        "the server's own zone, so the same link gives another page on another server. "
        "RFC 3339 (5.6) makes the offset part of every date-time: refuse one without (400)")


@pytest.mark.parametrize("given", [
    {"before_created_at": "2024-03-01T12:03:00.412610+00:00"},
    {"before_id": "7"},
])
def test_half_a_keyset_position_is_400(host: str, db: Any, given: dict[str, str]) -> None:
    seed_small(db)
    params = {"style": "keyset", "limit": PAGE, **given}
    status, doc = get(host, params)
    missing = ({"before_created_at", "before_id"} - set(given)).pop()
    rows = ids(doc) if status == 200 and isinstance(doc, dict) else None
    assert status == 400, (
        f"GET /orders?{urlencode(params)}: expected 400, saw {status} "
        + (f"with orders {rows}" if rows is not None else str(doc)[:120])
        + f": the position has {', '.join(given)} but no {missing}. A position is the pair "
        "(created_at, id); half of one is no position - answered as the first page (or "
        "read with a made-up other half) the client's next page silently starts somewhere "
        "else than where it asked; refuse it with 400")


# The refusals below are each one request that must change nothing: every case is sent to
# one app over one seeded table (a test per case cost a database, a server and, graded, a
# learner process each: most of the lab's time), in the order the cases were once listed.
def test_limit_out_of_bounds_is_400(host: str, db: Any) -> None:
    seed_small(db)
    for limit in (101, 0, -1, "ten"):
        for style in ("offset", "cursor", "keyset"):
            status, doc = get(host, {"style": style, "limit": limit})
            rows = len(doc.get("data") or []) if isinstance(doc, dict) else 0
            assert status == 400, (
                f"GET /orders?style={style}&limit={limit}: expected 400, saw {status}"
                + (f" with {rows} orders" if status == 200 else f" {str(doc)[:120]}")
                + ": limit is 1..100 - the upper bound is what keeps one request from "
                "reading (and sending) the whole table; refuse a limit outside it instead "
                "of serving it")


# An offset the client got wrong: below zero (Postgres refuses a negative OFFSET), not a
# number, not a whole number, and past what OFFSET holds (a bigint): each is the client's
# error, checked before any query runs.
def test_bad_offset_is_400(host: str, db: Any) -> None:
    seed_small(db)
    for offset in ("-1", "ten", "2.5", str(2**63)):
        status, doc = get(host, {"style": "offset", "limit": PAGE, "offset": offset})
        rows = len(doc.get("data") or []) if isinstance(doc, dict) else 0
        assert status == 400, (
            f"GET /orders?style=offset&limit={PAGE}&offset={offset}: expected 400, saw "
            f"{status}" + (f" with {rows} orders" if status == 200 else f" {str(doc)[:120]}")
            + ": offset comes from the client and must be a whole number from 0 up to what "
            "OFFSET takes (a bigint); refuse anything else with 400 before querying - a "
            "value Postgres refuses (a negative OFFSET, one past bigint) must not become a "
            "500, nor be quietly read as 0")


# Numbers that Python's int() reads but no client writes on purpose: a space, a sign, an
# underscore, digits of another script. Each is a client's bug to report (400), not a number
# to guess: "read as something else" is a page the client did not ask for.
NOT_ASCII_WHOLE = [" 5", "+5", "1_0", "\u0665", "\uff15", "-5"]  # ٥ Arabic-Indic, ５ fullwidth


def test_numbers_are_ascii_digits(host: str, db: Any) -> None:
    seed_small(db)
    for value in NOT_ASCII_WHOLE:
        for name in ("limit", "offset", "before_id"):
            params: dict[str, Any] = {"style": "keyset" if name == "before_id" else "offset",
                                      "limit": PAGE, name: value}
            if name == "before_id":
                params["before_created_at"] = "2024-03-01T12:03:00.412610+00:00"
            status, doc = get(host, params)
            rows = len(doc.get("data") or []) if isinstance(doc, dict) else 0
            assert status == 400, (
                f"GET /orders?{urlencode(params)}: expected 400, saw {status}"
                + (f" with {rows} orders" if status == 200 else f" {str(doc)[:120]}")
                + f": {name}={value!r} is not a whole number written in ASCII digits, yet "
                f"Python's int() reads it as {int(value)} (it takes spaces, signs, "
                "underscores and any script's digits); str.isdigit() is no check either (it "
                "is true for '\u0665' and '\u00b2'). Accept only 0-9 (e.g. value.isascii() "
                "and value.isdigit()) and refuse the rest with 400, never read it as "
                "something else")


@pytest.mark.parametrize("before_id", [str(2**63), str(10**30)])
def test_a_keyset_id_past_bigint_is_no_crash(host: str, db: Any, before_id: str) -> None:
    """before_id is a whole number in ASCII digits, and nothing says it fits a bigint: one
    past 2**63 - 1 is after every id there is (every order of that instant and older
    follows), or a 400 - never Postgres' or psycopg's overflow as a 500."""
    truth = seed_small(db)
    params = {"style": "keyset", "limit": PAGE, "before_id": before_id,
              "before_created_at": "2030-01-01T00:00:00+00:00"}
    status, doc = get(host, params)
    assert status in (200, 400), (
        f"GET /orders?{urlencode(params)}: expected 200 (the first {PAGE} orders: every one "
        f"is before that position) or 400, saw {status} {str(doc)[:120]}: a before_id past "
        "bigint's 2**63 - 1 overflowed on its way to Postgres (a ::bigint cast, or a value "
        "dumped as int8) - the client's number is input: compare it as it is, or refuse it "
        "with 400")
    if status == 200:
        assert ids(doc) == truth[:PAGE], (
            f"GET /orders?{urlencode(params)}: every order is before that position, so "
            f"expected ids {truth[:PAGE]}, saw {ids(doc)}")


def test_total_count_follows_the_table(host: str, db: Any) -> None:
    """total_count is what the table holds now: the same request after three inserts counts
    them (a count kept from an earlier request, in the module or the app, is stale)."""
    seed_small(db)
    first = page(host, {"style": "offset", "limit": PAGE})
    with db.connect(autocommit=True) as conn:
        for i in range(3):
            conn.execute("INSERT INTO orders (created_at, customer, total_cents) "
                         "VALUES (%s, %s, %s)", (BASE - timedelta(days=1, minutes=i), "n", i))
    again = page(host, {"style": "offset", "limit": PAGE,
                        "offset": SMALL})
    assert (first.get("total_count"), again.get("total_count")) == (SMALL, SMALL + 3), (
        f"offset pages before and after 3 orders were inserted: expected total_count "
        f"{SMALL}, then {SMALL + 3}, saw {first.get('total_count')!r}, then "
        f"{again.get('total_count')!r}: the count was kept from an earlier request - the app "
        "must hold no copy of the data between requests (another instance, or another "
        "writer, changes the table): count in each request")
    assert len(again["data"]) == 3 and again.get("next_offset") is None, (
        f"offset page at offset {SMALL} after 3 inserts: expected the 3 new orders and "
        f"next_offset null, saw {len(again['data'])} rows, next_offset "
        f"{again.get('next_offset')!r}")


def test_cursor_is_opaque(host: str, db: Any) -> None:
    seed_small(db)
    cursor = page(host, {"style": "cursor", "limit": PAGE}).get("next_cursor")
    assert isinstance(cursor, str) and cursor, (
        f"cursor page 1: expected a next_cursor string, saw {cursor!r}")
    assert not cursor.isdigit(), (
        f"cursor page 1: next_cursor is {cursor!r}, a bare number: that is an offset in "
        "disguise, and clients will start doing arithmetic on it")


def test_keyset_plan_uses_the_index(host: str, db: Any, connect: Explained) -> None:
    with db.connect(autocommit=True) as conn:
        seed_big(conn)
        after_created, after_id = conn.execute(
            "SELECT created_at, id FROM orders ORDER BY created_at DESC, id DESC "
            "OFFSET %s LIMIT 1", (DEEP - 1,)).fetchone()
        expected = [r[0] for r in conn.execute(
            "SELECT id FROM orders ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 10",
            (DEEP,)).fetchall()]
    connect.take()
    doc = page(host, {"style": "keyset", "limit": 10,
                      "before_created_at": after_created.isoformat(), "before_id": after_id})
    assert ids(doc) == expected, (
        f"keyset page after row {DEEP}: expected ids {expected}, saw {ids(doc)}")
    check_page_plans(connect.take(), "keyset page of 10 after row 15,000", 10)


def check_page_plans(taken: list[dict[str, Any]], what: str, limit: int) -> None:
    """Every statement on orders behind one page: through orders_newest_first, no Sort, no
    Seq Scan, and no more index entries read than the page's rows plus one."""
    plans = [p for p in taken if "orders" in p.get("Query Text", "")]
    assert plans, (
        "no query on orders reached Postgres through the connection given to make_app: use "
        "connect() for every query (the test reads the server's plans from it)")
    for plan in plans:
        query = " ".join(plan.get("Query Text", "").split())
        counting = "count(" in query.lower()
        why_not_scan = (
            "a keyset or cursor page must not count the table (no total_count): a count reads "
            "every row, so the page costs what the table's size does" if counting else
            "the position must be an index condition - WHERE (created_at, id) < (x, y) - so the "
            "scan starts there instead of filtering from the top")
        for node in nodes(plan["Plan"]):
            kind = node.get("Node Type", "")
            assert kind not in ("Sort", "Incremental Sort"), (
                f"{what}: Postgres sorted rows ({kind}) for {query!r}: ORDER BY must "
                "match the index (created_at DESC, id DESC) so the index gives the order")
            assert not (kind == "Seq Scan" and node.get("Relation Name") == "orders"), (
                f"{what}: Postgres read the whole table (Seq Scan on orders) for "
                f"{query!r}: {why_not_scan}")
            if kind in ("Index Scan", "Index Only Scan") and node.get("Relation Name") == "orders":
                read = int(node.get("Actual Rows", 0)) + int(node.get("Rows Removed by Filter", 0))
                assert read <= limit + 1, (
                    f"{what}: Postgres read {read} index entries for {query!r} "
                    f"(Index Cond {node.get('Index Cond')!r}, Filter {node.get('Filter')!r}): "
                    f"{why_not_scan}")
    scans = [n for p in plans for n in nodes(p["Plan"])
             if n.get("Node Type") in ("Index Scan", "Index Only Scan")
             and n.get("Index Name") == "orders_newest_first"]
    assert scans, (
        f"{what}: no plan used the index orders_newest_first: "
        + "; ".join(" ".join(p.get("Query Text", "").split()) for p in plans))


def test_cursor_plan_uses_the_index(host: str, db: Any, connect: Explained) -> None:
    """Cursor pages are keyset pages with the position sealed: each must seek in the index
    too, page 3 costing what page 1 costs."""
    with db.connect(autocommit=True) as conn:
        seed_big(conn)
        truth = [r[0] for r in conn.execute(
            "SELECT id FROM orders ORDER BY created_at DESC, id DESC LIMIT 30").fetchall()]
    params: dict[str, Any] = {"style": "cursor", "limit": 10}
    for number in (1, 2, 3):
        connect.take()
        doc = page(host, params)
        assert ids(doc) == truth[10 * (number - 1):10 * number], (
            f"cursor page {number} of 10: expected ids {truth[10 * (number - 1):10 * number]}, "
            f"saw {ids(doc)}")
        check_page_plans(connect.take(), f"cursor page {number} of 10 (of {BIG:,} orders)",
                         10)
        cursor = doc.get("next_cursor")
        assert isinstance(cursor, str) and cursor, (
            f"cursor page {number}: expected a next_cursor string, saw {cursor!r}")
        params = {"style": "cursor", "limit": 10, "cursor": cursor}
