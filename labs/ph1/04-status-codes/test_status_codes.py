"""Verification for ph1.4 status-codes.

Table-driven over real HTTP: the learner's make_app(...) runs behind a threaded wsgiref
server on 127.0.0.1:0 and every row of CASES is one real request with http.client, on a
fresh database. The rate limit runs on an injected clock; the outage is real (the test
closes the database to new connections and terminates the app's sessions).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from labrunner.testing import HttpReply, call, came_true, serve_wsgi

SCHEMA = """
CREATE TABLE api_tokens (token text PRIMARY KEY,
                         role  text NOT NULL CHECK (role IN ('reader', 'writer')));
CREATE TABLE projects (id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                       name text NOT NULL UNIQUE);
CREATE TABLE request_counts (token        text,
                             window_start bigint,
                             count        integer NOT NULL,
                             PRIMARY KEY (token, window_start));
INSERT INTO api_tokens VALUES ('writer-token', 'writer'), ('reader-token', 'reader'),
                              ('other-token', 'writer');
INSERT INTO projects (name) VALUES ('alpha'), ('to-delete');
"""
WRITER = {"Authorization": "Bearer writer-token"}
READER = {"Authorization": "Bearer reader-token"}
HOLD = 20.0  # upper bound for concurrent requests to reach the held lock, and to finish


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


# ---- the table --------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    meaning: str
    headers: dict[str, str] = field(default_factory=lambda: dict(WRITER))
    body: bytes | None = None
    check: Callable[[HttpReply], str | None] | None = None  # extra check: an error message or None


def location_of_new_project(reply: HttpReply) -> str | None:
    location = reply.headers.get("Location", "")
    if not re.fullmatch(r"(http://[^/]+)?/projects/\d+", location):
        return (f"expected Location: /projects/<new id>, saw {location!r}: a 201 names the "
                "resource it created")
    return None


def has_etag(reply: HttpReply) -> str | None:
    return None if reply.headers.get("ETag") else "expected an ETag header on the 200"


def no_body(reply: HttpReply) -> str | None:
    return None if reply.body == b"" else f"expected no body, saw {reply.body[:80]!r}"


def bearer_challenge(reply: HttpReply) -> str | None:
    challenge = reply.headers.get("WWW-Authenticate", "")
    if not challenge.lower().startswith("bearer"):
        return (f"expected WWW-Authenticate: Bearer ..., saw {challenge!r}: a 401 tells the "
                "client how to authenticate")
    return None


ROLE_FIRST = ("Forbidden: a reader may not write, whatever its body ({}) - check 3 (the role) "
              "comes before 4 and 5 (parse and validate the body) and 6 (the name exists); "
              "answering the body's problem tells a client that may never write to fix its "
              "data and retry, and validates input for a caller not allowed to send it").format

CASES = [
    Case("read", "GET", "/projects/1", 200, "OK: here it is", check=has_etag),
    Case("create", "POST", "/projects", 201, "Created", body=js({"name": "beta"}),
         check=location_of_new_project),
    Case("delete", "DELETE", "/projects/2", 204, "No Content: done, nothing to say",
         check=no_body),
    Case("broken-json", "POST", "/projects", 400,
         "Bad Request: the body cannot even be parsed", body=b'{"name": "gamma"'),
    Case("no-token", "GET", "/projects/1", 401,
         "Unauthorized: who are you? (no credentials)", headers={}, check=bearer_challenge),
    Case("bad-token", "GET", "/projects/1", 401,
         "Unauthorized: unknown token, so still anonymous",
         headers={"Authorization": "Bearer nope"}, check=bearer_challenge),
    # The scheme name is case-insensitive (RFC 9110 11.1), and only Bearer carries a token
    # (RFC 6750 2.1): a scheme of another name, or one not followed by a space, is no token.
    *(Case(f"scheme-{kind}", "GET", "/projects/1", 200,
           f"OK: {header.split()[0]!r} is the Bearer scheme - a scheme name is "
           "case-insensitive (RFC 9110 11.1), so compare it lower-cased; clients, proxies and "
           "libraries send it in any case", headers={"Authorization": header}, check=has_etag)
      for kind, header in (("lower-case", "bearer writer-token"),
                           ("upper-case", "BEARER writer-token"))),
    # credentials = auth-scheme [ 1*SP token68 ] (RFC 9110 11.4; RFC 6750 2.1: "Bearer"
    # 1*SP b64token): one space or more between the scheme and the token.
    *(Case(f"scheme-then-{kind}", "GET", "/projects/1", 200,
           f"OK: {header!r} is the Bearer scheme and the token writer-token - the scheme and "
           "the token are separated by one space or more (RFC 9110 11.4: 1*SP); splitting on "
           "a single space, or cutting a fixed 7 characters ('Bearer '), keeps a space in the "
           "token or finds an empty one: take the word after the scheme, its spaces removed",
           headers={"Authorization": header}, check=has_etag)
      for kind, header in (("two-spaces", "Bearer  writer-token"),
                           ("three-spaces", "Bearer   writer-token"))),
    *(Case(f"scheme-{kind}", "GET", "/projects/1", 401,
           f"Unauthorized: {why}, so the request carries no bearer token at all - read the "
           "scheme (the word before the first space), check it is Bearer, then look the "
           "token up; expected 401 with a WWW-Authenticate: Bearer challenge",
           headers={"Authorization": header}, check=bearer_challenge)
      for kind, header, why in (
          ("basic", "Basic writer-token",
           "'Basic writer-token' names the Basic scheme, whatever its credentials hold "
           "(taking the last word as the token accepts any scheme)"),
          ("glued-to-the-token", "Bearerwriter-token",
           "'Bearerwriter-token' is one word, a scheme of that name with no credentials: "
           "credentials are auth-scheme, a space, then the token (RFC 9110 11.4) - removing "
           "a prefix 'Bearer' without its space accepts it"))),
    Case("reader-creates", "POST", "/projects", 403,
         "Forbidden: we know you, and readers may not write", headers=dict(READER),
         body=js({"name": "gamma"})),
    Case("reader-deletes", "DELETE", "/projects/1", 403,
         "Forbidden: we know you, and readers may not delete", headers=dict(READER)),
    # The checks run in order: the first reason the request cannot succeed is the answer.
    Case("reader-sends-invalid-name", "POST", "/projects", 403,
         ROLE_FIRST("an empty name, alone a 422"),
         headers=dict(READER), body=js({"name": ""})),
    Case("reader-sends-broken-json", "POST", "/projects", 403,
         ROLE_FIRST("broken JSON, alone a 400"),
         headers=dict(READER), body=b'{"name": "gamma"'),
    Case("reader-sends-taken-name", "POST", "/projects", 403,
         ROLE_FIRST("a taken name, alone a 409"),
         headers=dict(READER), body=js({"name": "alpha"})),
    Case("reader-deletes-missing", "DELETE", "/projects/999", 403,
         "Forbidden: a reader may not delete, whether project 999 exists or not - check 3 "
         "(the role) comes before looking the project up (404): a 404 would tell a client "
         "that may never delete that another id might work, and reveal which ids exist",
         headers=dict(READER)),
    Case("no-token-sends-invalid-name", "POST", "/projects", 401,
         "Unauthorized: with no token nothing else is checked - check 1 (who are you?) "
         "comes before the body (400/422): the client must authenticate first",
         headers={}, body=js({"name": ""}), check=bearer_challenge),
    # Check 1 before routing and before any lookup: a 404 for an anonymous client (and a 401
    # where the path exists) tells anyone which paths and project ids exist.
    *(Case(f"no-token-{kind}", "GET", path, 401,
           f"Unauthorized: with no token nothing else is checked, not even whether {what} "
           "exists - check 1 (who are you?) comes before 6 (no such resource, 404): a 404 "
           "to an anonymous client, and a 401 where something exists, tells anyone which "
           "paths and ids exist; authenticate before routing or looking anything up",
           headers={}, check=bearer_challenge)
      for kind, path, what in (("unknown-path", "/nothing-here", "the path /nothing-here"),
                               ("missing", "/projects/999", "project 999"))),
    Case("missing", "GET", "/projects/999", 404, "Not Found: no project 999"),
    Case("delete-missing", "DELETE", "/projects/999", 404, "Not Found: no project 999"),
    Case("unknown-path", "GET", "/nothing-here", 404, "Not Found: no such resource"),
    Case("duplicate", "POST", "/projects", 409,
         "Conflict: a project named alpha already exists", body=js({"name": "alpha"})),
    Case("empty-name", "POST", "/projects", 422,
         "Unprocessable: valid JSON, invalid content (empty name)", body=js({"name": ""})),
    Case("wrong-type", "POST", "/projects", 422,
         "Unprocessable: valid JSON, invalid content (name is a number)", body=js({"name": 42})),
    Case("no-name", "POST", "/projects", 422,
         "Unprocessable: valid JSON, invalid content (no name)", body=js({})),
    Case("nul-in-name", "POST", "/projects", 422,
         "Unprocessable: valid JSON (\"\\u0000\"), but a name holding a NUL character is "
         "invalid content - a Postgres text value cannot hold NUL, so it is refused before the "
         "database sees it: not psycopg's DataError as a 500, not stored with the character "
         "dropped", body=js({"name": "del\u0000ta"})),
    # Bodies of every JSON shape, not only objects: valid JSON whose top level is not an
    # object has no name (422), and bytes that are not UTF-8 are not JSON at all (400).
    # Code that reaches for data.get("name") or "name" in data assumes an object and
    # crashes (500) on the rest.
    *(Case(f"body-is-{kind}", "POST", "/projects", 422,
           f"Unprocessable: the body is valid JSON, but {what}, not an object holding a "
           "name - check the parsed value's type (isinstance(data, dict)) before reading "
           "name from it; data.get(...), data[\"name\"] or \"name\" in data crash (500) on "
           "a list, a string, a number or null, and a 500 tells the client the server has a "
           "bug when its request was at fault", body=body)
      for kind, body, what in (
          ("a-list", js([{"name": "gamma"}]), "a list (holding an object with a name)"),
          ("a-string", js("gamma"), "a string"),
          ("a-number", js(42), "a number"),
          ("null", js(None), "null"))),
    Case("body-not-utf8", "POST", "/projects", 400,
         "Bad Request: the body's bytes are not UTF-8 (b'\\xff'), so it cannot be parsed as "
         "JSON at all - decode it inside the same check that catches broken JSON "
         "(json.loads(raw_bytes) raises a ValueError for both); a UnicodeDecodeError that "
         "escapes is a 500 for a client's mistake", body=b'{"name": "\xff"}'),
    Case("name-at-limit", "POST", "/projects", 201,
         "Created: a name of exactly 100 characters is valid (at most 100 - check the "
         "boundary with > 100, not >= 100)", body=js({"name": "n" * 100}),
         check=location_of_new_project),
    # Names are text, not ASCII: counted in characters (what Postgres' char_length and the
    # README's "100 characters" count), whatever their UTF-8 encoding takes in bytes.
    Case("name-not-ascii", "POST", "/projects", 201,
         "Created: 'Zürich 東京 🚀' is a valid name - any non-empty text of at most 100 "
         "characters is; refusing letters outside ASCII (a pattern like [ -~] or [A-Za-z0-9 "
         "_-], name.isascii()) refuses most of the world's names",
         body=js({"name": "Zürich 東京 🚀"}), check=location_of_new_project),
    Case("name-at-limit-not-ascii", "POST", "/projects", 201,
         "Created: 'é' x 100 is a name of exactly 100 characters (200 bytes in UTF-8), so it "
         "is valid - count the characters of the decoded name (len(name)), not the bytes of "
         "its encoding (len(name.encode()), the body's length)",
         body=js({"name": "é" * 100}), check=location_of_new_project),
    Case("name-too-long", "POST", "/projects", 422,
         "Unprocessable: a name of 101 characters is longer than the 100 allowed",
         body=js({"name": "n" * 101})),
]


# ---- conditional requests: one database and one server for the whole table --------------
# Each row gets a project of its own (inserted by the test), reads its ETag with a plain GET,
# then sends one request with one precondition header ({etag}: that tag, quotes and all;
# {bare}: without its quotes).
# - GET with If-None-Match (RFC 9110 13.1.2): "*" or a list of tags, compared weakly; when it
#   matches, 304 with no body and the same ETag the 200 carries (RFC 9110 15.4.5: the cache
#   refreshes the stored response that tag names, and a 304 without it leaves the cache
#   unable to tell which stored response is current), otherwise 200.
# - DELETE with If-Match (13.1.1): "*" or a list of tags compared STRONGLY (W/"x" never
#   matches); false -> 412 and nothing deleted: the client's copy is stale (lost update).
# - DELETE with If-None-Match: matching means the client expects a different state -> 412
#   (13.2.2 step 3: 304 is for GET and HEAD only), nothing deleted.
@dataclass
class Conditional:
    name: str
    method: str
    header: str
    value: str
    status: int
    meaning: str
    role: dict[str, str] = field(default_factory=lambda: dict(WRITER))
    gone: bool = False   # the project is deleted (by another client) after its ETag is read


NOT_MODIFIED = ("Not Modified: {} - If-None-Match is a list of tags, compared weakly (RFC 9110 "
                "13.1.2): take every quoted tag in it, drop a W/ prefix, 304 if one is the "
                "current tag (or the header is *); answering 200 resends the body to a client "
                "whose copy is current").format
STALE_COPIES = ("OK: {}, so the client's copies are all stale: answer 200 with the "
                "representation and its ETag").format
PRECONDITION_FAILED = ("Precondition Failed: {} - a DELETE whose precondition is false must not "
                       "delete (RFC 9110 13.2.2): answer 412 and leave the project; deleting "
                       "anyway destroys a version the client never saw (a lost update)").format
DELETED = ("No Content: {}, so the precondition holds and the project is deleted").format
# A project that does not exist has no current representation: "*" matches only one that
# exists (RFC 9110 13.1.1, 13.1.2), and no tag, not even its last one, is current. And a
# request that would fail without its preconditions ignores them (13.2.1: "redirects and
# failures that can be detected before significant processing occurs take precedence"):
# GET or DELETE of a project just deleted is 404 whatever the headers - never a 304 (a
# cache told its copy of a deleted project is fresh), never a 204 (a delete that deleted
# nothing), and not a 412 either (the client's copy is not stale: there is nothing).
NO_PROJECT = ("Not Found: the project was deleted after the client read its tag, so there "
              "is no current representation: {} - a request that would be a 404 without its "
              "preconditions ignores them (RFC 9110 13.2.1): look the project up first and "
              "answer 404 when it is gone, then evaluate the preconditions").format

CONDITIONAL = [
    Conditional("not-modified", "GET", "If-None-Match", "{etag}", 304,
                "Not Modified: your cached copy (If-None-Match) is current"),
    *(Conditional(f"if-none-match-{kind}", "GET", "If-None-Match", value, 304,
                  NOT_MODIFIED(why))
      for kind, value, why in (
          ("list-holding-current", '"0123456789abcdef", {etag}',
           "the list's second tag is the current one"),
          ("list-with-spaces", '"0123456789abcdef" ,  {etag} , "fedcba9876543210"',
           "the current tag is in the list, with spaces around the commas (optional white "
           "space, allowed around every list comma)"),
          ("weak-current", "W/{etag}",
           "W/ marks the current tag weak, and If-None-Match compares weakly: W/\"x\" matches "
           "\"x\" (nginx weakens the ETag of every response it gzips)"),
          ("weak-list", 'W/"0123456789abcdef", W/{etag}',
           "the list's second tag, weak, is the current one"),
          ("star", "*", "* matches any current representation, and the project exists"),
          ("comma-inside-a-tag", '"a,b", {etag}',
           "a comma may sit inside a quoted tag (\"a,b\" is one tag), and the next one is "
           "current"))),
    *(Conditional(f"if-none-match-{kind}", "GET", "If-None-Match", value, 200,
                  STALE_COPIES(why))
      for kind, value, why in (
          ("list-without-current", '"0123456789abcdef", W/"fedcba9876543210"',
           "no tag in the list is the current one"),
          ("other-tag-containing-current", '"{bare}-gzip"',
           "\"<tag>-gzip\" is another tag that merely contains the current one (Apache "
           "names its compressed variants so): compare whole tags, not substrings"))),
    *(Conditional(f"delete-if-match-{kind}", "DELETE", "If-Match", value, 204, DELETED(why))
      for kind, value, why in (
          ("current", "{etag}", "If-Match names the current tag"),
          ("star", "*", "If-Match: * holds whenever the project exists"),
          ("list-holding-current", '"0123456789abcdef", {etag}',
           "the list's second tag is the current one"))),
    *(Conditional(f"delete-if-match-{kind}", "DELETE", "If-Match", value, 412,
                  PRECONDITION_FAILED(why))
      for kind, value, why in (
          ("stale", '"0123456789abcdef"',
           "If-Match names a tag that is not the current one (the client's copy is stale)"),
          ("stale-list", '"0123456789abcdef", "fedcba9876543210"',
           "no tag in the If-Match list is the current one"),
          ("weak-current", "W/{etag}",
           "If-Match compares strongly (RFC 9110 13.1.1): a weak tag W/\"x\" never matches, "
           "even when \"x\" is current - only a strong tag promises the same bytes"),
          ("other-tag-containing-current", '"{bare}-gzip"',
           "\"<tag>-gzip\" is another tag that merely contains the current one: compare "
           "whole tags, not substrings"))),
    *(Conditional(f"delete-if-none-match-{kind}", "DELETE", "If-None-Match", value, 412,
                  PRECONDITION_FAILED(why))
      for kind, value, why in (
          ("current", "{etag}", "If-None-Match names the current tag, so the condition "
           "\"none of these\" is false; on a DELETE that is 412, not 304 (304 answers GET "
           "and HEAD only: it tells a cache to use its copy, and a DELETE has none)"),
          ("star", "*", "If-None-Match: * is false whenever the project exists"))),
    Conditional("delete-if-none-match-stale", "DELETE", "If-None-Match", '"0123456789abcdef"',
                204, DELETED("If-None-Match names only a tag that is not current")),
    *(Conditional(f"gone-{name}", method, header, value, 404, NO_PROJECT(why), gone=True)
      for name, method, header, value, why in (
          ("get-if-none-match-star", "GET", "If-None-Match", "*",
           "If-None-Match: * matches only a representation that exists, so it is no 304"),
          ("get-if-none-match-last-tag", "GET", "If-None-Match", "{etag}",
           "its last tag is no current tag, so it is no 304"),
          ("delete-if-match-star", "DELETE", "If-Match", "*",
           "If-Match: * is false (RFC 9110 13.1.1: * matches a current representation), "
           "and a DELETE with it must never answer 204: nothing was deleted"),
          ("delete-if-match-last-tag", "DELETE", "If-Match", "{etag}",
           "the tag names no current representation, and nothing is deleted"),
          ("delete-if-none-match-star", "DELETE", "If-None-Match", "*",
           "If-None-Match: * holds (no representation exists), so the DELETE goes on to "
           "find no project"))),
    Conditional("reader-deletes-if-match-stale", "DELETE", "If-Match", '"0123456789abcdef"',
                403, "Forbidden: a reader may not delete, whatever its precondition - the role "
                "(check 3) comes before the project is looked up or compared",
                role=dict(READER)),
]


def conditional_problem(case: Conditional, reply: HttpReply, etag: str, exists: bool) -> str | None:
    """What is wrong with the reply to a conditional request, beside its status; or None."""
    if case.status == 304:
        if reply.body != b"":
            return f"a 304 has no body, saw {reply.body[:80]!r}"
        if reply.headers.get("ETag") != etag:
            return (f"the 304 carried ETag {reply.headers.get('ETag')!r}, expected {etag!r}, the "
                    "ETag the 200 carries: a 304 repeats the validator a 200 would have (RFC "
                    "9110 15.4.5), so the cache knows which stored response is current and "
                    "refreshes it; without it the cache cannot tell")
    if case.status == 412 and reply.headers.get("ETag") not in (None, etag):
        # RFC 9110 leaves a 412's ETag open; this API may send the current one (Apache does)
        # and must not send another: a client reads it as the tag to retry with.
        return (f"the 412 carried ETag {reply.headers.get('ETag')!r}, but the project's current "
                f"tag is {etag!r}: a 412 may carry the current ETag (the client can retry "
                "with it after a fresh GET) or none - never another tag")
    if case.status == 200 and not reply.headers.get("ETag"):
        return "expected an ETag header on the 200"
    if case.status == 204 and exists:
        return "answered 204, but the project is still in the projects table"
    if case.status in (403, 412) and not exists:
        return (f"answered {reply.status}, but the project was deleted: a refused DELETE "
                "deletes nothing")
    return None


def test_conditional_requests(make_app: Callable[..., Any], db: Any) -> None:
    failures: list[str] = []
    with db.connect(autocommit=True) as conn, serve_wsgi(
            make_app(db.dsn, clock=FakeClock(1000.0), rate_limit=1000)) as host:
        for case in CONDITIONAL:
            row = conn.execute("INSERT INTO projects (name) VALUES (%s) RETURNING id",
                               (f"conditional-{case.name}",)).fetchone()
            path = f"/projects/{row[0]}"
            first = call(host, "GET", path, headers=WRITER)
            expect(first, 200, f"GET {path}", "the project exists")
            etag = first.headers.get("ETag") or '"missing-etag"'
            if case.gone:
                conn.execute("DELETE FROM projects WHERE id = %s", (row[0],))
            value = case.value.format(etag=etag, bare=etag.strip('"'))
            reply = call(host, case.method, path, headers={**case.role, case.header: value})
            exists = conn.execute("SELECT count(*) FROM projects WHERE id = %s",
                                  (row[0],)).fetchone() == (1,)
            what = (f"{case.method} {path} ({case.name}) with {case.header}: {value}"
                    + (f" (deleted after GET gave {etag})" if case.gone else ""))
            if reply.status != case.status:
                failures.append(f"{what}: expected {case.status}, saw {reply.status} "
                                f"{reply.body[:120]!r}: {case.meaning}")
            elif (problem := conditional_problem(case, reply, etag, exists)) is not None:
                failures.append(f"{what}: {problem}")
    assert not failures, "\n".join(failures)


# ---- fixtures ---------------------------------------------------------------------------

class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(postgres: Any) -> Any:
    with postgres.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    return postgres


@pytest.fixture
def make_app(learner: Any) -> Callable[..., Any]:
    return learner.function("projects_api", "make_app")  # type: ignore[no-any-return]


def expect(reply: HttpReply, status: int, what: str, meaning: str) -> None:
    assert reply.status == status, (
        f"{what}: expected {status}, saw {reply.status} {reply.body[:120]!r}: {meaning}")


# ---- the verification -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_status_table(make_app: Callable[..., Any], db: Any, case: Case) -> None:
    with serve_wsgi(make_app(db.dsn, clock=FakeClock(1000.0), rate_limit=1000)) as host:
        headers = dict(case.headers)
        reply = call(host, case.method, case.path, case.body, headers)
    sent = "".join(f" {name}: {headers[name]}" for name in ("Authorization",)
                   if name in headers and headers[name] not in (
                       WRITER["Authorization"], READER["Authorization"]))
    what = f"{case.method} {case.path} ({case.name}){sent and ' with' + sent}"
    expect(reply, case.status, what, case.meaning)
    if case.check is not None:
        problem = case.check(reply)
        assert problem is None, f"{what}: {problem}"


def test_rate_limit_is_429_with_retry_after(make_app: Callable[..., Any], db: Any) -> None:
    clock = FakeClock(1000.0)  # windows of 10 s: [1000, 1010) is the first one used
    with serve_wsgi(make_app(db.dsn, clock=clock, rate_limit=3, window_seconds=10)) as host:
        for n in range(1, 4):
            expect(call(host, "GET", "/projects/1", headers=WRITER), 200,
                   f"request {n} of 3 allowed in the window", "still within the limit")
        over = call(host, "GET", "/projects/1", headers=WRITER)
        expect(over, 429, "the 4th request in a 10 s window with a limit of 3",
               "Too Many Requests")
        assert over.headers.get("Retry-After") == "10", (
            f"429 at t=1000.0 with the window ending at 1010: expected Retry-After: 10, saw "
            f"{over.headers.get('Retry-After')!r}: tell the client when to come back, in "
            "whole seconds - t=1000.0 is the first instant of the window [1000, 1010) "
            "(start = floor(now / W) * W, not ceil(now / W) * W - W, which differs exactly at "
            "a multiple of W), so Retry-After = ceil(1010 - 1000.0)")
        clock.now = 1004.5
        later = call(host, "GET", "/projects/1", headers=WRITER)
        expect(later, 429, "t=1004.5, same window", "the window has not reset")
        assert later.headers.get("Retry-After") == "6", (
            f"429 at t=1004.5 with the window ending at 1010: expected Retry-After: 6 "
            f"(ceil(5.5)), saw {later.headers.get('Retry-After')!r}")
        other = call(host, "GET", "/projects/1", headers={"Authorization": "Bearer other-token"})
        expect(other, 200, "another token in the same window",
               "the limit is per client (per token), not global")
        clock.now = 1010.0
        expect(call(host, "GET", "/projects/1", headers=WRITER), 200,
               "t=1010.0, a new window", "the budget is renewed")


# The window is the clock's, not the token's: windows of 10 s aligned to multiples of 10
# (start = floor(now / W) * W), wherever in one the token's first request falls. The token
# starts at t=1003.0, 3 s into the window [1000, 1010): a window opened by its first request
# ([1003, 1013)) or a sliding one (the last 10 s) answers the same as the aligned one from an
# aligned start, and differently from here. (t, status, Retry-After, what this step shows)
MID_WINDOW = (
    (1003.0, 200, None, "request 1 of 3, at t=1003.0, in the window [1000, 1010)"),
    (1003.0, 200, None, "request 2 of 3"),
    (1003.0, 200, None, "request 3 of 3"),
    (1003.0, 429, "7", "the 4th request at t=1003.0: the aligned window ends at 1010, so "
     "Retry-After: ceil(1010 - 1003.0) = 7"),
    (1006.7, 429, "4", "t=1006.7, the same window: Retry-After: ceil(1010 - 1006.7) = "
     "ceil(3.3) = 4, rounded up (a client told 3 comes back at 1009.7 and is refused again)"),
    (1010.0, 200, None, "t=1010.0 opens the window [1010, 1020), although only 7 s passed "
     "since the token's first request"),
)


# A burst across a window's edge: the token spends its budget in the last tenth of a second
# of [1000, 1010), and at t=1010.0 - 0.1 s later - it has a whole budget again: that burst
# of twice the limit within 0.1 s is what fixed windows allow (the README's choice), and a
# window rounded to the nearest multiple (round(now / W)) puts t=1009.9 in [1010, 1020).
ACROSS_AN_EDGE = (
    (1009.9, 200, None, "request 1 of 3, at t=1009.9, in the window [1000, 1010)"),
    (1009.9, 200, None, "request 2 of 3"),
    (1009.9, 200, None, "request 3 of 3"),
    (1009.9, 429, "1", "the 4th request at t=1009.9: the aligned window ends at 1010, so "
     "Retry-After: ceil(1010 - 1009.9) = ceil(0.1) = 1"),
    (1010.0, 200, None, "t=1010.0, 0.1 s later, opens the window [1010, 1020): request 1 of 3"),
    (1010.0, 200, None, "request 2 of 3 in [1010, 1020)"),
    (1010.0, 200, None, "request 3 of 3 in [1010, 1020)"),
    (1010.0, 429, "10", "the 4th request at t=1010.0: Retry-After: ceil(1020 - 1010.0) = 10"),
)


def walk_windows(make_app: Callable[..., Any], db: Any,
                 steps: tuple[tuple[float, int, str | None, str], ...]) -> None:
    """Requests of one token at the steps' times, limit 3 per window of 10 s: each answered
    with the step's status (and Retry-After on a 429)."""
    clock = FakeClock(steps[0][0])
    first = steps[0][0]
    with serve_wsgi(make_app(db.dsn, clock=clock, rate_limit=3, window_seconds=10)) as host:
        for at, status, retry_after, step in steps:
            clock.now = at
            reply = call(host, "GET", "/projects/1", headers=WRITER)
            seen = reply.headers.get("Retry-After")
            if (reply.status, seen if status == 429 else None) == (status, retry_after):
                continue
            start = math.floor(at / 10) * 10
            if status == 200 or seen == "10" and at % 10:
                edge = (f"; t={at} is the first instant of [{start:.0f}, {start + 10:.0f}): a "
                        "start computed as ceil(now / W) * W - W, or an edge compared with "
                        "<=, keeps it in the window before" if at % 10 == 0 else "")
                why = (f"the token's window was counted from its first request (t={first}) or "
                       "slides over the last 10 s, where the README's windows are the clock's "
                       f"(here [{start:.0f}, {start + 10:.0f})): aligned to multiples of "
                       "window_seconds, start = floor(now / W) * W, the same for every token "
                       f"and every instance{edge}")
            elif reply.status == 200 or seen is not None and seen.isdigit() and int(seen) > 10:
                why = (f"t={at} was taken for another window than [{start:.0f}, "
                       f"{start + 10:.0f}): the window's start must be floor(now / W) * W - "
                       "rounded to the nearest multiple (round(now / W)) or up (ceil), the "
                       "window begins early or ends late")
            elif seen is not None and seen.isdigit() and int(seen) == int(start + 10 - at):
                why = ("Retry-After was rounded down or to the nearest second: round it up "
                       "(math.ceil), or the client comes back before the window ends and is "
                       "refused again")
            else:
                why = "Retry-After is the whole seconds left in the aligned window, rounded up"
            raise AssertionError(
                f"rate limit 3 per 10 s window, {step}: expected {status}"
                + (f" with Retry-After: {retry_after}" if retry_after else "")
                + f", saw {reply.status}" + (f" with Retry-After: {seen}" if seen else "")
                + f": {why}")


