"""Verification for ph3.4: the learner's token service on a real Postgres (refresh tokens
and their families) and a real Redis db (the jti denylist), on an injected clock.

Access tokens are read with PyJWT and the test's copy of the secret; refresh tokens at
rest are looked for in every row of every table; the denylist is read from Redis with
its TTL. The attack is a real replay: a refresh token used twice, the second time by
"the thief", must revoke its whole family (the user's newer token too) and nothing
else (another device's session survives)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
import pytest

from labrunner.testing import Outage, PgStatementProxy, timed_redis_commands, verdict, wait_until

SECRET = b"ph3.4-access-token-signing-secret-0123456789"
T0 = 1_700_000_000.0
DAY = 24 * 3600
Call = Callable[[], tuple[str, Any]]


@dataclass
class Clock:
    now: float = T0
    # Armed: the hold-th call from now on stops until `release` is set (a race, step by step).
    hold: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __call__(self) -> float:
        if self.hold > 0:
            self.hold -= 1
            if self.hold == 0:
                self.arrived.set()
                self.release.wait(timeout=30)
        return self.now


@dataclass
class Service:
    module: Any
    svc: Any
    postgres: Any
    redis: Any
    clock: Clock = field(default_factory=Clock)

    def do(self, what: str, fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
        """("ok", result) or ("refused", message); other exceptions fail the test."""
        return verdict(what, fn, *args, refusal=self.module.InvalidToken,
                       crash="refusals raise InvalidToken")

    def login(self, user: str) -> tuple[str, str]:
        verdict, pair = self.do(f"login({user!r})", self.svc.login, user)
        assert verdict == "ok" and len(pair) == 2, f"login() returned {pair!r}"
        return str(pair[0]), str(pair[1])

    def refresh(self, token: str, what: str) -> tuple[str, Any]:
        return self.do(f"refresh() of {what}", self.svc.refresh, token)

    def authenticate(self, token: str, what: str) -> tuple[str, Any]:
        return self.do(f"authenticate() of {what}", self.svc.authenticate, token)

    def at_rest(self) -> str:
        with self.postgres.connect(autocommit=True) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) "
                "FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
                "'information_schema')").fetchall()]
            return "\n".join(str(r[0]) for t in tables
                             for r in conn.execute(f"SELECT row_to_json(t)::text FROM {t} t"))


@pytest.fixture
def service(learner: Any, postgres: Any, redis_db: Any) -> Iterator[Service]:
    module = learner.load("tokens")
    clock = Clock()
    svc = module.TokenService(postgres.dsn, redis_db.url, SECRET, clock)
    try:
        svc.setup()
    except NotImplementedError as exc:
        pytest.fail(f"setup() is not implemented yet: {exc}", pytrace=False)
    client = redis_db.client()
    try:
        yield Service(module, svc, postgres, client, clock)
    finally:
        client.close()


def another_instance(learner: Any, service: Service, redis_db: Any) -> Service:
    """The service as another process runs it: a fresh copy of the learner's module (no
    state shared with ``service``'s), on the same database, Redis and clock."""
    module = learner.load("tokens", fresh=True)
    return Service(module, module.TokenService(service.postgres.dsn, redis_db.url, SECRET,
                                               service.clock),
                   service.postgres, service.redis, service.clock)


def claims_of(token: str, what: str) -> dict[str, Any]:
    try:
        return pyjwt.decode(token, SECRET, algorithms=["HS256"],
                            options={"verify_exp": False, "verify_iat": False})
    except pyjwt.PyJWTError as exc:
        pytest.fail(f"{what} is not an HS256 JWT signed with the service's secret "
                    f"({type(exc).__name__}: {exc})", pytrace=False)


def test_short_access_token_and_hashed_refresh_token(service: Service) -> None:
    access, refresh = service.login("alice")
    claims = claims_of(access, "login()'s access token")
    assert claims.get("sub") == "alice" and claims.get("jti"), (
        f"the access token's claims are {claims}, expected sub 'alice' and a jti")
    life = claims.get("exp", 0) - claims.get("iat", 0)
    assert claims.get("iat") == int(T0) and 0 < life <= 900, (
        f"the access token has iat {claims.get('iat')} and lives {life} s, expected iat = "
        "the injected clock and a life of at most 15 minutes: access tokens are checked "
        "without a lookup, so only a short life limits a stolen one")
    other, _ = service.login("alice")
    assert claims_of(other, "a second access token")["jti"] != claims["jti"], (
        "two access tokens share a jti: it must be unique to denylist one token")
    dump = service.at_rest()
    assert refresh not in dump, (
        "the refresh token is stored in plaintext in Postgres: anyone who reads the table "
        "or a backup can refresh as the user for 30 days. Store SHA-256(token)")
    assert hashlib.sha256(refresh.encode()).hexdigest() in dump, (
        "the SHA-256 hex digest of the refresh token is not in the database: store "
        "hashlib.sha256(token.encode()).hexdigest() and look tokens up by it")
    verdict, got = service.authenticate(access, "a fresh access token")
    assert verdict == "ok" and got.get("sub") == "alice", (
        f"authenticate() of a fresh access token: {verdict} {got}")


