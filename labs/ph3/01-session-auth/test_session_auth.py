"""Verification for ph3.1: the learner's WSGI app served on a loopback port
(labrunner.testing.serve_wsgi) and spoken to over real HTTP, with the sessions read
straight from the test's own Redis database.

The attacks are real requests: a session id obtained before login and planted in the
victim's browser (fixation), an id the server never issued, a cross-site POST without a
CSRF token, with a wrong one, and with another user's valid one, a replayed session id
after logout."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from math import log2
from string import ascii_letters, digits, hexdigits
from typing import Any

import pytest

from labrunner.testing import HttpReply, http_request, serve_wsgi

# Passwords are whatever people type: jürgen's is not ASCII (and not Latin-1 either: €).
USERS = {"alice": "wonderland-42", "bob": "builder-7", "jürgen": "Straße-€42"}
EVIL = "https://evil.example"
TTL = 1800


@dataclass
class Browser:
    """A real HTTP client with a one-cookie jar, like a browser tab."""

    host: str
    sid: str | None = None
    cookies: list[str] = field(default_factory=list)

    def call(self, method: str, path: str, document: Any = None,
             csrf: str | bytes | None = None, origin: str | None = None) -> HttpReply:
        headers: dict[str, str | bytes] = {}
        if self.sid is not None:
            headers["Cookie"] = f"sid={self.sid}"
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        if origin is not None:
            headers["Origin"] = origin
        body = b"" if method == "POST" and document is None else None
        # a bytes value (a non-ASCII CSRF token in UTF-8) goes out as it is: http.client
        # sends bytes header values, but http_request types its headers as str only
        reply = http_request(self.host, method, path, body,
                             headers, document=document, timeout=10)  # type: ignore[arg-type]
        for raw in reply.headers.get_all("Set-Cookie") or []:
            self.cookies.append(raw)
            jar = SimpleCookie()
            jar.load(raw)
            if "sid" in jar:
                morsel = jar["sid"]
                gone = morsel["max-age"] in ("0", "-1") or not morsel.value
                self.sid = None if gone else morsel.value
        return reply

    def csrf_from(self, reply: HttpReply, what: str) -> str:
        data = reply.json()
        token = data.get("csrf") if isinstance(data, dict) else None
        assert isinstance(token, str) and token, (
            f"{what} answered {data!r}, expected a JSON object with the session's csrf token")
        return token


@dataclass
class Site:
    host: str
    redis: Any

    def browser(self) -> Browser:
        return Browser(self.host)

    def session(self, sid: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(f"session:{sid}").items()}

    def login(self, browser: Browser, user: str = "alice") -> str:
        reply = browser.call("POST", "/login", {"username": user, "password": USERS[user]})
        assert reply.status == 200, (
            f"POST /login with {user}'s right password answered {reply.status} "
            f"{reply.body[:150]!r}, expected 200 with the user and a CSRF token")
        return browser.csrf_from(reply, "POST /login")


@pytest.fixture
def site(learner: Any, redis_db: Any) -> Iterator[Site]:
    module = learner.load("app")
    try:
        app = module.make_app(redis_db.url, dict(USERS))
    except NotImplementedError as exc:
        pytest.fail(f"make_app() is not implemented yet: {exc}", pytrace=False)
    client = redis_db.client()
    try:
        with serve_wsgi(app) as host:
            yield Site(host, client)
    finally:
        client.close()


def check_cookie(browser: Browser, what: str, site: Site) -> None:
    raw = browser.cookies[-1] if browser.cookies else None
    assert raw is not None and browser.sid, (
        f"{what} set no sid cookie (Set-Cookie: {raw!r}): the browser holds its session "
        "id in a cookie named sid")
    attrs = {part.strip().split("=", 1)[0].lower(): part.strip().partition("=")[2]
             for part in raw.split(";")[1:]}
    missing = [why for name, why in (
        ("httponly", "HttpOnly (page scripts, and so an XSS, could read the id)"),
        ("secure", "Secure (the id would travel over plain HTTP)"),
        ("samesite", "SameSite (other sites' requests would carry it)"))
        if name not in attrs]
    assert not missing, (f"{what} set the session cookie without {'; '.join(missing)}: "
                         "every session cookie needs HttpOnly, Secure and SameSite=Lax or "
                         f"Strict\nSet-Cookie: {raw}")
    assert attrs["samesite"].lower() in ("lax", "strict"), (
        f"{what} set SameSite={attrs['samesite']}: with None, a form on another site posts "
        "with the user's cookie; use Lax or Strict")
    assert len(browser.sid) >= 22, (
        f"the session id {browser.sid!r} is too short to be unguessable: at least 128 "
        "random bits (secrets.token_urlsafe(32))")
    ttl = site.redis.ttl(f"session:{browser.sid}")
    assert 0 < ttl <= TTL, (
        f"after {what} Redis session:{browser.sid[:8]}... has a TTL of {ttl}, expected "
        f"1..{TTL} s: " + ("the key does not exist: store the session as session:<id>"
                           if ttl == -2 else "a session that never expires lives forever "
                           "in Redis and in a stolen cookie; EXPIRE it"))
    expect_full_ttl(site, browser.sid, f"after {what}")


TTL_SLACK = 60  # seconds a slow machine may take between the write and this reading


def expect_full_ttl(site: Site, sid: str, when: str) -> None:
    """A session just written or used has (about) SESSION_TTL seconds to live, measured in
    Redis: an expiry set in another unit (PEXPIRE takes milliseconds) ends it in seconds."""
    pttl = site.redis.pttl(f"session:{sid}")
    if pttl < 0:
        return  # no key or no expiry: check_cookie names those
    assert (TTL - TTL_SLACK) * 1000 <= pttl <= TTL * 1000, (
        f"{when} Redis session:{sid[:8]}... expires in {pttl / 1000:.3f} s, expected about "
        f"{TTL} s (SESSION_TTL): the expiry was set in another unit - EXPIRE takes "
        "seconds, PEXPIRE milliseconds - so the user is logged out "
        f"{'seconds' if pttl < 60_000 else 'minutes'} after a request")


def test_login_gives_a_hardened_session_cookie(site: Site) -> None:
    tab = site.browser()
    first = tab.call("GET", "/login")
    assert first.status == 200, (
        f"GET /login answered {first.status} {first.body[:120]!r}, expected 200 with an "
        "anonymous session (cookie) and its CSRF token")
    tab.csrf_from(first, "GET /login")
    check_cookie(tab, "GET /login", site)
    site.login(tab)
    check_cookie(tab, "POST /login", site)
    me = tab.call("GET", "/me")
    assert me.status == 200 and me.json() == {"user": "alice"}, (
        f"GET /me after alice logged in answered {me.status} {me.body[:120]!r}, expected "
        "200 {\"user\": \"alice\"}")
    assert tab.sid is not None
    expect_full_ttl(site, tab.sid, "after GET /me (a request that reads the session)")
    other = site.browser()
    site.login(other, "bob")
    assert other.sid != tab.sid and other.call("GET", "/me").json() == {"user": "bob"}, (
        "bob's login did not get a session of its own")


# Ids issued per route for the unpredictability check: enough that a random character
# position shows many values (a hex position 5 or more of 16 in 40 draws, all but certain),
# while a uuid1's node and clock sequence, a counter's or a timestamp's high digits stay put.
SAMPLES = 40
MIN_BITS = 120  # 128 asked; a uuid4 (122 random bits from os.urandom) is let through


def estimated_random_bits(ids: list[str]) -> tuple[float, list[int]]:
    """An upper estimate of the random bits in ids from one generator: per character
    position, 0 when every id has the same character there, log2(values seen) when few
    values show up (a slowly ticking clock digit), the alphabet's full bits otherwise."""
    chars = set("".join(ids))
    size = (10 if chars <= set(digits) else 16 if chars <= set(hexdigits) else
            64 if chars <= set(ascii_letters + digits + "-_+/=") else len(chars))
    bits, fixed = 0.0, []
    for pos in range(max(map(len, ids))):
        seen = {sid[pos] for sid in ids if pos < len(sid)}
        if len(seen) == 1:
            fixed.append(pos)
        bits += log2(len(seen)) if len(seen) <= 4 else log2(size)
    return bits, fixed


