"""Kafka: reading a topic back to its end, as the broker has it now."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class KafkaRecord:
    """One record as read back: where it sits, its key and value (bytes, None when absent)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def _partitions(kafka: Any, topic: str, timeout: float) -> list[int]:
    """The topic's partitions once each has a leader (a topic created a moment ago by the
    learner's code may not have them yet)."""
    admin = kafka.admin()
    deadline = time.monotonic() + timeout
    while True:
        meta = admin.list_topics(topic, timeout=5).topics.get(topic)
        if meta and meta.error is None and meta.partitions and all(
                p.leader >= 0 for p in meta.partitions.values()):
            return sorted(meta.partitions)
        if time.monotonic() > deadline:
            pytest.fail(f"topic {topic} has no leader for every partition after "
                        f"{timeout:.0f} s, so it cannot be read back", pytrace=False)
        time.sleep(0.05)


def read_all(kafka: Any, topic: str, *, isolation: str = "read_uncommitted",
             partitions: list[int] | None = None, timeout: float = 15) -> list[KafkaRecord]:
    """Every record of ``topic`` (of ``partitions``, default all) from offset 0 to the end
    each partition has now, as seen at ``isolation`` (``read_committed`` leaves out aborted
    transactions' records). Records come partition by partition in offset order. ``kafka``
    is the test's ``kafka`` fixture (its consumer settings, its group prefix)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    wanted = partitions if partitions is not None else _partitions(kafka, topic, timeout)
    consumer = Consumer(kafka.consumer_config("test-reader", **{
        "enable.auto.commit": False, "enable.partition.eof": True,
        "isolation.level": isolation, "fetch.wait.max.ms": 10}))
    consumer.assign([TopicPartition(topic, p, 0) for p in wanted])
    records: list[KafkaRecord] = []
    at_end: set[int] = set()
    try:
        while len(at_end) < len(wanted):
            msg = consumer.poll(timeout)
            if msg is None:
                pytest.fail(f"reading {topic} back timed out after {timeout:.0f} s",
                            pytrace=False)
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    pytest.fail(f"reading {topic} back failed: {error}", pytrace=False)
                at_end.add(msg.partition() or 0)
                continue
            records.append(KafkaRecord(msg.partition() or 0, msg.offset() or 0, msg.key(),
                                       msg.value()))
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))
