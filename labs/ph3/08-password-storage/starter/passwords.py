"""Password storage: argon2id with OWASP's parameters, rehash when they change, legacy
bcrypt hashes upgraded on the first successful login. See README.md."""

from __future__ import annotations


def hash_password(password: str) -> str:
    """The argon2id PHC string to store for this password."""
    raise NotImplementedError("hash_password(): argon2id with OWASP's parameters")


def login(stored: str, password: str) -> tuple[bool, str | None]:
    """(ok, new_hash): new_hash is what to store instead of `stored`, or None to keep it."""
    raise NotImplementedError("login(): verify, then rehash or upgrade when needed")
