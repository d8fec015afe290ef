"""Verification for ph3.6: the learner's API-key store on a real Postgres, served as a WSGI
app on a loopback port and called over real HTTP.

What is at rest is read from the database itself (every row of every table, as JSON):
no key, no secret part, and the SHA-256 of the key is there. Which comparison
authenticate() uses is observed where the learner's code runs (harness.py wraps
hmac.compare_digest), and whether keys come from a CSPRNG is observed by seeding Python's
`random` there and making two keys. Rotation runs on an injected clock."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from labrunner.testing import HttpReply, PgStatementProxy, http_request, serve_wsgi

T0 = 1_700_000_000.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    module: Any
    store: Any
    host: str
    postgres: Any
    proxy: PgStatementProxy
    clock: Clock = field(default_factory=Clock)

    def create(self, owner: str, scopes: list[str]) -> str:
        key = self.store.create(owner, scopes)
        assert isinstance(key, str), f"create() returned {type(key).__name__}, expected str"
        assert re.fullmatch(r"lk_[A-Za-z0-9]+_[A-Za-z0-9_-]+", key), (
            f"create() returned {key!r}, expected lk_<prefix>_<secret> (the prefix letters "
            "and digits only, the secret base64url or hex): a prefix with '_' or '-' in it "
            "(secrets.token_urlsafe) makes the key split in the wrong place - use "
            "secrets.token_hex for the prefix")
        return key

    def call(self, method: str, key: str | None, scheme: str = "Bearer") -> HttpReply:
        headers = {"Authorization": f"{scheme} {key}"} if key is not None else {}
        return http_request(self.host, method, "/reports",
                            b"{}" if method == "POST" else None, headers, timeout=10)

    def at_rest(self) -> str:
        """Every row of every table in the database, as JSON text."""
        with self.postgres.connect(autocommit=True) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) "
                "FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
                "'information_schema')").fetchall()]
            rows = [str(r[0]) for t in tables
                    for r in conn.execute(f"SELECT row_to_json(t)::text FROM {t} t")]
        return "\n".join(rows)


@pytest.fixture
def api(learner: Any, postgres: Any) -> Iterator[Api]:
    module = learner.load("apikeys")
    proxy = PgStatementProxy.for_dsn(postgres.dsn)
    clock = Clock()
    try:
        store = module.KeyStore(proxy.dsn_for(postgres.dsn), clock)
        store.setup()
        app = module.make_app(store)
    except NotImplementedError as exc:
        proxy.close()
        pytest.fail(f"not implemented yet: {exc}", pytrace=False)
    try:
        with serve_wsgi(app) as host:
            yield Api(module, store, host, postgres, proxy, clock)
    finally:
        proxy.close()


def expect(api: Api, method: str, key: str | None, status: int, what: str, why: str) -> None:
    reply = api.call(method, key)
    assert reply.status == status, (
        f"{method} /reports with {what} answered {reply.status} {reply.body[:100]!r}, "
        f"expected {status}: {why}")


def test_keys_are_random_and_not_stored_in_plaintext(api: Api, learner: Any) -> None:
    # 60 keys: a prefix drawn from an alphabet with '_' or '-' (token_urlsafe) shows one
    # in about 1 key in 5, so the format is checked on enough keys to see it.
    keys = [api.create(f"team-{i}", ["reports:read"]) for i in range(60)]
    assert len(set(keys)) == len(keys) and len({k.split("_")[1] for k in keys}) == len(keys), (
        "create() returned repeated keys or prefixes: each key needs a prefix and a secret "
        "of its own")
    secret = keys[0].split("_", 2)[2]
    assert len(secret) >= 32, (
        f"the secret part {secret!r} has {len(secret)} characters: use at least 128 "
        "random bits, e.g. secrets.token_urlsafe(32)")
    seeded = learner.harness().keys_after_seeding(api.store, "seeded", ["reports:read"])
    assert seeded[0].split("_", 2)[2] != seeded[1].split("_", 2)[2], (
        "two keys made right after random.seed(1234) have the same secret: the key comes "
        "from Python's random module, a PRNG whose output can be predicted from a few "
        "samples. Use the secrets module (the OS CSPRNG)")
    dump = api.at_rest()
    leaked = [k for k in keys if k in dump or k.split("_", 2)[2] in dump]
    assert not leaked, (
        f"the database holds {len(leaked)} of the keys (or their secret part) in "
        "plaintext: anyone who reads a backup can use them. Store only SHA-256(key)")
    missing = [k for k in keys if hashlib.sha256(k.encode()).hexdigest() not in dump]
    assert not missing, (
        f"the SHA-256 of {len(missing)} keys is not in the database (looked for the "
        "lower-case hex digest of the whole key): store hashlib.sha256(key).hexdigest()")


def test_scopes_401_and_403_over_http(api: Api) -> None:
    reader = api.create("analytics", ["reports:read"])
    writer = api.create("etl", ["reports:read", "reports:write"])
    expect(api, "GET", reader, 200, "a key with reports:read", "the key has the scope")
    for scheme in ("bearer", "BEARER"):
        reply = api.call("GET", reader, scheme)
        assert reply.status == 200, (
            f"GET /reports with 'Authorization: {scheme} <a valid key>' answered "
            f"{reply.status}, expected 200: the authentication scheme is case-insensitive "
            "(RFC 9110 11.1) - compare it with scheme.lower() == 'bearer'")
    expect(api, "POST", writer, 201, "a key with reports:write", "the key has the scope")
    expect(api, "POST", reader, 403, "a read-only key",
           "the key is valid but lacks reports:write: 403 Forbidden (401 is for keys "
           "that are missing or not valid)")
    expect(api, "GET", None, 401, "no key", "no Authorization header")
    prefix = reader.split("_", 2)[1]
    forged = f"lk_{prefix}_{'A' * len(reader.split('_', 2)[2])}"
    expect(api, "GET", forged, 401, "a real key's prefix and a made-up secret",
           "the prefix only finds the row; the whole key's hash must match")
    expect(api, "GET", reader[:-1], 401, "a key missing its last character",
           "not the key")
    expect(api, "GET", "lk_nope_nothing", 401, "an unknown key", "not a key")
    api.store.revoke(writer)
    expect(api, "POST", writer, 401, "a revoked key", "revoked keys are refused at once")


def test_lookup_by_prefix_compared_in_constant_time(api: Api, learner: Any) -> None:
    key = api.create("billing", ["reports:read"])
    digest = hashlib.sha256(key.encode()).hexdigest()
    api.proxy.take()
    watch = learner.harness().watch(api.module)
    try:
        found = api.store.authenticate(key)
    finally:
        calls = watch.calls()
        watch.stop()
    statements = api.proxy.take()
    assert isinstance(found, dict) and found.get("owner") == "billing", (
        f"authenticate() of a valid key returned {found!r}, expected "
        "{'owner': 'billing', 'scopes': ['reports:read']}")
    wanted = {digest, digest.encode(), bytes.fromhex(digest)}
    assert any(wanted & {a, b} for a, b in calls), (
        "authenticate() compared the key's hash without hmac.compare_digest (called "
        f"{len(calls)} time(s), never with the stored hash): '==' stops at the first "
        "differing byte, and its timing tells an attacker how much of a guess is right")
    reads = [s for s in statements if s.lower().lstrip().startswith("select")]
    scans = [s for s in reads if " where " not in f" {s.lower()} "]
    assert reads and not scans, (
        "authenticate() read the keys without a WHERE clause "
        f"({scans[0][:120] if scans else 'no SELECT at all'}): look the row up by the "
        "key's prefix (an indexed column), then compare the hash of that one row")
    prefix = key.split("_", 2)[1]
    for sql in reads:
        plan = plan_without_seqscan(api, sql, [prefix, key, digest])
        if plan is not None and "Seq Scan" in plan:
            pytest.fail(
                f"authenticate()'s lookup ({' '.join(sql.split())[:120]}) has no index to "
                "use: even with sequential scans disabled Postgres plans a Seq Scan - every "
                "request reads every key. Make the prefix column UNIQUE (or index it)",
                pytrace=False)


def plan_without_seqscan(api: Api, sql: str, values: list[str]) -> str | None:
    """EXPLAIN of the learner's statement with sequential scans disabled (so any usable
    index is taken, however small the table); its $n parameters are tried with each of
    `values` (the prefix, the key, its hash): the plan of the first that runs."""
    import psycopg

    params = sorted(set(re.findall(r"\$(\d+)", sql)), key=int)
    if len(params) > 1:
        return None  # only the one-parameter lookups are judged
    with api.postgres.connect(autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        for value in values:
            text = sql.replace(f"${params[0]}", "%s") if params else sql
            try:
                rows = conn.execute(f"EXPLAIN {text}", (value,) if params else None
                                    ).fetchall()
            except psycopg.Error:
                continue
            return "\n".join(str(r[0]) for r in rows)
    return None


def test_rotation_overlaps_until_the_grace_ends(api: Api) -> None:
    old = api.create("partner", ["reports:read", "reports:write"])
    new = api.store.rotate(old, 3600)
    assert isinstance(new, str) and new != old, f"rotate() returned {new!r}, expected a new key"
    expect(api, "POST", new, 201, "the rotated-in key",
           "the new key has the old key's owner and scopes")
    api.clock.now = T0 + 3599
    expect(api, "GET", old, 200, "the old key 3599 s into a 3600 s grace period",
           "during the grace period both keys work, so clients can switch without an "
           "outage")
    api.clock.now = T0 + 3600
    expect(api, "GET", old, 401, "the old key when the grace period has ended",
           "after the grace period the old key is refused")
    expect(api, "GET", new, 200, "the new key after the grace period", "it stays valid")


def test_rotating_again_never_extends_the_old_keys_end(api: Api) -> None:
    """A key already ending (rotated, or leaked and rotated in a hurry) keeps the earliest
    end it was given: rotating it again during its grace issues another key, but must not
    move its end later - or a leaked key could be kept alive for ever, one rotation at a
    time."""
    old = api.create("partner", ["reports:read"])
    api.store.rotate(old, 3600)                 # ends at T0 + 3600
    api.clock.now = T0 + 3000
    again = api.store.rotate(old, 3600)         # would end at T0 + 6600
    assert isinstance(again, str) and again != old, (
        f"rotate() of a key in its grace period returned {again!r}, expected a new key")
    api.clock.now = T0 + 3600
    expect(api, "GET", old, 401,
           "the old key at 3600 s, rotated at 0 s (grace 3600 s) and again at 3000 s",
           "a second rotation must not extend the end the first one set (T0 + 3600): the "
           "end of a key only ever moves earlier - keep the earlier of the two ends "
           "(LEAST(expires_at, new end))")
    expect(api, "GET", again, 200, "the key the second rotation issued", "it stays valid")
