"""Verification for ph1.6 problem-details.

The learner's make_app(dsn) runs behind a threaded wsgiref server on 127.0.0.1:0; every
error path is provoked with a real HTTP request and its answer checked against RFC 7807:
media type application/problem+json, members type, title, status, detail, instance, and
the rules that tie them together. The 500 is real too: the test renames the table under the
running app, and the answer must not leak what the database said.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import pytest
from psycopg.conninfo import make_conninfo

from labrunner.testing import HttpReply, call, serve_wsgi

SCHEMA = """
CREATE TABLE accounts (
    id            bigint PRIMARY KEY,
    owner         text NOT NULL,
    balance_cents bigint NOT NULL CHECK (balance_cents >= 0)
);
INSERT INTO accounts VALUES (1, 'Ada Lovelace', 5000);
"""
VALIDATION = ("https://example.com/problems/validation-error", "Your request is not valid.")
OUT_OF_CREDIT = ("https://example.com/problems/out-of-credit", "You do not have enough credit.")
JSON = "application/json"


# ---- what a problem document must be ----------------------------------------------------

def check_problem(reply: HttpReply, what: str, path: str, status: int,
                  kind: tuple[str, str] | None = None, why: str = "") -> dict[str, Any]:
    """Assert an RFC 7807 answer; return the parsed document for further checks."""
    assert reply.status == status, (
        f"{what}: expected status {status}, saw {reply.status}{why} {reply.body[:150]!r}")
    media_type = (reply.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    assert media_type == "application/problem+json", (
        f"{what}: expected Content-Type application/problem+json, saw "
        f"{reply.headers.get('Content-Type')!r}: clients recognise a problem by its media type")
    try:
        doc = json.loads(reply.body)
    except ValueError:
        pytest.fail(f"{what}: the problem body is not JSON: {reply.body[:150]!r}", pytrace=False)
    assert isinstance(doc, dict), f"{what}: a problem is a JSON object, saw {doc!r}"
    missing = [m for m in ("type", "title", "status", "detail", "instance") if m not in doc]
    assert not missing, f"{what}: the problem lacks {missing}; saw {doc}"
    assert doc["status"] == status and isinstance(doc["status"], int), (
        f"{what}: member status must be the number {status} (the HTTP status), saw "
        f"{doc['status']!r}")
    for member in ("type", "title", "detail", "instance"):
        assert isinstance(doc[member], str) and doc[member].strip(), (
            f"{what}: member {member} must be a non-empty string, saw {doc[member]!r}")
    want_type, want_title = kind or ("about:blank", HTTPStatus(status).phrase)
    assert doc["type"] == want_type, (
        f"{what}: expected type {want_type!r}, saw {doc['type']!r}")
    assert doc["title"] == want_title, (
        f"{what}: expected title {want_title!r}, saw {doc['title']!r}: "
        + ("with type about:blank the title is the HTTP status phrase" if kind is None else
           "the title belongs to the type and is the same for every occurrence; the "
           "specifics go in detail"))
    instance = doc["instance"]
    assert instance == path or re.fullmatch(r"urn:uuid:[0-9a-f-]{36}", instance), (
        f"{what}: expected instance to identify this occurrence - the request path {path!r} "
        f"or a urn:uuid: - saw {instance!r}")
    return doc


# ---- the table of error paths -----------------------------------------------------------

@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    kind: tuple[str, str] | None = None
    body: bytes | None = None
    content_type: str | None = JSON
    check: Callable[[dict[str, Any], HttpReply], str | None] | None = field(default=None)
    why: str = ""  # what a wrong status means here, said after "expected .., saw .."


def field_errors(doc: dict[str, Any], reply: HttpReply) -> str | None:
    errors = doc.get("errors")
    if not (isinstance(errors, list) and errors and all(
            isinstance(e, dict) and "amount_cents" in str(e.get("pointer", "")) and
            isinstance(e.get("detail"), str) for e in errors)):
        return (f"expected an extension member errors: [{{\"pointer\": \"#/amount_cents\", "
                f"\"detail\": ...}}] naming the invalid field, saw {errors!r}")
    return None


def balance_extension(doc: dict[str, Any], reply: HttpReply) -> str | None:
    if doc.get("balance_cents") != 5000:
        return (f"expected the extension member balance_cents: 5000 (problem types may add "
                f"members a client can act on), saw {doc.get('balance_cents')!r}")
    return None


def allows(supported: str, refused: str) -> Callable[[dict[str, Any], HttpReply], str | None]:
    """A 405's Allow header lists the method the resource supports (RFC 9110 15.5.6), and
    not the one it just refused."""

    def check(doc: dict[str, Any], reply: HttpReply) -> str | None:
        header = reply.headers.get("Allow")
        listed = {m.strip().upper() for m in (header or "").split(",") if m.strip()}
        if supported not in listed or refused in listed:
            return (f"a 405 keeps its Allow header listing what this resource supports "
                    f"({supported}), saw Allow: {header!r} - a client reads it to learn "
                    "which method to send instead")
        return None

    return check


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


W = "/accounts/1/withdrawals"
NOT_ALLOWED = (": the URL exists, only this method is not one it supports: 405 Method Not "
               "Allowed with Allow: {} - a 404 would tell the client there is nothing there; "
               "route by path first, then answer every other method of that path with 405")
MEDIA_TYPE_FIRST = (": the body was sent as text/plain, not application/json - that is the 415 "
                    "whatever the bytes look like, so the media type is checked first: a parse "
                    "that runs before it (or a check made only when parsing fails) answers for "
                    "a body the client never said was JSON")
PREFIX_ROUTE = (": no route has this path, it only begins like {} - a route matched by its "
                "prefix (re.match without $, startswith) serves paths it does not name; match "
                "the whole path (re.fullmatch, or anchor the pattern with $)")
MAX_CENTS = 10**12
INCLUSIVE = ("amount_cents may be 1..10^12, both ends included: a valid amount at the limit "
             "was refused as invalid (an off-by-one: < instead of <=, or range(1, 10**12), "
             "which stops before 10**12)")
CASES = [
    Case("missing-account", "GET", "/accounts/999", 404),
    Case("unknown-path", "GET", "/nothing/here", 404),
    Case("below-withdrawals", "POST", W + "/2", 404, body=js({"amount_cents": 5}),
         why=PREFIX_ROUTE.format(W)),
    Case("below-account", "GET", "/accounts/1/owner", 404,
         why=PREFIX_ROUTE.format("/accounts/1")),
    Case("wrong-method", "DELETE", "/accounts/1", 405, check=allows("GET", "DELETE")),
    *[Case(f"{method.lower()}-account", method, "/accounts/1", 405,
           body=js({"amount_cents": 5}) if method != "GET" else None,
           check=allows("GET", method), why=NOT_ALLOWED.format("GET"))
      for method in ("POST", "PUT", "PATCH")],
    *[Case(f"{method.lower()}-withdrawals", method, W, 405,
           body=js({"amount_cents": 5}) if method != "GET" else None,
           check=allows("POST", method), why=NOT_ALLOWED.format("POST"))
      for method in ("GET", "PUT", "DELETE")],
    *[Case(f"body-{name}", "POST", W, 422, VALIDATION, js(value), check=field_errors,
           why=": the body is JSON but not an object, so it has no amount_cents - that is "
               "the validation problem, not a crash: check that the body is an object "
               "before reading a member from it (.get(), [] or `in` on a list, a string, a "
               "number or null raises or finds nonsense)")
      for name, value in (("array", [{"amount_cents": 5}]), ("empty-array", []),
                          ("string", "amount_cents"), ("number", 5), ("null", None),
                          ("true", True))],
    Case("not-json-media-type", "POST", W, 415, body=b"amount=5", content_type="text/plain",
         why=MEDIA_TYPE_FIRST),
    Case("json-sent-as-text", "POST", W, 415, body=js({"amount_cents": 5}),
         content_type="text/plain", why=MEDIA_TYPE_FIRST),
    Case("broken-json", "POST", W, 400, body=b'{"amount_cents": '),
    *[Case(f"body-{name}", "POST", W, 400, body=sent,
           why=f": {said} is not JSON - a JSON text is one value at least (RFC 8259 2), so "
               "this is the 400 problem like any other unparsable body, not the 422 of a "
               "missing amount_cents: reading no body as {} answers for a document the "
               "client never sent (a body lost on its way, a client that forgot it)")
      for name, sent, said in (("empty", b"", "an empty body (Content-Length: 0)"),
                               ("blank", b" \r\n ", "a body of only white space"))],
    Case("body-not-utf-8", "POST", W, 400, body=b'{"amount_cents": 5\xff}',
         why=": a body whose bytes are not UTF-8 is not JSON (RFC 8259 8.1: JSON is UTF-8), "
             "so it is the 400 problem like any other unparsable body - the decoding failed "
             "outside what your parse error handling catches (bytes.decode() raises "
             "UnicodeDecodeError, and json.loads() of bytes raises it too, not a "
             "JSONDecodeError): decode inside the same try, and catch ValueError, which "
             "both are"),
    Case("negative-amount", "POST", W, 422, VALIDATION, js({"amount_cents": -5}),
         check=field_errors),
    Case("amount-as-string", "POST", W, 422, VALIDATION, js({"amount_cents": "10"}),
         check=field_errors),
    Case("no-amount", "POST", W, 422, VALIDATION, js({}), check=field_errors),
    Case("amount-true", "POST", W, 422, VALIDATION, js({"amount_cents": True}),
         check=field_errors,
         why=": JSON true is not a number of cents, but in Python bool is a subclass of int "
             "(isinstance(True, int) is True, and True == 1) - refuse booleans explicitly"),
    Case("amount-fraction", "POST", W, 422, VALIDATION, js({"amount_cents": 12.5}),
         check=field_errors, why=": 12.5 is not a whole number of cents"),
    Case("out-of-credit", "POST", W, 409, OUT_OF_CREDIT, js({"amount_cents": 10_000}),
         check=balance_extension),
    Case("amount-above-limit", "POST", W, 422, VALIDATION, js({"amount_cents": MAX_CENTS + 1}),
         check=field_errors, why=": 10^12 + 1 is above the largest valid amount (1..10^12)"),
    Case("amount-at-limit", "POST", W, 409, OUT_OF_CREDIT, js({"amount_cents": MAX_CENTS}),
         check=balance_extension, why=": " + INCLUSIVE + " - 10^12 from a balance of 5000 is "
         "the out-of-credit problem, not a validation error"),
    *[Case(f"account-id-{name}", "GET", f"/accounts/{digits}", 404,
           why=f": {said} names no account (accounts.id is a bigint: at most "
               "9223372036854775807) - the 404 problem, not a failure: int() refuses a "
               "string past 4300 digits (ValueError), and Postgres refuses a number past "
               "bigint sent as text (out of range); bound the id before it reaches either")
      for name, digits, said in (
          ("past-bigint", "9223372036854775808", "9223372036854775808, one past bigint,"),
          ("5000-digits", "9" * 5000, "an id of 5000 digits"))],
    Case("withdraw-missing-account", "POST", "/accounts/999/withdrawals", 404,
         body=js({"amount_cents": 5}),
         why=": account 999 does not exist, so a withdrawal from it is the 404 problem - "
             "not out-of-credit or another error; tell a missing account from a low "
             "balance (e.g. when a conditional UPDATE finds no row, look at why)"),
]


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def db(postgres: Any) -> Any:
    with postgres.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    return postgres


@pytest.fixture
def host(learner: Any, db: Any) -> Iterator[str]:
    make_app = learner.function("accounts_api", "make_app")
    with serve_wsgi(make_app(db.dsn)) as address:
        yield address


# ---- the verification -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_is_a_problem(host: str, case: Case) -> None:
    reply = call(host, case.method, case.path, case.body, content_type=case.content_type)
    shown = case.path if len(case.path) <= 60 else f"{case.path[:30]}... ({len(case.path)} chars)"
    what = f"{case.method} {shown} ({case.name})"
    doc = check_problem(reply, what, case.path, case.status, case.kind, case.why)
    if case.check is not None:
        problem = case.check(doc, reply)
        assert problem is None, f"{what}: {problem}"


def raw_get(host: str, target: str) -> tuple[int, dict[str, str], bytes]:
    """GET target on a socket of its own, read to the end (the server closes after one
    answer): the status, the headers and every byte of the body, however many the
    Content-Length header announced."""
    address, port = host.rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=15) as sock:
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode("ascii"))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


NON_ASCII_PATH = "/caf%C3%A9/%E2%82%AC"  # /café/€ on the wire: a URI is ASCII


def test_problem_for_a_non_ascii_path(host: str) -> None:
    """A path with non-ASCII characters (percent-encoded UTF-8, as a URI carries them) is
    an unknown path: the 404 problem, every byte of it announced by Content-Length, with an
    instance that is still a URI reference."""
    what = f"GET {NON_ASCII_PATH} (an unknown path, /café/€ percent-encoded)"
    _, headers, body = raw_get(host, NON_ASCII_PATH)
    announced = headers.get("content-length")
    assert announced is None or announced == str(len(body)), (
        f"{what}: the answer's Content-Length says {announced} bytes, but the body the "
        f"server sent is {len(body)} bytes: {body[:160]!r} - a client reads {announced} "
        "bytes and gets cut-off JSON. Content-Length counts the bytes sent, not the "
        "characters of the str before encoding (json.dumps(..., ensure_ascii=False) keeps "
        "é and € as characters that take 2 and 3 bytes in UTF-8): encode first, then count")
    reply = call(host, "GET", NON_ASCII_PATH)
    try:
        instance = json.loads(reply.body).get("instance")
    except (ValueError, AttributeError):
        instance = None  # not a problem document: check_problem says so below
    assert not isinstance(instance, str) or instance == NON_ASCII_PATH or re.fullmatch(
        r"urn:uuid:[0-9a-f-]{36}", instance), (
        f"{what}: instance is {instance!r}, expected the request path as sent "
        f"({NON_ASCII_PATH!r}) or a urn:uuid: - instance is a URI reference (RFC 9457 "
        "3.1.5), and a URI is ASCII: PATH_INFO is the path percent-decoded, its bytes read "
        "as latin-1 (PEP 3333), so echoed as it is it names another path. Percent-encode "
        "its bytes again (quote(PATH_INFO.encode('latin-1'))) or use the request-target as "
        "the client sent it")
    check_problem(reply, what, NON_ASCII_PATH, 404)


def test_one_type_one_title(host: str) -> None:
    first = check_problem(call(host, "POST", W, {"amount_cents": 0}),
                          "POST with amount_cents 0", W, 422, VALIDATION)
    second = check_problem(call(host, "POST", W, {"amount": 3}),
                           "POST with a misspelt member", W, 422, VALIDATION)
    assert first["title"] == second["title"], (
        f"two validation problems have titles {first['title']!r} and {second['title']!r}: "
        "the title summarises the type and does not change between occurrences")


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "Application/JSON"])
def test_json_media_type_with_parameters_or_case(host: str, content_type: str) -> None:
    paid = call(host, "POST", W, js({"amount_cents": 100}), content_type=content_type)
    assert paid.status == 201, (
        f"POST {W} with Content-Type: {content_type} and a JSON body: expected 201, saw "
        f"{paid.status} {paid.body[:120]!r}: the media type is the part before ';' and is "
        "case-insensitive; parameters such as charset=utf-8 do not change it - compare "
        "only the lower-cased type/subtype, not the whole header")


def test_successes_stay_plain_json(host: str) -> None:
    got = call(host, "GET", "/accounts/1")
    assert got.status == 200 and (got.headers.get("Content-Type") or "").startswith(JSON), (
        f"GET /accounts/1: expected 200 application/json, saw {got.status} "
        f"{got.headers.get('Content-Type')!r} {got.body[:120]!r}")
    paid = call(host, "POST", W, {"amount_cents": 1200})
    assert paid.status == 201 and json.loads(paid.body).get("balance_cents") == 3800, (
        f"POST {W} amount_cents 1200 from 5000: expected 201 with balance_cents 3800, saw "
        f"{paid.status} {paid.body[:150]!r}")


@pytest.mark.parametrize(("balance", "amount"), [(5000, 1), (MAX_CENTS, MAX_CENTS)])
def test_amount_bounds_are_inclusive(host: str, db: Any, balance: int, amount: int) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO accounts VALUES (2, 'Grace Hopper', %s)", (balance,))
    paid = call(host, "POST", "/accounts/2/withdrawals", {"amount_cents": amount})
    assert paid.status == 201 and paid.json().get("balance_cents") == balance - amount, (
        f"POST /accounts/2/withdrawals amount_cents {amount} from a balance of {balance}: "
        f"expected 201 with balance_cents {balance - amount}, saw {paid.status} "
        f"{paid.body[:150]!r}: {INCLUSIVE}")


def test_every_bigint_names_an_account(host: str, db: Any) -> None:
    """accounts.id is a bigint: its largest value, 19 digits, is an account's id too."""
    biggest = 2**63 - 1
    with db.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO accounts VALUES (%s, 'Edsger Dijkstra', 700)", (biggest,))
    got = call(host, "GET", f"/accounts/{biggest}")
    assert got.status == 200 and got.json().get("owner") == "Edsger Dijkstra", (
        f"GET /accounts/{biggest} (bigint's largest value, an account that exists): expected "
        f"200 with its owner, saw {got.status} {got.body[:150]!r}: accounts.id is a bigint, "
        "so any id up to 9223372036854775807 (19 digits) can name an account - bound the id "
        "by bigint, not by 18 digits")


