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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
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
    return cast(bytes, private.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))

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

@functools.cache
def other_curves() -> dict[str, Any]:
    """EC keys on the two other NIST curves: a JWK may name them, ES256 is P-256 only."""
    return {"P-384": ec.generate_private_key(ec.SECP384R1()),
            "P-521": ec.generate_private_key(ec.SECP521R1())}

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

    def verify(self, token: str, jwks: dict[str, Any] | None = None) -> tuple[str, Any]:
        return verdict("verify()", self.module.verify, token, jwks or keys().jwks(),
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
    if name in ODD_HEADERS:  # signed with the HS256 key, the header of an unexpected shape
        return hmac_token(ODD_HEADERS[name], SECRET)
    if name in ODD_SEGMENTS:  # signed with the HS256 key, a segment that is no JSON object
        raw_head, raw_body = ODD_SEGMENTS[name]
        signing_input = f"{b64(raw_head)}.{b64(raw_body)}"
        sig = hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(sig)}"
    raise AssertionError(name)

# Headers whose alg or kid is valid JSON of the wrong type: refused with InvalidToken, not a
# TypeError from a dict lookup or an `in` test (the header is read before any signature).
ODD_HEADERS: dict[str, dict[str, Any]] = {
    "alg_list": {"alg": ["HS256"], "kid": "hs-1"},
    "alg_object": {"alg": {"HS256": True}, "kid": "hs-1"},
    "alg_null": {"alg": None, "kid": "hs-1"},
    "kid_list": {"alg": "HS256", "kid": ["hs-1"]},
    "kid_object": {"alg": "HS256", "kid": {"id": "hs-1"}},
    # RFC 7515 4.1.11: an extension listed in crit must be understood and applied, or the
    # token refused; the lab's verifier implements none (PyJWT refuses them the same way).
    "crit_extension": {"alg": "HS256", "kid": "hs-1", "crit": ["https://auth.lab.test/ip"],
                       "https://auth.lab.test/ip": "10.0.0.7"},
    "crit_b64": {"alg": "HS256", "kid": "hs-1", "b64": False, "crit": ["b64"]},
}

# Header and payload bytes (signed with the HS256 key) that are no JSON object: JSON text is
# UTF-8 (RFC 8259 8.1) and a JWS header and JWT claims are objects. json.loads() raises
# UnicodeDecodeError (a ValueError, not a JSONDecodeError) for bytes that are not UTF-8.
_HS_HEAD = json.dumps({"alg": "HS256", "kid": "hs-1"}).encode()
ODD_SEGMENTS: dict[str, tuple[bytes, bytes]] = {
    "header_not_utf8": (b'{"alg":"HS256","kid":"hs-1","x":"\xff"}', json.dumps(CLAIMS).encode()),
    "payload_not_utf8": (_HS_HEAD, b'{"sub":"user-42","name":"\xc3("}'),
    "header_array": (b'["HS256","hs-1"]', json.dumps(CLAIMS).encode()),
    "payload_array": (_HS_HEAD, json.dumps([CLAIMS]).encode()),
    "payload_utf16": (_HS_HEAD, json.dumps(CLAIMS).encode("utf-16-le")),
    "header_utf32": (json.dumps({"alg": "HS256", "kid": "hs-1"}).encode("utf-32-be"),
                     json.dumps(CLAIMS).encode()),
}

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
    ("alg_list", "a header whose alg is a list ([\"HS256\"])"),
    ("alg_object", "a header whose alg is an object"),
    ("alg_null", "a header whose alg is null"),
    ("kid_list", "a header whose kid is a list"),
    ("kid_object", "a header whose kid is an object"),
    ("crit_extension", "a header whose crit lists an extension (an IP the token is bound "
     "to) the verifier does not implement: RFC 7515 4.1.11 makes the token invalid - "
     "refuse any crit you do not apply"),
    ("crit_b64", "a header with b64 false listed in crit (RFC 7797: the payload is not "
     "base64url-encoded): a verifier that does not implement it must refuse the token"),
    ("header_not_utf8", "a header whose bytes are not UTF-8 (JSON text is UTF-8; "
     "decoding them raises UnicodeDecodeError, a ValueError but no JSONDecodeError)"),
    ("payload_not_utf8", "a payload whose bytes are not UTF-8 (JSON text is UTF-8; "
     "decoding them raises UnicodeDecodeError, a ValueError but no JSONDecodeError)"),
    ("header_array", "a header that is a JSON array, not an object"),
    ("payload_array", "a payload that is a JSON array: the claims are an object"),
    ("payload_utf16", "a payload in UTF-16 (JWS reads UTF-8 only, RFC 7515 5.2: "
     "json.loads(bytes) guesses UTF-16 and UTF-32 - decode('utf-8') first)"),
    ("header_utf32", "a header in UTF-32 (JWS reads UTF-8 only, RFC 7515 5.2: "
     "json.loads(bytes) guesses UTF-16 and UTF-32 - decode('utf-8') first)"),
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


