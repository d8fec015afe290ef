"""Verification for ph0.8: the learner's HTTP pipeline, run in-process on a loopback port,
exercised over real HTTP (http.client) against a database of the test's own on a real
Postgres.

The test counts reads of ``users`` in Postgres itself, not through the learner's code:
``users`` is a view over a function that bumps a sequence on every query that reads it.
Sequences are not transactional, so every read counts, committed or not, from whatever
connection the app uses.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from labrunner.testing import HttpReply, http_request

# Mixed case, as real tokens are (base64, hex digests in upper case): a token is compared
# exactly as sent, and a server that lower-cases it refuses this one.
TOKEN = "s3cret-Lab-TOKEN"
WAIT = 5.0
FAILURES = 12  # failing requests in a row: more than a connection pool usually holds

SCHEMA = """
CREATE TABLE user_rows (id integer PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE SEQUENCE users_reads;
CREATE TABLE lab_failure (message text NOT NULL);   -- a row: every read of users fails
CREATE FUNCTION counted_users() RETURNS SETOF user_rows LANGUAGE plpgsql AS $$
DECLARE
    failure text := (SELECT message FROM lab_failure LIMIT 1);
BEGIN
    PERFORM nextval('users_reads');   -- one tick per query that reads the view
    IF failure IS NOT NULL THEN
        RAISE EXCEPTION USING MESSAGE = failure;
    END IF;
    RETURN QUERY SELECT * FROM user_rows;
END $$;
CREATE VIEW users AS SELECT * FROM counted_users();
"""


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Db:
    """The test's own view of the database: seed rows, count reads."""

    postgres: Any

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        with self.postgres.connect(autocommit=True) as conn:
            conn.execute(sql, params)

    def reads(self) -> int:
        with self.postgres.connect(autocommit=True) as conn:
            row = conn.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
                               "FROM users_reads").fetchone()
        return int(row[0])


@pytest.fixture
def db(postgres: Any) -> Db:
    database = Db(postgres)
    database.execute(SCHEMA)
    return database


BREAK_SECRET = "lab: middleware bug (internal detail)"


@dataclass
class Trace:
    """Records the test's own middleware as the learner's chain calls it."""

    events: list[str] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    header_names: list[str] = field(default_factory=list)   # as the outer one saw them

    def middleware(self, name: str) -> Callable[[Any, Callable[[Any], Any]], Any]:
        def middleware(request: Any, next_: Callable[[Any], Any]) -> Any:
            self.events.append(f"{name}>")
            headers = dict(request.headers)
            if name == "outer":
                self.request_ids.append(headers.get("x-request-id"))
                self.header_names = list(headers)
            # A middleware with a bug: X-Lab-Break: <name> before|after makes it raise.
            if headers.get("x-lab-break") == f"{name} before":
                raise RuntimeError(f"{BREAK_SECRET} ({name}, before next)")
            response = next_(request)
            if headers.get("x-lab-break") == f"{name} after":
                raise RuntimeError(f"{BREAK_SECRET} ({name}, after next)")
            self.events.append(f"<{name}")
            response.headers[f"X-Seen-By-{name.title()}"] = "yes"
            return response
        return middleware


@dataclass
class Api:
    """The learner's server, started on first use inside the test (so that a missing
    start_server() fails the test itself), and a real HTTP client for it."""

    app: Any
    dsn: str
    db: Db
    trace: Trace = field(default_factory=Trace)
    server: Any = None

    def start(self) -> int:
        if self.server is None:
            try:
                self.server = self.app.start_server(
                    self.dsn, {TOKEN},
                    [self.trace.middleware("outer"), self.trace.middleware("inner")])
                return int(self.server.port)
            except NotImplementedError as exc:
                problem = f"start_server() is not implemented yet: {exc}"
            except Exception as exc:  # noqa: BLE001 - the learner's error, reported plainly
                problem = f"start_server() raised {type(exc).__name__}: {exc}"
            pytest.fail(problem, pytrace=False)
        return int(self.server.port)

    def call(self, method: str, path: str, token: str | None = TOKEN,
             headers: dict[str, str] | None = None) -> HttpReply:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        port = self.start()
        try:
            return http_request(f"127.0.0.1:{port}", method, path, headers=sent, timeout=WAIT)
        except TimeoutError:
            problem = (f"{method} {path}: no response within {WAIT:.0f} s")
        except (http.client.HTTPException, ConnectionError) as exc:
            problem = (f"{method} {path}: the server dropped the connection without a "
                       f"response ({type(exc).__name__}): an exception escaped your pipeline"
                       "\nhttp.server closes the connection when do_GET raises: catch errors "
                       "around the chain and answer 500 with a JSON error instead.")
        pytest.fail(problem, pytrace=False)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
def api(learner: Any, db: Db, postgres: Any) -> Iterator[Api]:
    subject = Api(learner.load("app"), postgres.dsn, db)
    yield subject
    subject.close()


def add_user(db: Db) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    user = {"id": 4242, "name": f"Ada {tag}", "email": f"ada.{tag}@lab.test"}
    db.execute("INSERT INTO user_rows VALUES (%s, %s, %s)",
               (user["id"], user["name"], user["email"]))
    return user


