"""Cache stampede protection on Redis: a mutex (SET NX PX with an owner token, released by a
Lua compare-and-delete) and probabilistic early expiry (XFetch). See README.md."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import redis


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def acquire_lock(url: str, name: str, ttl_ms: int) -> str | None:
    raise NotImplementedError("acquire_lock: SET name <random token> NX PX ttl_ms")


def release_lock(url: str, name: str, token: str) -> bool:
    raise NotImplementedError("release_lock: delete only if the lock still holds token")


def get_or_load(url: str, key: str, loader: Callable[[], str], ttl_ms: int, *,
                lock_ttl_ms: int = 10_000,
                sleep: Callable[[float], None] = time.sleep) -> str:
    r = client(url)
    value = r.get(key)
    if value is None:  # TODO: every caller that misses runs the loader: a stampede
        value = loader()
        r.set(key, value, px=ttl_ms)
    return str(value)


def xfetch(url: str, key: str, loader: Callable[[], str], ttl_s: float, *, beta: float = 1.0,
           now: Callable[[], float] = time.time,
           rand: Callable[[], float] = random.random) -> str:
    raise NotImplementedError("xfetch: probabilistic early expiry")
