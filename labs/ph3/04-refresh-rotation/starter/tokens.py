"""Short-lived access tokens and rotated refresh tokens. See README.md."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

ACCESS_TTL = 300                 # 5 minutes
REFRESH_TTL = 30 * 24 * 3600     # 30 days


class InvalidToken(Exception):
    """An access or refresh token that is not (or no longer) valid."""


class TokenService:
    def __init__(self, dsn: str, redis_url: str, secret: bytes,
                 clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.redis_url = redis_url
        self.secret = secret
        self.clock = clock

    def setup(self) -> None:
        """Create your tables."""

    def login(self, user_id: str) -> tuple[str, str]:
        """(access token, refresh token) for a new session (a new family)."""
        raise NotImplementedError("login(): issue an access JWT and a refresh token")

    def refresh(self, refresh_token: str) -> tuple[str, str]:
        """Rotate: a new access token and a new refresh token; the old one is used up."""
        raise NotImplementedError("refresh(): rotate, and detect reuse")

    def authenticate(self, access_token: str) -> dict[str, Any]:
        """The access token's claims, or InvalidToken."""
        raise NotImplementedError("authenticate(): verify, check exp and the denylist")

    def logout(self, access_token: str, refresh_token: str) -> None:
        """Denylist the access token's jti, revoke the refresh token's family."""
        raise NotImplementedError("logout()")