def test_refresh_rotates_and_each_token_is_single_use(service: Service) -> None:
    _, r1 = service.login("alice")
    service.clock.now = T0 + 600
    verdict, pair = service.refresh(r1, "a fresh refresh token")
    assert verdict == "ok", f"refresh() of a fresh refresh token was refused: {pair}"
    a2, r2 = str(pair[0]), str(pair[1])
    assert r2 != r1, (
        "refresh() returned the same refresh token: rotate it, a new refresh token on each "
        "use, so a stolen copy is used up by the next legitimate refresh")
    assert claims_of(a2, "refresh()'s access token").get("iat") == int(T0 + 600), (
        "the new access token's iat is not the injected clock's time")
    verdict, _ = service.authenticate(a2, "the refreshed access token")
    assert verdict == "ok", "the access token refresh() returned is not valid"
    verdict, pair = service.refresh(r2, "the rotated refresh token")
    assert verdict == "ok", f"refresh() of the token the last refresh returned: {pair}"


def test_reuse_revokes_the_whole_family_and_only_it(service: Service, redis_db: Any) -> None:
    proxy = PgStatementProxy.for_dsn(service.postgres.dsn, ignore=None)
    try:
        watched = service.module.TokenService(proxy.dsn_for(service.postgres.dsn),
                                              redis_db.url, SECRET, service.clock)
        reuse_revokes(Service(service.module, watched, service.postgres, service.redis,
                              service.clock), proxy)
    finally:
        proxy.close()


def reuse_revokes(service: Service, proxy: PgStatementProxy) -> None:
    _, stolen = service.login("alice")
    _, laptop = service.login("alice")            # another device: another family
    verdict, pair = service.refresh(stolen, "the user's refresh token")
    assert verdict == "ok", f"refresh() refused a fresh token: {pair}"
    users_new = str(pair[1])
    proxy.take()
    verdict, got = service.refresh(stolen, "a refresh token already used (the thief's copy)")
    during = proxy.take()
    assert verdict == "refused", (
        "refresh() accepted a refresh token that was already used: one of two parties "
        "holding it is a thief. A used token must be refused")
    verdict, got = service.refresh(users_new, "the newest token of a family whose old "
                                              "token was reused")
    writes = [i for i, sql in enumerate(during)
              if re.match(r"\s*(UPDATE|DELETE|INSERT)\b", sql, re.IGNORECASE)]
    ends = [sql.split()[0].upper() for sql in during[writes[-1]:]
            if re.match(r"\s*(COMMIT|END|ROLLBACK)\b", sql, re.IGNORECASE)] if writes else []
    if verdict == "ok" and ends[:1] == ["ROLLBACK"]:
        pytest.fail(
            "after a used refresh token came back, the family's newest token still works - "
            f"refresh() did write the revocation ({during[writes[-1]][:80]!r}) but that "
            "transaction was ROLLED BACK: raising InvalidToken inside the transaction block "
            "undoes the revocation with it. Commit the revocation first, then raise",
            pytrace=False)
    assert verdict == "refused", (
        "after a used refresh token came back, the family's newest token still works: "
        "reuse must revoke the WHOLE family - the server cannot tell the thief from the "
        "user, so both log in again")
    verdict, got = service.refresh(laptop, "another device's refresh token")
    assert verdict == "ok", (
        f"the reuse in one family also killed another device's session ({got}): revoke "
        "the family of the reused token, not every token of the user")


@pytest.mark.parametrize("rotations", [2, 3])
def test_reuse_of_an_older_token_revokes_the_family(service: Service, rotations: int) -> None:
    """The thief's copy need not be the token just rotated away: a stolen token comes back
    after the user has refreshed several times. It is still a reuse of the family."""
    _, first = service.login("alice")
    _, laptop = service.login("alice")            # another device: another family
    chain = [first]
    for n in range(rotations):
        verdict, pair = service.refresh(chain[-1], f"the user's refresh token (rotation "
                                                   f"{n + 1})")
        assert verdict == "ok", f"refresh() refused a fresh token: {pair}"
        chain.append(str(pair[1]))
    verdict, got = service.refresh(first, f"the family's first token, used {rotations} "
                                          "rotations ago (the thief's copy)")
    assert verdict == "refused", (
        f"refresh() accepted the family's first token after {rotations} rotations: a used "
        "token must be refused, however long ago it was used")
    verdict, got = service.refresh(chain[-1], f"the newest token of a family whose token from "
                                              f"{rotations} rotations ago came back")
    assert verdict == "refused", (
        f"the family's first refresh token came back {rotations} rotations after it was "
        "used and was refused - but the family's newest token still works: the replay was "
        "taken for an unknown token, not a reuse. A token used at ANY earlier rotation "
        "proves a copy exists, so the whole family is revoked; keep every used token of a "
        "family (marked used, until the family expires) instead of deleting or "
        "overwriting it at the next rotation")
    verdict, got = service.refresh(laptop, "another device's refresh token")
    assert verdict == "ok", (
        f"the reuse in one family also killed another device's session ({got}): revoke "
        "the family of the reused token, not every token of the user")


