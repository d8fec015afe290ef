"""Verification for ph1.1 rest-constraints.

The learner's make_app(dsn) is served by real HTTP servers (wsgiref, threaded, 127.0.0.1:0)
and driven with http.client. Two servers over the same database stand for two instances
behind a load balancer: whatever one instance answers, the other must answer the same. The
second instance runs in a Python process of its own (as on another machine, or after a
restart), with another hash seed: a tag that depends on the process - a salt, a pid, a start
time, Python's built-in hash(), salted per process - differs there.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from labrunner.testing import HttpReply, call, came_true, serve_wsgi

SCHEMA = """
CREATE TABLE users (
    id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name  text NOT NULL,
    email text NOT NULL UNIQUE
);
INSERT INTO users (name, email) VALUES ('Ada Lovelace', 'ada@example.com'),
                                       ('Alan Turing', 'alan@example.com');
"""


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def dsn(postgres: Any) -> str:
    with postgres.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    return str(postgres.dsn)


@pytest.fixture
def host(learner: Any, dsn: str) -> Iterator[str]:
    """Instance A: make_app(dsn) served in this process (or the learner's, when grading)."""
    make_app = learner.function("users_api", "make_app")
    with serve_wsgi(make_app(dsn)) as address:
        yield address


# Instance B: users_api.make_app(dsn) served by wsgiref in a process of its own; it prints
# its port once it listens.
OWN_PROCESS_INSTANCE = """
import socketserver, sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from users_api import make_app

class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

server = make_server("127.0.0.1", 0, make_app(sys.argv[1]), Server, Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"""


def other_hash_seed() -> str:
    """A PYTHONHASHSEED unlike this process's: hash() of the same bytes then differs."""
    mine = os.environ.get("PYTHONHASHSEED", "")
    return str((int(mine) + 1) % 2**32) if mine.isdigit() else "1"


@pytest.fixture
def other_process(learner: Any, dsn: str) -> Iterator[str]:
    """Instance B: the learner's app in a Python process of its own, as another machine
    behind the load balancer (or the same service after a restart) runs it. learner.popen:
    when grading it runs as the learner's uid."""
    learner.path("users_api.py")
    with tempfile.TemporaryFile() as errors:
        proc = learner.popen(
            [sys.executable, "-c", OWN_PROCESS_INSTANCE, dsn], stdout=subprocess.PIPE,
            stderr=errors, cwd=learner.dir,
            env={**os.environ, "PYTHONPATH": str(learner.dir),
                 "PYTHONHASHSEED": other_hash_seed()})
        try:
            yield f"127.0.0.1:{listening_port(proc, errors)}"
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def listening_port(proc: subprocess.Popen[bytes], errors: Any) -> int:
    lines: queue.Queue[bytes] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()),  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        line = lines.get(timeout=45)
    except queue.Empty:
        pytest.fail("instance B (make_app(dsn) served in a Python process of its own) did not "
                    "start listening within 45 s: does make_app() block?")
    if not line.strip().isdigit():
        proc.wait()
        errors.seek(0)
        pytest.fail(f"instance B (users_api imported and make_app(dsn) served in a Python "
                    f"process of its own) exited with status {proc.returncode} before "
                    f"listening:\n{errors.read().decode(errors='replace')[-2000:]}")
    return int(line)


def get_ok(host: str, path: str, headers: dict[str, str] | None = None) -> HttpReply:
    reply = call(host, "GET", path, headers=headers)
    assert reply.status == 200, (
        f"GET {path}: expected 200, saw {reply.status} {reply.body[:200]!r}")
    etag = reply.header("ETag")
    assert etag and re.fullmatch(r'(W/)?"[^"]*"', etag), (
        f"GET {path}: expected an ETag header like \"abc123\" (a quoted entity tag), saw "
        f"{etag!r}: without a validator a cache can never revalidate, only refetch")
    cache = reply.header("Cache-Control") or ""
    assert re.search(r"max-age=\d+", cache) and "no-store" not in cache, (
        f"GET {path}: expected Cache-Control with max-age=<seconds> (and no no-store), saw "
        f"{cache!r}: a cacheable GET tells caches how long the copy stays fresh")
    return reply


def assert_not_modified(host: str, path: str, etag: str, because: str,
                        if_none_match: str | None = None) -> None:
    sent = if_none_match or etag
    reply = call(host, "GET", path, headers={"If-None-Match": sent})
    assert reply.status == 304, (
        f"GET {path} with If-None-Match: {sent}: expected 304 Not Modified, saw "
        f"{reply.status}: {because}")
    assert reply.body == b"", (
        f"GET {path}: a 304 must have no body, saw {reply.body[:100]!r}")
    assert reply.header("ETag") == etag, (
        f"GET {path}: the 304 must repeat the ETag {etag}, saw {reply.header('ETag')!r}")
    assert re.search(r"max-age=\d+", reply.header("Cache-Control") or ""), (
        f"GET {path}: the 304 came without Cache-Control (saw "
        f"{reply.header('Cache-Control')!r}): a 304 carries the same Cache-Control as the 200, "
        "or the cache that revalidated no longer knows how long its copy stays fresh")


def assert_same_etag(a: str, b: str, path: str) -> HttpReply:
    """GET path on instance A (this process) and B (a process of its own): same body, so the
    same ETag. Returns A's reply."""
    on_a, on_b = get_ok(a, path), get_ok(b, path)
    assert on_a.body != on_b.body or on_a.header("ETag") == on_b.header("ETag"), (
        f"GET {path}: instance A sent ETag {on_a.header('ETag')} and instance B, running in a "
        f"Python process of its own, sent {on_b.header('ETag')} for the same body: expected "
        "one tag, a function of the representation alone; this one depends on the process "
        "(a salt, a pid, a start time, or Python's built-in hash(), which is salted per "
        "process - PYTHONHASHSEED), so every other instance, and the same one after a "
        "restart, misses every cached copy: use a digest of the bytes (hashlib.sha256)")
    return on_a


# ---- the verification -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/users/1", "/users"])
def test_conditional_get_answers_304(host: str, path: str) -> None:
    first = get_ok(host, path)
    etag = first.header("ETag") or ""
    assert_not_modified(host, path, etag,
                        "the client already holds this representation; do not resend it")
    weak = etag if etag.startswith("W/") else "W/" + etag
    assert_not_modified(host, path, etag,
                        "If-None-Match is a list and is compared weakly (W/ ignored)",
                        if_none_match=f'"some-old-tag", {weak}')
    assert_not_modified(host, path, etag,
                        "If-None-Match: * matches any current representation (RFC 9110 "
                        "13.1.2): a client holding any copy asks 'send it only if none "
                        "exists'",
                        if_none_match="*")
    stale = call(host, "GET", path, headers={"If-None-Match": '"some-old-tag"'})
    assert stale.status == 200 and stale.body == first.body, (
        f"GET {path} with a stale If-None-Match: expected 200 and the full body, saw "
        f"{stale.status}: only a matching tag allows 304")


