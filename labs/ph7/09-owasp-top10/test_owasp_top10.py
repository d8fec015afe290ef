"""Verification for ph7.9 owasp-top10.

The learner's app runs behind a real HTTP server (labrunner.testing.serve_wsgi) on the
test's own Postgres database, and is attacked with real payloads, all on loopback:

* SQL injection on GET /products?name=: tautologies, UNION exfiltration of a planted API
  key, stacked DROP TABLE; the rows returned and the database afterwards are checked;
* broken access control on /documents: another user's document read, overwritten, listed
  by a client-chosen owner_id; the rows are checked in the database;
* command injection on GET /reports/lines?file=: shell metacharacters that would create a
  canary file, option injection, path traversal; the canary must never exist;
* SSRF on POST /fetch: an internal HTTP server on 127.0.0.1 that must never receive a
  request (hit counter), reached directly under many spellings, through URL-parsing
  confusion, on a port whose text extends the allowed one, and through redirects from
  the allowed partner (also to private ranges and the cloud metadata address); an allowed
  redirect must still be followed; hosts that only begin or end with an allowed host are
  refused (400), a capitalised scheme is not.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import pytest

from labrunner.testing import HttpReply, http_request, serve_wsgi

API_KEY = "sk_live_" + secrets.token_hex(16)
BOB_SECRET = "bob salary review " + secrets.token_hex(6)
SCHEMA = f"""
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO products VALUES (1, 'widget'), (2, 'gadget'), (3, 'gizmo');
CREATE TABLE api_keys (id int PRIMARY KEY, secret text NOT NULL);
INSERT INTO api_keys VALUES (1, '{API_KEY}');
CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, token text UNIQUE NOT NULL);
INSERT INTO users VALUES (1, 'alice', 'tok-alice'), (2, 'bob', 'tok-bob');
CREATE TABLE documents (id int PRIMARY KEY, owner_id int NOT NULL REFERENCES users,
                        title text NOT NULL, body text NOT NULL);
INSERT INTO documents VALUES (10, 1, 'alice notes', 'shopping list'),
                             (20, 2, 'bob review', '{BOB_SECRET}');
"""
ALICE = {"Authorization": "Bearer tok-alice"}
# Route statuses of a Site that answer no HTTP response: the connection closed, or garbage.
DROP, GARBAGE = -1, -2


class Site:
    """An HTTP server on 127.0.0.1 with fixed routes; counts every request it gets, on
    whichever of its ports it came."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]],
                 port: int = 0) -> None:
        self.hits: list[str] = []
        self.routes = routes
        self.stop = threading.Event()  # a route of status 0 never answers until close()
        self.servers: list[ThreadingHTTPServer] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                site.hits.append(self.path)
                status, headers, body = site.routes.get(self.path.split("?")[0],
                                                        (404, {}, b"not here"))
                if status == 0:  # an upstream that accepts and never answers
                    site.stop.wait(300)
                    return
                if status == DROP:  # closes the connection with no answer at all
                    self.close_connection = True
                    return
                if status == GARBAGE:  # answers with bytes that are not HTTP
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

        self.handler = Handler
        self.port = self.listen(port)

    def listen(self, port: int) -> int:
        """Serve on one more port (0: any free one); OSError when it is taken."""
        server = ThreadingHTTPServer(("127.0.0.1", port), self.handler)
        server.daemon_threads = True
        self.servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return server.server_port

    def close(self) -> None:
        self.stop.set()
        for server in self.servers:
            server.shutdown()
            server.server_close()


