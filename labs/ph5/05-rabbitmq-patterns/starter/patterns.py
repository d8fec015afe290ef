"""RabbitMQ routing patterns, dead-lettering and TTL (pika). See README.md."""

from __future__ import annotations

from collections.abc import Callable

from pika.adapters.blocking_connection import BlockingChannel

# Topic patterns over routing keys "<service>[.<region>...].<severity>".
EVERY_ERROR = "TODO"   # every key whose last word is "error", at any depth
ALL_BILLING = "TODO"   # "billing" and every key under it


def setup_direct(ch: BlockingChannel, exchange: str, bindings: dict[str, list[str]]) -> None:
    raise NotImplementedError("setup_direct: declare a direct exchange, the queues, bindings")


def setup_topic(ch: BlockingChannel, exchange: str, bindings: dict[str, list[str]]) -> None:
    raise NotImplementedError("setup_topic: declare a topic exchange, the queues, bindings")


def setup_fanout(ch: BlockingChannel, exchange: str, queues: list[str]) -> None:
    raise NotImplementedError("setup_fanout: declare a fanout exchange and bind the queues")


def setup_headers(ch: BlockingChannel, exchange: str,
                  bindings: dict[str, tuple[dict[str, str], bool]]) -> None:
    raise NotImplementedError("setup_headers: declare a headers exchange, bind on headers")


def setup_dead_lettering(ch: BlockingChannel, queue: str, dead_letter_exchange: str,
                         dead_queue: str, queue_ttl_ms: int | None = None) -> None:
    raise NotImplementedError("setup_dead_lettering: a DLX, a dead queue, and a work queue "
                              "that dead-letters into them")


def handle_one(ch: BlockingChannel, queue: str, handler: Callable[[bytes], None]) -> bool:
    raise NotImplementedError("handle_one: get one message, ack it or dead-letter it")


def publish_with_ttl(ch: BlockingChannel, exchange: str, routing_key: str, body: bytes,
                     ttl_ms: int) -> None:
    raise NotImplementedError("publish_with_ttl: publish with a per-message expiration")
