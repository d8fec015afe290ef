"""Verification for ph3.5: the learner's authorization server, a WSGI app served on a
loopback port and driven end to end over real HTTP, with the clock injected.

The client side is the test's: it makes its own PKCE verifier, reads the code from the
Location header of the real 302 (never following it), posts form-encoded token requests,
and checks the access tokens with PyJWT. The attacks are real requests: a replayed code, a
wrong verifier, the challenge sent as the verifier (the plain method), a code redeemed
with another redirect_uri or client, redirect URIs that are not registered, a wrong client
secret, a device code polled too fast. And the client's everyday mistakes, each of which
must get the refusal RFC 6749 5.2 names and never a 500: malformed Basic credentials, a
grant type the server does not have, codes, device codes, clients and user codes that name
nothing, code_verifiers of the wrong length or alphabet (RFC 7636 4.1)."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt as pyjwt
import pytest

from labrunner.testing import HttpReply, http_request, serve_wsgi, wait_until

KEY = b"ph3.5-authorization-server-signing-key-0123"
T0 = 1_700_000_000.0
CB = "https://spa.example/cb"
TENANT_CB = "https://spa.example/cb?tenant=blue"  # a registered URI with its own query
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENTS: dict[str, dict[str, Any]] = {
    "spa": {"type": "public", "redirect_uris": [CB, "https://spa.example/other", TENANT_CB]},
    "mobile": {"type": "public", "redirect_uris": ["com.example.app:/oauth"]},
    "batch": {"type": "confidential", "secret": "batch-s3cret-value"},
    "cron": {"type": "confidential", "secret": "s3cr:et/42"},  # a secret with colons
    "tv": {"type": "public", "device": True},
}


class Clock:
    """The injected clock, seen from the test: ``now`` reads and sets the time of the
    harness' HeldClock, which the app calls where it runs (see harness.py)."""

    def __init__(self, held: Any) -> None:
        self.held = held

    @property
    def now(self) -> float:
        return float(self.held.read())

    @now.setter
    def now(self, value: float) -> None:
        self.held.set(value)


def challenge_of(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()
                                    ).rstrip(b"=").decode()


@dataclass
class Server:
    host: str
    clock: Clock
    verifiers: dict[str, str] = field(default_factory=dict)

    def get(self, path: str, params: dict[str, str], user: str | None = "alice") -> HttpReply:
        headers = {"X-User": user} if user else {}
        return http_request(self.host, "GET", f"{path}?{urlencode(params)}", headers=headers,
                            timeout=10)

    def post(self, path: str, form: dict[str, str] | bytes,
             headers: dict[str, str] | None = None) -> HttpReply:
        """A form POST; bytes are sent as they are (a body no client library would make)."""
        body = form if isinstance(form, bytes) else urlencode(form).encode()
        return http_request(self.host, "POST", path, body, headers,
                            content_type="application/x-www-form-urlencoded", timeout=10)

    def authorize(self, client: str = "spa", redirect_uri: str = CB,
                  user: str | None = "alice", verifier: str | None = None,
                  **extra: str) -> HttpReply:
        verifier = verifier if verifier is not None else secrets.token_urlsafe(48)
        params = {"response_type": "code", "client_id": client, "redirect_uri": redirect_uri,
                  "state": secrets.token_urlsafe(8), "code_challenge": challenge_of(verifier),
                  "code_challenge_method": "S256", "scope": "openid"}
        params.update(extra)
        reply = self.get("/authorize", {k: v for k, v in params.items() if v != ""}, user)
        reply.sent = params  # type: ignore[attr-defined]
        self.verifiers[params["state"]] = verifier
        return reply

    def code(self, client: str = "spa", redirect_uri: str = CB,
             verifier: str | None = None) -> tuple[str, str]:
        """A fresh authorization code and its verifier (a random one unless given)."""
        reply = self.authorize(client, redirect_uri, verifier=verifier)
        sent = reply.sent  # type: ignore[attr-defined]
        location = reply.header("Location") or ""
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        assert reply.status in (302, 303) and location.startswith(redirect_uri + "?") \
            and "code" in query, (
                f"GET /authorize (client {client}, S256 challenge, a logged-in user) answered "
                f"{reply.status} Location: {location!r} {reply.body[:100]!r}, expected 302 "
                f"to {redirect_uri}?code=...&state=...")
        assert query.get("state") == sent["state"], (
            f"the redirect carried state={query.get('state')!r}, expected the client's "
            f"{sent['state']!r} back unchanged (it ties the answer to the request: CSRF)")
        return query["code"], self.verifiers[sent["state"]]

    def redeem(self, code: str, verifier: str | None, client: str = "spa",
               redirect_uri: str = CB) -> HttpReply:
        form = {"grant_type": "authorization_code", "code": code, "client_id": client,
                "redirect_uri": redirect_uri}
        if verifier is not None:
            form["code_verifier"] = verifier
        return self.post("/token", form)


@pytest.fixture
def server(learner: Any) -> Iterator[Server]:
    module = learner.load("authserver")
    clock = Clock(learner.harness().HeldClock(T0))
    try:
        app = module.make_app({k: dict(v) for k, v in CLIENTS.items()}, KEY, clock.held)
    except NotImplementedError as exc:
        pytest.fail(f"make_app() is not implemented yet: {exc}", pytrace=False)
    with serve_wsgi(app) as host:
        yield Server(host, clock)


def error_of(reply: HttpReply) -> str | None:
    try:
        data = reply.json()
    except BaseException:  # noqa: BLE001 - a body that is not JSON has no error code
        return None
    return data.get("error") if isinstance(data, dict) else None


def expect_token(reply: HttpReply, sub: str, client: str, what: str, why: str = "") -> None:
    assert reply.status == 200, (
        f"{what} answered {reply.status} {reply.body[:150]!r}, expected 200 with a token"
        + (f": {why}" if why else ""))
    data = reply.json()
    assert isinstance(data, dict) and str(data.get("token_type", "")).lower() == "bearer", (
        f"{what} answered {data!r}, expected access_token, token_type Bearer, expires_in")
    try:
        claims = pyjwt.decode(data.get("access_token", ""), KEY, algorithms=["HS256"],
                              options={"verify_exp": False, "verify_iat": False})
    except pyjwt.PyJWTError as exc:
        pytest.fail(f"{what}: the access_token is not an HS256 JWT signed with the server's "
                    f"key ({exc})", pytrace=False)
    assert claims.get("sub") == sub and claims.get("client_id") == client, (
        f"{what}: the token's sub/client_id are {claims.get('sub')!r}/"
        f"{claims.get('client_id')!r}, expected {sub!r}/{client!r}")


