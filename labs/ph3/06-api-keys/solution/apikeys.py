"""API keys: CSPRNG generation with a lookup prefix, SHA-256 at rest, constant-time
compare, scopes, rotation with a grace period. Served as a WSGI app."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id         bigserial PRIMARY KEY,
    prefix     text UNIQUE NOT NULL,
    key_hash   text NOT NULL,
    owner      text NOT NULL,
    scopes     text[] NOT NULL,
    expires_at double precision,          -- epoch seconds; NULL = no end
    revoked    boolean NOT NULL DEFAULT false
)
"""
SCOPES = {("GET", "/reports"): "reports:read", ("POST", "/reports"): "reports:write"}


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, dsn: str, clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.clock = clock

    def _conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def setup(self) -> None:
        with self._conn() as conn:
            conn.execute(SCHEMA)

    def create(self, owner: str, scopes: list[str]) -> str:
        prefix = secrets.token_hex(6)              # public part: finds the row
        key = f"lk_{prefix}_{secrets.token_urlsafe(32)}"  # 256 secret bits
        with self._conn() as conn:
            conn.execute("INSERT INTO api_keys (prefix, key_hash, owner, scopes) "
                         "VALUES (%s, %s, %s, %s)", (prefix, _hash(key), owner, list(scopes)))
        return key  # shown once; only its hash is kept

    def _row(self, key: str) -> tuple[Any, ...] | None:
        parts = key.split("_", 2) if isinstance(key, str) else []
        # The prefix goes to Postgres: only the shape create() makes (a NUL byte, which a
        # text column cannot hold, would raise instead of being an unknown key: a 500).
        if len(parts) != 3 or parts[0] != "lk" or not (parts[1].isascii()
                                                       and parts[1].isalnum()):
            return None
        with self._conn() as conn:
            row = conn.execute("SELECT id, key_hash, owner, scopes, expires_at, revoked "
                               "FROM api_keys WHERE prefix = %s", (parts[1],)).fetchone()
        if row is None or not hmac.compare_digest(row[1], _hash(key)):
            return None
        if row[5] or (row[4] is not None and self.clock() >= row[4]):
            return None
        return row

    def authenticate(self, key: str) -> dict[str, Any] | None:
        row = self._row(key)
        return None if row is None else {"owner": row[2], "scopes": list(row[3])}

    def rotate(self, key: str, grace_seconds: float) -> str:
        row = self._row(key)
        if row is None:
            raise ValueError("not a valid key")
        now = self.clock()
        end = now + grace_seconds                 # the old key overlaps until then
        with self._conn() as conn, conn.transaction():
            # The key is checked again in the write: a revoke that committed since the read
            # above leaves no row to update and nothing is issued (a revoked key never gives
            # birth to a working one); the row lock holds a later revoke until we commit.
            if conn.execute("UPDATE api_keys SET expires_at = LEAST(COALESCE(expires_at, %s), "
                            "%s) WHERE id = %s AND NOT revoked AND (expires_at IS NULL OR "
                            "expires_at > %s)", (end, end, row[0], now)).rowcount != 1:
                raise ValueError("the key was revoked or ended meanwhile")
            return self.create(row[2], list(row[3]))

    def revoke(self, key: str) -> None:
        row = self._row(key)
        if row is not None:
            with self._conn() as conn:
                conn.execute("UPDATE api_keys SET revoked = true WHERE id = %s", (row[0],))


def make_app(store: KeyStore) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def reply(status: str, document: Any, extra: tuple[tuple[str, str], ...] = ()
                  ) -> Iterable[bytes]:
            body = json.dumps(document).encode()
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body))), *extra])
            return [body]

        needed = SCOPES.get((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        if needed is None:
            return reply("404 Not Found", {"error": "no such route"})
        scheme, _, key = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        found = store.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            return reply("401 Unauthorized", {"error": "missing or invalid API key"},
                         (("WWW-Authenticate", "Bearer"),))
        if needed not in found["scopes"]:
            return reply("403 Forbidden", {"error": f"this key lacks the scope {needed}"})
        if environ["REQUEST_METHOD"] == "POST":
            return reply("201 Created", {"owner": found["owner"], "created": True})
        return reply("200 OK", {"owner": found["owner"], "reports": []})

    return app
