"""The write side of the outbox pattern (see README.md). SCHEMA and setup() are given."""

from __future__ import annotations

from typing import Any

import psycopg

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
    """Insert the order and its OrderPlaced outbox row (payload: order_id, customer,
    total_cents) atomically; return the outbox row's id. ``conn`` may be in autocommit mode
    or inside the caller's transaction."""
    raise NotImplementedError("place_order: insert into orders and outbox, atomically")
