"""Redis beyond get/set: a Lua rate limiter, pub/sub fan-out, AOF persistence."""

from __future__ import annotations

import time

import redis

# INCR and EXPIRE in one script: Redis runs a script to completion before any other
# command, so no client can slip between the two, and no crash can leave a counter
# without its expiry (which would block the caller forever).
# The expiry is set only by the call that created the counter: a fixed window that
# starts at the first request, not one that every request pushes further away.
RATE_LIMIT_LUA = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return count
"""


class RateLimiter:
    """At most `limit` calls per key per `window_seconds` (fixed window)."""

    def __init__(self, redis_url: str, limit: int, window_seconds: int) -> None:
        self.r = redis.Redis.from_url(redis_url)
        self.limit = limit
        self.window = window_seconds
        # register_script sends only the script's SHA1 (EVALSHA) on each call, and loads
        # the body (SCRIPT LOAD) the first time the server answers NOSCRIPT.
        self.script = self.r.register_script(RATE_LIMIT_LUA)

    def allow(self, key: str) -> bool:
        count = int(self.script(keys=[f"rate:{key}"], args=[self.window]))
        return count <= self.limit

    def close(self) -> None:
        self.r.close()


def publish(redis_url: str, channel: str, message: str) -> int:
    """Send `message` to everyone subscribed right now; returns how many received it."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.publish(channel, message))
    finally:
        client.close()


class Subscriber:
    """One subscriber on its own connection (a subscribed connection can do nothing else)."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.pubsub = self.client.pubsub()
        try:
            self.pubsub.subscribe(channel)
            # subscribe() only sends SUBSCRIBE. Wait for the server's confirmation: from
            # then on, every message published to the channel is certain to reach us.
            confirmation = self.pubsub.get_message(timeout=3)
            if confirmation is None or confirmation["type"] != "subscribe":
                raise TimeoutError(
                    f"no confirmation of SUBSCRIBE {channel}: {confirmation!r}")
        except BaseException:
            # Giving up (no confirmation in time, or the connection failed) must give
            # back the connection opened for it: nobody else holds it to close it later.
            self.close()
            raise

    def receive(self, timeout: float) -> str | None:
        """The next message's payload, or None if none arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            message = self.pubsub.get_message(timeout=left)
            if message is not None and message["type"] == "message":
                return str(message["data"])

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


def enable_aof(redis_url: str) -> None:
    """Turn on the append-only file and return once it is active.

    RDB snapshots lose every write since the last snapshot; the AOF logs each write
    (fsync'ed every second by default: at most ~1 s of writes lost on a power cut).
    Switching it on at run time makes Redis write a first AOF from the current data in
    the background; until that rewrite finishes the AOF is not yet complete."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.config_set("appendonly", "yes")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if (info.get("aof_enabled") and not info.get("aof_rewrite_in_progress")
                    and not info.get("aof_rewrite_scheduled")):
                return
            time.sleep(0.05)
        raise TimeoutError("the initial AOF rewrite did not finish within 30 s")
    finally:
        client.close()