def test_a_used_token_that_has_expired_since_still_revokes_its_family(
        service: Service) -> None:
    """The thief's copy comes back after its own 30 days: it is refused either way, but a
    used token presented again is a reuse whatever its age - the family's newest token,
    issued at the rotation, has 30 days of its own left and is the one the thief may hold."""
    _, stolen = service.login("alice")
    service.clock.now = T0 + 10 * DAY
    verdict, pair = service.refresh(stolen, "the user's refresh token")
    assert verdict == "ok", f"refresh() refused a fresh token: {pair}"
    users_new = str(pair[1])
    service.clock.now = T0 + 30 * DAY + 60  # the used token has expired; the new one has not
    verdict, got = service.refresh(stolen, "a used refresh token that has since expired "
                                           "(the thief's copy)")
    assert verdict == "refused", (
        "refresh() accepted a refresh token that was used and has expired since")
    verdict, got = service.refresh(users_new, "the newest token of a family whose used "
                                              "token came back after it expired")
    assert verdict == "refused", (
        "a used refresh token came back after its 30 days and was refused as merely "
        "expired (or unknown), but the family's newest token (20 days of life left) still "
        "works: the expiry was checked before the reuse. A used token presented again "
        "proves a copy exists whatever its age; check `used` first and revoke the family, "
        "then expiry")


def test_a_family_revoked_on_one_instance_is_revoked_on_every_other(
        learner: Any, service: Service, redis_db: Any) -> None:
    """Several instances (processes) serve the same users: a family revoked by one - a reuse
    it detected, a logout it handled - is revoked for all, which only a flag kept in the
    database, read on every refresh(), does."""
    other = another_instance(learner, service, redis_db)
    _, stolen = service.login("alice")
    verdict, pair = other.refresh(stolen, "the user's refresh token, on another instance")
    assert verdict == "ok", f"refresh() on another instance refused a fresh token: {pair}"
    users_new = str(pair[1])
    verdict, _ = service.refresh(stolen, "a used refresh token (the thief's copy)")
    assert verdict == "refused", "refresh() accepted a refresh token that was already used"
    verdict, _ = other.refresh(users_new, "the newest token of a family revoked by a reuse "
                                          "another instance detected")
    assert verdict == "refused", (
        "a reuse detected by one instance revoked the family there only: another instance "
        "still rotated the family's newest token. The revocation is kept in the process "
        "(a set of revoked families, or a cache of the database's answer); keep it in the "
        "database, read by every refresh()")
    access, refresh = service.login("bob")
    verdict, _ = service.do("logout()", service.svc.logout, access, refresh)
    assert verdict == "ok", "logout() failed"
    verdict, _ = other.refresh(refresh, "a refresh token logged out on another instance")
    assert verdict == "refused", (
        "a refresh token logged out on one instance was still rotated by another: the "
        "logout revoked its family in that process only; revoke it in the database")


def test_tokens_it_never_issued_are_refused(service: Service) -> None:
    """Tokens that reach the service without having come from it: a guessed or mistyped
    refresh token, an access token forged, tampered with, unsigned or not a JWT at all,
    and each kind of token offered as the other. Each is refused with InvalidToken - the
    exception the caller turns into a 401 - never accepted and never another exception
    (a 500 that tells a prober which inputs reach which code)."""
    access, refresh = service.login("alice")
    claims = claims_of(access, "login()'s access token")
    head, _, rest = access.partition(".")
    signature = rest.partition(".")[2]
    tampered_claims = base64.urlsafe_b64encode(json.dumps(
        {**claims, "sub": "mallory"}, separators=(",", ":")).encode()).rstrip(b"=").decode()
    cases = [
        ("refresh", secrets.token_urlsafe(32), "a refresh token this service never issued",
         "its SHA-256 is in no row: unknown"),
        ("refresh", "", "an empty refresh token", "no token is in no row either"),
        ("refresh", access, "an access token given as a refresh token",
         "an access token is not a refresh token: no row holds its hash"),
        ("authenticate", pyjwt.encode(claims, b"not-the-service-secret-0123456789abcdef",
                                      algorithm="HS256"),
         "alice's claims signed with ANOTHER secret",
         "the signature must be checked with the service's secret: without it anyone "
         "writes any claims"),
        ("authenticate", f"{head}.{tampered_claims}.{signature}",
         "alice's token with its payload changed to sub 'mallory' (alice's signature kept)",
         "the signature covers the payload: a changed claim no longer matches it"),
        ("authenticate", pyjwt.encode(claims, "", algorithm="none"),
         "alice's claims with alg 'none' and no signature",
         "only HS256 is accepted: an unsigned token proves nothing"),
        ("authenticate", "not-a-jwt", "a string that is not a JWT", "it does not decode"),
        ("authenticate", refresh, "a refresh token given as an access token",
         "an opaque refresh token is not a JWT"),
    ]
    wrong = []
    for method, token, what, why in cases:
        verdict_, got = verdict(f"{method}() of {what}", getattr(service.svc, method), token,
                                refusal=service.module.InvalidToken)
        if verdict_ == "ok":
            wrong.append(f"{method}() accepted {what} (returned {str(got)[:80]!r}), "
                         f"expected InvalidToken: {why}")
        elif verdict_ == "crashed":
            wrong.append(f"{method}() of {what} raised {got}, expected InvalidToken: {why} - "
                         "a token that is not valid is refused with InvalidToken, never "
                         "another exception (the caller answers 401 for InvalidToken, and a "
                         "500 for anything else)")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(cases)} tokens the service never issued not refused)")


