"""HS256 JSON Web Tokens by hand: base64url, the signing input, the registered claims.

A JWT is three base64url segments, header.payload.signature, without '=' padding. The
signature is HMAC-SHA256 over the ASCII bytes of "header.payload" exactly as they travel:
never over a re-serialized copy of the claims."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from typing import Any

ALGORITHM = "HS256"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class InvalidToken(Exception):
    """Any reason a token is refused; the message says which."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidToken(f"not base64url: {text[:20]!r}")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # The last character may carry unused bits, which the decoder ignores: "...6Gc" and
    # "...6Gd" would be one signature spelled two ways. Only the canonical spelling passes.
    if b64url_encode(data) != text:
        raise InvalidToken(f"not canonical base64url (unused bits set): {text[-8:]!r}")
    return data


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON has not: a NaN exp compares false
    # with every instant, so "now >= exp" never holds and the token would never expire.
    raise ValueError(f"{constant} is not a JSON number")


def _json_segment(text: str, what: str) -> dict[str, Any]:
    try:
        # UTF-8 only (RFC 7515 5.2): json.loads(bytes) would guess UTF-16 and UTF-32 too
        value = json.loads(b64url_decode(text).decode("utf-8"), parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidToken(f"the {what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidToken(f"the {what} is not a JSON object")
    return value


def _sign(signing_input: str, secret: bytes) -> bytes:
    return hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()


def encode(claims: dict[str, Any], secret: bytes) -> str:
    header = {"alg": ALGORITHM, "typ": "JWT"}
    segments = [b64url_encode(json.dumps(part, separators=(",", ":")).encode("utf-8"))
                for part in (header, claims)]
    signing_input = ".".join(segments)
    return f"{signing_input}.{b64url_encode(_sign(signing_input, secret))}"


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken(f"{name} is not a NumericDate: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):   # 1e400 reads as inf
        raise InvalidToken(f"{name} is not a finite NumericDate: {value!r}")
    return value   # an int stays exact: float(10**400) would raise OverflowError


def decode(token: str, secret: bytes, *, issuer: str, audience: str, now: float,
           leeway: float = 0) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken(f"a JWT has 3 segments, this one has {len(parts)}")
    header_b64, payload_b64, signature_b64 = parts
    header = _json_segment(header_b64, "header")
    # The algorithm is the verifier's choice, not the token's: alg none, HS512, RS256 ... out.
    if header.get("alg") != ALGORITHM:
        raise InvalidToken(f"algorithm {header.get('alg')!r} is not accepted, only HS256")
    expected = _sign(f"{header_b64}.{payload_b64}", secret)
    if not hmac.compare_digest(expected, b64url_decode(signature_b64)):
        raise InvalidToken("bad signature")
    claims = _json_segment(payload_b64, "payload")

    if "exp" not in claims:
        raise InvalidToken("no exp claim")
    # now and leeway on one side: exp + leeway would turn a huge int exp into a float.
    if now - leeway >= _number(claims, "exp"):
        raise InvalidToken("expired")
    if "nbf" in claims and now + leeway < _number(claims, "nbf"):
        raise InvalidToken("not valid yet (nbf)")
    if claims.get("iss") != issuer:
        raise InvalidToken(f"issuer {claims.get('iss')!r} is not {issuer!r}")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        raise InvalidToken(f"audience {aud!r} does not include {audience!r}")
    return claims