def partner_and_extended_port(internal: Site) -> tuple[Site, int]:
    """The partner on a port P, and the internal site also on a port whose decimal text
    begins with P's (P 4321, the internal site on 43210 too): the allowed origin
    http://127.0.0.1:4321 is then a string prefix of http://127.0.0.1:43210/admin."""
    for _ in range(200):
        extended = internal.listen(0)
        if extended // 10 < 1024:
            continue
        try:
            return Site({}, port=extended // 10), extended
        except OSError:
            continue  # that low port is someone else's: the extra listener stays internal
    pytest.fail("could not find a free port P with a free port P*10+d beside it (200 tries)")


@dataclass
class Target:
    host: str
    db: Any
    reports: Path
    partner: Site
    internal: Site
    extended_port: int  # the internal site's port whose text extends the partner's
    canary_dir: Path


NAMED_PARTNER = "https://partner.example.com"  # allowed, never fetched: no DNS needed


def allowed_origins(partner_port: int) -> list[str]:
    return [f"http://127.0.0.1:{partner_port}", NAMED_PARTNER]


@pytest.fixture
def target(learner: Any, postgres: Any) -> Iterator[Target]:
    with postgres.connect(autocommit=True) as conn:
        conn.execute(SCHEMA)
    shared = learner.tmp_folder()          # removed after the test, with all below
    reports = shared / "reports"
    reports.mkdir()
    os.chmod(reports, 0o755)
    (reports / "q1.txt").write_text("a\nb\nc\n")
    (shared / "outside.txt").write_text("x\n" * 7)
    canaries = learner.tmp_folder(learner_writes=True)  # where an injected `touch` could write
    internal = Site({"/admin": (200, {}, b"internal admin: delete everything"),
                     "/latest/meta-data/": (200, {}, b"iam credentials")})
    partner, extended_port = partner_and_extended_port(internal)
    partner.routes.update({
        "/ok": (200, {}, b"hello from the partner"),
        "/to-ok": (302, {"Location": "/ok"}, b""),
        "/to-internal": (302, {"Location": f"http://127.0.0.1:{internal.port}/admin"}, b""),
        # two hops: the first stays on the partner, the second leaves for the internal server
        "/to-to-internal": (302, {"Location": "/to-internal"}, b""),
        "/to-extended": (302, {"Location": f"http://127.0.0.1:{extended_port}/admin"}, b""),
        "/to-localhost": (307, {"Location": f"http://localhost:{internal.port}/admin"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-private": (301, {"Location": "http://10.0.0.7/"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-bad-port": (302, {"Location": "http://127.0.0.1:99999/admin"}, b""),
        # network-path references: no scheme, but a host - relative, yet another origin
        "/to-internal-netpath": (302, {"Location": f"//127.0.0.1:{internal.port}/admin"}, b""),
        "/to-metadata-netpath": (303, {"Location": "//169.254.169.254/latest/meta-data/"},
                                 b""),
        # a chain of 4 redirects, all within the partner: one more than the 3 allowed
        "/r4": (302, {"Location": "/r3"}, b""),
        "/r3": (302, {"Location": "/r2"}, b""),
        "/r2": (302, {"Location": "/r1"}, b""),
        "/r1": (302, {"Location": "/ok"}, b""),
        "/hang": (0, {}, b""),  # accepts the request and never answers
        "/to-hang": (302, {"Location": "/hang"}, b""),  # a redirect hop that never answers
        "/drop": (DROP, {}, b""),
        "/garbage": (GARBAGE, {}, b"SSH-2.0-OpenSSH_9.6\r\n"),
        "/to-drop": (302, {"Location": "/drop"}, b""),
        # an honest page in Latin-1 (no charset declared): 'caf\xe9 cr\xe8me' is not UTF-8
        "/latin1": (200, {"Content-Type": "text/plain"}, "café crème".encode("latin-1")),
    })
    make_app = learner.function("secure_app", "make_app")
    try:
        with serve_wsgi(make_app(postgres.dsn, str(reports),
                                 allowed_origins(partner.port))) as host:
            yield Target(host, postgres, reports, partner, internal, extended_port, canaries)
    finally:
        partner.close()
        internal.close()


def call(t: Target, method: str, path: str, headers: dict[str, str] | None = None,
         document: Any = None) -> HttpReply:
    return http_request(t.host, method, path, headers=headers, document=document, timeout=20)


def body_json(reply: HttpReply) -> Any:
    try:
        return json.loads(reply.body)
    except ValueError:
        return None


# ---- A03 SQL injection ------------------------------------------------------------------

SQLI = [
    ("' OR '1'='1", "a tautology that makes WHERE true for every row"),
    ("x' OR 1=1 --", "a tautology with the rest of the query commented out"),
    ("' UNION SELECT id, secret FROM api_keys --", "UNION exfiltration of the api_keys table"),
    ("x'; DROP TABLE products; --", "a stacked DROP TABLE"),
    ("widget' --", "a comment that cuts the query"),
    ("%", "a LIKE wildcard that matches every name"),
    ("_idget", "a LIKE one-character wildcard"),
]
LIKE_WILDCARDS = {"%", "_idget"}


def test_sql_injection(target: Target) -> None:
    reply = call(target, "GET", "/products?name=widget")
    assert reply.status == 200 and body_json(reply) == [{"id": 1, "name": "widget"}], (
        f"GET /products?name=widget: expected [{{'id': 1, 'name': 'widget'}}], saw "
        f"{reply.status} {reply.body[:150]!r}")
    for payload, what in SQLI:
        reply = call(target, "GET", f"/products?name={quote(payload)}")
        rows = body_json(reply)
        leaked = API_KEY in reply.body.decode(errors="replace")
        assert not leaked and reply.status < 500 and rows in ([], None), (
            f"SQL injection ({what}): name={payload!r} was answered {reply.status} with "
            f"{reply.body[:200]!r}, expected 200 and no rows (no product has that name)\n"
            + ("The query compares with LIKE: in a LIKE pattern % and _ are wildcards, so the "
               "client still chooses what matches (name=% lists every product). An exact-"
               "name search is WHERE name = %s; if you do want LIKE, escape % _ and \\ in "
               "the value first." if payload in LIKE_WILDCARDS else
               "The value was spliced into the SQL text and ran as SQL. Pass it as a query "
               "parameter: conn.execute('... WHERE name = %s', (name,)); never build SQL "
               "with f-strings, % or +, and escaping by hand is not a fix."))
    with target.db.connect() as conn:
        left = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'products'"
                            ).fetchone()[0]
    assert left == 1, "the stacked query dropped the products table: the payload ran as SQL"


# ---- A01 broken access control ----------------------------------------------------------

# PUTs of alice's own document whose body names bob's: (path, JSON sent, what it tries)
SMUGGLED_WRITES = [
    ("/documents/10", {"id": 20, "body": "pwned"},
     "an \"id\" in the body chose which row was written"),
    ("/documents/10", {"id": "20", "body": "pwned"},
     "an \"id\" in the body (as text) chose which row was written"),
    ("/documents/10", {"body": "mine now", "owner_id": 2},
     "an \"owner_id\" in the body was written (mass assignment)"),
]


def test_broken_access_control(target: Target) -> None:
    own = call(target, "GET", "/documents/10", headers=ALICE)
    assert own.status == 200 and (body_json(own) or {}).get("title") == "alice notes", (
        f"alice reading her own document 10: expected 200 with it, saw {own.status} "
        f"{own.body[:120]!r}")
    anon = call(target, "GET", "/documents/10")
    assert anon.status == 401, f"no token: expected 401, saw {anon.status}"
    other = call(target, "GET", "/documents/20", headers=ALICE)
    assert other.status in (403, 404) and BOB_SECRET not in other.body.decode(errors="replace"), (
        f"alice (authenticated) asked for bob's document 20 and got {other.status} "
        f"{other.body[:150]!r}, expected 403 or 404\nAuthentication says who the caller is; "
        "authorisation must still check that THIS caller may see THIS object (IDOR): look "
        "the document up with the owner in the WHERE clause.")
    write = call(target, "PUT", "/documents/20", headers=ALICE, document={"body": "pwned"})
    with target.db.connect() as conn:
        body = conn.execute("SELECT body FROM documents WHERE id = 20").fetchone()[0]
    assert write.status in (403, 404) and body == BOB_SECRET, (
        f"alice PUT bob's document 20: answered {write.status}, and the row now reads "
        f"{body!r}, expected 403/404 and the row untouched\nCheck ownership before every "
        "write, in the UPDATE's WHERE clause too.")
    # The write's target and owner come from the URL and the token, never from the body
    # (mass assignment): alice PUTs her own document with fields that name bob's.
    for path, document, smuggled in SMUGGLED_WRITES:
        answer = call(target, "PUT", path, headers=ALICE, document=document)
        with target.db.connect() as conn:
            rows = {r[0]: r[1:] for r in conn.execute(
                "SELECT id, owner_id, body FROM documents ORDER BY id")}
        assert rows.get(20) == (2, BOB_SECRET) and rows.get(10, (1,))[0] == 1, (
            f"alice PUT {path} (her own document) with {document}: answered "
            f"{answer.status}, and afterwards the documents are {rows} - {smuggled}; expected "
            "bob's document 20 untouched and document 10 still alice's\nAuthorise the object "
            "you actually write: take its id from the URL you checked and the owner from the "
            "token, put both in the UPDATE's WHERE, and copy only the fields a client may "
            "change (body) from what it sent.")
    listing = call(target, "GET", "/documents?owner_id=2", headers=ALICE)
    ids = [d.get("id") for d in body_json(listing) or [] if isinstance(d, dict)]
    assert listing.status == 200 and ids == [10], (
        f"alice listing /documents?owner_id=2 got ids {ids} ({listing.status}), expected "
        "only her own [10]\nWhose data to read comes from the authenticated identity, never "
        "from a parameter the client can change.")


# ---- A03 command injection --------------------------------------------------------------

def test_command_injection(target: Target) -> None:
    ok = call(target, "GET", "/reports/lines?file=q1.txt")
    assert ok.status == 200 and (body_json(ok) or {}).get("lines") == 3, (
        f"GET /reports/lines?file=q1.txt: expected 200 with lines 3, saw {ok.status} "
        f"{ok.body[:120]!r}")
    canary_dir = target.canary_dir
    payloads = []
    for n, template in enumerate(["q1.txt; touch {c}", "q1.txt && touch {c}", "$(touch {c})",
                                  "`touch {c}`", "q1.txt | touch {c}", "q1.txt\ntouch {c}"]):
        canary = canary_dir / f"pwned-{os.getpid()}-{n}-{secrets.token_hex(4)}"
        payloads.append((template.format(c=canary), canary))
    for payload, canary in payloads:
        reply = call(target, "GET", f"/reports/lines?file={quote(payload)}")
        assert not canary.exists(), (
            f"command injection: file={payload!r} made the server run `touch` (the canary "
            f"{canary.name} now exists)\nNever hand client input to a shell (shell=True, "
            "os.system, popen of a string): run the program with an argument list, "
            "subprocess.run(['wc', '-l', '--', name]), and validate the name first.")
        assert reply.status in (400, 404), (
            f"file={payload!r} was answered {reply.status}, expected 400 (not a valid file "
            "name) or 404")
    outside = target.reports.parent / "outside.txt"
    for payload, what in (("--version", "an option instead of a file name"),
                          ("../outside.txt",
                           "a path outside the reports folder"),
                          (str(outside), "an absolute path to a file outside the folder"),
                          ("/etc/passwd", "an absolute path to a system file")):
        reply = call(target, "GET", f"/reports/lines?file={quote(payload)}")
        text = reply.body.decode(errors="replace")
        assert reply.status in (400, 404) and "coreutils" not in text, (
            f"file={payload!r} ({what}) was answered {reply.status} {text[:150]!r}, "
            "expected 400 or 404\n"
            + ("A name starting with '-' is read as an option by the program: put '--' "
               "before it, or refuse names that start with '-'." if payload.startswith("-")
               else "An absolute path is not a name in the folder: refusing '..' and a "
                    "leading '-' (a denylist) lets '/anything' through, and "
                    "os.path.join(folder, '/abs') IS '/abs'. Allow only plain file names "
                    "(letters, digits, _ . -: no '/' at all)." if payload.startswith("/")
               else "Allow only plain file names (letters, digits, _ . -, no '/' or '..'): "
                    "path traversal reads files outside the folder."))


# ---- A10 SSRF ---------------------------------------------------------------------------

# The README's bound on waiting for an upstream, and how long the test waits for the answer:
# the bound plus 10 s of room for a loaded machine (a correct app answers after about its
# own timeout, the reference after 5 s). Past that the app is still waiting on the silent
# upstream: the test says so then, not at the runner's timeout.
UPSTREAM_BOUND = 10
ANSWER_WITHIN = UPSTREAM_BOUND + 10

def origin_of(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # ':99999', ':abc' - no port at all, and no origin to allow
        return (parts.scheme, parts.hostname, -1)
    return (parts.scheme, parts.hostname, port or {"http": 80, "https": 443}.get(parts.scheme))


def string_lookalike(url: str, allowed: list[str]) -> str:
    """Why a comparison of TEXT (not of parsed origins) would take ``url``, whose origin is
    not allowed, for an allowed one; "" when it would not."""
    parts = urlsplit(url)
    if origin_of(url) in {origin_of(o) for o in allowed}:
        return ""
    for origin in allowed:
        host = urlsplit(origin).hostname or ""
        if url.lower().startswith(origin.lower()):
            return (f" - the URL's text begins with the allowed origin {origin!r}, but its "
                    f"host and port are {parts.netloc!r}: a string prefix (startswith) is "
                    "not an origin; the port and the host may go on after it")
        if parts.hostname and parts.hostname != host and (
                parts.hostname.endswith(host) or parts.hostname.startswith(host)):
            return (f" - its host {parts.hostname!r} merely begins or ends with the allowed "
                    f"host {host!r}: anyone can register such a name and point it at "
                    "127.0.0.1 or 169.254.169.254")
    return ""


def partner_redirect_why(url: str, routes: dict[str, tuple[int, dict[str, str], bytes]],
                         allowed: list[str]) -> str:
    """Why the partner route ``url`` led the app off the allowlist: the redirect it sends,
    or, when that stays on the partner, the next one (a chain whose 2nd hop leaves)."""
    aimed = routes[urlsplit(url).path][1]["Location"]
    resolved = urljoin(url, aimed)
    if origin_of(resolved) in {origin_of(o) for o in allowed}:
        onward = routes[urlsplit(resolved).path][1]["Location"]
        return (f" - the partner redirected to its own {aimed!r} (allowed, rightly followed), "
                f"which redirected on to {onward!r}: that second hop was not validated. Only "
                "the first redirect was checked: after it the fetch went on with a client "
                "that follows redirects by itself, or the check stopped. Validate the origin "
                "of EVERY hop, the 2nd and 3rd like the 1st")
    return string_lookalike(aimed, allowed) or (
        f" - the partner redirected to {aimed!r}, a Location without a scheme that "
        "still names a host (a network-path reference): resolved against the "
        f"partner's URL it is {resolved!r}, another origin. 'Relative' "
        "does not mean same-origin: validate the origin of every hop AFTER resolving "
        "it (urljoin), whatever the Location looks like" if aimed.startswith("//") else
        f" - the partner redirected to {aimed!r}, and that hop was not validated")


def test_ssrf(target: Target) -> None:
    p, q = target.partner.port, target.internal.port
    good = call(target, "POST", "/fetch", document={"url": f"http://127.0.0.1:{p}/ok"})
    assert good.status == 200 and "hello from the partner" in good.body.decode(errors="replace"), (
        f"fetching the allowed partner http://127.0.0.1:{p}/ok: expected 200 with its body, "
        f"saw {good.status} {good.body[:150]!r}")
    hop = call(target, "POST", "/fetch", document={"url": f"http://127.0.0.1:{p}/to-ok"})
    assert hop.status == 200 and "hello from the partner" in hop.body.decode(errors="replace"), (
        f"the partner redirected to its own /ok: expected 200 with its body, saw "
        f"{hop.status} {hop.body[:150]!r}: follow redirects that stay allowed (validate each "
        "hop), do not refuse all of them")
    allowed = allowed_origins(p)
    named = urlsplit(NAMED_PARTNER).hostname
    attacks = [
        (f"http://127.0.0.1:{q}/admin", "the internal server directly"),
        (f"http://127.0.0.1:{target.extended_port}/admin",
         f"the internal server on port {target.extended_port}, whose digits begin with the "
         f"allowed port {p}"),
        (f"https://{named}.attacker.invalid/", "a host that begins with an allowed host"),
        (f"https://evil-{named}/", "a host that ends with an allowed host"),
        (f"https://{named}@127.0.0.1:{q}/admin",
         "an allowed origin as userinfo: the real host is after the @"),
        (f"http://localhost:{q}/admin", "the internal server by name"),
        (f"http://2130706433:{q}/admin", "127.0.0.1 as a decimal integer"),
        (f"http://0x7f000001:{q}/admin", "127.0.0.1 in hex"),
        (f"http://127.1:{q}/admin", "127.0.0.1 shortened"),
        (f"http://0.0.0.0:{q}/admin", "0.0.0.0, which Linux routes to this host"),
        (f"http://[::ffff:127.0.0.1]:{q}/admin", "127.0.0.1 as an IPv4-mapped IPv6 address"),
        (f"http://127.0.0.1:{p}@127.0.0.1:{q}/admin",
         "the partner's origin as userinfo: the real host is after the @"),
        (f"http://127.0.0.1:{p}/to-internal", "a partner redirect (302) to the internal server"),
        (f"http://127.0.0.1:{p}/to-to-internal",
         "a partner redirect to its own /to-internal, whose redirect is to the internal server"),
        (f"http://127.0.0.1:{p}/to-extended",
         "a partner redirect to a port whose digits begin with the partner's"),
        (f"http://127.0.0.1:{p}/to-localhost", "a partner redirect (307) to localhost"),
        (f"http://127.0.0.1:{p}/to-metadata", "a partner redirect to the cloud metadata address"),
        (f"http://127.0.0.1:{p}/to-private", "a partner redirect to a private range (10/8)"),
        (f"http://127.0.0.1:{p}/to-file", "a partner redirect to file:///etc/passwd"),
        (f"http://127.0.0.1:{p}/to-internal-netpath",
         "a partner redirect to //127.0.0.1:<internal port>/admin (no scheme, another host)"),
        (f"http://127.0.0.1:{p}/to-metadata-netpath",
         "a partner redirect to //169.254.169.254/ (no scheme, the metadata address)"),
        ("http://169.254.169.254/latest/meta-data/", "the cloud metadata address"),
        ("http://10.0.0.7/", "a private range (10/8)"),
        ("file:///etc/passwd", "a file: URL"),
        ("gopher://127.0.0.1:6379/_INFO", "a gopher: URL to a local Redis"),
        # urlsplit(url).port raises ValueError for these: a 500 is no refusal
        ("http://127.0.0.1:99999/admin", "a port past 65535"),
        (f"http://127.0.0.1:{p}x/ok", "a port with a letter after the allowed port's digits"),
        (f"http://127.0.0.1:{p}/to-bad-port", "a partner redirect to port 99999"),
    ]
    for url, what in attacks:
        before = len(target.internal.hits)
        reply = call(target, "POST", "/fetch", document={"url": url})
        text = reply.body.decode(errors="replace")
        reached = target.internal.hits[before:]
        if origin_of(url) == origin_of(allowed[0]):  # a partner route that redirects
            why = partner_redirect_why(url, target.partner.routes, allowed)
        else:
            parts = urlsplit(url)
            port = origin_of(url)[2]
            same_host = (parts.hostname == "127.0.0.1" and port not in (p, -1)
                         and parts.username is None)
            why = string_lookalike(url, allowed) or (
                f" - same scheme and host as the allowed origin, another PORT: an origin is "
                f"scheme, host AND port, and port {port} is not {p}" if same_host else
                f" - {parts.netloc!r} holds no valid port (0-65535, digits only), so the URL "
                "names no origin at all: urlsplit(url).port raises ValueError for it - refuse "
                "it (400), do not let the error become a 500" if port == -1 else "")
        assert not reached, (
            f"SSRF ({what}): fetching {url!r} made the server request {reached} from the "
            f"internal server on 127.0.0.1, an origin not on the allowlist {allowed}{why}"
            "\nAllow only listed origins, comparing scheme, host and port after parsing (a "
            "string check is fooled by 'allowed@evil', 'allowed.evil' or 'allowed:port' + a "
            "digit), refuse credentials in URLs, and do not let the HTTP client follow "
            "redirects: follow them yourself and validate every hop.")
        assert reply.status == 400 and "root:" not in text and "iam credentials" not in text, (
            f"SSRF ({what}): fetching {url!r} was answered {reply.status} {text[:150]!r}, "
            f"expected 400 (refused before connecting){why}\nAnything whose parsed origin "
            "(scheme, host, port) is not on the allowlist is refused up front: an attempt to "
            "connect (502, a timeout) already lets an attacker scan the internal network.")
    upper = f"HTTP://127.0.0.1:{p}/ok"
    reply = call(target, "POST", "/fetch", document={"url": upper})
    assert reply.status == 200 and b"hello from the partner" in reply.body, (
        f"fetching {upper!r}, the allowed origin http://127.0.0.1:{p} with its scheme in "
        f"capitals, was answered {reply.status} {reply.body[:150]!r}, expected 200 with the "
        "partner's body\nSchemes and host names are case-insensitive: compare the parsed, "
        "lower-cased origin (urlsplit lower-cases the scheme; use .hostname, not .netloc), "
        "not the URL's text.")
    before = len(target.partner.hits)
    chain = call(target, "POST", "/fetch", document={"url": f"http://127.0.0.1:{p}/r4"})
    followed = target.partner.hits[before:]
    assert chain.status == 400 and "/ok" not in followed, (
        f"a chain of 4 redirects (/r4 -> /r3 -> /r2 -> /r1 -> /ok) was answered "
        f"{chain.status} {chain.body[:100]!r}; the partner was asked {followed}: at most 3 "
        "redirects may be followed, so /r1's redirect (the 4th) must be refused (400) and "
        "/ok never requested - count the hops: the first request plus 3 redirects is 4 "
        "requests in all, an off-by-one follows one more (and a loop runs away)")


# Fetches of an allowed upstream that accepts the request and never answers: each must end
# in a 502/504 after the app's own timeout. Every outgoing request needs it, the first and
# each redirect hop alike (one connection made without it holds a worker as long as the
# upstream likes).
SILENT_UPSTREAMS = [
    ("/hang", "the partner accepts the request and never answers"),
    ("/to-hang", "the partner redirects (302) to its own /hang, which accepts the request "
                 "and never answers: the redirect hop's request needs the timeout too"),
]


def test_fetch_gives_up_on_an_upstream_that_never_answers(target: Target) -> None:
    """The allowed partner accepts the request and never answers, asked directly or through
    a redirect: each fetch must end (502/504) after the app's own timeout, not hold the
    server's worker forever. Both are sent at once, each on a thread of the test's, and the
    test waits ANSWER_WITHIN for them: an app without a timeout is seen then."""
    p = target.partner.port
    replies: dict[str, HttpReply | None] = {}
    took: dict[str, float] = {}
    started = time.monotonic()

    def fetch(path: str) -> None:
        try:
            replies[path] = http_request(target.host, "POST", "/fetch",
                                         document={"url": f"http://127.0.0.1:{p}{path}"},
                                         timeout=ANSWER_WITHIN)
        except OSError:  # the socket timeout: no answer at all
            replies[path] = None
        took[path] = time.monotonic() - started

    threads = [threading.Thread(target=fetch, args=(path,), daemon=True)
               for path, _ in SILENT_UPSTREAMS]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:  # each client gives up by itself after ANSWER_WITHIN
            thread.join(max(0.0, started + ANSWER_WITHIN + 5 - time.monotonic()))
    finally:
        target.partner.stop.set()  # let the held requests go: nothing else waits on them
    waited = time.monotonic() - started
    for path, what in SILENT_UPSTREAMS:
        url = f"http://127.0.0.1:{p}{path}"
        reply = replies.get(path)
        after = took.get(path, waited)
        asked = "/hang" in target.partner.hits
        if reply is not None:
            seen = (f"was answered {reply.status} {reply.body[:150]!r} after {after:.0f} s, "
                    "expected 502 or 504 (the upstream failed)")
            if reply.status == 500:
                seen += (": the timeout fired, but its exception (TimeoutError, an OSError) "
                         "was not turned into a 502/504")
        else:
            seen = (f"had not been answered after {after:.0f} s"
                    f"{'' if asked else ' (did the app ask it? the partner saw no /hang)'}, "
                    f"expected 502 or 504 within about {UPSTREAM_BOUND} s: the app is still "
                    "waiting on an upstream that will never answer - no timeout on that "
                    "request, or one far too long")
        assert reply is not None and reply.status in (502, 504), (
            f"POST /fetch of {url!r} ({what}) {seen}"
            f"\nEvery outgoing request needs a timeout of at most {UPSTREAM_BOUND} s "
            "(http.client.HTTPConnection(host, port, timeout=5)), each redirect hop's too: "
            "without one (the default is none) or with a long one, each slow or silent "
            "upstream holds one of the server's workers, and a few such fetches take the "
            "whole server down.")


# Allowed upstreams that fail without a timeout: the fetch is still a 502 (or 504), never the
# server's own 500. (path, what the partner does)
FAILING_UPSTREAMS = [
    ("/drop", "the partner closes the connection without answering"),
    ("/to-drop", "the partner redirects (302) to its own /drop, which closes the connection "
                 "without answering"),
    ("/garbage", "the partner answers with bytes that are not HTTP (an SSH banner)"),
]


def test_fetch_survives_what_an_allowed_upstream_sends(target: Target) -> None:
    """An allowed partner is still someone else's server: it may close the connection, send
    something that is not HTTP, or a page that is not UTF-8. A gateway answers for a
    failed upstream with 502/504 (RFC 9110 15.6.3) - not with its own 500 - and hands back
    an honest page's bytes, whatever their encoding."""
    p = target.partner.port
    for path, what in FAILING_UPSTREAMS:
        url = f"http://127.0.0.1:{p}{path}"
        try:
            reply = call(target, "POST", "/fetch", document={"url": url})
            seen = f"was answered {reply.status} {reply.body[:150]!r}"
        except OSError as exc:  # the app's server dropped the connection: an escaped error
            reply, seen = None, f"got no answer at all ({type(exc).__name__}: {exc})"
        assert reply is not None and reply.status in (502, 504), (
            f"POST /fetch of {url!r} ({what}) {seen}, expected 502 or 504: the upstream's "
            "error escaped the app. An upstream that failed is a bad "
            "gateway, not a crash of this server. Catch every failure of the outgoing "
            "request, not only the timeout: OSError (refused, reset, closed: "
            "RemoteDisconnected) and http.client.HTTPException (BadStatusLine for a reply "
            "that is not HTTP).")
    url = f"http://127.0.0.1:{p}/latin1"
    reply = call(target, "POST", "/fetch", document={"url": url})
    answer = body_json(reply) if reply.status == 200 else None
    text = answer.get("body") if isinstance(answer, dict) else None
    assert isinstance(text, str) and text.startswith("caf") and "me" in text, (
        f"POST /fetch of {url!r} (an honest partner page in Latin-1, b'caf\\xe9 "
        f"cr\\xe8me', no charset declared) was answered {reply.status} "
        f"{reply.body[:150]!r}, expected 200 with the page as text in \"body\": the "
        "partner's bytes are not UTF-8, and decoding them strictly crashes the fetch of a "
        "page that is fine. Decode what an upstream sends leniently: "
        "data.decode('utf-8', 'replace') (or latin-1), whatever a charset claims.")