def test_expiry_on_the_injected_clock(service: Service) -> None:
    access, refresh = service.login("alice")
    # One login per refresh case (a refresh uses its token up), each at its clock.
    tokens = [refresh]
    for issued, *_ in REFRESH_EXPIRY[1:]:
        service.clock.now = issued
        tokens.append(service.login("alice")[1])
    service.clock.now = T0
    exp = claims_of(access, "the access token")["exp"]
    service.clock.now = exp - 1
    verdict, got = service.authenticate(access, "an access token 1 s before exp")
    assert verdict == "ok", (
        f"authenticate() refused a token 1 s before its exp: {got} - compare exp with "
        f"self.clock() (now {exp - 1}), not the wall clock or PyJWT's own exp check")
    service.clock.now = exp
    verdict, _ = service.authenticate(access, "an access token at its exp")
    if verdict == "ok":
        service.clock.now = exp + 1
        after, _ = service.authenticate(access, "an access token 1 s past its exp")
        assert after != "refused", (
            f"authenticate() accepted an access token at its exp ({exp}) but refused it "
            "1 s later: exp is the first instant the token is no longer valid (RFC 7519: "
            "the time must be BEFORE exp) - refuse when clock() >= exp")
    assert verdict == "refused", (
        "authenticate() accepted an access token at and 1 s after its exp (on the injected "
        "clock): compare exp with self.clock() and refuse from exp on")
    for offset, want, what in ACCESS_EXPIRY_FRACTIONS:
        service.clock.now = exp + offset
        verdict, got = service.authenticate(access, f"an access token {what}")
        saw = "accepted" if verdict == "ok" else f"refused ({got})"
        assert verdict == want, (
            f"authenticate() {saw} an access token {what} (exp {exp}, clock "
            f"{service.clock.now:.3f}), expected it "
            f"{'accepted' if want == 'ok' else 'refused'}: the clock has fractions of a "
            "second and exp is the first instant the token is refused (RFC 7519 4.1.4: "
            "not accepted on or after exp) - compare clock() >= exp as they are, without "
            "rounding either")
    # The case past the expiry goes before the one at its instant, so a token that never
    # expires is named as such.
    for token, (issued, offset, want, what, why) in zip(tokens, REFRESH_EXPIRY, strict=True):
        service.clock.now = issued + 30 * DAY + offset
        verdict, got = service.refresh(token, f"a refresh token {what}")
        saw = "accepted" if verdict == "ok" else f"refused ({got})"
        assert verdict == want, (
            f"refresh() {saw} a refresh token {what} (issued at clock {issued:.3f}, "
            f"presented at {service.clock.now:.3f}), expected it "
            f"{'accepted' if want == 'ok' else 'refused'}: {why}")


# An access token's exp is whole seconds (iat = int(clock())), the clock is not:
# (offset from exp, expected verdict, what the token is).
ACCESS_EXPIRY_FRACTIONS = [
    (-0.001, "ok", "1 ms before its exp"),
    (-0.6, "ok", "0.6 s before its exp"),
    (0.001, "refused", "1 ms past its exp"),
    (0.6, "refused", "0.6 s past its exp"),
]

