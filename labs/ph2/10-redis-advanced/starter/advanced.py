"""Redis beyond get/set: a Lua rate limiter, pub/sub fan-out, AOF persistence.

See README.md for what each piece must do.
"""

from __future__ import annotations

import time  # noqa: F401 - you may need it

import redis

# INCR the counter; on the first call of a window also EXPIRE it; return the count.
RATE_LIMIT_LUA = """
return 0
"""


class RateLimiter:
    """At most `limit` calls per key per `window_seconds`, decided by a Lua script."""

    def __init__(self, redis_url: str, limit: int, window_seconds: int) -> None:
        self.r = redis.Redis.from_url(redis_url)
        self.limit = limit
        self.window = window_seconds

    def allow(self, key: str) -> bool:
        raise NotImplementedError("RateLimiter.allow: run the script with EVALSHA")


def publish(redis_url: str, channel: str, message: str) -> int:
    raise NotImplementedError("publish: PUBLISH, return the number of receivers")


class Subscriber:
    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url = redis_url
        self.channel = channel

    def receive(self, timeout: float) -> str | None:
        raise NotImplementedError("Subscriber.receive: the next message, or None")

    def close(self) -> None:
        pass


def enable_aof(redis_url: str) -> None:
    raise NotImplementedError("enable_aof: turn on the append-only file")
