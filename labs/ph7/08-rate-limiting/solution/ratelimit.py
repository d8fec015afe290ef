"""ph7.8 - three rate limiters in Redis, each decision one atomic Lua script.

Every limiter keeps its state in Redis, so every instance of the app (every process, every
host) shares one budget per key, and runs its read-decide-write as one script: Redis runs a
script to the end before any other command, so 200 concurrent requests cannot both read
"one token left". Time is an argument (``now``, seconds as a float): the caller's clock,
injectable in tests; TTLs only clean up keys nobody uses any more.
"""

from __future__ import annotations

import math
import uuid

import redis

TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then            -- a new bucket starts full
  tokens = capacity
  ts = now
end
if now > ts then                 -- refill for the time elapsed, never above capacity
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', ts))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return allowed
"""

SLIDING_LOG = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
-- the window is (now - window, now]: an entry at exactly now - window has expired
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now - window))
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], string.format('%.17g', now), ARGV[4])  -- unique member
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return 1
end
return 0                          -- a refused request is not logged: it did not happen
"""

SLIDING_COUNTER = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local start = tonumber(ARGV[4])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
-- the previous window still overlaps the sliding window by (window - elapsed) / window
local weight = (window - (now - start)) / window
if previous * weight + current < limit then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return 1
end
return 0
"""


class _Limiter:
    def __init__(self, redis_url: str, prefix: str, script: str) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.prefix = prefix
        self.script = self.redis.register_script(script)  # EVALSHA, EVAL on NOSCRIPT


class TokenBucket(_Limiter):
    """Up to ``capacity`` requests at once, refilled at ``rate`` tokens per second."""

    def __init__(self, redis_url: str, prefix: str, capacity: int, rate: float) -> None:
        super().__init__(redis_url, prefix, TOKEN_BUCKET)
        self.capacity, self.rate = capacity, rate
        self.ttl = math.ceil(capacity / rate) + 60

    def allow(self, key: str, now: float) -> bool:
        args = [self.capacity, repr(float(self.rate)), repr(float(now)), self.ttl]
        return self.script(keys=[f"{self.prefix}:tb:{key}"], args=args) == 1


class SlidingWindowLog(_Limiter):
    """At most ``limit`` requests in any ``window`` seconds: exact, one entry per request."""

    def __init__(self, redis_url: str, prefix: str, limit: int, window: float) -> None:
        super().__init__(redis_url, prefix, SLIDING_LOG)
        self.limit, self.window = limit, window

    def allow(self, key: str, now: float) -> bool:
        args = [repr(float(now)), repr(float(self.window)), self.limit, uuid.uuid4().hex,
                math.ceil(self.window) + 60]
        return self.script(keys=[f"{self.prefix}:swl:{key}"], args=args) == 1


class SlidingWindowCounter(_Limiter):
    """About ``limit`` per ``window``: two counters, the previous one weighted by overlap."""

    def __init__(self, redis_url: str, prefix: str, limit: int, window: float) -> None:
        super().__init__(redis_url, prefix, SLIDING_COUNTER)
        self.limit, self.window = limit, window

    def allow(self, key: str, now: float) -> bool:
        index = math.floor(now / self.window)
        keys = [f"{self.prefix}:swc:{key}:{index}", f"{self.prefix}:swc:{key}:{index - 1}"]
        args = [self.limit, repr(float(self.window)), repr(float(now)),
                repr(float(index * self.window)), math.ceil(2 * self.window) + 60]
        return self.script(keys=keys, args=args) == 1