# A refresh token issued at a clock with a fraction expires at that fraction, 30 days on:
# a whole-second expires_at (an integer column, int() or round()) moves it by up to 1 s.
ISSUED = T0 + 0.6
# (issued at, offset from issued + REFRESH_TTL, expected verdict, what the token is, why)
REFRESH_EXPIRY = [
    (T0, -1, "ok", "1 s before its 30 days (REFRESH_TTL) are up",
     "it expires at clock() + REFRESH_TTL, not earlier"),
    (T0, 1, "refused", "30 days and 1 s old",
     "a refresh token older than REFRESH_TTL is expired"),
    (T0, 0, "refused", "exactly 30 days old, at its expiry instant",
     "expires_at is the first instant it is no longer valid - valid while clock() < "
     "expires_at, as an access token stops at exp; accepted at the instant, it buys "
     "another full 30-day token one second past its life"),
    (ISSUED, 0.001, "refused", "30 days and 1 ms old, issued at a clock with a fraction",
     "expires_at is clock() + REFRESH_TTL to the fraction of a second: stored in whole "
     "seconds (an integer column rounds 0.6 up), the token outlives its 30 days"),
    (ISSUED, -0.001, "ok", "1 ms before its 30 days are up, issued at a clock with a "
     "fraction", "expires_at is clock() + REFRESH_TTL to the fraction of a second: stored "
     "in whole seconds (int() cuts 0.6 off), it expires before its 30 days are up"),
]


def test_a_rotated_refresh_token_lives_its_own_30_days(service: Service) -> None:
    """Each refresh token stored expires REFRESH_TTL after it is issued, a rotated one too:
    not with the login's token (a family that dies 30 days after login whatever its use),
    nor 30 days past the old token's expiry."""
    firsts = [service.login("alice")[1] for _ in range(2)]  # two sessions, two families
    rotated_at = T0 + 10 * DAY
    service.clock.now = rotated_at
    rotated = []
    for token in firsts:
        verdict, pair = service.refresh(token, "a 10-day-old refresh token")
        assert verdict == "ok", f"refresh() of a 10-day-old refresh token was refused: {pair}"
        rotated.append(str(pair[1]))
    service.clock.now = rotated_at + 30 * DAY - 1  # the login's 30 days are long over
    verdict, got = service.refresh(rotated[0], "a token rotated at day 10, on day 40")
    assert verdict == "ok", (
        f"refresh() refused ({got}) a refresh token issued by a rotation on day 10, 1 s "
        "before ITS 30 days are up (day 40): it expired with the login's token (day 30). "
        "Every refresh token stored expires at clock() + REFRESH_TTL when it is issued - "
        "not at the expiry of the token it replaces")
    service.clock.now = rotated_at + 30 * DAY + 1
    verdict, _ = service.refresh(rotated[1], "a token rotated at day 10, 30 days and 1 s on")
    assert verdict == "refused", (
        "refresh() accepted a refresh token issued by a rotation on day 10 when it was 30 "
        "days and 1 s old: its expiry was pushed further than clock() + REFRESH_TTL at its "
        "issue (the old token's expiry plus another REFRESH_TTL?) - a stolen token lives "
        "longer than REFRESH_TTL")


def test_redis_unreachable_fails_closed(service: Service) -> None:
    """The denylist is a security control: with Redis unreachable, authenticate() cannot
    tell a logged-out token from a live one, and logout() cannot write the entry. Both must
    fail (InvalidToken, or the Redis error for the caller's 503), never answer as if the
    denylist had been read or written."""
    access, refresh = service.login("alice")
    with socket.socket() as held:  # bound, never listening: every connection is refused
        held.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{held.getsockname()[1]}/0"
        seen, down = verdict("TokenService() with Redis unreachable", service.module.
                             TokenService, service.postgres.dsn, url, SECRET, service.clock,
                             refusal=service.module.InvalidToken)
        if seen != "ok":
            return  # it checks Redis when it starts: it fails closed from the start
        seen, got = verdict("authenticate() with Redis unreachable", down.authenticate,
                            access, refusal=service.module.InvalidToken)
        assert seen != "ok", (
            "authenticate() accepted alice's access token while Redis was unreachable "
            "(every connection refused): it could not read the denylist and let the token "
            "in as if it were not on it - a logged-out token passes the same way. Fail "
            "closed: let the Redis error out (the caller answers 503) or refuse with "
            "InvalidToken, never take 'could not check' for 'not denylisted'")
        seen, got = verdict("logout() with Redis unreachable", down.logout, access, refresh,
                            refusal=service.module.InvalidToken)
        assert seen != "ok", (
            "logout() returned as if done while Redis was unreachable (every connection "
            "refused): the jti was never denylisted, and the access token works again once "
            "Redis is back, while the caller told the user they were logged out. Let the "
            "Redis error out (or raise) so the logout is known to have failed and is "
            "retried, never swallow it")


