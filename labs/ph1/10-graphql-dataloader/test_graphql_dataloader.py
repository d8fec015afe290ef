"""Verification for ph1.10 graphql-dataloader.

SQL is counted on the wire, not by trusting the learner: the DSN the app gets points at a
TCP proxy in front of the real Postgres. The proxy reads the frontend protocol and records
every statement Postgres is asked to run - a simple Query ('Q') or an Execute ('E') of a
Parse'd statement (so prepared statements count each time too). Transaction control
(BEGIN, COMMIT, SET ...) is not a query for this purpose. The app runs behind a threaded
wsgiref server on 127.0.0.1:0 and is queried with http.client; the expected data is
computed by this test from the rows it inserted.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from labrunner.testing import PgStatementProxy, came_true, http_request, serve_wsgi, wait_until
from labrunner.testing.relay import RelayLink

USERS = 50          # the page the queries ask for
ALL_USERS = 120     # the table holds more: reading them all shows in the rows counted
USERS_QUERY = "{ users(first: 50) { id name orders { id totalCents } } }"


# ---- requests to the learner's app (served with labrunner.testing.serve_wsgi) ------------

def ask_raw(host: str, query: str, timeout: float = 60) -> tuple[int, dict[str, Any]]:
    """POST /graphql: the status and the whole document, errors included."""
    reply = http_request(host, "POST", "/graphql", document={"query": query},
                         timeout=timeout)
    try:
        document = json.loads(reply.body)
    except ValueError:
        pytest.fail(f"POST /graphql {query}: expected JSON, saw {reply.status} "
                    f"{reply.body[:200]!r}", pytrace=False)
    return reply.status, document if isinstance(document, dict) else {}


def ask(host: str, query: str) -> dict[str, Any]:
    status, document = ask_raw(host, query, timeout=15)
    nulls = [e for e in document.get("errors") or []
             if isinstance(e, dict) and "Cannot return null for non-nullable field"
             in str(e.get("message"))]
    if nulls:
        field = str(nulls[0].get("message")).rsplit("field ", 1)[-1].rstrip(".")
        pytest.fail(
            f"POST /graphql {query}: {field} resolved to null at {nulls[0].get('path')} "
            f"({len(nulls)} such error(s)), but the schema says it is never null: a batch "
            "function returns one result per key, and for a key with no rows that result is "
            "an empty list ([]), not None", pytrace=False)
    assert status == 200 and not document.get("errors"), (
        f"POST /graphql {query}: expected 200 and no errors, saw {status} "
        f"{str(document.get('errors'))[:300]}")
    return document.get("data") or {}


# ---- data -------------------------------------------------------------------------------

def orders_of(user_id: int) -> int:
    """0 to 3 orders per user, with some users having none (a batch must keep their slot);
    the users past the first page have many, so reading every order shows in the rows."""
    return (user_id * 7) % 4 if user_id <= USERS else 25


def seed(db: Any) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
            CREATE TABLE orders (id bigint PRIMARY KEY, user_id bigint NOT NULL REFERENCES users,
                                 total_cents integer NOT NULL);
            CREATE INDEX orders_user ON orders (user_id);""")
        users = list(range(1, ALL_USERS + 1))
        random.Random(10).shuffle(users)  # heap order is not id order: ORDER BY is needed
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO users VALUES (%s, %s)",
                            [(uid, f"user {uid}") for uid in users])
            rows = [(uid, n) for uid in range(1, ALL_USERS + 1) for n in range(orders_of(uid))]
            ids = list(range(1001, 1001 + len(rows)))
            random.Random(11).shuffle(ids)  # nor for orders: a user's orders come back mixed
            cur.executemany("INSERT INTO orders VALUES (%s, %s, %s)",
                            [(oid, uid, 100 * uid + n)
                             for oid, (uid, n) in zip(ids, rows, strict=True)])
        conn.execute("ANALYZE users; ANALYZE orders")


def expected_users(db: Any) -> list[dict[str, Any]]:
    with db.connect(autocommit=True) as conn:
        users = conn.execute("SELECT id, name FROM users ORDER BY id LIMIT 50").fetchall()
        orders = conn.execute("SELECT user_id, id, total_cents FROM orders ORDER BY id").fetchall()
    return [{"id": str(uid), "name": name,
             "orders": [{"id": str(oid), "totalCents": cents}
                        for owner, oid, cents in orders if owner == uid]}
            for uid, name in users]


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def counter(postgres: Any) -> Iterator[PgStatementProxy]:
    seed(postgres)
    proxy = PgStatementProxy.for_dsn(postgres.dsn)  # statements split, no transaction control
    yield proxy
    proxy.close()


