"""Which comparison a learner's code calls: hmac.compare_digest (secrets.compare_digest is
the same function) wrapped wherever the learner's module can reach it - the hmac and secrets
modules and the learner's own globals (a `from hmac import compare_digest`) - with every
call's arguments recorded. Lab harnesses (ph3.2, ph3.6) run it where the learner's code runs
and the test decides from what was recorded, so constant-time comparison is checked by
what the code calls, not by timing. No pytest here: it runs in the learner's process."""

from __future__ import annotations

import hmac
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
