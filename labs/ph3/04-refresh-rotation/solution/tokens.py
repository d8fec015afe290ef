"""Short-lived access tokens (JWT, verified without a lookup) and long-lived refresh tokens
(opaque, hashed in Postgres, rotated on every use, a reuse revokes the whole family), with a
jti denylist in Redis for access tokens that must die before they expire."""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

import jwt
import psycopg
import redis

ACCESS_TTL = 300                 # 5 minutes
REFRESH_TTL = 30 * 24 * 3600     # 30 days
DENY = "denylist:"

SCHEMA = """
CREATE TABLE IF NOT EXISTS refresh_families (
    id       text PRIMARY KEY,
    user_id  text NOT NULL,
    revoked  boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash text PRIMARY KEY,
    family_id  text NOT NULL REFERENCES refresh_families (id),
    expires_at double precision NOT NULL,
    used       boolean NOT NULL DEFAULT false
);
"""


class InvalidToken(Exception):
    """An access or refresh token that is not (or no longer) valid."""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenService:
    def __init__(self, dsn: str, redis_url: str, secret: bytes,
                 clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.redis = redis.Redis.from_url(redis_url)
        self.secret = secret
        self.clock = clock

    def setup(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)

    def _access(self, user_id: str) -> str:
        now = int(self.clock())
        claims = {"sub": user_id, "iat": now, "exp": now + ACCESS_TTL,
                  "jti": secrets.token_urlsafe(16)}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def _new_refresh(self, conn: psycopg.Connection[Any], family: str) -> str:
        token = secrets.token_urlsafe(32)
        conn.execute("INSERT INTO refresh_tokens (token_hash, family_id, expires_at) "
                     "VALUES (%s, %s, %s)", (_hash(token), family, self.clock() + REFRESH_TTL))
        return token

    def login(self, user_id: str) -> tuple[str, str]:
        family = secrets.token_urlsafe(16)
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            conn.execute("INSERT INTO refresh_families (id, user_id) VALUES (%s, %s)",
                         (family, user_id))
            refresh = self._new_refresh(conn, family)
        return self._access(user_id), refresh

    def refresh(self, refresh_token: str) -> tuple[str, str]:
        with psycopg.connect(self.dsn) as conn:
            with conn.transaction():
                row = conn.execute(
                    "SELECT t.family_id, t.used, t.expires_at, f.revoked, f.user_id "
                    "FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id "
                    "WHERE t.token_hash = %s FOR UPDATE", (_hash(refresh_token),)).fetchone()
                if row is None:
                    raise InvalidToken("unknown refresh token")
                family, used, expires_at, revoked, user_id = row
                if used:
                    # Reuse: someone holds a copy. Kill the family: the thief's and the
                    # user's tokens alike; the user logs in again.
                    conn.execute("UPDATE refresh_families SET revoked = true WHERE id = %s",
                                 (family,))
            if used:
                raise InvalidToken("refresh token reused: the whole family is revoked")
            if revoked:
                raise InvalidToken("refresh token family revoked")
            if self.clock() >= expires_at:
                raise InvalidToken("refresh token expired")
            with conn.transaction():
                done = conn.execute("UPDATE refresh_tokens SET used = true "
                                    "WHERE token_hash = %s AND NOT used",
                                    (_hash(refresh_token),)).rowcount
                if done != 1:
                    raise InvalidToken("refresh token already used")
                new_refresh = self._new_refresh(conn, family)
        return self._access(user_id), new_refresh

    def authenticate(self, access_token: str) -> dict[str, Any]:
        try:
            claims = jwt.decode(access_token, self.secret, algorithms=["HS256"],
                                options={"verify_exp": False, "verify_iat": False,
                                         "require": ["exp", "jti", "sub"]})
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        if self.clock() >= claims["exp"]:  # the injected clock, not PyJWT's
            raise InvalidToken("access token expired")
        if self.redis.exists(DENY + str(claims["jti"])):
            raise InvalidToken("access token revoked")
        return claims

    def logout(self, access_token: str, refresh_token: str) -> None:
        try:
            claims = self.authenticate(access_token)
        except InvalidToken:
            claims = None
        if claims is not None:
            remaining = claims["exp"] - self.clock()
            if remaining > 0:
                # Denylisted as long as the token would have lived, and never less: EX
                # takes whole seconds, and int() of what is left would let the revoked
                # token in again for its last fraction of a second. Milliseconds, rounded up.
                self.redis.set(DENY + str(claims["jti"]), "1",
                               px=math.ceil(remaining * 1000))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("UPDATE refresh_families SET revoked = true WHERE id = "
                         "(SELECT family_id FROM refresh_tokens WHERE token_hash = %s)",
                         (_hash(refresh_token),))