# A JWK's alg (RFC 7517 4.4), when present, is the one algorithm that key may be used with:
# a key of the right kty published for another algorithm - RS512, PSS, encryption (use
# "enc") - must not verify the token's alg. Without alg (it is optional) the kty decides.
# Each case: the JWK it copies, the copy's kid, its alg (None: no alg) and use, the
# token's alg, accepted or not.
RELABELLED: list[tuple[str, str, str | None, str, str, bool]] = [
    ("rsa-2024", "rsa-rs512", "RS512", "sig", "RS256", False),
    ("rsa-2024", "rsa-ps256", "PS256", "sig", "RS256", False),
    ("rsa-2024", "rsa-oaep", "RSA-OAEP", "enc", "RS256", False),
    ("ec-a", "ec-ecdh", "ECDH-ES", "enc", "ES256", False),
    ("hs-1", "hs-hs512", "HS512", "sig", "HS256", False),
    ("hs-1", "hs-a256kw", "A256KW", "enc", "HS256", False),
    ("rsa-2024", "rsa-no-alg", None, "sig", "RS256", True),
    ("ec-a", "ec-no-alg", None, "sig", "ES256", True),
    ("hs-1", "hs-no-alg", None, "sig", "HS256", True),
]


def relabelled_jwks() -> dict[str, Any]:
    published = keys().jwks()["keys"]
    by_kid = {jwk["kid"]: jwk for jwk in published}
    extra = []
    for source, kid, alg, use, _, _ in RELABELLED:
        jwk = {key: value for key, value in by_kid[source].items() if key != "alg"}
        extra.append({**jwk, "kid": kid, "use": use, **({"alg": alg} if alg else {})})
    return {"keys": published + extra}


def test_a_jwk_verifies_only_its_own_alg(lib: Lib) -> None:
    k = keys()
    private = {"rsa-2024": k.rsa_new, "ec-a": k.ec_a, "hs-1": SECRET}
    jwks = relabelled_jwks()
    wrong = []
    for source, kid, alg, use, token_alg, accept in RELABELLED:
        token = pyjwt.encode(CLAIMS, private[source], algorithm=token_alg,
                             headers={"kid": kid})
        verdict, got = lib.verify(token, jwks)
        key = (f"the JWK {kid!r} published with \"alg\": \"{alg}\", \"use\": \"{use}\""
               if alg else f"the JWK {kid!r} published without alg")
        if accept and verdict != "ok":
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'refused'} a valid "
                f"{token_alg} token signed with {key} ({got}), expected the claims: alg is "
                "optional in a JWK (RFC 7517 4.4); without it the kty decides")
        elif not accept and verdict != "refused":
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} an "
                f"{token_alg} token signed with {key}, expected InvalidToken: a JWK's alg "
                f"is the only algorithm that key may be used with (RFC 7517 4.4), and "
                f"{alg} is not {token_alg} - refuse a JWK whose alg differs from the "
                "header's, whatever its kty")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(RELABELLED)} JWKs used against their alg)")



# kid is optional in a JWK (RFC 7517 4.5): a JWKS may publish keys without one (or with
# "kid": null). A token that names no key must not be matched to such a key because
# "no kid" equals "no kid" (None == None, "" == "" with a default): during a rotation that
# key is an arbitrary, maybe retired one. Each case: the token's header kid (MISSING: no
# kid member), what that header is.
MISSING = object()
KIDLESS_HEADERS: list[tuple[Any, str]] = [
    (MISSING, "a header without kid"),
    (None, "a header with \"kid\": null"),
]


def signed(header: dict[str, Any], key: Any) -> str:
    """A token with exactly this header (PyJWT refuses to write "kid": null)."""
    algorithm = pyjwt.get_algorithm_by_name(header["alg"])
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(CLAIMS).encode())}"
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{b64(signature)}"


def kidless_jwks() -> list[tuple[dict[str, Any], str, Any, str]]:
    """JWKS, each the published keys plus ONE copy without kid (or with kid null) - a
    single kidless key, so "the one key that matches" finds it; with each, the algorithm
    and private key that sign for that copy, and what the copy is."""
    k = keys()
    published = keys().jwks()["keys"]
    by_kid = {jwk["kid"]: jwk for jwk in published}
    cases = []
    for alg, key, kid, copy_kid in (("RS256", k.rsa_new, "rsa-2024", MISSING),
                                    ("ES256", k.ec_a, "ec-a", MISSING),
                                    ("HS256", SECRET, "hs-1", MISSING),
                                    ("RS256", k.rsa_old, "rsa-2023", None)):
        copy = {name: value for name, value in by_kid[kid].items() if name != "kid"}
        if copy_kid is not MISSING:
            copy["kid"] = copy_kid
        cases.append(({"keys": [*published, copy]}, alg, key,
                      f"the JWK {kid!r} published again "
                      + ("without kid" if copy_kid is MISSING else "with kid null")))
    return cases


