"""OrderPlaced events on a Kafka topic, read by independent consumer groups.

The order service publishes and moves on: it never knows who listens. Billing, shipping and
analytics each read the same log through their own consumer group, at their own pace, and a
service added next month can start from the first event ever written.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer


def order_placed(order: dict[str, Any]) -> dict[str, Any]:
    """The event: a fact about the past, with an id of its own so readers can tell a
    redelivery from a new event."""
    return {
        "type": "OrderPlaced",
        "event_id": str(uuid.uuid4()),
        "order_id": order["order_id"],
        "customer": order["customer"],
        "total_cents": order["total_cents"],
    }


_producers: dict[str, Producer] = {}


def producer_for(bootstrap: str) -> Producer:
    """One producer per cluster for the whole process, as the client is meant to be used:
    it is thread-safe and long-lived. A new one per call would open its connections and,
    being idempotent, wait for its producer id (about half a second) every time."""
    if bootstrap not in _producers:
        _producers[bootstrap] = Producer({
            "bootstrap.servers": bootstrap,
            "acks": "all",                 # acknowledged = written to the log, not just sent
            "enable.idempotence": True,    # a retried send is not stored twice
            "linger.ms": 5,
        })
    return _producers[bootstrap]


def publish_orders(bootstrap: str, topic: str, orders: list[dict[str, Any]],
                   timeout: float = 30.0) -> list[tuple[int, int]]:
    """Publish one OrderPlaced event per order, keyed by order id. Return the (partition,
    offset) the broker gave each event, in the order of ``orders``, once every event is
    acknowledged; raise if the broker refused one or did not acknowledge them all within
    ``timeout`` seconds. No consumer is involved: the broker stores the events for whoever
    comes."""
    producer = producer_for(bootstrap)
    placed: list[tuple[int, int] | None] = [None] * len(orders)
    errors: list[str] = []

    def delivered(index: int) -> Any:
        def report(err: KafkaError | None, msg: Message) -> None:
            partition, offset = msg.partition(), msg.offset()
            if err is not None or partition is None or offset is None:
                why = err.str() if err is not None else "no offset reported"
                errors.append(f"order {orders[index]['order_id']}: {why}")
            else:
                placed[index] = (partition, offset)
        return report

    for index, order in enumerate(orders):
        event = order_placed(order)
        producer.produce(topic, key=str(order["order_id"]).encode(),
                         value=json.dumps(event).encode(), on_delivery=delivered(index))
        producer.poll(0)  # serve delivery reports as we go, so the local queue never fills
    remaining = producer.flush(timeout)  # how many are still unacknowledged
    if remaining or errors:
        raise KafkaException(f"{remaining} events unacknowledged; errors: {errors}")
    return [p for p in placed if p is not None]


def consume(bootstrap: str, topic: str, group: str, max_events: int,
            timeout: float = 10.0) -> list[dict[str, Any]]:
    """Read up to ``max_events`` events this consumer group has not consumed yet (waiting
    at most ``timeout`` seconds), commit the group's position and return them.

    A group that never committed starts at the beginning of the log: that is what lets a
    new service replay history."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,   # commit explicitly, after the events are handled
    })
    events: list[dict[str, Any]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(events) < max_events and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err, value = msg.error(), msg.value()
            if err is not None:
                raise KafkaException(err)
            if value is not None:  # a record without a value is not an event
                events.append(json.loads(value))
        if events:
            consumer.commit(asynchronous=False)  # the group's position moves past these
    finally:
        consumer.close()
    return events
