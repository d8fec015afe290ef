"""ph7.8 - three rate limiters in Redis: token bucket, sliding-window log, sliding-window
counter. Each decision must be atomic (one Lua script, or MULTI/EXEC with WATCH) and its
state must live in Redis, shared by every instance. ``now`` is the caller's clock, in
seconds: never read the time yourself. See README.md for the exact rules.
"""

from __future__ import annotations

import redis


class TokenBucket:
    """Up to ``capacity`` requests at once, refilled at ``rate`` tokens per second."""

    def __init__(self, redis_url: str, prefix: str, capacity: int, rate: float) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.prefix, self.capacity, self.rate = prefix, capacity, rate

    def allow(self, key: str, now: float) -> bool:
        raise NotImplementedError("TokenBucket.allow: refill, then take one token if any")


class SlidingWindowLog:
    """At most ``limit`` requests in any ``window`` seconds: one sorted-set entry each."""

    def __init__(self, redis_url: str, prefix: str, limit: int, window: float) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.prefix, self.limit, self.window = prefix, limit, window

    def allow(self, key: str, now: float) -> bool:
        raise NotImplementedError("SlidingWindowLog.allow: drop expired entries, count, add")


class SlidingWindowCounter:
    """About ``limit`` per ``window``: the current window's count plus the previous one's,
    weighted by how much of it the sliding window still covers."""

    def __init__(self, redis_url: str, prefix: str, limit: int, window: float) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.prefix, self.limit, self.window = prefix, limit, window

    def allow(self, key: str, now: float) -> bool:
        raise NotImplementedError("SlidingWindowCounter.allow: weighted previous + current")