def test_session_ids_are_unpredictable(site: Site) -> None:
    for route in ("GET /login", "POST /login"):
        ids = []
        for _ in range(SAMPLES):
            tab = site.browser()
            if route == "GET /login":
                tab.call("GET", "/login")
            else:
                site.login(tab)
            assert tab.sid, f"{route} set no sid cookie"
            ids.append(tab.sid)
        assert len(set(ids)) == len(ids), (
            f"{route} issued the same session id twice in {SAMPLES} sessions: two users "
            "would share one session")
        bits, fixed = estimated_random_bits(ids)
        assert bits >= MIN_BITS, (
            f"{SAMPLES} session ids from {route} ({ids[0]!r}, {ids[1]!r}, {ids[-1]!r}...) "
            f"carry about {bits:.0f} random bits, expected at least 128: ids of "
            f"{len(ids[0])} characters, {len(fixed)} of them the same in every id. "
            "An attacker reads his own ids and guesses a victim's from them (uuid1 is a "
            "clock plus the MAC address, a counter or a timestamp is enumerable, a short "
            "token is brute-forced). The id IS the login: draw it from the OS CSPRNG, "
            "secrets.token_urlsafe(32)")


def test_an_id_the_server_never_issued_is_not_adopted(site: Site) -> None:
    chosen = "attacker-chosen-id-0123456789abcdefghij"
    victim = Browser(site.host, sid=chosen)
    site.login(victim)
    assert victim.sid != chosen, (
        f"POST /login with the cookie sid={chosen} kept that id: a server that adopts ids "
        "it never issued lets an attacker choose the victim's session id")
    assert not site.session(chosen) and Browser(site.host, sid=chosen).call(
            "GET", "/me").status == 401, (
        f"the attacker-chosen id {chosen} leads to a session: only ids the server issued "
        "(and stored in Redis) are sessions")