def test_rate_window_is_aligned_to_the_clock(make_app: Callable[..., Any], db: Any) -> None:
    walk_windows(make_app, db, MID_WINDOW)


def test_a_burst_across_a_window_edge(make_app: Callable[..., Any], db: Any) -> None:
    walk_windows(make_app, db, ACROSS_AN_EDGE)


def test_database_down_is_503(make_app: Callable[..., Any], db: Any) -> None:
    with serve_wsgi(make_app(db.dsn, clock=FakeClock(1000.0))) as host:
        expect(call(host, "GET", "/projects/1", headers=WRITER), 200, "GET /projects/1",
               "the database is up")
        # The outage: this test's database refuses new connections and loses its sessions.
        with psycopg.connect(db.admin_dsn, autocommit=True) as admin:
            name = sql.Identifier(db.name)
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
            try:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = %s", (db.name,))
                down = call(host, "GET", "/projects/1", headers=WRITER)
            finally:
                admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))
        expect(down, 503, "GET /projects/1 while the database refuses connections",
               "Service Unavailable: the request was fine, a dependency is down; 500 would "
               "claim a bug, 401 or 404 would blame the client")
        expect(call(host, "GET", "/projects/1", headers=WRITER), 200,
               "GET /projects/1 after the database came back",
               "the app must recover by itself (open a new connection)")