# If-None-Match is a comma-separated list (RFC 9110 5.6.1, 13.1.2): the whitespace around
# each comma is optional (none, spaces, a tab), and the current tag may stand anywhere in
# it, weak or strong. {tag} is the current tag, {weak} its weak form, {opaque} its text
# between the quotes. Splitting on ", ", or looking at one end of the list only, misses
# some of these. A tag may hold a comma itself (RFC 9110 8.8.3: etagc is any visible
# character but DQUOTE): '"old,<current>"' is one stale tag, and a list split on commas
# whose pieces lose their quotes finds the current tag's text in it.
MATCHING_LISTS = [
    ('"old-1",{weak}', "no space after the comma"),
    ('{tag},"old-1"', "the current tag first"),
    ('"old-1", {tag}, "old-2"', "the current tag in the middle"),
    ('"old-1" ,\t{weak} , "old-2"', "a space before a comma, a tab after one"),
    ('W/"old-1",{tag}', "a weak stale tag, then the current one with no space"),
    ('"old,1", {tag}', "a stale tag holding a comma, then the current one"),
]
STALE_LISTS = ['"old-1","old-2"', 'W/"old-1" ,\t"old-2"', '"old,{opaque}"',
               'W/"{opaque},old", "old-2"']
COMMA_IN_A_TAG = (
    " - an entity tag may hold a comma (RFC 9110 8.8.3: any visible character but '\"'), so "
    "'\"old,<current>\"' is ONE tag, and not the current one: read the list tag by tag as "
    "quoted strings (a regex for (W/)?\"[^\"]*\", as Go's net/http and Werkzeug do) and "
    "compare each whole, quotes included - splitting on ',' and stripping the quotes off "
    "the pieces finds the current tag's text inside another tag")


def opaque(etag: str) -> str:
    """The text of a tag between its quotes: "abc" and W/"abc" give abc."""
    return etag.removeprefix("W/").strip('"')


@pytest.mark.parametrize("path", ["/users/1", "/users"])
def test_if_none_match_lists_in_every_shape(host: str, path: str) -> None:
    first = get_ok(host, path)
    etag = first.header("ETag") or ""
    weak = etag if etag.startswith("W/") else "W/" + etag
    for shape, what in MATCHING_LISTS:
        sent = shape.format(tag=etag, weak=weak)
        reply = call(host, "GET", path, headers={"If-None-Match": sent})
        assert reply.status == 304, (
            f"GET {path} with If-None-Match: {sent!r} ({what}): expected 304 Not Modified, "
            f"saw {reply.status}: the list holds the current tag {etag}\nIf-None-Match is "
            "a comma-separated list whose whitespace around each comma is optional (none, "
            "spaces or tabs): split on ',' alone, strip each tag, drop W/, and compare every "
            "tag of the list - not only its first or last, not split on ', '.")
        assert reply.header("ETag") == etag and reply.body == b"", (
            f"GET {path} with If-None-Match: {sent!r}: the 304 must repeat the ETag {etag} "
            f"and have no body, saw {reply.header('ETag')!r} and {reply.body[:80]!r}")
    for shape in STALE_LISTS:
        sent = shape.format(opaque=opaque(etag))
        reply = call(host, "GET", path, headers={"If-None-Match": sent})
        assert reply.status == 200 and reply.body == first.body, (
            f"GET {path} with If-None-Match: {sent!r} (stale tags only; the current one is "
            f"{etag}): expected 200 and the full body, saw {reply.status}: only a tag equal "
            "to the current one allows 304"
            + (", and this list does not hold it" + COMMA_IN_A_TAG if "{opaque}" in shape
               else ""))


def test_changed_resource_gets_new_etag(host: str, dsn: str, postgres: Any) -> None:
    before = get_ok(host, "/users/1")
    old_tag = before.header("ETag") or ""
    with postgres.connect(autocommit=True) as conn:  # another writer changes the row
        conn.execute("UPDATE users SET name = 'Ada King' WHERE id = 1")
    after = call(host, "GET", "/users/1", headers={"If-None-Match": old_tag})
    assert after.status == 200, (
        f"after the row changed in Postgres, GET /users/1 with the old ETag: expected 200 "
        f"with the new data, saw {after.status}: the ETag must follow the data, not a "
        "copy remembered by the process")
    assert after.json().get("name") == "Ada King", (
        f"GET /users/1 after the change: expected name 'Ada King', saw {after.json()!r}: "
        "the app answered from a copy it kept in memory instead of the database")
    assert after.header("ETag") != old_tag, (
        "GET /users/1: the data changed but the ETag did not: a cache would keep the old copy")


def test_collection_etag_follows_every_field(host: str, postgres: Any) -> None:
    old_tag = get_ok(host, "/users").header("ETag") or ""
    with postgres.connect(autocommit=True) as conn:  # same rows, same ids: one name changes
        conn.execute("UPDATE users SET name = 'Alan M. Turing' WHERE id = 2")
    after = call(host, "GET", "/users", headers={"If-None-Match": old_tag})
    assert after.status == 200 and b"Alan M. Turing" in after.body, (
        f"GET /users with the ETag from before user 2 was renamed: expected 200 with the new "
        f"name, saw {after.status} {after.body[:120]!r}: the collection's ETag did not change "
        "although its representation did; derive it from the whole body, not from the ids "
        "or the count")


def test_collection_is_ordered_by_id(host: str, postgres: Any) -> None:
    with postgres.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO users (name, email) SELECT 'User ' || n, 'u' || n || "
                     "'@example.com' FROM generate_series(3, 8) AS n")
        # Rewriting rows moves them in the table's storage: a query without ORDER BY then
        # returns them in another order although no id changed.
        conn.execute("UPDATE users SET name = name || '.' WHERE id IN (1, 2, 4)")
    ids = [user.get("id") for user in get_ok(host, "/users").json()]
    assert ids == sorted(ids), (
        f"GET /users listed the ids {ids}, expected them ordered by id {sorted(ids)}: "
        "without ORDER BY id Postgres returns rows in storage order, which changes when a "
        "row is updated - so the list, and its ETag, would change with no change of data")


# PUT replaces the whole representation: a body that is not a complete user is refused and
# changes nothing. Each shape of "merge instead of replace" keeps some stored field the
# client never sent (COALESCE, {**row, **body}, a SET list built from the keys present).
MERGED = ("PUT sets the resource to the representation sent - a complete replacement - so a "
          "body missing a field is refused, not merged with the stored row (keeping fields "
          "the client never sent is PATCH's job)")