def expect_error(reply: HttpReply, errors: tuple[str, ...], what: str, why: str,
                 status: tuple[int, ...] = (400,)) -> None:
    got = error_of(reply)
    assert reply.status in status and got in errors, (
        f"{what} answered {reply.status} {reply.body[:120]!r}, expected {status[0]} "
        f"{{\"error\": \"{errors[0]}\"}}: {why}")


def test_authorization_code_with_pkce(server: Server) -> None:
    code, verifier = server.code()
    expect_token(server.redeem(code, verifier), "alice", "spa",
                 "POST /token with the code and its verifier",
                 "S256: BASE64URL(SHA256(code_verifier)), without '=', equals the "
                 "code_challenge sent to /authorize")
    expect_error(server.redeem(code, verifier), ("invalid_grant",),
                 "the same code redeemed a second time",
                 "a code is single-use: a replayed code (from a log, a Referer, a stolen "
                 "redirect) must get nothing")
    code, verifier = server.code()
    expect_error(server.redeem(code, secrets.token_urlsafe(48)), ("invalid_grant",),
                 "a code with the wrong code_verifier",
                 "whoever intercepted the code has no verifier: BASE64URL(SHA256(verifier)) "
                 "must equal the code_challenge")
    code, verifier = server.code()
    expect_error(server.redeem(code, challenge_of(verifier)), ("invalid_grant",),
                 "a code with the code_challenge itself as the verifier",
                 "the challenge travelled in the front channel, anyone may have it: compare "
                 "S256(verifier), never the verifier itself, with the challenge")
    code, verifier = server.code()
    expect_error(server.redeem(code, None), ("invalid_grant", "invalid_request"),
                 "a code without code_verifier", "PKCE was used at /authorize: the "
                 "verifier is required")
    code, verifier = server.code()
    expect_error(server.redeem(code, verifier, redirect_uri="https://spa.example/other"),
                 ("invalid_grant",), "a code redeemed with another registered redirect_uri",
                 "redirect_uri at /token must equal the one the code was issued for")
    code, verifier = server.code()
    expect_error(server.redeem(code, verifier, client="mobile",
                               redirect_uri=CB), ("invalid_grant",),
                 "spa's code redeemed by the client 'mobile'", "a code belongs to its client")
    for age, valid, why in CODE_LIFE:
        code, verifier = server.code()
        server.clock.now += age
        reply = server.redeem(code, verifier)
        what = f"a code redeemed {age} s after it was issued"
        if valid:
            expect_token(reply, "alice", "spa", what, why)
        else:
            expect_error(reply, ("invalid_grant",), what, why)


# A code's life: the README's 60 s, not RFC 6749's ceiling. Each case: age in seconds,
# still valid, why.
CODE_LIFE = [
    (59, True, "the README gives a code 60 s: at 59 s it is still valid"),
    (61, False, "the README gives a code 60 s (CODE_TTL): at 61 s it has expired - RFC "
     "6749 4.1.2's 10 minutes is a ceiling ('a maximum lifetime of 10 minutes is "
     "RECOMMENDED'), not the lifetime; every second past 60 is a second more for whoever "
     "intercepted the code"),
    (601, False, "codes are short-lived (at most 10 minutes, RFC 6749 4.1.2)"),
]


# What the client reads back from the redirect: state exactly as sent (RFC 6749 4.1.2),
# and a registered redirect_uri's own query kept beside code and state (3.1.2). Each case:
# the redirect_uri, the state, why.
REDIRECT_CASES = [
    (CB, "a&code=forged", "a state holding '&' and '=': pasted into the query unescaped it "
     "becomes a second parameter - here a second code"),
    (CB, "x y+z/%41", "a state holding a space, '+', '/' and a '%' escape: escape it once "
     "(urlencode), neither raw nor twice"),
    (CB, "caf\u00e9#top?", "a state holding a non-ASCII letter, '#' and '?': an unescaped "
     "'#' cuts the query short into a fragment"),
    (TENANT_CB, "plain-state", "the registered redirect_uri has a query of its own, "
     "tenant=blue: RFC 6749 3.1.2 says it MUST be retained when adding parameters - "
     "append &code=...&state=..., never a second '?' (the client would read tenant="
     "'blue?code=...' and no code)"),
]


def redirect_mistake(uri: str, state: str, why: str, reply: HttpReply) -> str | None:
    location = reply.header("Location") or ""
    got, want = urlsplit(location), urlsplit(uri)
    query = parse_qs(got.query, keep_blank_values=True)
    head = (f"GET /authorize with redirect_uri={uri!r} state={state!r} redirected to "
            f"{location!r}")
    if reply.status not in (302, 303) or (got.scheme, got.netloc, got.path) != (
            want.scheme, want.netloc, want.path):
        return f"{head} ({reply.status}), expected 302 to {uri} with code and state"
    lost = {k: v for k, v in parse_qs(want.query).items() if query.get(k) != v}
    if lost:
        return (f"{head}: the registered URI's own query {lost!r} did not come back "
                f"(saw {query!r}): {why}")
    if query.get("state") != [state] or len(query.get("code", [])) != 1:
        return (f"{head}: the client reads back state={query.get('state')!r} and "
                f"code={query.get('code')!r}, expected state exactly {state!r} and one "
                f"code: {why}")
    return None


def test_the_redirect_gives_state_back_exactly_and_keeps_the_uris_query(
        server: Server) -> None:
    wrong = []
    for uri, state, why in REDIRECT_CASES:
        reply = server.authorize(redirect_uri=uri, state=state)
        mistake = redirect_mistake(uri, state, why, reply)
        if mistake:
            wrong.append(mistake)
            continue
        code = parse_qs(urlsplit(reply.header("Location") or "").query)["code"][0]
        token = server.redeem(code, server.verifiers[state], redirect_uri=uri)
        if token.status != 200:
            wrong.append(f"the code from the redirect to {uri} (state {state!r}), redeemed "
                         f"with that redirect_uri and its verifier, answered {token.status} "
                         f"{token.body[:100]!r}, expected 200 with a token")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(REDIRECT_CASES)} redirects wrong)")