@pytest.fixture
def proxied_dsn(postgres: Any, counter: PgStatementProxy) -> str:
    """The DSN handed to the learner: the proxy, no TLS, so every message can be read."""
    return counter.dsn_for(postgres.dsn)


@pytest.fixture
def make_app(learner: Any) -> Callable[..., Any]:
    return learner.function("graphql_api", "make_app")  # type: ignore[no-any-return]


def run(host: str, counter: PgStatementProxy, query: str) -> tuple[dict[str, Any], list[str]]:
    counter.take()
    data = ask(host, query)
    return data, counter.take()


def listing(statements: list[str]) -> str:
    shown = "; ".join(statements[:3])
    return shown + (f"; ... ({len(statements) - 3} more)" if len(statements) > 3 else "")


# ---- the verification -------------------------------------------------------------------

def _first_difference(got: Any, want: list[dict[str, Any]]) -> str:
    """Which user differs, and how: the learner's terms, not a dump of 50 users."""
    if not isinstance(got, list):
        return f"expected a list of {len(want)} users, saw {str(got)[:200]}"
    if [u.get("id") for u in got] != [u["id"] for u in want]:
        return (f"the users are not the first {len(want)} by id: saw ids "
                f"{[u.get('id') for u in got][:8]}..., expected {[u['id'] for u in want][:8]}...")
    for seen, wanted in zip(got, want, strict=True):
        if seen != wanted:
            if sorted(seen.get("orders") or [], key=str) == sorted(wanted["orders"], key=str):
                return (f"user {wanted['id']}: the right orders in the wrong order "
                        f"{[o['id'] for o in seen['orders']]}; list them by id "
                        f"{[o['id'] for o in wanted['orders']]} (ORDER BY id: rows come back in "
                        "whatever order Postgres finds them)")
            return (f"user {wanted['id']}: expected orders {wanted['orders']}, saw "
                    f"{seen.get('orders')}: each user must get exactly its own orders (a batch "
                    "returns one result per key, in the keys' order)")
    return "the data differs"


def test_dataloader_needs_two_queries(make_app: Callable[..., Any], proxied_dsn: str,
                                      counter: PgStatementProxy, postgres: Any) -> None:
    want = expected_users(postgres)
    needed_orders = sum(len(u["orders"]) for u in want)
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        counter.take_rows()
        run(host, counter, "{ users(first: 50) { id name } }")
        user_rows = counter.take_rows()
        data, statements = run(host, counter, USERS_QUERY)
        rows = counter.take_rows()
    assert data.get("users") == want, (
        f"{USERS_QUERY}: {_first_difference(data.get('users'), want)}")
    assert len(statements) <= 2, (
        f"{USERS} users with their orders took {len(statements)} SQL queries, expected at most "
        f"2 (users, then all their orders in one batch): {listing(statements)}")
    assert user_rows <= USERS, (
        f"users(first: 50) read {user_rows} rows from Postgres for 50 users: the table holds "
        f"{ALL_USERS}; limit in SQL (ORDER BY id LIMIT %s), not by slicing a list in Python")
    assert rows - user_rows <= needed_orders, (
        f"the orders of {USERS} users ({needed_orders} rows) were read as {rows - user_rows} "
        f"rows: the batch fetched orders of users nobody asked for and filtered them in Python; "
        f"filter in SQL (WHERE user_id = ANY(%s)) so only the wanted rows cross the wire")


def test_naive_resolvers_show_n_plus_one(make_app: Callable[..., Any], proxied_dsn: str,
                                         counter: PgStatementProxy, postgres: Any) -> None:
    with serve_wsgi(make_app(proxied_dsn, batched=False)) as naive, \
            serve_wsgi(make_app(proxied_dsn, batched=True)) as batched:
        slow, statements = run(naive, counter, USERS_QUERY)
        fast, _ = run(batched, counter, USERS_QUERY)
    assert len(statements) >= USERS + 1, (
        f"batched=False took {len(statements)} SQL queries for {USERS} users; the naive "
        f"resolver queries orders once per user ({USERS} + 1): keep it, it is the baseline "
        "the DataLoader is measured against")
    assert slow == fast, (
        "the naive and the DataLoader resolvers return different data: batching must change "
        "how many queries run, never the result")