def test_redis_dropping_mid_run_fails_closed(service: Service, redis_db: Any) -> None:
    """Redis answers the service (a service that checked it when it started), then goes
    away: connections cut, new ones closed at once. authenticate() and logout() must fail
    as they do with Redis unreachable from the start, not fall back to 'not denylisted'
    because Redis was fine a moment ago."""
    where = urllib.parse.urlsplit(redis_db.url)
    with Outage((where.hostname or "127.0.0.1", where.port or 6379)) as outage:
        svc = service.module.TokenService(service.postgres.dsn, outage.url_for(redis_db.url),
                                          SECRET, service.clock)
        watched = Service(service.module, svc, service.postgres, service.redis,
                          service.clock)
        access, refresh = watched.login("alice")
        seen, got = watched.authenticate(access, "a fresh access token, Redis up")
        assert seen == "ok", f"authenticate() of a fresh access token: {seen} {got}"
        outage.go_down()
        seen, got = verdict("authenticate() after Redis went away", svc.authenticate, access,
                            refusal=service.module.InvalidToken)
        assert seen != "ok", (
            "authenticate() accepted alice's access token after Redis went away MID-RUN (it "
            "had answered this service a moment before; then its connections were cut and "
            "new ones closed): it could not read the denylist and let the token in as if it "
            "were not on it. Redis being up when the service started (or at the last call) "
            "says nothing about now: fail closed on every Redis error - let it out (503) or "
            "refuse with InvalidToken, never take 'could not check' for 'not denylisted'")
        seen, got = verdict("logout() after Redis went away", svc.logout, access, refresh,
                            refusal=service.module.InvalidToken)
        assert seen != "ok", (
            "logout() returned as if done after Redis went away MID-RUN (it had answered "
            "this service a moment before; then its connections were cut and new ones "
            "closed): the jti was never denylisted, and the access token works again once "
            "Redis is back, while the caller told the user they were logged out. Let every "
            "Redis error out (or raise), whenever it happens, never swallow it")


def test_logout_denylists_the_jti_until_it_would_expire(service: Service) -> None:
    access, refresh = service.login("alice")
    other, _ = service.login("bob")
    _, laptop = service.login("alice")  # alice's other device: another family
    claims = claims_of(access, "the access token")
    service.clock.now = T0 + 100
    verdict, got = service.do("logout()", service.svc.logout, access, refresh)
    assert verdict == "ok", f"logout() failed: {got}"
    verdict, _ = service.authenticate(access, "a logged-out access token")
    assert verdict == "refused", (
        "authenticate() accepted an access token after logout: put its jti on the "
        "denylist in Redis and check the denylist on every authenticate()")
    keys = [k.decode() for k in service.redis.keys("*") if str(claims["jti"]) in k.decode()]
    assert keys, (f"no Redis key holds the jti {claims['jti']!r} after logout: the denylist "
                  "lives in Redis, one key per jti")
    ttl = service.redis.ttl(keys[0])
    remaining = claims["exp"] - (T0 + 100)
    assert 0 < ttl <= remaining, (
        f"the denylist key {keys[0]} has a TTL of {ttl}, expected 1..{remaining:.0f} s (what "
        "is left of the token's life): " + (
            "without a TTL the denylist grows forever" if ttl < 0 else
            "after exp the token is refused anyway, so the entry is dead weight"))
    verdict, _ = service.authenticate(other, "another user's access token")
    assert verdict == "ok", "logout() of alice also revoked bob's access token"
    verdict, _ = service.refresh(refresh, "the refresh token of a logged-out session")
    assert verdict == "refused", (
        "refresh() accepted the refresh token of a session that logged out: logout must "
        "revoke its family, or the next refresh brings the session back")
    verdict, got = service.refresh(laptop, "alice's other session's refresh token (another "
                                           "device, another family)")
    assert verdict == "ok", (
        f"after alice logged out on one device, her refresh token of ANOTHER login (another "
        f"device, another family) was refused ({got}): logout ends the session it is "
        "called for - revoke the family of the refresh token given, not every family of the "
        "user (a 'log out everywhere' is another operation)")


# Logouts at a clock with a fraction of a second: (what is left of the token's life, what).
# The denylist entry must outlive the token, never die first: Redis counts its TTL itself,
# EX in whole seconds, PX in milliseconds.
DENYLIST_FRACTIONS = [
    (0.4, "0.4 s before its exp (less than a second left)"),
    (100.9, "100.9 s before its exp"),
    (100.4, "100.4 s before its exp"),
]
# What Redis reads of a TTL in each command and option: (milliseconds per unit, absolute?).
EXPIRY_ARGS = {"EX": (1000, False), "PX": (1, False), "EXAT": (1000, True),
               "PXAT": (1, True), "SETEX": (1000, False), "PSETEX": (1, False),
               "EXPIRE": (1000, False), "PEXPIRE": (1, False), "EXPIREAT": (1000, True),
               "PEXPIREAT": (1, True)}