def test_a_request_without_state_gets_no_state_back(server: Server) -> None:
    """state is optional (RFC 6749 4.1.1; here PKCE guards the code too): a request
    without one gets its code and no state at all."""
    reply = server.authorize(state="")  # an empty value is left out of the request
    location = reply.header("Location") or ""
    query = parse_qs(urlsplit(location).query, keep_blank_values=True)
    assert reply.status in (302, 303) and location.startswith(CB + "?") \
        and len(query.get("code", [])) == 1, (
            f"GET /authorize without a state (a valid client, redirect_uri and S256 "
            f"challenge, a logged-in user) answered {reply.status} Location: {location!r}, "
            f"expected 302 to {CB}?code=...: state is optional (RFC 6749 4.1.1)")
    assert "state" not in query, (
        f"GET /authorize without a state redirected to {location!r}: the client reads back "
        f"state={query['state'][0]!r}, a state it never sent - expected no state parameter "
        "at all: RFC 6749 4.1.2 returns state only when the request carried one (a "
        "missing state printed as 'None', or added empty, makes a client that checks the "
        "state it gets against the one it sent refuse the answer)")
    token = server.redeem(query["code"][0], server.verifiers[""])
    assert token.status == 200, (
        f"the code from a request without state, redeemed with its verifier, answered "
        f"{token.status} {token.body[:100]!r}, expected 200 with a token")


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def token_time_mistake(what: str, reply: HttpReply, now: float) -> str | None:
    """The access token's iat and exp, read against the injected clock's now."""
    data = reply.json()
    claims = pyjwt.decode(data.get("access_token", ""), KEY, algorithms=["HS256"],
                          options={"verify_exp": False, "verify_iat": False})
    read = [claims.get("iat"), claims.get("exp"), data.get("expires_in")]
    if not all(isinstance(x, (int, float)) for x in read):
        return (f"{what}: iat={read[0]!r} exp={read[1]!r} expires_in={read[2]!r}, expected "
                "numbers (NumericDate seconds, RFC 7519 2): a token without exp never "
                "expires")
    iat, exp, lifetime = (float(x) for x in read)
    if abs(iat - now) > 1:
        return (f"{what}: the token's iat is {utc(iat)}, the injected clock() says "
                f"{utc(now)}: every time comes from clock() (README), not the wall clock "
                "(time.time(), datetime.now()) - a server on a clock of its own stamps and "
                "expires tokens when that clock says")
    if abs(exp - (now + lifetime)) > 1:
        return (f"{what}: the token's exp is {utc(exp)}, expected clock() + expires_in = "
                f"{utc(now + lifetime)}: exp is issued-at by the injected clock plus the "
                "lifetime the answer announces, not the wall clock's")
    return None


def test_token_times_come_from_the_injected_clock(server: Server) -> None:
    # T0 is years before any wall clock this test runs under: the two never agree
    code, verifier = server.code()
    replies = [("the authorization_code token", server.redeem(code, verifier), "alice",
                "spa"),
               ("the client_credentials token",
                server.post("/token", {"grant_type": "client_credentials"},
                            basic("batch", "batch-s3cret-value")), "batch", "batch")]
    device = server.post("/device_authorization", {"client_id": "tv"}).json()
    server.post("/device", {"user_code": device["user_code"]}, {"X-User": "bob"})
    replies.append(("the device_code token", poll(server, device["device_code"]), "bob",
                    "tv"))
    wrong = []
    for what, reply, sub, client in replies:
        expect_token(reply, sub, client, what)
        mistake = token_time_mistake(what, reply, server.clock.now)
        if mistake:
            wrong.append(mistake)
    assert not wrong, "\n".join(wrong)


def test_authorize_never_redirects_where_it_should_not(server: Server) -> None:
    for uri in ("https://evil.example/cb", "https://spa.example/cb/../../evil",
                "https://spa.example/cbx", "https://spa.example/cb?next=https://evil.example",
                "http://spa.example/cb"):
        reply = server.authorize(redirect_uri=uri)
        location = reply.header("Location") or ""
        assert reply.status == 400 and not location, (
            f"GET /authorize with the unregistered redirect_uri {uri} answered "
            f"{reply.status} Location: {location!r}, expected 400 without a redirect: "
            "compare redirect_uri with the registered ones exactly; redirecting elsewhere "
            "sends codes (or errors) to the attacker")
    # The client's own registration is what makes a redirect_uri safe: without a known
    # client there is none, and another client's URI is not this client's.
    for client, uri, what, why in (
        ("evil", "https://evil.example/cb", "the unknown client_id 'evil'",
         "no client is registered as 'evil', so no redirect_uri is registered either: when "
         "the client_id is missing or invalid the server MUST NOT redirect, not even to "
         "report the error (RFC 6749 4.1.2.1) - an error redirect sends the user's browser "
         "wherever the request said"),
        ("", "https://evil.example/cb", "no client_id",
         "without a client_id there is no registration to check the redirect_uri against: "
         "400, never a redirect (RFC 6749 4.1.2.1)"),
        ("spa", "com.example.app:/oauth", "the client 'spa' and the redirect_uri of the "
         "client 'mobile'",
         "each client's redirect_uris are its own: spa's code (and whatever the user "
         "consented to give spa) would land in another application - check the URI "
         "against THIS client's list, not against every registered URI"),
    ):
        reply = server.authorize(client=client, redirect_uri=uri)
        location = reply.header("Location") or ""
        assert reply.status == 400 and not location, (
            f"GET /authorize with {what} (redirect_uri {uri}) answered {reply.status} "
            f"Location: {location!r}, expected 400 without a redirect: {why}")
    for extra, what, why in (
            ({"code_challenge": ""}, "without code_challenge", ""),
            ({"code_challenge_method": "plain"}, "with code_challenge_method plain", ""),
            ({"code_challenge_method": ""}, "with a code_challenge but no "
             "code_challenge_method", " - a challenge without a method is a plain one (RFC "
             "7636 4.3: the method defaults to plain), so an absent method is not S256; "
             "never default it to S256 yourself")):
        reply = server.authorize(**extra)
        location = reply.header("Location") or ""
        query = parse_qs(urlsplit(location).query)
        assert "code" not in query and (reply.status >= 400 or "error" in query), (
            f"GET /authorize {what} answered {reply.status} Location: {location!r}: "
            "expected no code (an error redirect with error=invalid_request): this server "
            f"requires PKCE with S256{why}")