def _waiter_pids(admin: psycopg.Connection[Any], database: str) -> set[int]:
    """The sessions of the test's database that wait for a lock right now."""
    return {int(row[0]) for row in admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
        (database,)).fetchall()}


def test_connection_lost_mid_request_is_503(make_app: Callable[..., Any], db: Any) -> None:
    """The database drops a session while its request is in flight (a failover, a restart,
    an idle timeout): the test holds the token's request_counts row locked, so the request
    has connected and authenticated and waits to count itself; the test terminates that
    session there, then lets the lock go. psycopg raises OperationalError (AdminShutdown)
    from that statement, not from connect(): still 503. (An app that retries on a new
    connection and then serves the request answers 200, which is fine too.)"""
    with serve_wsgi(make_app(db.dsn, clock=FakeClock(1000.0))) as host, \
            psycopg.connect(db.admin_dsn, autocommit=True) as admin, \
            psycopg.connect(db.dsn) as holder:
        expect(call(host, "GET", "/projects/1", headers=WRITER), 200, "GET /projects/1",
               "the database is up")
        holder.execute("SELECT count FROM request_counts WHERE token = 'writer-token' "
                       "FOR UPDATE")
        replies: list[HttpReply] = []
        thread = threading.Thread(target=lambda: replies.append(
            call(host, "GET", "/projects/1", headers=WRITER, timeout=2 * HOLD)), daemon=True)
        thread.start()
        waited = came_true(
            lambda: not thread.is_alive() or bool(_waiter_pids(admin, db.name)), HOLD)
        killed = {pid for pid in _waiter_pids(admin, db.name) if admin.execute(
            "SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)}
        # A retry on a new connection waits on the same lock, in a session of another pid.
        retried = bool(killed) and came_true(
            lambda: not thread.is_alive() or bool(_waiter_pids(admin, db.name) - killed), HOLD
        ) and thread.is_alive()
        holder.commit()
        thread.join(HOLD)
        after = call(host, "GET", "/projects/1", headers=WRITER)
    assert waited and killed, (
        "GET /projects/1 never waited for the token's request_counts row, which the test held "
        "locked: count each request in request_counts (INSERT ... ON CONFLICT DO UPDATE)")
    assert replies, f"GET /projects/1 got no answer within {HOLD:.0f} s after its session died"
    lost = replies[0]
    assert lost.status == 503 or (retried and lost.status == 200), (
        f"GET /projects/1 lost its database session mid-request (terminated by the server "
        f"after the request had connected and authenticated, while it waited to count "
        f"itself) and answered {lost.status} {lost.body[:120]!r}, expected 503: psycopg "
        "raises psycopg.OperationalError (here AdminShutdown) from whichever statement finds "
        "the connection gone, not only from connect() - catch it around the whole request, "
        "not just where the connection is opened or checked; a failover, a restart or an "
        "idle timeout drops sessions in flight, and a 500 pages someone for an outage")
    expect(after, 200, "GET /projects/1 after a request lost its session",
           "the database is up: the next request opens a working connection")


def test_rate_limit_is_shared_by_every_instance(make_app: Callable[..., Any], db: Any) -> None:
    clock = FakeClock(1000.0)
    first = make_app(db.dsn, clock=clock, rate_limit=3, window_seconds=10)
    second = make_app(db.dsn, clock=clock, rate_limit=3, window_seconds=10)
    with serve_wsgi(first) as host_a, serve_wsgi(second) as host_b:
        for n, host in enumerate((host_a, host_a, host_b), start=1):
            expect(call(host, "GET", "/projects/1", headers=WRITER), 200,
                   f"request {n} of 3 allowed in the window", "still within the limit")
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            counted = conn.execute("SELECT coalesce(sum(count), 0) FROM request_counts "
                                   "WHERE token = 'writer-token'").fetchone()
        over = call(host_b, "GET", "/projects/1", headers=WRITER)
    assert over.status == 429, (
        f"the token's 4th request in the window (2 sent to one instance, then 2 to a second "
        f"one) got {over.status}, expected 429; request_counts holds "
        f"{counted[0] if counted else 0} request(s) for it after 3: "
        + ("each instance counts on its own (in its memory), so N instances allow N times "
           "the limit - count in request_counts, the table every instance shares"
           if not counted or counted[0] != 3 else "the shared count is there, yet not enforced"))


def _lock_waiters(admin: psycopg.Connection[Any], database: str) -> int:
    """How many sessions of the test's database wait for a lock right now."""
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                        "AND wait_event_type = 'Lock'", (database,)).fetchone()
    return int(row[0]) if row else 0


def held_in_postgres(hosts: tuple[str, ...], method: str, path: str,
                     admin: psycopg.Connection[Any], database: str,
                     release: Callable[[], object]) -> dict[str, HttpReply]:
    """The same request to each instance at once, each on a thread of its own, while the test
    holds a row lock they need: once all wait on a lock in Postgres (or have answered, or
    HOLD passed), release() ends the test's transaction and the answers are awaited (HOLD).
    Each instance's answer, by host; one missing did not come in time."""
    replies: dict[str, HttpReply] = {}
    threads = [threading.Thread(target=lambda h=host: replies.__setitem__(
        h, call(h, method, path, headers=WRITER)), daemon=True) for host in hosts]
    for thread in threads:
        thread.start()
    came_true(lambda: _lock_waiters(admin, database) >= len(hosts)
              or not any(t.is_alive() for t in threads), timeout=HOLD)
    release()
    for thread in threads:
        thread.join(HOLD)
    return replies


def test_concurrent_requests_are_counted_atomically(make_app: Callable[..., Any],
                                                     db: Any) -> None:
    """Two instances, the token with 2 of its 3 requests used, and two requests at once: the
    test holds the token's request_counts rows locked until both requests wait on that lock,
    so both have done whatever they do before writing the count (a SELECT reads through a
    row lock). An increment that reads and writes in one statement (or a SELECT ... FOR
    UPDATE) then lets exactly one through; a count read first and written after lets both."""
    clock = FakeClock(1000.0)
    apps = [make_app(db.dsn, clock=clock, rate_limit=3, window_seconds=10) for _ in range(2)]
    with serve_wsgi(apps[0]) as host_a, serve_wsgi(apps[1]) as host_b, \
            psycopg.connect(db.admin_dsn, autocommit=True) as admin, \
            psycopg.connect(db.dsn) as holder:
        for n, host in enumerate((host_a, host_b), start=1):
            expect(call(host, "GET", "/projects/1", headers=WRITER), 200,
                   f"request {n} of 3 allowed in the window", "still within the limit")
        locked = holder.execute("SELECT count FROM request_counts WHERE token = "
                                "'writer-token' FOR UPDATE").fetchall()
        assert locked, ("after 2 requests request_counts holds no row for the token: count "
                        "each request in request_counts, the table every instance shares")
        # holder commits: both requests now go on, one after the other
        replies = held_in_postgres((host_a, host_b), "GET", "/projects/1", admin, db.name,
                                   holder.commit)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            counted = conn.execute("SELECT coalesce(sum(count), 0) FROM request_counts "
                                   "WHERE token = 'writer-token'").fetchone()
    assert len(replies) == 2, (
        f"of two concurrent requests only {len(replies)} got an answer within {HOLD:.0f} s")
    statuses = sorted(reply.status for reply in replies.values())
    total = int(counted[0]) if counted else 0
    if total < 4:
        why = (f"request_counts holds {total} after 4 requests: both wrote back the count "
               "they had read plus one (a SELECT, then a write of a count computed in "
               "Python), so one increment was lost")
    else:
        why = (f"request_counts holds {total}, so both increments landed, but each request "
               "decided on the count it had read before its own update")
    assert statuses == [200, 429], (
        f"two concurrent requests for a token with 2 of its 3 requests used got {statuses}, "
        f"expected one 200 and one 429: {why}\nUnder concurrency a read-modify-write lets "
        "every request through: increment and read in one statement, INSERT ... ON CONFLICT "
        "(token, window_start) DO UPDATE SET count = request_counts.count + 1 RETURNING "
        "count, and decide on what it returns (or SELECT ... FOR UPDATE in a transaction).")


def test_refused_requests_count_too(make_app: Callable[..., Any], db: Any) -> None:
    with serve_wsgi(make_app(db.dsn, clock=FakeClock(1000.0), rate_limit=3,
                             window_seconds=10)) as host:
        for n in range(1, 4):
            expect(call(host, "POST", "/projects", js({"name": f"r{n}"}), READER), 403,
                   f"a reader's POST {n} of 3 in the window", "readers may not write")
        over = call(host, "POST", "/projects", js({"name": "r4"}), READER)
    expect(over, 429, "a reader's 4th POST in a 10 s window with a limit of 3",
           "the rate limit (check 2) comes before the role check (check 3): a request "
           "refused with 403 still counts, or a token can hammer the write endpoints for "
           "free - throttle right after authenticating, before deciding what it may do")


# Requests the app refuses after counting them (checks 4 to 6): each is still a request by
# the token. (method, path, body, status, why)
REFUSED_AFTER_THE_COUNT = (
    ("POST", "/projects", b"not json", 400, "a body that is not JSON"),
    ("POST", "/projects", js({"name": ""}), 422, "an empty name"),
    ("POST", "/projects", js({"name": "alpha"}), 409, "a taken name"),
    ("GET", "/projects/999999", None, 404, "a missing project"),
    ("GET", "/nothing-here", None, 404, "an unknown path"),
)


def counted_for(db: Any, token: str) -> int:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(count), 0) FROM request_counts "
                           "WHERE token = %s", (token,)).fetchone()
    return int(row[0]) if row else 0


