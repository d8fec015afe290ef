"""Harness for ph3.8: watches, where the learner's code runs (a process of its own when
grading: learner.harness()), how login() checks a legacy bcrypt hash - which of
bcrypt.checkpw, bcrypt.hashpw and hmac.compare_digest it calls. The test decides from what
was recorded. No pytest here."""

from __future__ import annotations

from typing import Any

import bcrypt

from labrunner.compare_watch import CompareWatch

__all__ = ["BcryptWatch", "watch"]


class BcryptWatch:
    def __init__(self, *modules: Any) -> None:
        self.seen: list[str] = []
        self.compares = CompareWatch(*modules)
        self._undo: list[tuple[Any, str, Any]] = []
        for name in ("checkpw", "hashpw"):
            original = getattr(bcrypt, name)
            wrapper = self._wrap(name, original)
            for target in (bcrypt, *modules):
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
        """bcrypt calls in order, then 'compare_digest' once per constant-time compare."""
        return list(self.seen) + ["compare_digest"] * len(self.compares.calls())

    def stop(self) -> None:
        self.compares.stop()
        for target, attr, value in self._undo:
            setattr(target, attr, value)
        self._undo.clear()


def watch(*modules: Any) -> BcryptWatch:
    return BcryptWatch(*modules)
