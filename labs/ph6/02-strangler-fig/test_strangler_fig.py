"""ph6.2 - the strangler fig: a gateway moving paths from a legacy system to a new service.

Two real HTTP backends run on loopback (the "legacy" monolith and the "new" service); each
answers with what it received (method, path, query, body, a request header) and counts its
requests. The learner's gateway is served over real HTTP and driven by a real client; routes
are switched on the running gateway, between requests. A request held unanswered at legacy
must not hold up another one: the second reaches legacy meanwhile, each gets its own answer."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import pytest

from labrunner.testing import came_true, http_request, read_http_request, serve_wsgi, wait_until


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.lock = threading.Lock()
        self.arrived: list[str] = []   # the paths of the requests that reached it, in order
        self.methods: list[str] = []   # their methods, in the same order
        self.head_lengths: dict[str, int] = {}   # path -> Content-Length of its HEAD answer
        self.holds: dict[str, threading.Event] = {}   # path -> answered once this is set
        self.url = ""   # "http://127.0.0.1:PORT", once it is served

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self.lock:
            self.hits += 1
            self.arrived.append(environ.get("PATH_INFO") or "")
            self.methods.append(environ["REQUEST_METHOD"])
        hold = self.holds.get(environ.get("PATH_INFO") or "")
        if hold is not None:
            hold.wait(HOLD_LIMIT)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        seen = {"service": self.name, "method": environ["REQUEST_METHOD"],
                "path": environ.get("PATH_INFO"), "query": environ.get("QUERY_STRING", ""),
                "raw": environ.get("RAW_URI"),
                "body": body.decode(errors="replace"), "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "request_id": environ.get("HTTP_X_REQUEST_ID"),
                "content_type": environ.get("CONTENT_TYPE")}
        path = environ.get("PATH_INFO") or ""
        if path.endswith("/missing"):
            status, extra = "404 Not Found", []
        elif environ["REQUEST_METHOD"] == "POST":
            status, extra = "201 Created", [("Location", f"{path}/42"), *COOKIES]
        else:   # 200, or a code that HTTPStatus does not list
            status, extra = UNLISTED_STATUS.get(path.rpartition("/")[2], "200 OK"), []
        content = json.dumps(seen).encode()
        if environ["REQUEST_METHOD"] == "HEAD":
            # What a server does for HEAD: the GET's header fields, Content-Length included,
            # and no content (RFC 9110 9.3.2).
            with self.lock:
                self.head_lengths[path] = len(content)
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(content))), *extra])
            return []
        start_response(status, [("Content-Type", "application/json"), *extra])
        return [content]


HOLD_LIMIT = 60   # s: a held request is answered by then whatever happens (never hangs)
# a response header that comes twice: each must reach the client (a dict keeps one)
COOKIES = [("Set-Cookie", "session=s-81; Path=/; HttpOnly"), ("Set-Cookie", "theme=dark; Path=/")]
CONTENT_TYPE = "application/vnd.shop+json"
# codes in use that http.HTTPStatus does not list: a gateway relays them (RFC 9110 15)
UNLISTED_STATUS = {"closed": "499 Client Closed Request", "overloaded": "520 Origin Overloaded"}


@pytest.fixture
def world(learner: Any) -> Iterator[tuple[Any, str, dict[str, Backend]]]:
    legacy, new = Backend("legacy"), Backend("new")
    with serve_wsgi(legacy) as legacy_host, serve_wsgi(new) as new_host:
        legacy.url, new.url = f"http://{legacy_host}", f"http://{new_host}"
        gateway = learner.load("strangler").Gateway(legacy.url, new.url)
        with serve_wsgi(gateway) as host:
            yield gateway, host, {"legacy": legacy, "new": new}


def served_by(host: str, backends: dict[str, Backend], path: str) -> str:
    before = {name: b.hits for name, b in backends.items()}
    reply = http_request(host, "GET", path)
    hits = {name: b.hits - before[name] for name, b in backends.items()}
    if sum(hits.values()) != 1:
        pytest.fail(f"GET {path} reached the backends {hits} times (the client got HTTP "
                    f"{reply.status} {reply.body[:80]!r}): expected exactly one "
                    "request to exactly one of them (no retry elsewhere, no fan-out)")
    try:
        service = reply.json().get("service")
    except Exception:  # noqa: BLE001 - the gateway's own answer: reported below
        service = None
    name = next(n for n, h in hits.items() if h)
    if service != name:
        pytest.fail(f"GET {path} reached {name} but the client got HTTP {reply.status} "
                    f"{reply.body[:200]!r}: the backend's answer must come back unchanged")
    return name


def check_routes(host: str, backends: dict[str, Backend], want: dict[str, str],
                 why: str) -> None:
    got = {path: served_by(host, backends, path) for path in want}
    wrong = {p: g for p, g in got.items() if g != want[p]}
    assert not wrong, (
        f"{why}: " + "; ".join(f"GET {p} went to {g}, expected {want[p]}"
                               for p, g in wrong.items())
        + ". A prefix owns a path when the path equals it or continues with '/' "
        "(/orders owns /orders/7, not /orders-archive); the longest matching prefix decides; "
        "anything unrouted stays with legacy.")


def test_unmigrated_paths_stay_with_legacy(world: Any) -> None:
    _, host, backends = world
    check_routes(host, backends, {"/orders/7": "legacy", "/users/1": "legacy", "/": "legacy"},
                 "before any route moves")


def test_a_prefix_moves_to_the_new_service_at_run_time(world: Any) -> None:
    gateway, host, backends = world
    assert served_by(host, backends, "/orders/7") == "legacy"
    gateway.route_to_new("/orders")
    check_routes(host, backends, {
        "/orders": "new", "/orders/7": "new", "/orders/7/lines": "new",
        "/orders-archive/2019": "legacy", "/ordersummary": "legacy", "/users/1": "legacy"},
        "after route_to_new('/orders') on the running gateway")
    gateway.route_to_legacy("/orders")
    check_routes(host, backends, {"/orders/7": "legacy"},
                 "after route_to_legacy('/orders') (the rollback of a migration)")


def test_the_longest_prefix_wins(world: Any) -> None:
    gateway, host, backends = world
    gateway.route_to_new("/users")
    gateway.route_to_legacy("/users/export")
    check_routes(host, backends, {"/users/5": "new", "/users/export": "legacy",
                                  "/users/export/csv": "legacy", "/users/exporter": "new"},
                 "with /users moved to new, then /users/export carved out back to legacy")


def test_a_prefix_beyond_ascii_owns_its_paths(world: Any) -> None:
    """A prefix is text: '/café' owns /caf%C3%A9/menu (a path's percent-encoded bytes are
    UTF-8, RFC 3986 2.5), though WSGI hands PATH_INFO over as those bytes read as Latin-1
    ('/cafÃ©/menu'): compared as they come, the two never match."""
    gateway, host, backends = world
    gateway.route_to_new("/café")
    gateway.route_to_new("/注文")
    check_routes(host, backends, {"/caf%C3%A9/menu": "new", "/%E6%B3%A8%E6%96%87/7": "new",
                                  "/cafe/menu": "legacy"},
                 "with '/café' and '/注文' moved to new - PATH_INFO holds the path's bytes "
                 "as Latin-1 characters (PEP 3333), so '/café' arrives as '/cafÃ©': route on "
                 "the path as text, PATH_INFO.encode('latin-1').decode('utf-8')")


def test_a_prefix_written_with_a_slash_and_the_root(world: Any) -> None:
    """The same prefix, written with a trailing slash, moves and rolls back the same paths;
    and "/" - the last step of a migration, everything to the new service - owns every path,
    with a sub-prefix still carved out back to legacy."""
    gateway, host, backends = world
    gateway.route_to_new("/orders/")
    check_routes(host, backends, {"/orders": "new", "/orders/7": "new",
                                  "/orders-archive/2019": "legacy", "/users/1": "legacy"},
                 "after route_to_new('/orders/') - the prefix /orders, written with a "
                 "trailing slash (a prefix names a subtree: '/orders/' and '/orders' are the "
                 "same prefix, store it one way)")
    gateway.route_to_legacy("/orders/")
    check_routes(host, backends, {"/orders": "legacy", "/orders/7": "legacy"},
                 "after route_to_new('/orders/') then route_to_legacy('/orders/') (the "
                 "rollback, named as the move was)")
    gateway.route_to_new("/")
    check_routes(host, backends, {"/": "new", "/users/1": "new", "/ordersummary": "new",
                                  "/reports/2024/q1": "new", "/orders/7": "legacy"},
                 "after route_to_new('/') - the whole site moves to the new service, the "
                 "migration's last step: the root prefix '/' owns EVERY path (each path "
                 "continues it), not only '/' itself; /orders, routed to legacy by name "
                 "just before, is the longer prefix and stays there")
    gateway.route_to_legacy("/users")
    check_routes(host, backends, {"/users/1": "legacy", "/users": "legacy", "/": "new",
                                  "/reports/2024/q1": "new"},
                 "with '/' moved to new, then /users carved out back to legacy")


def test_two_gateways_keep_their_own_routes(world: Any, learner: Any) -> None:
    """Two Gateway objects in one process (two migrations side by side, a gateway per
    tenant): a route moved on one is that one's alone."""
    gateway, host, backends = world
    other = learner.load("strangler").Gateway(backends["legacy"].url, backends["new"].url)
    with serve_wsgi(other) as other_host:
        gateway.route_to_new("/orders")
        other.route_to_new("/users")
        want = {("the first", "/orders/7"): "new", ("the first", "/users/1"): "legacy",
                ("the second", "/orders/7"): "legacy", ("the second", "/users/1"): "new"}
        hosts = {"the first": host, "the second": other_host}
        got = {(name, path): served_by(hosts[name], backends, path) for name, path in want}
    wrong = [f"GET {path} through {name} went to {got[name, path]}, expected {where}"
             for (name, path), where in want.items() if got[name, path] != where]
    assert not wrong, (
        "two gateways in one process share their routes - route_to_new('/orders') on the "
        "first and route_to_new('/users') on the second: " + "; ".join(wrong) + ". The "
        "routing table is kept where every Gateway sees it (a mutable class attribute such "
        "as `routes = {}` in the class body, or a module global), so moving a route on one "
        "moves it on all: make each gateway's table in __init__ (self._routes = {})")