def test_failed_requests_count_too(make_app: Callable[..., Any], db: Any) -> None:
    """A writer's requests that end in 400, 422, 409 and 404 (a missing project, an unknown
    path) use up its budget like any other: the limit is on requests, whatever their
    outcome."""
    limit = len(REFUSED_AFTER_THE_COUNT)
    uncounted = []
    with serve_wsgi(make_app(db.dsn, clock=FakeClock(1000.0), rate_limit=limit,
                             window_seconds=10)) as host:
        for method, path, body, status, why in REFUSED_AFTER_THE_COUNT:
            before = counted_for(db, "writer-token")
            expect(call(host, method, path, body, WRITER), status,
                   f"{method} {path} ({why})", "the request fails that check")
            if counted_for(db, "writer-token") == before:
                uncounted.append(f"the {status} ({why})")
        over = call(host, "GET", "/projects/1", headers=WRITER)
    expect(over, 429, f"GET /projects/1 after {limit} failed requests ("
           + ", ".join(str(case[3]) for case in REFUSED_AFTER_THE_COUNT)
           + f") in a 10 s window with a limit of {limit}",
           (f"{', '.join(uncounted[:-1])}{' and ' if uncounted[1:] else ''}{uncounted[-1]} "
            "left request_counts unchanged: " if uncounted else "")
           + "a failed request counts like any other, or a client sends invalid requests "
           "(the cheapest abuse) without limit. A count written in the request's own "
           "transaction is rolled back exactly on the error paths (an exception, a failed "
           "statement): count on an autocommit connection, or commit the count before "
           "doing the work.")