# A field of the wrong type is no user either: checking only that the fields are there
# (not None) lets Postgres store 42, true or ["Bob"] as the text '42', 'true', '{Bob}'
# (a cast on assignment), and str() coercion does the same in Python.
MISTYPED = ("both fields are strings: check each field's type (isinstance(value, str)), not "
            "only that it is present - otherwise the number, boolean or list is stored as "
            "its text, a representation the client never sent, or the request crashes")
# A NUL character is valid JSON ("\u0000") and a str, but a Postgres text value cannot hold
# one: psycopg refuses to send it (DataError). It is the client's bad input, so a 4xx like any
# other invalid field - never the DataError as a 500, never stored with the NUL dropped.
NUL = ("a Postgres text value cannot hold NUL, so this user cannot be stored as sent: refuse "
       "it as invalid input (422) before it reaches the database - not psycopg's DataError "
       "as a 500, not stored with the character dropped (a user the client never sent)")
INCOMPLETE_PUTS = [
    ({"name": "Bob"}, "no email", MERGED),
    ({"email": "bob@example.com"}, "no name", MERGED),
    ({}, "neither name nor email", MERGED),
    ({"name": "Bob", "email": None}, "email null", MERGED),
    ({"name": None, "email": "bob@example.com"}, "name null", MERGED),
    ({"name": 42, "email": "bob@example.com"}, "name a number", MISTYPED),
    ({"name": "Bob", "email": True}, "email true", MISTYPED),
    ({"name": ["Bob"], "email": "bob@example.com"}, "name a list", MISTYPED),
    ({"name": {"first": "Bob"}, "email": "bob@example.com"}, "name an object", MISTYPED),
    ({"name": "Bob\u0000", "email": "bob@example.com"}, "a NUL character in name", NUL),
    ({"name": "Bob", "email": "bob\u0000@example.com"}, "a NUL character in email", NUL),
]


def test_put_with_incomplete_body_is_refused(host: str) -> None:
    before = get_ok(host, "/users/1").json()
    for body, what, why in INCOMPLETE_PUTS:
        reply = call(host, "PUT", "/users/1", body)
        after = get_ok(host, "/users/1").json()
        assert 400 <= reply.status < 500 and after == before, (
            f"PUT /users/1 with {body} ({what}) when the user is {before}: expected 400 or "
            f"422 and the user unchanged, saw {reply.status} {reply.body[:100]!r} and the user "
            f"is now {after}: {why}")


# A POST creates from its body alone, so it needs the same checks as PUT: a body that is not
# JSON, not an object, or not a complete user with string fields is the client's mistake -
# 400 or 422, nothing created - never a 500 (json.loads' error, a KeyError, the NOT NULL)
# and never a row holding what the client did not send.
NOT_A_USER = ("a user has a name and an email, both strings; a body that is not one is "
              "refused, not stored with a gap or a stand-in")
INVALID_POSTS: list[tuple[Any, str, str]] = [
    (b'{"name": "Bob", "email": ', "a body that is not JSON (cut off)",
     "json.loads raises on it: catch it and answer 400"),
    (b"name=Bob&email=bob%40example.com", "a form-encoded body, not JSON",
     "json.loads raises on it: catch it and answer 400"),
    (b"", "an empty body", "there is no user in it"),
    (b"null", "JSON null", "it is not a JSON object"),
    (b'["Bob", "bob@example.com"]', "a JSON list", "it is not a JSON object"),
    ({"name": "Bob"}, "no email", NOT_A_USER),
    ({"email": "bob@example.com"}, "no name", NOT_A_USER),
    ({"name": "Bob", "email": None}, "email null", NOT_A_USER),
    ({"name": 42, "email": "bob@example.com"}, "name a number", MISTYPED),
    ({"name": "Bob", "email": True}, "email true", MISTYPED),
    ({"name": ["Bob"], "email": "bob@example.com"}, "name a list", MISTYPED),
    ({"name": "Bob\u0000", "email": "bob@example.com"}, "a NUL character in name", NUL),
    ({"name": "Bob", "email": "bob\u0000@example.com"}, "a NUL character in email", NUL),
]


def user_rows(postgres: Any) -> list[tuple[Any, ...]]:
    with postgres.connect(autocommit=True) as conn:
        return list(conn.execute("SELECT id, name, email FROM users ORDER BY id").fetchall())


def test_post_with_invalid_body_is_refused(host: str, postgres: Any) -> None:
    before = user_rows(postgres)
    for body, what, why in INVALID_POSTS:
        reply = call(host, "POST", "/users", body)
        after = user_rows(postgres)
        assert 400 <= reply.status < 500 and after == before, (
            f"POST /users with {body!r} ({what}): expected 400 or 422 and no user created, "
            f"saw {reply.status} {reply.body[:150]!r}"
            + (f" and the users are now {after}" if after != before else "") + f": {why}"
            + ("; a client's malformed request is a 4xx, never a server error - check "
               "POST's body as PUT's is checked" if reply.status >= 500 else ""))


# The email is UNIQUE: a POST or PUT that gives a user an email another user has conflicts
# with the collection's state (RFC 9110 15.5.10) - the client's to resolve, never the
# index's error as a 500.
def test_taken_email_is_409(host: str, postgres: Any) -> None:
    before = user_rows(postgres)
    taken = before[0][2]
    attempts = [("POST", "/users", {"name": "Ada Again", "email": taken}),
                ("PUT", f"/users/{before[1][0]}", {"name": before[1][1], "email": taken})]
    for method, path, body in attempts:
        reply = call(host, method, path, body)
        after = user_rows(postgres)
        assert reply.status in (409, 422) and after == before, (
            f"{method} {path} with {body} (user {before[0][0]} has that email, which is "
            f"UNIQUE): expected 409 Conflict (or 422) and nothing changed, saw "
            f"{reply.status} {reply.body[:150]!r}"
            + (f" and the users are now {after}" if after != before else "")
            + (": the UNIQUE index refused the write and its error became a server error - "
               "catch the UniqueViolation and answer 409, on every route that writes an "
               "email" if reply.status >= 500 else ""))


