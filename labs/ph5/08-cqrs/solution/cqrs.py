"""CQRS: commands change normalized tables and record what happened as domain events; a
projector turns those events into a denormalized read model; queries read only that model.

The read model lags behind the write side until the projector runs (eventual consistency),
and it can always be thrown away and rebuilt from the events.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

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
APPEND_LOCK = 5_800_001  # any constant: the advisory lock that serializes appends


def setup(conn: Conn) -> None:
    with conn.transaction():
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO projector_checkpoint VALUES (%s, 0) ON CONFLICT DO NOTHING",
                     (PROJECTOR,))


# --- commands (the write side) -----------------------------------------------------------

def _append(conn: Conn, event_type: str, data: dict[str, Any]) -> None:
    """Append an event inside the command's transaction.

    The advisory lock makes appends take turns until commit, so events commit in seq
    order. Without it, a transaction holding seq 41 could commit after one holding seq 42;
    a projector that had already moved its checkpoint past 42 would never see 41."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK,))
    conn.execute("INSERT INTO events (type, data) VALUES (%s, %s)", (event_type, Jsonb(data)))


def register_customer(conn: Conn, customer_id: str, name: str) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO customers VALUES (%s, %s)", (customer_id, name))
        _append(conn, "CustomerRegistered", {"customer_id": customer_id, "name": name})


def add_product(conn: Conn, sku: str, name: str, price_cents: int) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO products VALUES (%s, %s, %s)", (sku, name, price_cents))
        _append(conn, "ProductAdded", {"sku": sku, "name": name, "price_cents": price_cents})


def place_order(conn: Conn, order_id: str, customer_id: str,
                lines: list[tuple[str, int]]) -> None:
    with conn.transaction():
        # Refused as a rule of the write model, like an unknown product (the foreign key is
        # a last line of defence, not the command's answer).
        if conn.execute("SELECT 1 FROM customers WHERE customer_id = %s",
                        (customer_id,)).fetchone() is None:
            raise ValueError(f"unknown customer {customer_id!r}")
        conn.execute("INSERT INTO orders (order_id, customer_id) VALUES (%s, %s)",
                     (order_id, customer_id))
        priced = []
        for sku, qty in lines:
            row = conn.execute("SELECT price_cents FROM products WHERE sku = %s",
                               (sku,)).fetchone()
            if row is None:
                raise ValueError(f"unknown product {sku!r}")
            conn.execute("INSERT INTO order_lines VALUES (%s, %s, %s, %s)",
                         (order_id, sku, qty, row[0]))
            priced.append({"sku": sku, "qty": qty, "price_cents": row[0]})
        _append(conn, "OrderPlaced", {
            "order_id": order_id, "customer_id": customer_id, "lines": priced,
            "total_cents": sum(line["qty"] * line["price_cents"] for line in priced)})


def cancel_order(conn: Conn, order_id: str) -> None:
    with conn.transaction():
        updated = conn.execute("UPDATE orders SET status = 'cancelled' "
                               "WHERE order_id = %s AND status = 'placed'", (order_id,))
        if updated.rowcount != 1:
            raise ValueError(f"order {order_id!r} is not an open order")
        _append(conn, "OrderCancelled", {"order_id": order_id})


def rename_customer(conn: Conn, customer_id: str, name: str) -> None:
    with conn.transaction():
        updated = conn.execute("UPDATE customers SET name = %s WHERE customer_id = %s",
                               (name, customer_id))
        if updated.rowcount != 1:
            raise ValueError(f"no customer {customer_id!r}")
        _append(conn, "CustomerRenamed", {"customer_id": customer_id, "name": name})


# --- the projector -----------------------------------------------------------------------

def project(conn: Conn, max_events: int | None = None) -> int:
    """Apply the events after the checkpoint to the read model; return how many. Each event
    and the checkpoint move together in one transaction, so a failure part-way leaves the
    model and the checkpoint agreeing, and the next run continues exactly there."""
    applied = 0
    while max_events is None or applied < max_events:
        with conn.transaction():
            last = conn.execute("SELECT last_seq FROM projector_checkpoint WHERE projector = %s "
                                "FOR UPDATE", (PROJECTOR,)).fetchone()
            assert last is not None, "setup() creates the checkpoint row"
            row = conn.execute("SELECT seq, type, data FROM events WHERE seq > %s "
                               "ORDER BY seq LIMIT 1", (last[0],)).fetchone()
            if row is None:
                return applied
            seq, event_type, data = row
            _apply(conn, event_type, data)
            conn.execute("UPDATE projector_checkpoint SET last_seq = %s WHERE projector = %s",
                         (seq, PROJECTOR))
        applied += 1
    return applied


def _apply(conn: Conn, event_type: str, data: dict[str, Any]) -> None:
    if event_type == "CustomerRegistered":
        conn.execute("INSERT INTO customer_stats VALUES (%s, %s, 0, 0)",
                     (data["customer_id"], data["name"]))
    elif event_type == "OrderPlaced":
        name = conn.execute("SELECT name FROM customer_stats WHERE customer_id = %s",
                            (data["customer_id"],)).fetchone()
        assert name is not None, f"OrderPlaced for unknown customer {data['customer_id']}"
        conn.execute("INSERT INTO order_summaries VALUES (%s, %s, %s, %s, %s, 'placed')",
                     (data["order_id"], data["customer_id"], name[0],
                      sum(line["qty"] for line in data["lines"]), data["total_cents"]))
        conn.execute("UPDATE customer_stats SET open_orders = open_orders + 1, "
                     "spent_cents = spent_cents + %s WHERE customer_id = %s",
                     (data["total_cents"], data["customer_id"]))
    elif event_type == "OrderCancelled":
        conn.execute("""
            WITH cancelled AS (
                UPDATE order_summaries SET status = 'cancelled' WHERE order_id = %s
                RETURNING customer_id, total_cents)
            UPDATE customer_stats s SET open_orders = open_orders - 1,
                   spent_cents = spent_cents - c.total_cents
              FROM cancelled c WHERE s.customer_id = c.customer_id""", (data["order_id"],))
    elif event_type == "CustomerRenamed":
        # The name is copied into every summary (denormalized): every copy must follow.
        conn.execute("UPDATE customer_stats SET name = %s WHERE customer_id = %s",
                     (data["name"], data["customer_id"]))
        conn.execute("UPDATE order_summaries SET customer_name = %s WHERE customer_id = %s",
                     (data["name"], data["customer_id"]))
    # ProductAdded: nothing in this read model needs it.


def rebuild(conn: Conn) -> int:
    """Throw the read model away and replay every event from the first."""
    with conn.transaction():
        conn.execute("TRUNCATE order_summaries, customer_stats")
        conn.execute("UPDATE projector_checkpoint SET last_seq = 0 WHERE projector = %s",
                     (PROJECTOR,))
    return project(conn)


# --- queries (the read side) -------------------------------------------------------------

def order_summary(conn: Conn, order_id: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT order_id, customer_name, item_count, total_cents, status "
                           "FROM order_summaries WHERE order_id = %s", (order_id,)).fetchone()


def customer_summary(conn: Conn, customer_id: str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT customer_id, name, open_orders, spent_cents "
                           "FROM customer_stats WHERE customer_id = %s",
                           (customer_id,)).fetchone()
