"""OrderPlaced events on a Kafka topic, read by independent consumer groups.

Implement the three functions below (see README.md). confluent_kafka's Producer and Consumer
are all you need.
"""

from __future__ import annotations

from typing import Any


def order_placed(order: dict[str, Any]) -> dict[str, Any]:
    """The OrderPlaced event for ``order``: type, a unique event_id, order_id, customer,
    total_cents."""
    raise NotImplementedError("order_placed: build the OrderPlaced event dict")


def publish_orders(bootstrap: str, topic: str, orders: list[dict[str, Any]],
                   timeout: float = 30.0) -> list[tuple[int, int]]:
    """Publish one OrderPlaced event per order, keyed by order id; return each event's
    (partition, offset) once the broker acknowledged it. Raise if an event was refused or
    not every event was acknowledged within ``timeout`` seconds."""
    raise NotImplementedError("publish_orders: produce the events with a Producer and wait "
                              "for the broker's acknowledgements")


def consume(bootstrap: str, topic: str, group: str, max_events: int,
            timeout: float = 10.0) -> list[dict[str, Any]]:
    """Read up to max_events events the consumer group ``group`` has not consumed yet,
    commit its position, return the decoded events."""
    raise NotImplementedError("consume: subscribe a Consumer in group `group` and read")