# Query strings as a client may send them: a key without '=', an empty value, a key twice,
# '+' and '%20' (not the same bytes), an encoded '&' inside a value, UTF-8.
QUERIES = [("/orders/7", "flag&tag=a&tag=b&empty=&tag=", "new"),
           ("/users/search", "q=caf%C3%A9%20au+lait&next=%2Forders%3Fpage%3D2&co=a%26b", "legacy")]


def test_a_query_string_arrives_byte_for_byte(world: Any) -> None:
    gateway, host, _ = world
    gateway.route_to_new("/orders")
    problems = []
    for path, query, target in QUERIES:
        reply = http_request(host, "GET", f"{path}?{query}")
        seen = reply.json() if reply.status == 200 else {}
        if reply.status != 200:
            problems.append(f"GET {path}?{query} got HTTP {reply.status} {reply.body[:100]!r}")
        elif (seen.get("service"), seen.get("query")) != (target, query):
            problems.append(f"GET {path}?{query} reached {seen.get('service')} with the "
                            f"query {seen.get('query')!r} (expected {query!r} at {target})")
    assert not problems, (
        "the query string did not reach the backend as sent: " + "; ".join(problems) + ". "
        "The gateway parsed and rebuilt it (parse_qs/parse_qsl then urlencode, or unquote "
        "then quote): that drops a key without '=' and empty values, turns %20 into '+', "
        "makes an encoded '&' a separator and reorders keys - the backend reads another "
        "query. Forward environ['QUERY_STRING'] exactly as it came, after a '?'")