# Two clients claim one free email at once. The test holds a third, uncommitted INSERT of
# that email (its transaction open) while both requests arrive, so whatever each request
# checks first (a SELECT for the email) it checks before either has written; it lets them
# go once both wait in Postgres (or have answered). A check and a separate write let both
# through to the UNIQUE index: the second's UniqueViolation is still a 409.
RACES = {"POST": [("/users", {"name": "Grace Hopper", "email": "race@example.com"}),
                  ("/users", {"name": "Grace Murray", "email": "race@example.com"})],
         "PUT": [("/users/1", {"name": "Ada Lovelace", "email": "race@example.com"}),
                 ("/users/2", {"name": "Alan Turing", "email": "race@example.com"})]}


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_two_writes_claiming_one_email_one_wins(host: str, postgres: Any,
                                                method: str) -> None:
    writes = RACES[method]
    replies = two_held_in_postgres(
        postgres, "INSERT INTO users (name, email) VALUES ('Holder', 'race@example.com')",
        lambda i: call(host, method, writes[i][0], writes[i][1]))
    sent = f"{method} {writes[0][0]} and {method} {writes[1][0]}, both with email race@example.com"
    for reply in replies:
        assert isinstance(reply, HttpReply), f"{sent}, at the same time: no answer ({reply!r})"
    statuses = sorted(r.status for r in replies)
    holders = [row for row in user_rows(postgres) if row[2] == "race@example.com"]
    assert len(holders) == 1 and statuses[0] < 300 and statuses[1] in (409, 422), (
        f"{sent} (the email is UNIQUE, free when both arrived), at the same time: expected "
        f"one {'201' if method == 'POST' else '200'} and one 409 Conflict (or 422), saw "
        f"{statuses} {[r.body[:80] for r in replies]}, users with that email: {holders}"
        + (": both checked that the email was free before either wrote it, so the loser's "
           "write met the UNIQUE index and its UniqueViolation became a server error - a "
           "check made before the write cannot see a write in flight; let the index decide "
           "and answer 409 for its UniqueViolation (or INSERT ... ON CONFLICT)"
           if statuses[1] >= 500 else ""))


# An id past bigint's range (2**63 - 1) names no user either, however long: 5,000 digits is
# past what Python's int() reads from a string (4,300 digits, sys.get_int_max_str_digits),
# so an id taken as a number without a bound becomes a ValueError, and a 500.
HUGE_IDS = ["9223372036854775808", "9" * 5000]


def test_id_beyond_bigint_is_404(host: str) -> None:
    body = {"name": "Nobody", "email": "nobody@example.com"}
    for user_id in HUGE_IDS:
        shown = user_id if len(user_id) < 30 else f"<{len(user_id)} digits>"
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            reply = call(host, method, f"/users/{user_id}", body if method == "PUT" else None)
            assert reply.status in (400, 404), (
                f"{method} /users/{shown} (past bigint's largest value, 2**63 - 1, so no "
                f"user has it): expected 404 (or 400), saw {reply.status} {reply.body[:120]!r}"
                + (": an id of any length is a client's input, never a server error - bound "
                   "its digits before converting it (int() refuses more than 4300, a bigint "
                   "holds 19) and answer 404" if reply.status >= 500 else ""))


