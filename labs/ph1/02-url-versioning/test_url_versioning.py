"""Verification for ph1.2 url-versioning.

The learner's make_app(dsn) runs behind a real HTTP server (wsgiref, threaded, 127.0.0.1:0)
and is queried with http.client. Every expectation is computed here from the rows this test
wrote to Postgres, never from the learner's code.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from labrunner.testing import HttpReply, http_request, serve_wsgi

USERS = {1: "Ada Lovelace", 2: "Alan Turing", 3: "Grace Hopper"}  # Grace has no orders
ORDERS = [  # id, user_id, total_cents, currency, placed_at
    (101, 1, 1250, "EUR", "2024-03-01T10:00:00+00:00"),
    (102, 1, 399, "EUR", "2024-03-02T11:30:00+00:00"),
    (201, 2, 10000, "GBP", "2024-03-03T09:15:00+00:00"),
]
MISSING_USER = 999
VENDOR = "application/vnd.shop+json"


# ---- requests to the learner's app (served with labrunner.testing.serve_wsgi) ------------

def get(host: str, path: str, headers: dict[str, str] | None = None) -> HttpReply:
    return http_request(host, "GET", path, headers=headers, timeout=10)


# ---- the three ways of asking for a version ---------------------------------------------

def ask(style: str, version: int | None, path: str) -> tuple[str, dict[str, str], str]:
    """(path, headers, description) asking for `version` of `path` in the given style."""
    if style == "uri":
        return f"/v{version}{path}", {}, f"GET /v{version}{path}"
    if style == "accept":
        accept = f"{VENDOR};version={version}"
        return path, {"Accept": accept}, f"GET {path} with Accept: {accept}"
    if style == "query":
        return f"{path}?version={version}", {}, f"GET {path}?version={version}"
    return path, {}, f"GET {path} (no version asked)"


def expected_order(order: tuple[int, int, int, str, str], version: int) -> dict[str, Any]:
    oid, uid, cents, currency, placed = order
    if version == 1:
        return {"id": oid, "user_id": uid, "total": cents / 100}
    return {"id": oid, "user_id": uid, "amount": {"cents": cents, "currency": currency},
            "placed_at": placed}


def normalise(item: Any) -> Any:
    """Compare timestamps as instants, whatever ISO 8601 spelling the learner chose."""
    if isinstance(item, dict) and isinstance(item.get("placed_at"), str):
        try:
            return {**item, "placed_at": datetime.fromisoformat(item["placed_at"])}
        except ValueError:
            return item
    return item


def expected_collection(user_id: int, version: int) -> Any:
    return [expected_order(o, version) for o in ORDERS if o[1] == user_id]


def check_collection(reply: HttpReply, user_id: int, version: int, what: str) -> None:
    assert reply.status == 200, f"{what}: expected 200, saw {reply.status} {reply.body[:200]!r}"
    want = expected_collection(user_id, version)
    doc = reply.json()
    items = doc if version == 1 else doc.get("data") if isinstance(doc, dict) else None
    if isinstance(items, list) and all(isinstance(i, dict) for i in items):
        ids, want_ids = [i.get("id") for i in items], [i["id"] for i in want]
        assert ids == want_ids or sorted(ids, key=str) != sorted(want_ids, key=str), (
            f"{what}: the orders came back as ids {ids}, expected them ordered by id "
            f"{want_ids}: without ORDER BY id Postgres returns rows in storage order (here "
            "the order they were inserted in, highest id first) - sort in the query")
    if version == 1:
        assert isinstance(doc, list) and [normalise(i) for i in doc] == \
            [normalise(i) for i in want], (
            f"{what}: expected the v1 representation (a bare list) {want}, saw {doc}")
    else:
        assert isinstance(doc, dict) and isinstance(doc.get("data"), list), (
            f"{what}: expected the v2 envelope {{\"data\": [...], \"meta\": {{\"count\": n}}}}, "
            f"saw {doc}: did you serve v1 to a client that asked for v2?")
        assert [normalise(i) for i in doc["data"]] == [normalise(i) for i in want], (
            f"{what}: expected data {want}, saw {doc['data']}")
        assert doc.get("meta", {}).get("count") == len(want), (
            f"{what}: expected meta.count {len(want)}, saw {doc.get('meta')}")
    content_type = reply.headers.get("Content-Type", "")
    assert content_type.split(";")[0].strip() == VENDOR and \
        f"version={version}" in content_type.replace(" ", ""), (
        f"{what}: expected Content-Type: {VENDOR}; version={version}, saw {content_type!r}: "
        "the client must be able to see which version it got")


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def host(learner: Any, postgres: Any) -> Iterator[str]:
    with postgres.connect(autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL);
            CREATE TABLE orders (
                id          bigint PRIMARY KEY,
                user_id     bigint NOT NULL REFERENCES users,
                total_cents integer NOT NULL,
                currency    text NOT NULL,
                placed_at   timestamptz NOT NULL
            );""")
        for uid, name in USERS.items():
            conn.execute("INSERT INTO users VALUES (%s, %s)", (uid, name))
        # Highest id first: the table's storage order is then NOT id order, so a list
        # that is not sorted by the query (ORDER BY id) comes back in the wrong order.
        for order in sorted(ORDERS, reverse=True):
            conn.execute("INSERT INTO orders VALUES (%s, %s, %s, %s, %s)", order)
    make_app = learner.function("orders_api", "make_app")
    with serve_wsgi(make_app(postgres.dsn)) as address:
        yield address


