"""The stampede itself, run where the learner's code runs: 50 threads call get_or_load on a
missing key at once. The loader (this harness's) holds its caller until every other caller
has called the injected sleep() at least once - that is, has found the lock taken and is
waiting - or until a second loader call shows up (the stampede). So the outcome does not
depend on how the threads happen to be scheduled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any


def stampede(module: ModuleType, url: str, key: str, callers: int, ttl_ms: int) -> dict[str, Any]:
    cond = threading.Condition()
    slept: set[int] = set()
    loads = [0]
    results: list[Any] = [None] * callers
    errors: list[str] = []
    held_until_all_waited = [False]

    def loader() -> str:
        with cond:
            loads[0] += 1
            cond.notify_all()
            held_until_all_waited[0] = cond.wait_for(
                lambda: len(slept) >= callers - 1 or loads[0] > 1, timeout=20)
        return "fresh-value"

    def sleeper(i: int) -> Any:
        def sleep(seconds: float) -> None:
            with cond:
                slept.add(i)
                cond.notify_all()
            time.sleep(min(max(seconds, 0.0), 0.05))
        return sleep

    def call(i: int) -> None:
        try:
            results[i] = module.get_or_load(url, key, loader, ttl_ms, sleep=sleeper(i))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    return {"loads": loads[0], "results": [str(r) for r in results], "errors": errors,
            "slept": len(slept), "alive": sum(t.is_alive() for t in threads),
            "held": held_until_all_waited[0]}


def other_key_while_loading(module: ModuleType, url: str,
                             keys: Callable[[], list[str]]) -> dict[str, Any]:
    """A's loader for product:a runs (held until B is done); meanwhile B misses product:b,
    which nobody is loading. B's sleep() raises: B is to load, not wait. Returns whether A
    reached its loader, the keys Redis held then (``keys()``, read by the test's side) and
    B's outcome ("waited" if it slept)."""
    a_loading, a_may_finish = threading.Event(), threading.Event()
    out: dict[str, Any] = {"a_loading": False, "held": [], "b": None}

    def a_loader() -> str:
        a_loading.set()
        a_may_finish.wait(30)
        return "value-a"

    def run_a() -> None:
        try:
            module.get_or_load(url, "product:a", a_loader, 60_000, lock_ttl_ms=60_000,
                               sleep=lambda s: None)
        except Exception:  # noqa: BLE001, S110 - the other tests judge A's own load
            pass

    def b_sleep(_seconds: float) -> None:
        raise _Waited()

    a = threading.Thread(target=run_a, daemon=True)
    a.start()
    try:
        out["a_loading"] = a_loading.wait(30)
        if out["a_loading"]:
            out["held"] = keys()
            out["b"] = module.get_or_load(url, "product:b", lambda: "value-b", 60_000,
                                          lock_ttl_ms=60_000, sleep=b_sleep)
    except _Waited:
        out["b"] = "waited"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["b"] = f"{type(exc).__name__}: {exc}"
    finally:
        a_may_finish.set()
        a.join(40)
    return out


class _Waited(Exception):
    """B's sleep() was called: it found a lock held, though nobody loads its key."""


def tokens_of_one_thread(module: ModuleType, url: str, name: str, ttl_ms: int, times: int,
                         expire: Callable[[], None]) -> list[str | None]:
    """``times`` acquire_lock() calls for the lock ``name`` from ONE thread, the way one
    worker (or one event loop's tasks) takes lock after lock; ``expire()`` (the test's side)
    deletes the lock between them, as its TTL would. Returns the tokens acquire_lock gave.
    From the test's side two calls may reach the learner's process on two threads."""
    tokens: list[str | None] = []
    for _ in range(times):
        tokens.append(module.acquire_lock(url, name, ttl_ms))
        expire()
    return tokens