def test_missing_user_is_404(host: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        missing_user_is_404(host, method)


def missing_user_is_404(host: str, method: str) -> None:
    body = {"name": "Nobody", "email": "nobody@example.com"} if method == "PUT" else None
    reply = call(host, method, "/users/999999", body)
    assert reply.status == 404, (
        f"{method} /users/999999 (no such user): expected 404, saw {reply.status}: the "
        "resource does not exist, so there is nothing to "
        f"{'read' if method == 'GET' else 'replace' if method == 'PUT' else 'delete'}; "
        "check what the statement found (rowcount, RETURNING) and answer 404 when it found "
        "nothing - a 2xx tells the client the operation happened")


def test_if_none_match_star_on_a_missing_user(host: str, postgres: Any) -> None:
    """If-None-Match: * is true when the target has NO current representation (RFC 9110
    13.1.2): for a user that does not exist the request proceeds as if unconditional - to
    its 404. A 304 would tell a cache that its copy of a user who does not exist is fresh."""
    created = call(host, "POST", "/users", {"name": "Edgar Codd", "email": "ted@example.com"})
    assert created.status == 201, (
        f"POST /users: expected 201, saw {created.status} {created.body[:200]!r}")
    path = "/users/" + (created.header("Location") or "").rsplit("/", 1)[-1]
    old_tag = get_ok(host, path).header("ETag") or ""
    deleted = call(host, "DELETE", path)
    assert deleted.status == 204, f"DELETE {path}: expected 204, saw {deleted.status}"
    before = user_rows(postgres)
    body = {"name": "Nobody", "email": "nobody@example.com"}
    requests = [("GET", "/users/999999", "*", None, "a user that never existed"),
                ("GET", path, "*", None, "a user just deleted"),
                ("GET", path, old_tag, None, "a user just deleted, with its last ETag"),
                ("PUT", "/users/999999", "*", body, "a user that never existed"),
                ("DELETE", "/users/999999", "*", None, "a user that never existed")]
    for method, target, sent, content, what in requests:
        reply = call(host, method, target, content, {"If-None-Match": sent})
        assert reply.status == 404 and user_rows(postgres) == before, (
            f"{method} {target} with If-None-Match: {sent} ({what}): expected 404 and no "
            f"change, saw {reply.status} {reply.body[:120]!r}: the condition is about the "
            "current representation, and there is none - '*' matches only one that exists "
            "(RFC 9110 13.1.2), so the request goes on as if it had no condition and finds "
            "no user"
            + ("; look the user up first, and evaluate If-None-Match only against a "
               "representation you would send with 200 - a 304 tells the cache that its "
               "copy of a user who does not exist is still good" if reply.status == 304
               else "; PUT replaces a user, it never creates one" if method == "PUT"
               else ""))


# ---- conditional writes: If-Match / If-None-Match on PUT and DELETE -----------------------
# RFC 9110 13.1.1, 13.1.2, 13.2.2. A client that edits what it read sends If-Match with the
# tag it read: if another writer changed the user since, the tag is no longer current and the
# write is refused with 412 Precondition Failed, changing nothing - else it overwrites a
# change its client never saw (the lost update ETags exist to prevent). If-Match compares
# strongly (8.8.3.2: a weak tag never matches); If-None-Match weakly, and on a write a match
# is 412 (not 304): "If-None-Match: *" means "only if it does not exist yet". A user that
# does not exist is a 404 whatever the conditions (13.2.1: a request that would fail without
# them ignores them; a PUT here never creates). {tag} is the current tag, {weak} W/{tag}.
LOST_UPDATE = ("the client's tag is from before another writer changed the user: If-Match no "
               "longer holds, so the write must be refused with 412 Precondition Failed and "
               "the other writer's change kept (RFC 9110 13.1.1) - a write that ignores it "
               "silently overwrites a change its client never saw: the lost update ETags "
               "exist to prevent")
STRONG = ("If-Match compares strongly (RFC 9110 13.1.1, 8.8.3.2): a weak tag W/\"...\" never "
          "matches, since it does not promise the exact representation the client's edit "
          "was made on - only If-None-Match compares weakly")
STALE_LIST = ("no tag of the If-Match list is current: the condition is false, 412 and "
              "nothing changed")
LIST = ("If-Match is a list (RFC 9110 13.1.1): the write goes ahead when any tag of it is the "
        "current one, wherever it stands - split on ',', strip each tag, compare every one")
CURRENT = "the tag sent is the current one: the condition holds and the write goes ahead"
COMMA_TAG = ("the one tag sent holds a comma and the current tag's text, but it is another "
             "tag: If-Match is false, 412 and nothing changed" + COMMA_IN_A_TAG)
NONE_COMMA = ("the one tag sent holds a comma and the current tag's text, but it is another "
              "tag: If-None-Match holds and the write goes ahead" + COMMA_IN_A_TAG)
ANY = "If-Match: * holds for any current representation, and the user exists"
CREATE_ONLY = ("If-None-Match: * on a write means 'only if it does not exist yet' (RFC 9110 "
               "13.1.2): the user exists, so the condition is false - 412 and nothing changed")
NONE_MATCH = ("If-None-Match holds the current tag (compared weakly, W/ ignored): the "
              "condition is false, and for a method other than GET or HEAD that is 412 "
              "Precondition Failed (RFC 9110 13.1.2), not 304 and not the write")
NONE_STALE = "no tag of If-None-Match is current: the condition holds and the write goes ahead"
MISSING = ("there is no such user: a request that would fail without its conditions ignores "
           "them (RFC 9110 13.2.1) - 404, and a PUT here never creates a user")

ADA = (1, "Ada Lovelace", "ada@example.com")
REPLACEMENT = {"name": "Ada Byron", "email": "ada@example.com"}


@dataclass(frozen=True)
class Conditional:
    method: str
    header: str
    value: str                   # {tag}: the current ETag, {weak}: W/{tag}, {opaque}: its text
    outcome: str                 # "applied", "412" or "404"
    why: str
    changed_by_other: bool = False   # another writer renames the user after the client read it
    target: str = "/users/1"


CONDITIONAL_WRITES = [
    Conditional("PUT", "If-Match", "{tag}", "412", LOST_UPDATE, changed_by_other=True),
    Conditional("PUT", "If-Match", "{weak}", "412", STRONG),
    Conditional("PUT", "If-Match", '"old-1", "old-2"', "412", STALE_LIST),
    Conditional("PUT", "If-Match", '"old-1", {tag}', "applied", LIST),
    Conditional("PUT", "If-Match", '"old-1" ,\t{tag},"old-2"', "applied", LIST),
    Conditional("PUT", "If-Match", "{tag}", "applied", CURRENT),
    Conditional("PUT", "If-Match", '"old,{opaque}"', "412", COMMA_TAG),
    Conditional("PUT", "If-None-Match", '"old,{opaque}"', "applied", NONE_COMMA),
    Conditional("PUT", "If-Match", "*", "applied", ANY),
    Conditional("PUT", "If-None-Match", "*", "412", CREATE_ONLY),
    Conditional("PUT", "If-None-Match", '"old-1", {weak}', "412", NONE_MATCH),
    Conditional("PUT", "If-None-Match", '"old-1"', "applied", NONE_STALE),
    Conditional("DELETE", "If-Match", "{tag}", "412", LOST_UPDATE, changed_by_other=True),
    Conditional("DELETE", "If-Match", "{weak}", "412", STRONG),
    Conditional("DELETE", "If-Match", '"old-1",{tag}', "applied", LIST),
    Conditional("DELETE", "If-Match", "*", "applied", ANY),
    Conditional("DELETE", "If-Match", '"{opaque},old"', "412", COMMA_TAG),
    Conditional("DELETE", "If-None-Match", "*", "412", CREATE_ONLY),
    Conditional("DELETE", "If-None-Match", "{tag}", "412", NONE_MATCH),
    Conditional("PUT", "If-Match", "*", "404", MISSING, target="/users/999999"),
    Conditional("PUT", "If-Match", '"old-1"', "404", MISSING, target="/users/999999"),
    Conditional("DELETE", "If-Match", "*", "404", MISSING, target="/users/999999"),
]


def reset_user(postgres: Any, row: tuple[Any, ...]) -> None:
    """Put the user back as it was (same id, same fields, so the same ETag)."""
    with postgres.connect(autocommit=True) as conn:
        conn.execute("DELETE FROM users WHERE id = %s", (row[0],))
        conn.execute("INSERT INTO users (id, name, email) OVERRIDING SYSTEM VALUE "
                     "VALUES (%s, %s, %s)", row)


def user_row(postgres: Any, user_id: int) -> tuple[Any, ...] | None:
    with postgres.connect(autocommit=True) as conn:
        row = conn.execute("SELECT id, name, email FROM users WHERE id = %s",
                           (user_id,)).fetchone()
    return tuple(row) if row else None


def test_conditional_put_and_delete(host: str, postgres: Any) -> None:
    for case in CONDITIONAL_WRITES:
        reset_user(postgres, ADA)
        tag = get_ok(host, "/users/1").header("ETag") or ""
        if case.changed_by_other:
            with postgres.connect(autocommit=True) as conn:
                conn.execute("UPDATE users SET name = 'Ada King' WHERE id = 1")
        sent = case.value.format(tag=tag, weak=tag if tag.startswith("W/") else "W/" + tag,
                                 opaque=opaque(tag))
        before = user_rows(postgres)
        body = REPLACEMENT if case.method == "PUT" else None
        reply = call(host, case.method, case.target, body, {case.header: sent})
        after = user_rows(postgres)
        what = (f"{case.method} {case.target} with {case.header}: {sent}"
                + (" (another writer renamed the user after the client read its tag)"
                   if case.changed_by_other else " (no such user)" if case.outcome == "404"
                   else f" (the current tag is {tag})"))
        seen = f"saw {reply.status} {reply.body[:100]!r}" + (
            f" and the users are now {after}" if after != before else " and nothing changed")
        if case.outcome == "applied":
            if case.method == "PUT":
                want = {"id": 1, **REPLACEMENT}
                row = user_row(postgres, 1)
                done = reply.status in (200, 204) and row == (1, *REPLACEMENT.values())
                expected = f"200 (or 204) and the user replaced by {want}"
            else:
                done = reply.status == 204 and user_row(postgres, 1) is None
                expected = "204 and the user deleted"
            assert done, f"{what}: expected {expected}, {seen}: {case.why}"
        else:
            status = 412 if case.outcome == "412" else 404
            assert reply.status == status and after == before, (
                f"{what}: expected {status} and nothing changed, {seen}: {case.why}"
                + ("; the write went ahead although its condition was false"
                   if reply.status in (200, 204) and status == 412 else ""))


# ---- conditional reads: If-Match on GET --------------------------------------------------
# If-Match is not only for writes: a false If-Match on any method, a GET too, is 412 (RFC 9110
# 13.1.1: "the origin server MUST NOT perform the requested method"; 13.2.2 evaluates it first,
# step 1, for every method) - a client resuming a download or checking that what it holds is
# still current asks so, and Go's http.ServeContent and nginx answer a GET with 412. It
# compares strongly (a W/ tag never matches), holds for * when the resource exists, and comes
# before If-None-Match: only when it holds may If-None-Match turn the 200 into a 304. A
# missing resource is 404 whatever the conditions (13.2.1).
GET_STRONG = ("If-Match compares strongly on every method (RFC 9110 13.1.1, 8.8.3.2): a weak "
              "tag W/\"...\" never matches, on a GET as on a PUT - only If-None-Match compares "
              "weakly")
GET_STALE = ("If-Match holds no current tag: the condition is false, and on a GET too that is "
             "412 Precondition Failed (RFC 9110 13.1.1: the server MUST NOT perform the method) "
             "- a 200 hands the client a representation other than the one it asked for")
GET_LIST = ("If-Match is a list: the GET goes ahead (200 and the body) when any tag of it is the "
            "current one, wherever it stands")
GET_ANY = "If-Match: * holds for any current representation, and the resource exists"
MATCH_FIRST = ("If-Match is evaluated before If-None-Match (RFC 9110 13.2.2): it is false, so "
               "the answer is 412 whatever If-None-Match says - a 304 tells the client that "
               "the copy it holds is current, which is not what it asked")
GET_MISSING = ("there is no such user: a request that would fail without its conditions ignores "
               "them (RFC 9110 13.2.1) - 404, not 412")
GET_COMMA = ("the one tag sent holds a comma and the current tag's text, but it is another "
             "tag: If-Match is false, 412" + COMMA_IN_A_TAG)
THEN_NONE_MATCH = ("If-Match holds, so If-None-Match is evaluated next (RFC 9110 13.2.2), and "
                   "it matches the current tag: 304")


@dataclass(frozen=True)
class ConditionalRead:
    target: str
    headers: tuple[tuple[str, str], ...]  # {tag}: the current ETag, {weak}: W/{tag}, {opaque}
    status: int                           # 200 (and the body), 304 (no body), 412 or 404
    why: str
    changed_by_other: bool = False        # another writer renames user 1 after the read


CONDITIONAL_READS = [
    *(case for target in ("/users/1", "/users") for case in (
        ConditionalRead(target, (("If-Match", "{tag}"),), 200, CURRENT),
        ConditionalRead(target, (("If-Match", "*"),), 200, GET_ANY),
        ConditionalRead(target, (("If-Match", '"old-1" ,\t{tag},"old-2"'),), 200, GET_LIST),
        ConditionalRead(target, (("If-Match", '"old-1", "old-2"'),), 412, GET_STALE),
        ConditionalRead(target, (("If-Match", "{tag}"),), 412, GET_STALE,
                        changed_by_other=True),
        ConditionalRead(target, (("If-Match", "{weak}"),), 412, GET_STRONG),
        ConditionalRead(target, (("If-Match", '"{opaque},old"'),), 412, GET_COMMA),
        ConditionalRead(target, (("If-Match", '"old-1"'), ("If-None-Match", "{tag}")), 412,
                        MATCH_FIRST),
        ConditionalRead(target, (("If-Match", "{tag}"), ("If-None-Match", "{weak}")), 304,
                        THEN_NONE_MATCH))),
    ConditionalRead("/users/999999", (("If-Match", "*"),), 404, GET_MISSING),
    ConditionalRead("/users/999999", (("If-Match", '"old-1"'),), 404, GET_MISSING),
]


def test_conditional_get_with_if_match(host: str, postgres: Any) -> None:
    for case in CONDITIONAL_READS:
        reset_user(postgres, ADA)
        read = "/users/1" if case.status == 404 else case.target
        tag = get_ok(host, read).header("ETag") or ""
        if case.changed_by_other:
            with postgres.connect(autocommit=True) as conn:
                conn.execute("UPDATE users SET name = 'Ada King' WHERE id = 1")
        weak = tag if tag.startswith("W/") else "W/" + tag
        sent = {name: value.format(tag=tag, weak=weak, opaque=opaque(tag))
                for name, value in case.headers}
        current = call(host, "GET", case.target)
        reply = call(host, "GET", case.target, headers=sent)
        what = (f"GET {case.target} with "
                + ", ".join(f"{name}: {value}" for name, value in sent.items())
                + (" (another writer renamed user 1 after the client read its tag)"
                   if case.changed_by_other else " (no such user)" if case.status == 404
                   else f" (the current tag is {tag})"))
        seen = f"saw {reply.status} {reply.body[:100]!r}"
        if case.status == 200:
            assert reply.status == 200 and reply.body == current.body, (
                f"{what}: expected 200 and the current representation, {seen}: {case.why}")
        elif case.status == 304:
            assert reply.status == 304 and reply.body == b"", (
                f"{what}: expected 304 Not Modified and no body, {seen}: {case.why}")
        else:
            assert reply.status == case.status, (
                f"{what}: expected {case.status}, {seen}: {case.why}"
                + ("; If-Match holds on a GET as on a write: compare it (strongly) before "
                   "answering, and answer 412 when it is false" if reply.status == 200
                   else ""))


def blocked_backends(monitor: Any) -> int:
    """Sessions of this test's database waiting for a lock another session holds."""
    row = monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                          "current_database() AND cardinality(pg_blocking_pids(pid)) > 0"
                          ).fetchone()
    return int(row[0])


