"""Request-reply over Kafka: each request carries a unique correlation id and the topic to
reply to; one listener thread reads the reply topic and hands each reply to the caller
waiting for that id; a caller that waits too long gets RpcTimeout."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition


class RpcTimeout(Exception):
    """No reply with our correlation id arrived in time."""


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Any = None
        self.error: ValueError | None = None


class RpcClient:
    def __init__(self, bootstrap: str, request_topic: str, reply_topic: str) -> None:
        self.request_topic = request_topic
        self.reply_topic = reply_topic
        self.producer = Producer({"bootstrap.servers": bootstrap, "log_level": 0})
        # No consumer group: this client reads every partition of the reply topic from its
        # current end (replies to earlier clients are not ours), positioned before any call.
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused",
                                  "enable.auto.commit": False, "log_level": 0})
        meta = self.consumer.list_topics(reply_topic, timeout=10).topics[reply_topic]
        positions = []
        for partition in meta.partitions:
            _, high = self.consumer.get_watermark_offsets(
                TopicPartition(reply_topic, partition), timeout=10)
            positions.append(TopicPartition(reply_topic, partition, high))
        self.consumer.assign(positions)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            headers = dict(msg.headers() or [])
            # What one reply can raise stays in this loop: a listener that dies on one bad
            # message leaves every later caller waiting for replies nobody reads.
            cid = (headers.get("correlation_id") or b"").decode("utf-8", "replace")
            with self._lock:
                waiter = self._pending.pop(cid, None)
            if waiter is None:
                continue                 # someone else's reply, or one that came too late
            try:
                reply = json.loads(msg.value() or b"")
                if not isinstance(reply, dict):
                    raise ValueError(f"a JSON {type(reply).__name__}, not an object")
                waiter.reply = reply
            except ValueError as exc:    # json.JSONDecodeError and UnicodeDecodeError too
                waiter.error = ValueError(f"the reply to {cid} is not a JSON object: {exc}")
            waiter.done.set()

    def call(self, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        cid = str(uuid.uuid4())
        waiter = _Pending()
        with self._lock:
            self._pending[cid] = waiter
        try:
            self.producer.produce(self.request_topic, json.dumps(payload).encode(),
                                  headers=[("correlation_id", cid.encode()),
                                           ("reply_to", self.reply_topic.encode())])
        except BaseException:
            # A request refused on the spot (too large for the broker, a full queue, a
            # payload json cannot encode) is a call given up: it leaves no waiter behind.
            with self._lock:
                self._pending.pop(cid, None)
            raise
        # The timeout bounds the whole call: a broker slow to acknowledge the request holds
        # the caller no longer than that (what is still queued goes out in the background).
        self.producer.flush(timeout)
        if not waiter.done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                self._pending.pop(cid, None)
            raise RpcTimeout(f"no reply to {cid} within {timeout} s")
        if waiter.error is not None:
            raise waiter.error
        return dict(waiter.reply)

    def close(self) -> None:
        self._stop.set()
        self._listener.join(5)
        self.consumer.close()
        # the producer too: librdkafka's threads and broker connections are the handle's
        # until it is closed (close() flushes what is still queued first)
        self.producer.close()