def test_session_fixation_old_id_dies_at_login(site: Site) -> None:
    attacker = site.browser()
    first = attacker.call("GET", "/login")
    assert first.status == 200
    planted = attacker.sid
    assert planted, "GET /login set no sid cookie"
    planted_csrf = attacker.csrf_from(first, "GET /login")
    victim = Browser(site.host, sid=planted)  # the attacker planted the id in the victim's tab
    victim_csrf = site.login(victim)
    assert victim.sid != planted, (
        "alice logged in with a session id obtained before login, and kept it: session "
        "fixation. The attacker who planted that id is now logged in as alice. Issue a "
        "NEW session id at login and delete the old session")
    assert not site.session(planted), (
        f"after login the pre-login session:{planted[:8]}... still exists in Redis: delete "
        "the old session when issuing the new id")
    seen = attacker.call("GET", "/me")
    assert seen.status == 401, (
        f"the attacker's copy of the pre-login id got {seen.status} {seen.body[:100]!r} "
        "from GET /me, expected 401: the old id must die at login")
    # The CSRF token is session state too: the attacker who planted the anonymous session
    # read its token (GET /login); carried over, it lets him forge the victim's POSTs.
    assert victim_csrf != planted_csrf, (
        "POST /login kept the pre-login session's CSRF token for the logged-in session: the "
        "attacker who planted (or read) the anonymous session knows it and can forge the "
        "victim's POSTs - a login issues a new id AND a new CSRF token")
    forged = victim.call("POST", "/transfer", {"to": "mallory", "amount": 1000},
                         csrf=planted_csrf, origin=EVIL)
    assert forged.status == 403, (
        f"POST /transfer with the victim's new session and the PRE-login CSRF token "
        f"answered {forged.status}, expected 403: only the token issued at login is this "
        "session's token")