def two_held_in_postgres(postgres: Any, hold: str, send: Callable[[int], Any]) -> list[Any]:
    """``send(0)`` and ``send(1)`` at once, each on a thread of its own, while a transaction
    of the test's holds the lock ``hold`` takes: both are seen waiting in Postgres (or
    ended) before it is rolled back. What each returned, or the exception it raised."""
    replies: list[Any] = [None, None]

    def run(i: int) -> None:
        try:
            replies[i] = send(i)
        except Exception as error:  # noqa: BLE001 - reported by the caller, in its words
            replies[i] = error

    with postgres.connect(autocommit=True) as monitor, postgres.connect() as holder:
        holder.execute(hold)
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        came_true(lambda: blocked_backends(monitor) >= 2
                  or not any(t.is_alive() for t in threads), timeout=15)
        holder.rollback()
    for thread in threads:
        thread.join(30)
    return replies


def test_two_puts_holding_one_tag_one_wins(host: str, postgres: Any) -> None:
    """Two clients read user 1 (the same tag) and both PUT with If-Match. The test holds the
    user's row locked (SELECT ... FOR UPDATE) while both requests arrive, and lets them go
    once both wait in Postgres (or have answered): a check made before the write, outside
    its lock, lets both through every time. Exactly one wins; the other gets 412."""
    tag = get_ok(host, "/users/1").header("ETag") or ""
    bodies = [{"name": "Ada King", "email": "ada@example.com"},
              {"name": "Ada Byron", "email": "ada@example.com"}]
    replies = two_held_in_postgres(
        postgres, "SELECT 1 FROM users WHERE id = 1 FOR UPDATE",
        lambda i: call(host, "PUT", "/users/1", bodies[i], {"If-Match": tag}))
    for i, reply in enumerate(replies):
        assert isinstance(reply, HttpReply), (
            f"PUT /users/1 with If-Match: {tag} ({bodies[i]['name']}), sent at the same time "
            f"as another: no answer ({reply!r})")
    statuses = [r.status for r in replies]
    row = user_row(postgres, 1)
    winners = [i for i, s in enumerate(statuses) if s in (200, 204)]
    if len(winners) == 2:
        pytest.fail(
            f"two PUT /users/1 at the same time, both with If-Match: {tag} (the tag both "
            f"clients had read), were both answered {statuses[0]} and {statuses[1]}; the user "
            f"is now {row}: the second write overwrote the first without its client having "
            "seen it - the lost update If-Match exists to prevent\nEach request checked the "
            "tag before the other's write landed (the test held the row locked while both "
            "arrived). Make the check and the write one step: lock the row in the write's "
            "transaction (SELECT ... FOR UPDATE) before comparing the tag, or put the state "
            "the tag stands for in the UPDATE's WHERE and answer 412 when no row is updated. "
            "A transaction alone (READ COMMITTED) lets both read the old row.", pytrace=False)
    assert len(winners) == 1 and 412 in statuses, (
        f"two PUT /users/1 at the same time, both with If-Match: {tag} (the current tag): "
        f"expected one 200 (or 204) and one 412 Precondition Failed, saw {statuses} "
        f"{[r.body[:80] for r in replies]}: the first to get the row writes; the second's "
        "tag is then stale, so it fails its condition (412) - not a 5xx, not a 409")
    winner = winners[0]
    assert row == (1, bodies[winner]["name"], bodies[winner]["email"]), (
        f"two PUT /users/1 at the same time with If-Match: {tag}: the one answered "
        f"{statuses[winner]} sent {bodies[winner]}, but the user is now {row}: the write "
        "that lost (412) must change nothing")