# ---- the verification -------------------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("style", ["uri", "accept", "query"])
def test_version_selection(host: str, style: str, version: int) -> None:
    path, headers, what = ask(style, version, "/users/1/orders")
    reply = get(host, path, headers)
    check_collection(reply, 1, version, what)
    check_vary(reply, path, headers, what)


VARY_ANYWAY = ("the URI did not fix the version, so an Accept header (read before ?version= "
               "and the default) would have changed this answer; without Vary: Accept a "
               "cache hands this body to a client that asks for the other version by Accept")
VARY_RULE = ("send Vary: Accept on every answer to a URL without a version prefix, errors "
             "included: RFC 9110 12.5.5 asks for Vary on any response whose selection read a "
             "request header, and Accept is the only header this API negotiates on")


def check_vary(reply: HttpReply, path: str, headers: dict[str, str], what: str) -> None:
    """Every answer to a URL without /v1 or /v2 was chosen by Accept (rule 2 is read before
    ?version=, the default and the user lookup), whatever its status: it must say Vary:
    Accept, or a shared cache keyed on the URL alone replays it to clients whose Accept asks
    for something else. Answers under a version prefix are not checked (Accept changes
    nothing there)."""
    if path.startswith(("/v1/", "/v2/", "/v3/")):
        return
    vary = {v.strip().lower() for v in reply.headers.get("Vary", "").split(",")}
    if "accept" in vary or "*" in vary:
        return
    accept = headers.get("Accept")
    if reply.status == 200:
        why = ("the same URL answers v1 or v2 depending on Accept, and a cache that is not "
               "told so will serve one client's version to the other" if accept else
               VARY_ANYWAY)
    elif reply.status == 406:
        why = (f"this 406 was chosen by the Accept header - with Accept: {VENDOR};version=1 "
               "the same URL answers 200 - and a shared cache that stores it without Vary: "
               "Accept answers 406 to every later client of this URL, whatever it accepts; "
               + VARY_RULE)
    else:
        other = "200 with version 2" if reply.status == 400 else "406"
        why = (f"Accept is read before ?version= and the lookup, so it chose this "
               f"{reply.status} too - with Accept: {VENDOR};version="
               f"{2 if reply.status == 400 else 3} the same URL answers {other} - and a cache "
               f"that stores the {reply.status} without Vary: Accept replays it to clients "
               f"whose Accept asks otherwise; " + VARY_RULE)
    pytest.fail(f"{what}: the {reply.status} answer has no Vary: Accept (saw Vary: "
                f"{reply.headers.get('Vary')!r}): {why}", pytrace=False)


def test_no_version_means_v1(host: str) -> None:
    reply = get(host, "/users/1/orders")
    check_collection(reply, 1, 1, "GET /users/1/orders (no version)")
    check_vary(reply, "/users/1/orders", {}, "GET /users/1/orders (no version, v1 by default)")
    what = "GET /users/1/orders with Accept: application/json"
    reply = get(host, "/users/1/orders", {"Accept": "application/json"})
    check_collection(reply, 1, 1, what)
    check_vary(reply, "/users/1/orders", {"Accept": "application/json"}, what)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("style", ["uri", "accept", "query"])
def test_single_order(host: str, style: str, version: int) -> None:
    path, headers, what = ask(style, version, "/users/2/orders/201")
    reply = get(host, path, headers)
    assert reply.status == 200, f"{what}: expected 200, saw {reply.status} {reply.body[:200]!r}"
    want = expected_order(ORDERS[2], version)
    assert normalise(reply.json()) == normalise(want), (
        f"{what}: expected the v{version} order {want}, saw {reply.json()}")
    check_vary(reply, path, headers, what)


