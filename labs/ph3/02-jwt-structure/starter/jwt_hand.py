"""HS256 JSON Web Tokens by hand: base64url, the signing input, the registered claims.

Fill in encode() and decode(); see README.md for the rules."""

from __future__ import annotations

from typing import Any


class InvalidToken(Exception):
    """Any reason a token is refused; the message says which."""


def encode(claims: dict[str, Any], secret: bytes) -> str:
    """header.payload.signature, each base64url without padding; header
    {"alg": "HS256", "typ": "JWT"}; signature HMAC-SHA256(secret, "header.payload")."""
    raise NotImplementedError("encode(): build header.payload.signature")


def decode(token: str, secret: bytes, *, issuer: str, audience: str, now: float,
           leeway: float = 0) -> dict[str, Any]:
    """The claims of a valid token; InvalidToken for anything else."""
    raise NotImplementedError("decode(): check the signature and the claims")