def raw_get(port: int, path: str, credentials: tuple[str, ...] = (f"Bearer {TOKEN}",),
            expected: str = "404 from the router") -> int:
    """GET ``path`` sent as its Latin-1 bytes, as they are (http.client refuses a non-ASCII
    path), with one Authorization line per credential: the status of the response."""
    lines = "".join(f"Authorization: {value}\r\n" for value in credentials)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: lab.test\r\n{lines}"
                     "Connection: close\r\n\r\n".encode("iso-8859-1"))
        reply = http.client.HTTPResponse(sock)
        try:
            reply.begin()
            reply.read()
        except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
            problem = (f"GET {path!r}: no response ({type(exc).__name__}: {exc}), expected "
                       f"{expected}")
        else:
            return reply.status
    pytest.fail(problem, pytrace=False)


def expect_reads(api: Api, before: int, want: int, what: str, why: str) -> None:
    got = api.db.reads() - before
    assert got == want, (
        f"{what} read the users table {got} time(s), expected {want} (counted in Postgres)"
        f"\n{why}")


# ---------------------------------------------------------------------------- the tests


def test_handler_row_comes_from_postgres(api: Api) -> None:
    user = add_user(api.db)
    api.start()  # whatever the app reads at start-up does not count
    before = api.db.reads()
    reply = api.call("GET", f"/users/{user['id']}")
    assert reply.status != 401, (
        f"GET /users/{user['id']} with 'Authorization: Bearer {TOKEN}' (a valid token) "
        f"returned 401 {reply.body[:100]!r}, expected 200\nThe token is compared exactly as "
        "sent: only the scheme ('Bearer') is case-insensitive. Lower-casing the whole "
        "header value lower-cases the token with it, and a real token (base64, mixed case) "
        "no longer matches.")
    assert reply.status == 200 and reply.json() == user, (
        f"GET /users/{user['id']} returned {reply.status} {reply.body[:200]!r}, expected 200 "
        f"with {json.dumps(user)}\nThe handler must read the row from Postgres "
        "(SELECT id, name, email FROM users WHERE id = %s) and serialize it as JSON.")
    assert (reply.headers.get("Content-Type") or "").startswith("application/json"), (
        f"Content-Type is {reply.headers.get('Content-Type')!r}, expected application/json")
    api.db.execute("UPDATE user_rows SET email = 'changed@lab.test' WHERE id = %s",
                   (user["id"],))
    again = api.call("GET", f"/users/{user['id']}").json() or {}
    assert again.get("email") == "changed@lab.test", (
        f"after the row changed in Postgres the response still said {again.get('email')!r}"
        "\nEach request must query the database: nothing may be cached or made up.")
    expect_reads(api, before, 2, "two GET /users/{id} requests",
                 "One query per request.")


class _Kept(io.BytesIO):
    def close(self) -> None:
        pass  # http.client closes the file at the body's end: what follows is still read


class _Recorded:
    """A socket stand-in holding the bytes a server sent until it closed: http.client parses
    the response from them, and what it leaves unread is what the framing left over."""

    def __init__(self, raw: bytes) -> None:
        self.file = _Kept(raw)

    def makefile(self, mode: str) -> io.BytesIO:
        return self.file