def test_nothing_is_granted_without_a_logged_in_user(server: Server) -> None:
    """A code and a device approval each stand for a user's consent: with nobody logged in
    (no X-User, this lab's stand-in for a login session) there is no one to consent."""
    reply = server.authorize(user=None)
    location = reply.header("Location") or ""
    assert reply.status == 401 and not location, (
        f"GET /authorize (a valid client, redirect_uri and S256 challenge) with NO logged-in "
        f"user answered {reply.status} Location: {location!r}, expected 401 "
        "{\"error\": \"login_required\"} without a redirect: a code is the user's consent, "
        "and a code issued with nobody logged in grants whoever started the flow a token "
        "for no one (or for whatever user the server makes up) - check X-User before "
        "issuing anything")
    data = server.post("/device_authorization", {"client_id": "tv"}).json()
    approve = server.post("/device", {"user_code": data["user_code"]})
    assert approve.status == 401, (
        f"POST /device with a valid user_code and NO logged-in user answered "
        f"{approve.status} {approve.body[:100]!r}, expected 401 {{\"error\": "
        "\"login_required\"}: approving a device is the user's consent - whoever reads the "
        "code off a screen could approve it, and the device would get a token for nobody")
    server.clock.now += 60
    reply = poll(server, data["device_code"])
    expect_error(reply, ("authorization_pending",),
                 "a device-code poll after an approval attempt with no logged-in user",
                 "nobody approved: an approval without a user is no approval")


def basic(cid: str, secret: str, scheme: str = "Basic") -> dict[str, str]:
    return {"Authorization": f"{scheme} " + base64.b64encode(f"{cid}:{secret}".encode()
                                                               ).decode()}


def test_client_credentials(server: Server) -> None:
    form = {"grant_type": "client_credentials"}
    expect_token(server.post("/token", form, basic("batch", "batch-s3cret-value")), "batch",
                 "batch", "client_credentials with the right Basic credentials")
    expect_error(server.post("/token", form, basic("batch", "batch-s3cret-valuf")),
                 ("invalid_client",), "client_credentials with a wrong secret",
                 "client authentication failed: 401 invalid_client", status=(401,))
    expect_error(server.post("/token", form, basic("spa", "")), ("invalid_client",
                                                                 "unauthorized_client"),
                 "client_credentials for a public client (no secret)",
                 "a public client cannot authenticate, so it gets no machine token",
                 status=(401, 400))
    expect_error(server.post("/token", form), ("invalid_client",),
                 "client_credentials without credentials", "no client authentication",
                 status=(401,))
    for headers, what in ((basic("batch", "batch-s3cret-valuf"), "a wrong secret"),
                          ({}, "no Authorization header")):
        reply = server.post("/token", form, headers)
        challenge = reply.header("WWW-Authenticate") or ""
        assert "basic" in challenge.lower(), (
            f"client_credentials with {what} answered {reply.status} WWW-Authenticate: "
            f"{challenge!r}, expected 401 with WWW-Authenticate: Basic realm=...: a 401 "
            "MUST carry a challenge (RFC 7235 3.1; RFC 6749 5.2), which tells the client how "
            "to authenticate")


# Authorization: Basic as RFC 7617 reads it (RFC 7235 for the scheme). Each case: client,
# secret sent, scheme, accepted, why.
BASIC_CASES = [
    ("cron", "s3cr:et/42", "Basic", True,
     "HTTP Basic splits user-id and password at the FIRST colon (RFC 7617 section 2): the "
     "secret may itself hold colons - decoded.partition(':'), not split(':') or rsplit"),
    ("cron", "s3cr:WRONG/42", "Basic", False,
     "the secret is everything after the first colon, compared whole"),
    ("batch", "batch-s3cret-value", "basic", True,
     "the scheme name is case-insensitive (RFC 7235 section 2.1): 'basic' is Basic"),
]


def test_client_credentials_parse_basic_as_rfc_7617(server: Server) -> None:
    form = {"grant_type": "client_credentials"}
    for cid, secret, scheme, accept, why in BASIC_CASES:
        reply = server.post("/token", form, basic(cid, secret, scheme))
        what = (f"client_credentials with Authorization: {scheme} base64({cid}:{secret}) "
                f"({'the right' if accept else 'a wrong'} secret of {cid})")
        if accept:
            expect_token(reply, cid, cid, what, why)
        else:
            expect_error(reply, ("invalid_client",), what, why, status=(401,))


def poll(server: Server, device_code: str) -> HttpReply:
    return server.post("/token", {"grant_type": DEVICE_GRANT, "device_code": device_code,
                                  "client_id": "tv"})


def test_device_code_pending_slow_down_then_token(server: Server) -> None:
    start = server.post("/device_authorization", {"client_id": "tv"})
    data = start.json() if start.status == 200 else {}
    assert start.status == 200 and {"device_code", "user_code", "verification_uri",
                                    "interval", "expires_in"} <= set(data), (
        f"POST /device_authorization answered {start.status} {start.body[:150]!r}, "
        "expected 200 with device_code, user_code, verification_uri, expires_in, interval")
    device, interval = data["device_code"], int(data["interval"])
    steps = [
        (0, "authorization_pending", "the user has not approved yet"),
        (interval - 1, "slow_down", f"polled {interval - 1} s after the last poll with an "
         f"interval of {interval} s"),
        (interval + 1, "slow_down", f"polled {interval + 1} s after the last poll: after a "
         f"slow_down the interval is {interval + 5} s for this and every later request "
         "(RFC 8628 3.5)"),
        (interval + 10, "authorization_pending", f"polled {interval + 10} s after the last "
         f"poll, respecting the interval of {interval + 10} s (two slow_downs: +5 each)"),
    ]
    for wait, want, why in steps:
        server.clock.now += wait
        expect_error(poll(server, device), (want,), f"a device-code poll at t+"
                     f"{server.clock.now - T0:.0f} s", why)
    approve = server.post("/device", {"user_code": data["user_code"]}, {"X-User": "bob"})
    assert approve.status == 200, (
        f"POST /device with the user_code (bob logged in) answered {approve.status} "
        f"{approve.body[:100]!r}, expected 200")
    server.clock.now += 60
    expect_token(poll(server, device), "bob", "tv", "the poll after bob approved")
    server.clock.now += 60
    reply = poll(server, device)
    assert reply.status == 400 and error_of(reply) in ("invalid_grant", "expired_token"), (
        f"polling again with a device code that already got its token answered "
        f"{reply.status} {reply.body[:100]!r}, expected 400 invalid_grant: single use")
    late = server.post("/device_authorization", {"client_id": "tv"}).json()
    server.clock.now += int(late["expires_in"]) + 1
    expect_error(poll(server, late["device_code"]), ("expired_token",),
                 "a poll after the device code's expires_in", "the device code expired")