def test_a_token_without_kid_matches_no_kidless_jwk(lib: Lib) -> None:
    cases = kidless_jwks()
    every = {"keys": [*keys().jwks()["keys"], *(jwks["keys"][-1] for jwks, *_ in cases)]}
    verdict, got = lib.verify(pyjwt.encode(CLAIMS, keys().rsa_new, algorithm="RS256",
                                           headers={"kid": "rsa-2024"}), every)
    assert verdict == "ok", (
        f"verify() {'raised ' + got if verdict == 'crashed' else 'refused'} a valid RS256 "
        f"token naming kid 'rsa-2024' ({got}) when the JWKS also holds keys without kid, "
        "expected the claims: kid is optional in a JWK (RFC 7517 4.5), a key without one "
        "is simply never picked - read it with jwk.get('kid')")
    wrong = []
    for kid, header in KIDLESS_HEADERS:
        for jwks, alg, key, which in cases:
            token_header = {"alg": alg, "typ": "JWT", **({} if kid is MISSING else {"kid": kid})}
            verdict, got = lib.verify(signed(token_header, key), jwks)
            if verdict != "refused":
                wrong.append(
                    f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} "
                    f"an {alg} token with {header}, signed with {which}, expected "
                    "InvalidToken: a token that names no key matches no key - 'no kid' "
                    "equal to 'no kid' (None == None, or '' == '' with a default) picks "
                    "whichever key lacks a kid, during a rotation an arbitrary or retired "
                    "one; refuse a missing or null kid before looking it up")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(KIDLESS_HEADERS) * len(cases)} tokens without a kid)")


# A kid the JWKS does not publish names no key - even when the token is signed by a key the
# JWKS holds under another kid. A verifier that, for an unknown kid, tries every key, takes
# the newest key of the type, or matches kids loosely (case, spaces) lets the token pick its
# key: whatever kid it names, some key is found. Each case: the token's alg, the key that
# signs it (by the kid it is published under), the kid the token names.
UNKNOWN_KIDS: list[tuple[str, str, str]] = [
    ("RS256", "rsa-2024", "rsa-2025"),
    ("RS256", "rsa-2023", "rsa-2022"),
    ("ES256", "ec-b", "ec-c"),
    ("ES256", "ec-a", "ec-0"),
    ("HS256", "hs-1", "hs-2"),
    ("RS256", "rsa-2024", "RSA-2024"),
    ("RS256", "rsa-2024", "rsa-2024 "),
    ("ES256", "ec-a", "EC-A"),
]


def test_an_unknown_kid_names_no_key(lib: Lib) -> None:
    k = keys()
    private = {"rsa-2023": k.rsa_old, "rsa-2024": k.rsa_new, "ec-a": k.ec_a, "ec-b": k.ec_b,
               "hs-1": SECRET}
    wrong = []
    for alg, signer, kid in UNKNOWN_KIDS:
        token = pyjwt.encode(CLAIMS, private[signer], algorithm=alg, headers={"kid": kid})
        verdict, got = lib.verify(token)
        if verdict != "refused":
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} an "
                f"{alg} token naming kid {kid!r}, which the JWKS does not publish (it was "
                f"signed by the key published as {signer!r}), expected InvalidToken")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(UNKNOWN_KIDS)} tokens naming an unknown kid): the kid is "
        "compared exactly, and a kid the JWKS does not have is refused - a verifier that "
        "falls back to trying every key, or the newest key of the type, or matches kids "
        "loosely, verifies tokens with keys the issuer never named for them (a retired key "
        "kept for old tokens, a key meant for another audience)")


# ES256 is ECDSA on P-256 with SHA-256 (RFC 7518 3.4), nothing else: an EC JWK on another
# curve verifies no ES256 token, whatever hash or signature length the token uses. Each
# case: the curve, the JWK's alg (None: published without alg), the hash signed with.
OTHER_CURVES: list[tuple[str, str | None, Any]] = [
    ("P-384", None, hashes.SHA256()),
    ("P-384", None, hashes.SHA384()),
    ("P-384", "ES256", hashes.SHA256()),
    ("P-521", None, hashes.SHA256()),
    ("P-521", None, hashes.SHA512()),
]


def raw_es(header: dict[str, Any], key: Any, digest: Any) -> str:
    """An ECDSA token over `header`, the signature raw r || s at the curve's own size."""
    size = (key.curve.key_size + 7) // 8
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(CLAIMS).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(digest)))
    return f"{signing_input}.{b64(r.to_bytes(size, 'big') + s.to_bytes(size, 'big'))}"