# Paths as a client may send them: percent-encoded bytes (a space, UTF-8 letters, a '%'
# itself). The backend must see the path the client sent, not a request that never left or
# arrived as another path.
ENCODED_PATHS = [("/orders/caf%C3%A9%20menu", "new"), ("/users/J%C3%BCrgen/notes", "legacy"),
                 ("/users/100%25%20sure", "legacy")]


def wire(path_info: Any) -> str:
    """A path as the backend's WSGI got it (PATH_INFO: decoded, latin-1), as it was on the
    wire: percent-encoded again, so that what differs shows."""
    if not isinstance(path_info, str):
        return repr(path_info)
    try:
        return quote(path_info.encode("latin-1"), safe="/:@!$&'()*+,;=-._~")
    except UnicodeEncodeError:
        return repr(path_info)


def test_a_percent_encoded_path_arrives_as_sent(world: Any) -> None:
    """WSGI hands the gateway the DECODED path (PATH_INFO: '%20' is a space, the UTF-8 bytes
    of 'é' two latin-1 characters); the request the gateway sends must carry the path the
    client sent, encoded again byte for byte."""
    gateway, host, backends = world
    gateway.route_to_new("/orders")
    problems = []
    for path, target in ENCODED_PATHS:
        want = unquote(path, encoding="latin-1")   # PATH_INFO as the backend's WSGI reads it
        before = backends[target].hits
        reply = http_request(host, "GET", path + "?page=2")
        seen = reply.json() if reply.status == 200 else {}
        if reply.status != 200:
            problems.append(f"GET {path} got HTTP {reply.status} {reply.body[:100]!r} "
                            f"({backends[target].hits - before} request(s) reached {target})")
        elif (seen.get("service"), seen.get("path"), seen.get("query")) != (target, want,
                                                                           "page=2"):
            problems.append(
                f"GET {path}?page=2 reached {seen.get('service')} as "
                f"{wire(seen.get('path'))}?{seen.get('query')} (expected "
                f"{path}?page=2, at {target})")
    assert not problems, (
        "; ".join(problems) + ". A path arrives percent-encoded, and WSGI hands the gateway "
        "PATH_INFO DECODED, each byte as one latin-1 character: sent on as it is, a space "
        "is no URL (http.client refuses it: a 500) and 'é' cannot even be encoded. Route on "
        "PATH_INFO, but forward it encoded again, byte for byte: "
        "urllib.parse.quote(path.encode('latin-1'), safe=\"/:@!$&'()*+,;=-._~\") - "
        "quote(path) alone encodes the latin-1 characters as UTF-8 a second time (or "
        "forward the path of the raw request-target, environ['RAW_URI'], as it came)")