@pytest.mark.parametrize("style", ["uri", "accept", "query"])
def test_empty_collection_is_not_missing(host: str, style: str) -> None:
    path, headers, what = ask(style, 2, "/users/3/orders")
    reply = get(host, path, headers)
    check_collection(reply, 3, 2, what + " (a user with no orders)")
    check_vary(reply, path, headers, what + " (a user with no orders)")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("style", ["uri", "accept", "query"])
def test_missing_parent_is_404(host: str, style: str, version: int) -> None:
    path, headers, what = ask(style, version, f"/users/{MISSING_USER}/orders")
    reply = get(host, path, headers)
    assert reply.status == 404, (
        f"{what}: expected 404, saw {reply.status} {reply.body[:120]!r}: user {MISSING_USER} "
        "does not exist, so neither does its orders collection; an empty list would tell "
        "the client the user exists and has no orders")
    check_vary(reply, path, headers, what)


@pytest.mark.parametrize("style", ["uri", "accept", "query"])
def test_order_under_wrong_parent_is_404(host: str, style: str) -> None:
    path, headers, what = ask(style, 1, "/users/1/orders/201")
    reply = get(host, path, headers)
    assert reply.status == 404, (
        f"{what}: expected 404, saw {reply.status} {reply.body[:120]!r}: order 201 belongs "
        "to user 2; under /users/1 it does not exist (and must not leak)")
    check_vary(reply, path, headers, what)


@pytest.mark.parametrize(("style", "status", "meaning"), [
    ("uri", 404, "there is no /v3 tree of resources"),
    ("accept", 406, "Not Acceptable: the server cannot produce the media type asked for"),
    ("query", 400, "Bad Request: the query parameter has a value the API does not accept"),
])
def test_unknown_version(host: str, style: str, status: int, meaning: str) -> None:
    path, headers, what = ask(style, 3, "/users/1/orders")
    reply = get(host, path, headers)
    assert reply.status == status, (
        f"{what}: expected {status}, saw {reply.status} {reply.body[:120]!r}: {meaning}")
    check_vary(reply, path, headers, what)


@pytest.mark.parametrize(("accept", "version"), [
    (f"{VENDOR}; version=2", 2),                                   # a space after ';'
    (f"text/html;q=0.5, {VENDOR};version=2", 2),                    # a list, best q first
    (f"{VENDOR};version=1;q=0.4, {VENDOR};version=2", 2),           # q decides
    (f'{VENDOR};version="2"', 2),                                  # a quoted value
])
def test_accept_is_parsed_as_media_ranges(host: str, accept: str, version: int) -> None:
    reply = get(host, "/users/1/orders", {"Accept": accept})
    what = f"GET /users/1/orders with Accept: {accept}"
    assert reply.status == 200, (
        f"{what}: expected 200 with version {version}, saw {reply.status} "
        f"{reply.body[:100]!r}: Accept is a comma-separated list of media ranges, each with "
        "parameters after ';' (spaces allowed, values may be quoted) and a q weight; parse it, "
        "do not compare it as one string")
    check_collection(reply, 1, version, what)
    check_vary(reply, "/users/1/orders", {"Accept": accept}, what)


@pytest.mark.parametrize("accept", [
    f"{VENDOR}; charset=utf-8; version=2",                         # version after another
    f"{VENDOR};version=2;charset=utf-8",                           # version before another
])
def test_vendor_parameters_in_any_order(host: str, accept: str) -> None:
    reply = get(host, "/users/1/orders", {"Accept": accept})
    what = f"GET /users/1/orders with Accept: {accept}"
    served = served_version(reply)
    assert served == 2, (
        f"{what}: expected 200 with version 2, saw {reply.status} "
        f"{'version ' + str(served) if served else reply.body[:80]!r}: a media type's "
        "parameters are name=value pairs told apart by their names (RFC 9110 5.6.6), not by "
        "their places, so version= may come before or after another parameter such as "
        "charset - look it up by name among them all")
    check_collection(reply, 1, 2, what)
    check_vary(reply, "/users/1/orders", {"Accept": accept}, what)


