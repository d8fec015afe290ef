"""The order saga, two ways.

Orchestration: one orchestrator drives order -> payment -> inventory -> shipping, calling each
participant in turn. When step k fails it runs the compensations of steps k-1 .. 0, newest
first. Its state lives in Postgres, written after every step, so an orchestrator that crashed
picks up where the last one stopped; the step in flight at the crash is issued again (the
participants are idempotent), the steps recorded as done are not.

Choreography: no one is in charge. Each service reacts to the events it cares about on a Kafka
topic and publishes its own; a failure event makes the services that already acted publish
their compensating events.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import psycopg
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from psycopg.types.json import Jsonb

STEPS = ("create_order", "charge_payment", "reserve_inventory", "schedule_shipping")


class StepFailed(Exception):
    """A participant refused its step (a business failure: card declined, out of stock)."""


class Participant(Protocol):
    def do(self, saga_id: str, order: dict[str, Any]) -> None: ...
    def undo(self, saga_id: str, order: dict[str, Any]) -> None: ...


# --- orchestration -----------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS sagas (
    saga_id     text PRIMARY KEY,
    order_data  jsonb NOT NULL,
    status      text NOT NULL
                CHECK (status IN ('running', 'compensating', 'completed', 'compensated')),
    -- running: index of the next step to do; compensating: index of the next step to undo
    position    int NOT NULL,
    failed_step text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS saga_log (
    id       bigserial PRIMARY KEY,
    saga_id  text NOT NULL REFERENCES sagas,
    step     text NOT NULL,
    action   text NOT NULL,   -- do | undo
    outcome  text NOT NULL,   -- done | failed
    at       timestamptz NOT NULL DEFAULT now()
);
"""


def setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)


def start_saga(dsn: str, saga_id: str, order: dict[str, Any]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO sagas (saga_id, order_data, status, position) "
                      "VALUES (%s, %s, 'running', 0)", (saga_id, Jsonb(order)))


def saga_status(dsn: str, saga_id: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status FROM sagas WHERE saga_id = %s", (saga_id,)).fetchone()
    if row is None:
        raise KeyError(f"no saga {saga_id!r}")
    return str(row[0])


def run_saga(dsn: str, saga_id: str, participants: dict[str, Participant]) -> str:
    """Drive the saga from its stored state to 'completed' or 'compensated' and return that.

    Each participant call is followed by its own committed state change, so a crash (an
    exception that is not StepFailed, or a killed process) leaves the state at the last
    completed call; running this again issues the interrupted call again.

    One orchestrator drives a saga at a time: a second call for it (a retried request,
    another worker) waits here until the first is done. The lock belongs to this
    connection's session, so a crash that closes the connection frees it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (saga_id,))
        while True:
            row = conn.execute("SELECT order_data, status, position FROM sagas "
                               "WHERE saga_id = %s", (saga_id,)).fetchone()
            if row is None:
                raise KeyError(f"no saga {saga_id!r}: start_saga first")
            order, status, position = row
            if status in ("completed", "compensated"):
                return str(status)
            if status == "running":
                if position == len(STEPS):
                    _advance(conn, saga_id, "completed", position)
                    continue
                step = STEPS[position]
                try:
                    participants[step].do(saga_id, order)
                except StepFailed:
                    # The failed step did nothing; undo the ones before it, newest first.
                    _advance(conn, saga_id, "compensating", position - 1, step, "do", "failed",
                             failed_step=step)
                    continue
                _advance(conn, saga_id, "running", position + 1, step, "do", "done")
            else:  # compensating
                if position < 0:
                    _advance(conn, saga_id, "compensated", position)
                    continue
                step = STEPS[position]
                participants[step].undo(saga_id, order)  # must succeed eventually: retry later
                _advance(conn, saga_id, "compensating", position - 1, step, "undo", "done")


def _advance(conn: psycopg.Connection[Any], saga_id: str, status: str, position: int,
             step: str | None = None, action: str | None = None, outcome: str | None = None,
             failed_step: str | None = None) -> None:
    """Record one transition (and its log line) in one transaction."""
    with conn.transaction():
        conn.execute("UPDATE sagas SET status = %s, position = %s, "
                     "failed_step = coalesce(%s, failed_step), updated_at = now() "
                     "WHERE saga_id = %s", (status, position, failed_step, saga_id))
        if step is not None:
            conn.execute("INSERT INTO saga_log (saga_id, step, action, outcome) "
                         "VALUES (%s, %s, %s, %s)", (saga_id, step, action, outcome))


# --- choreography ------------------------------------------------------------------------

CREDIT_LIMIT_CENTS = 100_000
STOCK_PER_SKU = 10
SHIPPING_COUNTRIES = {"DE", "FR", "NL"}


def react(service: str, event: dict[str, Any]) -> list[dict[str, Any]]:
    """What ``service`` publishes when it sees ``event``: the choreography's rules.

    Compensation runs backwards through the services that acted: shipping's rejection makes
    inventory release the stock, the release makes payment refund, the refund makes the order
    service cancel."""
    kind, order = event["type"], event["order"]

    def emit(new_type: str) -> list[dict[str, Any]]:
        return [{"type": new_type, "order_id": event["order_id"], "order": order}]

    if service == "payment":
        if kind == "OrderPlaced":
            ok = order["amount_cents"] <= CREDIT_LIMIT_CENTS
            return emit("PaymentCharged" if ok else "PaymentDeclined")
        if kind in ("InventoryRejected", "InventoryReleased"):
            return emit("PaymentRefunded")
    elif service == "inventory":
        if kind == "PaymentCharged":
            return emit("InventoryReserved" if order["qty"] <= STOCK_PER_SKU
                        else "InventoryRejected")
        if kind == "ShipmentRejected":
            return emit("InventoryReleased")
    elif service == "shipping":
        if kind == "InventoryReserved":
            return emit("ShipmentScheduled" if order["country"] in SHIPPING_COUNTRIES
                        else "ShipmentRejected")
    elif service == "order":
        if kind == "ShipmentScheduled":
            return emit("OrderCompleted")
        if kind in ("PaymentDeclined", "PaymentRefunded"):
            return emit("OrderCancelled")
    return []


class ChoreographyService:
    """One service of the choreography: its own consumer group on the shared event topic
    (one partition), reacting to what it reads and publishing what it decides."""

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
            err, offset, value = msg.error(), msg.offset(), msg.value()
            if err is not None:
                raise KafkaException(err)
            assert offset is not None and value is not None  # every event has both
            event = json.loads(value)
            for reaction in react(self.service, event):
                reaction["source"] = self.service
                self.producer.produce(self.topic, key=str(reaction["order_id"]).encode(),
                                      value=json.dumps(reaction).encode())
            position = offset + 1
            handled += 1
        if handled:
            # Reactions first, then the offset: a crash in between re-handles the events
            # (at-least-once), it never drops a reaction.
            if self.producer.flush(30):
                raise KafkaException(f"{self.service}: reactions not acknowledged")
            self.consumer.commit(offsets=[TopicPartition(self.topic, 0, position)],
                                 asynchronous=False)
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