def test_concurrent_create_of_one_name_is_409(make_app: Callable[..., Any], db: Any) -> None:
    """Two clients create the same name at once. The test plays the first: its transaction
    inserts 'gamma' and holds it uncommitted until the app's request waits on that row (on
    the unique index), then commits. Whatever the app looked up before its INSERT saw no
    'gamma'; only the unique constraint sees the other client, so the INSERT's
    UniqueViolation is the conflict, and it is a 409."""
    with serve_wsgi(make_app(db.dsn, clock=FakeClock(1000.0), rate_limit=1000)) as host, \
            psycopg.connect(db.admin_dsn, autocommit=True) as admin, \
            psycopg.connect(db.dsn) as holder:
        holder.execute("INSERT INTO projects (name) VALUES ('gamma')")
        replies: list[HttpReply] = []
        thread = threading.Thread(target=lambda: replies.append(
            call(host, "POST", "/projects", js({"name": "gamma"}), WRITER)), daemon=True)
        thread.start()
        deadline = time.monotonic() + HOLD
        waited = False
        while time.monotonic() < deadline and thread.is_alive():
            if _lock_waiters(admin, db.name) >= 1:
                waited = True
                break
            time.sleep(0.01)
        holder.commit()  # the other client's 'gamma' exists from now on
        thread.join(HOLD)
    assert replies, f"POST /projects {{'name': 'gamma'}} got no answer within {HOLD:.0f} s"
    reply = replies[0]
    if reply.status == 201:
        why = ("the app created a second 'gamma' without waiting for the other client's: "
               "the name is UNIQUE in projects, keep the constraint and insert through it"
               if not waited else "the app created 'gamma' although another client's "
               "'gamma' committed first")
    elif reply.status >= 500:
        why = (f"{reply.status}: the name was free when the app looked (a SELECT, or a check "
               "in memory) and taken when it inserted - a check-then-insert; the INSERT's "
               "UniqueViolation (psycopg.errors.UniqueViolation) is the conflict and must be "
               "answered 409, not left to crash (500) or mapped with every database error "
               "to 503 (the database is up; the client's request clashes)")
    else:
        why = "a clash with the current state is 409"
    assert reply.status == 409, (
        f"POST /projects {{'name': 'gamma'}} while another client's INSERT of 'gamma' was "
        f"in flight (committed while the app's request waited on it) answered "
        f"{reply.status} {reply.body[:120]!r}, expected 409 Conflict: {why}. Under "
        "concurrency the unique constraint is the only check that holds: a lookup before "
        "the INSERT is an optimisation, never the decision.")


