"""Verification for ph7.2 structured-logging.

The learner's app runs behind a real HTTP server (labrunner.testing.serve_wsgi) and writes
its log to a file the test reads back whole. The requests are hostile on purpose: a
username carrying a quote, a newline and a forged JSON object, a handler that raises (a
multi-line traceback), and secrets planted in a password, an Authorization header, an
X-Api-Key header, a cookie and a query string. Every line must parse as one JSON object
with the mandatory fields, an ISO-8601 UTC timestamp, a known level; the caller's trace id
(W3C traceparent) must be on every line of its request; and no planted secret may appear
anywhere in the file, in any form.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from labrunner.testing import HttpReply, http_request, local_timezone, serve_wsgi

MANDATORY = ("timestamp", "level", "service", "trace_id", "span_id", "message")
LEVELS = {"DEBUG", "INFO", "WARN", "ERROR", "FATAL"}
PASSWORD = "correct horse battery staple"
HOSTILE_USER = 'mallory"}\n{"level": "INFO", "message": "forged", "user": "admin'
SERVICE = "orders-api"


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """Every line as a JSON object; a line that is not one fails the test."""
        records = []
        for number, line in enumerate(self.text().splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(
                    f"log line {number} is not JSON: {line[:160]!r}\nEvery line must be one "
                    "JSON object: build a dict and json.dumps() it. Formatting JSON by hand "
                    "(f-strings) breaks on a quote or newline a client sends, and lets a "
                    "client forge lines; a traceback written as-is spans many lines: put it "
                    "in a string field of its record.", pytrace=False)
            if not isinstance(record, dict):
                pytest.fail(f"log line {number} is JSON but not an object: {line[:160]!r}",
                            pytrace=False)
            records.append(record)
        return records


# The concurrency check's gate (harness.py): a write that leaves the log mid-line waits up
# to GATE_WAIT s for another request's write, GATE_WAITS times at most (a logger that writes
# its line in pieces under a lock waits that long, and passes).
CONCURRENT, GATE_WAIT, GATE_WAITS = 4, 2.0, 2

# The learner's code runs in a local zone that is not UTC (a half-hour offset, like India's):
# on a machine in UTC, the local time labelled "Z" would look right.
LOCAL_ZONE, LOCAL_OFFSET = "LAB-5:30", timedelta(hours=5, minutes=30)


@pytest.fixture
def serve(learner: Any) -> Any:
    make_app = learner.function("jsonlog", "make_app")
    folder = learner.tmp_folder(learner_writes=True)
    previous = learner.run_helper(local_timezone, LOCAL_ZONE)
    gates = []

    def start(level: str = "INFO", gated: bool = False, slow_bodies: bool = False,
              service: str = SERVICE) -> tuple[Any, Log]:
        path = folder / f"app-{service}-{level}.log"
        path.touch()
        os.chmod(path, 0o666)
        if gated:  # before make_app opens the file: see harness.py
            gates.append(learner.harness())
            gates[-1].install(str(path), GATE_WAIT, GATE_WAITS)
        app = make_app(str(path), service, level)
        if slow_bodies:  # a body arrives X-Lab-Body-Delay s late (harness.py)
            app = learner.harness().slow_bodies(app)
        return serve_wsgi(app), Log(path)

    yield start
    for harness in gates:
        harness.remove()
    learner.run_helper(local_timezone, previous)


def login(host: str, user: str, password: str, headers: dict[str, str] | None = None,
          query: str = "") -> HttpReply:
    return http_request(host, "POST", f"/login{query}", document={"username": user,
                                                                  "password": password},
                        headers=headers)


def traceparent() -> tuple[str, str]:
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def check_record(n: int, record: dict[str, Any], before: datetime, after: datetime) -> None:
    missing = [f for f in MANDATORY if f not in record]
    assert not missing, (
        f"log record {n} lacks the mandatory field(s) {missing}: {record}\nEvery line "
        f"carries {', '.join(MANDATORY)}: a line without its service or trace id cannot be "
        "found or correlated when many services log to one place.")
    assert record["service"] == SERVICE, (
        f"record {n}: service is {record['service']!r}, expected {SERVICE!r} (make_app's "
        "argument)")
    assert record["level"] in LEVELS, (
        f"record {n}: level {record['level']!r} is not one of {sorted(LEVELS)}")
    stamp = record["timestamp"]
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        pytest.fail(f"record {n}: timestamp {stamp!r} is not ISO-8601 (expected e.g. "
                    "2026-01-31T12:00:00.123Z)", pytrace=False)
    assert when.tzinfo is not None and when.utcoffset() == timedelta(0), (
        f"record {n}: timestamp {stamp!r} is not UTC, expected an explicit Z or +00:00\n"
        "A timestamp without an offset is read in whatever zone the reader is in: use "
        "datetime.now(timezone.utc).isoformat(), not datetime.now() or utcnow() (naive).")
    slack = timedelta(seconds=2)
    if before - slack <= when - LOCAL_OFFSET <= after + slack:
        pytest.fail(
            f"record {n}: timestamp {stamp} is the local time of the app's machine (UTC+05:30 "
            f"in this test) labelled as UTC: the request was at {before:%H:%M:%S} UTC. "
            "datetime.now() is local time, whatever suffix is added: use "
            "datetime.now(timezone.utc)", pytrace=False)
    assert before - slack <= when <= after + slack, (
        f"record {n}: timestamp {stamp} is not the time of the request (between {before} "
        f"and {after}): log the current UTC time")
    assert re.fullmatch(r"[0-9a-f]{32}", str(record["trace_id"])), (
        f"record {n}: trace_id {record['trace_id']!r} is not 32 lowercase hex digits (W3C)")
    assert re.fullmatch(r"[0-9a-f]{16}", str(record["span_id"])), (
        f"record {n}: span_id {record['span_id']!r} is not 16 lowercase hex digits (W3C)")


def test_every_line_is_a_json_object_with_the_mandatory_fields(serve: Any) -> None:
    server, log = serve()
    before = datetime.now(UTC)
    with server as host:
        assert login(host, "alice", PASSWORD).status == 200, "POST /login (right password)"
        login(host, HOSTILE_USER, "wrong")
        boom = http_request(host, "GET", "/boom")
        http_request(host, "GET", "/no-such-page")
    after = datetime.now(UTC)
    assert boom.status == 500, f"GET /boom: expected 500, saw {boom.status}"
    records = log.records()
    assert len(records) >= 4, (
        f"4 requests left {len(records)} log line(s), expected at least one per request "
        "(an access line: method, path, status, duration)")
    for n, record in enumerate(records, 1):
        check_record(n, record, before, after)
    forged = [r for r in records if r.get("message") == "forged"]
    assert not forged, (
        f"a client forged a log line: the username {HOSTILE_USER!r} became its own record "
        f"{forged[0]}: never build JSON by concatenating strings")
    hostile = [r for r in records if r.get("user") == HOSTILE_USER]
    assert hostile, (
        "the failed login of the hostile username was not logged with field user = the "
        "exact username: log the value as data (json.dumps escapes it), do not drop it")
    errors = [r for r in records if r["level"] == "ERROR"]
    assert errors and any("RuntimeError" in json.dumps(r) for r in errors), (
        "GET /boom raised RuntimeError in the handler, but no ERROR record mentions it: log "
        "unhandled exceptions at ERROR with the exception (its traceback as a string field)")


ORDER = ["DEBUG", "INFO", "WARN", "ERROR", "FATAL"]


def rank(level: Any) -> int:
    return ORDER.index(level) if level in ORDER else len(ORDER)


def test_levels_and_threshold(serve: Any) -> None:
    # INFO and DEBUG first; then WARN and ERROR: a threshold drops every level below it,
    # not only DEBUG.
    for threshold, want_debug in (("INFO", False), ("DEBUG", True), ("WARN", False),
                                  ("ERROR", False)):
        server, log = serve(threshold)
        with server as host:
            http_request(host, "GET", "/debug-me")
            login(host, "bob", "wrong")
            http_request(host, "GET", "/boom")
            http_request(host, "POST", "/login", document={"username": "bob"})  # 400
            http_request(host, "GET", "/no-such-page")  # 404
        records = log.records()
        assert records, (
            f"with level={threshold!r}, 5 requests (a 500 among them) left this app's log "
            "file empty, not even an ERROR record: its records went elsewhere. Each "
            "make_app() logs to its own log_path: a logger (or file) kept in a module "
            "global by the first make_app() sends a later app's records to the first app's "
            "file, at the first app's level.")
        levels = [r.get("level") for r in records]
        has_debug = "DEBUG" in levels
        assert has_debug == want_debug, (
            f"with level={threshold!r}, GET /debug-me (which logs a DEBUG 'cache lookup') "
            f"left levels {levels}: expected {'a' if want_debug else 'no'} DEBUG record\n"
            "Records below the configured level are not written; at DEBUG they are.")
        below = [(r.get("level"), r.get("message"), r.get("status")) for r in records
                 if rank(r.get("level")) < rank(threshold)]
        assert not below, (
            f"with level={threshold!r} the log holds records below {threshold}: "
            f"{below[:6]} (level, message, status)\nThe threshold drops EVERY record "
            f"ranked below it ({' < '.join(ORDER)}), access records too - not only DEBUG: "
            "compare the record's rank with the threshold's, for every record.")
        by_status = {r.get("status"): r.get("level") for r in records if "status" in r}
        want = {s: lvl for s, lvl in {200: "INFO", 400: "WARN", 401: "WARN", 404: "WARN",
                                      500: "ERROR"}.items()
                if rank(lvl) >= rank(threshold)}
        seen = {s: by_status.get(s) for s in want}
        wrong = {s: (seen[s], want[s]) for s in want if seen[s] != want[s]}
        assert not wrong, (
            "access records logged at the wrong level: "
            + "; ".join(f"status {s} at {got}, expected {exp}" for s, (got, exp)
                        in wrong.items())
            + f" (all: {seen})\nThe level says how bad it is: every 2xx/3xx is INFO, every "
            "4xx (400 through 499, 400 itself included) WARN, every 5xx ERROR - compare with "
            ">= 400 and >= 500, and log access lines at the level their status deserves.")


def test_two_apps_keep_their_own_file_level_and_service(serve: Any) -> None:
    # Both apps made before either serves a request: whatever make_app() keeps in module
    # globals (the file, the level, the service), the later app overwrote it.
    (first, first_log), (second, second_log) = serve("WARN"), serve("DEBUG", service="billing")
    with first as host:
        http_request(host, "GET", "/debug-me")
        http_request(host, "GET", "/no-such-page")  # 404: WARN
    with second as host:
        http_request(host, "GET", "/debug-me")
    seen = {"the first app (level WARN, service orders-api)": (
                first_log.records(), "WARN", SERVICE, {"WARN"}),
            "the second app (level DEBUG, service billing)": (
                second_log.records(), "DEBUG", "billing", {"DEBUG", "INFO"})}
    for what, (records, level, service, want) in seen.items():
        got = sorted((str(r.get("level")), str(r.get("service")), str(r.get("message")))
                     for r in records)
        wrong = [g for g in got if rank(g[0]) < rank(level) or g[1] != service]
        assert not wrong and want <= {g[0] for g in got}, (
            f"two apps made side by side: {what} logged {got} (level, service, message) in "
            f"its file, expected levels {sorted(want)} at least, none below {level}, every "
            f"record of service {service!r}\nEach make_app() call is an app of its own: keep "
            "its file, level and service in the app (a closure or an object), never in "
            "module globals that the next make_app() overwrites.")


def test_trace_id_comes_from_traceparent(serve: Any) -> None:
    server, log = serve()
    trace_id, header = traceparent()
    parent_span = header.split("-")[2]
    with server as host:
        login(host, "carol", PASSWORD, headers={"traceparent": header})
        http_request(host, "GET", "/no-such-page")
        http_request(host, "GET", "/no-such-page")
    records = log.records()
    carol = [r for r in records if r.get("user") == "carol" or r.get("path") == "/login"]
    ids = {r.get("trace_id") for r in carol}
    assert carol and ids == {trace_id}, (
        f"a request with traceparent {header} logged trace ids {ids}, expected only "
        f"{trace_id}\nTake the trace id from the incoming traceparent (00-<trace id>-<parent "
        "span id>-<flags>) so this service's lines join the caller's trace; put it on every "
        "line of the request.")
    reused = [r for r in carol if r.get("span_id") == parent_span]
    assert not reused, (
        f"a request with traceparent {header} logged span_id {parent_span} - the CALLER's "
        "span id (the traceparent's third part) - on its line(s) "
        f"{[r.get('message') for r in reused]}\nThat id names the caller's span; this "
        "request is a new span, its child: keep the trace id, make a new span id "
        "(secrets.token_hex(8)) for the request.")
    spans = [r.get("span_id") for r in records if r.get("path") == "/no-such-page"]
    assert len(set(spans)) == len(spans), (
        f"two different requests logged the same span_id {spans}: each request is its own "
        "span, with a new span id")
    others = [r.get("trace_id") for r in records if r.get("path") == "/no-such-page"]
    assert len(others) == 2 and len(set(others)) == 2 and trace_id not in others, (
        f"two requests without traceparent logged trace ids {others}, expected a fresh, "
        "distinct id for each: an id shared by unrelated requests (a constant, or one made "
        "at start-up) correlates things that are not related")


# traceparent headers no W3C parser accepts (trace-context 3.2: the trace id is 32
# LOWERCASE hex digits and not all zeros; the whole header has four dash-separated fields
# of fixed length): each request must start a trace of its own, with an id of its own (not
# one lifted out of the header). A list is sent as that many header lines: the server hands
# the app one field, the values joined with "," (RFC 9110 5.3; wsgiref, gunicorn, as a proxy
# may too). Two traceparents are no trace to join: the W3C trace-context test suite
# (test_traceparent_duplicated) expects a new trace id, neither of the two.
DUPLICATED = [f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01" for _ in range(2)]
VERSION_FF = "version ff (invalid by the spec)"
VERSION_00_LONGER = "version 00 with a field after the flags"
MALFORMED_TRACEPARENTS: dict[str, str | list[str]] = {
    "a trace id that is not hex": "00-not-a-trace-id-at-all-0000000000-00f067aa0ba902b7-01",
    "a short trace id": "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
    "an uppercase trace id": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    "the all-zero trace id (invalid by the spec)":
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "a header of one word": "garbage",
    VERSION_FF: f"ff-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
    VERSION_00_LONGER:
        f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01-{secrets.token_hex(4)}",
    "two traceparent header lines (one field, joined with ',')": DUPLICATED,
    "two traceparents combined in one line, as a proxy may": ",".join(DUPLICATED[::-1]),
}
# Why a header with the W3C form's parts, but not as its version allows, names no trace.
NOT_THIS_VERSION = {
    VERSION_FF: "version ff is invalid (W3C trace-context 3.2.4): a later version is read as "
                "far as version 00's fields go, but ff never is",
    VERSION_00_LONGER: "version 00 is exactly its four fields (W3C trace-context 3.2): only "
                       "a later version may carry more after the flags",
}


def get_status(host: str, path: str, name: str, values: str | list[str]) -> int:
    """GET ``path`` with header ``name`` sent once per value, on lines of their own."""
    conn = http.client.HTTPConnection(host, timeout=15)
    try:
        conn.putrequest("GET", path)
        for value in [values] if isinstance(values, str) else values:
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def test_malformed_traceparent_starts_a_new_trace(serve: Any) -> None:
    server, log = serve()
    with server as host:
        statuses = {what: get_status(host, f"/no-such-page-{n}", "traceparent", header)
                    for n, (what, header) in enumerate(MALFORMED_TRACEPARENTS.items())}
    crashed = {what: status for what, status in statuses.items() if status != 404}
    assert not crashed, (
        f"GET of a missing page with a malformed traceparent answered {crashed}, expected "
        "404: a header the caller got wrong is ignored, never a crash")
    records = log.records()
    for n, (what, header) in enumerate(MALFORMED_TRACEPARENTS.items()):
        ids = [r.get("trace_id") for r in records if r.get("path") == f"/no-such-page-{n}"]
        bad = [i for i in ids if not re.fullmatch(r"[0-9a-f]{32}", str(i)) or i == "0" * 32]
        sent = "".join(header).lower()
        lifted = [i for i in ids if str(i).lower() in sent]
        assert ids and not bad and not lifted, (
            f"a request with traceparent {header!r} ({what}) logged trace id(s) {ids}, "
            "expected a fresh one (32 lowercase hex digits, not all zeros)"
            + ((f": {NOT_THIS_VERSION[what]}" if what in NOT_THIS_VERSION else
                ", not one taken out of the header: the header does not match the W3C form "
                "as a whole (an unanchored re.match() or a split(',') takes a part of it), "
                "so it names no trace") if lifted else "") + "\nValidate "
            "traceparent before trusting it - <version>-<32 lowercase hex, not all zeros>-"
            "<16 hex>-<2 hex>, version 00 exactly so, a later one (not ff) maybe followed by "
            "'-' and more (W3C trace-context) - and start a new trace when it does not match: "
            "a trace id split out of any header poisons every log query and trace join "
            "downstream.")


# W3C trace-context 3.2.4 ("Versioning of traceparent"): a version above 00 (other than ff)
# is parsed as far as version 00's fields go - trace id, parent id, flags, the flags being
# the end of the header or followed by a dash and fields of that later version - so that a
# caller already on a newer version still joins the trace (the W3C test suite's
# test_traceparent_version_0xcc).
FUTURE_VERSIONS = {
    "version 01, the four fields of version 00": "01-{trace}-{span}-01",
    "version cc, with fields of its own after the flags":
        "cc-{trace}-{span}-01-what-the-future-will-be-like",
}


def test_a_later_traceparent_version_joins_the_trace(serve: Any) -> None:
    server, log = serve()
    sent = {what: (secrets.token_hex(16), form) for what, form in FUTURE_VERSIONS.items()}
    headers = {what: form.format(trace=trace_id, span=secrets.token_hex(8))
               for what, (trace_id, form) in sent.items()}
    with server as host:
        for n, header in enumerate(headers.values()):
            get_status(host, f"/no-such-page-{n}", "traceparent", header)
    records = log.records()
    for n, (what, header) in enumerate(headers.items()):
        ids = {r.get("trace_id") for r in records if r.get("path") == f"/no-such-page-{n}"}
        assert ids == {sent[what][0]}, (
            f"a request with traceparent {header!r} ({what}) logged trace id(s) "
            f"{sorted(map(str, ids))}, expected the caller's {sent[what][0]}: a traceparent "
            "of a version above 00 was thrown away. W3C trace-context 3.2.4 (Versioning of "
            "traceparent): a later version is read as far as version 00's fields go "
            "(<2 hex version, not ff>-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, "
            "then the end or '-' and more fields), so a caller on a newer version still "
            "joins the trace; only version 00 must be exactly those four fields")


def test_no_secret_is_ever_logged(serve: Any) -> None:
    planted = {
        "the password in the body": "hunter2-" + secrets.token_hex(6),
        "a Bearer token in Authorization": "eyJhbGciOiJIUzI1NiJ9." + secrets.token_hex(12),
        "an X-Api-Key header": "sk_live_" + secrets.token_hex(12),
        "a session cookie": "sess-" + secrets.token_hex(12),
        "a token in the query string": "qt-" + secrets.token_hex(12),
        "a password in the query string (password=)": "qp-" + secrets.token_hex(12),
        "an api key in the query string under a percent-encoded name (api%5Fkey=)":
            "qk-" + secrets.token_hex(12),
        "a query parameter named in mixed case (Access_Token=)": "qa-" + secrets.token_hex(12),
        "the right password": PASSWORD,
        "the password of a login body without a username (answered 400)":
            "nouser-" + secrets.token_hex(8),
        "the password of a login body that is not valid JSON (answered 400)":
            "badjson-" + secrets.token_hex(8),
    }
    server, log = serve("DEBUG")  # the most verbose setting: nothing may leak even there
    with server as host:
        headers = {"Authorization": f"Bearer {planted['a Bearer token in Authorization']}",
                   "X-Api-Key": planted["an X-Api-Key header"],
                   "Cookie": f"session={planted['a session cookie']}"}
        login(host, "dave", planted["the password in the body"], headers=headers,
              query=f"?token={planted['a token in the query string']}&lang=en&password="
                    + planted["a password in the query string (password=)"])
        login(host, "erin", PASSWORD, headers=headers, query=(
            "?api%5Fkey=" + planted["an api key in the query string under a percent-encoded "
                                    "name (api%5Fkey=)"]
            + "&Access_Token=" + planted["a query parameter named in mixed case "
                                         "(Access_Token=)"] + "&lang=en"))
        http_request(host, "GET", "/boom", headers=headers)
        # the error paths: requests the app cannot read still carry secrets
        http_request(host, "POST", "/login", document={"password": planted[
            "the password of a login body without a username (answered 400)"]})
        http_request(host, "POST", "/login", body=(
            '{"username": "frank", "password": "' + planted[
                "the password of a login body that is not valid JSON (answered 400)"]
            + '"').encode())
    text = log.text()
    log.records()  # and still one JSON object per line
    for what, secret in planted.items():
        forms = {secret, json.dumps(secret)[1:-1], secret.replace(" ", "+"),
                 secret.replace(" ", "%20")}
        leaked = [f for f in forms if f in text]
        where = [r.get("message") for r in log.records()
                 if any(f in json.dumps(r, ensure_ascii=False) or f in json.dumps(r)
                        for f in forms)]
        named = (": a query parameter's name is read percent-decoded (parse_qsl) and "
                 "compared in any case, as a field's key is - a regex or split over the raw query "
                 "misses it" if "query parameter" in what or "encoded name" in what else
                 ": a password is a secret in a query string too (a form sent with GET, a "
                 "client that puts it there) - redact every name a field's key would be "
                 "redacted for (password, passwd, secret, token, api_key, ...), not a list of "
                 "the names a URL is thought to carry" if "password=" in what else "")
        assert not leaked, (
            f"{what} ({secret!r}) appears in the log, in the record(s) {where}{named}\nNever log "
            "secrets - on the error paths neither: a request the app cannot parse is no "
            "less secret (never log its raw body 'to debug it'); no request bodies "
            "or headers wholesale; redact credential headers (Authorization, Cookie, "
            "X-Api-Key) and sensitive query parameters (token=...) in the path you log, and "
            "run every field through a redaction filter as a second line of defence.")
    assert '"dave"' in text, (
        "the login of user 'dave' is not in the log: redact the secrets, keep the facts "
        "(who logged in, the path, the status)")


def test_concurrent_requests_never_share_or_split_a_line(serve: Any) -> None:
    # The server runs each request on a thread of its own. The harness's gate holds any
    # write that leaves the log mid-line until another request's write has come (see
    # harness.py): the interleaving a threaded server meets now and then, every time.
    server, log = serve(gated=True)
    paths = [f"/no-such-page-{n}" for n in range(CONCURRENT)]
    start = threading.Barrier(CONCURRENT)
    statuses: dict[str, int] = {}

    def one(host: str, path: str) -> None:
        start.wait(30)
        statuses[path] = http_request(host, "GET", path).status

    with server as host:
        clients = [threading.Thread(target=one, args=(host, p)) for p in paths]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
    assert sorted(statuses) == sorted(paths), (
        f"{CONCURRENT} requests sent at once: only {sorted(statuses)} were answered")
    lines = log.text().split("\n")
    if lines[-1] == "":  # the last line's newline
        lines.pop()
    for number, line in enumerate(lines, 1):
        try:
            whole = isinstance(json.loads(line), dict)
        except ValueError:
            whole = False
        what = ("is empty" if not line else
                f"holds two records glued together ({line[:50]!r}...{line[-50:]!r})"
                if "}{" in line else f"is not JSON ({line[:100]!r})")
        assert whole, (
            f"{CONCURRENT} requests logging at once: log line {number} {what}, expected one "
            "JSON object per line - another request's record landed in the middle of this "
            "one's write: print(line, file=f) is two writes (the text, then end='\\n'), and so is "
            "write(line) then write('\\n'); on a threaded server a second thread writes "
            "between them (two records glued on one line, then an empty line)\nWrite each "
            "record as json.dumps(record) + '\\n' in ONE write(), under one "
            "threading.Lock shared by every request (made once, in the logger, not per "
            "call).")
    paths_logged = sorted(str(r.get("path")) for r in log.records()
                          if str(r.get("path")).startswith("/no-such-page-"))
    assert paths_logged == sorted(paths), (
        f"{CONCURRENT} requests logging at once left access records for {paths_logged}, "
        f"expected one for each of {sorted(paths)}: a record written from several threads "
        "at once was lost or duplicated - write each line in one write() under a lock")


# Secrets inside the extra fields of a record, at any depth: POST /client-events logs the
# client's context object as it came, and the redaction pass goes through every dict and
# list in it. A key names a secret in any case, "-" read as "_", alone or as the last word
# of a longer name (the README's rule). Each case: where the secret sits, the context that
# holds it (the secret passed in). The OWASP Logging Cheat Sheet's "never log": passwords,
# access tokens, session ids, keys and other secrets - wherever a field carries them.
CONTEXT_SECRETS: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
    ("a password", lambda s: {"password": s}),
    ("a Password two objects down", lambda s: {"form": {"fields": {"Password": s}}}),
    ("an Authorization header (Token scheme) in a headers object",
     lambda s: {"request": {"headers": {"Authorization": f"Token {s}"}}}),
    ("an api_key", lambda s: {"api_key": s}),
    ("an X-Api-Key header", lambda s: {"headers": {"X-Api-Key": s}}),
    ("a secret", lambda s: {"secret": s}),
    ("a client_secret", lambda s: {"oauth": {"client_secret": s}}),
    ("a Cookie header", lambda s: {"headers": {"Cookie": f"session={s}"}}),
    ("a Set-Cookie response header",
     lambda s: {"response": {"headers": {"Set-Cookie": f"session={s}; HttpOnly; Secure"}}}),
    ("a token in an object in a list", lambda s: {"attempts": [{"n": 1}, {"token": s}]}),
    ("a refresh_token in a list in a list", lambda s: {"batches": [[{"refresh_token": s}]]}),
    ("an access_token", lambda s: {"session": {"access_token": s}}),
    # A secret's key hides its value whatever it holds, not only a string: a token that
    # came as an object, a password as a list.
    ("a token whose value is an object (its key hides whatever it holds, not only a "
     "string)", lambda s: {"oauth": {"token": {"value": s, "expires_in": 3600}}}),
    ("a password whose value is a list (its key hides whatever it holds, not only a "
     "string)", lambda s: {"form": {"password": [s]}}),
    # Headers as WSGI servers and ASGI give them, and as a browser's Headers.entries()
    # does: a list of (name, value) pairs, a name repeated. The name names the value as a
    # key would (Sentry's scrubbing treats header pair lists alike); the pairs stay pairs.
    ("a Cookie header in (name, value) pairs, sent twice",
     lambda s: {"request": {"headers": [["Accept", "text/html"], ["Cookie", "theme=dark"],
                                        ["Cookie", f"session={s}"]]}}),
    ("an x-api-key header in (name, value) pairs",
     lambda s: {"headers": [["x-api-key", s], ["user-agent", "lab/1.0"]]}),
    ("Set-Cookie response headers in pairs, the second one the session's",
     lambda s: {"responses": [{"status": 200, "headers": [
         ["Content-Type", "text/html"], ["Set-Cookie", "theme=dark"],
         ["Set-Cookie", f"session={s}; HttpOnly"]]}]}),
]
SECRET_NAMES = ("password", "passwd", "secret", "token", "api_key", "apikey",
                "authorization", "cookie")


def names_a_secret(name: str) -> bool:
    """The README's rule: in any case, '-' read as '_', alone or the last word."""
    name = name.lower().replace("-", "_")
    return any(name == word or name.endswith("_" + word) for word in SECRET_NAMES)


