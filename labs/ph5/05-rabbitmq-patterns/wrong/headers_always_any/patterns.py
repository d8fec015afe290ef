"""RabbitMQ routing patterns, dead-lettering and TTL.

A producer never publishes to a queue: it publishes to an *exchange* with a routing key (and
headers), and the exchange's type and bindings decide which queues get a copy:

* direct  - the queues bound with exactly that routing key;
* topic   - the queues whose binding pattern matches the dot-separated key:
            ``*`` is exactly one word, ``#`` is zero or more words;
* fanout  - every bound queue, routing key ignored;
* headers - the queues whose binding arguments match the message headers
            (``x-match: all`` - every one of them, ``any`` - at least one).

A queue with ``x-dead-letter-exchange`` republishes to that exchange each message that is
rejected without requeue, or that expires (per-queue ``x-message-ttl`` or per-message
``expiration``), with an ``x-death`` header saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

# Topic patterns over routing keys "<service>[.<region>...].<severity>".
EVERY_ERROR = "#.error"     # any number of words, then "error" ("*.error" needs exactly one)
ALL_BILLING = "billing.#"   # "billing" and everything under it ("billing.*": one level only)


def setup_direct(ch: BlockingChannel, exchange: str, bindings: dict[str, list[str]]) -> None:
    """A direct exchange; each queue bound once per routing key it wants."""
    ch.exchange_declare(exchange, exchange_type="direct")
    for queue, keys in bindings.items():
        ch.queue_declare(queue)
        for key in keys:
            ch.queue_bind(queue, exchange, routing_key=key)


def setup_topic(ch: BlockingChannel, exchange: str, bindings: dict[str, list[str]]) -> None:
    """A topic exchange; each queue bound once per pattern."""
    ch.exchange_declare(exchange, exchange_type="topic")
    for queue, patterns in bindings.items():
        ch.queue_declare(queue)
        for pattern in patterns:
            ch.queue_bind(queue, exchange, routing_key=pattern)


def setup_fanout(ch: BlockingChannel, exchange: str, queues: list[str]) -> None:
    """A fanout exchange: every bound queue gets every message."""
    ch.exchange_declare(exchange, exchange_type="fanout")
    for queue in queues:
        ch.queue_declare(queue)
        ch.queue_bind(queue, exchange)


def setup_headers(ch: BlockingChannel, exchange: str,
                  bindings: dict[str, tuple[dict[str, str], bool]]) -> None:
    """A headers exchange; each queue bound with the headers it matches on and whether all
    of them (``True``) or any one (``False``) must match. The routing key plays no part."""
    ch.exchange_declare(exchange, exchange_type="headers")
    for queue, (headers, _match_all) in bindings.items():
        ch.queue_declare(queue)
        ch.queue_bind(queue, exchange,
                      arguments={"x-match": "any", **headers})  # WRONG: ignores match_all


def setup_dead_lettering(ch: BlockingChannel, queue: str, dead_letter_exchange: str,
                         dead_queue: str, queue_ttl_ms: int | None = None) -> None:
    """``queue`` dead-letters into ``dead_queue`` through ``dead_letter_exchange``.

    The DLX is a fanout: a dead-lettered message keeps its original routing key (here the
    work queue's name), which a direct binding on some other key would not match - and an
    unroutable dead letter is silently dropped."""
    ch.exchange_declare(dead_letter_exchange, exchange_type="fanout")
    ch.queue_declare(dead_queue)
    ch.queue_bind(dead_queue, dead_letter_exchange)
    arguments: dict[str, Any] = {"x-dead-letter-exchange": dead_letter_exchange}
    if queue_ttl_ms is not None:
        arguments["x-message-ttl"] = int(queue_ttl_ms)  # an integer, in milliseconds
    ch.queue_declare(queue, arguments=arguments)


def handle_one(ch: BlockingChannel, queue: str, handler: Callable[[bytes], None]) -> bool:
    """Take one message from ``queue`` and run ``handler`` on its body: ack on success,
    reject WITHOUT requeue when it raises, so the message goes to the dead-letter exchange
    instead of coming straight back forever. Return False when the queue was empty."""
    method, _properties, body = ch.basic_get(queue, auto_ack=False)
    if method is None:
        return False
    try:
        handler(body)
    except Exception:  # noqa: BLE001 - any failure of the handler dead-letters the message
        ch.basic_reject(method.delivery_tag, requeue=False)
    else:
        ch.basic_ack(method.delivery_tag)
    return True


def publish_with_ttl(ch: BlockingChannel, exchange: str, routing_key: str, body: bytes,
                     ttl_ms: int) -> None:
    """Publish a message that expires after ``ttl_ms`` milliseconds. AMQP's ``expiration``
    property is a *string* of milliseconds."""
    ch.basic_publish(exchange, routing_key, body,
                     properties=pika.BasicProperties(expiration=str(int(ttl_ms))))
