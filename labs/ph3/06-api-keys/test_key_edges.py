"""ph3.6 verification, edges: a key Postgres cannot hold (a NUL byte in its prefix) is an
invalid key like any other - 401 over HTTP, None from authenticate(), ValueError from
rotate(), nothing done by revoke() - never a crash; and the store leaves no transaction
open once a call has returned (psycopg 3 opens one on a connection's first statement unless
it is in autocommit mode). The main checks are in test_api_keys.py (test files do not
import each other: the few helpers both need are each file's own)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from labrunner.testing import HttpReply, http_request, serve_wsgi

T0 = 1_700_000_000.0


@dataclass
class Keys:
    module: Any
    store: Any
    host: str

    def get(self, key: str) -> HttpReply:
        return http_request(self.host, "GET", "/reports", None,
                            {"Authorization": f"Bearer {key}"}, timeout=10)


@pytest.fixture
def keys(learner: Any, postgres: Any) -> Iterator[Keys]:
    module = learner.load("apikeys")
    try:
        store = module.KeyStore(postgres.dsn, lambda: T0)
        store.setup()
        app = module.make_app(store)
    except NotImplementedError as exc:
        pytest.fail(f"not implemented yet: {exc}", pytrace=False)
    with serve_wsgi(app) as host:
        yield Keys(module, store, host)


def with_nul(key: str) -> str:
    """The key with a NUL byte in the middle of its prefix (the secret unchanged)."""
    _, prefix, secret = key.split("_", 2)
    return f"lk_{prefix[:4]}\x00{prefix[4:]}_{secret}"


def test_a_key_postgres_cannot_hold_is_refused_not_crashed(keys: Keys) -> None:
    """Postgres text holds no NUL byte (psycopg raises DataError before sending it): a
    prefix looked up as it came turns one odd header into an exception - a 500 for anyone
    who sends it, and no ValueError from rotate()."""
    real = keys.store.create("partner", ["reports:read"])
    odd = with_nul(real)
    reply = keys.get(odd)
    assert reply.status == 401, (
        f"GET /reports with a key whose prefix holds a NUL byte answered {reply.status} "
        f"{reply.body[:80]!r}, expected 401: a key that is not one is an invalid key. "
        "Postgres text cannot hold a NUL byte (psycopg raises DataError before the query "
        "is sent): check the prefix's shape (letters and digits, as create() makes it) "
        "before looking it up")
    calls: list[tuple[str, Callable[[], Any], str]] = [
        ("authenticate", lambda: keys.store.authenticate(odd), "return None"),
        ("rotate", lambda: keys.store.rotate(odd, 60), "raise ValueError"),
        ("revoke", lambda: keys.store.revoke(odd), "change nothing")]
    for name, call, want in calls:
        got: Any
        try:
            got = call()
        except Exception as exc:  # noqa: BLE001 - judged here, with the learner's words
            if name == "rotate" and isinstance(exc, ValueError):
                continue
            pytest.fail(f"{name}() of a key whose prefix holds a NUL byte raised "
                        f"{type(exc).__name__}: {exc}, expected it to {want} (not a valid "
                        "key): check the prefix's shape before it reaches Postgres, whose "
                        "text cannot hold a NUL byte", pytrace=False)
        assert name != "authenticate" or got is None, (
            f"authenticate() of a key whose prefix holds a NUL byte returned {got!r}, "
            "expected None")
        assert name != "rotate" or isinstance(got, ValueError), (
            f"rotate() of a key whose prefix holds a NUL byte returned {got!r}, expected "
            "ValueError: it is not a valid key")
    reply = keys.get(real)
    assert reply.status == 200, (
        f"the real key answered {reply.status} after rotate() and revoke() of its prefix "
        "with a NUL byte in it, expected 200: neither may touch a key it was not shown")


IDLE_IN_TRANSACTION = (
    "SELECT state, query FROM pg_stat_activity WHERE datname = current_database() "
    "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%' ORDER BY pid")


def test_no_transaction_left_open_between_calls(keys: Keys, postgres: Any) -> None:
    """Every call of the store, and every request, ends its transactions: a connection
    left 'idle in transaction' holds its snapshot (VACUUM cannot remove what it might still
    see) and its locks (an ALTER TABLE of the keys table waits behind it) for as long as the
    process lives. Its sessions are read in pg_stat_activity after each call has returned,
    refusals included (an early return skips a commit at the end)."""
    key = keys.store.create("partner", ["reports:read"])
    _, prefix, secret = key.split("_", 2)
    post = {"Authorization": f"Bearer {key}"}
    steps: list[tuple[str, Callable[[], Any], Any]] = [
        ("create()", lambda: keys.store.create("other", ["reports:read"]) != "", True),
        ("GET with a valid key", lambda: keys.get(key).status, 200),
        ("POST with a key that lacks reports:write",
         lambda: http_request(keys.host, "POST", "/reports", b"{}", post, timeout=10).status,
         403),
        ("GET with a real prefix and a made-up secret",
         lambda: keys.get(f"lk_{prefix}_{'A' * len(secret)}").status, 401),
        ("GET with an unknown key", lambda: keys.get("lk_0123456789ab_nothing").status, 401),
        ("authenticate() of a valid key", lambda: keys.store.authenticate(key) is not None,
         True),
        ("rotate() with a 60 s grace", lambda: isinstance(keys.store.rotate(key, 60), str),
         True),
        ("revoke()", lambda: keys.store.revoke(key), None),
    ]
    with postgres.connect(autocommit=True) as conn:
        for what, step, want in steps:
            got = step()
            assert got == want, f"{what}: got {got!r}, expected {want!r}"
            left = conn.execute(IDLE_IN_TRANSACTION).fetchall()
            assert not left, (
                f"after {what}, {len(left)} connection(s) of the store sat '{left[0][0]}' "
                f"(last statement: {' '.join(str(left[0][1]).split())[:100]}), expected "
                "none: a transaction was left open. psycopg 3 opens a transaction on the "
                "first statement of a connection that is not in autocommit mode, and it "
                "lasts until commit() or rollback() - on every path, the early return of a "
                "refused key too. Open the connection with autocommit=True, or use it as a "
                "context manager (with conn: ... commits), or wrap the work in with "
                "conn.transaction(). An open transaction holds its snapshot (VACUUM cannot "
                "clean behind it) and its locks (an ALTER TABLE waits for it)")
