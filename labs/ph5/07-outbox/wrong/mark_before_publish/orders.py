"""The write side of the outbox pattern: an order and the event announcing it are written in
ONE database transaction, so there is never an order without its event or an event without
its order. Publishing to Kafka is the relay's job (relay.py), not this code's."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

# Given by the lab (the verification relies on these tables and columns).
SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id    text PRIMARY KEY,
    customer    text NOT NULL,
    total_cents integer NOT NULL CHECK (total_cents > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS outbox (
    id           bigserial PRIMARY KEY,          -- also the event's id: stable on republish
    aggregate_id text NOT NULL,                  -- the order id: the Kafka key
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz                     -- NULL until the relay published it
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id) WHERE published_at IS NULL;
"""


def setup(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(SCHEMA)


def place_order(conn: psycopg.Connection[Any], order: dict[str, Any]) -> int:
    """Insert the order and its OrderPlaced outbox row atomically; return the outbox id.

    ``conn`` may be in autocommit mode or inside the caller's transaction:
    ``conn.transaction()`` opens a transaction, or a savepoint inside the caller's, so either
    both rows are kept or neither is."""
    with conn.transaction():
        conn.execute("INSERT INTO orders (order_id, customer, total_cents) VALUES (%s, %s, %s)",
                     (order["order_id"], order["customer"], order["total_cents"]))
        row = conn.execute(
            "INSERT INTO outbox (aggregate_id, event_type, payload) VALUES (%s, %s, %s) "
            "RETURNING id",
            (order["order_id"], "OrderPlaced", Jsonb({
                "order_id": order["order_id"],
                "customer": order["customer"],
                "total_cents": order["total_cents"],
            }))).fetchone()
    assert row is not None
    return int(row[0])
