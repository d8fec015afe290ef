"""Kafka internals from the client's side: where a keyed record goes, how a consumer group
splits partitions, and what a committed offset means.

* The producer picks the partition: for a keyed record, Java clients (and librdkafka's
  ``murmur2_random``) use ``toPositive(murmur2(key)) % partitions``. Same key, same partition,
  so the records of one key stay in order.
* Each partition of a topic is owned by exactly one member of a consumer group; when members
  come and go the group rebalances and partitions move.
* A committed offset is "the next offset to read": the last processed offset + 1. Commit only
  what you processed, and commit it before a partition moves to another member.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24
_MASK32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as a signed 32-bit
    int like Java's. Python ints never overflow, so every multiplication is cut back to 32
    bits by hand - that is what Java's int arithmetic does for free."""
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    body = length - length % 4
    for i in range(0, body, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK32
        k ^= k >> _R
        k = (k * _M) & _MASK32
        h = (h * _M) & _MASK32
        h ^= k
    tail = length % 4  # the last 1-3 bytes, mixed in like Java's switch fall-through
    if tail == 3:
        h ^= data[body + 2] << 16
    if tail >= 2:
        h ^= data[body + 1] << 8
    if tail >= 1:
        h ^= data[body]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, num_partitions: int) -> int:
    """The partition Java's default partitioner picks for a keyed record. ``toPositive``
    clears the sign bit (it is not ``abs``: abs(-2**31) would still be negative in Java)."""
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


class GroupConsumer:
    """A consumer group member that commits by hand, only what it processed.

    ``config`` comes from the caller (bootstrap servers, group id, timeouts); this class adds
    what makes commits manual and rebalances safe."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        self.topic = topic
        self._consumer = Consumer({
            **config,
            "enable.auto.commit": False,  # nothing is committed behind our back
        })
        # partition -> next offset to read (last processed + 1), not yet committed
        self._processed: dict[int, int] = {}
        self._consumer.subscribe([topic], on_revoke=self._on_revoke)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions are about to move to another member: commit what we processed on them
        now, or the new owner starts at the old commit and processes those records again."""
        self._commit({tp.partition for tp in partitions})

    def _commit(self, partitions: set[int]) -> None:
        offsets = [TopicPartition(self.topic, p, self._processed[p])
                   for p in sorted(partitions) if p in self._processed]
        if offsets:
            # WRONG: returns before the broker answers
            self._consumer.commit(offsets=offsets, asynchronous=True)
        for p in partitions:
            # Forget them: committing a stale offset later, after another member moved the
            # partition on, would rewind that member's progress.
            self._processed.pop(p, None)

    def poll_records(self, max_records: int, timeout: float) -> list[tuple[int, int, str]]:
        """Up to ``max_records`` records as (partition, offset, value), waiting at most
        ``timeout`` seconds. Returned records count as processed (not yet committed)."""
        records: list[tuple[int, int, str]] = []
        deadline = time.monotonic() + timeout
        while len(records) < max_records:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            msg = self._consumer.poll(min(left, 0.1))  # rebalance callbacks run in here
            if msg is None:
                continue
            err, partition, offset = msg.error(), msg.partition(), msg.offset()
            if err is not None:
                raise KafkaException(err)
            assert partition is not None and offset is not None  # set on every fetched record
            records.append((partition, offset, (msg.value() or b"").decode()))
            self._processed[partition] = offset + 1
        return records

    def commit(self) -> None:
        """Synchronously commit every processed record's position."""
        self._commit(set(self._processed))

    def assignment(self) -> set[int]:
        return {tp.partition for tp in self._consumer.assignment()}

    def close(self) -> None:
        """Leave the group; the revoke callback commits what was processed."""
        self._consumer.close()


def consumer_lag(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """Per partition: how many records ``group`` still has to read. Lag = the log end (high
    watermark) minus the group's committed offset; a partition the group never committed is
    read from the log start (low watermark: older records may have been deleted)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        committed = consumer.committed(partitions, timeout=10)
        lag: dict[int, int] = {}
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition),
                                                       timeout=10)
            start = tp.offset if tp.offset >= 0 else low  # negative: no committed offset
            lag[tp.partition] = high - max(start, low)
        return lag
    finally:
        consumer.close()