def test_es256_verifies_only_p256_keys(lib: Lib) -> None:
    published = keys().jwks()["keys"]
    wrong = []
    for crv, alg, digest in OTHER_CURVES:
        key = other_curves()[crv]
        kid = f"ec-{crv.lower()}-{alg or 'no-alg'}"
        jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig",
               **({"alg": alg} if alg else {})}
        token = raw_es({"alg": "ES256", "typ": "JWT", "kid": kid}, key, digest)
        verdict, got = lib.verify(token, {"keys": [*published, jwk]})
        if verdict != "refused":
            published_as = f"\"alg\": \"{alg}\"" if alg else "no alg"
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} an "
                f"ES256 token signed by a {crv} key ({published_as}, ECDSA with "
                f"{digest.name.upper()}, r || s of {2 * ((key.curve.key_size + 7) // 8)} "
                "bytes), expected InvalidToken")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(OTHER_CURVES)} tokens from keys on other curves): ES256 "
        "is ECDSA on P-256 with SHA-256 (RFC 7518 3.4) - refuse an EC JWK whose crv is not "
        "P-256 instead of taking the curve (and hash, and length) from the key: the key "
        "decides, but only among what the token's alg allows")


# A JWK says what it is for (RFC 7517 4.2 "use", 4.3 "key_ops"): a key published with "use":
# "enc", or whose "key_ops" lack "verify", is not for checking signatures, even when its
# kty fits the token's alg and it carries no alg of its own. Libraries refuse it
# (panva/jose: "its use must be sig", "its key_ops must include verify"): an encryption
# key's private half is held by whoever decrypts, and a verifier that takes it as a signing
# key lets that party mint tokens. "key_ops" is an ARRAY of operations (4.3; Web Crypto's
# JsonWebKey types it a sequence of strings): a JWK whose key_ops is a string or an object
# is malformed and verifies nothing - "verify" in "unverify" is a substring test, and
# "verify" in {"verify": false} a key test. Each case: the JWK it copies (without its alg),
# the copy's kid, its use and key_ops (None: not published), accepted or not.
KEY_USES: list[tuple[str, str, str | None, Any, bool]] = [
    ("rsa-2024", "rsa-enc", "enc", None, False),
    ("ec-a", "ec-enc", "enc", None, False),
    ("hs-1", "hs-enc", "enc", None, False),
    # "use" is a case-sensitive string and other values may be used (RFC 7517 4.2): only
    # "sig" says signatures - refusing "enc" alone, or folding case, lets these verify
    ("rsa-2024", "rsa-use-tls", "tls", None, False),
    ("ec-a", "ec-use-SIG", "SIG", None, False),
    ("rsa-2024", "rsa-ops-encrypt", None, ["encrypt", "wrapKey"], False),
    ("ec-a", "ec-ops-derive", None, ["deriveKey", "deriveBits"], False),
    ("hs-1", "hs-ops-sign", None, ["sign"], False),
    ("rsa-2024", "rsa-ops-none", None, [], False),
    ("ec-a", "ec-sig-ops-sign", "sig", ["sign"], False),
    ("ec-a", "ec-ops-a-string", None, "verify", False),
    ("rsa-2024", "rsa-ops-a-longer-string", "sig", "unverify", False),
    ("hs-1", "hs-ops-an-object", None, {"verify": False}, False),
    ("rsa-2024", "rsa-sig-verify", "sig", ["verify"], True),
    ("ec-a", "ec-ops-verify", None, ["verify"], True),
    ("hs-1", "hs-ops-sign-verify", None, ["sign", "verify"], True),
]