def header_pairs(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], list[Any]]]:
    """Every list of (name, value) pairs in ``value``, with the path to it."""
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in header_pairs(v, (*path, k))]
    if isinstance(value, list):
        if value and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                         for p in value):
            return [(path, value)]
        return [found for i, v in enumerate(value) for found in header_pairs(v, (*path, i))]
    return []


def at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def pairs_kept(sent: list[Any], kept: Any) -> bool:
    """The pairs as they came - each name, in order, a repeated one as often - with only
    the values of names that name a secret changed."""
    return (isinstance(kept, list) and len(kept) == len(sent)
            and all(isinstance(k, list) and len(k) == 2 and k[0] == name
                    and (names_a_secret(name) or k[1] == v)
                    for (name, v), k in zip(sent, kept, strict=True)))
CONTEXT_FACTS = {"page": "/checkout", "cart": {"items": 3, "currency": "EUR"}}
# Keys where a secret's word is not the last word name no secret (the README: alone or the
# last word): a logger that redacts every key containing "token" or "cookie" loses these.
CONTEXT_LOOKALIKES = {"token_type": "bearer", "cookie_consent": "granted",
                      "password_changed_at": "2026-11-02", "secret_question_set": True}


def test_secrets_in_nested_fields_are_redacted(serve: Any) -> None:
    server, log = serve("DEBUG")
    sent = []
    with server as host:
        for what, holding in CONTEXT_SECRETS:
            secret = "s3cr3t-" + secrets.token_hex(10)
            trace_id, header = traceparent()
            reply = http_request(host, "POST", "/client-events",
                                 document={"event": "checkout-failed",
                                           "context": {**CONTEXT_FACTS,
                                                       **CONTEXT_LOOKALIKES,
                                                       **holding(secret)}},
                                 headers={"traceparent": header})
            assert reply.status == 202, (
                f"POST /client-events (an event and its context) answered {reply.status} "
                f"{reply.body[:100]!r}, expected 202")
            sent.append((what, secret, trace_id, holding(secret)))
    text = log.text()
    records = log.records()
    wrong = []
    for what, secret, trace_id, context in sent:
        events = [r for r in records if r.get("trace_id") == trace_id and "context" in r]
        if not events:
            wrong.append(f"the client event with {what} left no record with its context "
                         f"(trace {trace_id}): log the event with field context")
            continue
        kept = events[0]["context"]
        if secret in text:
            wrong.append(f"{what} ({json.dumps(context)}) reached the log: the record's "
                         f"context is {json.dumps(kept)[:200]}")
        elif isinstance(kept, dict) and (lost := {
                k: kept.get(k) for k, v in CONTEXT_LOOKALIKES.items() if kept.get(k) != v}):
            wrong.append(f"keys that name no secret were redacted ({lost} in the client "
                         f"event with {what}), expected them kept as they came: a key names "
                         "a secret when the word is the whole name or its LAST word "
                         "(refresh_token, Set-Cookie), not wherever it appears - "
                         "token_type, cookie_consent, password_changed_at are no secrets, "
                         "and a log that hides them hides what an operator needs")
        elif not isinstance(kept, dict) or any(kept.get(k) != v for k, v in
                                               CONTEXT_FACTS.items()):
            wrong.append(f"the client event with {what} was logged with the context "
                         f"{json.dumps(kept)[:200]}, expected its facts {CONTEXT_FACTS} "
                         "kept as they came: redact the secret, not the record")
        else:
            for path, pairs in header_pairs(context):
                if not pairs_kept(pairs, at(kept, path)):
                    where = "context" + "".join(f"[{step!r}]" for step in path)
                    wrong.append(
                        f"{what}: the (name, value) pairs at {where}, {json.dumps(pairs)}, "
                        f"were logged as {json.dumps(at(kept, path))[:300]}, expected the "
                        "same pairs in the same order (a repeated name twice), only the "
                        "values of the names that name a secret redacted: a header list "
                        "turned into an object loses the repeated ones")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(CONTEXT_SECRETS)} secrets in the extra fields): a key "
        "that names a secret (password, secret, token, api_key, authorization, cookie - "
        "in any case, '-' read as '_', alone or ending a longer name: X-Api-Key, "
        "Set-Cookie, client_secret, refresh_token) hides its value at ANY depth: walk "
        "every dict, and every list, of every field - a context object is the one place "
        "a client's headers or form end up. Headers also come as a list of [name, value] "
        "pairs (WSGI, ASGI, fetch's Headers.entries(), a name repeated): there the "
        "pair's name names its value as a key does.")