def test_a_login_ends_the_logged_in_session_it_replaces(site: Site) -> None:
    """A login on a tab that holds a logged-in session (the same user again, another user
    on a shared computer) ends that session too, not only an anonymous one."""
    tab = site.browser()
    site.login(tab)
    for user in ("alice", "bob"):
        before, holder = tab.sid, site.session(str(tab.sid)).get("user")
        assert before is not None
        site.login(tab, user)
        copy = Browser(site.host, sid=before).call("GET", "/me")
        kept = bool(site.session(before))
        assert not kept and copy.status == 401, (
            f"after {user} logged in on a tab holding {holder}'s logged-in session, that "
            f"session:{before[:8]}... {'still exists in Redis' if kept else 'is gone'} and a "
            f"copy of its id got {copy.status} from GET /me, expected the key gone and "
            "401: the login kept the old, logged-in session - a login ends the session the "
            "browser had, anonymous or logged in, whoever's (whoever used the computer "
            "before, or holds a copy of that id, stays logged in otherwise)")


def test_wrong_password_creates_no_session(site: Site) -> None:
    tab = site.browser()
    for creds in ({"username": "alice", "password": "wonderland-43"},
                  {"username": "mallory", "password": "wonderland-42"}):
        reply = tab.call("POST", "/login", creds)
        assert reply.status == 401, (
            f"POST /login with {creds} answered {reply.status}, expected 401")
    logged_in = [k for k in site.redis.keys("session:*") if b"user" in site.redis.hkeys(k)]
    assert not logged_in and tab.call("GET", "/me").status == 401, (
        f"failed logins left logged-in sessions in Redis: {logged_in}")


def test_csrf_token_required_on_post(site: Site) -> None:
    alice = site.browser()
    token = site.login(alice)
    bob = site.browser()
    bob_token = site.login(bob, "bob")
    order = {"to": "mallory", "amount": 1000}
    for csrf, what in ((None, "no CSRF token (a cross-site form post)"),
                       ("forged-token-0123456789", "a made-up CSRF token"),
                       (bob_token, "bob's valid CSRF token (another session's)"),
                       ("", "an empty CSRF token")):
        reply = alice.call("POST", "/transfer", order, csrf=csrf, origin=EVIL)
        assert reply.status == 403, (
            f"POST /transfer with alice's cookie and {what} answered {reply.status}, "
            "expected 403: a state-changing POST needs the CSRF token bound to THIS "
            "session (compared with hmac.compare_digest); the cookie alone proves nothing, "
            "the browser attaches it to cross-site requests too")
    reply = alice.call("POST", "/transfer", order, csrf=token)
    assert reply.status == 200, (
        f"POST /transfer with alice's cookie and her CSRF token answered {reply.status} "
        f"{reply.body[:100]!r}, expected 200")
    anonymous = site.browser()
    reply = anonymous.call("POST", "/transfer", order, csrf=token)
    assert reply.status == 401, (
        f"POST /transfer without any session answered {reply.status}, expected 401")
    # An anonymous session (GET /login, nobody logged in) has a CSRF token of its own:
    # a session existing is not a login.
    guest = site.browser()
    guest_token = guest.csrf_from(guest.call("GET", "/login"), "GET /login")
    for path in ("/transfer", "/logout"):
        reply = guest.call("POST", path, order if path == "/transfer" else None,
                           csrf=guest_token)
        assert reply.status == 401, (
            f"POST {path} from an anonymous session (GET /login, no login) with that "
            f"session's own CSRF token answered {reply.status}, expected 401: a session "
            "existing is not a login - check that the session has a user, not only an id")


# Secrets are text people type and clients send: any Unicode. hmac.compare_digest takes
# str only when both are ASCII (TypeError otherwise), .encode("ascii") or "latin-1" raise,
# and errors="ignore" or "replace" make different secrets equal. Each case: who logs in,
# the password sent, the status it must get, what it is.
NON_ASCII_LOGINS = (
    ("jürgen", "Straße-€42", 200, "jürgen's right password"),
    ("jürgen", "Straβe-€42", 401, "jürgen's password with its ß replaced by a Greek β"),
    ("alice", "wönderland-42", 401, "a wrong password with an ö"),
)
# The X-CSRF-Token header as UTF-8 bytes ({token}: the session's own), what it is.
NON_ASCII_TOKENS = (
    ("{token}é", "her own CSRF token with an é appended"),
    ("jeton-volé-€", "a made-up non-ASCII CSRF token"),
)