def test_a_code_is_used_up_by_its_first_redemption(server: Server) -> None:
    """A failed redemption uses the code up too, and two redemptions at once get one token
    at most: whoever holds a code gets one try."""
    for failed, wrong in (("a wrong code_verifier", {"verifier": secrets.token_urlsafe(48)}),
                          ("another registered redirect_uri",
                           {"redirect_uri": "https://spa.example/other"})):
        code, verifier = server.code()
        args: dict[str, Any] = {"verifier": verifier, **wrong}
        first = server.redeem(code, args.pop("verifier"), **args)
        assert first.status == 400, f"the redemption with {failed} answered {first.status}"
        again = server.redeem(code, verifier)
        assert again.status != 200, (
            f"a code whose first redemption failed ({failed}) was then redeemed with the "
            f"right verifier and got a token: a code is used up by its FIRST redemption, "
            "failed or not (RFC 6749 4.1.2: once) - take it out of the store before "
            "checking anything, or whoever holds a stolen code gets as many tries as they "
            "like")
    # Two redemptions of one code at once: the first is held at its clock() call.
    code, verifier = server.code()
    clock = server.clock.held
    clock.arm()
    replies: dict[str, HttpReply] = {}

    def redeem(name: str) -> None:
        replies[name] = server.redeem(code, verifier)

    holder = threading.Thread(target=redeem, args=("first",), daemon=True)
    holder.start()
    try:
        wait_until(lambda: clock.arrived() or not holder.is_alive(),
                   "the first redemption to call the clock")
        clock.disarm()
        second = threading.Thread(target=redeem, args=("second",), daemon=True)
        second.start()
        second.join(timeout=30)
    finally:
        clock.release()
    holder.join(timeout=30)
    tokens = [n for n, r in replies.items() if r.status == 200]
    assert len(tokens) < 2, (
        "two concurrent POST /token with the same code both got a token (the first was "
        "held at its clock() call while the second ran): the code was looked up, checked, "
        "and only then removed - pop it from the store (under a lock) before checking "
        "anything, so exactly one redemption ever sees it")


def test_a_device_code_gets_one_token_even_when_polled_twice_at_once(server: Server) -> None:
    """One approval, one token (RFC 8628 3.5: the device code is redeemed once), also when
    a poll is slow and the next comes an interval later: the first poll is held at its
    1st, 2nd, 3rd... clock() call (wherever the app reads the time), the clock moves on by
    the interval, a second poll runs to its end, then the first goes on."""
    clock = server.clock.held
    for skip in range(8):  # a poll reading the time up to 8 times
        data = server.post("/device_authorization", {"client_id": "tv"}).json()
        approve = server.post("/device", {"user_code": data["user_code"]}, {"X-User": "bob"})
        assert approve.status == 200, f"POST /device answered {approve.status}"
        server.clock.now += 60
        replies: dict[str, HttpReply] = {}

        def run(name: str, code: str = data["device_code"],
                into: dict[str, HttpReply] = replies) -> None:
            into[name] = poll(server, code)

        clock.arm(skip)
        first = threading.Thread(target=run, args=("first",), daemon=True)
        first.start()
        try:
            wait_until(lambda: clock.arrived() or not first.is_alive(),  # noqa: B023
                       "the first poll to call the clock")
            if not clock.arrived():  # the poll made fewer clock() calls: all were tried
                clock.disarm()
                break
            server.clock.now += 6  # past the interval: the second poll is not too soon
            run("second")
        finally:
            clock.release()
        first.join(timeout=30)
        tokens = sorted(n for n, r in replies.items() if r.status == 200)
        assert len(tokens) < 2, (
            f"one approved device code polled twice at once got two tokens (the first poll "
            f"was held at its clock() call #{skip + 1} while a second poll, 6 s later, ran "
            "to its end): the code was checked, the token minted, and only then marked "
            "redeemed - check and mark it (used, or removed) in one step under the lock, "
            "before minting, so exactly one poll ever gets the token (RFC 8628 3.5)")


def test_a_device_code_belongs_to_its_client(server: Server) -> None:
    data = server.post("/device_authorization", {"client_id": "tv"}).json()
    approve = server.post("/device", {"user_code": data["user_code"]}, {"X-User": "bob"})
    assert approve.status == 200, f"POST /device answered {approve.status}"
    server.clock.now += 60
    reply = server.post("/token", {"grant_type": DEVICE_GRANT,
                                   "device_code": data["device_code"],
                                   "client_id": "mobile"})
    assert reply.status != 200, (
        "the device code issued to the client 'tv' (approved by bob) was redeemed by the "
        "client 'mobile' and got bob's token: a device code belongs to the client it was "
        "issued to - compare client_id at /token (400 invalid_grant)")


def raw_basic(decoded: bytes, scheme: str = "Basic") -> dict[str, str]:
    return {"Authorization": f"{scheme} {base64.b64encode(decoded).decode()}"}


CREDENTIALS_FAIL = (
    "RFC 6749 2.3.1 and 5.2: an Authorization header that does not authenticate a client, "
    "whatever is wrong with it, is a failed client authentication - 401 "
    "{\"error\": \"invalid_client\"} with WWW-Authenticate - never a crash (500) nor a 400: "
    "decode inside a try (binascii.Error and UnicodeDecodeError are ValueErrors) and split "
    "with partition(':')")
UNSUPPORTED = (
    "RFC 6749 5.2: a grant_type the server does not implement is 400 "
    "{\"error\": \"unsupported_grant_type\"} - route on each grant_type by name, and let "
    "only the names you implement reach their code (an else branch is a grant type nobody "
    "chose)")
NOT_FOUND = ("a parameter that names nothing this server issued (or is absent) is the "
             "client's mistake: a 4xx naming it, never a crash (500) - look it up with "
             ".get() and check what came back before using it")


@dataclass(frozen=True)
class Mistake:
    """A client's mistake and the refusal it must get."""
    what: str
    path: str
    form: dict[str, str] | bytes
    headers: dict[str, str]
    status: tuple[int, ...]
    errors: tuple[str, ...] | None  # None: any error code
    why: str


