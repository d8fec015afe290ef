"""Verification for ph3.2: the learner's hand-made HS256 JWTs against PyJWT, both ways, and
a table of tokens that must be refused (expired, not yet valid, wrong issuer or audience,
alg none, HS512, a tampered payload or header, a wrong secret, malformed input). The clock
is injected (decode's `now`), so every boundary is exact.

Which comparison decode() uses for the signature is observed, not timed: harness.py wraps
hmac.compare_digest where the learner's code runs and records what it was given."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt as pyjwt
import pytest

from labrunner.testing import verdict

SECRET = b"k3y-for-lab-ph3.2-\x00\xff-with-odd-bytes"
ISS = "https://auth.lab.test"
AUD = "orders-api"
NOW = 1_700_000_000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(part: Any) -> bytes:
    """A header or payload as the token carries it: compact JSON, or bytes as given."""
    return part if isinstance(part, bytes) else json.dumps(part, separators=(",", ":")).encode()


def raw_token(header: Any, claims: Any, secret: bytes = SECRET,
              payload_bytes: bytes | None = None) -> str:
    """A token signed by the test itself, HS256 over exactly the segments it sends."""
    head = b64(compact(header))
    body = b64(compact(payload_bytes if payload_bytes is not None else claims))
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def claims(**extra: Any) -> dict[str, Any]:
    base = {"iss": ISS, "aud": AUD, "sub": "user-42", "iat": NOW, "exp": NOW + 300,
            "jti": "7f1c9a"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


@dataclass
class Jwt:
    module: Any

    def encode(self, payload: dict[str, Any], secret: bytes = SECRET) -> str:
        try:
            token = self.module.encode(payload, secret)
        except NotImplementedError as exc:
            pytest.fail(f"encode() is not implemented yet: {exc}", pytrace=False)
        assert isinstance(token, str), f"encode() returned {type(token).__name__}, expected str"
        return token

    def decode(self, token: str, now: float = NOW, leeway: float = 0,
               audience: str = AUD) -> tuple[str, Any]:
        """("ok", claims) or ("refused", message); anything else fails the test."""
        return verdict("decode()", self.module.decode, token, SECRET, issuer=ISS,
                       audience=audience, now=now, leeway=leeway,
                       refusal=self.module.InvalidToken,
                       crash=f"for {token[:60]!r}...: every token decode() refuses must raise "
                             "InvalidToken, whatever is wrong with it (a caller catches one "
                             "exception)")


@pytest.fixture
def jwt(learner: Any) -> Jwt:
    return Jwt(learner.load("jwt_hand"))


# Claim sets whose encodings hit every base64 remainder and the URL-safe characters.
PAYLOADS = [claims(), claims(name="Zoë 王"), claims(n=1), claims(n=12), claims(n=123),
            claims(aud=[AUD, "billing"], blob="~~~???>>>")]


def test_pyjwt_reads_what_encode_makes(jwt: Jwt) -> None:
    for payload in PAYLOADS:
        token = jwt.encode(payload)
        parts = token.split(".")
        assert len(parts) == 3, f"encode() made {token!r}: expected header.payload.signature"
        bad = sorted({c for c in token if not (c.isalnum() or c in "-_.")})
        assert not bad, (f"encode() made a token with the characters {bad}: segments are "
                         "base64url (- and _ instead of + and /) with the '=' padding "
                         f"stripped\n{token}")
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        assert header.get("alg") == "HS256", f"the header is {header}, expected alg HS256"
        try:
            got = pyjwt.decode(token, SECRET, algorithms=["HS256"], audience=AUD,
                               issuer=ISS, options={"verify_exp": False})
        except pyjwt.PyJWTError as exc:
            pytest.fail(f"PyJWT refused the token encode() made ({type(exc).__name__}: "
                        f"{exc})\n{token}\nThe signature is HMAC-SHA256(secret, the ASCII "
                        "bytes 'header.payload'), base64url without padding", pytrace=False)
        assert got == payload, f"PyJWT read {got} from encode()'s token, expected {payload}"


def pyjwt_tokens() -> list[tuple[dict[str, Any], str]]:
    """PyJWT tokens, chosen so that their segments contain '-' and '_' (a decoder for the
    standard alphabet fails on them) and every length remainder."""
    picked: list[tuple[dict[str, Any], str]] = []
    seen: set[str] = set()
    for n in range(400):
        payload = claims(n=n, note="x" * (n % 3))
        token = pyjwt.encode(payload, SECRET, algorithm="HS256", headers={"kid": "k1"})
        marks = {c for c in token if c in "-_"} | {f"len{len(token.split('.')[1]) % 4}"}
        if marks - seen:
            picked.append((payload, token))
            seen |= marks
    return picked


def test_decode_reads_what_pyjwt_makes(jwt: Jwt) -> None:
    for payload, token in pyjwt_tokens():
        verdict, got = jwt.decode(token)
        assert verdict == "ok", (
            f"decode() refused a valid token PyJWT made ({got})\n{token}\nbase64url uses "
            "- and _ and has no padding; verify the signature over the segments as they "
            "arrived (PyJWT's JSON is not spaced or ordered like yours)")
        assert got == payload, f"decode() returned {got}, expected {payload}"


# Valid tokens whose header differs from the one encode() writes: typ is optional (RFC 7519
# section 5.1), an OAuth access token says "at+jwt" (RFC 9068), the media type is compared
# without regard to case, and issuers add fields (kid, a custom one). Only alg decides.
HEADERS: list[tuple[str, dict[str, Any]]] = [
    ("no typ", {"alg": "HS256"}),
    ("typ at+jwt (an OAuth 2.0 access token, RFC 9068)", {"alg": "HS256", "typ": "at+jwt"}),
    ("typ in lower case", {"alg": "HS256", "typ": "jwt"}),
    ("alg last, with kid and a custom field", {"typ": "JWT", "kid": "k7", "x-env": "prod",
                                               "alg": "HS256"}),
]


def test_accepts_every_valid_header(jwt: Jwt) -> None:
    wrong = []
    for name, header in HEADERS:
        token = raw_token(header, claims())
        verdict, got = jwt.decode(token)
        if verdict != "ok":
            wrong.append(f"header {json.dumps(header)} ({name}): decode() refused a valid "
                         f"token ({got}), expected its claims")
    assert not wrong, "\n".join(wrong) + (
        "\nOnly alg decides how a token is verified: typ is optional (RFC 7519 5.1) and may "
        "say at+jwt or jwt, and kid or other header fields may be there. A verifier that "
        "requires more than the README's rules refuses tokens other issuers make")


@dataclass(frozen=True)
class Case:
    name: str
    token: Callable[[], str]
    now: float
    leeway: float
    accept: bool
    why: str


def signed(**extra: Any) -> Callable[[], str]:
    return lambda: raw_token({"alg": "HS256", "typ": "JWT"}, claims(**extra))


CLAIM_CASES = [
    Case("exp one second ahead", signed(), NOW + 299, 0, True, "valid until exp"),
    Case("now == exp", signed(), NOW + 300, 0, False,
         "exp is the first instant the token is no longer valid (now must be before exp)"),
    Case("expired an hour ago", signed(), NOW + 3900, 0, False, "an expired token"),
    Case("expired 30 s ago, leeway 60", signed(), NOW + 330, 60, True,
         "the leeway forgives clock skew: exp + leeway is still in the future"),
    Case("expired 61 s ago, leeway 60", signed(), NOW + 361, 60, False,
         "past exp + leeway"),
    Case("nbf in 30 s", signed(nbf=NOW + 30), NOW, 0, False,
         "not valid yet: now is before nbf"),
    Case("nbf in 30 s, leeway 60", signed(nbf=NOW + 30), NOW, 60, True,
         "now + leeway reaches nbf"),
    Case("nbf in 61 s, leeway 60", signed(nbf=NOW + 61), NOW, 60, False,
         "nbf is beyond now + leeway"),
    Case("nbf now", signed(nbf=NOW), NOW, 0, True, "valid from nbf on"),
    Case("no exp", signed(exp=None), NOW, 0, False, "a token without exp never expires: "
         "this API requires exp"),
    Case("exp as a string", signed(exp=str(NOW + 300)), NOW, 0, False,
         "exp is a NumericDate (a JSON number)"),
    Case("nbf as a string, in the past", signed(nbf=str(NOW - 10)), NOW, 0, False,
         "nbf is a NumericDate (a JSON number): a string of digits is no date, refuse it "
         "rather than convert it"),
    Case("wrong issuer", signed(iss="https://evil.lab.test"), NOW, 0, False,
         "iss must be the issuer decode() was given"),
    Case("no issuer", signed(iss=None), NOW, 0, False, "iss is required"),
    # RFC 7519 section 2: StringOrURI values are compared as case-sensitive strings, with
    # no transformations or canonicalizations applied (OpenID Connect: an exact match).
    Case("issuer with a trailing slash", signed(iss=f"{ISS}/"), NOW, 0, False,
         "iss is compared exactly, as a case-sensitive string (RFC 7519 section 2): "
         "trimming a trailing '/' or folding case before comparing accepts another issuer"),
    Case("issuer in capitals", signed(iss=ISS.upper()), NOW, 0, False,
         "iss is compared exactly, as a case-sensitive string (RFC 7519 section 2): "
         "folding case or trimming before comparing accepts another issuer"),
    Case("wrong audience", signed(aud="billing"), NOW, 0, False,
         "a token for another API (aud) must not be accepted here"),
    Case("audience list with ours", signed(aud=["billing", AUD]), NOW, 0, True,
         "aud may be a list: accept when ours is in it"),
    Case("audience list without ours", signed(aud=["billing", "search"]), NOW, 0, False,
         "ours is not in the aud list"),
    Case("audience as a substring", signed(aud=f"{AUD}-admin"), NOW, 0, False,
         "aud is compared whole, not as a substring"),
    Case("no audience", signed(aud=None), NOW, 0, False, "aud is required"),
    # NumericDates and leeways need not be whole seconds: the clock is compared as given.
    Case("exp at +300.5, now +300.2", signed(exp=NOW + 300.5), NOW + 300.2, 0, True,
         "exp (a NumericDate) may be fractional: 0.3 s before it the token is valid"),
    Case("exp at +300.5, now +300.7", signed(exp=NOW + 300.5), NOW + 300.7, 0, False,
         "exp (a NumericDate) may be fractional: 0.2 s after it the token has expired - "
         "compare now as given, never rounded or truncated to whole seconds"),
    Case("expired 0.7 s ago, leeway 0.5", signed(), NOW + 300.7, 0.5, False,
         "past exp + leeway (leeway 0.5 s): compare now as given, never rounded or "
         "truncated to whole seconds"),
    Case("nbf at +0.5, now +0.8", signed(nbf=NOW + 0.5), NOW + 0.8, 0, True,
         "nbf may be fractional: 0.3 s after it the token is valid - compare now as given, "
         "never rounded or truncated to whole seconds"),
]


def test_registered_claims(jwt: Jwt) -> None:
    wrong = []
    for case in CLAIM_CASES:
        verdict, got = jwt.decode(case.token(), now=case.now, leeway=case.leeway)
        if verdict != ("ok" if case.accept else "refused"):
            wrong.append(
                f"{case.name}: decode() {'accepted' if verdict == 'ok' else 'refused'} the "
                f"token (now = iat {round(case.now - NOW, 3):+g} s, leeway {case.leeway}), "
                f"expected it "
                f"to be {'accepted' if case.accept else 'refused'}: {case.why}"
                + (f" (decode() said: {got})" if verdict != "ok" else ""))
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(CLAIM_CASES)} claim cases decided wrongly)")


def swap_payload() -> str:
    good = raw_token({"alg": "HS256", "typ": "JWT"}, claims())
    evil = raw_token({"alg": "HS256", "typ": "JWT"}, claims(sub="admin"))
    return ".".join([good.split(".")[0], evil.split(".")[1], good.split(".")[2]])


def swap_header() -> str:
    good = raw_token({"alg": "HS256", "typ": "JWT"}, claims())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "other"}).encode())
    return ".".join([head, *good.split(".")[1:]])


B64URL_ALPHABET = (string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_")


def signature_variant(kind: str) -> Callable[[], str]:
    """A correctly signed token whose signature segment is spelled in a way base64url
    does not allow: a decoder must refuse it (InvalidToken), not crash or repair it."""
    def make() -> str:
        for n in range(1000):  # a signature with a '-' and a '_' in it (deterministic)
            token = raw_token({"alg": "HS256", "typ": "JWT"}, claims(n=n))
            sig = token.rsplit(".", 1)[1]
            if "-" in sig and "_" in sig:
                break
        head = token.rsplit(".", 1)[0]
        return f"{head}." + {
            "standard": sig.replace("-", "+").replace("_", "/"),
            "padded": sig + "=",
            "length 4k+1": sig[:41],
            "inner junk": sig[:20] + "!*" + sig[20:],
            "non-ASCII": sig[:-1] + "é",
            # 32 bytes take 43 characters, 258 bits: the last character's 2 low bits are
            # unused. Setting one gives another spelling that a decoder reads as the same bytes.
            "unused bits": sig[:-1] + B64URL_ALPHABET[B64URL_ALPHABET.index(sig[-1]) ^ 1],
        }[kind]
    return make


def alg_none(alg: str) -> Callable[[], str]:
    def make() -> str:
        head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        return f"{head}.{b64(json.dumps(claims()).encode())}."
    return make


ATTACKS: list[tuple[str, Callable[[], str], str]] = [
    ("alg none", alg_none("none"), "alg none: an unsigned token. Only HS256 is accepted"),
    ("alg None", alg_none("None"), "alg 'None' is alg none in another case"),
    ("alg none with a signature", lambda: alg_none("none")() + b64(b"x" * 32),
     "alg none: decode() must not trust the token's alg"),
    ("HS512 with our secret", lambda: pyjwt.encode(claims(), SECRET, algorithm="HS512"),
     "the token chose HS512: the algorithm is the verifier's choice (HS256), not the "
     "token's"),
    ("tampered payload", swap_payload,
     "the payload (sub: admin) was swapped under a signature made for another payload"),
    ("tampered header", swap_header, "the header changed after signing: the signature "
     "covers header.payload as sent"),
    ("wrong secret", lambda: raw_token({"alg": "HS256", "typ": "JWT"}, claims(),
                                       secret=b"not-the-secret"), "signed with another key"),
    ("truncated signature", lambda: raw_token({"alg": "HS256"}, claims())[:-5],
     "the signature lost its last characters"),
    ("empty signature", lambda: raw_token({"alg": "HS256"}, claims()).rpartition(".")[0] + ".",
     "no signature at all"),
    ("two segments", lambda: raw_token({"alg": "HS256"}, claims()).rpartition(".")[0],
     "a JWT has three segments"),
    ("four segments", lambda: raw_token({"alg": "HS256"}, claims()) + ".AAAA",
     "a JWT has three segments"),
    ("not base64url", lambda: "*!*." + raw_token({"alg": "HS256"}, claims()).split(".", 1)[1],
     "a header that is not base64url"),
    ("payload not JSON", lambda: raw_token({"alg": "HS256"}, None, payload_bytes=b"{oops"),
     "a correctly signed payload that is not JSON"),
    ("payload a JSON list", lambda: raw_token({"alg": "HS256"}, [1, 2]),
     "a correctly signed payload that is not a JSON object"),
    ("header a JSON string", lambda: b64(b'"HS256"') + "." + b64(json.dumps(claims()).encode())
     + ".AAAA", "a header that is not a JSON object"),
    ("empty token", lambda: "", "an empty string"),
    ("signature in standard base64 (+ and /)", signature_variant("standard"),
     "the signature's bytes are right but spelled in the standard alphabet: base64url has "
     "'-' and '_', never '+' or '/' - a lenient decoder accepts many spellings of one "
     "signature (check the alphabet before decoding)"),
    ("signature with '=' padding", signature_variant("padded"),
     "base64url in a JWT has no '=' padding"),
    ("signature with junk characters inside", signature_variant("inner junk"),
     "'!' and '*' are not base64url: a lenient decoder silently drops them"),
    ("signature whose last character has an unused bit set", signature_variant("unused bits"),
     "the last of 43 characters carries 2 unused bits, which base64 decoders ignore: the "
     "same signature bytes spelled another way. PyJWT refuses it; accept only the canonical "
     "spelling (re-encode what you decoded and compare it with the text you were given)"),
]
# Malformed signature segments must raise InvalidToken, not a decoder's own error.
CRASHES = [
    ("a signature 41 characters long (4k+1: no base64 string has that length)",
     signature_variant("length 4k+1")),
    ("a signature with a non-ASCII character", signature_variant("non-ASCII")),
]


def test_refuses_forged_and_malformed_tokens(jwt: Jwt) -> None:
    wrong = []
    for name, make, why in ATTACKS:
        token = make()
        verdict, got = jwt.decode(token)
        if verdict != "refused":
            wrong.append(f"{name}: decode() accepted {token[:40]!r}... (it returned the claims), "
                         f"expected InvalidToken: {why}")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(ATTACKS)} forged or malformed tokens accepted)")
    for name, make in CRASHES:
        token = make()
        verdict, got = verdict_of(jwt.module, token)
        assert verdict == "refused", (
            f"decode() with {name} "
            + (f"raised {got} instead of InvalidToken: validate each segment (the "
               "base64url alphabet, a length that is not 4k+1) and wrap the decoder's "
               "errors - a caller catches one exception" if verdict == "crashed" else
               "accepted the token, expected InvalidToken"))


def verdict_of(module: Any, token: str) -> tuple[str, Any]:
    return verdict("decode()", module.decode, token, SECRET, issuer=ISS, audience=AUD,
                   now=NOW, refusal=module.InvalidToken)


HS256 = {"alg": "HS256", "typ": "JWT"}
# Correctly signed tokens whose header or claims are valid JSON (or not even UTF-8) of a
# shape decode() did not expect: each must be refused with InvalidToken. A KeyError,
# TypeError or UnicodeDecodeError instead is a 500 where the caller that catches
# InvalidToken answers 401 (and the header is read before the signature is checked: anyone
# can send one). Each case: name, header, payload.
SHAPES: list[tuple[str, Any, Any]] = [
    ("a header without alg", {"typ": "JWT"}, claims()),
    ("an empty header object", {}, claims()),
    ("alg null", {"alg": None, "typ": "JWT"}, claims()),
    ("alg a number", {"alg": 256, "typ": "JWT"}, claims()),
    ("alg a list", {"alg": ["HS256"], "typ": "JWT"}, claims()),
    ("alg an object", {"alg": {"HS256": True}, "typ": "JWT"}, claims()),
    ("a header that is not UTF-8", b'{"alg":"HS256","typ":"JWT\xff"}', claims()),
    ("a payload that is not UTF-8", HS256, b'{"iss":"\xff"}'),
    # JWS (RFC 7515 5.2) takes the octets as UTF-8 JSON only; Python's json.loads(bytes)
    # guesses UTF-16 and UTF-32 by themselves, so a token no other JOSE library reads passes.
    ("a payload in UTF-16, not UTF-8", HS256, compact(claims()).decode().encode("utf-16")),
    ("a header in UTF-32, not UTF-8", compact(HS256).decode().encode("utf-32-le"), claims()),
    ("exp null", HS256, {**claims(), "exp": None}),
    ("exp a list", HS256, claims(exp=[NOW + 300])),
    ("nbf a string", HS256, claims(nbf="soon")),
    ("aud a number", HS256, claims(aud=42)),
    ("aud an object", HS256, claims(aud={AUD: True})),
    # A list, but not of strings: membership, a set, a join or a sort of its items must
    # not crash on an item that is a list, an object, a number or null.
    ("aud a list holding a list", HS256, claims(aud=[[AUD]])),
    ("aud a list holding an object", HS256, claims(aud=[{AUD: True}, "billing"])),
    ("aud a list of a number and null", HS256, claims(aud=[42, None])),
    # Not JSON, yet Python's json.loads reads them (parse_constant= refuses them): a NaN
    # exp compares false with every instant, so "now >= exp" never holds - it never expires.
    ("exp NaN, which JSON has not (a NaN exp never expires)", HS256,
     compact(claims()).replace(b'"exp":', b'"exp":NaN,"x":')),
    ("exp Infinity, which JSON has not (it never expires)", HS256,
     compact(claims()).replace(b'"exp":', b'"exp":Infinity,"x":')),
    ("exp 1e400, read as float infinity (it never expires)", HS256,
     compact(claims()).replace(b'"exp":', b'"exp":1e400,"x":')),
    # nbf the same way: "now < nbf" is false for a NaN nbf, and for true (an int, 1, in
    # Python), so a token that names no valid-from instant would be taken as valid now.
    ("nbf NaN, which JSON has not (a NaN nbf is never in the future)", HS256,
     compact(claims()).replace(b'"exp":', b'"nbf":NaN,"exp":')),
    ("nbf true, a boolean and no NumericDate (Python reads it as 1)", HS256,
     claims(nbf=True)),
    ("exp false, a boolean and no NumericDate", HS256, claims(exp=False)),
]


def test_refuses_tokens_of_unexpected_shape(jwt: Jwt) -> None:
    wrong = []
    for name, header, payload in SHAPES:
        verdict, got = verdict_of(jwt.module, raw_token(header, payload))
        if verdict != "refused":
            seen = (f"raised {got}, expected InvalidToken: the only exception decode() "
                    "raises" if verdict == "crashed" else
                    "accepted it (returned the claims), expected InvalidToken")
            odd = "payload" if header is HS256 else "header"
            text = compact(payload if header is HS256 else header)
            shown = (repr(text[:16]) + "..." if b"\x00" in text   # UTF-16/32: show octets
                     else text.decode(errors="replace"))
            wrong.append(f"a correctly signed token with {name} ({odd} {shown}): "
                         f"decode() {seen}")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(SHAPES)} tokens of an unexpected shape not refused with "
        "InvalidToken.) A token is untrusted input: read its fields with .get(), check their "
        "types (alg a string, exp and nbf numbers, aud a string or a list of them) and turn "
        "a decoding error into InvalidToken - the caller catches that one exception and "
        "answers 401; any other is a 500 (for the header, read before the signature is "
        "checked, one anyone can trigger). The octets are UTF-8 JSON only (RFC 7515 5.2): "
        "json.loads(bytes) also guesses UTF-16 and UTF-32, so decode them as UTF-8 first")


def test_a_date_beyond_a_float_is_decided_not_crashed(jwt: Jwt) -> None:
    """exp = 10**400 is a JSON number, an int in Python, and float() of it raises
    OverflowError: accepting the token (it expires far ahead) or refusing it are both
    answers; an OverflowError is a 500."""
    token = raw_token(HS256, compact(claims()).replace(b'"exp":', b'"exp":1' + b"0" * 400
                                                       + b',"x":'))
    verdict, got = verdict_of(jwt.module, token)
    assert verdict != "crashed", (
        f"a correctly signed token with exp = 10**400 (a JSON number, an int in Python): "
        f"decode() raised {got}, expected it decided (accepted, or refused with "
        "InvalidToken)\nfloat(10**400) raises OverflowError, and so does exp + leeway with "
        "a float leeway: compare now - leeway >= exp (int and float compare exactly), or "
        "refuse what float() cannot hold with InvalidToken.")


def test_signature_compared_in_constant_time(jwt: Jwt, learner: Any) -> None:
    payload, token = pyjwt_tokens()[0]
    signature = token.rsplit(".", 1)[1]
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    watch = learner.harness().watch(jwt.module)
    try:
        verdict, got = jwt.decode(token)
        tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
        jwt.decode(tampered)
    finally:
        calls = watch.calls()
        watch.stop()
    assert verdict == "ok", f"decode() refused a valid PyJWT token: {got}"
    wanted = {raw, signature, signature.encode()}
    compared = [c for c in calls if wanted & {c[0], c[1]}]
    assert compared, (
        "decode() checked the signature without hmac.compare_digest (it was called "
        f"{len(calls)} time(s), never with the token's signature): compare the expected and "
        "the received signature with hmac.compare_digest. '==' stops at the first "
        "different byte, and how long it takes tells an attacker how many leading bytes of "
        "a forged signature are right")