def secret_mistake(status: int, want: int) -> str:
    """What a status that is not ``want`` says about how the app compared a non-ASCII
    secret."""
    if status >= 500:
        return ("the app crashed comparing a non-ASCII secret: hmac.compare_digest accepts "
                "str only when it is ASCII (TypeError otherwise), .encode('ascii') or "
                "'latin-1' raise too")
    if want == 200:
        return ("a non-ASCII secret must equal itself: refusing it (or catching the "
                "comparison's error as a refusal) locks this user out")
    if status == 200:
        return ("the secrets differ only in non-ASCII characters: a comparison that drops "
                "or replaces them (encode('ascii', 'ignore' or 'replace')) lets a wrong "
                "secret in")
    return "a wrong secret gets the route's refusal, whatever characters it holds"


def test_non_ascii_secrets_are_compared_as_bytes(site: Site) -> None:
    fix = ("passwords and tokens are arbitrary text: compare their UTF-8 bytes, "
           "hmac.compare_digest(a.encode(), b.encode())")
    for user, password, want, what in NON_ASCII_LOGINS:
        reply = site.browser().call("POST", "/login", {"username": user, "password": password})
        assert reply.status == want, (
            f"POST /login as {user} with {what} ({password!r}) answered {reply.status} "
            f"{reply.body[:100]!r}, expected {want}: {secret_mistake(reply.status, want)}; "
            f"{fix}")
    alice = site.browser()
    token = site.login(alice)
    for template, what in NON_ASCII_TOKENS:
        sent = template.format(token=token)
        reply = alice.call("POST", "/transfer", {"to": "mallory", "amount": 1000},
                           csrf=sent.encode(), origin=EVIL)
        assert reply.status == 403, (
            f"POST /transfer with alice's cookie and {what} ({sent[-12:]!r} in UTF-8) "
            f"answered {reply.status} {reply.body[:100]!r}, expected 403: "
            f"{secret_mistake(reply.status, 403)}; {fix}")


def test_logout_deletes_the_session(site: Site) -> None:
    tab = site.browser()
    token = site.login(tab)
    sid = tab.sid
    assert sid
    reply = tab.call("POST", "/logout", origin=EVIL)
    assert reply.status == 403, (
        f"POST /logout without the CSRF token answered {reply.status}, expected 403: a "
        "cross-site page must not log users out either")
    assert site.session(sid) and tab.call("GET", "/me").status == 200, (
        "POST /logout without the CSRF token was refused with 403, but the session was "
        "deleted anyway: check the CSRF token BEFORE deleting anything - a refused request "
        "must change nothing, or any site can log your users out")
    stolen = Browser(site.host, sid=sid)  # a copy of the cookie, e.g. from another machine
    reply = tab.call("POST", "/logout", csrf=token)
    assert reply.status == 200, f"POST /logout answered {reply.status}, expected 200"
    assert tab.sid is None, (
        f"POST /logout left the cookie (Set-Cookie: {tab.cookies[-1]!r}); clear it with "
        "sid=; Max-Age=0")
    assert not site.session(sid), (
        f"after logout Redis still holds session:{sid[:8]}...: logout must DELETE the "
        "session server-side; clearing the cookie alone leaves any copy of it valid")
    seen = stolen.call("GET", "/me")
    assert seen.status == 401, (
        f"a copy of the cookie taken before logout still gets {seen.status} from GET /me, "
        "expected 401")


# Logins naming an account that does not exist, with no password to speak of: a fallback
# for the missing account ("" or None, often there to spend the same time on unknown
# users) must never equal what the client sent. (body, what it is)
NO_SUCH_ACCOUNT = (
    ({"username": "mallory", "password": ""}, "an unknown user with an empty password"),
    ({"username": "mallory"}, "an unknown user and no password field"),
    ({"username": "mallory", "password": None}, "an unknown user with a null password"),
    ({"username": "", "password": ""}, "an empty user name with an empty password"),
)


