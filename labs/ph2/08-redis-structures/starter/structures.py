"""Five Redis data structures, each used for the job it is built for.

Fill in each method with the Redis command(s) that do the job in O(1) or O(log N).
See README.md for what each method returns. No KEYS, no SCAN.
"""

from __future__ import annotations

import redis


def _connect(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


class Leaderboard:
    """A sorted set under the key `name`."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.r = _connect(redis_url)
        self.key = name

    def add_points(self, player: str, points: float) -> float:
        raise NotImplementedError("Leaderboard.add_points: add to the player's score")

    def top(self, n: int) -> list[tuple[str, float]]:
        raise NotImplementedError("Leaderboard.top: the n best (player, score), best first")

    def rank(self, player: str) -> int | None:
        raise NotImplementedError("Leaderboard.rank: 1 for the best player, None if unknown")

    def score(self, player: str) -> float | None:
        raise NotImplementedError("Leaderboard.score")


class ReliableQueue:
    """A list `name` as the queue, and `name:processing` for jobs being worked on."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.r = _connect(redis_url)
        self.queue = name
        self.processing = f"{name}:processing"

    def push(self, job: str) -> None:
        raise NotImplementedError("ReliableQueue.push")

    def claim(self) -> str | None:
        raise NotImplementedError("ReliableQueue.claim: the oldest job, or None if empty")

    def ack(self, job: str) -> None:
        raise NotImplementedError("ReliableQueue.ack: the job is done")

    def recover(self) -> int:
        raise NotImplementedError("ReliableQueue.recover: requeue unacked jobs, return count")

    def size(self) -> int:
        raise NotImplementedError("ReliableQueue.size: jobs waiting in the queue")


class UniqueVisitors:
    """Per day: a set (exact count) and a HyperLogLog (estimate in 12 KB)."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.r = _connect(redis_url)
        self.name = name

    def visit(self, day: str, visitor: str) -> None:
        raise NotImplementedError("UniqueVisitors.visit")

    def exact(self, day: str) -> int:
        raise NotImplementedError("UniqueVisitors.exact")

    def estimate(self, day: str) -> int:
        raise NotImplementedError("UniqueVisitors.estimate")

    def estimate_across(self, days: list[str]) -> int:
        raise NotImplementedError("UniqueVisitors.estimate_across: distinct over all days")


class Profiles:
    """A user object as a hash `user:<id>`."""

    def __init__(self, redis_url: str) -> None:
        self.r = _connect(redis_url)

    def save(self, user_id: str, fields: dict[str, str]) -> None:
        raise NotImplementedError("Profiles.save")

    def get(self, user_id: str) -> dict[str, str]:
        raise NotImplementedError("Profiles.get: all fields, {} for an unknown user")

    def set_field(self, user_id: str, field: str, value: str) -> None:
        raise NotImplementedError("Profiles.set_field")

    def increment(self, user_id: str, field: str, by: int = 1) -> int:
        raise NotImplementedError("Profiles.increment: returns the new value")


class EventLog:
    """A stream under the key `stream`, read through consumer groups."""

    def __init__(self, redis_url: str, stream: str) -> None:
        self.r = _connect(redis_url)
        self.stream = stream

    def append(self, event: dict[str, str]) -> str:
        raise NotImplementedError("EventLog.append: returns the event id")

    def create_group(self, group: str) -> None:
        raise NotImplementedError("EventLog.create_group: idempotent")

    def read(self, group: str, consumer: str, count: int) -> list[tuple[str, dict[str, str]]]:
        raise NotImplementedError("EventLog.read: up to count new events for this consumer")

    def ack(self, group: str, ids: list[str]) -> int:
        raise NotImplementedError("EventLog.ack: returns how many were acknowledged")

    def pending(self, group: str) -> int:
        raise NotImplementedError("EventLog.pending: delivered but not yet acknowledged")