def test_a_key_not_for_signatures_verifies_nothing(lib: Lib) -> None:
    k = keys()
    private = {"rsa-2024": k.rsa_new, "ec-a": k.ec_a, "hs-1": SECRET}
    published = keys().jwks()["keys"]
    by_kid = {jwk["kid"]: jwk for jwk in published}
    alg_of = {"rsa-2024": "RS256", "ec-a": "ES256", "hs-1": "HS256"}
    extra = []
    for source, kid, use, ops, _ in KEY_USES:
        jwk = {key: value for key, value in by_kid[source].items()
               if key not in ("alg", "use")}
        extra.append({**jwk, "kid": kid, **({"use": use} if use else {}),
                      **({"key_ops": ops} if ops is not None else {})})
    jwks = {"keys": published + extra}
    wrong = []
    for source, kid, use, ops, accept in KEY_USES:
        alg = alg_of[source]
        token = pyjwt.encode(CLAIMS, private[source], algorithm=alg, headers={"kid": kid})
        verdict, got = lib.verify(token, jwks)
        marked = " and ".join([*([f'"use": "{use}"'] if use else []),
                               *([f'"key_ops": {json.dumps(ops)}'] if ops is not None
                                 else [])])
        if accept and verdict != "ok":
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'refused'} a valid "
                f"{alg} token signed by the JWK {kid!r} published with {marked} ({got}), "
                "expected the claims: that key is for signatures")
        elif not accept and verdict != "refused":
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} an "
                f"{alg} token signed by the private half of the JWK {kid!r} published with "
                f"{marked} (no alg), expected InvalidToken: "
                + ((f"\"use\" is {use!r}, not \"sig\": only the exact, case-sensitive "
                    "\"sig\" marks a signature key (RFC 7517 4.2: other values may be used, "
                    "so refusing \"enc\" alone is not enough)")
                   if use not in (None, "sig", "enc")
                   else "that key is not for signatures" if ops is None or isinstance(ops, list)
                   else f"key_ops is {type(ops).__name__}, not an array (RFC 7517 4.3), so "
                   "the JWK is malformed and names no operation - check isinstance(key_ops, "
                   "list) before looking for \"verify\" in it: `in` on a string is a "
                   "substring test, on an object a key test"))
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(KEY_USES)} keys by their use): RFC 7517 - \"use\": "
        "\"enc\" is an encryption key (4.2), and \"key_ops\" without \"verify\" may not "
        "check signatures (4.3). Refuse a JWK whose use, when present, is not \"sig\", or "
        "whose key_ops, when present, are not an array holding \"verify\" - an encryption "
        "key's private half is "
        "held by whoever decrypts, who must not be able to mint tokens")


# A signature has exactly one spelling. RFC 7515 2: base64url "with all trailing '='
# characters omitted ... and without the inclusion of any line breaks, whitespace, or other
# additional characters", alphabet "-" and "_" (RFC 4648 5); the last character's unused
# bits are zero (RFC 4648 3.5 lets a decoder refuse them; golang-jwt's WithStrictDecoding
# does). A decoder that takes padding, "+" "/", line breaks or set unused bits reads the
# same signature bytes from another string: one token, several spellings, each valid - a
# denylist, replay cache or audit log keyed on the token string is walked around.
# Each case: what was done to the signature segment, how.
def _padded(sig: str) -> str:
    return sig + "=" * (-len(sig) % 4)


def _standard_alphabet(sig: str) -> str:
    return sig.replace("-", "+").replace("_", "/")


def _line_break(sig: str) -> str:
    return sig[:40] + "\r\n" + sig[40:]


def _unused_bits(sig: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return sig[:-1] + alphabet[alphabet.index(sig[-1]) + 1]  # a zero bit set: same bytes


RESPELLINGS: list[tuple[str, Any]] = [
    ("padded with '=' to a multiple of 4", _padded),
    ("written in the standard base64 alphabet ('+' and '/' for '-' and '_')",
     _standard_alphabet),
    ("broken by a line break (\\r\\n) after 40 characters", _line_break),
    ("respelled with the last character's unused bits set", _unused_bits),
]


def _first_difference(sig: str, other: str, writer: str = "PyJWT") -> str:
    at = next((i for i, (a, b) in enumerate(zip(sig, other, strict=False))
               if a != b), len(sig))
    return (f"{other[max(at - 3, 0):at + 3]!r} at character {at}, where {writer} wrote "
            f"{sig[max(at - 3, 0):at + 3]!r}")


def test_a_signature_has_one_spelling(lib: Lib) -> None:
    k = keys()
    wrong = []
    for alg, key, kid in (("HS256", SECRET, "hs-1"), ("RS256", k.rsa_new, "rsa-2024"),
                          ("ES256", k.ec_a, "ec-a")):
        for n in range(500):  # a signature with a '-' or '_' in it, for the alphabet case
            token = pyjwt.encode({**CLAIMS, "jti": f"spelling-{n}"}, key, algorithm=alg,
                                 headers={"kid": kid})
            if {"-", "_"} & set(token.rsplit(".", 1)[1]):
                break
        signing_input, sig = token.rsplit(".", 1)
        verdict, got = lib.verify(token)
        assert verdict == "ok", (
            f"verify() {'raised ' + got if verdict == 'crashed' else 'refused'} a valid "
            f"{alg} token PyJWT signed with the key {kid!r} ({got}), expected the claims")
        for how, respell in RESPELLINGS:
            other = respell(sig)
            assert other != sig and unb64(other.replace("\r\n", "")) == unb64(sig)
            verdict, got = lib.verify(f"{signing_input}.{other}")
            if verdict != "refused":
                wrong.append(
                    f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} "
                    f"an {alg} token whose signature was {how} "
                    f"({_first_difference(sig, other)}): the same signature bytes from "
                    "another string, expected InvalidToken")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {3 * len(RESPELLINGS)} respelled signatures): a JWS segment is "
        "base64url with no '=' padding, no whitespace, only '-' and '_' besides letters and "
        "digits, and its unused bits zero (RFC 7515 2, RFC 4648 3.5) - decode strictly "
        "(re-encoding the bytes gives the segment back), or one token has several valid "
        "spellings and a denylist or replay cache keyed on the token string is walked "
        "around")


