"""CQRS (see README.md): commands on the normalized tables append domain events; a projector
builds the read model from them; queries read only the read model. SCHEMA and setup() are
given."""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[Any]

# Given by the lab: the write side (normalized), the event log, the read model.
SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    customer_id text PRIMARY KEY,
    name        text NOT NULL
);
CREATE TABLE IF NOT EXISTS products (
    sku         text PRIMARY KEY,
    name        text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents > 0)
);
CREATE TABLE IF NOT EXISTS orders (
    order_id    text PRIMARY KEY,
    customer_id text NOT NULL REFERENCES customers,
    status      text NOT NULL DEFAULT 'placed' CHECK (status IN ('placed', 'cancelled'))
);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id    text NOT NULL REFERENCES orders,
    sku         text NOT NULL REFERENCES products,
    qty         integer NOT NULL CHECK (qty > 0),
    price_cents integer NOT NULL,            -- the price when ordered
    PRIMARY KEY (order_id, sku)
);
-- Every command appends what happened; seq gives the order the projector applies them in.
CREATE TABLE IF NOT EXISTS events (
    seq         bigserial PRIMARY KEY,
    type        text NOT NULL,
    data        jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
-- The read model: shaped for the queries, one row per answer, no joins needed.
CREATE TABLE IF NOT EXISTS order_summaries (
    order_id      text PRIMARY KEY,
    customer_id   text NOT NULL,
    customer_name text NOT NULL,
    item_count    integer NOT NULL,
    total_cents   integer NOT NULL,
    status        text NOT NULL
);
CREATE TABLE IF NOT EXISTS customer_stats (
    customer_id text PRIMARY KEY,
    name        text NOT NULL,
    open_orders integer NOT NULL,
    spent_cents integer NOT NULL
);
CREATE TABLE IF NOT EXISTS projector_checkpoint (
    projector text PRIMARY KEY,
    last_seq  bigint NOT NULL
);
"""

PROJECTOR = "read-model"


def setup(conn: Conn) -> None:
    with conn.transaction():
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO projector_checkpoint VALUES (%s, 0) ON CONFLICT DO NOTHING",
                     (PROJECTOR,))


# --- commands (the write side) -----------------------------------------------------------
# Each command is one transaction: it changes the normalized tables and appends its event.

def register_customer(conn: Conn, customer_id: str, name: str) -> None:
    raise NotImplementedError("register_customer: insert the customer, append "
                              "CustomerRegistered")


def add_product(conn: Conn, sku: str, name: str, price_cents: int) -> None:
    raise NotImplementedError("add_product: insert the product, append ProductAdded")


def place_order(conn: Conn, order_id: str, customer_id: str,
                lines: list[tuple[str, int]]) -> None:
    raise NotImplementedError("place_order: insert the order and its lines, append OrderPlaced")


def cancel_order(conn: Conn, order_id: str) -> None:
    raise NotImplementedError("cancel_order: mark the order cancelled, append OrderCancelled")


def rename_customer(conn: Conn, customer_id: str, name: str) -> None:
    raise NotImplementedError("rename_customer: update the customer, append CustomerRenamed")


# --- the projector -----------------------------------------------------------------------

def project(conn: Conn, max_events: int | None = None) -> int:
    """Apply the events after the checkpoint (at most max_events) to the read model; return
    how many were applied."""
    raise NotImplementedError("project: apply events after the checkpoint to the read model")


def rebuild(conn: Conn) -> int:
    """Throw the read model away and replay every event; return how many."""
    raise NotImplementedError("rebuild: empty the read model, reset the checkpoint, replay")


# --- queries (the read side) -------------------------------------------------------------

def order_summary(conn: Conn, order_id: str) -> dict[str, Any] | None:
    """{order_id, customer_name, item_count, total_cents, status} or None."""
    raise NotImplementedError("order_summary: answer from the read model")


def customer_summary(conn: Conn, customer_id: str) -> dict[str, Any] | None:
    """{customer_id, name, open_orders, spent_cents} or None."""
    raise NotImplementedError("customer_summary: answer from the read model")