@pytest.mark.parametrize(("query", "version"), [
    ("?version=2&expand=items", 2),                                # version, then another
    ("?expand=items&version=2", 2),                                # another, then version
    ("?pretty&version=2", 2),                                      # a flag with no '='
    ("?expand=items&version=3", None),                             # unknown: still a 400
])
def test_query_with_other_parameters(host: str, query: str, version: int | None) -> None:
    reply = get(host, f"/users/1/orders{query}")
    what = f"GET /users/1/orders{query}"
    served = served_version(reply)
    why = ("the query string is a list of name=value pairs joined by '&' in any order, "
           "some with no '=' at all (the form encoding URLs use): parse it "
           "(urllib.parse.parse_qs) and look version up by name, rather than reading the "
           "string after 'version=' or splitting each pair on '='")
    if version is None:
        assert reply.status == 400, (
            f"{what}: expected 400, saw {reply.status} {reply.body[:100]!r}: version=3 is "
            f"the query's version whatever else the query holds; {why}")
    else:
        assert served == version, (
            f"{what}: expected 200 with version {version}, saw {reply.status} "
            f"{'version ' + str(served) if served else reply.body[:100]!r}: {why}")
        check_collection(reply, 1, version, what)
    check_vary(reply, f"/users/1/orders{query}", {}, what)


@pytest.mark.parametrize(("accept", "version"), [
    ("Application/Vnd.Shop+JSON;version=2", 2),                    # the type and subtype
    (f"{VENDOR}; Version=2", 2),                                   # a parameter's name
    (f"{VENDOR};version=1;Q=0.4, {VENDOR};version=2", 2),           # q's name
    ("APPLICATION/JSON", 1),                                       # generic JSON
])
def test_accept_is_case_insensitive(host: str, accept: str, version: int) -> None:
    reply = get(host, "/users/1/orders", {"Accept": accept})
    what = f"GET /users/1/orders with Accept: {accept}"
    served = served_version(reply)
    assert served == version, (
        f"{what}: expected 200 with version {version}, saw {reply.status} "
        f"{'version ' + str(served) if served else reply.body[:80]!r}: media types and "
        "parameter names are case-insensitive (RFC 9110 8.3.1, 12.5.1), so a client may write "
        "Application/Vnd.Shop+JSON or Version=2 or Q=0.4 - lower-case the type/subtype and "
        "each parameter name before comparing, or the client's spelling picks its contract")
    check_collection(reply, 1, version, what)
    check_vary(reply, "/users/1/orders", {"Accept": accept}, what)


