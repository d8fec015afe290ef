"""ph5.3 - two consumer groups in one process: each GroupConsumer is a member of its own
group and commits only what it processed. (pytest test files cannot import each other, so
the few helpers this file needs are its own.)

One service often runs several consumers: a billing member and an audit member reading the
same topic, each in its group, each at its own pace. Whatever a GroupConsumer remembers of
its progress (the processed offsets it commits) is its own: kept in a class attribute or a
module-level dict, it is every instance's, and one group's commit stores another group's
progress - the slower group skips records it never processed."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition


def committed_offset(kafka: Any, topic: str, group: str) -> int:
    """The group's committed offset of partition 0, as the broker holds it (-1001: none)."""
    reader = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group,
                       "log_level": 0})
    try:
        (tp,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
        return int(tp.offset)
    finally:
        reader.close()


def read(member: Any, who: str, count: int) -> list[tuple[int, int, str]]:
    """Exactly ``count`` records from ``member`` (poll_records asked for what is missing)."""
    got: list[tuple[int, int, str]] = []
    deadline = time.monotonic() + 20
    while len(got) < count:
        assert time.monotonic() < deadline, (
            f"timed out after 20 s waiting for the {who} member to read {count} records "
            f"(it read {len(got)})")
        got += member.poll_records(count - len(got), 0.2)
    assert len(got) == count, (
        f"poll_records({count}, ...) returned {len(got)} records: at most max_records")
    return got


def test_two_groups_keep_their_own_offsets(learner: Any, kafka: Any) -> None:
    """An audit member reads 3 records, a billing member (another group, same process, same
    topic) reads all 10; each commits: the broker must hold 3 for audit and 10 for billing."""
    group_consumer = learner.function("internals", "GroupConsumer")
    topic = kafka.create_topic("shared", 1)
    producer = Producer(kafka.producer_config(acks="all"))
    for n in range(10):
        producer.produce(topic, value=f"order-{n}".encode(), partition=0)
    assert producer.flush(15) == 0, "the test's own records were not acknowledged"

    audit = group_consumer(kafka.consumer_config("audit"), topic)
    billing = None
    try:
        audit_read = read(audit, "audit", 3)
        billing = group_consumer(kafka.consumer_config("billing"), topic)
        read(billing, "billing", 10)
        audit.commit()
        billing.commit()
        stored = {who: committed_offset(kafka, topic, kafka.group(who))
                  for who in ("audit", "billing")}
    finally:
        audit.close()
        if billing is not None:
            billing.close()
    want = {"audit": max(o for _, o, _ in audit_read) + 1, "billing": 10}
    if stored != want:
        pytest.fail(
            f"two GroupConsumers in one process, each in its own group on one topic: the "
            f"audit member processed 3 records and the billing member 10, and after each "
            f"commit() the broker holds {stored} (-1001 = none); expected {want}. One "
            "instance committed the other's progress: the processed offsets are shared "
            "between instances (a class attribute or a module-level dict, keyed by partition "
            "only) - so a slower group skips records it never processed. Keep them on the "
            "instance (self._processed = {} in __init__)", pytrace=False)