# Every segment has one spelling, not only the signature: the compact serialization is
# BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature) (RFC 7515 7.1), each
# unpadded base64url (RFC 7515 2). Two ways a lenient header or payload goes through:
# - respelled after signing (the signature covers the canonical segments): a verifier that
#   strips the padding, or rebuilds the signing input from the bytes it decoded, checks the
#   signature over a string the token does not hold - the bytes received were never signed;
# - signed over the respelled segment (an issuer that pads, or an attacker holding the key
#   of a test issuer): the signature is good over those bytes, but the token is not a JWS,
#   and a decoder PyJWT-style (padding added back, "+" "/" and line breaks skipped) takes it,
#   so one set of claims has several valid tokens.
# Each case: the segment respelled (0 header, 1 payload), and whether it is signed after.
SEGMENTS = ("header", "payload")


def _segments_to_respell(alg: str, kid: str) -> list[dict[str, Any]]:
    """A header and a payload whose base64url each has unused bits (a length that is not a
    multiple of 4) and a '-' or '_' (so that every respelling changes it)."""
    def fits(part: dict[str, Any]) -> bool:
        text = b64(json.dumps(part).encode())
        return len(text) % 4 != 0 and bool({"-", "_"} & set(text))
    def nonces() -> Iterator[str]:
        # In ASCII text only a byte ending in 0b11111x ('>', '?', '~') at every third place
        # encodes to '-' or '_': three '~' in a row put one there, the padding moves the end.
        return ("~~~" + "x" * n for n in range(6))
    header = next(h for nonce in nonces()
                  if fits(h := {"alg": alg, "typ": "JWT", "kid": kid, "nonce": nonce}))
    payload = next(c for nonce in nonces() if fits(c := {**CLAIMS, "jti": nonce}))
    return [header, payload]


def _sign_input(alg: str, key: Any, signing_input: str) -> str:
    algorithm = pyjwt.get_algorithm_by_name(alg)
    return b64(algorithm.sign(signing_input.encode(), algorithm.prepare_key(key)))


def test_every_segment_has_one_spelling(lib: Lib) -> None:
    k = keys()
    wrong = []
    for alg, key, kid in (("HS256", SECRET, "hs-1"), ("RS256", k.rsa_new, "rsa-2024"),
                          ("ES256", k.ec_a, "ec-a")):
        segments = [b64(json.dumps(part).encode()) for part in _segments_to_respell(alg, kid)]
        token = f"{'.'.join(segments)}.{_sign_input(alg, key, '.'.join(segments))}"
        verdict, got = lib.verify(token)
        assert verdict == "ok", (
            f"verify() {'raised ' + got if verdict == 'crashed' else 'refused'} a valid "
            f"{alg} token signed with the key {kid!r} ({got}), expected the claims")
        for index, segment in enumerate(SEGMENTS):
            for how, respell in RESPELLINGS:
                other = respell(segments[index])
                assert other != segments[index]
                assert unb64(other.replace("\r\n", "")) == unb64(segments[index])
                parts = list(segments)
                parts[index] = other
                for signed_after in (False, True):
                    signing_input = ".".join(parts if signed_after else segments)
                    signature = _sign_input(alg, key, signing_input)
                    verdict, got = lib.verify(f"{'.'.join(parts)}.{signature}")
                    if verdict == "refused":
                        continue
                    wrong.append(
                        f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} "
                        f"an {alg} token whose {segment} segment was {how} "
                        f"({_first_difference(segments[index], other, 'the issuer')}), "
                        + ("and signed over that spelling: a token that is not a JWS, "
                           "decoded leniently - decode the header and payload as strictly as "
                           "the signature" if signed_after else
                           "after signing, the signature made over the canonical segments: "
                           "the signing input checked was not the string received - verify "
                           "the signature over the first two segments exactly as they came, "
                           "and decode them strictly")
                        + "; expected InvalidToken")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {3 * len(SEGMENTS) * len(RESPELLINGS) * 2} respelled tokens): "
        "every segment of a JWS is base64url with no '=' padding, no whitespace, only '-' "
        "and '_' besides letters and digits, and its unused bits zero (RFC 7515 2, 7.1) - "
        "the header and payload too; the signature covers them as sent, so a verifier that "
        "strips, re-pads or re-encodes them checks bytes that were never signed")


