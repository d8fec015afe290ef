"""HS256, RS256 and ES256 with `cryptography`, keys chosen by kid from a JWKS.
See README.md."""

from __future__ import annotations

from typing import Any


class InvalidToken(Exception):
    """Any reason a token is refused."""


def sign(claims: dict[str, Any], alg: str, key: bytes, kid: str) -> str:
    """key: the HMAC secret (HS256) or a PEM private key (RS256, ES256)."""
    raise NotImplementedError("sign(): HS256, RS256 and ES256 with a kid in the header")


def verify(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """The claims, when the token's signature verifies with the JWK its kid names."""
    raise NotImplementedError("verify(): pick the key by kid, let the key decide the alg")