def test_a_non_ascii_row_is_sent_whole_as_utf8(api: Api) -> None:
    user = {"id": 4243, "name": "Zoë Ωmega-漢字 🚀", "email": "zoë@lab.test"}
    api.db.execute("INSERT INTO user_rows VALUES (%s, %s, %s)",
                   (user["id"], user["name"], user["email"]))
    port = api.start()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(f"GET /users/{user['id']} HTTP/1.1\r\nHost: lab.test\r\nAuthorization: "
                     f"Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except TimeoutError:
            pass  # a server that keeps the connection open: judge what it sent
    recorded = _Recorded(raw)
    reply = http.client.HTTPResponse(recorded)  # type: ignore[arg-type] # a stand-in socket
    try:
        reply.begin()
        body = reply.read()
    except (http.client.HTTPException, ValueError) as exc:
        pytest.fail(f"GET /users/{user['id']} (a row with a non-ASCII name): the response "
                    f"could not be read ({type(exc).__name__}: {exc}): {raw[:300]!r}",
                    pytrace=False)
    left = recorded.file.read()
    assert not left, (
        f"GET /users/{user['id']} (the name {user['name']!r}): Content-Length said "
        f"{reply.getheader('Content-Length')} bytes, and {len(left)} more bytes of the body "
        f"followed ({left[:60]!r}), expected Content-Length to count every byte of the "
        "body: it was counted in characters, and a non-ASCII character is several bytes in "
        "UTF-8 - on a kept-alive connection the rest is read as the next response\nCount "
        "the bytes you send: len(body) of the encoded body, not len() of the text.")
    try:
        got = json.loads(body.decode("utf-8"))
    except ValueError as exc:
        got = f"not UTF-8 JSON ({type(exc).__name__}: {exc})"
    assert reply.status == 200 and got == user, (
        f"GET /users/{user['id']} (the name {user['name']!r}) returned {reply.status} with "
        f"{body[:200]!r}, read as {got!r}, expected 200 with {user}: JSON on the wire is "
        "UTF-8 (RFC 8259 8.1)\nEncode the JSON text as UTF-8 (json.dumps(...).encode(), "
        "whose default escapes non-ASCII as \\uXXXX, or ensure_ascii=False then "
        ".encode('utf-8')), never Latin-1 or another charset.")


def test_missing_token_is_401_before_any_query(api: Api) -> None:
    user = add_user(api.db)
    api.start()
    before = api.db.reads()
    for token, label in ((None, "no Authorization header"), ("wrong", "a wrong token")):
        reply = api.call("GET", f"/users/{user['id']}", token=token)
        assert reply.status == 401, (
            f"GET /users/{user['id']} with {label} returned {reply.status}, expected 401")
        assert (reply.headers.get("WWW-Authenticate") or "").lower().startswith("bearer"), (
            "a 401 must say how to authenticate: WWW-Authenticate: Bearer")
    for value in (TOKEN, f"Basic {TOKEN}", f"Bearer{TOKEN}"):
        reply = api.call("GET", f"/users/{user['id']}", token=None,
                         headers={"Authorization": value})
        assert reply.status == 401, (
            f"GET /users/{user['id']} with 'Authorization: {value}' returned {reply.status}, "
            "expected 401\nThe header is '<scheme> <credentials>': accept only the Bearer "
            "scheme followed by a space and a known token. removeprefix('Bearer ') or "
            "split()[-1] leaves a bare token, or another scheme's, looking valid.")
    for value in (f"Bearer {TOKEN.lower()}", f"Bearer {TOKEN.upper()}",
                  f"Bearer {TOKEN.swapcase()}"):
        reply = api.call("GET", f"/users/{user['id']}", token=None,
                         headers={"Authorization": value})
        assert reply.status == 401, (
            f"GET /users/{user['id']} with 'Authorization: {value}' returned {reply.status}, "
            f"expected 401: the known token is {TOKEN!r}\nA token is a secret compared "
            "exactly, byte for byte: only the scheme is case-insensitive. Comparing tokens "
            "case-insensitively accepts tokens that were never issued, and makes a guessed "
            "token far easier to find.")
    expect_reads(api, before, 0, "eight requests without a valid Bearer token",
                 "The auth middleware must answer 401 without calling next(): then the "
                 "handler, and its query, never run. Checking the token after next() "
                 "returns is too late - the database work is done.")
    spaced = api.call("GET", f"/users/{user['id']}", token=None,
                      headers={"Authorization": f"Bearer   {TOKEN}"})
    assert spaced.status == 200, (
        f"GET /users/{user['id']} with 'Authorization: Bearer   {TOKEN}' (the valid token "
        f"after three spaces) returned {spaced.status}, expected 200: credentials = "
        "auth-scheme 1*SP token68 (RFC 9110 11.4; RFC 6750 2.1: \"Bearer\" 1*SP b64token) - "
        "one or more spaces\npartition(' ') or header[7:] keeps the extra spaces in the "
        "token: strip the spaces after the scheme (partition(' ') then lstrip(' ')).")


def test_two_authorization_lines_are_refused(api: Api) -> None:
    """Authorization holds one credential, not a list: a sender MUST NOT send it on two lines
    (RFC 9110 5.3, 11.6.2), and RFC 6750 3.1 calls a request that repeats it invalid_request.
    A server that keeps one of the lines (the first, or the last as a dict built line by
    line does) may keep another than a proxy or gateway in front of it checked: the two then
    disagree on who is asking. One line has the valid token, the other not, in both orders:
    401 (or 400), never the valid user's 200."""
    user = add_user(api.db)
    port = api.start()
    before = api.db.reads()
    valid, other = f"Bearer {TOKEN}", "Bearer someone-else"
    for credentials, kept in (((valid, other), "first"), ((other, valid), "last")):
        status = raw_get(port, f"/users/{user['id']}", credentials, "401 or 400")
        shown = " then ".join(f"'Authorization: {value}'" for value in credentials)
        taken = (f": the {kept} line, the one with the valid token, was taken and the other "
                 "ignored" if status == 200 else "")
        assert status in (400, 401), (
            f"GET /users/{user['id']} with two Authorization lines, {shown}, returned "
            f"{status}{taken}, expected 401 (or 400)\nAuthorization is one credential, not a "
            "list (RFC 9110 5.3 and 11.6.2: never sent twice; RFC 6750 3.1: a repeated "
            "parameter is invalid_request). A proxy in front of the app may have checked the "
            "other line: keeping only the first or the last line lets the two disagree on "
            "who is asking. Keep every line - join a field's repeated lines with ', ' (RFC "
            "9110 5.3), which is no valid credential - or refuse a repeated Authorization.")
    expect_reads(api, before, 0, "two requests with two Authorization lines each",
                 "A request whose credentials are ambiguous is refused before the handler.")


def test_router_answers_404_and_405_itself(api: Api) -> None:
    api.start()
    before = api.db.reads()
    for path, token in (("/nope", TOKEN), ("/nope", None), ("/users/abc", TOKEN)):
        reply = api.call("GET", path, token=token)
        assert reply.status == 404, (
            f"GET {path} ({'with' if token else 'without'} a token) returned "
            f"{reply.status}, expected 404 from the router\nRouting comes first: a path "
            "no route matches is 404 before any middleware (auth included) runs.")
    for path in ("/users/4242/orders", "/users/4242x"):
        seen = len(api.trace.events)
        reply = api.call("GET", path)
        assert reply.status == 404 and len(api.trace.events) == seen, (
            f"GET {path} was routed to GET /users/{{id}} (status {reply.status}, the "
            "middleware chain ran): expected the router's 404, no route matches the whole "
            "path\nA route pattern must match the path to its end (re.fullmatch, or ^...$):"
            " re.match() alone lets /users/{id} match any longer path.")
    add_user(api.db)
    # An id is ASCII digits, nothing else: int() also takes '+4242' and '4_242' (aliases of
    # /users/4242), str.isdigit() also takes '²' (which int() then refuses, a 500).
    for path in ("/users/+4242", "/users/4_242", "/users/\u00b2"):
        seen = len(api.trace.events)
        status = raw_get(api.start(), path)
        assert status == 404 and len(api.trace.events) == seen, (
            f"GET {path!r} was routed to GET /users/{{id}} (status {status}, the middleware "
            "chain ran), expected the router's 404: the id in /users/{id} is ASCII digits "
            "only\nint() accepts a sign, underscores and other scripts' digits, and "
            "str.isdigit() is also true of '²' (which int() then refuses): a route that "
            "accepts them answers /users/+4242 as /users/4242 (one resource under many "
            "paths, past any rule or cache keyed on the path) or fails with a 500. Match "
            "[0-9]+ (re.ASCII), or check isascii() and isdigit().")
    reply = api.call("POST", "/users/1")
    assert reply.status == 405 and "GET" in (reply.headers.get("Allow") or ""), (
        f"POST /users/1 returned {reply.status} (Allow: {reply.headers.get('Allow')!r}), "
        "expected 405 with 'Allow: GET': the path exists, the method does not")
    assert api.trace.events == [], (
        f"the middleware chain ran for requests the router rejected: {api.trace.events}\n"
        "Only a matched route enters the middleware chain.")
    expect_reads(api, before, 0, "requests the router rejected", "No route, no handler.")


# Requests whose body no route uses, each answered before any handler could read it: the
# router's 405 and 404, and a public route. Each is followed, on the same kept-alive
# connection, by GET /health.
UNUSED_BODIES = (("POST", "/users/4242", 405), ("DELETE", "/nope", 404),
                 ("GET", "/health", 200))


def two_on_one_connection(port: int, method: str, path: str, body: bytes
                          ) -> tuple[int, int, bytes]:
    """``method path`` with ``body``, then GET /health, on one connection (a new one only
    if the server closed the first, as HTTP/1.0 or 'Connection: close' say): the first
    status, the second status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "text/plain"})
        first = conn.getresponse()
        first.read()
        conn.request("GET", "/health")
        second = conn.getresponse()
        return first.status, second.status, second.read()
    except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
        problem = (f"{method} {path} with a {len(body)}-byte body, then GET /health on the "
                   f"same connection: no answer ({type(exc).__name__}: {exc}), expected "
                   "both answered")
    finally:
        conn.close()
    pytest.fail(problem, pytrace=False)


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def test_request_body_is_read_even_when_no_route_uses_it(api: Api) -> None:
    """A body is part of the request: the parse stage reads all Content-Length bytes of it
    before the router answers, or the next request on a kept-alive connection is framed at
    the wrong byte. The body here is itself a request: left unread, it is executed."""
    user = add_user(api.db)
    port = api.start()
    before = api.db.reads()
    smuggled = (f"GET /users/{user['id']} HTTP/1.1\r\nHost: lab.test\r\n"
                f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
    for method, path, status in UNUSED_BODIES:
        what = f"{method} {path} with a body ({len(smuggled)} bytes)"
        got, health, body = two_on_one_connection(port, method, path, smuggled)
        assert got == status, f"{what} returned {got}, expected {status}"
        assert health == 200 and json_or_none(body) == {"status": "ok"}, (
            f"{what}, then GET /health on the same connection: the second answer was "
            f"{health} {body[:120]!r}, expected 200 {{\"status\": \"ok\"}}: the body (the "
            f"text of a request for /users/{user['id']}) was left unread and run as the next "
            "request\nOn a kept-alive HTTP/1.1 connection the bytes of an unread body are "
            "taken for the next request: a client's body executed as a request (request "
            "smuggling). Parsing a request "
            "means reading all of it - the head and Content-Length bytes of body "
            "(self.rfile.read(length)) - before routing answers, whatever the method and "
            "even when the route refuses it.")
    expect_reads(api, before, 0, "requests whose body held a request for a user",
                 "A request body is data, never a request of its own.")


# Content-Length values that leave the end of the body unknown, in the order a failure
# names them: int() raises on the first, reads to the end of the stream on the second
# (rfile.read(-5)), takes the third for 5; the last is two headers that disagree.
BAD_LENGTHS = {
    "not a number": "Content-Length: abc\r\n",
    "negative": "Content-Length: -5\r\n",
    "signed": "Content-Length: +5\r\n",
    "two different values": "Content-Length: 5\r\nContent-Length: 0\r\n",
}


@pytest.mark.parametrize("case", list(BAD_LENGTHS))
def test_a_bad_content_length_is_400_before_routing(api: Api, case: str) -> None:
    add_user(api.db)
    port = api.start()
    before = api.db.reads()
    lines = BAD_LENGTHS[case]
    shown = repr(lines.replace("\r\n", " ").strip())
    why = ("Parsing the request comes first: a Content-Length that is not one plain number "
           "(1*DIGIT, RFC 9112 6.3) leaves the end of the body unknown, so the request cannot "
           "be routed, nor the next one on the connection framed. Answer 400 and close the "
           "connection. int() is not a check: it raises on 'abc' (http.server then drops the "
           "connection without an answer), takes '+5' for 5, and rfile.read(-5) waits for "
           "the end of the stream.")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(f"POST /users/4242 HTTP/1.1\r\nHost: lab.test\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n{lines}\r\nhello".encode())
        reply = http.client.HTTPResponse(sock)
        try:
            reply.begin()
            reply.read()
            problem = ""
        except TimeoutError:
            problem = f"no response within {WAIT:.0f} s"
        except (http.client.HTTPException, ConnectionError) as exc:
            problem = f"the connection was dropped without a response ({type(exc).__name__})"
        if problem:
            pytest.fail(f"POST /users/4242 with {shown}: {problem}, expected 400 and the "
                        f"connection closed\n{why}", pytrace=False)
        assert reply.status == 400, (
            f"POST /users/4242 with {shown} (and a 5-byte body) got {reply.status}, expected "
            f"400: the request went on to the router\n{why}")
        try:
            rest: bytes | None = sock.recv(1)
        except ConnectionResetError:  # closed with bytes unread: closed all the same
            rest = b""
        except TimeoutError:
            rest = None
        assert rest == b"", (
            f"POST /users/4242 with {shown} got 400, then the connection stayed open, "
            f"expected it closed: after a framing error no later byte can be trusted to "
            f"start a request\n{why}")
    assert api.trace.events == [], (
        f"POST /users/4242 with {shown} ran the middleware chain ({api.trace.events}): a "
        f"request that cannot be framed is refused by the parse stage\n{why}")
    expect_reads(api, before, 0, f"a request with {shown}", "It is refused before routing.")


def test_missing_row_is_404_from_the_handler(api: Api) -> None:
    api.start()
    before = api.db.reads()
    reply = api.call("GET", "/users/999999")
    assert reply.status == 404 and isinstance(reply.json(), dict), (
        f"GET /users/999999 returned {reply.status} {reply.body[:100]!r}, expected 404 with "
        "a JSON error body: the route matched, the row does not exist")
    expect_reads(api, before, 1, "GET /users/999999",
                 "This 404 comes from the handler, after its query found no row.")


def test_middleware_runs_in_order_around_the_handler(api: Api) -> None:
    user = add_user(api.db)
    reply = api.call("GET", f"/users/{user['id']}")
    assert reply.status == 200, f"GET /users/{user['id']} returned {reply.status}"
    assert api.trace.events == ["outer>", "inner>", "<inner", "<outer"], (
        f"the test's middleware ran as {api.trace.events}, expected "
        "['outer>', 'inner>', '<inner', '<outer']\nThe first middleware in the list is the "
        "outermost: it runs first on the way in and last on the way out.")
    not_lower = [n for n in api.trace.header_names if n != n.lower()]
    assert not not_lower, (
        f"Request.headers has names that are not lower-case: {not_lower} (the outer "
        "middleware read request.headers.get('x-request-id'))\nHeader names are "
        "case-insensitive, and Request.headers promises lower-case names: lower-case them "
        "when you build the Request, and look them up in lower case.")
    rid = reply.headers.get("X-Request-Id")
    assert rid and api.trace.request_ids == [rid], (
        f"X-Request-Id: the response says {rid!r}, the first extra middleware saw "
        f"{api.trace.request_ids}\nThe request-id middleware is the outermost one: it sets "
        "the id before every other middleware runs and puts it on the response.")
    assert reply.headers.get("X-Seen-By-Inner") == "yes", (
        "a header the inner middleware added on the way out is missing from the response")
    # Two more requests without an id: each gets one of its own, seen by outer as sent back.
    fresh = [api.call("GET", path).headers.get("X-Request-Id")
             for path in (f"/users/{user['id']}", "/health")]
    ids = [rid, *fresh]
    assert len(set(ids)) == 3 and api.trace.request_ids == ids, (
        f"three requests without X-Request-Id got the ids {ids} (outer saw "
        f"{api.trace.request_ids}), expected three different ones: an id made once (when "
        "the app or the middleware is built, or as a default argument, evaluated once) "
        "ties unrelated requests together\nMake the id inside the middleware's call, per "
        "request: request.headers.get('x-request-id') or uuid.uuid4().hex.")
    echoed = api.call("GET", f"/users/{user['id']}", headers={"X-Request-Id": "req-77"})
    assert echoed.headers.get("X-Request-Id") == "req-77", (
        f"a request sent with X-Request-Id: req-77 got {echoed.headers.get('X-Request-Id')!r}"
        " back: keep the caller's id when there is one")


def test_a_request_leaves_nothing_in_the_next_ones_chain(api: Api) -> None:
    # A public request, then protected ones (a 200 and a 401), then the public one again:
    # each runs the chain its own route calls for, whatever ran before it.
    user = add_user(api.db)
    sequence = [("/health", TOKEN, 200), (f"/users/{user['id']}", TOKEN, 200),
                ("/users/1", None, 401), (f"/users/{user['id']}", TOKEN, 200),
                ("/health", None, 200)]
    seen, wrong = [], []
    for path, token, want in sequence:
        api.trace.events.clear()
        status = api.call("GET", path, token=token).status
        seen.append((path, status, list(api.trace.events)))
        if status != want:
            wrong.append((path, status))
    chains = {tuple(events) for _, _, events in seen}
    assert not wrong and chains == {("outer>", "inner>", "<inner", "<outer")}, (
        f"the same requests answered otherwise once others had run: {wrong} (path, status; "
        f"all: {[(p, st) for p, st, _ in seen]}), chains {sorted(chains)}: one request's "
        "chain leaked into the next - auth appended to a list the app keeps stays there, "
        "and GET /health is refused after a request to /users/{id}\nBuild each request's "
        "list anew: [request_id, *middlewares] + ([auth] if the route is protected) - a new "
        "list, never .append() to self.middlewares or a list kept from an earlier request.")


def test_auth_is_innermost_and_public_routes_skip_it(api: Api) -> None:
    api.start()
    before = api.db.reads()
    denied = api.call("GET", "/users/1", token=None)
    assert denied.status == 401, f"GET /users/1 without a token returned {denied.status}"
    assert api.trace.events == ["outer>", "inner>", "<inner", "<outer"] \
        and denied.headers.get("X-Request-Id"), (
        f"for the 401 the test's middleware ran as {api.trace.events} and X-Request-Id was "
        f"{denied.headers.get('X-Request-Id')!r}\nThe chain is [request_id, *middlewares, "
        "auth]: even a refused request is logged and traced by the outer middleware.")
    api.trace.events.clear()
    public = api.call("GET", "/health", token=None)
    assert public.status == 200 and public.json() == {"status": "ok"}, (
        f"GET /health without a token returned {public.status} {public.body[:100]!r}, "
        "expected 200 {\"status\": \"ok\"}: it is a public route, not wrapped by auth")
    expect_reads(api, before, 0, "a 401 and a health check", "Neither needs the users table.")


def test_query_string_and_header_case(api: Api) -> None:
    user = add_user(api.db)
    reply = api.call("GET", f"/users/{user['id']}?fields=all")
    assert reply.status == 200 and reply.json() == user, (
        f"GET /users/{user['id']}?fields=all returned {reply.status} {reply.body[:100]!r}, "
        f"expected 200 with the row\nThe query string is not part of the path: route on "
        "urlsplit(self.path).path (and put the query in Request.query).")
    reply = api.call("GET", f"/users/{user['id']}", token=None,
                     headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "req-lc"})
    assert reply.status == 200, (
        f"GET /users/{user['id']} with the header sent as 'authorization: Bearer ...' "
        f"(lower-case name, as HTTP/2 clients and many proxies send it) returned "
        f"{reply.status}, expected 200\nHeader names are case-insensitive: lower-case them "
        "when you build Request.headers and look them up in lower case.")
    assert reply.headers.get("X-Request-Id") == "req-lc", (
        f"a request sent with 'x-request-id: req-lc' got {reply.headers.get('X-Request-Id')!r}"
        " back: the caller's id counts whatever the case of the header name")
    for scheme in ("bearer", "BEARER"):
        reply = api.call("GET", f"/users/{user['id']}", token=None,
                         headers={"Authorization": f"{scheme} {TOKEN}"})
        assert reply.status == 200, (
            f"GET /users/{user['id']} with 'Authorization: {scheme} <valid token>' returned "
            f"{reply.status}, expected 200\nThe authentication scheme is case-insensitive "
            "(RFC 9110 11.1): compare scheme.lower() == 'bearer'; only the token is compared "
            "exactly.")


def test_database_error_is_a_500_and_the_server_recovers(api: Api) -> None:
    user = add_user(api.db)
    api.start()
    secret = "lab: relation storage offline (internal detail)"
    api.db.execute("INSERT INTO lab_failure VALUES (%s)", (secret,))
    reply = api.call("GET", f"/users/{user['id']}")
    body = reply.body.decode(errors="replace")
    assert reply.status == 500, (
        f"GET /users/{user['id']} while every query fails returned {reply.status} "
        f"{reply.body[:100]!r}, expected 500\nA failing query is the server's fault: catch "
        "the error around the chain and answer 500 with a JSON error.")
    assert isinstance(reply.json(), dict) and secret not in body, (
        f"the 500 said {reply.body[:200]!r}: expected a JSON error that does not show the "
        "database's message (it tells a caller about your internals)")
    # More failures than any pool holds connections: each must give its connection back.
    port = api.start()
    for failed in range(1, FAILURES + 1):
        try:
            more = http_request(f"127.0.0.1:{port}", "GET", f"/users/{user['id']}",
                                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=WAIT)
        except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
            pytest.fail(
                f"after {failed} failed queries in a row, the next request got no answer "
                f"within {WAIT:.0f} s ({type(exc).__name__}): every failure kept its database "
                "connection (getconn() without putconn() on the error path, a connection "
                "never closed when the query raised), so the pool ran dry and requests now "
                "wait for a connection that never comes back - give it back in a `with` "
                "block or a finally", pytrace=False)
        assert more.status == 500, (
            f"failed query {failed + 1} of {FAILURES + 1} in a row returned {more.status} "
            f"{more.body[:100]!r}, expected 500")
    api.db.execute("DELETE FROM lab_failure")
    again = api.call("GET", f"/users/{user['id']}")
    assert again.status == 200 and again.json() == user, (
        f"once the database worked again, GET /users/{user['id']} returned {again.status} "
        f"{again.body[:150]!r}, expected 200 with the row\nThe failed query must not break "
        "the app for later requests: a connection left in a failed transaction refuses "
        "every statement until rollback (use autocommit, or the pool's connection() "
        "context, which rolls back on error).")


def test_a_slow_request_does_not_block_others(api: Api) -> None:
    """One request is held where the learner's code runs: its query waits for a lock the
    test holds on the table (Postgres says when it waits). Another client must still be
    answered meanwhile."""
    user = add_user(api.db)
    port = api.start()
    slow: list[Any] = []
    held_id = f"req-held-{uuid.uuid4().hex[:8]}"

    def held_request() -> None:
        try:
            slow.append(http_request(f"127.0.0.1:{port}", "GET", f"/users/{user['id']}",
                                     headers={"Authorization": f"Bearer {TOKEN}",
                                              "X-Request-Id": held_id},
                                     timeout=WAIT * 3))
        except Exception as exc:  # noqa: BLE001 - reported below
            slow.append(exc)

    with api.db.postgres.connect() as locker, api.db.postgres.connect(autocommit=True) as watch:
        locker.execute("LOCK TABLE user_rows IN ACCESS EXCLUSIVE MODE")  # until rollback
        holder = threading.Thread(target=held_request, daemon=True)
        holder.start()
        try:
            deadline = time.monotonic() + WAIT
            waiting = 0
            while not waiting and time.monotonic() < deadline:
                row = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                    "current_database() AND wait_event_type = 'Lock'"
                                    ).fetchone()
                waiting = int(row[0]) if row else 0
                if not waiting:
                    time.sleep(0.01)
            assert waiting, (
                f"GET /users/{user['id']} never reached the database while the test held a "
                f"lock on the table (no query waited for it within {WAIT:.0f} s)")
            try:
                reply: HttpReply | None = http_request(f"127.0.0.1:{port}", "GET", "/health",
                                                       timeout=WAIT)
            except TimeoutError:
                reply = None
            assert reply is not None and reply.status == 200, (
                f"while GET /users/{user['id']} waited for the database (a slow query), GET "
                f"/health got {'no response' if reply is None else reply.status} within "
                f"{WAIT:.0f} s\nThe server handles one request at a time: serve each "
                "connection in its own thread (http.server.ThreadingHTTPServer, not "
                "HTTPServer).")
        finally:
            locker.rollback()  # the held query goes on
            holder.join(WAIT * 3)
    assert slow and isinstance(slow[0], HttpReply) and slow[0].status == 200, (
        f"the GET /users/{user['id']} held by the lock did not complete once released: "
        f"{slow[0] if slow else 'no answer'}")
    expect_own_request_id(slow[0], f"GET /users/{user['id']}", held_id, reply)


def expect_own_request_id(reply: HttpReply, what: str, sent: str, other: HttpReply) -> None:
    """``reply`` answered a request sent with X-Request-Id ``sent`` while ``other`` was
    served from start to end."""
    got, others = reply.header("X-Request-Id"), other.header("X-Request-Id")
    assert got == sent, (
        f"{what} sent with X-Request-Id: {sent} was answered with X-Request-Id: {got!r} "
        f"(GET /health, answered while it waited, got {others!r}), expected {sent}: the "
        "request id is kept where concurrent requests share it (a module global, an "
        "attribute of the app or of a middleware object), so the request that finishes "
        "last takes the id of the one that began last\nKeep the id in the request and in "
        "the middleware call's local variables: each thread serves its own request.")


BREAKS = {  # X-Lab-Break value -> where the test's middleware raises, as a message says it
    "outer before": "the outer middleware raised before calling next",
    "inner after": "the inner middleware raised after the handler had answered",
}


@pytest.mark.parametrize("where", list(BREAKS))
def test_any_failure_in_the_pipeline_is_a_500(api: Api, where: str) -> None:
    """Not only the query can fail: a middleware (or anything after the handler) that
    raises must still end in a JSON 500, never in a dropped connection."""
    user = add_user(api.db)
    port = api.start()
    what = f"GET /users/{user['id']} where {BREAKS[where]}"
    why = ("The request lifecycle turns every failure into a response - a middleware's, the "
           "handler's, the serializer's - not only the database's: catch exceptions around "
           "the whole chain (or where the server calls the app) and answer 500 with a JSON "
           "error that shows none of the exception's text.")
    try:
        reply = http_request(f"127.0.0.1:{port}", "GET", f"/users/{user['id']}",
                             headers={"Authorization": f"Bearer {TOKEN}",
                                      "X-Lab-Break": where}, timeout=WAIT)
    except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
        problem = (f"{what}: the server sent no response ({type(exc).__name__}), expected "
                   f"500 with a JSON error: the exception escaped into http.server, which "
                   f"drops the connection\n{why}")
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    body = reply.body.decode(errors="replace")
    assert reply.status == 500, (
        f"{what}: the response was {reply.status} {reply.body[:100]!r}, expected 500\n{why}")
    assert isinstance(reply.json(), dict) and BREAK_SECRET not in body, (
        f"{what}: the 500 said {reply.body[:200]!r}, expected a JSON error that does not "
        f"repeat the exception's message (it tells a caller about your internals)\n{why}")


# Transfer-Encoding (RFC 9112 6.1): a body framed by chunks, not by Content-Length. A server
# that does not decode chunked (http.server does not) answers 501 (or 400) and closes; one
# that does decodes it and goes on. Beside a Content-Length it is the classic smuggling pair
# (RFC 9112 6.3, 11.2): 400 and close either way. Each case: the header lines, whether the
# body really is chunked, and the answers that refuse it.
@dataclass(frozen=True)
class Chunked:
    lines: str
    statuses: tuple[int, ...]   # the answers that refuse it
    decodable: bool             # a server that decodes chunked may answer it instead
    why: str = ""               # what this case adds to the rule
    target: str = "POST /users/4242"    # the request the body comes with
    decoded: tuple[int, int] = (405, 200)   # a decoder's answers: it, then GET /health


# Several lines of one field are one comma-separated list (RFC 9110 5.3): a server that
# reads only the first line (headers.get()) or only the last (a dict built from items())
# sees another list than a proxy that reads them all.
ONE_LIST = ("Several Transfer-Encoding lines are one list (RFC 9110 5.3): read them all "
            "(headers.get_all()), not the first (headers.get()) or the last (a dict built "
            "from the header lines), or a proxy in front of you frames the body by another "
            "list than yours.")
CHUNKED_LAST_ONCE = ("chunked must be the last transfer coding of a request, applied once "
                     "(RFC 9112 6.1): otherwise the body's length cannot be determined and "
                     "the server MUST answer 400 and close (RFC 9112 6.3), a malformed "
                     "request, not a coding it does not implement (501).")
TRANSFER_ENCODINGS = {
    "chunked": Chunked("Transfer-Encoding: chunked\r\n", (501, 400), True),
    "Chunked": Chunked("Transfer-Encoding: Chunked\r\n", (501, 400), True),
    "gzip, chunked": Chunked("Transfer-Encoding: gzip, chunked\r\n", (501, 400), False),
    "chunked and content-length": Chunked(
        "Transfer-Encoding: chunked\r\nContent-Length: {length}\r\n", (400,), False),
    "gzip, then chunked, on two lines": Chunked(
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", (501, 400), False,
        ONE_LIST),
    "chunked, then gzip, on two lines": Chunked(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", (400,), False,
        f"{ONE_LIST} {CHUNKED_LAST_ONCE}"),
    "chunked on two lines": Chunked(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", (400,), False,
        f"{ONE_LIST} {CHUNKED_LAST_ONCE}"),
    "gzip alone": Chunked("Transfer-Encoding: gzip\r\n", (400,), False, CHUNKED_LAST_ONCE),
    "chunked, on a GET": Chunked(
        "Transfer-Encoding: chunked\r\n", (501, 400), True,
        "Any method may carry a body (RFC 9110 9.3.1: a GET's has no meaning, but it is "
        "framed all the same): a server that checks the framing of POST, PUT and PATCH "
        "only lets a chunked GET through, its chunks read as the next request.",
        "GET /health", (200, 200)),
}


def read_answer(stream: Any) -> tuple[int, bytes] | None:
    """One response off a shared reader (several may follow each other), or None at EOF;
    (0, what came) for bytes that are no HTTP/1.x response (http.server answers a request
    line it cannot read in HTTP/0.9: a bare body)."""
    status_line = stream.readline(65537)
    if not status_line:
        return None
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0, status_line + stream.read()
    headers = http.client.parse_headers(stream)
    return int(status_line.split()[1]), stream.read(int(headers.get("Content-Length") or 0))


def statuses_of(answers: list[tuple[int, bytes]]) -> list[int]:
    return [status for status, _ in answers]


@pytest.mark.parametrize("case", list(TRANSFER_ENCODINGS))
def test_transfer_encoding_is_refused_or_decoded(api: Api, case: str) -> None:
    user = add_user(api.db)
    port = api.start()
    before = api.db.reads()
    te = TRANSFER_ENCODINGS[case]
    smuggled = (f"GET /users/{user['id']} HTTP/1.1\r\nHost: lab.test\r\n"
                f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
    body_start = f"{len(smuggled):x}"
    body = f"{body_start}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    lines = te.lines.format(length=len(body))
    shown = " + ".join(repr(line) for line in lines.split("\r\n") if line)
    what = f"{te.target} with {shown} (a chunk holding a request for a user)"
    expected = " or ".join(str(status) for status in te.statuses)
    why = ("A chunked body ends at its last chunk, not after Content-Length bytes: a server "
           "that frames it by Content-Length (0 when absent) takes the chunks for the next "
           "request on the connection, what a proxy in front of it sent as a body (request "
           "smuggling, RFC 9112 11.2). http.server does not decode chunked: refuse any "
           "Transfer-Encoding before routing, 501 Not Implemented (RFC 9112 6.1), or 400 when "
           "a Content-Length comes with it (RFC 9112 6.3), and close the connection. "
           "Transfer codings are case-insensitive and a list ('gzip, chunked')."
           + (f"\n{te.why}" if te.why else ""))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(f"{te.target} HTTP/1.1\r\nHost: lab.test\r\n{lines}\r\n".encode()
                     + body + b"GET /health HTTP/1.1\r\nHost: lab.test\r\n\r\n")
        stream = sock.makefile("rb")
        answers: list[tuple[int, bytes]] = []
        try:  # a decoder's connection stays open after its two answers: stop there
            while len(answers) < (2 if statuses_of(answers) == [te.decoded[0]] else 3) and (
                    answer := read_answer(stream)) is not None:
                answers.append(answer)
                if answer[0] == 0:
                    break
        except TimeoutError:
            pass
        except ConnectionResetError:  # closed with bytes unread: closed all the same
            pass
    statuses = statuses_of(answers)
    decoded = (te.decodable and statuses == list(te.decoded)
               and json_or_none(answers[1][1]) == {"status": "ok"})
    if not decoded:
        shown_answers = ", ".join(
            str(status) if status else "a reply with no status line (http.server's answer to "
            f"a request line {body_start!r}: the chunk-size line)"
            for status, _ in answers) or "none"
        seen = (": the body was framed by Content-Length and the chunks read as the next "
                "request" if 0 in statuses or statuses[1:2] == [400] else
                ": the body was framed by Content-Length" if statuses[:1] == [te.decoded[0]]
                else "")
        assert statuses[:1] and statuses[0] in te.statuses, (
            f"{what}, then GET /health: the answers were {shown_answers}, expected "
            f"{expected} and the connection closed"
            + (f" (or {te.decoded[0]}, then GET /health answered: chunked decoded)"
               if te.decodable else "") +
            f"{seen}\n{why}")
        assert len(answers) == 1, (
            f"{what}: answered {statuses[0]}, then the connection stayed open and answered "
            f"{statuses[1:]}, expected it closed: after a framing refusal no later byte can "
            f"be trusted to start a request\n{why}")
        assert api.trace.events == [], (
            f"{what} ran the middleware chain ({api.trace.events}): a request whose body "
            f"cannot be framed is refused by the parse stage\n{why}")
    expect_reads(api, before, 0, what, "A request body is data, never a request of its own.")