SECRET_ELSEWHERE = b"another issuer's hs256 secret, same kid hs-1"


def test_each_call_uses_the_jwks_it_is_given(lib: Lib) -> None:
    """Another issuer (a tenant, or the same one after a rotation that reused its kids)
    publishes other keys under the same kids: each verify() call trusts the JWKS it is
    given, never a key remembered from an earlier call (a cache keyed by kid alone)."""
    k = keys()
    elsewhere = {"keys": [
        {**RSAAlgorithm.to_jwk(k.rsa_old.public_key(), as_dict=True), "kid": "rsa-2024",
         "alg": "RS256", "use": "sig"},
        {**ECAlgorithm.to_jwk(k.ec_b.public_key(), as_dict=True), "kid": "ec-a",
         "alg": "ES256", "use": "sig"},
        {"kty": "oct", "kid": "hs-1", "alg": "HS256", "k": b64(SECRET_ELSEWHERE)}]}
    wrong = []
    for alg, ours, theirs, kid in (("RS256", k.rsa_new, k.rsa_old, "rsa-2024"),
                                   ("ES256", k.ec_a, k.ec_b, "ec-a"),
                                   ("HS256", SECRET, SECRET_ELSEWHERE, "hs-1")):
        mine = pyjwt.encode(CLAIMS, ours, algorithm=alg, headers={"kid": kid})
        other = pyjwt.encode(CLAIMS, theirs, algorithm=alg, headers={"kid": kid})
        first, _ = lib.verify(mine)  # the lab's JWKS first: a cache by kid fills here
        then, got = lib.verify(mine, elsewhere)
        last, got_last = lib.verify(other, elsewhere)
        if first == "ok" and then != "refused":
            wrong.append(
                f"verify() {'raised ' + got if then == 'crashed' else 'accepted'} an {alg} "
                f"token signed by the key the first JWKS publishes as {kid!r}, checked "
                f"against a second JWKS that publishes another key as {kid!r}; expected "
                "InvalidToken: a key remembered from an earlier call (a cache keyed by kid "
                "alone, a JWKS indexed once) verified it - build the key from the JWKS "
                "each call is given, or cache by the JWK's contents")
        elif last != "ok":
            wrong.append(f"verify() {last} an {alg} token signed by the key the second "
                         f"JWKS publishes as {kid!r} ({got_last}); expected the claims: "
                         "each call verifies with the JWKS it is given")
    assert not wrong, "\n".join(wrong)


def _off_curve(jwk: dict[str, Any]) -> dict[str, Any]:
    """The EC JWK with y moved by one: (x, y) is then no point of P-256."""
    y = int.from_bytes(unb64(jwk["y"]), "big")
    return {**jwk, "y": b64(((y + 1) % 2**256).to_bytes(32, "big"))}


# A JWK that no key can be built from: each case, the published JWK it copies, the copy's
# kid, what was done to it, and how.
BROKEN_JWKS: list[tuple[str, str, str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("rsa-2024", "rsa-no-n", "an RSA JWK without its modulus n",
     lambda jwk: {k: v for k, v in jwk.items() if k != "n"}),
    ("rsa-2024", "rsa-even-e", "an RSA JWK whose exponent e is even (65536)",
     lambda jwk: {**jwk, "e": b64((65536).to_bytes(3, "big"))}),
    ("ec-a", "ec-no-x", "an EC JWK without its x coordinate",
     lambda jwk: {k: v for k, v in jwk.items() if k != "x"}),
    ("ec-a", "ec-off-curve", "an EC JWK whose (x, y) is not a point of P-256",
     _off_curve),
    ("hs-1", "hs-no-k", "an oct JWK without its key k",
     lambda jwk: {k: v for k, v in jwk.items() if k != "k"}),
]


def test_a_jwk_no_key_can_be_built_from_refuses_with_invalid_token(lib: Lib) -> None:
    """A JWKS comes over the network from the issuer, and an issuer publishes a broken key
    now and then (a field left out in a rotation, a point off the curve): a key that
    cannot be built verifies nothing. verify() refuses the token with InvalidToken, the one
    exception its callers catch - not the KeyError or ValueError that building the key
    raised, which a caller turns into a 500 (or lets end the worker)."""
    k = keys()
    private = {"rsa-2024": k.rsa_new, "ec-a": k.ec_a, "hs-1": SECRET}
    alg_of = {"rsa-2024": "RS256", "ec-a": "ES256", "hs-1": "HS256"}
    published = k.jwks()["keys"]
    by_kid = {jwk["kid"]: jwk for jwk in published}
    jwks = {"keys": published + [{**broken(by_kid[source]), "kid": kid}
                                 for source, kid, _, broken in BROKEN_JWKS]}
    wrong = []
    for source, kid, what, _ in BROKEN_JWKS:
        token = pyjwt.encode(CLAIMS, private[source], algorithm=alg_of[source],
                             headers={"kid": kid})
        verdict, got = lib.verify(token, jwks)
        if verdict != "refused":
            wrong.append(
                f"verify() {'raised ' + got + ' for' if verdict == 'crashed' else 'accepted'}"
                f" a token naming {kid!r}, {what}, expected InvalidToken: a key that cannot "
                "be built verifies nothing - turn every failure to build or use the key (KeyError, "
                "ValueError, TypeError, not only InvalidSignature) into InvalidToken")
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(BROKEN_JWKS)} broken JWKs)")