CC = {"grant_type": "client_credentials"}
CLIENT_MISTAKES = [
    Mistake("client_credentials with Authorization: Basic and text that is not base64",
            "/token", CC, {"Authorization": "Basic %%not*base64%%"}, (401,),
            ("invalid_client",), CREDENTIALS_FAIL),
    Mistake("client_credentials with Authorization: Basic and base64 cut short (bad "
            "padding)", "/token", CC, {"Authorization": "Basic YmF0Y2g6YmF0Y2gtczNjcmV0"
                                                        "LXZhbHV"}, (401,),
            ("invalid_client",), CREDENTIALS_FAIL),
    Mistake("client_credentials with Authorization: Basic base64('batch') (no colon)",
            "/token", CC, raw_basic(b"batch"), (401,), ("invalid_client",),
            CREDENTIALS_FAIL + " - without a colon there is no secret: the client did not "
            "authenticate"),
    Mistake("client_credentials with Authorization: Basic of bytes that are not UTF-8",
            "/token", CC, raw_basic(b"batch\xff\xfe:secret"), (401,), ("invalid_client",),
            CREDENTIALS_FAIL),
    Mistake("client_credentials with Authorization: Basic and nothing after the scheme",
            "/token", CC, {"Authorization": "Basic"}, (401,), ("invalid_client",),
            CREDENTIALS_FAIL),
    Mistake("client_credentials with Authorization: Bearer base64(batch:its right secret)",
            "/token", CC, raw_basic(b"batch:batch-s3cret-value", "Bearer"), (401,),
            ("invalid_client",),
            CREDENTIALS_FAIL + " - the scheme is not Basic, so these are not Basic "
            "credentials, whatever they decode to: check the scheme (in any case) before "
            "reading the rest"),
    Mistake("client_credentials with Authorization: Digest username=\"batch\"", "/token",
            CC, {"Authorization": 'Digest username="batch", realm="token", nonce="x"'},
            (401,), ("invalid_client",), CREDENTIALS_FAIL),
    Mistake("grant_type=password (batch's right Basic credentials, a username and "
            "password)", "/token", {"grant_type": "password", "username": "alice",
                                    "password": "pw"},
            basic("batch", "batch-s3cret-value"), (400,), ("unsupported_grant_type",),
            UNSUPPORTED + ": the password grant (RFC 6749 4.3, gone in OAuth 2.1) is not "
            "this server's"),
    Mistake("grant_type=refresh_token (batch's right Basic credentials)", "/token",
            {"grant_type": "refresh_token", "refresh_token": "r1"},
            basic("batch", "batch-s3cret-value"), (400,), ("unsupported_grant_type",),
            UNSUPPORTED),
    Mistake("POST /token without grant_type (batch's right Basic credentials)", "/token",
            {}, basic("batch", "batch-s3cret-value"), (400,),
            ("invalid_request", "unsupported_grant_type"),
            "RFC 6749 5.2: grant_type is required - 400 invalid_request"),
    Mistake("grant_type=authorization_code without a code", "/token",
            {"grant_type": "authorization_code", "client_id": "spa", "redirect_uri": CB,
             "code_verifier": secrets.token_urlsafe(48)}, {}, (400,),
            ("invalid_grant", "invalid_request"), NOT_FOUND),
    Mistake("POST /token with a form body that is not UTF-8 (code=\\xff\\xfe)", "/token",
            b"grant_type=authorization_code&code=\xff\xfe&client_id=spa", {}, (400,),
            ("invalid_request", "invalid_grant"),
            "a form is UTF-8 text (RFC 6749 appendix B): a body that does not decode is a "
            "malformed request, 400 invalid_request - decode inside a try, never let "
            "UnicodeDecodeError become a 500"),
    Mistake("grant_type=authorization_code with a code never issued", "/token",
            {"grant_type": "authorization_code", "code": "never-issued", "client_id": "spa",
             "redirect_uri": CB, "code_verifier": secrets.token_urlsafe(48)}, {}, (400,),
            ("invalid_grant",), NOT_FOUND),
    Mistake("a device-code poll with a device_code never issued", "/token",
            {"grant_type": DEVICE_GRANT, "device_code": "never-issued", "client_id": "tv"},
            {}, (400,), ("invalid_grant", "expired_token"), NOT_FOUND),
    Mistake("a device-code poll without device_code", "/token",
            {"grant_type": DEVICE_GRANT, "client_id": "tv"}, {}, (400,),
            ("invalid_grant", "invalid_request"), NOT_FOUND),
    Mistake("POST /device_authorization with the unknown client_id 'evil'",
            "/device_authorization", {"client_id": "evil"}, {}, (400, 401),
            ("invalid_client", "unauthorized_client"), NOT_FOUND),
    Mistake("POST /device_authorization without client_id", "/device_authorization", {}, {},
            (400, 401), ("invalid_client", "unauthorized_client", "invalid_request"),
            NOT_FOUND),
    Mistake("POST /device with the user_code 'BCDFGHJK' that no device was given (bob "
            "logged in)", "/device", {"user_code": "BCDFGHJK"}, {"X-User": "bob"},
            (400, 404), None,
            "the user mistyped the code shown on the screen: 400 {\"error\": "
            "\"invalid_request\"}, nothing approved - " + NOT_FOUND),
    Mistake("POST /device without user_code (bob logged in)", "/device", {},
            {"X-User": "bob"}, (400, 404), None,
            "400 {\"error\": \"invalid_request\"}, nothing approved - " + NOT_FOUND),
]


def test_client_mistakes_are_refused_not_crashed(server: Server) -> None:
    """Every mistake a client (or a user at /device) can make gets the refusal RFC 6749 5.2
    names for it: a 4xx with its error code, never a 500, never a token."""
    pending = server.post("/device_authorization", {"client_id": "tv"}).json()
    wrong = []
    for m in CLIENT_MISTAKES:
        reply = server.post(m.path, m.form, m.headers)
        got = error_of(reply)
        if reply.status not in m.status or (m.errors is not None and got not in m.errors):
            want = f"{{\"error\": \"{m.errors[0]}\"}}" if m.errors else "an error"
            wrong.append(f"{m.what} answered {reply.status} {reply.body[:100]!r}, expected "
                         f"{m.status[0]} {want}: {m.why}")
        elif reply.status == 401 and "basic" not in (reply.header("WWW-Authenticate")
                                                     or "").lower():
            wrong.append(f"{m.what} answered 401 without WWW-Authenticate: Basic (saw "
                         f"{reply.header('WWW-Authenticate')!r}): RFC 6749 5.2 - a 401 for "
                         "a client that tried the Authorization header MUST carry the "
                         "challenge of the scheme (RFC 7235 3.1: every 401 does)")
    assert not wrong, "\n".join(wrong) + f"\n({len(wrong)} of {len(CLIENT_MISTAKES)} " \
                                         "client mistakes answered wrong)"
    server.clock.now += 60
    expect_error(poll(server, pending["device_code"]), ("authorization_pending",),
                 "a device-code poll after approvals with user_codes that name no device",
                 "a user_code that matches nothing approves nothing")


