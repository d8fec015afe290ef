"""Verification for ph1.3 method-idempotency.

Two instances of the learner's make_app(dsn) run behind real HTTP servers (wsgiref,
threaded, 127.0.0.1:0) over one database. The concurrent replay is driven step by step:
the test holds a SHARE lock on `orders`, fires the requests from threads released together
by a barrier, waits until every one of them is blocked inside Postgres, then lets them go.
Any implementation that decides "this key is new" before the first insert commits is then
caught every time, not only when the scheduler happens to interleave badly.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from labrunner.testing import HttpReply, call, serve_wsgi

SCHEMA = """
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE orders (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users,
    item       text NOT NULL,
    quantity   integer NOT NULL CHECK (quantity > 0),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE idempotency_keys (
    key             text PRIMARY KEY,
    request_hash    text NOT NULL,
    response_status integer,
    response_body   text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO users VALUES (1, 'Ada Lovelace', 'ada@example.com');
"""
ORDER = {"user_id": 1, "item": "keyboard", "quantity": 2}
NEW_USER = 99  # no such user until test_failed_attempt_does_not_burn_the_key adds it
CONCURRENT = 4


# ---- requests to the learner's app (served with labrunner.testing.serve_wsgi) ------------

def post_order(host: str, key: str | None, order: dict[str, Any] = ORDER) -> HttpReply:
    return call(host, "POST", "/orders", order, {} if key is None else {"Idempotency-Key": key})


# ---- fixtures and checks ----------------------------------------------------------------

@pytest.fixture
def db(postgres: Any) -> Any:
    with postgres.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    return postgres


@pytest.fixture
def instances(learner: Any, db: Any) -> Iterator[list[str]]:
    """Two app instances (two make_app calls, two servers) over one database."""
    make_app = learner.function("idempotency_api", "make_app")
    with ExitStack() as stack:
        yield [stack.enter_context(serve_wsgi(make_app(db.dsn))) for _ in range(2)]


def rows(db: Any, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with db.connect(autocommit=True) as conn:
        return list(conn.execute(sql, params).fetchall())


def order_count(db: Any) -> int:
    return int(rows(db, "SELECT count(*) FROM orders")[0][0])


def assert_one_order(db: Any, attempts: int, how: str) -> None:
    count = order_count(db)
    why = ("the key must make every retry of the same attempt a no-op" if how != "concurrent"
           else "requests that arrived together each found the key new - a check (SELECT) "
           "then insert races; claim the key with one atomic statement (INSERT ... ON "
           "CONFLICT on its primary key) in the same transaction as the order")
    assert count == 1, (
        f"{attempts} {how} POSTs with one Idempotency-Key created {count} orders, expected 1: "
        f"{why}")


def assert_same_reply(first: HttpReply, other: HttpReply, what: str) -> None:
    assert other.status == first.status, (
        f"{what}: expected the stored status {first.status}, saw {other.status} "
        f"{other.body[:200]!r}: a replay answers exactly like the first attempt")
    assert other.json() == first.json(), (
        f"{what}: expected the stored body {first.body.decode()[:200]}, saw "
        f"{other.body.decode()[:200]}: a retrying client must get the same answer, "
        "or it cannot tell which order it has")
    assert other.headers.get("Location") == first.headers.get("Location"), (
        f"{what}: expected Location {first.headers.get('Location')!r}, saw "
        f"{other.headers.get('Location')!r}")


def wait_for_lock_waiters(db: Any, count: int, timeout: float) -> int:
    """Poll Postgres until `count` sessions of this database wait on a lock (the requests
    are all inside the server), or the timeout passes; return how many were seen."""
    deadline, seen = time.monotonic() + timeout, 0
    with db.connect(autocommit=True) as conn:
        while time.monotonic() < deadline:
            seen = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'").fetchone()[0]
            if seen >= count:
                break
            time.sleep(0.02)
    return int(seen)


# ---- the verification -------------------------------------------------------------------

def test_put_is_idempotent(instances: list[str], db: Any) -> None:
    user = {"name": "Grace Hopper", "email": "grace@example.com"}
    replies = [call(instances[i % 2], "PUT", "/users/7", user) for i in range(3)]
    statuses = [r.status for r in replies]
    assert statuses[0] in (200, 201, 204) and all(s in (200, 204) for s in statuses[1:]), (
        f"PUT /users/7 three times: expected 201 (or 200/204) then 200/204, saw {statuses}: "
        "PUT names its target, so a repeat replaces it instead of failing or adding")
    stored = rows(db, "SELECT id, name, email FROM users WHERE id = 7 OR email = %s",
                  user["email"])
    assert stored == [(7, user["name"], user["email"])], (
        f"after three identical PUT /users/7 expected exactly one row (7, {user['name']!r}, "
        f"{user['email']!r}), saw {stored}: PUT must leave one state however often it runs")
    changed = {"name": "Grace B. Hopper", "email": "grace@navy.mil"}
    reply = call(instances[1], "PUT", "/users/7", changed)
    assert reply.status in (200, 204), (
        f"PUT /users/7 with a new representation: expected 200 or 204, saw {reply.status}")
    stored = rows(db, "SELECT id, name, email FROM users WHERE id = 7")
    assert stored == [(7, changed["name"], changed["email"])], (
        f"PUT /users/7 replaces the user: expected {changed}, saw {stored}")


def test_concurrent_puts_of_a_new_user_both_succeed(instances: list[str], db: Any) -> None:
    user = {"name": "Barbara Liskov", "email": "barbara@example.com"}
    barrier = threading.Barrier(3)
    replies: list[HttpReply | BaseException | None] = [None, None]

    def fire(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = call(instances[i], "PUT", "/users/9", user)
        except BaseException as exc:  # noqa: BLE001 - reported below
            replies[i] = exc

    threads = [threading.Thread(target=fire, args=(i,), daemon=True) for i in range(2)]
    with db.connect() as gate:
        # Reads go through, every write to users waits: both requests get as far as their
        # write before either of them can write.
        gate.execute("LOCK TABLE users IN SHARE MODE")
        for thread in threads:
            thread.start()
        barrier.wait()
        wait_for_lock_waiters(db, 2, timeout=3.0)
        gate.commit()
    for thread in threads:
        thread.join(20)
    failures = [r for r in replies if not isinstance(r, HttpReply)]
    assert not failures, f"concurrent PUTs did not complete: {failures}"
    statuses = sorted(r.status for r in replies if isinstance(r, HttpReply))
    assert statuses in ([200, 201], [201, 204]), (
        f"two concurrent PUT /users/9 (a new id) on the two instances: expected one 201 "
        f"(created) and one 200/204 (replaced), saw {statuses}: both requests looked the row "
        "up, both found nothing and both INSERTed - the second INSERT hit the primary key. "
        "A look-up then INSERT-or-UPDATE is not atomic; make PUT one upsert (INSERT ... ON "
        "CONFLICT (id) DO UPDATE), so the second waits for the first and replaces its row")
    stored = rows(db, "SELECT id, name, email FROM users WHERE id = 9")
    assert stored == [(9, user["name"], user["email"])], (
        f"after two concurrent PUT /users/9 expected one row, saw {stored}")


def test_delete_of_a_user_with_orders_is_409(instances: list[str], db: Any) -> None:
    """A user with orders cannot go: the orders reference it and the schema has no cascade
    (an order is a record of a purchase, and its key's stored response replays it). The
    request conflicts with the resource's state - 409 (RFC 9110 15.5.10), on every repeat,
    and nothing changes."""
    rows(db, "INSERT INTO users VALUES (8, 'Alan Turing', 'alan@example.com') RETURNING id")
    key = str(uuid.uuid4())
    ordered = post_order(instances[0], key, {**ORDER, "user_id": 8})
    assert ordered.status == 201, (
        f"POST /orders for user 8: expected 201, saw {ordered.status} {ordered.body[:200]!r}")
    for n, host in enumerate(instances, start=1):
        reply = call(host, "DELETE", "/users/8")
        users = rows(db, "SELECT id FROM users WHERE id = 8")
        orders = order_count(db)
        assert reply.status == 409 and users and orders == 1, (
            f"DELETE /users/8 (#{n}), a user with 1 order: expected 409 Conflict with the "
            f"user and the order kept, saw {reply.status} {reply.body[:150]!r}, the user "
            f"{'kept' if users else 'deleted'} and {orders} order(s) left: "
            + ("the foreign key refused the DELETE and its error became a server error - "
               "a state conflict is the client's to resolve, never a 5xx: catch the "
               "ForeignKeyViolation and answer 409" if reply.status >= 500 else
               "the user's orders were deleted with it - the orders reference their user "
               "with no cascade in the schema: they are records of purchases (and a replay "
               "of their keys still answers with them), not the user's to take along"
               if orders != 1 else
               "the user is still there, so a 2xx tells the client something that did not "
               "happen" if users else "the user was deleted though orders reference it"))
    assert_same_reply(ordered, post_order(instances[0], key, {**ORDER, "user_id": 8}),
                      "a replay of the order's key after the refused DELETEs")


# A PUT is the user's whole new state (RFC 9110 9.3.4); a representation without a field is
# no user (both columns are NOT NULL), not "keep the old value" - that is PATCH.
PARTIAL_USERS = [({"name": "Grace Hopper"}, "without email"),
                 ({"email": "grace@navy.mil"}, "without name")]


def test_put_replaces_the_whole_user(instances: list[str], db: Any) -> None:
    user = {"name": "Grace B. Hopper", "email": "grace@example.com"}
    reply = call(instances[0], "PUT", "/users/7", user)
    assert reply.status in (200, 201, 204), f"PUT /users/7 {user}: saw {reply.status}"
    for n, (partial, how) in enumerate(PARTIAL_USERS, start=1):
        reply = call(instances[n % 2], "PUT", "/users/7", partial)
        stored = rows(db, "SELECT name, email FROM users WHERE id = 7")
        assert reply.status in (400, 422) and stored == [(user["name"], user["email"])], (
            f"PUT /users/7 with {partial} ({how}) over {user}: expected 422 (or 400) and the "
            f"user unchanged, saw {reply.status} and the row {stored}: PUT replaces the whole "
            "resource with the representation sent (RFC 9110 9.3.4) - a missing field is an "
            "incomplete user, refused; keeping the old value (or filling a default) makes "
            "PUT a PATCH, and a client that meant to replace the user silently did not")


def test_delete_is_idempotent(instances: list[str], db: Any) -> None:
    rows(db, "INSERT INTO users VALUES (8, 'Alan Turing', 'alan@example.com') RETURNING id")
    first = call(instances[0], "DELETE", "/users/8")
    second = call(instances[1], "DELETE", "/users/8")
    assert first.status == 204 and second.status in (204, 404), (
        f"DELETE /users/8 twice: expected 204 then 204 or 404, saw {first.status} then "
        f"{second.status}: a repeated DELETE must not fail with a server error")
    left = [r[0] for r in rows(db, "SELECT id FROM users ORDER BY id")]
    assert left == [1], f"after DELETE /users/8 expected users [1] to remain, saw {left}"


# Ids in the path that no bigint holds: the users' and orders' ids are bigint, so no
# resource has them, and a query with one overflows (psycopg: NumericValueOutOfRange).
HUGE_IDS = [str(2**63), "1" + "0" * 20]


def test_ids_beyond_bigint_in_the_path_are_4xx(instances: list[str], db: Any) -> None:
    user = {"name": "Big Number", "email": "big@example.com"}
    for n, huge in enumerate(HUGE_IDS):
        for method, path, body in (("PUT", f"/users/{huge}", user),
                                   ("DELETE", f"/users/{huge}", None),
                                   ("GET", f"/orders/{huge}", None)):
            reply = call(instances[n % 2], method, path, body)
            assert 400 <= reply.status < 500, (
                f"{method} {path} ({len(huge)} digits, beyond bigint's 2**63 - 1): expected "
                f"a 4xx (404, or 400/422), saw {reply.status} {reply.body[:150]!r}: no row "
                "has this id and the query with it overflows the bigint column - check the "
                "id's range before the database sees it (a pattern of \\d+ or \\d{1,19} "
                "is not enough)")
    left = [r[0] for r in rows(db, "SELECT id FROM users ORDER BY id")]
    assert left == [1], f"PUT/DELETE of ids beyond bigint changed the users: {left}"


# A key names one client's attempt. An empty or blank value (an unset template variable)
# names nothing: taken as the key "", every such POST from every client is one attempt.
MISSING_KEYS = [
    (None, "without Idempotency-Key",
     "without a key the server cannot tell a retry from a second order"),
    ("", "with an empty Idempotency-Key header",
     "an empty key names no attempt, so it is no key: taken as the key '', every blank-keyed "
     "POST from every client would be one attempt (later ones handed the first one's order), "
     "and taken as 'no deduplication' a retry would create a second order"),
    ("   ", "with a blank Idempotency-Key header ('   ')",
     "a blank key names no attempt, so it is no key, just like an empty one"),
]


@pytest.mark.parametrize(("key", "how", "why"), MISSING_KEYS, ids=["absent", "empty", "blank"])
def test_post_needs_a_key(instances: list[str], db: Any, key: str | None, how: str,
                          why: str) -> None:
    for host in instances:  # twice: a second blank-keyed POST must not replay the first
        reply = post_order(host, key)
        assert reply.status == 400, (
            f"POST /orders {how}: expected 400, saw {reply.status} {reply.body[:200]!r}: "
            f"{why}")
    assert order_count(db) == 0, f"POST /orders {how} must not create an order"


# Values the database would refuse with an error: the CHECK (quantity > 0), numbers beyond
# the columns' types (quantity integer, user_id bigint), and the wrong JSON types. Each is
# the client's mistake: 422 (or 400), checked before the database sees it, on every attempt.
REFUSED_BY_THE_DATABASE = ("the database refuses it with an error, and a server error "
                           "(5xx) tells the client to retry the same mistake later: check "
                           "the value before the database sees it")
INVALID_ORDERS = [
    ({**ORDER, "quantity": 0}, "quantity 0",
     "the CHECK (quantity > 0) refuses 0 - a quantity is at least 1, not merely not negative"),
    ({**ORDER, "quantity": -3}, "a negative quantity", "the CHECK (quantity > 0) refuses it"),
    ({**ORDER, "quantity": 2**31}, "quantity 2147483648",
     "orders.quantity is an integer (at most 2147483647): a larger number overflows it"),
    ({**ORDER, "user_id": 2**63}, "user_id 2**63",
     "users.id is a bigint (at most 2**63 - 1): no user has this id, and the query with it "
     "overflows"),
    ({**ORDER, "quantity": "2"}, "quantity a string", "quantity is a JSON number"),
    ({**ORDER, "quantity": True}, "quantity true",
     "true is a JSON boolean, not a number: Python's bool is an int (isinstance(True, int) "
     "holds), so a type check by isinstance alone lets it through to the integer column"),
    ({**ORDER, "user_id": True}, "user_id true",
     "true is a JSON boolean, not a user id: Python's bool is an int (isinstance(True, int) "
     "holds), so a type check by isinstance alone lets it through to the bigint column"),
    ({**ORDER, "quantity": 2.5}, "quantity 2.5", "quantity is a whole number"),
    ({"user_id": 1, "item": "keyboard"}, "no quantity", "an order has a quantity"),
    ({**ORDER, "item": "key\u0000board"}, "a NUL character in item",
     "a Postgres text value cannot hold NUL (psycopg refuses to send it: DataError)"),
]


def test_invalid_order_is_422(instances: list[str], db: Any) -> None:
    for n, (order, what, why) in enumerate(INVALID_ORDERS):
        key = str(uuid.uuid4())
        for attempt, host in enumerate([instances[n % 2], instances[(n + 1) % 2]], start=1):
            reply = post_order(host, key, order)
            assert reply.status in (400, 422), (
                f"POST /orders with {order} ({what}), attempt {attempt} with its key: "
                f"expected 422 (or 400), saw {reply.status} {reply.body[:150]!r}: {why}; "
                + (REFUSED_BY_THE_DATABASE if reply.status >= 500 else
                   "an invalid order is the client's mistake"))
        assert order_count(db) == 0, (
            f"POST /orders with {order} ({what}) created an order")


# A NUL character is valid JSON ("\u0000") and may even come in a header, but a Postgres
# text value cannot hold one: psycopg refuses to send it (DataError). Every such request is
# the client's bad input - 422 (or 400) for a field, 400 for the header (RFC 9110 5.5: a
# field value holding NUL is invalid) - and stores nothing: no user, no order, no key.
NUL_REQUESTS: list[tuple[str, str, dict[str, Any], dict[str, str], str, set[int]]] = [
    ("PUT", "/users/8", {"name": "Bo\u0000b", "email": "bob@example.com"}, {},
     "a NUL character in name", {400, 422}),
    ("PUT", "/users/8", {"name": "Bob", "email": "bob\u0000@example.com"}, {},
     "a NUL character in email", {400, 422}),
    ("POST", "/orders", {**ORDER, "item": "\u0000"}, {"Idempotency-Key": "nul-item"},
     "a NUL character as the item", {400, 422}),
    ("POST", "/orders", ORDER, {"Idempotency-Key": "order\x00-1"},
     "a NUL character in the Idempotency-Key header", {400}),
]
STORED = ("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM orders), "
          "(SELECT count(*) FROM idempotency_keys)")


def test_text_with_a_nul_character_is_refused(instances: list[str], db: Any) -> None:
    before = rows(db, STORED)
    for n, (method, path, body, headers, what, wanted) in enumerate(NUL_REQUESTS):
        reply = call(instances[n % 2], method, path, body, headers)
        after = rows(db, STORED)
        assert reply.status in wanted and after == before, (
            f"{method} {path} with {what}: expected "
            f"{'422 (or 400)' if 422 in wanted else '400'} and nothing stored, saw "
            f"{reply.status} {reply.body[:150]!r}"
            + (f" and (users, orders, keys) went from {before[0]} to {after[0]}"
               if after != before else "")
            + ": a Postgres text value cannot hold NUL, so this request cannot be stored as "
            "sent - the client's bad input, refused before the database sees it"
            + (" (psycopg raised DataError and it became a server error: check every text "
               "the request brings, the header's too)" if reply.status >= 500 else
               "; never stored with the character dropped" if after != before else
               "; a field value holding NUL makes the request invalid (RFC 9110 5.5): 400"
               if wanted == {400} else ""))


# "\ud800" with no low surrogate after it is valid JSON syntax, but it names no character
# (RFC 8259 8.2: unpredictable; I-JSON, RFC 7493, forbids it): json.loads gives a str that
# no UTF-8 encodes, so psycopg cannot send it (UnicodeEncodeError). The client's bad input
# again: 422 (or 400) and nothing stored. A surrogate PAIR is one character, and fine.
SURROGATE_REQUESTS: list[tuple[str, str, dict[str, Any], dict[str, str], str]] = [
    ("PUT", "/users/8", {"name": "Bob \ud800", "email": "bob@example.com"}, {},
     "an unpaired surrogate in name"),
    ("POST", "/orders", {**ORDER, "item": "key\udfffcap"}, {"Idempotency-Key": "lone-item"},
     "an unpaired surrogate in the item"),
]


def test_text_with_an_unpaired_surrogate_is_refused(instances: list[str], db: Any) -> None:
    before = rows(db, STORED)
    for n, (method, path, body, headers, what) in enumerate(SURROGATE_REQUESTS):
        reply = call(instances[n % 2], method, path, body, headers)
        after = rows(db, STORED)
        assert reply.status in (400, 422) and after == before, (
            f"{method} {path} with {what} (the JSON escape {ascii(body)[1:-1][:90]}): "
            f"expected 422 (or 400) and nothing stored, saw {reply.status} "
            f"{reply.body[:120]!r}"
            + (f" and (users, orders, keys) went from {before[0]} to {after[0]}"
               if after != before else "")
            + ": a lone UTF-16 surrogate is valid JSON syntax but no character - no UTF-8 "
            "(and no Postgres text) holds it"
            + (", and psycopg's UnicodeEncodeError became a server error: refuse text that "
               "does not encode (str.encode('utf-8') raises) before the database sees it"
               if reply.status >= 500 else "; refuse it, never store it altered"))
    emoji = {**ORDER, "item": "\U0001f511 key"}   # JSON "\ud83d\udd11": a pair, one character
    reply = post_order(instances[0], "pair-item", emoji)
    assert reply.status == 201 and reply.json().get("item") == emoji["item"], (
        f"POST /orders with the item {emoji['item']!r} (a surrogate pair in JSON, one "
        f"character): expected 201 and the item as sent, saw {reply.status} "
        f"{reply.body[:150]!r}: only an unpaired surrogate is invalid")


def test_replayed_key_returns_the_stored_response(instances: list[str], db: Any) -> None:
    key = str(uuid.uuid4())
    first = post_order(instances[0], key)
    assert first.status == 201, (
        f"POST /orders with a new Idempotency-Key: expected 201, saw {first.status} "
        f"{first.body[:200]!r}")
    assert first.headers.get("Location", "").endswith(f"/orders/{first.json().get('id')}"), (
        f"POST /orders: expected Location: /orders/<id of the new order>, saw "
        f"{first.headers.get('Location')!r}")
    for n, host in enumerate([instances[1], instances[0]], start=2):
        assert_same_reply(first, post_order(host, key), f"replay #{n} of the same key")
    # The same order, its JSON members in another order: a client library (or a retry
    # through another one) may serialize a dict differently. It is the same request.
    shuffled = dict(reversed(list(ORDER.items())))
    replay = post_order(instances[1], key, shuffled)
    assert replay.status != 422, (
        f"replay #4 sent the same order with its JSON members in another order "
        f"({replay.status} for {shuffled} after {ORDER}): the key was refused as reused for "
        "another request, but the request is the same - member order in a JSON object "
        "carries no meaning; fingerprint a canonical form (json.dumps(..., sort_keys=True)) "
        "of the parsed body, not its bytes or its arrival order")
    assert_same_reply(first, replay, "replay #4 (same order, JSON members reordered)")
    assert_one_order(db, 4, "sequential")
    fetched = call(instances[1], "GET", first.headers.get("Location", ""))
    assert fetched.status == 200, (
        f"GET {first.headers.get('Location')}: expected 200, saw {fetched.status}")


# The same key with another request: each field changed alone, and values moved between
# fields (a fingerprint of the values without their names sees no change).
OTHER_REQUESTS = [
    ({**ORDER, "quantity": 5}, "another quantity"),
    ({**ORDER, "item": "mouse"}, "another item"),
    ({**ORDER, "user_id": 2}, "another user (user 2 exists)"),
    ({"user_id": 2, "item": "keyboard", "quantity": 1},
     "user_id and quantity swapped (1 and 2 change places)"),
]


@pytest.mark.parametrize(("other", "how"), OTHER_REQUESTS,
                         ids=["quantity", "item", "user_id", "swapped_values"])
def test_key_reused_for_another_request_is_422(instances: list[str], db: Any,
                                               other: dict[str, Any], how: str) -> None:
    rows(db, "INSERT INTO users VALUES (2, 'Alan Kay', 'alan.kay@example.com') RETURNING id")
    key = str(uuid.uuid4())
    first = post_order(instances[0], key)
    assert first.status == 201, (
        f"POST /orders with a new Idempotency-Key: expected 201, saw {first.status}")
    reply = post_order(instances[1], key, other)
    assert reply.status == 422, (
        f"the same Idempotency-Key with a different body ({how}: {other} after {ORDER}): "
        f"expected 422, saw {reply.status} {reply.body[:150]!r}: the client reused a key for "
        "a different request, which is its error; replaying the old response would silently "
        "drop the new order. The fingerprint must cover every field, by name (a canonical "
        "json.dumps(body, sort_keys=True)), not a subset of them or their values alone")
    assert_one_order(db, 2, "conflicting")


# Texts a normalising fingerprint (strip(), lower(), casefold()) takes for the first one:
# each is another request - the client's item as sent is what the order stores.
ITEM_SPELLINGS = [("Keyboard", "in another letter case"),
                  ("keyboard ", "with a trailing blank")]


def test_key_reused_with_the_item_spelled_otherwise_is_422(instances: list[str],
                                                           db: Any) -> None:
    key = str(uuid.uuid4())
    first = post_order(instances[0], key)
    assert first.status == 201, (
        f"POST /orders with a new Idempotency-Key: expected 201, saw {first.status}")
    for n, (item, how) in enumerate(ITEM_SPELLINGS, start=1):
        reply = post_order(instances[n % 2], key, {**ORDER, "item": item})
        assert reply.status == 422, (
            f"the same Idempotency-Key with the item {item!r} ({how}) after "
            f"{ORDER['item']!r}: expected 422, saw {reply.status} {reply.body[:150]!r}: the "
            "fingerprint normalised the text (strip/lower) and took another request for a "
            "replay - the order stores the item as sent, so a body that differs in any "
            "character is another request; hash the body's values exactly")
    assert_one_order(db, 1 + len(ITEM_SPELLINGS), "conflicting")


def test_keys_are_compared_exactly(instances: list[str], db: Any) -> None:
    """Two keys that differ only in letter case are two attempts; a key need not be a UUID."""
    u = str(uuid.uuid4())
    keys = [u.upper(), u.lower(), f"Checkout-{u[:8]}", f"checkout-{u[:8]}"]
    firsts: dict[str, HttpReply] = {}
    for n, key in enumerate(keys):
        reply = post_order(instances[n % 2], key)
        earlier = [k for k, r in firsts.items() if r.body == reply.body]
        assert reply.status == 201 and not earlier, (
            f"POST /orders with Idempotency-Key {key!r} (after {list(firsts)}): expected 201 "
            f"with a new order, saw {reply.status} {reply.body[:150]!r}"
            + (f", the order of key {earlier[0]!r} replayed" if earlier else "")
            + ": a key is any non-blank string the client chose, compared exactly as sent - "
            "header NAMES are case-insensitive, header VALUES are not, and the draft "
            "recommends a UUID without requiring one; lower-casing the key (or parsing it as a "
            "UUID) makes two clients' attempts one, and hands one client another's order")
        firsts[key] = reply
    assert order_count(db) == len(keys), (
        f"{len(keys)} POSTs with the keys {keys} created {order_count(db)} orders, expected "
        f"{len(keys)}: keys that differ only in case are different attempts")
    for n, key in enumerate(keys):
        assert_same_reply(firsts[key], post_order(instances[(n + 1) % 2], key),
                          f"a replay of key {key!r}")
    assert order_count(db) == len(keys), "the replays created orders"


def test_key_length_is_limited(instances: list[str], db: Any) -> None:
    """A key has at most 255 characters (Stripe's limit): a longer one is 400, checked before
    the database - which cannot index a key of a few kB (a 500) - and never cut to fit (two
    keys with one 255-character prefix are two clients' attempts)."""
    longest = "k-" + secrets.token_urlsafe(300)[:253]
    first = post_order(instances[0], longest)
    assert first.status == 201, (
        f"POST /orders with a key of 255 characters (the limit): expected 201, saw "
        f"{first.status} {first.body[:150]!r}: a key of up to 255 characters is valid")
    assert_same_reply(first, post_order(instances[1], longest),
                      "a replay of the 255-character key")
    too_long = [
        (longest + "x", "256 characters, the first 255 those of the key above"),
        (secrets.token_urlsafe(3500)[:4000], "4000 characters (random, so they do not compress)"),
    ]
    for n, (key, what) in enumerate(too_long):
        reply = post_order(instances[n % 2], key)
        replayed = reply.body == first.body
        assert reply.status == 400, (
            f"POST /orders with an Idempotency-Key of {what}: expected 400 (at most 255 "
            f"characters), saw {reply.status} {reply.body[:150]!r}"
            + (", the 255-character key's order replayed: the key was cut to 255 characters, "
               "so two keys that share a prefix became one attempt - refuse a long key, "
               "never truncate it" if replayed else
               ": the database could not index the key (its index row is limited to about "
               "2.7 kB) and its error became a server error - check the key's length "
               "before the database sees it" if reply.status >= 500 else
               ": the limit is 255 characters, documented, not whatever the database's "
               "index happens to hold (about 2.7 kB, less once multi-byte)"))
    assert order_count(db) == 1, (
        f"the keys over 255 characters left {order_count(db)} orders, expected the 1 of the "
        "255-character key")


def test_failed_attempt_does_not_burn_the_key(instances: list[str], db: Any) -> None:
    """An attempt that fails after claiming its key (the order names a user who does not
    exist yet) must not leave the key claimed without a response: once the user exists, a
    retry with the key creates the order (the claim was rolled back with the attempt), or
    replays the stored error - never a 5xx, on any instance."""
    key, order = str(uuid.uuid4()), {**ORDER, "user_id": NEW_USER}
    failed = post_order(instances[0], key, order)
    assert 400 <= failed.status < 500, (
        f"POST /orders for user {NEW_USER}, who does not exist: expected 422 (the order names "
        f"no user: the client's error), saw {failed.status} {failed.body[:200]!r}")
    assert order_count(db) == 0, f"a POST for a missing user {NEW_USER} created an order"
    rows(db, "INSERT INTO users VALUES (%s, 'Edsger Dijkstra', 'edsger@example.com') "
         "RETURNING id", NEW_USER)
    retry = post_order(instances[1], key, order)
    created = retry.status == 201 and order_count(db) == 1
    replayed = (retry.status, retry.body) == (failed.status, failed.body)
    assert created or replayed, (
        f"POST /orders with an Idempotency-Key for user {NEW_USER} answered {failed.status}; "
        f"once the user existed, the same POST with the same key answered {retry.status} "
        f"{retry.body[:150]!r}: expected 201 with the order (the failed attempt's key claim "
        "rolled back with it) or the stored first answer replayed exactly - the failed "
        "attempt committed its key claim without a response, so every retry with the key "
        "finds it half-done. The claim and the response commit together or not at all: "
        "claim the key in the order's transaction and answer an error by rolling that "
        "transaction back (raise), never by returning from inside it or committing the "
        "claim on its own")
    assert_same_reply(retry, post_order(instances[0], key, order),
                      "the retry after the user existed, replayed once more")
    assert order_count(db) == (1 if created else 0), (
        f"the retries after a failed attempt left {order_count(db)} orders, expected "
        f"{1 if created else 0}")


def test_distinct_keys_are_distinct_orders(instances: list[str], db: Any) -> None:
    first = post_order(instances[0], str(uuid.uuid4()))
    second = post_order(instances[1], str(uuid.uuid4()))
    assert (first.status, second.status) == (201, 201), (
        f"two POSTs with different keys: expected 201 and 201, saw {first.status} and "
        f"{second.status}")
    assert order_count(db) == 2 and first.json().get("id") != second.json().get("id"), (
        f"two POSTs with equal bodies but different keys must create two orders, saw "
        f"{order_count(db)}: deduplicate by key, not by body (a customer may really order "
        "the same thing twice)")


def test_concurrent_replays_create_one_order(instances: list[str], db: Any) -> None:
    key = str(uuid.uuid4())
    barrier = threading.Barrier(CONCURRENT + 1)
    replies: list[HttpReply | BaseException | None] = [None] * CONCURRENT

    def fire(i: int) -> None:
        barrier.wait()
        try:
            replies[i] = post_order(instances[i % 2], key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            replies[i] = exc

    threads = [threading.Thread(target=fire, args=(i,), daemon=True) for i in range(CONCURRENT)]
    with db.connect() as gate:
        # Hold back every INSERT INTO orders until all the requests are inside Postgres.
        gate.execute("LOCK TABLE orders IN SHARE MODE")
        for thread in threads:
            thread.start()
        barrier.wait()
        wait_for_lock_waiters(db, CONCURRENT, timeout=3.0)
        gate.commit()
    for thread in threads:
        thread.join(20)

    failures = [r for r in replies if not isinstance(r, HttpReply)]
    assert not failures, f"concurrent POSTs did not complete: {failures}"
    done = [r for r in replies if isinstance(r, HttpReply)]
    statuses = sorted(r.status for r in done)
    assert statuses == [201] * CONCURRENT, (
        f"{CONCURRENT} concurrent POSTs with one Idempotency-Key: expected {CONCURRENT}x 201 "
        f"(one created, the rest replayed), saw {statuses}: a replay that arrives while the "
        "first attempt is still running must wait for it and replay its answer")
    assert_one_order(db, CONCURRENT, "concurrent")
    for n, reply in enumerate(done[1:], start=2):
        assert_same_reply(done[0], reply, f"concurrent request #{n}")