# Paths with an encoded slash: '%2F' is a byte of one segment, not a separator (a file
# named '2024/05', a key holding a '/'). PATH_INFO shows it as '/', so a gateway that
# encodes PATH_INFO again sends another path, with one more segment.
ENCODED_SLASHES = [("/orders/reports%2F2024", "new"), ("/users/a%2Fb/notes", "legacy"),
                   ("/orders/7/files/x%2fy%2F..%2Fz", "new")]


def segments(raw_path: str) -> list[str]:
    """A path's segments, each decoded: '%2F' stays inside its segment, and spellings that
    mean the same bytes ('%2f', '%C3%A9' or '%c3%a9') compare equal."""
    return [unquote(segment, encoding="latin-1") for segment in raw_path.split("/")]


def test_an_encoded_slash_stays_in_its_segment(world: Any) -> None:
    gateway, host, backends = world
    gateway.route_to_new("/orders")
    problems = []
    for path, target in ENCODED_SLASHES:
        reply = http_request(host, "GET", path + "?page=2")
        seen = reply.json() if reply.status == 200 else {}
        raw = str(seen.get("raw") or "").partition("?")[0]
        if reply.status != 200:
            problems.append(f"GET {path} got HTTP {reply.status} {reply.body[:100]!r}")
        elif seen.get("service") != target or segments(raw) != segments(path):
            problems.append(f"GET {path}?page=2 reached {seen.get('service')} as {raw!r} "
                            f"(expected {path!r} at {target}: segments "
                            f"{segments(path)[1:]}, saw {segments(raw)[1:]})")
    assert not problems, (
        "; ".join(problems) + ". An encoded slash (%2F) is part of its segment - one file "
        "named 'reports/2024', not a folder - and WSGI's PATH_INFO has decoded it to '/': "
        "encoded again, the path has one segment more and names another resource. Forward "
        "the path as the client sent it: the server's raw request-target is "
        "environ['RAW_URI'] (gunicorn; uWSGI: REQUEST_URI), its path up to the '?'")