def served_version(reply: HttpReply) -> int | None:
    """The version a 200 says it carries (Content-Type's version parameter), else None."""
    if reply.status != 200:
        return None
    for param in reply.headers.get("Content-Type", "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "version" and value.strip().strip('"').isdigit():
            return int(value.strip().strip('"'))
    return None


def test_q_zero_means_not_acceptable(host: str) -> None:
    for accept in (f"{VENDOR};version=2;q=0",                    # q=0: NOT acceptable
                   f"{VENDOR};version=2;q=0, {VENDOR};version=3"):
        check_not_acceptable(get(host, "/users/1/orders", {"Accept": accept}), accept)


def check_not_acceptable(reply: HttpReply, accept: str) -> None:
    assert reply.status == 406, (
        f"GET /users/1/orders with Accept: {accept}: expected 406, saw {reply.status} "
        f"{reply.headers.get('Content-Type')!r}: a media range with q=0 is one the client "
        "refuses (RFC 9110 12.4.2), not its last choice - drop q=0 ranges before choosing; "
        "nothing acceptable is left, so the answer is 406 Not Acceptable")
    check_vary(reply, "/users/1/orders", {"Accept": accept},
               f"GET /users/1/orders with Accept: {accept}")


# ---- the rules combined: the first one that states a preference wins ------------------

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(("path", "accept", "version", "why"), [
    ("/v1/users/1/orders", f"{VENDOR};version=2", 1,
     "the URI prefix is the first rule: /v1/ fixes the version whatever Accept asks"),
    ("/v2/users/1/orders?version=1", None, 2,
     "the URI prefix is the first rule: /v2/ fixes the version whatever ?version= says"),
    ("/users/1/orders?version=1", f"{VENDOR};version=2", 2,
     "Accept (rule 2) is read before ?version= (rule 3): the media type the client asked "
     "for wins over the query parameter"),
    ("/users/1/orders?version=2", f"{VENDOR};version=1", 1,
     "Accept (rule 2) is read before ?version= (rule 3)"),
    ("/users/1/orders?version=2", BROWSER_ACCEPT, 2,
     "a browser's Accept lists text/html and XML first, which this API cannot serve "
     "(skip them, do not answer 406), then */*: no vendor type, only a generic one, is no "
     "preference, so the next rule, ?version=2, decides - not the default version 1"),
    ("/users/1/orders?version=2", "application/json", 2,
     "application/json is no preference, so the next rule, ?version=2, decides - not the "
     "default version 1"),
    ("/users/1/orders", BROWSER_ACCEPT, 1,
     "no rule states a preference (Accept is generic, no ?version=): version 1"),
])
def test_rules_combined(host: str, path: str, accept: str | None, version: int,
                        why: str) -> None:
    headers = {"Accept": accept} if accept else {}
    reply = get(host, path, headers)
    what = f"GET {path}" + (f" with Accept: {accept}" if accept else "")
    served = served_version(reply)
    assert served == version, (
        f"{what}: expected 200 with version {version}, saw {reply.status} "
        f"{'version ' + str(served) if served else reply.body[:100]!r}: {why}")
    check_collection(reply, 1, version, what)
    check_vary(reply, path, headers, what)


@pytest.mark.parametrize(("accept", "query", "version"), [
    (f"{VENDOR};version=3, {VENDOR};version=2;q=0.5", "", 2),
    (f"{VENDOR};version=3, {VENDOR};version=1;q=0.5", "", 1),
    (f"{VENDOR};version=3, application/json", "", 1),
    (f"{VENDOR};version=3, */*;q=0.1", "?version=2", 2),
])
def test_unknown_version_falls_back_to_next_range(host: str, accept: str, query: str,
                                                  version: int) -> None:
    reply = get(host, f"/users/1/orders{query}", {"Accept": accept})
    what = f"GET /users/1/orders{query} with Accept: {accept}"
    served = served_version(reply)
    assert served == version, (
        f"{what}: expected 200 with version {version}, saw {reply.status} "
        f"{'version ' + str(served) if served else reply.body[:100]!r}: version 3 is the "
        "client's first choice but not its only one - skip a range the API cannot serve and "
        "try the next in q order (a generic type there means 'no preference': go on to "
        "?version= or the default); 406 is only for a list with nothing acceptable in it")
    check_collection(reply, 1, version, what)
    check_vary(reply, f"/users/1/orders{query}", {"Accept": accept}, what)


# ---- ranges that cover the vendor type without naming a version ------------------------

@pytest.mark.parametrize(("accept", "query", "version", "why"), [
    ("application/*", "", 1,
     "application/* is a subtype wildcard: it matches application/vnd.shop+json (RFC 9110 "
     "12.5.1), so the API can serve it; it names no version, so it is no preference, and "
     "with no ?version= the default, version 1, is served"),
    ("application/*", "?version=2", 2,
     "application/* matches the vendor type but names no version: no preference, like "
     "application/json and */*, so the next rule, ?version=2, decides"),
    ("text/html, application/*;q=0.2", "?version=2", 2,
     "text/html cannot be served (skip it), application/* can and states no version, so "
     "?version=2 decides - a generic range is every wildcard that covers the vendor type, "
     "not only the two spelled application/json and */*"),
    (VENDOR, "", 1,
     f"{VENDOR} with no version parameter asks for the vendor type at its default "
     "version, 1 - it is the API's own media type, not one it cannot serve"),
    (f"text/plain, {VENDOR};q=0.5", "", 1,
     f"text/plain cannot be served (skip it); {VENDOR} without a version is version 1"),
])
def test_ranges_covering_the_vendor_type(host: str, accept: str, query: str, version: int,
                                         why: str) -> None:
    reply = get(host, f"/users/1/orders{query}", {"Accept": accept})
    what = f"GET /users/1/orders{query} with Accept: {accept}"
    served = served_version(reply)
    assert served == version, (
        f"{what}: expected 200 with version {version}, saw {reply.status} "
        f"{'version ' + str(served) if served else reply.body[:100]!r}: {why}; 406 is only "
        "for an Accept list in which no range matches what the API serves")
    check_collection(reply, 1, version, what)
    check_vary(reply, f"/users/1/orders{query}", {"Accept": accept}, what)


# ---- ids at and past the end of bigint --------------------------------------------------

BIGINT_MAX = 2**63 - 1  # the columns are bigint: no row has a larger id


@pytest.mark.parametrize("style", ["uri", "accept", "query"])
def test_ids_past_bigint_are_not_found(host: str, style: str) -> None:
    for raw, whose in ((f"/users/{BIGINT_MAX + 1}/orders", f"user {BIGINT_MAX + 1}"),
                       (f"/users/{10**19}/orders", f"user {10**19}"),
                       (f"/users/{10**30}/orders", f"user {10**30}"),
                       (f"/users/1/orders/{BIGINT_MAX + 1}", f"order {BIGINT_MAX + 1}"),
                       (f"/users/2/orders/{10**25}", f"order {10**25}"),
                       # int() refuses more than 4,300 digits (ValueError): not a 500 either
                       ("/users/" + "9" * 5000 + "/orders", "a user id of 5,000 digits")):
        path, headers, what = ask(style, 1, raw)
        reply = get(host, path, headers)
        what = what if len(what) < 160 else f"{what[:60]}...{what[-40:]}"
        assert reply.status == 404, (
            f"{what}: expected 404, saw {reply.status} {reply.body[:120]!r}: {whose} is past "
            f"bigint's largest value {BIGINT_MAX} (19 digits), so no row has that id and the "
            "resource is not found; cast to bigint, Postgres refuses it as out of range - "
            "compare the number with 2^63-1 before querying, a digit count alone does not "
            "tell (9223372036854775808 has 19 digits too)")


@pytest.mark.parametrize("style", ["uri", "accept", "query"])
def test_largest_bigint_id_is_served(host: str, style: str, postgres: Any) -> None:
    with postgres.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO users VALUES (%s, 'Max') ON CONFLICT DO NOTHING",
                     (BIGINT_MAX,))
        conn.execute("INSERT INTO orders VALUES (%s, %s, 700, 'EUR', "
                     "'2024-03-04T08:00:00+00:00') ON CONFLICT DO NOTHING",
                     (BIGINT_MAX, BIGINT_MAX))
    want = {"id": BIGINT_MAX, "user_id": BIGINT_MAX, "total": 7.0}
    for raw, expected in ((f"/users/{BIGINT_MAX}/orders", [want]),
                          (f"/users/{BIGINT_MAX}/orders/{BIGINT_MAX}", want)):
        path, headers, what = ask(style, 1, raw)
        reply = get(host, path, headers)
        assert reply.status == 200 and reply.json() == expected, (
            f"{what}: expected 200 with {expected}, saw {reply.status} "
            f"{reply.body[:120]!r}: user and order {BIGINT_MAX} exist - ids are bigint, up "
            "to 2^63-1 (19 digits), and a route that caps them shorter hides real rows")
        check_vary(reply, path, headers, what)