# duration_ms is the request's wall time inside the app, in milliseconds: from the moment
# the app is called to the response, reading the body included. The harness delays a
# request's body by a known time (a slow upload): the app cannot have taken less, and it
# cannot have taken more than the client waited. Each case: the request, its body, the
# delay in seconds.
DURATIONS: list[tuple[str, str, dict[str, Any], float]] = [
    ("POST /login (right password)", "/login", {"username": "gina", "password": PASSWORD},
     0.35),
    ("POST /login (wrong password)", "/login", {"username": "gina", "password": "nope"},
     0.35),
    ("POST /client-events", "/client-events", {"event": "view", "context": {}}, 0.8),
]
# a logger that logs after the response went out (a close() hook) may exceed what the
# client waited by the time that thread takes to be scheduled again
DURATION_SLACK_MS = 500


def test_duration_ms_is_the_requests_time_in_milliseconds(serve: Any) -> None:
    server, log = serve(slow_bodies=True)
    timed = []
    with server as host:
        for what, path, document, delay in DURATIONS:
            trace_id, header = traceparent()
            started = time.perf_counter()
            http_request(host, "POST", path, document=document,
                         headers={"traceparent": header, "X-Lab-Body-Delay": str(delay)})
            timed.append((what, trace_id, delay, (time.perf_counter() - started) * 1000))
        http_request(host, "GET", "/no-such-page")
    records = log.records()
    access = [r for r in records if "status" in r]
    odd = [(r.get("path"), r.get("duration_ms")) for r in access
           if isinstance(r.get("duration_ms"), bool)
           or not isinstance(r.get("duration_ms"), int | float) or r["duration_ms"] < 0]
    assert access and not odd, (
        f"access records whose duration_ms is not a number of milliseconds: {odd[:4]} "
        "(path, duration_ms)\nduration_ms is a JSON number (12.3, not \"12.3ms\" or "
        "\"0.0123\"): a log query sums, averages and compares it - text cannot be")
    wrong = []
    for what, trace_id, delay, waited in timed:
        mine = [r for r in access if r.get("trace_id") == trace_id]
        if not mine:
            wrong.append(f"{what} left no access record (trace {trace_id})")
            continue
        got, least = mine[0]["duration_ms"], delay * 1000
        if least - 1 <= got <= waited + DURATION_SLACK_MS:
            continue
        if got < least - 1:
            why = ("that is the time in SECONDS under a name that says milliseconds: "
                   "multiply by 1000" if least - 1 <= got * 1000 <= waited + 1 else
                   "rounded down to nothing: keep the fractions of a millisecond, or at "
                   "least whole ones" if got == 0 else
                   "measure wall time (time.perf_counter(), not CPU time: a request "
                   "waiting for its body burns none) from the moment the app is called, "
                   "reading the body included")
        else:
            why = ("longer than the client waited: the unit is not milliseconds "
                   "(microseconds? nanoseconds?), or the clock started before the request")
        wrong.append(f"{what} logged duration_ms {got!r}, expected at least {least:.0f} "
                     f"(its body arrived {delay} s after the app was called) and not much "
                     f"more than the {waited:.0f} ms the client waited: {why}")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(DURATIONS)} durations wrong): duration_ms is the wall "
        "time the request took inside the app, in milliseconds - the figure a latency "
        "dashboard sums and a slow-request alert compares")
