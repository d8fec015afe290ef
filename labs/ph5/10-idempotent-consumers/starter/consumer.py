"""An idempotent consumer of payment events (see README.md).

Run as a program: python consumer.py --dsn DSN --bootstrap B --topic T --group G

SCHEMA, setup() and main() are given; handle() and run() are yours.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import psycopg

# Given by the lab (the verification locks rows of these tables to stop the consumer mid-way).
SCHEMA = """
CREATE TABLE IF NOT EXISTS balances (
    account text PRIMARY KEY,
    cents   bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS processed_events (
    event_id     text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
"""



def setup(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(SCHEMA)


def handle(conn: psycopg.Connection[Any], event: dict[str, Any]) -> bool:
    """Apply a payment event ({"event_id", "account", "amount_cents"}) exactly once: add
    amount_cents to the account's balance. Return True if this call applied it, False if it
    had been processed already. ``conn`` is an autocommit connection."""
    raise NotImplementedError("handle: record the event id and apply the payment, once")


def run(dsn: str, bootstrap: str, topic: str, group: str) -> int:
    """Handle partition 0 of ``topic`` from the group's committed offset to its end (stop at
    end-of-partition); return how many events were applied."""
    raise NotImplementedError("run: consume the topic, handle() each event, commit offsets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="idempotent payment consumer")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    args = parser.parse_args(argv)
    print(f"applied {run(args.dsn, args.bootstrap, args.topic, args.group)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