def test_each_request_is_negotiated_afresh(host: str) -> None:
    """One app, one resource, asked for v2 then v1 in every style: the second answer is the
    second client's, not a copy of the first (an answer cache keyed on the URL or the ids)."""
    for style in ("uri", "accept", "query"):
        for version in (2, 1):
            path, headers, what = ask(style, version, "/users/2/orders/201")
            reply = get(host, path, headers)
            want = expected_order(ORDERS[2], version)
            assert reply.status == 200 and normalise(reply.json()) == normalise(want), (
                f"{what}, right after a request for version {3 - version} of the same order, "
                f"was not answered with the v{version} order: the app replayed an earlier "
                "answer - a cache of answers must be keyed on everything that chose them (the "
                "version, and so the Accept header: what Vary: Accept tells shared caches), "
                f"not on the URL or the ids alone (expected {want}, saw {reply.status} "
                f"{reply.body[:120]!r})")


def test_placed_at_is_the_instant_whatever_the_session_time_zone(host: str,
                                                                 postgres: Any) -> None:
    with postgres.connect(autocommit=True) as conn:  # sessions opened from now on
        conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET timezone TO \'Asia/Kolkata\'')
    path, headers, what = ask("uri", 2, "/users/2/orders/201")
    reply = get(host, path, headers)
    assert reply.status == 200, f"{what}: expected 200, saw {reply.status} {reply.body[:200]!r}"
    got, want = reply.json().get("placed_at"), ORDERS[2][4]
    assert normalise({"placed_at": got}) == normalise({"placed_at": want}), (
        f"{what} with the database's TimeZone set to Asia/Kolkata (+05:30): placed_at is "
        f"{got!r}, expected the instant {want}: Postgres hands a timestamptz back in the "
        "session's time zone (14:45+05:30 here), so writing its wall clock with a +00:00 or Z "
        "label moves the order by hours - keep the offset it came with (isoformat()) or "
        "convert first (astimezone(timezone.utc))")
