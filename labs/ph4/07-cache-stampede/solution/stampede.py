"""Cache stampede protection on Redis: a mutex (SET NX PX with an owner token, released by a
Lua compare-and-delete) and probabilistic early expiry (XFetch)."""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import Callable

import redis

# Delete the lock only if it still holds our token: GET and DEL in one atomic step.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_clients: dict[str, redis.Redis] = {}


def client(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, decode_responses=True)
    return _clients[url]


def acquire_lock(url: str, name: str, ttl_ms: int) -> str | None:
    """Take the lock for ttl_ms; return the owner token, or None if someone holds it."""
    token = secrets.token_hex(16)
    return token if client(url).set(name, token, nx=True, px=ttl_ms) else None


def release_lock(url: str, name: str, token: str) -> bool:
    """Release the lock if (and only if) we still own it."""
    return bool(client(url).eval(RELEASE, 1, name, token))


def get_or_load(url: str, key: str, loader: Callable[[], str], ttl_ms: int, *,
                lock_ttl_ms: int = 10_000,
                sleep: Callable[[float], None] = time.sleep) -> str:
    """Cache-aside where, on a miss, only the lock holder runs loader(); the others wait
    (with sleep()) for the value to appear."""
    r = client(url)
    lock = f"{key}:lock"
    while True:
        value = r.get(key)
        if value is not None:
            return str(value)
        token = acquire_lock(url, lock, lock_ttl_ms)
        if token is not None:
            try:
                value = r.get(key)  # someone may have filled it just before we locked
                if value is None:
                    value = loader()
                    r.set(key, value, px=ttl_ms)
                return str(value)
            finally:
                release_lock(url, lock, token)
        sleep(0.01)


def xfetch(url: str, key: str, loader: Callable[[], str], ttl_s: float, *, beta: float = 1.0,
           now: Callable[[], float] = time.time,
           rand: Callable[[], float] = random.random) -> str:
    """Probabilistic early expiry (Vattani et al., "XFetch"): recompute before the logical
    expiry with a probability that rises as it nears, scaled by how long the last
    computation took (delta): recompute when now - delta * beta * ln(rand()) >= expiry."""
    r = client(url)
    entry = r.hgetall(key)
    if entry:
        delta, expiry = float(entry["delta"]), float(entry["expiry"])
        draw = rand()  # random.random() is in [0, 1): 0.0 can come, and log(0) raises
        gap = delta * beta * (-math.log(draw) if draw > 0.0 else math.inf)  # -ln(0) = +inf
        if now() + gap < expiry:
            return str(entry["value"])
    start = now()
    value = loader()
    delta = now() - start
    r.hset(key, mapping={"value": value, "delta": delta, "expiry": now() + ttl_s})
    r.pexpire(key, int(max(ttl_s, 1) * 1000) + 60_000)  # the real TTL outlives the logical one
    return value