def forwarded(host: str, target: str, method: str, url: str, document: Any,
              status: int) -> tuple[Any, dict[str, Any], dict[str, tuple[Any, Any]]]:
    """Send one request with a JSON body (or none) through the gateway; return the reply,
    what the backend saw, and each field it saw otherwise than sent: {field: (seen, sent)}."""
    path, _, query = url.partition("?")
    reply = http_request(host, method, url, document=document,
                         headers={"X-Request-Id": "req-123"}, content_type=CONTENT_TYPE)
    seen = reply.json() if reply.status == status else {}
    want = {"service": target, "method": method, "path": path, "query": query,
            "body": json.dumps(document) if document is not None else "",
            "request_id": "req-123"}
    if document is not None:  # without a body, wsgiref makes up a Content-Type of its own
        want["content_type"] = CONTENT_TYPE
    return reply, seen, {k: (seen.get(k), v) for k, v in want.items() if seen.get(k) != v}


def test_requests_and_answers_pass_unchanged(world: Any) -> None:
    gateway, host, backends = world
    gateway.route_to_new("/orders")
    for target, path in (("new", "/orders/7/lines"), ("legacy", "/users/9")):
        reply, seen, diff = forwarded(host, target, "POST", f"{path}?expand=items&page=2",
                                      {"sku": "book", "qty": 2}, 201)
        if reply.status == 201 and set(diff) == {"content_type"}:
            pytest.fail(
                f"POST {path} with Content-Type: {CONTENT_TYPE} reached {target} with "
                f"Content-Type {seen.get('content_type')!r}: WSGI hands the request's "
                "Content-Type over as environ['CONTENT_TYPE'] (and its length as "
                "CONTENT_LENGTH), not as an HTTP_* key - copying only the HTTP_* keys drops "
                "it, and the backend can no longer tell what the body is", pytrace=False)
        assert reply.status == 201 and not diff, (
            f"POST {path}?expand=items&page=2 through the gateway: the client got HTTP "
            f"{reply.status}, the backend saw "
            + ("; ".join(f"{k}={g!r} (sent {w!r})" for k, (g, w) in diff.items()) or "it all")
            + ": the gateway must forward method, full path (prefix kept), query string, body "
            "and headers unchanged, and relay the backend's status")
        assert reply.header("Location") == f"{path}/42", (
            f"the backend's Location header did not come back (got {reply.header('Location')!r})"
            ": relay the response headers too")
        cookies = reply.headers.get_all("Set-Cookie") or []
        assert sorted(cookies) == sorted(v for _, v in COOKIES), (
            f"the backend sent two Set-Cookie headers ({[v for _, v in COOKIES]}), the client "
            f"got {cookies}: a header may come more than once, and each must be relayed - "
            "keep the upstream's headers as a list of (name, value) pairs "
            "(reply.getheaders()), never through a dict, which keeps only the last")
    reply = http_request(host, "GET", "/orders/missing")
    assert reply.status == 404 and reply.json().get("service") == "new", (
        f"the new service answered 404 for /orders/missing and the client got HTTP "
        f"{reply.status} {reply.body[:120]!r}: an upstream 4xx is an answer to relay as is, "
        "not a gateway error (and not a reason to ask legacy instead)")
    assert backends["legacy"].hits == 1, (
        f"legacy got {backends['legacy'].hits} requests, expected 1 (the POST /users/9): a "
        "404 from the new service must not be retried on legacy")


def test_a_status_code_python_does_not_list_is_relayed(world: Any) -> None:
    world[0].route_to_new("/orders")
    for target, path in (("new", "/orders/7/overloaded"), ("legacy", "/users/9/closed")):
        sent = UNLISTED_STATUS[path.rpartition("/")[2]]
        reply = http_request(world[1], "GET", path)
        got = reply.json().get("service") if reply.status == int(sent[:3]) else None
        assert got == target, (
            f"{target} answered GET {path} with {sent} and the client got HTTP {reply.status} "
            f"{reply.body[:100]!r}: relay the upstream's status code as it is - HTTP's codes "
            "are extensible (RFC 9110 15): one http.HTTPStatus does not list (nginx's 499, "
            "Cloudflare's 520) is still the upstream's answer, not a gateway error")


