"""An idempotent consumer of payment events.

Kafka delivers at least once: after a crash or a rebalance the same event comes again, and two
consumers can even handle the same event at the same moment. The consumer makes that harmless
by recording each event id it processed in a dedup table, in the SAME transaction as the
event's effect, and letting the table's primary key decide who processed it first:

    BEGIN
      INSERT INTO processed_events (event_id) ... ON CONFLICT DO NOTHING
      -- inserted nothing: a duplicate -> end here, nothing applied
      UPDATE balances ...
    COMMIT

Both rows commit together or not at all, so a crash anywhere leaves either "processed and
applied" or "neither" - never one without the other.

Run as a program: python consumer.py --dsn DSN --bootstrap B --topic T --group G
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

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
    """Apply a payment event ({"event_id", "account", "amount_cents"}) exactly once.
    Return True if this call applied it, False if it had been processed already.

    A concurrent duplicate blocks on the INSERT until the first transaction ends, then sees
    the committed row and inserts nothing - no check-then-act race."""
    with conn.transaction():
        claimed = conn.execute("INSERT INTO processed_events (event_id) VALUES (%s) "
                               "ON CONFLICT (event_id) DO NOTHING", (event["event_id"],))
        if claimed.rowcount == 0:
            return False
        conn.execute("INSERT INTO balances (account, cents) VALUES (%s, %s) "
                     "ON CONFLICT (account) DO UPDATE SET cents = balances.cents + EXCLUDED.cents",
                     (event["account"], event["amount_cents"]))
    return True


def run(dsn: str, bootstrap: str, topic: str, group: str) -> int:
    """Handle partition 0 of ``topic`` from the group's committed offset to its end; return
    how many events were applied. The offset is committed after the database transaction:
    a crash in between redelivers the event, and handle() skips it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, 0)])
    applied = 0
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                msg = consumer.poll(10)
                if msg is None:
                    raise TimeoutError("no event or end-of-partition within 10 s")
                err, value = msg.error(), msg.value()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        return applied
                    raise KafkaException(err)
                if value is not None and handle(conn, json.loads(value)):
                    applied += 1
                consumer.commit(message=msg, asynchronous=False)
    finally:
        consumer.close()


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
