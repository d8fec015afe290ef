"""Five Redis data structures, each used for the job it is built for.

Every operation below touches one key and costs O(1) or O(log N) in the size of that key
(plus the size of what it returns); none of them walks the keyspace (KEYS, SCAN) or reads
a whole structure to answer a question Redis can answer directly (ZCARD, SCARD, ZREVRANK).
"""

from __future__ import annotations

import redis


def _connect(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


class Leaderboard:
    """A sorted set: member = player, score = points. Ordered by score at all times."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.r = _connect(redis_url)
        self.key = name

    def add_points(self, player: str, points: float) -> float:
        # ZINCRBY: O(log N), atomic - two servers adding points never lose an update
        return float(self.r.zincrby(self.key, points, player))

    def top(self, n: int) -> list[tuple[str, float]]:
        if n <= 0:  # ZREVRANGE 0 -1 would be the whole set: a negative index counts from the end
            return []
        # ZREVRANGE 0 n-1: O(log N + n) - only the n entries asked for leave the server
        return [(p, float(s)) for p, s in self.r.zrevrange(self.key, 0, n - 1, withscores=True)]

    def rank(self, player: str) -> int | None:
        """1 for the best player; None for a player with no score."""
        position = self.r.zrevrank(self.key, player)  # O(log N)
        return None if position is None else int(position) + 1

    def score(self, player: str) -> float | None:
        value = self.r.zscore(self.key, player)  # O(1)
        return None if value is None else float(value)


class ReliableQueue:
    """A list as a FIFO queue, and a second list holding the jobs being worked on.

    LMOVE takes a job from the queue and puts it in the processing list in one atomic
    step: a worker that dies before ack() leaves its job there, where recover() finds it.
    A plain RPOP would have taken the job out of Redis with nothing left to recover."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.r = _connect(redis_url)
        self.queue = name
        self.processing = f"{name}:processing"

    def push(self, job: str) -> None:
        self.r.lpush(self.queue, job)  # newest on the left

    def claim(self) -> str | None:
        # oldest (right end) of the queue -> newest (left end) of the processing list
        job = self.r.lmove(self.queue, self.processing, "RIGHT", "LEFT")
        return None if job is None else str(job)

    def ack(self, job: str) -> None:
        # O(N) in the processing list, which holds only the jobs in flight
        self.r.lrem(self.processing, 1, job)

    def recover(self) -> int:
        """Put every claimed-but-never-acked job back at the head of the queue, oldest
        first in line. Returns how many were recovered."""
        moved = 0
        while self.r.lmove(self.processing, self.queue, "LEFT", "RIGHT") is not None:
            moved += 1
        return moved

    def size(self) -> int:
        return int(self.r.llen(self.queue))  # O(1)


class UniqueVisitors:
    """Per day: a set (exact, O(N) memory) and a HyperLogLog (~0.81% error, 12 KB max)."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.r = _connect(redis_url)
        self.name = name

    def _set(self, day: str) -> str:
        return f"{self.name}:{day}:set"

    def _hll(self, day: str) -> str:
        return f"{self.name}:{day}:hll"

    def visit(self, day: str, visitor: str) -> None:
        pipe = self.r.pipeline(transaction=False)  # one round trip for both structures
        pipe.sadd(self._set(day), visitor)
        pipe.pfadd(self._hll(day), visitor)
        pipe.execute()

    def exact(self, day: str) -> int:
        return int(self.r.scard(self._set(day)))  # O(1): the set knows its size

    def estimate(self, day: str) -> int:
        return int(self.r.pfcount(self._hll(day)))

    def estimate_across(self, days: list[str]) -> int:
        """Distinct visitors over several days: PFCOUNT of several HLLs merges them on the
        fly, without ever holding the visitors themselves. No days: no visitors (PFCOUNT
        needs at least one key)."""
        if not days:
            return 0
        return int(self.r.pfcount(*[self._hll(day) for day in days]))


class Profiles:
    """An object as a hash: each field readable and writable on its own."""

    def __init__(self, redis_url: str) -> None:
        self.r = _connect(redis_url)

    @staticmethod
    def _key(user_id: str) -> str:
        return f"user:{user_id}"

    def save(self, user_id: str, fields: dict[str, str]) -> None:
        if fields:  # HSET needs at least one field: saving none changes nothing
            self.r.hset(self._key(user_id), mapping=fields)

    def get(self, user_id: str) -> dict[str, str]:
        return dict(self.r.hgetall(self._key(user_id)))  # {} for an unknown user

    def set_field(self, user_id: str, field: str, value: str) -> None:
        # one field, not read-modify-write of the whole object
        self.r.hset(self._key(user_id), field, value)

    def increment(self, user_id: str, field: str, by: int = 1) -> int:
        return int(self.r.hincrby(self._key(user_id), field, by))  # atomic on the server


class EventLog:
    """A stream: an append-only log with ids, read by consumer groups that each see every
    event once, split between their consumers, with a pending list until acknowledged."""

    def __init__(self, redis_url: str, stream: str) -> None:
        self.r = _connect(redis_url)
        self.stream = stream

    def append(self, event: dict[str, str]) -> str:
        return str(self.r.xadd(self.stream, event))

    def create_group(self, group: str) -> None:
        """Idempotent: a group that already exists is left as it is."""
        try:
            self.r.xgroup_create(self.stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, group: str, consumer: str, count: int) -> list[tuple[str, dict[str, str]]]:
        # ">" = events never delivered to any consumer of this group
        reply = self.r.xreadgroup(group, consumer, {self.stream: ">"}, count=count)
        if not reply:
            return []
        _, entries = reply[0]
        return [(str(event_id), dict(fields)) for event_id, fields in entries]

    def ack(self, group: str, ids: list[str]) -> int:
        return int(self.r.xack(self.stream, group, *ids)) if ids else 0

    def pending(self, group: str) -> int:
        return int(self.r.xpending(self.stream, group)["pending"])
