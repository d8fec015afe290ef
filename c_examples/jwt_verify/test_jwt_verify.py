"""ph3.c verification: the compiled HS256 verifier against tokens PyJWT signed.

The learner's jwt_verify.c is built with the harness main.c (-Wall -Wextra -Werror, ASan
and UBSan) and fed tokens on stdin, one per line; the harness hands each to
jwt_verify_token() in a heap block of exactly its length, without a NUL, so a read past
the end is an AddressSanitizer report. Every run must leave no sanitizer report. Which
comparison the code calls is read from the learner's object file: its undefined symbols
(nm -u) are the functions it imports."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

SANITIZER_MARKS = ("LeakSanitizer", "AddressSanitizer", "runtime error:",
                   "UndefinedBehaviorSanitizer")
SECRETS = [b"k", b"a 32-byte secret for the lab!!!!", bytes(range(256))[:48] + b"\x00z",
           b"long " * 30]          # the last is longer than SHA-256's 64-byte block
CLAIMS = {"sub": "user-42", "iss": "https://auth.lab.test", "exp": 1_700_000_300}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Program:
    binary: Path
    obj: Path
    learner: Any

    def verify(self, secret: bytes, tokens: list[bytes]) -> list[str]:
        lines = self._run([secret.hex()], tokens, "on a token", (
            "The token is NOT NUL-terminated (use token_len, never strlen); check out_cap "
            "before writing a decoded byte; index tables with unsigned values"))
        assert len(lines) == len(tokens), (
            f"jwt_verify printed {len(lines)} verdicts for {len(tokens)} tokens")
        return lines

    def decode(self, cases: list[tuple[int, bytes]]) -> list[str]:
        """base64url_decode(in, len, out, out_cap, &n) per (out_cap, in), with an output
        block of exactly out_cap bytes: "OK:<hex>" or "ERROR" each (main.c --decode)."""
        lines = self._run(["--decode"], [b"%d:%s" % case for case in cases],
                          "in base64url_decode() on a line", (
            "base64url_decode() wrote past out_cap or read past in_len: check the room "
            "before writing a byte"))
        assert len(lines) == len(cases), (
            f"jwt_verify --decode printed {len(lines)} results for {len(cases)} inputs")
        return lines

    def _run(self, args: list[str], lines: list[bytes], where: str, advice: str) -> list[str]:
        """stdin: ``lines``; stdout, split into words. A sanitizer report or a non-zero
        exit fails, naming the line it happened on."""
        env = {**os.environ,
               "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
               "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
        # learner.run: when grading, the learner's binary runs as the learner's uid.
        done = self.learner.run([str(self.binary), *args], input=b"\n".join(lines) + b"\n",
                                capture_output=True, timeout=60, env=env)
        stderr = done.stderr.decode(errors="replace")
        reports = [m for m in SANITIZER_MARKS if m in stderr]
        out = done.stdout.decode(errors="replace").split()
        if reports or done.returncode != 0:
            at = len(out)
            culprit = lines[at] if at < len(lines) else b"(after the last line)"
            kind = re.search(r"(AddressSanitizer: [\w-]+|runtime error: [^\n]+)", stderr)
            seen = kind.group(1) if kind else (reports[0] if reports
                                               else f"exit status {done.returncode}")
            pytest.fail(
                f"jwt_verify failed with {seen} {where} of {len(culprit)} bytes: a read "
                f"or write outside a buffer or undefined behaviour. {advice}\n"
                f"the input: {culprit[:120]!r}\n{stderr[-2500:]}", pytrace=False)
        return out


@pytest.fixture
def program(learner: Any) -> Program:
    """Built with the c_examples Makefile (once per session: learner.build() keeps it)."""
    built = learner.build()
    return Program(built / "jwt_verify", built / "jwt_verify.o", learner)


def pyjwt_tokens(secret: bytes) -> list[str]:
    """PyJWT tokens for this secret whose segments, together, contain '-' and '_' and
    every length remainder (a decoder for the standard alphabet fails on them)."""
    picked, seen = [], set()
    for n in range(300):
        token = pyjwt.encode({**CLAIMS, "n": n, "pad": "x" * (n % 3)}, secret,
                             algorithm="HS256")
        sig = token.rsplit(".", 1)[1]
        marks = {c for c in sig if c in "-_"} | {f"p{len(token.split('.')[1]) % 4}"}
        if marks - seen:
            picked.append(token)
            seen |= marks
    return picked


def test_accepts_tokens_pyjwt_signed(program: Program) -> None:
    for secret in SECRETS:
        tokens = pyjwt_tokens(secret)
        verdicts = program.verify(secret, [t.encode() for t in tokens])
        refused = [t for t, v in zip(tokens, verdicts, strict=True) if v != "VALID"]
        assert not refused, (
            f"jwt_verify refused {len(refused)} of {len(tokens)} valid tokens PyJWT signed "
            f"with a {len(secret)}-byte secret: jwt_verify_token must return 1 when the "
            "signature is base64url (- and _, no '=' padding) of HMAC-SHA256(secret, the "
            f"bytes 'header.payload' before the second dot)\ne.g. {refused[0]}")


def forgeries(secret: bytes) -> list[tuple[str, str]]:
    good = pyjwt.encode(CLAIMS, secret, algorithm="HS256")
    head, body, sig = good.split(".")
    evil = b64(json.dumps({**CLAIMS, "sub": "admin"}).encode())
    mid = len(sig) // 2
    flipped = sig[:mid] + ("A" if sig[mid] != "A" else "B") + sig[mid + 1:]
    raw_sig = base64.urlsafe_b64decode(sig + "=")
    short = b64(raw_sig[:16])
    return [
        ("a signature with one character changed", f"{head}.{body}.{flipped}"),
        ("a payload swapped under the signature (sub: admin)", f"{head}.{evil}.{sig}"),
        ("a token signed with another secret",
         pyjwt.encode(CLAIMS, secret + b"!", algorithm="HS256")),
        ("alg none: an empty signature", f"{head}.{body}."),
        ("the first 31 bytes of the right signature", f"{head}.{body}.{b64(raw_sig[:31])}"),
        ("the first 16 bytes of the right signature", f"{head}.{body}.{short}"),
        ("the first byte of the right signature", f"{head}.{body}.{b64(raw_sig[:1])}"),
        ("the right signature with a byte appended", f"{head}.{body}.{b64(raw_sig + b'x')}"),
        ("HS512 with the same secret",
         pyjwt.encode(CLAIMS, secret, algorithm="HS512")),
        ("an HMAC over the payload alone",
         f"{head}.{body}."
         + b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())),
        ("a fourth segment", f"{good}.{sig}"),
        ("an empty header", f".{body}.{sig}"),
        # Signed right: only the rule "no empty header or payload" refuses them.
        ("an empty payload, correctly signed", signed(secret, f"{head}.")),
        ("an empty header, correctly signed", signed(secret, f".{body}")),
    ]


def signed(secret: bytes, signing_input: str) -> str:
    """``signing_input`` with its right HS256 signature appended."""
    digest = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(digest)}"


def test_rejects_tampered_and_wrong_secret_tokens(program: Program) -> None:
    for secret in SECRETS[1:3]:
        cases = forgeries(secret)
        verdicts = program.verify(secret, [t.encode() for _, t in cases])
        accepted = [name for (name, _), v in zip(cases, verdicts, strict=True)
                    if v != "INVALID"]
        assert not accepted, (
            f"jwt_verify accepted {', '.join(accepted)}: expected INVALID. A signature "
            "matches only when it has exactly the digest's length (32 bytes) and every "
            "byte is equal: CRYPTO_memcmp(digest, sig, 32) == 0 after checking sig_len; "
            "and a token is header.payload.signature with neither the header nor the "
            "payload empty, whatever its signature (jwt_verify.h)")


def malformed(secret: bytes) -> list[bytes]:
    good = pyjwt.encode(CLAIMS, secret, algorithm="HS256").encode()
    head, body, sig = good.split(b".")
    cases = [good[:n] for n in range(len(good))]          # every truncation
    cases += [b"", b".", b"..", b"...", b"a.b", b"a.b.c", b"a..c", b"..c",
              head + b"." + body + b"." + sig + b"=",
              head + b"." + body + b"." + sig[:-1] + b"+",
              head + b"." + body + b"." + sig[:-1] + b"/",
              head + b"." + body + b"." + sig[:10] + b" " + sig[11:],
              head + b"." + body + b"." + sig[:10] + b"\xff" + sig[11:],
              head + b"." + body + b"." + sig[:10] + b"\x80\xc3\xa9" + sig[13:],
              head + b"." + body + b"." + b"A" * 87,       # 65 bytes: one past any digest
              head + b"." + body + b"." + b"A" * 200,
              head + b"." + body + b"." + b"_" * 10_000,
              head + b"." + body + b"." + sig + b"A",       # length 1 mod 4
              b"." * 500]
    return cases


def test_truncated_and_malformed_input_is_invalid_without_sanitizer_reports(
        program: Program) -> None:
    secret = SECRETS[1]
    cases = malformed(secret)
    verdicts = program.verify(secret, cases)
    accepted = [c for c, v in zip(cases, verdicts, strict=True) if v != "INVALID"]
    assert not accepted, (
        f"jwt_verify accepted {len(accepted)} malformed or truncated tokens, e.g. "
        f"{accepted[0][:100]!r}: expected INVALID")


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Bytes outside base64url put where the signature has an 'A' (value 0): a decoder that
# reads an unknown byte as 0 (a 256-entry table left zero), or NUL as 64 (strchr on the
# alphabet finds its terminator), still decodes the right signature there.
NOT_B64URL = b"\x00=+/ .\x80\xc1\xff"


def aliased_signatures(secret: bytes) -> list[tuple[str, bytes]]:
    """A valid token's signature with one character replaced by a byte outside base64url
    that a careless decoder reads as the same value: every character c by c | 0x80 (a
    decoder masking to 7 bits), and each 'A' by the bytes of NOT_B64URL. The token is
    one whose signature has an 'A' starting a 4-character group and an 'A' after an odd
    value (where even an OR of bit 6 into the previous character changes nothing)."""
    def wanted(sig: str) -> bool:
        at = [i for i, c in enumerate(sig) if c == "A"]
        return any(i % 4 == 0 for i in at) and any(B64URL.index(sig[i - 1]) % 2
                                                   for i in at if i % 4)
    good = next(t for n in range(2000) if wanted(
        (t := pyjwt.encode({**CLAIMS, "n": n}, secret, algorithm="HS256")).rsplit(".", 1)[1]))
    head_body, sig = good.encode().rsplit(b".", 1)
    cases = []
    for i, c in enumerate(sig):
        for bad in [c | 0x80] + (list(NOT_B64URL) if c == ord("A") else []):
            what = (f"signature character {chr(c)!r} at position {i} replaced by the byte "
                    f"0x{bad:02x}")
            cases.append((what, head_body + b"." + sig[:i] + bytes([bad]) + sig[i + 1:]))
    return cases


def test_bytes_outside_base64url_never_alias_a_character(program: Program) -> None:
    secret = SECRETS[1]
    cases = aliased_signatures(secret)
    verdicts = program.verify(secret, [t for _, t in cases])
    accepted = [what for (what, _), v in zip(cases, verdicts, strict=True) if v != "INVALID"]
    assert not accepted, (
        f"jwt_verify accepted a valid token with its {accepted[0]} (and "
        f"{len(accepted) - 1} more such tokens): expected INVALID. Only A-Z a-z 0-9 - _ "
        "are base64url; any other byte is an error, never read as some character: "
        "masking to 7 bits (in[i] & 0x7f) reads 0xc1 as 'A', a 256-entry table left at "
        "0 reads any byte as 'A', strchr(alphabet, c) finds the terminator for NUL. "
        "Otherwise many different token strings verify, and slip past a denylist or a "
        "cache keyed by the raw token")


def decoded_size(in_len: int) -> int:
    """Bytes that in_len base64url characters (no padding) decode to."""
    return in_len // 4 * 3 + max(in_len % 4 - 1, 0)


def test_decode_room_check_is_exact(program: Program) -> None:
    """The result must fit out_cap: a result of exactly out_cap bytes fits; one byte more
    does not (and nothing is written past out_cap either way)."""
    sizes = [32, 64, 31, 33, *range(0, 13)]   # SHA-256/512 digests; every length remainder
    cases = []
    for size in sizes:
        data = bytes((7 * i + size) % 256 for i in range(size))
        encoded = b64(data).encode()
        cases.append((size, encoded, f"OK:{data.hex()}"))
        if size:
            cases.append((size - 1, encoded, "ERROR"))
    results = program.decode([(cap, encoded) for cap, encoded, _ in cases])
    for (cap, encoded, want), got in zip(cases, results, strict=True):
        size = decoded_size(len(encoded))
        fits = "fits exactly" if cap == size else "is 1 byte too big"
        assert got == want, (
            f"base64url_decode() of {len(encoded)} characters ({size} byte"
            f"{'' if size == 1 else 's'}) into out_cap "
            f"{cap} gave {got[:40]!r}, expected {want[:40]!r}: the result {fits}\n"
            "Unpadded base64url yields in_len / 4 * 3 bytes, plus in_len % 4 - 1 for a last "
            "partial group of 2 or 3 characters: check that exact size against out_cap. "
            "Rounding the last group up to 3 bytes refuses results that fit (a caller "
            "whose buffer holds a SHA-256 digest, 32 bytes, would reject every HS256 "
            "signature); an off-by-one either refuses an exact fit or writes past the "
            "buffer.")


def test_signature_compared_with_crypto_memcmp(program: Program) -> None:
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to read the symbols the object imports"
    done = subprocess.run(["nm", "-u", str(program.obj)], capture_output=True, text=True,
                          check=True)
    imported = {line.split()[-1] for line in done.stdout.splitlines() if line.strip()}
    early_exit = sorted(imported & {"memcmp", "bcmp", "strcmp", "strncmp", "__memcmpeq"})
    listed = ", ".join(sorted(i for i in imported if not i.startswith("__")))
    assert "CRYPTO_memcmp" in imported and not early_exit, (
        "jwt_verify.c "
        + (f"calls {', '.join(early_exit)}" if early_exit else "does not call CRYPTO_memcmp")
        + f" (its object imports: {listed})."
        " Compare the signature with CRYPTO_memcmp: memcmp returns at the first differing "
        "byte, so its time tells an attacker how many leading bytes of a forged signature "
        "are right; a hand-written loop may be turned into the same early exit by the "
        "compiler")
