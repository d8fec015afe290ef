"""One workload, two brokers.

RabbitMQ is a work queue: a job goes to exactly one of the competing workers, and once that
worker acknowledges it the job is gone. Kafka is a log: reading does not remove anything, each
consumer group keeps its own position, and any group can go back to offset 0 and read again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pika
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)


@dataclass
class Job:
    """A job as a RabbitMQ worker received it."""

    body: str
    redelivered: bool   # True: the broker delivered it before and it came back (nack, crash)
    delivery_tag: int   # what ack/nack name it by, on this worker's channel


# --- RabbitMQ: a work queue ------------------------------------------------------------

def rabbit_enqueue(amqp_url: str, queue: str, jobs: list[str]) -> None:
    """Put the jobs on a durable queue as persistent messages, with publisher confirms so
    every job is on the broker when this returns."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue=queue, durable=True)
        channel.confirm_delivery()
        for body in jobs:
            # The default exchange routes by queue name; delivery_mode 2 = persistent.
            channel.basic_publish(exchange="", routing_key=queue, body=body.encode(),
                                  properties=pika.BasicProperties(delivery_mode=2),
                                  mandatory=True)
    finally:
        connection.close()


class RabbitWorker:
    """One competing consumer: takes one job at a time and acknowledges it by hand."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.channel = self.connection.channel()
        self.channel.queue_declare(queue=queue, durable=True)
        # prefetch 1: the broker sends this worker its next job only after it acked the last,
        # so a busy worker does not sit on jobs an idle worker could be doing.
        self.channel.basic_qos(prefetch_count=1)
        # auto_ack=False: a delivered job stays on the broker, unacknowledged, until ack().
        self.channel.basic_consume(queue, on_message_callback=self._arrived, auto_ack=False)
        self._arrivals: deque[Job] = deque()

    def _arrived(self, _channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        # A body is bytes, possibly empty, possibly not UTF-8, and a job all the same: bad
        # sequences become U+FFFD, as Kafka's StringDeserializer does. Raising here would
        # make it a poison message, requeued to kill every worker it is lent to.
        text = body.decode(errors="replace")
        self._arrivals.append(Job(text, bool(method.redelivered), method.delivery_tag))

    def next_job(self, timeout: float) -> Job | None:
        """The next job for this worker, or None when none arrived within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._arrivals:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.connection.process_data_events(time_limit=left)  # runs _arrived
        return self._arrivals.popleft()

    def ack(self, job: Job) -> None:
        """Done: the broker deletes the job."""
        self.channel.basic_ack(delivery_tag=job.delivery_tag)

    def nack(self, job: Job) -> None:
        """Could not do it: give it back to the queue for another try (possibly elsewhere)."""
        self.channel.basic_nack(delivery_tag=job.delivery_tag, requeue=True)

    def close(self) -> None:
        """Leave. Jobs this worker received but never acknowledged go back to the queue."""
        if self.connection.is_open:
            self.connection.close()


# --- Kafka: a log ----------------------------------------------------------------------

def kafka_publish(bootstrap: str, topic: str, jobs: list[str]) -> None:
    """Append the jobs to the log; raise unless the broker acknowledged every one.

    acks=all: the broker answers each batch once it is stored; its answer reaches the
    delivery report (on_delivery), one per record, while flush() runs. flush() only says
    how many records are still waiting - a record the broker REFUSED (too large for the
    topic, not authorized...) is no longer waiting, so flush() returns 0 for it too.
    A record stays in librdkafka's local queue (100,000 at most) until its report is served,
    and only poll() and flush() serve reports: poll as you produce."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    refused: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            refused.append(f"{(msg.value() or b'')[:20]!r}...: {err.str()}")

    for body in jobs:
        while True:
            try:
                producer.produce(topic, value=body.encode(), on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: serve reports so it drains
                producer.poll(1)
        producer.poll(0)  # serve the reports that came in, as produce() never does
    if producer.flush(30):
        raise KafkaException("jobs not acknowledged by the broker within 30 s")
    if refused:  # read after flush(): the reports run inside it
        raise KafkaException(f"the broker refused {len(refused)} job(s): {refused[:3]}")


def _read_to_end(bootstrap: str, topic: str, group: str, from_start: bool) -> list[str]:
    """Join ``group``, read every assigned partition up to its current end, commit.

    ``from_start`` moves each assigned partition to offset 0 first, whatever the group
    committed: the log still holds everything, so the group simply reads it again."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",   # a new group starts at the beginning of the log
        "enable.auto.commit": False,
        "enable.partition.eof": True,      # tell us when a partition has nothing more
    })
    assigned: set[int] = set()

    def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
        if from_start:
            for tp in partitions:
                tp.offset = OFFSET_BEGINNING
        c.assign(partitions)
        assigned.update(tp.partition for tp in partitions)

    bodies: list[str] = []
    at_end: set[int] = set()
    try:
        consumer.subscribe([topic], on_assign=on_assign)
        while not assigned or at_end < assigned:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                    continue
                raise KafkaException(err)
            # None (a tombstone) and b"" are the empty job; not UTF-8: U+FFFD (see _arrived)
            bodies.append((msg.value() or b"").decode(errors="replace"))
        if bodies:  # the group's position moves past what it read (nothing read: no commit)
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return bodies


def kafka_read_new(bootstrap: str, topic: str, group: str) -> list[str]:
    """Everything ``group`` has not read yet, up to the end of the log; the group's
    position is committed. Reading removes nothing from the topic."""
    return _read_to_end(bootstrap, topic, group, from_start=False)


def kafka_replay(bootstrap: str, topic: str, group: str) -> list[str]:
    """``group`` reads the whole log again from offset 0 (a seek, not a new group)."""
    return _read_to_end(bootstrap, topic, group, from_start=True)