# code_verifier = 43*128unreserved (RFC 7636 4.1), unreserved = ALPHA / DIGIT / "-" / "." /
# "_" / "~". Each case: the verifier (its challenge sent to /authorize, so only its form
# is wrong), accepted, why.
VERIFIER_CASES = [
    ("Az09-._~" * 5 + "abc", True,
     "43 characters, every one unreserved ('-', '.', '_' and '~' included): the shortest "
     "verifier RFC 7636 4.1 allows - the alphabet is ALPHA / DIGIT / '-' / '.' / '_' / '~', "
     "more than base64url's"),
    ("x~" * 64, True, "128 unreserved characters: the longest verifier RFC 7636 4.1 allows"),
    ("Az09-._~" * 5 + "ab", False,
     "42 characters: RFC 7636 4.1 asks for 43 to 128 (at least 256 bits of entropy once "
     "encoded), a shorter verifier is refused even when it matches its challenge"),
    ("x~" * 64 + "x", False, "129 characters: RFC 7636 4.1 allows at most 128"),
    ("ab+/" * 11, False,
     "'+' and '/' are not unreserved (RFC 7636 4.1): a verifier made with standard base64 "
     "instead of base64url is malformed"),
    ("abc " * 11, False, "a space is not unreserved (RFC 7636 4.1)"),
    ("é" + "a" * 42, False,
     "'é' is not unreserved: the alphabet is ASCII (RFC 7636 4.1) - refuse it (400), do "
     "not crash on it (a str.isalnum() or \\w lets Unicode letters in, and "
     "verifier.encode('ascii') raises)"),
]


def test_code_verifier_has_the_form_rfc_7636_gives(server: Server) -> None:
    wrong = []
    for verifier, accept, why in VERIFIER_CASES:
        code, _ = server.code(verifier=verifier)
        reply = server.redeem(code, verifier)
        what = (f"a code redeemed with a verifier of {len(verifier)} characters "
                f"{verifier[:12]!r}... (its challenge sent to /authorize)")
        if accept and reply.status != 200:
            wrong.append(f"{what} answered {reply.status} {reply.body[:100]!r}, expected "
                         f"200 with a token: {why}")
        elif not accept and (reply.status != 400 or error_of(reply) not in
                             ("invalid_grant", "invalid_request")):
            wrong.append(f"{what} answered {reply.status} {reply.body[:100]!r}, expected "
                         f"400 {{\"error\": \"invalid_grant\"}}: {why}")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(VERIFIER_CASES)} code_verifiers decided wrong)")


# A 401 MUST carry a WWW-Authenticate challenge (RFC 9110 11.6.1). The login session (this
# lab's X-User) is the credential /authorize and /device ask for, challenged as RFC 6750 3
# does: Bearer, with no error code when the request carried no credentials (3.1: "SHOULD
# NOT include an error code"), error="invalid_token" when it carried one that is no good
# (an X-User naming nobody). Each case: the request, the X-User sent (None: no header).
LOGIN_401: list[tuple[str, str | None, str | None]] = [
    ("GET /authorize", None, None),
    ("GET /authorize", "", "invalid_token"),
    ("POST /device", None, None),
    ("POST /device", "", "invalid_token"),
]


def challenge_of_401(value: str) -> tuple[str, dict[str, str]]:
    """The first challenge's scheme (lower case) and its auth-params (RFC 9110 11.2)."""
    scheme, _, rest = value.strip().partition(" ")
    params = re.findall(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)', rest)
    return scheme.lower(), {name.lower(): raw.strip('"') for name, raw in params}


def test_a_401_for_no_login_carries_its_challenge(server: Server) -> None:
    wrong = []
    for request, user, want_error in LOGIN_401:
        headers = {} if user is None else {"X-User": user}
        device = server.post("/device_authorization", {"client_id": "tv"}).json()
        if request == "GET /authorize":
            params = {"response_type": "code", "client_id": "spa", "redirect_uri": CB,
                      "state": "s1", "code_challenge": challenge_of("v" * 43),
                      "code_challenge_method": "S256"}
            reply = http_request(server.host, "GET", f"/authorize?{urlencode(params)}",
                                 headers=headers, timeout=10)
        else:
            reply = server.post("/device", {"user_code": device["user_code"]}, headers)
        sent = "no X-User" if user is None else "an empty X-User (a session naming nobody)"
        value = reply.header("WWW-Authenticate")
        if reply.status != 401 or reply.header("Location"):
            wrong.append(f"{request} with {sent} answered {reply.status} Location: "
                         f"{reply.header('Location')!r}, expected 401 {{\"error\": "
                         "\"login_required\"}: nobody is logged in, nothing is granted")
            continue
        scheme, params = challenge_of_401(value or "")
        want = ('Bearer realm="..."' if want_error is None
                else f'Bearer realm="...", error="{want_error}"')
        why = ("no credentials came, so the challenge carries no error code (RFC 6750 3.1: "
               "SHOULD NOT include an error code or other error information)"
               if want_error is None else
               "credentials came (an X-User) and name no one: error=\"invalid_token\" (RFC "
               "6750 3.1) tells the client to log in again rather than retry")
        if value is None:
            wrong.append(f"{request} with {sent} answered 401 without WWW-Authenticate, "
                         f"expected WWW-Authenticate: {want}: a 401 MUST carry a challenge "
                         "(RFC 9110 11.6.1) - it is how the client learns how to "
                         "authenticate")
        elif scheme != "bearer" or params.get("error") != want_error:
            wrong.append(f"{request} with {sent} answered 401 WWW-Authenticate: {value!r}, "
                         f"expected {want}: {why}")
        if request == "POST /device":
            server.clock.now += 60
            expect_error(poll(server, device["device_code"]), ("authorization_pending",),
                         f"a device-code poll after an approval with {sent}",
                         "nobody approved: an approval without a user is no approval")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(LOGIN_401)} 401s without the right challenge)")