def test_no_account_no_password_logs_nobody_in(site: Site) -> None:
    for creds, what in NO_SUCH_ACCOUNT:
        tab = site.browser()
        reply = tab.call("POST", "/login", creds)
        user_sessions = [k.decode() for k in site.redis.keys("session:*")
                         if b"user" in site.redis.hkeys(k)]
        me = tab.call("GET", "/me") if tab.sid else None
        assert reply.status in (400, 401) and not user_sessions, (
            f"POST /login with {what} ({creds}) answered {reply.status} "
            f"{reply.body[:100]!r}, expected 401 (or 400 for a missing field), and Redis "
            f"holds logged-in sessions {user_sessions}"
            + (f", GET /me says {me.body[:60]!r}" if me is not None else "")
            + ": the account does not exist, so no password can be right - compare only "
            "against a stored password (accounts.get(name) is None -> 401); a stand-in "
            "for the missing account (accounts.get(name, ''), str(None) == str(None)) equals "
            "what the client sends when it sends nothing")


# Login bodies a client may send that hold no credentials: JSON of another kind than an
# object, JSON cut short, bytes that are not UTF-8. (body, what it is, what crashes on it)
NOT_AN_OBJECT = ("JSON that is not an object has no fields: creds['username'] raises "
                 "TypeError on it (creds.get AttributeError)")
NOT_JSON = ("a body that does not parse makes json.loads raise ValueError "
            "(UnicodeDecodeError is one)")
NOT_CREDENTIALS: tuple[tuple[bytes, str, str], ...] = (
    (b"[]", "a JSON list, not an object", NOT_AN_OBJECT),
    (b'["alice", "wonderland-42"]', "a JSON list of the user and password", NOT_AN_OBJECT),
    (b'"alice"', "a JSON string", NOT_AN_OBJECT),
    (b"null", "JSON null", NOT_AN_OBJECT),
    (b"42", "a JSON number", NOT_AN_OBJECT),
    (b'{"username": "alice", "password": "wonderland-42"', "JSON cut short", NOT_JSON),
    (b'{"username": "alice", "password": "wonderland-4\xff"}', "bytes that are not UTF-8",
     NOT_JSON),
)


def test_a_login_body_without_credentials_is_refused(site: Site) -> None:
    """The body comes from the client: whatever it holds, a login that carries no
    credentials is refused (400) - never a crash (500), never a session."""
    for body, what, crash in NOT_CREDENTIALS:
        reply = http_request(site.host, "POST", "/login", body, timeout=10)
        user_sessions = [k.decode() for k in site.redis.keys("session:*")
                         if b"user" in site.redis.hkeys(k)]
        assert 400 <= reply.status < 500 and not user_sessions, (
            f"POST /login with {what} ({body!r}) answered {reply.status} "
            f"{reply.body[:80]!r}, expected 400"
            + (f", and Redis holds logged-in sessions {user_sessions}" if user_sessions
               else "")
            + f": the body is the client's to get wrong - {crash}, and unhandled the request "
            "dies as a 500. Check that it parsed to an object (isinstance(creds, dict)) with "
            "string fields, and refuse anything else with 400")


def test_state_changes_only_by_post(site: Site) -> None:
    """SameSite=Lax still sends the cookie on a cross-site top-level GET (a link, a
    redirect, window.location): a route that changes state must not answer GET, where no
    CSRF token is checked."""
    alice = site.browser()
    site.login(alice)
    sid = alice.sid
    assert sid
    for path, change in (("/transfer", "moved money"), ("/logout", "logged alice out")):
        reply = alice.call("GET", path, origin=EVIL)
        alive = bool(site.session(sid))
        assert reply.status >= 400 and alive and alice.sid == sid, (
            f"GET {path} with alice's cookie and no CSRF token (a link on another site: "
            f"SameSite=Lax sends the cookie on top-level GET navigations) answered "
            f"{reply.status} {reply.body[:80]!r}"
            + ("" if alive else ", and her session is gone from Redis")
            + (", and cleared her cookie" if alice.sid != sid else "")
            + f": expected 404 or 405 - a GET that {change} is a cross-site request forgery "
            "the CSRF token never sees. State changes answer POST only (route on method "
            "AND path), and the POST checks the token.")