def test_loaders_do_not_outlive_a_request(make_app: Callable[..., Any], proxied_dsn: str,
                                          counter: PgStatementProxy, postgres: Any) -> None:
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        run(host, counter, USERS_QUERY)
        with postgres.connect(autocommit=True) as conn:  # the data changes between requests
            conn.execute("INSERT INTO orders VALUES (9999, 4, 123456)")
        data, _ = run(host, counter, USERS_QUERY)
    user_4: dict[str, Any] = next((u for u in data.get("users", []) if u.get("id") == "4"), {})
    assert {"id": "9999", "totalCents": 123456} in user_4.get("orders", []), (
        f"after a new order for user 4, the next request still shows its old orders "
        f"{user_4.get('orders')}: a DataLoader caches what it loaded, so create it per request")


def test_users_by_id_are_read_again_in_the_next_request(
        make_app: Callable[..., Any], proxied_dsn: str, counter: PgStatementProxy,
        postgres: Any) -> None:
    """user(id:) goes through the users loader: what it read belongs to its request. A user
    renamed between two requests is seen renamed in the second."""
    query = '{ u: user(id: "4") { id name } }'
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        before, _ = run(host, counter, query)
        with postgres.connect(autocommit=True) as conn:  # the data changes between requests
            conn.execute("UPDATE users SET name = 'renamed 4' WHERE id = 4")
        after, _ = run(host, counter, query)
    assert before.get("u") == {"id": "4", "name": "user 4"}, (
        f"{query}: expected {{'id': '4', 'name': 'user 4'}}, saw {before.get('u')}")
    assert after.get("u") == {"id": "4", "name": "renamed 4"}, (
        f"user 4 was renamed to 'renamed 4' between two requests, and the second request's "
        f"{query} still answered {after.get('u')}: users read by an earlier request were "
        "kept for the next one (a dict at module or class level, a loader or a cache that "
        "outlives its request). What a loader reads is cached for one request only: keep "
        "the cache in the request's loader, never beside it")


