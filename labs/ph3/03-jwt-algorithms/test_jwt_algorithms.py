"""Verification for ph3.3: the learner's HS256 / RS256 / ES256 signing and JWKS-based
verification against PyJWT both ways, and the attacks a verifier must refuse: RS256 ->
HS256 key confusion (an HMAC keyed with the public key, in every encoding an attacker
could pick), a token that names a key of another type, an unknown kid, alg none, a key
not in the JWKS, a DER-encoded ES256 signature, RSA-PSS under the name RS256, a tampered
payload. The keys are made fresh for each run with `cryptography`; the JWKS is what
PyJWT's to_jwk() makes of them."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from labrunner.testing import verdict

CLAIMS = {"iss": "https://auth.lab.test", "sub": "user-42", "scope": "orders:read",
          "iat": 1_700_000_000, "exp": 1_700_000_300}
SECRET = b"hs256-shared-secret-for-ph3.3-lab-0123456789"

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

def pem(private: Any) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

@dataclass
class Keys:
    rsa_old: Any
    rsa_new: Any
    rsa_rogue: Any
    ec_a: Any
    ec_b: Any

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in (("rsa-2023", self.rsa_old), ("rsa-2024", self.rsa_new)):
            keys.append({**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid,
                         "alg": "RS256", "use": "sig"})
        for kid, key in (("ec-a", self.ec_a), ("ec-b", self.ec_b)):
            keys.append({**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid,
                         "alg": "ES256", "use": "sig"})
        keys.append({"kty": "oct", "kid": "hs-1", "alg": "HS256", "k": b64(SECRET)})
        return {"keys": keys}

@functools.cache
def keys() -> Keys:
    def rsa_key() -> Any:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(rsa_key(), rsa_key(), rsa_key(), ec.generate_private_key(ec.SECP256R1()),
                ec.generate_private_key(ec.SECP256R1()))

@dataclass
class Lib:
    module: Any

    def sign(self, alg: str, key: bytes, kid: str) -> str:
        try:
            token = self.module.sign(dict(CLAIMS), alg, key, kid)
        except NotImplementedError as exc:
            pytest.fail(f"sign() is not implemented yet: {exc}", pytrace=False)
        assert isinstance(token, str) and token.count(".") == 2, (
            f"sign({alg}) returned {token!r}, expected header.payload.signature")
        return token

    def verify(self, token: str) -> tuple[str, Any]:
        return verdict("verify()", self.module.verify, token, keys().jwks(),
                       refusal=self.module.InvalidToken)

@pytest.fixture
def lib(learner: Any) -> Lib:
    return Lib(learner.load("jwt_algs"))

def signing_cases() -> list[tuple[str, bytes, str, Any]]:
    k = keys()
    return [("HS256", SECRET, "hs-1", SECRET),
            ("RS256", pem(k.rsa_new), "rsa-2024", k.rsa_new.public_key()),
            ("ES256", pem(k.ec_b), "ec-b", k.ec_b.public_key())]

def test_pyjwt_verifies_what_sign_makes(lib: Lib) -> None:
    for alg, key, kid, public in signing_cases():
        token = lib.sign(alg, key, kid)
        header = pyjwt.get_unverified_header(token)
        assert header.get("alg") == alg and header.get("kid") == kid, (
            f"sign({alg}) wrote the header {header}, expected alg {alg!r} and kid {kid!r}: "
            "the kid tells a verifier which key of its JWKS to use")
        signature = unb64(token.rsplit(".", 1)[1])
        if alg == "ES256":
            assert len(signature) == 64, (
                f"the ES256 signature is {len(signature)} bytes, expected 64: JWS carries "
                "ECDSA as raw r || s, 32 bytes each, big-endian. cryptography returns DER "
                "(about 70-72 bytes): split it with decode_dss_signature")
        try:
            got = pyjwt.decode(token, public, algorithms=[alg], options={"verify_exp": False})
        except pyjwt.PyJWTError as exc:
            how = {"RS256": "RS256 is RSASSA-PKCS1-v1_5 with SHA-256 (PSS would be PS256)",
                   "ES256": "ECDSA P-256 with SHA-256, signature raw r || s",
                   "HS256": "HMAC-SHA256 over the ASCII 'header.payload'"}[alg]
            pytest.fail(f"PyJWT refused the {alg} token sign() made ({type(exc).__name__}: "
                        f"{exc}): {how}", pytrace=False)
        assert got == CLAIMS, f"PyJWT read {got} from sign()'s {alg} token"


def test_es256_signatures_are_always_64_bytes(lib: Lib) -> None:
    """r and s are 32 bytes each even when they are small: about 1 signature in 128 has an r
    or an s with a leading zero byte. Sign until one such signature was seen (checked on
    the signature itself), so the case is always exercised."""
    k = keys()
    public = k.ec_b.public_key()
    key = pem(k.ec_b)
    for n in range(1, 5001):
        token = lib.sign("ES256", key, "ec-b")
        signature = unb64(token.rsplit(".", 1)[1])
        assert len(signature) == 64, (
            f"ES256 signature no. {n} that sign() made is {len(signature)} bytes, expected "
            "always 64: r and s are 32 bytes each, big-endian, zero-padded - "
            "r.to_bytes(32, 'big'), not their minimal length (about 1 signature in 128 has "
            "an r or s below 2^248, and every verifier refuses it)")
        if signature[0] == 0 or signature[32] == 0:  # r or s with a leading zero byte
            try:
                pyjwt.decode(token, public, algorithms=["ES256"],
                             options={"verify_exp": False})
            except pyjwt.PyJWTError as exc:
                pytest.fail(f"PyJWT refused an ES256 token sign() made whose r or s has a "
                            f"leading zero byte ({type(exc).__name__}: {exc})",
                            pytrace=False)
            return
    pytest.fail("5000 ES256 signatures and none had an r or s with a leading zero byte: "
                "are r and s random?", pytrace=False)

def test_verify_reads_pyjwt_tokens_by_kid(lib: Lib) -> None:
    k = keys()
    for alg, key, kid in (("RS256", k.rsa_old, "rsa-2023"), ("RS256", k.rsa_new, "rsa-2024"),
                          ("ES256", k.ec_a, "ec-a"), ("ES256", k.ec_b, "ec-b"),
                          ("HS256", SECRET, "hs-1")):
        token = pyjwt.encode(CLAIMS, key, algorithm=alg, headers={"kid": kid})
        verdict, got = lib.verify(token)
        assert verdict == "ok" and got == CLAIMS, (
            f"verify() {verdict} a valid {alg} token PyJWT signed with the key {kid!r} "
            f"({got}); expected the claims. The JWKS holds two RSA and two EC keys: pick "
            "the one whose kid the header names; an oct key's k is base64url")

def hmac_token(header: dict[str, Any], secret: bytes) -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(CLAIMS).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"

def confusion_secrets(public: Any, jwk: dict[str, Any]) -> list[tuple[str, bytes]]:
    enc, fmt = serialization.Encoding, serialization.PublicFormat
    found = [
        ("the public key as PEM (SubjectPublicKeyInfo)",
         public.public_bytes(enc.PEM, fmt.SubjectPublicKeyInfo)),
        ("the public key as DER", public.public_bytes(enc.DER, fmt.SubjectPublicKeyInfo)),
        ("the public key in OpenSSH form", public.public_bytes(enc.OpenSSH, fmt.OpenSSH)),
        ("the JWK as JSON", json.dumps(jwk).encode()),
    ]
    if isinstance(public, rsa.RSAPublicKey):
        found.append(("the public key as PKCS#1 PEM", public.public_bytes(enc.PEM,
                                                                          fmt.PKCS1)))
        found.append(("the modulus n", unb64(jwk["n"])))
    else:
        found.append(("the x coordinate", unb64(jwk["x"])))
    found.append(("the PEM without its last newline",
                  public.public_bytes(enc.PEM, fmt.SubjectPublicKeyInfo).rstrip(b"\n")))
    return found

def test_rs256_to_hs256_key_confusion_fails(lib: Lib) -> None:
    k = keys()
    jwks = {j["kid"]: j for j in k.jwks()["keys"]}
    accepted = []
    for kid, public in (("rsa-2024", k.rsa_new.public_key()), ("ec-a", k.ec_a.public_key())):
        for what, secret in confusion_secrets(public, jwks[kid]):
            verdict, _ = lib.verify(hmac_token({"alg": "HS256", "typ": "JWT", "kid": kid},
                                               secret))
            if verdict == "ok":
                accepted.append(f"kid {kid!r}, HMAC keyed with {what}")
    assert not accepted, (
        "verify() accepted HS256 tokens forged with the PUBLIC key as the HMAC secret "
        "(key confusion): " + "; ".join(accepted) + ". Anyone can read a public key. The "
        "JWK the kid names decides the algorithm: an RSA key only verifies RS256, an EC key "
        "ES256, only an oct key HS256")

def forged(name: str) -> str:  # noqa: C901 - one forgery per branch, kept side by side
    k = keys()

    def rs(key: Any, kid: str, pad: Any = None, claims: dict[str, Any] = CLAIMS) -> str:
        head = b64(json.dumps({"alg": "RS256", "kid": kid}).encode())
        body = b64(json.dumps(claims).encode())
        sig = key.sign(f"{head}.{body}".encode(), pad or padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{body}.{b64(sig)}"

    if name == "rogue":
        return rs(k.rsa_rogue, "rsa-2024")
    if name == "pss":
        return rs(k.rsa_new, "rsa-2024", padding.PSS(padding.MGF1(hashes.SHA256()),
                                                     padding.PSS.MAX_LENGTH))
    if name == "rs_on_oct":
        return rs(k.rsa_new, "hs-1")
    if name == "other_rsa_kid":
        return rs(k.rsa_new, "rsa-2023")
    if name == "es_der":
        head = b64(json.dumps({"alg": "ES256", "kid": "ec-a"}).encode())
        body = b64(json.dumps(CLAIMS).encode())
        der = k.ec_a.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
        return f"{head}.{body}.{b64(der)}"
    if name == "es_padded":  # a valid r || s, each half zero-padded to 33 bytes (66)
        token = pyjwt.encode(CLAIMS, k.ec_a, algorithm="ES256", headers={"kid": "ec-a"})
        raw = unb64(token.rsplit(".", 1)[1])
        return token.rsplit(".", 1)[0] + "." + b64(b"\0" + raw[:32] + b"\0" + raw[32:])
    if name == "es_as_rs":
        token = pyjwt.encode(CLAIMS, k.ec_a, algorithm="ES256", headers={"kid": "ec-a"})
        head = b64(json.dumps({"alg": "RS256", "kid": "ec-a"}).encode())
        return ".".join([head, *token.split(".")[1:]])
    if name == "none":
        head = b64(json.dumps({"alg": "none", "kid": "rsa-2024"}).encode())
        return f"{head}.{b64(json.dumps(CLAIMS).encode())}."
    if name == "unknown_kid":
        return pyjwt.encode(CLAIMS, k.rsa_rogue, algorithm="RS256", headers={"kid": "rsa-x"})
    if name == "no_kid":
        return pyjwt.encode(CLAIMS, k.rsa_new, algorithm="RS256")
    if name in ("tamper_rs", "tamper_es", "tamper_hs"):
        alg, key, kid = {"tamper_rs": ("RS256", k.rsa_new, "rsa-2024"),
                         "tamper_es": ("ES256", k.ec_a, "ec-a"),
                         "tamper_hs": ("HS256", SECRET, "hs-1")}[name]
        good = pyjwt.encode(CLAIMS, key, algorithm=alg, headers={"kid": kid}).split(".")
        good[1] = b64(json.dumps({**CLAIMS, "scope": "orders:admin"}).encode())
        return ".".join(good)
    raise AssertionError(name)

FORGERIES = [
    ("rogue", "an RS256 token signed by a key that is not in the JWKS, claiming kid "
     "rsa-2024"),
    ("pss", "an RSA-PSS signature under the name RS256 (RS256 is PKCS#1 v1.5)"),
    ("rs_on_oct", "an RS256 token naming the HS256 key hs-1"),
    ("other_rsa_kid", "a token signed by rsa-2024 that claims kid rsa-2023"),
    ("es_der", "an ES256 signature in DER form: JWS requires raw r || s, 64 bytes"),
    ("es_padded", "an ES256 signature 66 bytes long (r and s each zero-padded to 33 bytes): "
     "ES256 signatures are exactly 64 bytes - refuse every other length instead of "
     "splitting at the half, or one signature has many accepted spellings"),
    ("es_as_rs", "an ES256 signature relabelled RS256, naming an EC key"),
    ("none", "alg none"),
    ("unknown_kid", "a kid the JWKS does not have"),
    ("no_kid", "no kid: which key is meant is not said, so none is tried"),
    ("tamper_rs", "an RS256 payload changed after signing"),
    ("tamper_es", "an ES256 payload changed after signing"),
    ("tamper_hs", "an HS256 payload changed after signing"),
]

def test_forged_tokens_are_refused(lib: Lib) -> None:
    wrong = []
    for name, why in FORGERIES:
        verdict, got = lib.verify(forged(name))
        if verdict == "ok":
            wrong.append(f"verify() accepted {why}")
        elif verdict == "crashed":
            wrong.append(f"verify() raised {got} for {why}: raise InvalidToken, the one "
                         "exception its callers catch")
    assert not wrong, "\n".join(wrong) + f"\n({len(wrong)} of {len(FORGERIES)} forgeries)"


def test_hmac_compared_in_constant_time(lib: Lib, learner: Any) -> None:
    token = pyjwt.encode(CLAIMS, SECRET, algorithm="HS256", headers={"kid": "hs-1"})
    raw = unb64(token.rsplit(".", 1)[1])
    watch = learner.harness().watch(lib.module)
    try:
        verdict, got = lib.verify(token)
        lib.verify(token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"))
    finally:
        calls = watch.calls()
        watch.stop()
    assert verdict == "ok", f"verify() refused a valid HS256 token: {got}"
    wanted = {raw, token.rsplit(".", 1)[1], token.rsplit(".", 1)[1].encode()}
    assert [c for c in calls if wanted & {c[0], c[1]}], (
        "verify() checked the HS256 signature without hmac.compare_digest (it was called "
        f"{len(calls)} time(s), never with the token's signature): '==' or '!=' stops at "
        "the first different byte, and its timing tells an attacker how many leading bytes "
        "of a forged HMAC are right - compare with hmac.compare_digest")
