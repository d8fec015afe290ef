"""Calling the learner's code where a refusal is an answer: ("ok", result) or ("refused", why)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def verdict(what: str, fn: Callable[..., Any], /, *args: Any,
            refusal: type[BaseException] | tuple[type[BaseException], ...],
            crash: str | None = None, **kwargs: Any) -> tuple[str, Any]:
    """``fn(*args, **kwargs)`` as a verdict: ``("ok", result)``, or ``("refused", message)``
    when it raises ``refusal`` (the learner's module's own exception, e.g. InvalidToken).

    A ``NotImplementedError`` fails the test (``<what> is not implemented yet``). Any other
    exception fails it saying what was raised and ``crash`` (what the code should have done
    instead); with ``crash=None`` it comes back as ``("crashed", "<Type>: <message>")`` for
    the test to judge."""
    try:
        return "ok", fn(*args, **kwargs)
    except NotImplementedError as exc:
        pytest.fail(f"{what} is not implemented yet: {exc}", pytrace=False)
    except refusal as exc:
        return "refused", str(exc)
    except Exception as exc:  # noqa: BLE001 - the learner's error, reported plainly
        if crash is None:
            return "crashed", f"{type(exc).__name__}: {exc}"
        pytest.fail(f"{what} raised {type(exc).__name__}: {exc}; {crash}", pytrace=False)