def asked_with_table_hidden(make_app: Callable[..., Any], dsn: str, postgres: Any, table: str,
                            query: str) -> tuple[int, dict[str, Any]]:
    """``query`` asked of a batched app while ``table`` is renamed away (Postgres refuses
    every query of it): the status and the document it answered."""
    with postgres.connect(autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_hidden")
    with serve_wsgi(make_app(dsn, batched=True)) as host:
        status, document = ask_raw(host, query, timeout=30)
    return status, document


def test_an_orders_query_postgres_refuses_is_an_error_not_no_orders(
        make_app: Callable[..., Any], proxied_dsn: str, counter: PgStatementProxy,
        postgres: Any) -> None:
    """The orders batch fails (the test renames the table under the running app): the
    answer says so with an error. Users shown with `orders: []` would tell the client
    that they never ordered anything."""
    query = '{ users(first: 5) { id orders { id } } u2: user(id: "2") { id orders { id } } }'
    status, document = asked_with_table_hidden(make_app, proxied_dsn, postgres, "orders", query)
    data = document.get("data") or {}
    shown = [u for u in [*(data.get("users") or []), data.get("u2")]
             if isinstance(u, dict) and isinstance(u.get("orders"), list)]
    assert document.get("errors") and not shown, (
        f"the orders query failed (the test renamed the table orders, so Postgres refused "
        f"it), and {query} answered {len(shown)} user(s) with orders lists "
        f"{[u.get('orders') for u in shown][:3]} and errors: "
        f"{errors_of(document) or 'none'} (status {status}): the failure was swallowed and "
        "became \"no orders\" - a client cannot tell it from users who never ordered. Let "
        "the batch function (and the resolver) raise: the DataLoader fails each key's "
        "load, and GraphQL reports the error with the fields it could not resolve")


def test_a_users_query_postgres_refuses_is_an_error_not_no_user(
        make_app: Callable[..., Any], proxied_dsn: str, counter: PgStatementProxy,
        postgres: Any) -> None:
    """The users batch fails (the test renames the table under the running app): the
    answer says so with an error. A user shown as null, with no error, would tell the client
    that no such user exists."""
    query = '{ u2: user(id: "2") { id name } u3: user(id: "3") { id } }'
    status, document = asked_with_table_hidden(make_app, proxied_dsn, postgres, "users", query)
    data = document.get("data") or {}
    assert document.get("errors"), (
        f"the users query failed (the test renamed the table users, so Postgres refused "
        f"it), and {query} answered {data} with no error (status {status}): the failure was "
        "swallowed and became null, \"no such user\"\nA client cannot tell it from ids "
        "that name nobody. Let the batch function (and the resolver) raise: the DataLoader "
        "fails each key's load, and GraphQL reports the error with the fields it could not "
        "resolve")


def test_first_limits_the_page(make_app: Callable[..., Any], proxied_dsn: str,
                               counter: PgStatementProxy) -> None:
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        data, _ = run(host, counter, "{ users(first: 7) { id } }")
        empty, _ = run(host, counter, "{ users(first: 0) { id } }")
    ids = [u.get("id") for u in data.get("users") or []]
    assert ids == [str(n) for n in range(1, 8)], (
        f"users(first: 7) returned {len(ids)} users ({ids[:10]}...), expected the first 7 "
        "by id: the resolver receives first as an argument - pass it to the query's LIMIT "
        "instead of a fixed page size")
    zero = [u.get("id") for u in empty.get("users") or []]
    assert zero == [], (
        f"users(first: 0) returned {len(zero)} users ({zero[:5]}...), expected none: 0 was "
        "taken for 'first not given' (a falsy test, `first or 50`, or `first if first > 0 "
        "else 50`)\nfirst: 0 asks for an empty page; when first is left out, the schema's "
        "default (first: Int = 50) already arrives as 50, so the resolver needs no fallback "
        "of its own")


NULL_FIRST = [
    ("{ users(first: null) { id } }", None),
    ("query Page($n: Int) { users(first: $n) { id } }", {"n": None}),
]


def ask_with(host: str, query: str, variables: dict[str, Any] | None) -> list[Any]:
    """The user ids a users query returns, with its variables (a JSON null included)."""
    document: dict[str, Any] = {"query": query}
    if variables is not None:
        document["variables"] = variables
    reply = http_request(host, "POST", "/graphql", document=document, timeout=15)
    answer = reply.json()
    assert reply.status == 200 and not answer.get("errors"), (
        f"POST /graphql {query} with variables {json.dumps(variables)}: expected 200 and no "
        f"errors, saw {reply.status} {str(answer.get('errors'))[:300]}\nfirst is a nullable "
        "Int: null is a value it may take, and it sets no limit")
    return [u.get("id") for u in (answer.get("data") or {}).get("users") or []]


def test_first_null_sets_no_limit(make_app: Callable[..., Any], proxied_dsn: str,
                                  counter: PgStatementProxy) -> None:
    """first: null (written, or a variable set to null) is not first left out: the GraphQL
    spec (CoerceArgumentValues) passes an explicit null as null and uses the default only
    when no value is given, and a first that is not set limits nothing (Relay's
    connections; SQL's LIMIT NULL) - every user. A variable left out gets the default."""
    every = [str(n) for n in range(1, ALL_USERS + 1)]
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        for query, variables in NULL_FIRST:
            ids = ask_with(host, query, variables)
            given = (f"{query} with variables {json.dumps(variables)}" if variables
                     else query)
            fell_back = (" - the schema's default page (first: Int = 50), as if first had "
                         "been left out" if ids == every[:USERS] else "")
            assert ids == every, (
                f"{given} returned {len(ids)} users{fell_back}; expected all "
                f"{ALL_USERS}, ids 1 to {ALL_USERS}\nAn explicit null is not an omitted "
                "argument: GraphQL passes it as null and uses the default (50) only when "
                "first is not given (spec: CoerceArgumentValues), and null sets no limit "
                "(LIMIT NULL is LIMIT ALL) - no `if first is None: first = 50`, no COALESCE")
        ids = ask_with(host, "query Page($n: Int) { users(first: $n) { id } }", {})
    assert ids == every[:USERS], (
        f"users(first: $n) with $n not given returned {len(ids)} users, expected the "
        f"schema's default page of {USERS}: a variable left out is an argument not given")


def test_aliased_users_share_one_orders_query(make_app: Callable[..., Any], proxied_dsn: str,
                                              counter: PgStatementProxy,
                                              postgres: Any) -> None:
    # The ids are asked out of order, the missing one among them: a batch function must
    # answer in the order of the keys it is given, whatever order the rows come back in.
    # User 2 is asked twice (b, d): a loader that does not cache (cache=False) passes the
    # key twice to one batch, which must answer both places.
    query = ('{ a: user(id: "1") { id orders { id } } c: user(id: "3") { id name orders '
             '{ totalCents } } nobody: user(id: "999") { name } b: user(id: "2") '
             '{ id orders { id } } d: user(id: "2") { id orders { id } } }')
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        data, statements = run(host, counter, query)
    assert data.get("b") == data.get("d"), (
        f"user(id: \"2\") asked twice in one request (aliases b and d) came back as "
        f"b={data.get('b')} and d={data.get('d')}: a key can come twice in one batch (a "
        "loader without its cache, cache=False, passes every load on), and the batch "
        "function answered only one of its places - return a result for each position "
        "of the keys ([found.get(key, ...) for key in keys]), not one slot per distinct key")
    expected = {u["id"]: u for u in expected_users(postgres)}
    mixed = {alias: (uid, (data.get(alias) or {}).get("id"))
             for alias, uid in (("a", "1"), ("c", "3"), ("b", "2"))
             if (data.get(alias) or {}).get("id") != uid}
    assert not mixed, (
        "aliases asked for users 1, 3, 999, 2 (in that order) in one request and got "
        + ", ".join(f"{alias}: user(id: \"{uid}\") -> {got!r}"
                    for alias, (uid, got) in mixed.items())
        + ": the batch function's results are paired with the keys by position - return "
        "them in the order of the keys it was given (look each key up in what the query "
        "returned), not sorted, not in the order Postgres sent the rows")
    assert data.get("nobody", "missing") is None, (
        f"user(id: \"999\") must be null for a user that does not exist, saw "
        f"{data.get('nobody', 'no such field')!r}")
    assert data.get("c") == {"id": "3", "name": "user 3", "orders": [
        {"totalCents": o["totalCents"]} for o in expected["3"]["orders"]]}, (
        f"user(id: \"3\"): expected {expected['3']}, saw {data.get('c')}")
    for alias, uid in (("a", "1"), ("b", "2")):
        want = [{"id": o["id"]} for o in expected[uid]["orders"]]
        assert (data.get(alias) or {}).get("orders") == want, (
            f"{alias}: user(id: \"{uid}\"): expected orders {want}, saw {data.get(alias)}")
    on_users = [s for s in statements if re.search(r"\bfrom\s+users\b", s, re.IGNORECASE)]
    assert len(on_users) == 1, (
        f"five aliased user(id:) fields in one request read users with {len(on_users)} "
        f"queries, expected 1 batch: {listing(on_users)}\nA DataLoader batches the loads "
        "made on one instance: make the users loader once per request (in the context), "
        "not in the resolver, or every field gets a loader - and a batch - of its own")
    on_orders = [s for s in statements if re.search(r"\borders\b", s, re.IGNORECASE)]
    assert len(on_orders) == 1, (
        f"four user(id:) fields with orders in one request read them with {len(on_orders)} "
        "queries, "
        f"expected 1 batch: {listing(on_orders)}")


def test_a_batch_reads_only_the_orders_of_its_keys(make_app: Callable[..., Any],
                                                   proxied_dsn: str, counter: PgStatementProxy,
                                                   postgres: Any) -> None:
    """A DataLoader batch is any set of keys, not a range: two users far apart (aliases)
    must read their own orders only, not those of every user between them."""
    far_apart = (2, ALL_USERS - 5)
    query = "{ " + " ".join(f'u{uid}: user(id: "{uid}") {{ id orders {{ id }} }}'
                            for uid in far_apart) + " }"
    with postgres.connect(autocommit=True) as conn:
        needed = conn.execute("SELECT count(*) FROM orders WHERE user_id = ANY(%s)",
                              (list(far_apart),)).fetchone()[0]
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        counter.take_rows()
        data, statements = run(host, counter, query)
        rows = counter.take_rows()
    got = [len((data.get(f"u{uid}") or {}).get("orders") or []) for uid in far_apart]
    assert sum(got) == needed, (
        f"{query}: the two users' orders came back as {got} orders, expected {needed} in all")
    users_read = len(far_apart)
    assert rows - users_read <= needed, (
        f"users {far_apart[0]} and {far_apart[1]} (aliases in one request) read {rows} rows "
        f"from Postgres, expected at most {users_read + needed} (2 users and their {needed} "
        f"orders): the batch read the orders of users nobody asked for ({listing(statements)})"
        " - a batch is an arbitrary set of keys, not a range: WHERE user_id = ANY(%s), not "
        "BETWEEN min and max")


def errors_of(document: dict[str, Any]) -> str:
    return "; ".join(str(e.get("message") if isinstance(e, dict) else e)
                     for e in document.get("errors") or [])[:300]


# Ids that name no user: not a number, past bigint, a number no user has (-7), and other
# spellings of a user's number - a user's ID is the decimal string of its id ("2", "20",
# "0"), and " 2", "+2", "02", "-0", "2_0" (int() reads 20), "\u0662" (Arabic-Indic 2, which
# isdigit() and int() accept) or "\u00b2" (superscript 2: isdigit() yes, int() no) are other
# strings. Each alias stands
# beside user 2 in one request, so all of them go to the users loader in one batch.
NO_SUCH_IDS = [("word", "abc"), ("huge", "99999999999999999999"), ("negative", "-7"),
               ("spaced", " 2"), ("plus", "+2"), ("padded", "02"), ("minuszero", "-0"),
               ("underscored", "2_0"),
               ("arabic", "\u0662"), ("superscript", "\u00b2")]


def test_an_id_that_names_no_user_is_null_and_spares_the_batch(
        make_app: Callable[..., Any], proxied_dsn: str, counter: PgStatementProxy,
        postgres: Any) -> None:
    """A batch answers each key on its own: a key the database cannot even compare (a
    word, a number past bigint) must not fail the other keys loaded with it."""
    want = {u["id"]: u for u in expected_users(postgres)}["2"]
    query = ('{ two: user(id: "2") { id name orders { id totalCents } } '
             + " ".join(f'{alias}: user(id: "{uid}") {{ id name }}' for alias, uid in NO_SUCH_IDS)
             + " }")
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        status, document = ask_raw(host, query)
    data = document.get("data") or {}
    assert status == 200 and data.get("two") == want, (
        f"user(id: \"2\") asked beside user(id:) {', '.join(u for _, u in NO_SUCH_IDS)} "
        f"(ids that name no user) came back as {data.get('two')!r} with status {status} and "
        f"errors: {errors_of(document) or 'none'}; expected {want}: one key the database "
        "could not use failed the whole batch. A batch answers each key on its own: send the "
        "ids as a query parameter of their type (WHERE id = ANY(%s) with ints), never "
        "formatted into the SQL, and answer an id that names no user with null")
    wrong = {uid: data.get(alias, "missing") for alias, uid in NO_SUCH_IDS
             if data.get(alias, "missing") is not None}
    assert not wrong and not document.get("errors"), (
        f"user(id:) with ids that name no user ({', '.join(u for _, u in NO_SUCH_IDS)}) "
        f"answered {wrong or 'null'} with errors: {errors_of(document) or 'none'}; expected "
        "null for each and no error: an ID is any string, and one that is not a user's id "
        "names no user, like 999. A user's ID is the decimal string of its id (\"2\"): "
        "another spelling of the number (\" 2\", \"+2\", \"02\", \"2_0\", non-ASCII digits) "
        "is another ID, and answering it with user 2 gives one user two IDs (a client "
        "caching by ID keeps two copies); int() and str.isdigit() accept all of those - "
        "accept only ASCII digits without a leading zero")


# Users at the edges of bigint: just past a 32-bit Int, the first 19-digit id, bigint's
# largest, 0, -1 and bigint's smallest. Every one is a user's id (users.id is a bigint, with
# no CHECK: an id below 0 is as much an id as any), and its decimal string its ID - "-1"
# with its minus sign, which str.isdigit() refuses.
EDGE_IDS = [2**31, 10**18, 2**63 - 1, 0, -1, -(2**63)]
# int() refuses a string past 4300 digits; one below bigint's smallest is past it too.
PAST_BIGINT = ["9223372036854775808", "9" * 5000, "-9223372036854775809"]


def test_every_bigint_is_a_user_id(make_app: Callable[..., Any], proxied_dsn: str,
                                   counter: PgStatementProxy, postgres: Any) -> None:
    """users.id is a bigint: any of its values is a user's id, from -2**63 to 2**63 - 1
    (19 digits, a minus sign below 0) - not only what fits GraphQL's 32-bit Int, 18 digits
    or str.isdigit(). One past it, or a number of any length, names no user and fails
    nothing."""
    with postgres.connect(autocommit=True) as conn:
        for n, uid in enumerate(EDGE_IDS):
            conn.execute("INSERT INTO users VALUES (%s, %s)", (uid, f"edge {uid}"))
            conn.execute("INSERT INTO orders VALUES (%s, %s, %s)", (8001 + n, uid, 700 + n))
    query = ("{ " + " ".join(f'e{n}: user(id: "{uid}") {{ id name orders {{ id }} }}'
                             for n, uid in enumerate(EDGE_IDS))
             + " " + " ".join(f'p{n}: user(id: "{uid}") {{ id }}'
                              for n, uid in enumerate(PAST_BIGINT)) + " }")
    with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
        status, document = ask_raw(host, query)
    data = document.get("data") or {}
    missed = {str(uid): data.get(f"e{n}", "missing") for n, uid in enumerate(EDGE_IDS)
              if data.get(f"e{n}") != {"id": str(uid), "name": f"edge {uid}",
                                        "orders": [{"id": str(8001 + n)}]}}
    assert not missed, (
        f"user(id:) for users whose ids are {', '.join(map(str, EDGE_IDS))} answered "
        f"{missed} (status {status}, errors: {errors_of(document) or 'none'}); expected each "
        "user with its order: users.id is a bigint, so every number from -2**63 to "
        "2**63 - 1 (-9223372036854775808 to 9223372036854775807: 19 digits, and a minus "
        "sign below 0) is a user's id - bound the ID by bigint, not by GraphQL's 32-bit Int, "
        "a count of 18 digits, or str.isdigit() (which refuses the minus sign)")
    past = {f"{uid[:20]}... ({len(uid)} digits)": data.get(f"p{n}", "missing")
            for n, uid in enumerate(PAST_BIGINT) if data.get(f"p{n}", "missing") is not None}
    assert not past and not document.get("errors"), (
        f"user(id:) with numbers past bigint answered {past or 'null'} with errors: "
        f"{errors_of(document) or 'none'}; expected null and no error: a number past "
        "2**63 - 1 (or below -2**63) names no user - check its length before int() (which "
        "refuses a string of more than 4300 digits) and its value before it reaches SQL")


class HoldFirstUsersRead(PgStatementProxy):
    """Stops the first connection that reads users before its statement reaches the server,
    until release(): that request is then in flight while the test runs another."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._gate = threading.Condition()
        self.held: int | None = None
        self.released = False

    def before_forwarding(self, link: RelayLink, sql: str) -> None:
        if not re.search(r"\bfrom\s+users\b", sql, re.IGNORECASE):
            return
        with self._gate:
            if self.held is None:
                self.held = link.index
                self._gate.notify_all()
            if link.index == self.held:
                self._gate.wait_for(lambda: self.released, timeout=60)

    def release(self) -> None:
        with self._gate:
            self.released = True
            self._gate.notify_all()


def test_requests_in_flight_together_keep_their_own_loaders(
        make_app: Callable[..., Any], counter: PgStatementProxy, postgres: Any) -> None:
    """The server answers requests on threads of their own, at the same time: a request's
    loaders (and the connection they query) belong to it alone. Request A is held at its
    users query while request B runs from start to end; then A goes on."""
    want = expected_users(postgres)
    by_id = {u["id"]: u for u in want}
    second = '{ u5: user(id: "5") { id name orders { id totalCents } } }'
    gate = HoldFirstUsersRead.for_dsn(postgres.dsn)
    assert isinstance(gate, HoldFirstUsersRead)
    first: dict[str, Any] = {}
    try:
        with serve_wsgi(make_app(gate.dsn_for(postgres.dsn), batched=True)) as host:
            def run_first() -> None:
                try:
                    first["reply"] = ask_raw(host, USERS_QUERY, timeout=90)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    first["reply"] = (0, {"errors": [f"{type(exc).__name__}: {exc}"]})

            thread = threading.Thread(target=run_first, daemon=True)
            thread.start()
            wait_until(lambda: gate.held is not None or not thread.is_alive(),
                       "request A to read users", timeout=60)
            status_b, document_b = ask_raw(host, second)
            gate.release()
            thread.join(timeout=90)
    finally:
        gate.release()
        gate.close()
    status_a, document_a = first.get("reply", (0, {"errors": ["no answer"]}))
    users_a = (document_a.get("data") or {}).get("users")
    assert status_a == 200 and users_a == want and not document_a.get("errors"), (
        f"request A ({USERS_QUERY}), held at its users query while request B ({second}) ran "
        f"from start to end, then came back with status {status_a}, errors: "
        f"{errors_of(document_a) or 'none'}; data: "
        f"{_first_difference(users_a, want) if users_a is not None else 'none'}: A's "
        "resolvers used what request B had made - loaders, or the connection they query - "
        "kept where every request sees it (a module or app-wide variable, reset per "
        "request). Requests run at the same time on the server's threads: keep the "
        "loaders and the connection in the request's own context")
    assert status_b == 200 and (document_b.get("data") or {}).get("u5") == by_id["5"] and \
        not document_b.get("errors"), (
        f"request B ({second}), run while request A was in flight, came back with status "
        f"{status_b}, errors: {errors_of(document_b) or 'none'}, data "
        f"{document_b.get('data')}; expected {by_id['5']}: a request's loaders and "
        "connection must be its own, not shared with the request in flight")



# Requests of every kind, one after another: a page, aliases, a missing user, an id that
# names no user, a field the schema does not have (a validation error), a syntax error, and
# a page Postgres refuses (LIMIT -1: the resolver raises).
CLOSING_REQUESTS = [
    USERS_QUERY,
    "{ users(first: -1) { id orders { id } } }",
    '{ a: user(id: "1") { id orders { id } } b: user(id: "2") { id } }',
    '{ user(id: "999") { id } }',
    '{ user(id: "abc") { id } }',
    "{ users(first: 3) { id nosuchfield } }",
    "{ users(first: 3) { id ",
] * 3
OPEN_AFTERWARDS = 3   # a pool may keep a few, and reuses them; a leak keeps one per request


def test_each_request_closes_its_connection(make_app: Callable[..., Any], proxied_dsn: str,
                                            counter: PgStatementProxy, learner: Any) -> None:
    """A request's connection is its own, so it ends with the request. One left for the
    garbage collector (a connect() never closed, a loader's own connection) closes only when
    nothing references it any more - and a cycle, a cache or an error's traceback keeps it:
    a Postgres backend per request, until max_connections refuses everyone. The lab's
    harness holds every connection the app opens, so only an explicit close ends one; the
    proxy sees on the wire which ended."""
    harness = learner.harness()
    harness.hold_connections()
    try:
        with serve_wsgi(make_app(proxied_dsn, batched=True)) as host:
            for query in CLOSING_REQUESTS:
                ask_raw(host, query, timeout=30)

            def still_open() -> int:
                with counter.lock:
                    return sum(1 for link in counter.links if link.ends < 2)

            # Ends when the wire shows them closed, or when the harness holds more still
            # open than a pool keeps (held, they can no longer close by themselves).
            came_true(lambda: still_open() <= OPEN_AFTERWARDS
                      or int(harness.open_held()) > OPEN_AFTERWARDS, timeout=10)
            if still_open() > OPEN_AFTERWARDS:
                came_true(lambda: still_open() <= OPEN_AFTERWARDS, timeout=1)
            left, opened = still_open(), len(counter.links)
    finally:
        harness.release_connections()
    assert left <= OPEN_AFTERWARDS, (
        f"{len(CLOSING_REQUESTS)} requests, one after another, opened {opened} connections "
        f"to Postgres and {left} of them were still open after the last answer, while "
        "something still referenced them: each request leaves its connection (or its "
        "loaders' own connections) to the garbage collector. A connection that belongs to a "
        "request ends with it: open it with `async with` (or close it in a finally), the "
        "loaders' too, on every path - or every request costs a Postgres backend whenever "
        "anything (a reference cycle, an error's traceback, a cache) keeps the object")