# ---- the session cookie among the site's other cookies -----------------------------------
# A browser sends every cookie of the site in one header, "a=1; sid=...; b=2" (RFC 6265
# 5.4): analytics and CSRF cookies before and after the session's, names that contain or
# begin with "sid", a value a page script wrote as JSON, and - when a sid cookie of another
# Path or Domain is left over - two sid cookies, the live one first or last (RFC 6265 4.2.2:
# servers SHOULD NOT rely on the order of same-named cookies). {sid}: alice's live session
# id, {stale}: the id of a session logged out (no Redis key).
# (Cookie header, alice logged in?, what it is, what a miss means)
WHOLE_NAME = ("is another cookie: split the header on ';' and compare each pair's name whole "
              "with 'sid' - a search for 'sid=' in the header, or a name's prefix, finds it")
COOKIE_HEADERS = (
    ("_ga=GA1.2.1234567890.1700000000; sid={sid}; csrftoken=Xy7Qw2", True,
     "the session cookie between an analytics and a CSRF cookie",
     "the header holds every cookie of the site: find the pair named sid, not the first pair"),
    ("sid={sid}; _ga=GA1.2.1234567890.1700000000", True,
     "the session cookie first, another after it",
     "the header holds every cookie of the site: the session cookie is one pair of it"),
    ("theme=dark; lang=en; sid={sid}", True, "the session cookie last",
     "the header holds every cookie of the site: find the pair named sid, wherever it stands"),
    ("xsid={stale}; sid={sid}", True,
     "a cookie whose name ends in sid (xsid, holding a dead id) before the session cookie",
     "xsid " + WHOLE_NAME),
    ("sid_old={stale}; sid={sid}", True,
     "a cookie whose name begins with sid (sid_old, holding a dead id) before the session "
     "cookie", "sid_old " + WHOLE_NAME),
    ("sid={stale}; sid={sid}", True,
     "a stale sid (left over with another Path or Domain) before the live one",
     "the order of two cookies of one name is not to be relied on (RFC 6265 4.2.2): of the "
     "sid values sent, the session is the one whose key Redis holds"),
    ("sid={sid}; sid={stale}", True, "a stale sid after the live one",
     "the order of two cookies of one name is not to be relied on (RFC 6265 4.2.2): a jar "
     "that keeps one value per name (SimpleCookie, a dict) keeps the last, a dead id - try "
     "every sid value sent and take the one whose key Redis holds"),
    ('prefs={{"theme":"dark"}}; sid={sid}', True,
     "a cookie a page script set to JSON (quotes in its value) before the session cookie",
     "a pair you cannot parse must not hide the others: SimpleCookie gives up on the whole "
     "header at a value holding a quote, and logs the user out - split on ';' yourself and "
     "skip what does not parse, as Django's parse_cookie and Go's net/http do"),
    ("consent; sid={sid}", True,
     "a cookie with no '=' (a nameless cookie a page script set, sent as its value alone, RFC "
     "6265bis 5.7.3) before the session cookie",
     "skip a pair with no '=': unpacking name, value = pair.split('=') raises on it, and "
     "every request of a user holding such a cookie fails"),
    ("xsid={sid}; sid_old={sid}", False,
     "alice's live id, but under other names only (xsid, sid_old): no cookie named sid",
     "only the cookie named exactly sid is the session cookie; others " + WHOLE_NAME[3:]),
)


def logged_out_id(site: Site) -> str:
    """The id of a session that existed and was logged out: a cookie a browser may still
    hold, with no Redis key behind it."""
    tab = site.browser()
    token = site.login(tab, "bob")
    sid = tab.sid
    assert sid and tab.call("POST", "/logout", csrf=token).status == 200, (
        "bob's POST /logout with his CSRF token did not answer 200")
    assert not site.session(sid), f"after bob's logout Redis still holds session:{sid[:8]}..."
    return sid


