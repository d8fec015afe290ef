"""Harness for ph3.6: watches which comparison the learner's authenticate() calls, and
seeds Python's `random` to see whether new keys depend on it. It runs where the learner's
code runs (a process of its own when grading: learner.harness()). It wraps
hmac.compare_digest (secrets.compare_digest is the same function) wherever the learner's
module can reach it: the hmac and secrets modules and the learner's own globals (a
`from hmac import compare_digest`). The test decides from what was recorded: whether
compare_digest saw the stored hash at all."""

from __future__ import annotations

import hmac
import random
import secrets
from typing import Any

_ORIGINAL = hmac.compare_digest


class CompareWatch:
    def __init__(self, *modules: Any) -> None:
        self.seen: list[tuple[Any, Any]] = []
        self._undo: list[tuple[Any, str, Any]] = []
        targets = [hmac, secrets, *modules]
        for target in targets:
            for name, value in list(vars(target).items()):
                if value is _ORIGINAL:
                    self._undo.append((target, name, value))
                    setattr(target, name, self._wrapper)

    def _wrapper(self, a: Any, b: Any) -> bool:
        self.seen.append((_plain(a), _plain(b)))
        return _ORIGINAL(a, b)

    def calls(self) -> list[tuple[Any, Any]]:
        return list(self.seen)

    def stop(self) -> None:
        for target, name, value in self._undo:
            setattr(target, name, value)
        self._undo.clear()


def _plain(value: Any) -> Any:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (bytes, str)):
        return value
    return repr(value)


def watch(*modules: Any) -> CompareWatch:
    return CompareWatch(*modules)


def keys_after_seeding(store: Any, owner: str, scopes: list[str]) -> list[str]:
    """Two keys, each made right after random.seed(1234): equal keys come from `random`
    (a predictable PRNG), not from the OS's CSPRNG."""
    made = []
    for _ in range(2):
        random.seed(1234)
        made.append(str(store.create(owner, list(scopes))))
    random.seed()
    return made