# (method, path, body, upstream): a body comes with any method, not only POST, PUT, PATCH
EVERY_METHOD = [
    ("PUT", "/orders/7", {"status": "paid"}, "new"),
    ("PATCH", "/users/9?notify=no", {"email": "ann@example.com"}, "legacy"),
    ("DELETE", "/orders/7?hard=1", {"reason": "fraud"}, "new"),
    ("GET", "/users/search", {"name": "ann", "limit": 5}, "legacy"),
    ("REPORT", "/orders/7/history", {"since": "2024-01-01"}, "new"),
    ("OPTIONS", "/users/9", None, "legacy"),
    ("DELETE", "/orders/8", None, "new"),
]


def test_every_method_passes_with_its_body(world: Any) -> None:
    gateway, host, backends = world
    gateway.route_to_new("/orders")
    problems = []
    for method, url, document, target in EVERY_METHOD:
        reply, seen, diff = forwarded(host, target, method, url, document, 200)
        if reply.status != 200:
            problems.append(f"{method} {url} got HTTP {reply.status} {reply.body[:80]!r} "
                            f"(the backend answers 200)")
        elif diff:
            problems.append(f"{method} {url} reached {seen.get('service')} with "
                            + ", ".join(f"{k}={g!r} (sent {w!r})"
                                        for k, (g, w) in diff.items()))
    assert not problems, (
        "; ".join(problems) + ". The gateway forwards every request unchanged whatever its "
        "method: a body may come with DELETE, GET or an extension method (WebDAV's REPORT) "
        "as well as POST, PUT and PATCH - forward CONTENT_LENGTH bytes of wsgi.input "
        "whenever there are any, and the method as it came; the client must not notice the "
        "gateway, and the backend decides what a body means, not the gateway")


# (path, upstream, status): HEAD to both services, a 404 too. A HEAD answer has no
# content; its Content-Length, when sent, is the length a GET would have (RFC 9110 9.3.2,
# 8.6): the gateway relays the upstream's, never the length of the nothing it read.
HEAD_CASES = [("/orders/7", "new", 200), ("/users/9", "legacy", 200),
              ("/orders/missing", "new", 404)]


def test_head_keeps_the_upstreams_content_length(world: Any) -> None:
    gateway, host, backends = world
    gateway.route_to_new("/orders")
    problems = []
    for path, target, status in HEAD_CASES:
        backend = backends[target]
        before = {name: len(b.methods) for name, b in backends.items()}
        reply = http_request(host, "HEAD", path)
        seen = {name: b.methods[before[name]:] for name, b in backends.items()}
        if sum(len(m) for m in seen.values()) != 1 or seen[target] != ["HEAD"]:
            problems.append(
                f"HEAD {path} reached the backends as {seen} (expected one HEAD at "
                f"{target}): forward the method as it came - a HEAD fetched as a GET makes "
                "the backend build and send the whole representation, and answer another "
                "request than the client's")
            continue
        sent = backend.head_lengths.get(path)
        got = reply.header("Content-Length")
        if reply.status != status or got != str(sent):
            problems.append(
                f"HEAD {path} ({target}, which answered {status} with Content-Length: {sent} "
                f"and no body) came back through the gateway as HTTP {reply.status} with "
                f"Content-Length: {got}")
    assert not problems, (
        "; ".join(problems) + ". A HEAD answer carries no content, but its Content-Length "
        "is the length the GET's content would have (RFC 9110 9.3.2, 8.6): a client, a "
        "cache or a download manager reads it as the size of the resource. http.client "
        "reads no body for a HEAD, so the length of what was read is 0 - relay the "
        "upstream's Content-Length for a HEAD (or a 304) instead of computing it")