def test_two_instances_share_no_session(host: str, other_process: str) -> None:
    a, b = host, other_process
    created = call(a, "POST", "/users", {"name": "Grace Hopper", "email": "grace@example.com"})
    assert created.status == 201, (
        f"POST /users on instance A: expected 201 Created, saw {created.status} "
        f"{created.body[:200]!r}")
    location = created.header("Location") or ""
    assert re.fullmatch(r"(http://[^/]+)?/users/\d+", location), (
        f"POST /users: expected Location: /users/<id> naming the new resource, saw {location!r}")
    path = "/users/" + location.rsplit("/", 1)[1]
    assert "Set-Cookie" not in created.headers, (
        "POST /users answered with Set-Cookie: a stateless API keeps no session; each request "
        "must carry everything the server needs")

    on_b = get_ok(b, path)
    assert on_b.json() == created.json(), (
        f"GET {path} on instance B: expected the user created on A {created.json()!r}, saw "
        f"{on_b.json()!r}: instances must share state only through the database")
    on_a = assert_same_etag(a, b, path)
    assert_same_etag(a, b, "/users")
    assert_not_modified(b, path, on_a.header("ETag") or "",
                        "a tag issued by instance A must be honoured by instance B")

    replaced = call(b, "PUT", path, {"name": "Grace B. Hopper", "email": "grace@example.com"})
    assert replaced.status in (200, 204), (
        f"PUT {path} on instance B: expected 200 or 204, saw {replaced.status} "
        f"{replaced.body[:200]!r}")
    again = call(a, "GET", path, headers={"If-None-Match": on_a.header("ETag") or ""})
    assert again.status == 200 and again.json().get("name") == "Grace B. Hopper", (
        f"GET {path} on instance A after B replaced it: expected 200 with name "
        f"'Grace B. Hopper', saw {again.status} {again.body[:200]!r}: instance A answered "
        "from state of its own")

    deleted = call(a, "DELETE", path)
    assert deleted.status == 204, f"DELETE {path} on A: expected 204, saw {deleted.status}"
    gone = call(b, "GET", path)
    assert gone.status == 404, (
        f"GET {path} on instance B after A deleted it: expected 404, saw {gone.status}")
    twice = call(b, "DELETE", path)
    assert twice.status == 404, (
        f"DELETE {path} on instance B after A deleted it: expected 404, saw {twice.status}: "
        "the user no longer exists; DELETE is idempotent in its effect (the row stays "
        "gone), not in its answer")


# ---- HEAD: GET without the body ---------------------------------------------------------
# RFC 9110 9.1: every general-purpose server supports GET and HEAD; 9.3.2: HEAD answers
# with the status and headers GET would (Content-Length, if sent, the GET's: 8.6), and no
# content. Clients and caches use it to check a resource or revalidate without downloading
# it (curl -I, link checkers, load balancers' health checks). http.client never reads the
# body of a HEAD answer, so both requests go over raw sockets: every byte sent is seen.
# (name, path, the conditions sent, the status GET and HEAD must both give)
HEAD_CASES = [
    ("user", "/users/1", {}, 200),
    ("collection", "/users", {}, 200),
    ("user-not-modified", "/users/1", {"If-None-Match": "{etag}"}, 304),
    ("collection-not-modified", "/users", {"If-None-Match": "{etag}"}, 304),
    ("stale-if-match", "/users/1", {"If-Match": '"0123456789abcdef"'}, 412),
    ("missing-user", "/users/999", {}, 404),
    ("no-such-resource", "/getUsers", {}, 404),
]
HEAD_SAME_HEADERS = ("ETag", "Cache-Control", "Content-Type")


