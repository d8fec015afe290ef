"""One workload, two brokers: a RabbitMQ work queue (pika) and a Kafka log (confluent_kafka).

Fill in every function and method below; README.md says what each must do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Job:
    """A job as a RabbitMQ worker received it (given: keep it as it is)."""

    body: str
    redelivered: bool   # the broker's redelivered flag
    delivery_tag: int   # what ack/nack name it by, on this worker's channel


# --- RabbitMQ: a work queue ------------------------------------------------------------

def rabbit_enqueue(amqp_url: str, queue: str, jobs: list[str]) -> None:
    """Put the jobs on a durable queue named ``queue``, as persistent messages."""
    raise NotImplementedError("rabbit_enqueue: declare the queue and publish the jobs")


class RabbitWorker:
    """One competing consumer on ``queue``."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        raise NotImplementedError("RabbitWorker: connect, declare the queue, start consuming")

    def next_job(self, timeout: float) -> Job | None:
        """The next job for this worker, or None when none arrived within ``timeout``."""
        raise NotImplementedError("RabbitWorker.next_job")

    def ack(self, job: Job) -> None:
        raise NotImplementedError("RabbitWorker.ack")

    def nack(self, job: Job) -> None:
        """Give the job back to the queue."""
        raise NotImplementedError("RabbitWorker.nack")

    def close(self) -> None:
        raise NotImplementedError("RabbitWorker.close")


# --- Kafka: a log ----------------------------------------------------------------------

def kafka_publish(bootstrap: str, topic: str, jobs: list[str]) -> None:
    raise NotImplementedError("kafka_publish: produce the jobs and wait for the acks")


def kafka_read_new(bootstrap: str, topic: str, group: str) -> list[str]:
    """Everything ``group`` has not read yet, up to the end of the log; commit."""
    raise NotImplementedError("kafka_read_new: read to the end of every partition, commit")


def kafka_replay(bootstrap: str, topic: str, group: str) -> list[str]:
    """``group`` reads the whole log again from offset 0; commit."""
    raise NotImplementedError("kafka_replay: seek the group's partitions to the beginning")