def test_requests_in_flight_at_once_each_get_their_own_answer(world: Any) -> None:
    """GET /reports/slow reaches legacy and is held there, unanswered; meanwhile POST
    /users/5 goes through the gateway to legacy too. It must reach legacy while the first
    still waits, and each client must get its own request's answer: a gateway forwards
    requests in flight at once at once, each on a connection of its own (or from a pool) -
    an http.client.HTTPConnection carries one request at a time."""
    _, host, backends = world
    legacy, release = backends["legacy"], threading.Event()
    legacy.holds["/reports/slow"] = release
    replies: dict[str, Any] = {}

    def send(method: str, path: str, document: Any = None) -> threading.Thread:
        def run() -> None:
            replies[path] = http_request(host, method, path, document=document, timeout=90)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    slow = send("GET", "/reports/slow")
    try:
        wait_until(lambda: "/reports/slow" in legacy.arrived or "/reports/slow" in replies,
                   "GET /reports/slow to reach legacy through the gateway")
        if "/reports/slow" not in legacy.arrived:  # answered by the gateway itself
            got = replies["/reports/slow"]
            pytest.fail(f"GET /reports/slow got HTTP {got.status} {got.body[:120]!r} from the "
                        "gateway and never reached legacy: forward it", pytrace=False)
        fast = send("POST", "/users/5", {"name": "ann"})
        # Must happen: the reference forwards it at once; 15 s is for a loaded machine.
        overtook = came_true(lambda: "/users/5" in legacy.arrived or "/users/5" in replies,
                             timeout=15)
        early = replies.get("/users/5")
    finally:
        release.set()
    slow.join(HOLD_LIMIT + 30)
    fast.join(HOLD_LIMIT + 30)
    if early is not None and "/users/5" not in legacy.arrived:
        pytest.fail(
            f"while GET /reports/slow was waiting for legacy's answer, POST /users/5 got HTTP "
            f"{early.status} {early.body[:120]!r} from the gateway and never reached legacy: "
            "the two requests share one upstream connection. An http.client.HTTPConnection "
            "carries one request at a time (the second gets CannotSendRequest; without that, "
            "their bytes and answers mix) - open a connection per request, or take one from a "
            "pool, never one kept on the gateway for everyone", pytrace=False)
    assert overtook, (
        "POST /users/5 did not reach legacy within 15 s while GET /reports/slow was waiting "
        f"there for its answer (it arrived only after: legacy saw {legacy.arrived}): the "
        "gateway forwards one request at a time - a lock around a shared upstream "
        "connection makes every client wait for the slowest answer. Forward each request on "
        "a connection of its own (or from a pool) so requests in flight go on at once")
    problems = []
    for method, path, body in (("GET", "/reports/slow", ""),
                               ("POST", "/users/5", json.dumps({"name": "ann"}))):
        reply = replies.get(path)
        seen = reply.json() if reply is not None and reply.status in (200, 201) else {}
        if (seen.get("method"), seen.get("path"), seen.get("body")) != (method, path, body):
            problems.append(f"{method} {path} got " + (
                f"HTTP {reply.status} {reply.body[:120]!r}" if reply is not None
                else "no answer"))
    assert not problems, (
        "; ".join(problems) + ": with two requests in flight at once, each client must get "
        "the answer to its own request - state shared between requests (one upstream "
        "connection, a reply kept on the gateway) hands one request's answer to another")


# Bodies that are bytes, not ASCII text: UTF-8 JSON with letters beyond ASCII (one of them
# outside Latin-1), and a binary upload (a PNG signature, then every byte value).
BYTE_BODIES = [
    ("PATCH", "/orders/7/notes", "new", "application/json",
     json.dumps({"customer": "J\u00fcrgen M\u00fcller", "total": "12,50 \u20ac"},
                ensure_ascii=False).encode(), "UTF-8 JSON holding '\u00fc' and '\u20ac'"),
    ("PUT", "/users/9/avatar", "legacy", "image/png",
     b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "a PNG upload (every byte value)"),
]


