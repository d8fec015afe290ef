"""The order saga, two ways (see README.md).

Orchestration: run_saga drives create_order -> charge_payment -> reserve_inventory ->
schedule_shipping through the participants it is given, compensates newest-first when a step
raises StepFailed, and keeps its state in Postgres so a new orchestrator can resume.

Choreography: react() holds each service's rules; ChoreographyService runs one service on
the shared Kafka topic.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

STEPS = ("create_order", "charge_payment", "reserve_inventory", "schedule_shipping")


class StepFailed(Exception):
    """A participant refused its step (a business failure: card declined, out of stock)."""


class Participant(Protocol):
    def do(self, saga_id: str, order: dict[str, Any]) -> None: ...
    def undo(self, saga_id: str, order: dict[str, Any]) -> None: ...


# --- orchestration -----------------------------------------------------------------------

def setup(dsn: str) -> None:
    """Create the orchestrator's tables (if they do not exist)."""
    raise NotImplementedError("setup: create the table(s) holding each saga's state")


def start_saga(dsn: str, saga_id: str, order: dict[str, Any]) -> None:
    raise NotImplementedError("start_saga: store a new saga, status 'running'")


def saga_status(dsn: str, saga_id: str) -> str:
    """'running', 'compensating', 'completed' or 'compensated', read from Postgres."""
    raise NotImplementedError("saga_status: read the saga's status from Postgres")


def run_saga(dsn: str, saga_id: str, participants: dict[str, Participant]) -> str:
    """Drive the saga from its stored state to 'completed' or 'compensated'; return it."""
    raise NotImplementedError("run_saga: do the steps in order, compensate on StepFailed, "
                              "store the state after every participant call")


# --- choreography ------------------------------------------------------------------------

CREDIT_LIMIT_CENTS = 100_000
STOCK_PER_SKU = 10
SHIPPING_COUNTRIES = {"DE", "FR", "NL"}


def react(service: str, event: dict[str, Any]) -> list[dict[str, Any]]:
    """The events ``service`` publishes when it sees ``event`` - each a dict with "type",
    "order_id" and "order" (copied from the event)."""
    raise NotImplementedError("react: write each service's rules (README.md)")


class ChoreographyService:
    """One service of the choreography: its own consumer group on the shared event topic
    (one partition), reacting to what it reads and publishing what it decides. The Kafka
    plumbing is given; the reactions in pump() are yours."""

    def __init__(self, bootstrap: str, topic: str, service: str, group: str) -> None:
        self.topic, self.service = topic, service
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                  "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest",
                                  # short fetch long-polls: the watermark query in pump()
                                  # waits behind an outstanding fetch on the connection
                                  "fetch.wait.max.ms": 50})
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                  "enable.idempotence": True})
        self.partition = TopicPartition(topic, 0)
        self.consumer.assign([self.partition])  # resumes at the group's committed offset

    def pump(self) -> int:
        """Handle every event up to the end of the topic as it is now (events this call
        publishes are for the next call); publish the reactions, then commit. Return how
        many events were read."""
        _low, end = self.consumer.get_watermark_offsets(self.partition, timeout=10)
        position = self._position()
        handled = 0
        while position < end:
            msg = self.consumer.poll(10)
            if msg is None:
                raise TimeoutError(f"{self.service}: no event at offset {position} in 10 s")
            if msg.error():
                raise KafkaException(msg.error())
            event = json.loads(msg.value())
            # TODO: publish react(self.service, event), each reaction with "source" set to
            # this service's name, keyed by order id.
            raise NotImplementedError(f"pump: publish what {self.service} does about {event}")
            position = msg.offset() + 1
            handled += 1
        # TODO: when events were handled, make sure the reactions are on the broker, then
        # commit the position to the group.
        return handled

    def _position(self) -> int:
        (tp,) = self.consumer.position([self.partition])
        if tp.offset >= 0:
            return int(tp.offset)
        (tp,) = self.consumer.committed([self.partition], timeout=10)
        if tp.offset >= 0:
            return int(tp.offset)
        low, _high = self.consumer.get_watermark_offsets(self.partition, timeout=10)
        return int(low)

    def close(self) -> None:
        self.producer.flush(10)
        self.consumer.close()
