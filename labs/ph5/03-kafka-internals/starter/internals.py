"""Kafka internals from the client's side: keyed partitioning, a consumer group member with
manual commits, consumer lag. See README.md for what each piece must do."""

from __future__ import annotations

from typing import Any


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java's Utils.murmur2): seed 0x9747b28c, m 0x5bd1e995, r 24; returns a
    signed 32-bit int."""
    raise NotImplementedError("murmur2: port Java's Utils.murmur2 (32-bit arithmetic!)")


def partition_for(key: bytes, num_partitions: int) -> int:
    """The partition Java's default partitioner picks for ``key``."""
    raise NotImplementedError("partition_for: toPositive(murmur2(key)) % num_partitions")


class GroupConsumer:
    """A consumer group member that commits by hand, only what it processed."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        raise NotImplementedError("GroupConsumer: create a Consumer from config and subscribe")

    def poll_records(self, max_records: int, timeout: float) -> list[tuple[int, int, str]]:
        """Up to max_records records (partition, offset, value) within timeout seconds."""
        raise NotImplementedError("GroupConsumer.poll_records")

    def commit(self) -> None:
        """Synchronously commit the positions of the records processed so far."""
        raise NotImplementedError("GroupConsumer.commit")

    def assignment(self) -> set[int]:
        """The partitions this member owns now."""
        raise NotImplementedError("GroupConsumer.assignment")

    def close(self) -> None:
        raise NotImplementedError("GroupConsumer.close")


def consumer_lag(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """Per partition, how many records ``group`` still has to read."""
    raise NotImplementedError("consumer_lag: watermarks minus committed offsets")