# RFC 6749 3.1 and 3.2: "Request and response parameters MUST NOT be included more than
# once." Which of two values counts is a guess the server must not make: a proxy, a WAF or
# a log in front may read the other one (parameter pollution). At /token: 400
# invalid_request (5.2). At /authorize: a repeated client_id or redirect_uri is no valid
# one, so 400 and no redirect (4.1.2.1); any other repeated parameter is an error redirect
# to the (valid) client with error=invalid_request, and no code. Each case: where, the
# parameter, its two values ("right": the value a valid request carries; "other": another
# one, named in the case), what the case is.
@dataclass(frozen=True)
class Repeated:
    where: str  # "authorize", "code", "client_credentials", "device"
    name: str
    values: tuple[str, str]
    what: str


REPEATED = [
    Repeated("code", "code", ("right", "right"), "the same code twice"),
    Repeated("code", "code", ("right", "other"), "two codes issued to spa, each with a "
             "challenge of this verifier"),
    Repeated("code", "code_verifier", ("right", "right"), "the right verifier twice"),
    Repeated("code", "code_verifier", ("other", "right"), "a wrong verifier, then the "
             "right one"),
    Repeated("code", "redirect_uri", ("right", "right"), "the code's redirect_uri twice"),
    Repeated("code", "redirect_uri", ("right", "other"), "the code's redirect_uri, then "
             "spa's other registered one"),
    Repeated("code", "client_id", ("right", "right"), "spa twice"),
    Repeated("code", "grant_type", ("right", "right"), "authorization_code twice"),
    Repeated("client_credentials", "grant_type", ("right", "right"),
             "client_credentials twice"),
    Repeated("device", "device_code", ("right", "right"), "an approved device code twice"),
    Repeated("device", "client_id", ("right", "right"), "tv twice"),
    Repeated("authorize", "client_id", ("right", "right"), "spa twice"),
    Repeated("authorize", "client_id", ("right", "other"), "spa, then mobile"),
    Repeated("authorize", "redirect_uri", ("right", "right"), "spa's callback twice"),
    Repeated("authorize", "redirect_uri", ("right", "other"), "spa's callback, then "
             "https://evil.example/cb"),
    Repeated("authorize", "state", ("right", "other"), "two states"),
    Repeated("authorize", "code_challenge", ("right", "right"), "the same challenge twice"),
]
REPEATED_OTHER = {"redirect_uri": "https://spa.example/other", "client_id": "mobile",
                  "state": "another-state", "code_verifier": "w" * 43}


def repeated_request(server: Server, case: Repeated) -> HttpReply:
    """The valid request of the case's kind, with case.name sent twice (at the end)."""
    verifier = secrets.token_urlsafe(48)
    pairs: list[tuple[str, str]]
    headers: dict[str, str] = {}
    other = dict(REPEATED_OTHER)
    if case.where == "authorize":
        pairs = [("response_type", "code"), ("client_id", "spa"), ("redirect_uri", CB),
                 ("state", "one-state"), ("code_challenge", challenge_of(verifier)),
                 ("code_challenge_method", "S256")]
        other["redirect_uri"] = "https://evil.example/cb"
    elif case.where == "code":
        code, _ = server.code(verifier=verifier)
        other["code"], _ = server.code(verifier=verifier)
        pairs = [("grant_type", "authorization_code"), ("code", code), ("client_id", "spa"),
                 ("redirect_uri", CB), ("code_verifier", verifier)]
    elif case.where == "client_credentials":
        pairs = [("grant_type", "client_credentials")]
        headers = basic("batch", "batch-s3cret-value")
    else:
        device = server.post("/device_authorization", {"client_id": "tv"}).json()
        approve = server.post("/device", {"user_code": device["user_code"]},
                              {"X-User": "bob"})
        assert approve.status == 200, f"POST /device answered {approve.status}"
        server.clock.now += 60
        pairs = [("grant_type", DEVICE_GRANT), ("device_code", device["device_code"]),
                 ("client_id", "tv")]
    right = dict(pairs)[case.name]
    first, second = (right if v == "right" else other[case.name] for v in case.values)
    pairs = [(n, first if n == case.name else v) for n, v in pairs] + [(case.name, second)]
    if case.where == "authorize":
        return http_request(server.host, "GET", f"/authorize?{urlencode(pairs)}",
                            headers={"X-User": "alice"}, timeout=10)
    return server.post("/token", urlencode(pairs).encode(), headers)


def test_a_parameter_sent_twice_is_refused(server: Server) -> None:
    wrong = []
    for case in REPEATED:
        reply = repeated_request(server, case)
        location = reply.header("Location") or ""
        query = parse_qs(urlsplit(location).query)
        seen = (f"{reply.status} Location: {location!r}" if location
                else f"{reply.status} {reply.body[:100]!r}")
        if case.where == "authorize":
            what = f"GET /authorize with {case.name} sent twice ({case.what})"
            if case.name in ("client_id", "redirect_uri"):
                if reply.status != 400 or location:
                    wrong.append(
                        f"{what} answered {seen}, expected 400 without a redirect: two "
                        f"{case.name}s are no valid {case.name} (RFC 6749 3.1: a parameter "
                        "MUST NOT be included more than once), and without a valid client "
                        "and redirect_uri the server MUST NOT redirect (4.1.2.1)")
            elif (reply.status not in (302, 303) or not location.startswith(CB + "?")
                  or "code" in query or query.get("error") != ["invalid_request"]):
                wrong.append(
                    f"{what} answered {seen}, expected 302 to {CB}?error=invalid_request "
                    "without a code: a parameter MUST NOT be included more than once (RFC "
                    "6749 3.1), and as the client and its redirect_uri are valid the error "
                    "goes back to it by redirect (4.1.2.1)")
        elif reply.status != 400 or error_of(reply) != "invalid_request":
            grant = {"code": "authorization_code", "device": "device_code"}.get(
                case.where, case.where)
            wrong.append(
                f"POST /token ({grant}) with {case.name} sent twice ({case.what}) answered "
                f"{'200 with a token' if reply.status == 200 else seen}, expected 400 "
                "{\"error\": \"invalid_request\"}: request parameters MUST NOT be included "
                "more than once (RFC 6749 3.2, 5.2) - taking the first or the last value is "
                "a guess a proxy or WAF in front of you may make the other way")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(REPEATED)} requests with a parameter sent twice taken): "
        "parse with parse_qs and refuse any name with more than one value, before using "
        "any of them")