def ttl_given(at: float, command: list[str]) -> tuple[float, bool] | None:
    """(the TTL in ms a command gave its key, read from its arguments, whether it was an
    absolute expiry), or None for a command without one. An absolute expiry counts from
    the moment the command ran, by the server's clock (MONITOR's time)."""
    name = command[0]
    if name in ("SETEX", "PSETEX", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"):
        option, value = name, command[2] if len(command) > 2 else ""
    elif name in ("SET", "GETEX"):
        upper = [a.upper() for a in command]
        found = [i for i, a in enumerate(upper) if a in ("EX", "PX", "EXAT", "PXAT")
                 and i + 1 < len(command)]
        if not found:
            return None
        option, value = upper[found[-1]], command[found[-1] + 1]
    else:
        return None
    unit, absolute = EXPIRY_ARGS[option]
    try:
        ms = float(value) * unit
    except ValueError:
        return None
    return (ms - at * 1000 if absolute else ms), absolute


def test_denylist_outlives_the_token_at_fractional_clocks(service: Service,
                                                          redis_db: Any) -> None:
    """A logout at a clock with a fraction of a second: the access token is refused at
    once, and its denylist entry lives at least as long as the token would have (exp -
    clock(), exactly), at most a second more. An entry that expires first lets the revoked
    token in again for the rest of its life: int() of 100.9 s is 100 s, and of 0.4 s it is
    0 - no entry at all."""
    for remaining, when in DENYLIST_FRACTIONS:
        service.clock.now = T0
        access, refresh = service.login("alice")
        claims = claims_of(access, "the access token")
        jti = str(claims["jti"])
        service.clock.now = claims["exp"] - remaining
        with timed_redis_commands(redis_db) as seen:
            verdict_, got = service.do(f"logout() {when}", service.svc.logout, access,
                                       refresh)
        assert verdict_ == "ok", f"logout() {when} failed: {got}"
        verdict_, _ = service.authenticate(access, f"an access token logged out {when}")
        writes = [(at, c) for at, c in seen if len(c) > 1 and jti in c[1]]
        assert verdict_ == "refused", (
            f"authenticate() accepted an access token logged out {when} (clock "
            f"{service.clock.now:.3f}, exp {claims['exp']}): the logout wrote "
            f"{[' '.join(c) for _, c in writes] or 'nothing about its jti'} to Redis, and "
            f"no entry denies it now. With {remaining} s left, a TTL rounded down to whole "
            f"seconds is {int(remaining)} s{' - no entry at all' if int(remaining) == 0 else ''}"
            ": the revoked token stays valid for the rest of its life. Round the TTL UP "
            "(math.ceil), or give it in milliseconds (PX / PEXPIRE); an absolute expiry "
            "(EXAT) is on Redis's clock, not the injected one")
        given = [(told, c) for at, c in writes if (told := ttl_given(at, c)) is not None]
        if not given:
            continue  # no TTL at all: test_logout_denylists_the_jti_until_it_would_expire
        (ttl, absolute), command = given[-1]
        # A relative TTL is exact (to Redis's millisecond); an absolute expiry is computed
        # on the learner's side of the wire, before the command ran: its way is allowed for.
        slack = 250 if absolute else 1
        left = (claims["exp"] - service.clock.now) * 1000
        assert ttl >= left - slack, (
            f"logout() {when} gave the denylist entry a TTL of {ttl / 1000:.3f} s "
            f"({' '.join(command)}), while the token had {remaining} s left: the entry "
            f"expires {remaining - ttl / 1000:.3f} s BEFORE the token, which is accepted "
            "again for the rest of its life. Redis counts the TTL itself, and EX takes "
            "whole seconds: round what is left UP (math.ceil), or give milliseconds (PX / "
            "PEXPIRE), never int() or round()")
        assert ttl <= left + 1000 + slack, (
            f"logout() {when} gave the denylist entry a TTL of {ttl / 1000:.3f} s "
            f"({' '.join(command)}), for a token with {remaining} s left: past its exp the "
            "token is refused anyway, so the entry is dead weight (at most what is left, "
            "rounded up to the second)")


def waiting_on_lock(service: Service) -> bool:
    with service.postgres.connect(autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND wait_event_type = 'Lock'").fetchone()
    return bool(row and row[0])


def test_two_concurrent_refreshes_of_one_token(service: Service) -> None:
    """Two refreshes of the same token race: the first is stopped at its 1st, 2nd, then 3rd
    call of the clock (wherever it stands between reading the token and marking it used)
    while the second runs to its end (or waits on a lock). At most one may succeed."""
    for step in (1, 2, 3):
        results = race_once(service, step)
        if results is None:
            break  # refresh() calls the clock fewer times: every step was tried
        both = [n for n in ("first", "second") if results.get(n, ("",))[0] == "ok"]
        assert len(both) < 2, (
            "two concurrent refresh() calls with the SAME refresh token both succeeded (the "
            f"first was held at its clock call {step} while the second ran): each got a new "
            "token, so a thief racing the user is never detected. 'Is it unused?' and "
            "'mark it used' are two steps another refresh slips between: make them one - "
            "UPDATE ... SET used = true WHERE token_hash = %s AND NOT used and check the "
            "rowcount, or SELECT ... FOR UPDATE in the same transaction as the UPDATE")


def race_once(service: Service, step: int) -> dict[str, tuple[str, Any]] | None:
    _, token = service.login("alice")
    return hold_first_at_clock_call(
        service, step, lambda: service.refresh(token, "refresh() (first)"),
        lambda: service.refresh(token, "refresh() (second)"))


def hold_first_at_clock_call(service: Service, step: int, first_call: Call,
                             second_call: Call) -> dict[str, tuple[str, Any]] | None:
    """first_call() stopped at its step-th call of the clock while second_call() runs to
    its end (or waits for a lock), then let go: their verdicts as "first" and "second", or
    None when first_call() calls the clock fewer times."""
    clock = service.clock
    clock.arrived.clear()
    clock.release.clear()
    clock.hold = step
    results: dict[str, tuple[str, Any]] = {}

    def run(name: str, call: Call) -> None:
        results[name] = call()

    first = threading.Thread(target=run, args=("first", first_call), daemon=True)
    second = threading.Thread(target=run, args=("second", second_call), daemon=True)
    first.start()
    try:
        wait_until(lambda: clock.arrived.is_set() or not first.is_alive(),
                   "the first call to call the clock")
        clock.hold = 0
        if not clock.arrived.is_set():
            first.join(timeout=30)
            return None
        second.start()
        wait_until(lambda: not second.is_alive() or waiting_on_lock(service),
                   "the second call to finish or wait for a lock")
    finally:
        clock.hold = 0
        clock.release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    return results


def test_a_refresh_in_flight_when_its_family_is_revoked(service: Service) -> None:
    """The user's refresh is stopped at its 1st, 2nd, then 3rd call of the clock (between
    reading its token and storing the new one) while the thief's copy of the family's used
    token comes back and revokes the family. The user's refresh may succeed, but the token
    it returns belongs to a revoked family: it must be refused."""
    for step in (1, 2, 3):
        if not revoke_race(service, step):
            break  # refresh() calls the clock fewer times: every step was tried


def revoke_race(service: Service, step: int) -> bool:
    _, stolen = service.login("alice")
    verdict, pair = service.refresh(stolen, "the user's refresh token")
    assert verdict == "ok", f"refresh() refused a fresh token: {pair}"
    current = str(pair[1])
    results = hold_first_at_clock_call(
        service, step, lambda: service.refresh(current, "the user's refresh token (in flight)"),
        lambda: service.refresh(stolen, "a used refresh token (the thief's copy)"))
    if results is None:
        return False
    user = results.get("first", ("", None))
    if user[0] != "ok":
        return True
    verdict, _ = service.refresh(str(user[1][1]), "the token a refresh in flight returned "
                                                  "while its family was revoked")
    assert verdict == "refused", (
        "a refresh in flight while a reused token revoked its family (held at its clock "
        f"call {step} while the thief's copy came back) returned a new refresh token that "
        "still works: the revocation marked or deleted the family's tokens that existed at "
        "that moment, and the refresh stored its new one right after. Revoke the FAMILY (a "
        "revoked flag on a family row, checked on every refresh), so a token stored later "
        "belongs to a revoked family too")
    return True


def test_logout_on_one_instance_denies_the_token_on_another(learner: Any, service: Service,
                                                            redis_db: Any) -> None:
    """The service runs as several instances (processes) behind a load balancer: a logout
    handled by one must deny the access token on every other, which only a denylist kept in
    Redis, read on every authenticate(), does."""
    other = another_instance(learner, service, redis_db)
    access, refresh = service.login("alice")
    verdict, got = other.authenticate(access, "an access token, on another instance")
    assert verdict == "ok", f"another instance refused a fresh access token: {got}"
    service.clock.now = T0 + 100
    verdict, got = service.do("logout()", service.svc.logout, access, refresh)
    assert verdict == "ok", f"logout() failed: {got}"
    verdict, _ = other.authenticate(access, "an access token logged out on another instance")
    assert verdict == "refused", (
        "an access token logged out on one instance of the service was accepted by another "
        "instance (which had authenticated it before): the denylist it read is kept in its "
        "own process - a set of revoked jtis, or a cache of Redis's answers - and sees only "
        "its own logouts. Every authenticate() must ask Redis (EXISTS denylist:<jti>), the "
        "one denylist all instances share")


def test_logout_with_an_expired_access_token(service: Service) -> None:
    access, refresh = service.login("alice")
    exp = claims_of(access, "the access token")["exp"]
    service.clock.now = exp + 60  # the user comes back after the access token lapsed
    verdict, got = service.do("logout() with an expired access token", service.svc.logout,
                              access, refresh)
    assert verdict == "ok", (
        f"logout() with an access token that has already expired raised ({got}): logging "
        "out must still revoke the refresh token's family - an expired access token needs "
        "no denylist entry, but the refresh token lives 30 days")
    verdict, got = service.refresh(refresh, "the refresh token of a session that logged "
                                            "out with an expired access token")
    assert verdict == "refused", (
        "after logout() with an expired access token, the refresh token still works: "
        "revoke the family whatever the state of the access token (an expired one is the "
        "usual case at logout)")
