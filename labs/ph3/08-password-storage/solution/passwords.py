"""Password storage: argon2id with OWASP's parameters, rehash when they change, legacy
bcrypt hashes upgraded on the first successful login."""

from __future__ import annotations

import bcrypt
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# OWASP Password Storage Cheat Sheet: argon2id, m = 19 MiB, t = 2, p = 1.
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32,
                        salt_len=16, type=Type.ID)
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
BCRYPT_MAX_BYTES = 72  # what bcrypt reads of a password


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def login(stored: str, password: str) -> tuple[bool, str | None]:
    """(ok, new_hash): new_hash is what to store instead of `stored`, or None to keep it."""
    if stored.startswith("$argon2id$"):
        try:
            HASHER.verify(stored, password)  # constant time inside
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, None
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no one's password
            return False, None
        if HASHER.check_needs_rehash(stored):
            return True, HASHER.hash(password)
        return True, None
    if stored.startswith(BCRYPT_PREFIXES):
        # bcrypt reads at most 72 bytes: bcrypt before 5.0 (like PHP's password_hash and
        # Spring's encoder) cut a longer password there silently, so a legacy hash of a
        # long passphrase is a hash of its first 72 bytes. Check those, as passlib does
        # (truncate_error=False); bcrypt 5 would raise ValueError and lock the user out.
        try:
            ok = bcrypt.checkpw(password.encode("utf-8")[:BCRYPT_MAX_BYTES],
                                stored.encode("ascii"))
        except ValueError:  # a malformed hash
            return False, None
        # Upgrade only now that the password is known to be right, and from the WHOLE
        # password: argon2id has no 72-byte limit, the upgrade ends the truncation.
        return (True, HASHER.hash(password)) if ok else (False, None)
    # Anything else (plaintext, unsalted digests, other schemes) is never accepted.
    return False, None
