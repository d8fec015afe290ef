"""Verification for ph3.8: the learner's password storage, judged by what it stores.

The stored string is parsed (argon2-cffi's extract_parameters) and its variant and
parameters checked against OWASP's Password Storage Cheat Sheet; it is verified with
argon2-cffi independently of the learner's code. Old-parameter argon2id hashes and legacy
bcrypt hashes are made by the test with the real libraries; login must upgrade them on a
right password and never on a wrong one. Few hashes are made: each costs ~19 MiB."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Any

import bcrypt
import pytest
from argon2 import Parameters, PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.low_level import hash_secret

PASSWORD = "correct horse battery staple"
UNICODE = "pässwörd 🔑 ünïcode"
# A passphrase past bcrypt's 72-byte limit (116 bytes): argon2id takes it whole.
LONG = "correct horse battery staple " * 4
# OWASP: argon2id with one of these (memory KiB, iterations), parallelism 1 (a minimum).
OWASP = [(47104, 1), (19456, 2), (12288, 3), (9216, 4), (7168, 5)]
OWASP_TEXT = ", ".join(f"m={m} t={t}" for m, t in OWASP)
OLD = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1, type=Type.ID)
# bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(13)), made once: 2**13 rounds take a
# while, so the test never makes it. Above bcrypt's default cost (12) and OWASP's minimum
# (10): a hash some would call strong enough to keep.
STRONG_BCRYPT = "$2b$13$qnq0QVw3hqz2ebFq2OrUz.08wgJdgRtQskzCu9/rrW1iC5U.0uQju"


@dataclass
class Store:
    module: Any

    def hash(self, password: str) -> str:
        try:
            got = self.module.hash_password(password)
        except NotImplementedError as exc:
            pytest.fail(f"hash_password() is not implemented yet: {exc}", pytrace=False)
        assert isinstance(got, str), f"hash_password() returned {type(got).__name__}, not str"
        return got

    def login(self, stored: str, password: str, what: str) -> tuple[bool, str | None]:
        try:
            got = self.module.login(stored, password)
        except NotImplementedError as exc:
            pytest.fail(f"login() is not implemented yet: {exc}", pytrace=False)
        except Exception as exc:  # noqa: BLE001 - the learner's error, reported plainly
            text = str(exc).encode("utf-8", "backslashreplace").decode()   # a lone surrogate
            pytest.fail(f"login() with {what} raised {type(exc).__name__}: {text}; a hash it "
                        "cannot read or a wrong password is (False, None), not a crash",
                        pytrace=False)
        ok = isinstance(got, (tuple, list)) and len(got) == 2 and isinstance(got[0], bool) \
            and (got[1] is None or isinstance(got[1], str))
        assert ok, f"login() with {what} returned {got!r}, expected (bool, str | None)"
        return bool(got[0]), got[1]


@pytest.fixture
def store(learner: Any) -> Store:
    return Store(learner.load("passwords"))


def looks_like(stored: str) -> str:
    if re.fullmatch(r"[0-9a-f]{32}", stored):
        return "an MD5 hex digest"
    if re.fullmatch(r"[0-9a-f]{64}", stored):
        return "a SHA-256 hex digest (a fast hash: billions of guesses per second on a GPU)"
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        return "a bcrypt hash"
    if stored.startswith("$argon2i$"):
        return ("argon2i (not argon2id: weaker against GPU time-memory trade-offs; OWASP "
                "asks for argon2id)")
    if stored.startswith("$argon2d$"):
        return "argon2d (not argon2id: data-dependent memory access leaks by side channel)"
    return "not a PHC string"


def check_owasp(stored: str, what: str) -> None:
    assert stored.startswith("$argon2id$"), (
        f"{what} stored {stored[:40]!r}, which is {looks_like(stored)}; expected an argon2id "
        "PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash)")
    try:
        params = extract_parameters(stored)
    except InvalidHashError as exc:
        pytest.fail(f"{what} stored {stored!r}, which argon2 cannot parse: {exc}",
                    pytrace=False)
    m, t, p = params.memory_cost, params.time_cost, params.parallelism
    assert any(m >= om and t >= ot for om, ot in OWASP) and p >= 1, (
        f"{what} stored argon2id with m={m} KiB, t={t}, p={p}: below OWASP's minimum "
        f"(one of {OWASP_TEXT}, p=1). Memory is what makes GPU guessing expensive")
    assert params.version == 19, f"{what}: argon2 version {params.version}, expected 19"
    assert params.salt_len >= 16, (
        f"{what}: a {params.salt_len}-byte salt, expected at least 16 random bytes")


def verifies(stored: str, password: str | bytes) -> bool:
    try:
        return PasswordHasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def test_stored_hash_is_argon2id_with_owasp_parameters(store: Store) -> None:
    first = store.hash(PASSWORD)
    check_owasp(first, "hash_password()")
    assert verifies(first, PASSWORD), (
        "argon2-cffi does not verify the password against the hash hash_password() made: "
        "store the string PasswordHasher.hash() returns, as it is")
    second = store.hash(PASSWORD)
    assert second != first, (
        "hash_password() gave the same string twice for one password: each hash needs a "
        "fresh random salt, or equal passwords are visible as equal hashes")
    unicode = store.hash(UNICODE)
    assert verifies(unicode, UNICODE), "a non-ASCII password does not verify after hashing"


def test_login_with_a_current_hash(store: Store) -> None:
    stored = store.hash(PASSWORD)
    for password, want, what, why in (
            (PASSWORD, True, "the right password", ""),
            (PASSWORD.upper(), False, "the password in upper case",
             ": case is part of the password - lower() or casefold() on both sides makes "
             "'Secret' and 'secret' the same password"),
            (PASSWORD + " ", False, "the password with a trailing space",
             ": a space is a character of the password like any other - strip() on both "
             "sides makes 'pw ' and 'pw' the same password (NIST SP 800-63B: accept spaces, "
             "never silently change what was typed)"),
            ("", False, "an empty password", "")):
        ok, new = store.login(stored, password, what)
        assert ok is want, (
            f"login() with {what} returned ok={ok}, expected {want}{why}")
        assert new is None, (
            f"login() with {what} returned a new hash for a hash already at the current "
            f"parameters{'' if ok else ' after a FAILED login'}: rehash only when "
            "check_needs_rehash() says the parameters changed (and the password was right)")


# Passwords as a keyboard or an input method may send them, each not in NFKC form (NIST
# SP 800-63B allows normalizing to NFKC or NFKD - then on both sides, or on neither).
UNNORMALIZED = [("pa\u0308sswo\u0308rd tu\u0308r", "umlauts as a letter plus a combining "
                 "diaeresis (NFD, as macOS file names and some keyboards send them)"),
                ("\uff30\uff41\uff53\uff53 \ufb01ve", "fullwidth letters and an 'fi' "
                 "ligature (compatibility characters NFKC rewrites)"),
                ("\u212bngstr\u00f6m 42", "an Angstrom sign U+212B (NFC rewrites it to "
                 "U+00C5)")]


# A password as typed, with the whitespace a form handler's strip() would take away:
# registered with it, it logs in with it.
SPACED = ("  correct horse battery staple ", "spaces before and after it (a generated or "
          "pasted password may have them: spaces are characters of the password)")


def normalized_as(stored: str, password: str) -> str:
    if password.strip() != password and verifies(stored, password.strip()):
        return "a hash of it with its surrounding whitespace stripped (strip())"
    for form in ("NFKC", "NFC", "NFKD", "NFD"):
        if unicodedata.normalize(form, password) != password \
                and verifies(stored, unicodedata.normalize(form, password)):
            return f"a hash of its {form} form"
    return "a hash of something else"


def test_login_with_the_password_as_registered(store: Store) -> None:
    """The password a user registered with logs in, whatever Unicode form it came in:
    normalizing (NFKC) when hashing but not when checking, or the other way round, locks
    out every user whose keyboard sends another form. Stripping whitespace on one side
    does the same to a password with spaces at its ends."""
    for password, what in [*UNNORMALIZED, SPACED]:
        stored = store.hash(password)
        ok, new = store.login(stored, password, f"the password it was registered with "
                                                f"({what})")
        if ok and new is None:
            continue
        side = ("hash_password() hashed it as given (argon2-cffi verifies it), so login() "
                "checked another form of it (normalized on login's side only?)"
                if verifies(stored, password)
                else f"hash_password() stored {normalized_as(stored, password)}, "
                     "login() checked the password as typed")
        assert ok, (
            f"login() refused the password the hash was made from ({what}): {side}. A "
            "change applied on one side only (a Unicode normalization, a strip() of "
            "whitespace) locks out every user whose input it changes - normalize in "
            "hash_password() and login() alike, or in neither; and never strip a password")
        assert new is None, (
            f"login() with the password the hash was just made from ({what}) returned a "
            "new hash: the parameters did not change, nothing needs rehashing")


def test_old_argon2_parameters_rehashed_on_login(store: Store) -> None:
    stored = OLD.hash(PASSWORD)  # m=8192 t=1: what an older release stored
    ok, new = store.login(stored, "not the password", "a wrong password (old parameters)")
    assert (ok, new) == (False, None), (
        f"login() with a wrong password returned ({ok}, {str(new)[:30]}), expected "
        "(False, None): nothing is rehashed without the right password")
    ok, new = store.login(stored, PASSWORD, "the right password (old parameters)")
    assert ok, "login() refused the right password for an argon2id hash with older parameters"
    assert new is not None, (
        "login() accepted a hash stored with m=8192 t=1 but returned no new hash: when the "
        "parameters changed, rehash on login (PasswordHasher.check_needs_rehash), the only "
        "moment the plaintext is at hand")
    check_owasp(new, "the rehash on login")
    assert verifies(new, PASSWORD), "the rehashed string does not verify the password"


def weaker_variants(ours: Parameters) -> list[tuple[str, Parameters]]:
    """Hashes one parameter weaker (or older) than `ours`, each with the rest unchanged:
    what an earlier release stored before a parameter was raised. (Less memory is the
    m=8192 t=1 hash of test_old_argon2_parameters_rehashed_on_login.)"""
    changes = [("one iteration fewer", "time_cost", ours.time_cost - 1, 1),
               ("an 8-byte salt", "salt_len", 8, 8),
               ("a 16-byte hash", "hash_len", 16, 16),
               ("argon2 version 16 (1.0, before RFC 9106's 1.3)", "version", 16, 16)]
    # The ignore: replace()'s keywords are typed one by one (`type` is a Type), and a
    # dict of ints given as **kwargs cannot be matched to them; these are all int fields.
    return [(what, replace(ours, **{name: value}))  # type: ignore[arg-type]
            for what, name, value, least in changes if least <= value < getattr(ours, name)]


def params_text(p: Parameters) -> str:
    return (f"v={p.version} m={p.memory_cost} t={p.time_cost} p={p.parallelism} "
            f"salt={p.salt_len} hash={p.hash_len}")


def kept_on_login(store: Store, variants: list[tuple[str, Parameters]]) -> list[str]:
    """Each (what, parameters) hash of the right password logged in with: those login()
    accepted without returning a new hash, described. A refusal fails the test."""
    missed = []
    for what, params in variants:
        stored = hash_secret(PASSWORD.encode(), os.urandom(params.salt_len),
                             params.time_cost, params.memory_cost, params.parallelism,
                             params.hash_len, Type.ID, params.version).decode()
        ok, new = store.login(stored, PASSWORD, f"the right password ({what})")
        assert ok, f"login() refused the right password for an argon2id hash with {what}"
        if new is None:
            missed.append(f"{what} ({params_text(params)})")
    return missed


def test_each_weaker_parameter_rehashed_on_login(store: Store) -> None:
    """A hash differing from the current parameters in any ONE of them (iterations, salt
    or hash length, version) is replaced on a successful login: rehashing on
    memory alone keeps hashes made with too few iterations for ever."""
    ours = extract_parameters(store.hash(PASSWORD))
    missed = kept_on_login(store, weaker_variants(ours))
    assert not missed, (
        f"login() accepted the right password but returned no new hash for argon2id hashes "
        f"with {'; '.join(missed)} - yours are {params_text(ours)}: a hash whose parameters "
        "differ from yours in any one of them is replaced on a successful login. Compare "
        "the whole parameter set (PasswordHasher.check_needs_rehash), not the memory or "
        "the string's prefix alone")


def stronger_variants(ours: Parameters) -> list[tuple[str, Parameters]]:
    """Hashes one parameter stronger than `ours`, each with the rest unchanged: what an
    earlier release stored with argon2-cffi's defaults (RFC 9106: p=4, t=3) before the
    parameters were set to these."""
    return [(f"two more lanes (p={ours.parallelism + 2})",
             replace(ours, parallelism=ours.parallelism + 2)),
            ("one iteration more", replace(ours, time_cost=ours.time_cost + 1)),
            ("a 32-byte salt" if ours.salt_len < 32 else "a salt 8 bytes longer",
             replace(ours, salt_len=max(32, ours.salt_len + 8)))]


def test_each_other_parameter_rehashed_on_login(store: Store) -> None:
    """'Differ', not 'weaker': a hash made with more lanes, iterations or salt than the
    current parameters is replaced too (check_needs_rehash compares for equality). The
    parameters are the operator's to choose - lowered on purpose to bear the login load,
    or set from argon2-cffi's defaults (p=4) by an earlier release: a comparison that only
    looks for weaker values keeps those hashes, at their cost, for ever."""
    ours = extract_parameters(store.hash(PASSWORD))
    missed = kept_on_login(store, stronger_variants(ours))
    assert not missed, (
        f"login() accepted the right password but returned no new hash for argon2id hashes "
        f"with {'; '.join(missed)} - yours are {params_text(ours)}: parameters that differ "
        "from yours are replaced on a successful login, also when they are stronger. A "
        "hand-written 'weaker than ours' comparison (or one that leaves a parameter out, "
        "such as the lanes) keeps them for ever: hashes from argon2-cffi's defaults (p=4), "
        "or from before you lowered the cost on purpose, each login paying their price. "
        "Ask PasswordHasher.check_needs_rehash(stored), which compares every parameter "
        "for equality")


@pytest.mark.parametrize("prefix,cost", [(b"2b", 5), (b"2a", 4), (b"2y", 4)])
def test_legacy_bcrypt_upgraded_only_on_success(store: Store, prefix: bytes,
                                                cost: int) -> None:
    # $2y$ (PHP's crypt) is the same algorithm as $2b$: the library makes 2a/2b, the
    # prefix is renamed for 2y (bcrypt.checkpw reads all three).
    made = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost, b"2b" if prefix == b"2y"
                                                           else prefix)).decode()
    legacy = f"${prefix.decode()}${made[4:]}"
    for wrong in ("correct horse battery stapler", ""):
        ok, new = store.login(legacy, wrong, "a wrong password (legacy bcrypt)")
        assert not ok, "login() accepted a wrong password against the legacy bcrypt hash"
        assert new is None, (
            "login() returned a new hash after a FAILED login against a legacy bcrypt hash: "
            "the account would be rehashed from a password that is not the user's. Upgrade "
            "only after bcrypt.checkpw() said yes")
    ok, new = store.login(legacy, PASSWORD, "the right password (legacy bcrypt)")
    assert ok, (f"login() refused the right password for a legacy ${prefix.decode()}$ bcrypt "
                "hash: $2a$, $2b$ and $2y$ (PHP's) are all bcrypt - recognise every one of "
                "them and verify it with bcrypt.checkpw")
    assert new is not None, (
        "login() accepted a legacy bcrypt hash without upgrading it: return a new argon2id "
        "hash, so the weaker hash leaves the table on the first successful login")
    check_owasp(new, "the upgrade of a bcrypt hash")
    assert verifies(new, PASSWORD), "the upgraded hash does not verify the password"


def test_high_cost_bcrypt_upgraded_too(store: Store) -> None:
    ok, new = store.login(STRONG_BCRYPT, PASSWORD, "the right password (bcrypt, cost 13)")
    assert ok, "login() refused the right password for a $2b$ bcrypt hash of cost 13"
    assert new is None or new.startswith("$argon2id$"), (
        f"login() upgraded a cost-13 bcrypt hash to {new[:30]!r}, expected argon2id")
    assert new is not None, (
        "login() accepted a bcrypt hash of cost 13 (above bcrypt's default 12 and OWASP's "
        "minimum 10) but kept it, while lower-cost ones are upgraded: every legacy bcrypt "
        "hash is replaced on its first successful login, whatever its cost - bcrypt is not "
        "memory-hard, so GPUs and ASICs guess it cheaply at any number of rounds, and a "
        "legacy scheme kept for some rows never leaves the table")
    check_owasp(new, "the upgrade of a cost-13 bcrypt hash")
    assert verifies(new, PASSWORD), "the upgraded hash does not verify the password"


def test_other_stored_strings_never_match(store: Store) -> None:
    cases = [
        (PASSWORD, "the plaintext itself (a table that never hashed)"),
        (hashlib.md5(PASSWORD.encode()).hexdigest(), "an unsalted MD5 of the password"),
        (hashlib.sha256(PASSWORD.encode()).hexdigest(), "an unsalted SHA-256"),
        ("", "an empty string"),
        ("$argon2id$v=19$m=19456,t=2,p=1$garbage", "a truncated argon2id string"),
        ("$2b$04$tooshort", "a truncated bcrypt string"),
        (PasswordHasher(type=Type.I, memory_cost=8192, time_cost=1).hash(PASSWORD),
         "an argon2i hash (not a scheme this table uses)"),
    ]
    wrong = []
    for stored, what in cases:
        ok, new = store.login(stored, PASSWORD, what)
        if ok or new is not None:
            wrong.append(f"login() against {what} returned ({ok}, {str(new)[:20]}...), "
                         "expected (False, None)")
    assert not wrong, "\n".join(wrong) + (
        "\nOnly argon2id and bcrypt strings are ever verified: comparing the stored string "
        "with the password, or with a fast digest of it, accepts what an attacker who read "
        "the table can compute")


def test_bcrypt_checked_in_constant_time(store: Store, learner: Any) -> None:
    legacy = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4, b"2b")).decode()
    watch = learner.harness().watch(store.module)
    try:
        for password, what in ((PASSWORD, "the right password"),
                               ("correct horse battery stapler", "a wrong password")):
            store.login(legacy, password, f"{what} (legacy bcrypt)")
    finally:
        calls = watch.calls()
        watch.stop()
    if "checkpw" in calls:
        return
    assert "hashpw" not in calls or "compare_digest" in calls, (
        "login() checked the legacy bcrypt hash by recomputing it with bcrypt.hashpw and "
        "comparing the result with '==' (bcrypt.checkpw was never called, nor "
        "hmac.compare_digest): '==' stops at the first different byte, and its timing "
        "leaks how much of the hash a guess got right - use bcrypt.checkpw, which compares "
        "in constant time")


def test_argon2_checked_in_constant_time(store: Store, learner: Any) -> None:
    """The argon2id path, as the bcrypt one: a check that recomputes the hash with the
    stored salt (argon2.low_level.hash_secret) and compares strings with '==' leaks, by its
    timing, how much of the stored hash a guess matched."""
    current = store.hash(PASSWORD)
    watch = learner.harness().watch(store.module)
    try:
        for password, what in ((PASSWORD, "the right password"),
                               ("correct horse battery stapler", "a wrong password")):
            store.login(current, password, f"{what} (a current argon2id hash)")
    finally:
        calls = watch.calls()
        watch.stop()
    recomputed = [name for name in calls if name in ("hash_secret", "hash_secret_raw")]
    assert not recomputed or "verify_secret" in calls or "compare_digest" in calls, (
        f"login() checked the argon2id hash by recomputing it with "
        f"argon2.low_level.{recomputed[0] if recomputed else ''}() and comparing the result "
        "with '==' (neither verify_secret nor hmac.compare_digest was called): '==' stops at "
        "the first different character, and its timing leaks how much of the hash a guess "
        "got right - use PasswordHasher.verify (or verify_secret), which compares in "
        "constant time")


def test_long_passphrases_hashed_whole(store: Store) -> None:
    """argon2id has no length limit: a passphrase is hashed and checked whole. 72 bytes is
    bcrypt's limit (bcrypt 5 raises past it, older releases silently cut): applying it to
    argon2id makes two passphrases that share their first 72 bytes the same password."""
    n = len(LONG.encode())
    stored = store.hash(LONG)
    check_owasp(stored, f"hash_password() of a {n}-byte passphrase")
    if not verifies(stored, LONG):
        seen = ("its first 72 bytes - that is bcrypt's limit, not argon2id's"
                if verifies(stored, LONG.encode()[:72]) else
                "it with its trailing space stripped - strip() changes the password"
                if verifies(stored, LONG.strip()) else "something else")
        pytest.fail(f"argon2-cffi does not verify the {n}-byte passphrase (it ends in a space) "
                    f"against the hash hash_password() made of it: the hash is of {seen}; "
                    "hash the whole password, exactly as typed", pytrace=False)
    cases = [(LONG, True, f"the right {n}-byte passphrase"),
             (LONG[:72] + "x" * (len(LONG) - 72),
              False, "a passphrase sharing only its first 72 bytes with the right one"),
             (LONG[:-2] + "!", False, "the passphrase with its last characters changed")]
    wrong = []
    for password, want, what in cases:
        ok, new = store.login(stored, password, what)
        if ok is not want or new is not None:
            wrong.append(f"login() with {what} returned ({ok}, {str(new)[:20]}), expected "
                         f"({want}, None)")
    assert not wrong, "\n".join(wrong) + (
        "\nEvery byte of a password counts: truncating to 72 bytes (bcrypt's limit) before "
        "argon2id lets anyone who knows the start of a long passphrase in")


# Wrong passwords bcrypt 5 refuses to take (ValueError past 72 bytes): by characters, by
# bytes of UTF-8, both. None shares its first 72 bytes with PASSWORD.
OVERLONG = [("x" * 100, "100 characters"), ("ü" * 40, "40 characters, 80 bytes of UTF-8"),
            ("🔑" * 19, "19 characters, 76 bytes of UTF-8")]


def test_overlong_wrong_password_against_bcrypt(store: Store) -> None:
    legacy = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4, b"2b")).decode()
    for password, size in OVERLONG:
        what = (f"a wrong password of {size} against a legacy bcrypt hash (bcrypt takes at "
                "most 72 BYTES and raises ValueError past them)")
        ok, new = store.login(legacy, password, what)
        assert (ok, new) == (False, None), (
            f"login() with {what} returned ({ok}, {str(new)[:20]}), expected (False, None)")


# A password no UTF-8 can encode: a lone surrogate, what json.loads makes of a "\\ud800"
# escape in a login request's body - any client can send one. No one's password: refused.
SURROGATE = "correct horse \ud800 battery"
SURROGATE_WHAT = ("a password holding a lone surrogate U+D800 (what json.loads makes of a "
                  "\"\\ud800\" escape: any client can send it; UTF-8 cannot encode it)")


def test_a_password_utf8_cannot_encode_is_refused(store: Store) -> None:
    """A lone surrogate is a str that .encode("utf-8") refuses with UnicodeEncodeError (a
    ValueError): both ways of checking must take it as the wrong password it is, not let
    the error escape as a 500 on a login endpoint."""
    legacy = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4, b"2b")).decode()
    for stored, scheme in ((store.hash(PASSWORD), "a current argon2id hash"),
                           (legacy, "a legacy bcrypt hash")):
        ok, new = store.login(stored, SURROGATE, f"{SURROGATE_WHAT}, against {scheme}")
        assert (ok, new) == (False, None), (
            f"login() with {SURROGATE_WHAT} against {scheme} returned ({ok}, "
            f"{str(new)[:20]}), expected (False, None)")


def test_legacy_bcrypt_of_a_password_as_typed(store: Store) -> None:
    """The old system hashed the password's UTF-8 as typed, in whatever Unicode form the
    user's keyboard sent: a login that normalizes (allowed, on both sides, for its own
    argon2id hashes) must still check a legacy hash with the password as typed, or every
    such user is locked out by the migration. The upgrade is then stored as
    hash_password() stores, and logs in again."""
    password, what = UNNORMALIZED[2]  # the Angstrom sign: changed by NFC, NFKC, NFD, NFKD
    legacy = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4, b"2b")).decode()
    ok, new = store.login(legacy, password, f"the right password ({what}) against its legacy "
                                            "bcrypt hash")
    assert ok, (
        f"login() refused the right password ({what}) against a legacy bcrypt hash the old "
        "system made of it as typed (its UTF-8 bytes, not normalized): a Unicode "
        "normalization (NFKC, NFC) applied before bcrypt.checkpw checks another string than "
        "the one the old system hashed, and every user whose keyboard sends such characters "
        "is locked out by the migration. Normalize for your own argon2id hashes if you like "
        "(in hash_password() and login() alike), but check a legacy hash with the password "
        "as typed - then store hash_password(password)")
    assert new is not None, "login() accepted a legacy bcrypt hash without upgrading it"
    again = store.login(new, password, f"the right password ({what}) against the argon2id "
                                       "hash its legacy bcrypt hash was upgraded to")
    assert again == (True, None), (
        f"after the upgrade of a legacy bcrypt hash, login() with the same password ({what}) "
        f"against the new hash returned ({again[0]}, {str(again[1])[:20]}), expected (True, "
        "None): the upgrade must be hashed as hash_password() hashes (the same normalization, "
        "if any), so the user logs in again with what they typed")


# Long passphrases of users from before the migration. bcrypt before 5.0 (like PHP's
# password_hash and Spring's BCryptPasswordEncoder) silently hashed only the first 72 bytes
# of a longer password; bcrypt 5 raises ValueError instead. The field's practice (passlib's
# bcrypt with truncate_error=False, its default) checks a legacy hash with those 72 bytes,
# then stores argon2id of the WHOLE password. The second case's 72nd byte falls inside the
# key emoji (bytes 69-72 of 111): the old libraries cut bytes, not characters.
LEGACY_LONG = [(LONG, f"a {len(LONG.encode())}-byte ASCII passphrase"),
               ("grüße aus köln, schöne tür 🔑 " * 3,
                "an 87-character passphrase of 111 bytes of UTF-8")]


@pytest.mark.parametrize("passphrase,what", LEGACY_LONG, ids=["ascii", "utf8"])
def test_long_passphrase_of_a_legacy_bcrypt_hash(store: Store, passphrase: str,
                                                 what: str) -> None:
    whole = passphrase.encode()
    cut = whole[:72]
    legacy = bcrypt.hashpw(cut, bcrypt.gensalt(4, b"2b")).decode()  # as bcrypt < 5 did
    ok, new = store.login(legacy, passphrase, f"the right passphrase ({what}, legacy bcrypt)")
    assert ok, (
        f"login() refused the right passphrase ({what}) against its legacy bcrypt hash: "
        "bcrypt before "
        "5.0 (and PHP's, Spring's) hashed only the first 72 bytes of a longer password, "
        "silently, so that hash is of the passphrase's first 72 bytes - bcrypt 5 raises "
        "ValueError for the whole one, and a user with a long passphrase is locked out "
        "after the migration. Check a legacy hash with password.encode()[:72] (bytes of "
        "UTF-8, not characters), as passlib does")
    assert new is not None, (
        f"login() accepted the right passphrase ({what}) against a legacy bcrypt hash "
        "without upgrading it: return a new argon2id hash")
    check_owasp(new, f"the upgrade of the legacy bcrypt hash of {what}")
    sibling = cut + b"x" * (len(whole) - 72)
    if not verifies(new, whole):
        seen = ("a hash of its first 72 bytes" if verifies(new, cut)
                else "a hash of something else than the whole passphrase")
        pytest.fail(
            f"login() upgraded the legacy bcrypt hash of {what} to {seen}: argon2-cffi does "
            "not verify the whole passphrase against it. The 72-byte cut is bcrypt's limit, "
            "not argon2id's: hash the WHOLE password the user typed, or the truncation "
            "outlives bcrypt and every passphrase sharing those 72 bytes logs in for ever",
            pytrace=False)
    assert not verifies(new, sibling), (
        f"the argon2id upgrade of {what} also verifies a passphrase sharing only its first "
        "72 bytes: the upgrade must hash every byte of the password")