def test_session_cookie_among_other_cookies(site: Site) -> None:
    alice = site.browser()
    site.login(alice)
    assert alice.sid
    stale = logged_out_id(site)
    for template, logged_in, what, why in COOKIE_HEADERS:
        header = template.format(sid=alice.sid, stale=stale)
        reply = http_request(site.host, "GET", "/me", headers={"Cookie": header}, timeout=10)
        if logged_in:
            ok = reply.status == 200 and reply.json() == {"user": "alice"}
            expected = "200 {\"user\": \"alice\"}: alice's session cookie is in it"
        else:
            ok = reply.status == 401
            expected = "401: no cookie named sid"
        assert ok, (f"GET /me with Cookie: {header} ({what}) answered {reply.status} "
                    f"{reply.body[:80]!r}, expected {expected} - {why}")


def set_cookies(reply: HttpReply) -> list[str]:
    return list(reply.headers.get_all("Set-Cookie") or [])


def only_the_session_cookie(raws: list[str], what: str, sent: str,
                            flags: bool = True) -> SimpleCookie:
    """The single Set-Cookie of a response that sets the session cookie (with its flags)."""
    names = [raw.split("=", 1)[0].strip() for raw in raws]
    assert names == ["sid"], (
        f"{what}, sent with the site's other cookies (Cookie: {sent}), answered Set-Cookie "
        f"{raws}: expected one Set-Cookie, for sid alone - setting the other cookies again "
        "replaces their attributes (a Set-Cookie without Max-Age turns a persistent cookie "
        "into a session cookie, a missing Domain or Path makes another cookie of that name) "
        "and sends them without your flags: set only the cookie you own")
    jar: SimpleCookie = SimpleCookie()
    jar.load(raws[0])
    morsel = jar["sid"]
    present = {"HttpOnly": bool(morsel["httponly"]), "Secure": bool(morsel["secure"]),
               "SameSite=Lax or Strict": morsel["samesite"].lower() in ("lax", "strict")}
    missing = [flag for flag, there in present.items() if flags and not there]
    assert not missing, (
        f"{what}, sent with the site's other cookies, set the session cookie without "
        f"{', '.join(missing)}: Set-Cookie: {raws[0]}")
    return jar


def test_set_cookie_touches_only_the_session_cookie(site: Site) -> None:
    others = ("_ga=GA1.2.1234567890.1700000000", "csrftoken=Xy7Qw2")
    guest = site.browser()
    guest.call("GET", "/login")
    anonymous = guest.sid
    assert anonymous, "GET /login set no sid cookie"
    sent = f"{others[0]}; sid={anonymous}; {others[1]}"
    login = http_request(site.host, "POST", "/login", headers={"Cookie": sent},
                         document={"username": "alice", "password": USERS["alice"]},
                         timeout=10)
    assert login.status == 200, (
        f"POST /login with alice's right password and Cookie: {sent} answered "
        f"{login.status} {login.body[:100]!r}, expected 200")
    sid = only_the_session_cookie(set_cookies(login), "POST /login", sent)["sid"].value
    assert sid != anonymous and not site.session(anonymous), (
        f"POST /login with Cookie: {sent} kept the pre-login id (or its Redis key): the "
        "session cookie among others is still the session - a login issues a new id and "
        "deletes the old session")
    token = login.json().get("csrf", "")
    sent = f"{others[0]}; sid={sid}; {others[1]}"
    logout = http_request(site.host, "POST", "/logout", b"",
                          headers={"Cookie": sent, "X-CSRF-Token": token}, timeout=10)
    assert logout.status == 200, (
        f"POST /logout with alice's CSRF token and Cookie: {sent} answered {logout.status} "
        f"{logout.body[:100]!r}, expected 200")
    cleared = only_the_session_cookie(set_cookies(logout), "POST /logout", sent,
                                      flags=False)["sid"]
    assert cleared["max-age"] in ("0", "-1") or not cleared.value, (
        f"POST /logout set sid again without clearing it (Set-Cookie: "
        f"{set_cookies(logout)[0]}): send sid=; Max-Age=0")