def test_two_deletes_at_once_one_is_404(make_app: Callable[..., Any], db: Any) -> None:
    """Two clients delete one project at once, through two instances. The test holds the
    project's row locked until both requests wait in Postgres (or have answered), so
    whatever each looked up before its DELETE (a SELECT reads through a row lock) it looked up
    while the project was there. The first to get the row deletes it (204); for the second
    there is no project any more: 404, never a 204 for a delete that deleted nothing."""
    apps = [make_app(db.dsn, clock=FakeClock(1000.0), rate_limit=1000) for _ in range(2)]
    with serve_wsgi(apps[0]) as host_a, serve_wsgi(apps[1]) as host_b, \
            psycopg.connect(db.admin_dsn, autocommit=True) as admin, \
            psycopg.connect(db.dsn) as holder:
        holder.execute("SELECT 1 FROM projects WHERE id = 2 FOR UPDATE")
        # holder rolls back: both requests now go on, one after the other
        replies = held_in_postgres((host_a, host_b), "DELETE", "/projects/2", admin, db.name,
                                   holder.rollback)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM projects WHERE id = 2").fetchone()
    assert len(replies) == 2, (
        f"of two concurrent DELETE /projects/2 only {len(replies)} got an answer within "
        f"{HOLD:.0f} s")
    statuses = sorted(reply.status for reply in replies.values())
    why = ("both answered 204: each found the project before either deleted it, and the "
           "second's DELETE then deleted nothing - a lookup that does not lock the row (or a "
           "lock in the app's own process, which the other instance does not share) cannot "
           "see a delete in flight: lock the row (SELECT ... FOR UPDATE) in the DELETE's "
           "transaction, or decide on what the DELETE itself removed (rowcount, RETURNING)"
           if statuses == [204, 204] else
           "the second request found no project once the first had deleted it: that is a "
           "404, not a server error" if statuses[1] >= 500 else "one deletes, one finds none")
    assert statuses == [204, 404] and left == (0,), (
        f"two DELETE /projects/2 at once (two instances) answered {statuses}, expected one "
        f"204 and one 404: {why}")
