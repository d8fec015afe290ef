"""HS256, RS256 and ES256 with `cryptography`, keys chosen by kid from a JWKS.

The verifier never lets the token pick how its key is used: the JWK named by kid fixes
the key type, and the token's alg must be the one algorithm that key type is for. That is
what defeats RS256 -> HS256 key confusion (an HMAC made with the public key as secret)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

KEY_TYPE = {"HS256": "oct", "RS256": "RSA", "ES256": "EC"}
HS256_MIN_BYTES = 32  # RFC 7518 3.2: an HMAC key at least as long as the hash (256 bits)
RSA_MIN_BITS = 2048  # RFC 7518 3.3: RSA keys of 2048 bits or larger
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class InvalidToken(Exception):
    """Any reason a token is refused."""


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    # RFC 7515 2: base64url, no "=" padding, no whitespace, no "+" or "/". The last
    # character may carry unused bits the decoder drops (RFC 4648 3.5): only the canonical
    # spelling passes, or one signature has several accepted spellings (golang-jwt's
    # WithStrictDecoding refuses them the same way).
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidToken("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64e(data) != text:
        raise InvalidToken(f"not canonical base64url (unused bits set): {text[-8:]!r}")
    return data


def _int(text: str) -> int:
    return int.from_bytes(b64d(text), "big")


def sign(claims: dict[str, Any], alg: str, key: bytes, kid: str) -> str:
    """key: the HMAC secret (HS256) or a PEM private key (RS256, ES256)."""
    header = {"alg": alg, "typ": "JWT", "kid": kid}
    signing_input = ".".join(b64e(json.dumps(p, separators=(",", ":")).encode())
                             for p in (header, claims)).encode("ascii")
    if alg == "HS256":
        signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    else:
        private = serialization.load_pem_private_key(key, password=None)
        if alg == "RS256" and isinstance(private, rsa.RSAPrivateKey):
            signature = private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "ES256" and isinstance(private, ec.EllipticCurvePrivateKey):
            der = private.sign(signing_input, ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS: raw r || s
        else:
            raise ValueError(f"cannot sign {alg} with this key")
    return f"{signing_input.decode('ascii')}.{b64e(signature)}"


def _check(alg: str, jwk: dict[str, Any], signing_input: bytes, signature: bytes) -> None:
    try:
        if alg == "HS256":
            secret = b64d(jwk["k"])
            if len(secret) < HS256_MIN_BYTES:  # guessed offline from a single token
                raise InvalidToken(f"HS256 key of {len(secret)} bytes, under "
                                   f"{HS256_MIN_BYTES}")
            expected = hmac.new(secret, signing_input, hashlib.sha256).digest()
            if not hmac.compare_digest(expected, signature):
                raise InvalidSignature
        elif alg == "RS256":
            public = rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
            if public.key_size < RSA_MIN_BITS:  # the modulus' bits, however n is written
                raise InvalidToken(f"RSA key of {public.key_size} bits, under {RSA_MIN_BITS}")
            public.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            if jwk.get("crv") != "P-256" or len(signature) != 64:
                raise InvalidSignature
            point = ec.EllipticCurvePublicNumbers(_int(jwk["x"]), _int(jwk["y"]),
                                                  ec.SECP256R1()).public_key()
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                       int.from_bytes(signature[32:], "big"))
            point.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, KeyError, ValueError, TypeError) as exc:
        raise InvalidToken(f"bad {alg} signature") from exc


def verify(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise InvalidToken("a JWT has three segments")
    try:
        # UTF-8 only (RFC 7515 5.2, RFC 8259 8.1): json.loads(bytes) guesses UTF-16 and
        # UTF-32 too, so one header would have several accepted byte spellings.
        header = json.loads(b64d(parts[0]).decode("utf-8"))
        claims = json.loads(b64d(parts[1]).decode("utf-8"))
    except ValueError as exc:
        raise InvalidToken("header or payload is not JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken("header and payload must be JSON objects")
    if "crit" in header:
        # RFC 7515 4.1.11: "crit" lists extensions the verifier must understand and apply,
        # or refuse the token; this one implements none (not even RFC 7797's b64).
        raise InvalidToken(f"critical header extensions {header['crit']!r} not supported")
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in KEY_TYPE:  # a list or an object is no name
        raise InvalidToken(f"algorithm {alg!r} is not accepted")
    matches = [k for k in jwks.get("keys", []) if k.get("kid") == kid]
    if kid is None or len(matches) != 1:
        raise InvalidToken(f"no single key with kid {kid!r}")
    jwk = matches[0]
    # RFC 7517 4.2/4.3: a key whose "use" is not "sig", or whose "key_ops" lack "verify",
    # is not for checking signatures (panva/jose refuses such keys the same way).
    use, ops = jwk.get("use", "sig"), jwk.get("key_ops", ["verify"])
    if use != "sig" or not isinstance(ops, list) or "verify" not in ops:
        raise InvalidToken(f"key {kid!r} is not for signatures (use {use!r}, key_ops {ops!r})")
    # The key decides: an RSA key only verifies RS256, whatever the token's header says.
    if jwk.get("kty") != KEY_TYPE[alg] or jwk.get("alg", alg) != alg:
        raise InvalidToken(f"key {kid!r} ({jwk.get('kty')}) is not for {alg}")
    _check(alg, jwk, f"{parts[0]}.{parts[1]}".encode("ascii"), b64d(parts[2]))
    return claims