# A key too small for its algorithm verifies nothing (RFC 7518 3.2: "A key of the same size
# as the hash output (for instance, 256 bits for "HS256") or larger MUST be used"; 3.3: "A
# key of size 2048 bits or larger MUST be used" for RS256). A short HMAC secret is found
# offline from one token (hashcat brute-forces JWT secrets), and a 1024-bit modulus is
# within reach of factoring: a JWKS that publishes either lets whoever breaks it mint
# tokens. Size is the key's own: the decoded k, the modulus' bit length - not the
# characters or bytes they are written in. Each case: the kid, the key (secret bytes or an
# RSA private key), how n is written (None: minimal), what the key is, accepted or not.
def _hs_secret(size: int) -> bytes:
    return hashlib.sha256(b"ph3.3 weak keys").digest()[:size]


@functools.cache
def weak_rsa() -> dict[int, Any]:
    return {bits: rsa.generate_private_key(public_exponent=65537, key_size=bits)
            for bits in (1024, 2047)}


def key_sizes() -> list[tuple[str, Any, int | None, str, bool]]:
    return [
        ("hs-6-bytes", b"secret", None, "an oct key of 6 bytes (b'secret')", False),
        ("hs-31-bytes", _hs_secret(31), None,
         "an oct key of 31 bytes (248 bits: its base64url k is 42 characters)", False),
        ("hs-32-bytes", _hs_secret(32), None, "an oct key of 32 bytes (256 bits)", True),
        ("rsa-1024", weak_rsa()[1024], None, "an RSA key of 1024 bits", False),
        ("rsa-2047", weak_rsa()[2047], None,
         "an RSA key of 2047 bits (its n is 256 bytes long)", False),
        ("rsa-1024-n-256-bytes", weak_rsa()[1024], 256,
         "an RSA key of 1024 bits whose n is written on 256 bytes (zeros in front)", False),
        ("rsa-2048", keys().rsa_new, None, "an RSA key of 2048 bits", True),
    ]


def sized_jwk(kid: str, key: Any, n_bytes: int | None) -> dict[str, Any]:
    if isinstance(key, bytes):
        return {"kty": "oct", "kid": kid, "alg": "HS256", "use": "sig", "k": b64(key)}
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid,
           "alg": "RS256", "use": "sig"}
    if n_bytes is not None:
        jwk["n"] = b64(key.public_key().public_numbers().n.to_bytes(n_bytes, "big"))
    return jwk


def test_a_key_too_small_for_its_alg_verifies_nothing(lib: Lib) -> None:
    cases = key_sizes()
    jwks = {"keys": [*keys().jwks()["keys"],
                     *(sized_jwk(kid, key, n_bytes) for kid, key, n_bytes, _, _ in cases)]}
    wrong = []
    for kid, key, _, what, accept in cases:
        alg = "HS256" if isinstance(key, bytes) else "RS256"
        verdict, got = lib.verify(signed({"alg": alg, "typ": "JWT", "kid": kid}, key), jwks)
        if accept and verdict != "ok":
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'refused'} a valid "
                f"{alg} token signed with {what}, published as {kid!r} ({got}), expected "
                "the claims: that is the smallest key RFC 7518 allows, and large enough")
        elif not accept and verdict != "refused":
            wrong.append(
                f"verify() {'raised ' + got if verdict == 'crashed' else 'accepted'} an "
                f"{alg} token signed with {what}, published as {kid!r}, expected "
                "InvalidToken: " + (
                    "RFC 7518 3.2 - an HS256 key is at least as long as the hash, 32 bytes "
                    "(256 bits), counted on the decoded k, not its base64url text; a "
                    "shorter secret is brute-forced offline from a single token"
                    if alg == "HS256" else
                    "RFC 7518 3.3 - an RS256 key is 2048 bits or larger, counted on the "
                    "modulus (public_key.key_size, n.bit_length()), not the bytes n is "
                    "written on; a smaller modulus is within reach of factoring"))
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(cases)} keys by their size): a key too small for its "
        "algorithm verifies nothing - whoever breaks it mints tokens")