def test_a_body_arrives_byte_for_byte(world: Any) -> None:
    """A body is bytes: JSON in UTF-8 with letters beyond ASCII, an image upload. The
    backend must receive exactly the bytes the client sent."""
    gateway, host, _ = world
    gateway.route_to_new("/orders")
    problems = []
    for method, path, target, content_type, body, what in BYTE_BODIES:
        reply = http_request(host, method, path, body, content_type=content_type)
        seen = reply.json() if reply.status == 200 else {}
        if reply.status != 200:
            problems.append(f"{method} {path} with {what} ({len(body)} bytes) got HTTP "
                            f"{reply.status} {reply.body[:80]!r} from the gateway")
        elif (seen.get("service"), seen.get("body_sha256")) != (
                target, hashlib.sha256(body).hexdigest()):
            problems.append(f"{method} {path} with {what} ({len(body)} bytes) reached "
                            f"{seen.get('service')} as {seen.get('body_length')} other bytes")
    assert not problems, (
        "; ".join(problems) + ". A request body is bytes, to forward as read: the body was "
        "turned into text on the way - decoded (an image is not UTF-8: it fails, or its "
        "bytes become U+FFFD), or handed to http.client as a str, which encodes it as "
        "ISO-8859-1 (a UTF-8 '\u00fc' arrives as one other byte, a '\u20ac' cannot be sent "
        "at all). Pass wsgi.input.read(CONTENT_LENGTH) on as bytes, never .decode() it")


class BrokenUpstream:
    """A listening socket that, per request path, hangs up without answering
    (``/orders/hangs-up``) or answers something that is not HTTP (``/orders/not-http``,
    as when a URL names another service's port); and a port bound but not listening, where
    a connection is refused."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)
        self.refusing = socket.socket()
        self.refusing.bind(("127.0.0.1", 0))   # bound, never listening: connections refused
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def url(self, which: str) -> str:
        sock = self.server if which == "listening" else self.refusing
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                try:
                    head, _ = read_http_request(conn)
                    if b" /orders/not-http" in head.partition(b"\r\n")[0]:
                        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        self.refusing.close()


# (path, what the upstream did, the answers the gateway may give)
UPSTREAM_FAILURES = [
    ("/users/1", "legacy refused the connection (nothing listens on its port)", (502, 503)),
    ("/orders/hangs-up", "the new service closed the connection without answering",
     (502, 503)),
    ("/orders/not-http", "the new service answered with something that is not HTTP "
     "('SSH-2.0-OpenSSH_9.6': the URL names another service's port)", (502,)),
]


def answer(host: str, path: str) -> tuple[int | None, str]:
    """GET path through the gateway: (status or None, what the client got, in words)."""
    try:
        reply = http_request(host, "GET", path)
    except (OSError, http.client.HTTPException) as exc:
        why = (": the gateway let the upstream's ConnectionResetError out, and a WSGI server "
               "takes that for its own client hanging up and drops the connection"
               if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected))
               else "")
        return None, f"no answer at all ({type(exc).__name__}: {exc}{why})"
    return reply.status, f"HTTP {reply.status} {reply.body[:60]!r}"


def test_an_upstream_that_fails_is_answered_502(learner: Any) -> None:
    """Legacy refuses connections, the new service hangs up or answers garbage: each is the
    upstream's failure, answered 502 Bad Gateway (RFC 9110 15.6.3), as nginx does - not a
    500, which says the gateway itself is broken."""
    broken = BrokenUpstream()
    try:
        gateway = learner.load("strangler").Gateway(broken.url("refusing"),
                                                     broken.url("listening"))
        gateway.route_to_new("/orders")
        with serve_wsgi(gateway) as host:
            got = {path: answer(host, path) for path, _, _ in UPSTREAM_FAILURES}
    finally:
        broken.close()
    problems = [f"{what}, and GET {path} got {got[path][1]} from the gateway (expected "
                f"{' or '.join(map(str, allowed))})"
                for path, what, allowed in UPSTREAM_FAILURES
                if got[path][0] not in allowed]
    assert not problems, (
        "; ".join(problems) + ". An upstream that refuses, hangs up or does not speak HTTP "
        "has failed, not the gateway: answer 502 Bad Gateway (RFC 9110 15.6.3; 503 is what "
        "some proxies give when none can be reached) - a 500 tells the client and the "
        "on-call that the gateway itself is broken. http.client raises OSError "
        "(ConnectionRefusedError, RemoteDisconnected) or http.client.HTTPException "
        "(BadStatusLine): catch both around the forwarding")