def raw_exchange(host: str, method: str, path: str, headers: dict[str, str],
                 body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request on a socket of its own, read until the server closes it (wsgiref serves
    one request per connection): the status, the headers and every byte after them."""
    address, port = host.rsplit(":", 1)
    if body:
        headers = {**headers, "Content-Type": "application/json",
                   "Content-Length": str(len(body))}
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items())]
    received = b""
    with socket.create_connection((address, int(port)), timeout=20) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, body


@pytest.mark.parametrize(("name", "path", "conditions", "status"), HEAD_CASES,
                         ids=[case[0] for case in HEAD_CASES])
def test_head_is_get_without_a_body(host: str, name: str, path: str,
                                    conditions: dict[str, str], status: int) -> None:
    etag = (get_ok(host, path).header("ETag") or "") if status == 304 else ""
    headers = {field: value.format(etag=etag) for field, value in conditions.items()}
    sent = "".join(f" with {field}: {value}" for field, value in headers.items())
    got, get_headers, get_body = raw_exchange(host, "GET", path, headers)
    assert got == status, f"GET {path}{sent}: expected {status}, saw {got} {get_body[:120]!r}"
    head, head_headers, head_body = raw_exchange(host, "HEAD", path, headers)
    assert head == got, (
        f"HEAD {path}{sent}: expected {got}, the status GET gives, saw {head}: HEAD is GET "
        "without the body (RFC 9110 9.3.2), supported wherever GET is (9.1) - the same "
        "route, the same conditions (a 304 or 412 too), only the body left out; a 405 tells "
        "curl -I, link checkers and health checks that the resource cannot be read")
    assert head_body == b"", (
        f"HEAD {path}{sent}: the answer carried {len(head_body)} bytes of body "
        f"({head_body[:80]!r}): a HEAD answer has no content (RFC 9110 9.3.2) - a client "
        "reads none, so on a kept-alive connection those bytes are taken for the next "
        "response; send the GET's headers, then nothing")
    for field in HEAD_SAME_HEADERS:
        assert head_headers.get(field.lower()) == get_headers.get(field.lower()), (
            f"HEAD {path}{sent}: {field} was {head_headers.get(field.lower())!r}, GET's is "
            f"{get_headers.get(field.lower())!r}: HEAD sends the headers GET would (RFC 9110 "
            "9.3.2), so a client can revalidate or check freshness without the body")
    length = head_headers.get("content-length")
    assert length is None or length == str(len(get_body)), (
        f"HEAD {path}{sent}: Content-Length: {length}, but GET sends {len(get_body)} bytes: "
        "a HEAD answer's Content-Length, if any, is the GET's body length (RFC 9110 8.6)")


# ---- Content-Length counts bytes ---------------------------------------------------------
# RFC 9110 8.6: Content-Length is the number of octets of the content. JSON written with
# ensure_ascii=False (names as they are, not \u escapes) is fine - but then len() of the str
# counts characters, and "Zoë" is 3 characters, 4 bytes in UTF-8: the header falls short, a
# client reads exactly that many bytes and gets cut-off JSON, and on a kept-alive connection
# takes the rest for the next response. Raw sockets again: every byte sent is seen.
NON_ASCII_USERS = [{"name": "Zoë Ødegård 李小龍 🚀", "email": "zoë@exämple.com"},
                   {"name": "Ñandú Çelik ½ ™ 𝄞", "email": "nandu@example.com"}]


def assert_bytes_counted(host: str, method: str, path: str, document: Any,
                         status: int, want: Any) -> Any:
    sent = f"{method} {path}" + (f" with {document}" if document is not None else "")
    body = b"" if document is None else json.dumps(document, ensure_ascii=False).encode()
    got, headers, received = raw_exchange(host, method, path, {}, body)
    assert got == status, f"{sent}: expected {status}, saw {got} {received[:150]!r}"
    length = headers.get("content-length")
    assert length is None or length == str(len(received)), (
        f"{sent}: Content-Length: {length}, but {len(received)} bytes of body followed "
        f"({received[:150]!r}): Content-Length counts the bytes sent, not the characters of "
        "the text (RFC 9110 8.6) - outside ASCII a character is 2 to 4 bytes in UTF-8, so "
        "take len() of the encoded bytes; a client reads exactly Content-Length bytes and "
        "gets cut-off JSON, and on a kept-alive connection takes the rest for the next reply")
    try:
        decoded = json.loads(received)
    except ValueError:
        pytest.fail(f"{sent}: the body is not JSON (UTF-8, RFC 8259 8.1): {received[:150]!r}")
    assert want(decoded), (
        f"{sent}: expected the user as sent, {document or 'as stored'}, saw {decoded}: a name "
        "outside ASCII must come back as the same characters")
    return decoded


def test_content_length_counts_bytes_of_non_ascii_names(host: str, postgres: Any) -> None:
    first, second = NON_ASCII_USERS
    created = assert_bytes_counted(host, "POST", "/users", first, 201,
                                   lambda user: user.get("name") == first["name"])
    path = f"/users/{created['id']}"
    assert_bytes_counted(host, "GET", path, None, 200,
                         lambda user: user.get("name") == first["name"])
    assert_bytes_counted(host, "GET", "/users", None, 200,
                         lambda users: first["name"] in [u.get("name") for u in users])
    assert_bytes_counted(host, "PUT", path, second, 200,
                         lambda user: user is None or user.get("name") == second["name"])
    assert_bytes_counted(host, "GET", path, None, 200,
                         lambda user: user.get("name") == second["name"])
    stored = [row for row in user_rows(postgres) if row[0] == created["id"]]
    assert stored == [(created["id"], second["name"], second["email"])], (
        f"after PUT {path} with {second}, the database holds {stored}: the body is UTF-8 "
        "JSON; decode it as such (json.loads on the bytes) and store the characters sent")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/users", {"GET", "HEAD", "POST"}),
    ("PATCH", "/users", {"GET", "HEAD", "POST"}),
    ("POST", "/users/1", {"GET", "HEAD", "PUT", "DELETE"}),
])
def test_uniform_interface_405(host: str, method: str, path: str,
                               allowed: set[str]) -> None:
    reply = call(host, method, path, {"name": "x", "email": "x@example.com"})
    assert reply.status == 405, (
        f"{method} {path}: expected 405 Method Not Allowed, saw {reply.status}: the resource "
        "exists, the method does not apply to it")
    seen = {m.strip().upper() for m in (reply.header("Allow") or "").split(",") if m.strip()}
    assert allowed <= seen, (
        f"{method} {path}: expected an Allow header listing {sorted(allowed)}, saw "
        f"{reply.header('Allow')!r}: a 405 tells the client which methods the resource has"
        + (" (HEAD is one wherever GET is, RFC 9110 9.1)" if "HEAD" not in seen else ""))
    # RFC 9110 10.2.1: Allow lists the methods the TARGET resource supports. A method listed
    # beyond the README's may be one the app really has (OPTIONS, say): tried, it must not
    # be a 405 - one list sent for every resource, or a method planned and never written,
    # sends clients (and generated ones) to methods that fail.
    for extra in sorted(seen - allowed):
        tried = call(host, extra, path, {"name": "x", "email": "x@example.com"})
        assert tried.status != 405, (
            f"{method} {path}: the 405's Allow is {reply.header('Allow')!r}, which lists "
            f"{extra}, but {extra} {path} answers 405 too: expected Allow to list exactly "
            f"the methods {path} has, {sorted(allowed)} (RFC 9110 10.2.1: the methods the "
            "target resource supports) - each resource its own list, not one list for the "
            "whole API, nor a method it does not have")


@pytest.mark.parametrize("path", ["/getUsers", "/user/1", "/users/1/delete", "/users/abc"])
def test_only_nouns_are_resources(host: str, path: str) -> None:
    reply = call(host, "GET", path)
    assert reply.status == 404, (
        f"GET {path}: expected 404, saw {reply.status}: resources are plural nouns "
        "(/users, /users/<id>); the HTTP method is the verb")
