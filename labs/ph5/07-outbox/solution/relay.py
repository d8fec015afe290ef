"""The outbox relay: a separate process that publishes outbox rows to Kafka.

    python relay.py --dsn DSN --bootstrap B --topic T [--batch-size 100] [--timeout 10] [--once]

Each batch is one database transaction:

    1. claim up to N unpublished rows:  SELECT ... FOR UPDATE SKIP LOCKED
       (rows another relay holds are skipped, not waited for: relays share the work)
    2. publish them and wait until the broker acknowledged every one
    3. mark them published, commit

A crash or a broker failure before 3 rolls the transaction back: the rows stay unpublished and
the next run publishes them again. Nothing is lost; a row may be published twice, which is why
every event carries its outbox id as event_id, for consumers to deduplicate.

Without --once the relay runs until it is stopped. SIGTERM (what systemd, Docker and Kubernetes
send) or Ctrl-C asks it to stop: it finishes the batch in hand - publish, mark, commit - and
exits 0. Dying in the middle of a batch loses nothing either, but every row of that batch is
published a second time by the next relay.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Message, Producer

CLAIM = """
SELECT id, aggregate_id, event_type, payload
  FROM outbox
 WHERE published_at IS NULL
 ORDER BY id
 LIMIT %s
   FOR UPDATE SKIP LOCKED
"""


class PublishFailed(Exception):
    pass


def publish_batch(producer: Producer, topic: str, rows: list[tuple[Any, ...]],
                  timeout: float) -> None:
    """Publish the rows; return only when the broker acknowledged all of them."""
    failures: list[str] = []

    def report(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(f"{msg.key()!r}: {err.str()}")

    for outbox_id, aggregate_id, event_type, payload in rows:
        event = {"event_id": outbox_id, "type": event_type, **payload}
        producer.produce(topic, key=str(aggregate_id).encode(), value=json.dumps(event).encode(),
                         on_delivery=report)
    unacknowledged = producer.flush(timeout)
    if unacknowledged or failures:
        raise PublishFailed(f"{unacknowledged} unacknowledged, failures: {failures[:3]}")


def relay_once(conn: psycopg.Connection[Any], producer: Producer, topic: str, batch_size: int,
               timeout: float) -> int:
    """Claim, publish and mark one batch; return its size (0: nothing pending)."""
    with conn.transaction():
        rows = conn.execute(CLAIM, (batch_size,)).fetchall()
        if not rows:
            return 0
        publish_batch(producer, topic, rows, timeout)   # raises: the transaction rolls back
        conn.execute("UPDATE outbox SET published_at = now() WHERE id = ANY(%s)",
                     ([r[0] for r in rows],))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="outbox relay")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the broker to acknowledge a batch")
    parser.add_argument("--once", action="store_true",
                        help="stop when nothing is pending instead of polling forever")
    args = parser.parse_args(argv)

    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        # give up on a message (and report it) within our timeout, not librdkafka's 5 min
        "message.timeout.ms": int(args.timeout * 1000),
    })
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()   # only a flag: the batch in hand still gets marked and committed

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        while not stopping.is_set():
            try:
                published = relay_once(conn, producer, args.topic, args.batch_size,
                                       args.timeout)
            except PublishFailed as exc:
                print(f"relay: publishing failed, batch left unpublished: {exc}",
                      file=sys.stderr)
                return 1
            if published == 0:
                if args.once:
                    return 0
                stopping.wait(0.2)  # idle: poll the outbox again shortly
    return 0


if __name__ == "__main__":
    sys.exit(main())
