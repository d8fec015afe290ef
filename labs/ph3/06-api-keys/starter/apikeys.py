"""API keys: CSPRNG generation with a lookup prefix, SHA-256 at rest, constant-time
compare, scopes, rotation with a grace period. Served as a WSGI app. See README.md."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


class KeyStore:
    def __init__(self, dsn: str, clock: Callable[[], float] = time.time) -> None:
        self.dsn = dsn
        self.clock = clock

    def setup(self) -> None:
        """Create your table(s)."""
        raise NotImplementedError("setup(): create the api_keys table")

    def create(self, owner: str, scopes: list[str]) -> str:
        """A new key lk_<prefix>_<secret>, returned once."""
        raise NotImplementedError("create(): generate, hash, store")

    def authenticate(self, key: str) -> dict[str, Any] | None:
        """{"owner": ..., "scopes": [...]} for a valid key, None otherwise."""
        raise NotImplementedError("authenticate(): look up by prefix, compare the hash")

    def rotate(self, key: str, grace_seconds: float) -> str:
        """A new key with the same owner and scopes; the old one ends after the grace."""
        raise NotImplementedError("rotate()")

    def revoke(self, key: str) -> None:
        raise NotImplementedError("revoke()")


def make_app(store: KeyStore) -> Callable[..., Iterable[bytes]]:
    """GET /reports needs reports:read, POST /reports needs reports:write."""
    raise NotImplementedError("make_app(): 401 without a valid key, 403 without the scope")