# Failures nobody wrote an except clause for, each raised by the parsing every request goes
# through: (body, headers, what the request is, what Python raises). A problem document
# answers each (a 500, or a 400: both are honest here), never the WSGI server's own page.
UNFORESEEN = {
    "content-length-not-a-number": (None, {"Content-Type": JSON, "Content-Length": "abc"},
                                    "a Content-Length header of 'abc' and no body",
                                    "int() raises ValueError"),
    "json-nested-too-deep": (b"[" * 100_000, {}, "a JSON body of 100000 nested arrays",
                             "json.loads() raises RecursionError, not a ValueError"),
}
# What each of those exceptions says (str(exc)): none of it belongs in the answer.
UNFORESEEN_TEXT = {
    "content-length-not-a-number": ["invalid literal", "int()", "base 10", "ValueError"],
    "json-nested-too-deep": ["recursion", "RecursionError", "decoding"],
}


@pytest.mark.parametrize("case", list(UNFORESEEN))
def test_unforeseen_failure_is_a_problem_too(host: str, case: str) -> None:
    body, headers, sent, raised = UNFORESEEN[case]
    reply = call(host, "POST", W, body, headers)
    what = f"POST {W} with {sent}"
    media_type = (reply.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    assert media_type == "application/problem+json", (
        f"{what} ({raised}): the answer was {reply.status} {media_type or 'with no type'} "
        f"{reply.body[:80]!r}, expected a problem document (500, or 400) in "
        "application/problem+json\nThe exception escaped the app and the WSGI server "
        "answered with its own page: a catch-all that lists the errors its author foresaw "
        "(Problem, psycopg.Error, ValueError...) is not one. Catch Exception around the "
        "whole request, log it, and answer the 500 problem.")
    doc = check_problem(reply, what, W, reply.status if reply.status in (400, 500) else 500)
    leaked = leaks(reply, UNFORESEEN_TEXT[case])
    assert not leaked, (
        f"{what} ({raised}): the {reply.status} problem tells the client what the exception "
        f"said ({', '.join(leaked)}): {doc.get('detail')!r} - an exception's text is the "
        "server's business whichever exception it is, not only a database's: log it, and "
        "answer with a detail of your own")


LEAKS = ["Traceback", 'File "', ".py", "psycopg", "UndefinedTable", "accounts_hidden",
         "relation", "SELECT", "Error:", "line "]


def leaks(reply: HttpReply, also: list[str]) -> list[str]:
    """The internals (LEAKS, and what this exception says) found in the body or headers."""
    exposed = reply.body.decode(errors="replace") + "".join(
        f"{k}: {v}\n" for k, v in reply.headers.items())
    return [word for word in LEAKS + also if word in exposed]


def test_500_leaks_nothing(host: str, db: Any) -> None:
    with db.connect(autocommit=True) as conn:  # break the schema under the running app
        conn.execute("ALTER TABLE accounts RENAME TO accounts_hidden")
    reply = call(host, "GET", "/accounts/1")
    doc = check_problem(reply, "GET /accounts/1 with its table gone", "/accounts/1", 500)
    exposed = reply.body.decode(errors="replace") + "".join(
        f"{k}: {v}\n" for k, v in reply.headers.items())
    leaked = [word for word in LEAKS if word in exposed]
    assert not leaked, (
        f"the 500 problem leaks internals ({', '.join(leaked)}): {doc.get('detail')!r}: log "
        "the exception on the server; tell the client only that something failed")


UNREACHABLE_TEXT = ["127.0.0.1", "refused", "TCP/IP", "OperationalError", "server at"]


def test_unreachable_database_is_a_problem_that_leaks_nothing(learner: Any, db: Any) -> None:
    """The error path of a database that refuses connections (down, restarting): the app
    gets a DSN whose port has a socket bound but not listening, so connect() fails at once
    with libpq's message, which names the host and port. A 500 (or 503) problem, none of it
    in the answer."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused
        port = closed.getsockname()[1]
        dsn = make_conninfo(db.dsn, host="127.0.0.1", port=str(port))
        make_app = learner.function("accounts_api", "make_app")
        try:
            app = make_app(dsn)
        except Exception as exc:  # noqa: BLE001 - the learner's, named below
            pytest.fail(
                f"make_app(dsn) raised {type(exc).__name__} while the database refuses "
                "connections: the app cannot even start, so no request gets a problem "
                "document. Connect in the request (a connection of its own, or one taken "
                "from a pool), not once in make_app: a database that restarts must not "
                "take the API down with it, and one connection for every request shares "
                "one transaction among them", pytrace=False)
        with serve_wsgi(app) as address:
            reply = call(address, "GET", "/accounts/1")
    what = "GET /accounts/1 while the database refuses connections"
    doc = check_problem(reply, what, "/accounts/1",
                        reply.status if reply.status in (500, 503) else 500)
    leaked = leaks(reply, [*UNREACHABLE_TEXT, f"port {port}"])
    assert not leaked, (
        f"{what}: the {reply.status} problem tells the client what the connection error "
        f"said ({', '.join(leaked)}): {json.dumps(doc)[:300]} - libpq's message names the "
        "database's host and port, which are the server's business: log it, and answer "
        "with a detail of your own (in no member, no header)")


def _lock_waiters(db: Any) -> int:
    with db.connect(autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


def test_concurrent_withdrawals_end_in_409_not_500(host: str, db: Any) -> None:
    """Two withdrawals of 3000 from 5000 arrive together: one is paid, the other is the
    out-of-credit problem. The test holds the account's row lock until both requests are
    inside Postgres, so the race is run every time."""
    replies: list[HttpReply | BaseException | None] = [None, None]

    def withdraw(i: int) -> None:
        try:
            replies[i] = call(host, "POST", W, {"amount_cents": 3000})
        except BaseException as exc:  # noqa: BLE001 - reported below
            replies[i] = exc

    threads = [threading.Thread(target=withdraw, args=(i,), daemon=True) for i in (0, 1)]
    warm = call(host, "GET", "/accounts/1")  # a service that has served before: whatever it
    assert warm.status == 200, (  # keeps between requests (a connection) is made by now
        f"GET /accounts/1: expected 200, saw {warm.status} {warm.body[:150]!r}")
    with db.connect() as gate:
        gate.execute("SELECT 1 FROM accounts WHERE id = 1 FOR UPDATE")
        for thread in threads:
            thread.start()
        deadline, waiting = time.monotonic() + 10, 0
        while (waiting := _lock_waiters(db)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        gate.commit()
    for thread in threads:
        thread.join(20)
    done = [r for r in replies if isinstance(r, HttpReply)]
    assert len(done) == 2, f"two concurrent withdrawals did not both complete: {replies}"
    assert waiting >= 2, (
        f"two withdrawals sent at once while the test held account 1's row lock: after 10 s "
        f"{waiting} of them waited for it inside Postgres (then they answered "
        f"{sorted(r.status for r in done)}), the other one was held up inside your app. "
        "Either the requests share one connection (made once in make_app, or kept in a "
        "global), so they queue for it and their transactions are one (the second's BEGIN "
        "is a savepoint in the first's): the row lock cannot keep them apart. Or a lock in "
        "the app orders them, which the API's other processes never see. Give each request "
        "a connection of its own (psycopg.connect per request, or a pool's), and let the "
        "database's row lock order them")
    statuses = sorted(r.status for r in done)
    assert 500 not in statuses, (
        f"two withdrawals of 3000 from 5000 at once answered {statuses}: the second one broke "
        "the balance's CHECK constraint and became a 500. Both read the balance before "
        "either wrote: lock the row while checking (SELECT ... FOR UPDATE), or make the "
        "UPDATE itself conditional (WHERE balance_cents >= amount), and answer the "
        "out-of-credit problem (409)")
    assert statuses == [201, 409], (
        f"two withdrawals of 3000 from 5000 at once: expected one 201 and one 409, saw "
        f"{statuses}")
    refused = next(r for r in done if r.status == 409)
    check_problem(refused, "the refused concurrent withdrawal", W, 409, OUT_OF_CREDIT)
