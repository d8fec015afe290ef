"""ph3.2 verification, across calls: each decode() call decides with its own arguments (a
token it accepted once is decided again, by the now, secret and audience of the new call),
and an argument the caller leaves out means what the README says (leeway 0). The tokens and
the claim table are in test_jwt_structure.py (test files do not import each other: the few
helpers both need are each file's own)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from labrunner.testing import verdict

SECRET = b"k3y-for-lab-ph3.2-calls"
ISS = "https://auth.lab.test"
AUD = "orders-api"
NOW = 1_700_000_000
EXP = NOW + 300


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(jti: str, secret: bytes = SECRET, **extra: Any) -> str:
    """An HS256 token signed by the test, valid from NOW to EXP for ISS and AUD."""
    claims = {"iss": ISS, "aud": AUD, "sub": "user-42", "iat": NOW, "exp": EXP, "jti": jti,
              **extra}
    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture
def jwt(learner: Any) -> Any:
    return learner.load("jwt_hand")


def decide(module: Any, tok: str, *, secret: bytes = SECRET, audience: str = AUD,
           **kw: Any) -> str:
    """"ok" or "refused" (a crash or a missing decode() fails the test)."""
    outcome, _ = verdict("decode()", module.decode, tok, secret, issuer=ISS,
                         audience=audience, refusal=module.InvalidToken, **kw)
    return str(outcome)


def test_each_call_decides_afresh(jwt: Any) -> None:
    """A token accepted once, then presented again where it must be refused: an hour past
    its exp, to another audience, under a secret that did not sign it. A verdict kept from
    the first call (a cache of verified tokens keyed by the token) accepts all three."""
    seen = token("first-seen")
    assert decide(jwt, seen, now=NOW + 10, leeway=0) == "ok", (
        "decode() refused a valid token (now = iat +10 s, exp at iat +300 s, our issuer and "
        "audience, signed with the secret given)")
    again: list[tuple[str, dict[str, Any], str]] = [
        ("an hour past its exp (now = iat +3900 s)", {"now": NOW + 3900, "leeway": 0},
         "expired"),
        ("for another audience (audience='billing')", {"now": NOW + 10, "leeway": 0,
                                                       "audience": "billing"},
         "not for this API"),
        ("under another secret (the key that signed it was rotated out)",
         {"now": NOW + 10, "leeway": 0, "secret": b"the-next-key"}, "not signed by this key"),
    ]
    for when, kw, why in again:
        if decide(jwt, seen, **kw) == "refused":
            continue
        fresh = token("never-seen")
        if decide(jwt, fresh, **kw) == "ok":
            pytest.fail(f"decode() accepted a token {when}, expected InvalidToken: {why}",
                        pytrace=False)
        pytest.fail(
            f"decode() reused an earlier call's verdict: it accepted, {when}, the token it "
            f"had accepted at iat +10 s, yet refused a token like it that it had not seen, "
            f"expected InvalidToken for both ({why})\nEach call decides with its own now, "
            "secret, issuer and audience. A verdict remembered from an earlier call "
            "(verified tokens or signatures cached by the token) keeps a token valid after "
            "it expired, for other audiences and after its key was rotated", pytrace=False)


def test_leeway_defaults_to_zero(jwt: Any) -> None:
    """decode() called without leeway: the README's signature says leeway = 0, so the
    token is refused from exp on and before nbf, to the second."""
    cases = [
        ("now == exp", token("at-exp"), EXP, "exp is the first instant it is no longer valid"),
        ("now = exp + 1 s", token("past-exp"), EXP + 1, "it expired a second ago"),
        ("now = nbf - 1 s", token("before-nbf", nbf=NOW + 60), NOW + 59,
         "it is valid from nbf on"),
    ]
    wrong = [f"{name}: decode() accepted the token, expected InvalidToken: {why}"
             for name, tok, now, why in cases if decide(jwt, tok, now=now) == "ok"]
    assert not wrong, (
        "decode() called without a leeway argument forgave clock skew: "
        + "; ".join(wrong) + "\nleeway defaults to 0 (README: leeway: float = 0): only a "
        "caller that passes a leeway extends a token's life. A default leeway (30 s, 60 s) "
        "lets every caller that left it out accept tokens past their exp")
