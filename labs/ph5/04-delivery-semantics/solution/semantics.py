"""A consume-transform-produce worker in three delivery modes.

It reads payment records from one partition of an input topic, turns each into a
"processed:<value>" record on an output topic, and tracks its progress as the consumer group's
committed offset. What a crash does depends only on the order of two steps:

* at-most-once:  commit the offset, then produce. A crash in between loses the record.
* at-least-once: produce (and wait for the broker's ack), then commit. A crash in between
  produces the record again after the restart: a duplicate.
* exactly-once:  produce and commit the offset in ONE Kafka transaction. A crash in between
  leaves an open transaction that the restarted worker aborts; readers using read_committed
  never see its records.

Run as a program:
    python semantics.py at-least-once --bootstrap B --input IN --output OUT --group G
                        [--crash-after N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

MODES = ("at-most-once", "at-least-once", "exactly-once")


# --- given by the lab ------------------------------------------------------------------

def crash_point(processed: int, crash_after: int | None) -> None:
    """The lab's crash hook: at the ``crash_after``-th record, announce it and die at once with
    SIGKILL - no cleanup, no commit, and nothing the client library still holds in memory is
    sent (no flush, no background delivery): like a power cut. The test then looks at what
    the broker holds."""
    if crash_after is not None and processed == crash_after:
        print(f"CRASH-POINT {processed}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def transform(value: bytes) -> bytes:
    return b"processed:" + value


# --- the worker --------------------------------------------------------------------------

def raise_if_refused(err: KafkaError | None, _record: Message) -> None:
    """A delivery report: an output the broker refused is not processed."""
    if err is not None:
        raise KafkaException(err)


def consumer_config(bootstrap: str, group: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,                 # where the committed offsets are kept
        "enable.auto.commit": False,       # the mode decides when to commit, nobody else
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",   # never act on records of aborted transactions
        "enable.partition.eof": True,      # stop at the end of the input
    }


def producer_config(bootstrap: str, mode: str, transactional_id: str) -> dict[str, Any]:
    if mode == "at-most-once":
        # Fire and forget: no acknowledgement, no retry.
        return {"bootstrap.servers": bootstrap, "acks": "0", "retries": 0}
    if mode == "at-least-once":
        # Acknowledged by all in-sync replicas, retried on error (a retry may duplicate;
        # idempotence stops the broker storing the same send twice).
        # A record the broker refuses (too large, say) waits no more: flush() does not count
        # it, only its delivery report says - raised from flush(), before any commit.
        return {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                "on_delivery": raise_if_refused}
    # Transactions imply idempotence and acks=all. The id must be the same for every run of
    # this worker: the next run's init_transactions() fences the old one and aborts whatever
    # transaction it left open.
    return {"bootstrap.servers": bootstrap, "transactional.id": transactional_id}


def run(mode: str, bootstrap: str, input_topic: str, output_topic: str, group: str,
        crash_after: int | None = None, ack_timeout: float = 30.0) -> int:
    """Process partition 0 of ``input_topic`` from the group's committed offset to its end;
    return how many records this run processed. At-least-once: an output the broker has not
    acknowledged within ``ack_timeout`` seconds is not processed - raise, never commit it."""
    consumer = Consumer(consumer_config(bootstrap, group))
    producer = Producer(producer_config(bootstrap, mode, f"{group}.{input_topic}.0"))
    if mode == "exactly-once":
        producer.init_transactions(30)
    # One partition, assigned directly: no group membership to wait for; the start offset
    # is the group's committed offset (or the beginning, the first time).
    consumer.assign([TopicPartition(input_topic, 0)])
    processed = 0
    try:
        while True:
            msg = consumer.poll(1)
            if msg is None:
                continue    # nothing within 1 s: a broker slow to answer, not the end
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break
                raise KafkaException(err)
            processed += 1
            if mode == "at-most-once":
                consumer.commit(message=msg, asynchronous=False)   # 1. commit
                crash_point(processed, crash_after)
                produce(producer, output_topic, msg)                # 2. process
                # acks=0: no ack to wait for, but the record must leave the client (a
                # process killed with it still queued loses it as well)
                producer.flush(30)
            elif mode == "at-least-once":
                produce(producer, output_topic, msg)                # 1. process...
                if producer.flush(ack_timeout):                     # ...acknowledged
                    raise KafkaException(f"output not acknowledged within {ack_timeout:g} s: "
                                         "not committing its input")
                crash_point(processed, crash_after)
                consumer.commit(message=msg, asynchronous=False)   # 2. commit
            else:
                producer.begin_transaction()
                produce(producer, output_topic, msg)
                # The input offset is committed by the transaction, with the output.
                producer.send_offsets_to_transaction(
                    [TopicPartition(input_topic, 0, next_offset(msg))],
                    consumer.consumer_group_metadata(), 30)
                crash_point(processed, crash_after)
                producer.commit_transaction(30)                     # both, or neither
        producer.flush(30)
    finally:
        consumer.close()
    return processed


def produce(producer: Producer, topic: str, msg: Message) -> None:
    producer.produce(topic, key=msg.key(), value=transform(msg.value() or b""))


def next_offset(msg: Message) -> int:
    """The offset to commit after ``msg``: the next one to read."""
    offset = msg.offset()
    assert offset is not None  # set on every fetched record
    return offset + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--crash-after", type=int, default=None)
    parser.add_argument("--ack-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    count = run(args.mode, args.bootstrap, args.input, args.output, args.group,
                args.crash_after, args.ack_timeout)
    print(f"processed {count}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
