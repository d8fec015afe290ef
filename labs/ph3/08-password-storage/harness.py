"""Harness for ph3.8: watches, where the learner's code runs (a process of its own when
grading: learner.harness()), how login() checks a stored hash - which of bcrypt.checkpw,
bcrypt.hashpw, argon2.low_level's hash_secret, hash_secret_raw and verify_secret, and
hmac.compare_digest it calls. Only calls the learner's code makes (through its own names or
the library modules' attributes) are seen: argon2.PasswordHasher's own use of them is not.
The test decides from what was recorded. No pytest here."""

from __future__ import annotations

from typing import Any

import argon2.low_level
import bcrypt

from labrunner.compare_watch import CompareWatch

__all__ = ["HashWatch", "watch"]

WATCHED = ((bcrypt, ("checkpw", "hashpw")),
           (argon2.low_level, ("hash_secret", "hash_secret_raw", "verify_secret")))


class HashWatch:
    def __init__(self, *modules: Any) -> None:
        self.seen: list[str] = []
        self.compares = CompareWatch(*modules)
        self._undo: list[tuple[Any, str, Any]] = []
        for library, names in WATCHED:
            for name in names:
                original = getattr(library, name)
                wrapper = self._wrap(name, original)
                for target in (library, *modules):
                    for attr, value in list(vars(target).items()):
                        if value is original:
                            self._undo.append((target, attr, value))
                            setattr(target, attr, wrapper)

    def _wrap(self, name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.seen.append(name)
            return original(*args, **kwargs)
        return wrapper

    def calls(self) -> list[str]:
        """Library calls in order, then 'compare_digest' once per constant-time compare."""
        return list(self.seen) + ["compare_digest"] * len(self.compares.calls())

    def stop(self) -> None:
        self.compares.stop()
        for target, attr, value in self._undo:
            setattr(target, attr, value)
        self._undo.clear()


def watch(*modules: Any) -> HashWatch:
    return HashWatch(*modules)
